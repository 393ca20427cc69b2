"""Bad input: one line naming the problem and the fix, exit status 2, nothing half-written."""

from __future__ import annotations

import gzip
import json
import subprocess
import time
from pathlib import Path

import pytest

from ensemble.cli.train import train_main

from .conftest import PYTHON, REPO, tiny_overrides


def _fails(capsys, argv: list[str], message: str) -> str:
    assert train_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no error printed"
    last = err[-1]
    assert last.startswith("error: "), last
    assert message in last, last
    return last


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"train__lrr": 1}, "unknown config key train.lrr (did you mean lr?)"),
        # the names transformers users type get ours, not difflib's guess
        ({"train__learning_rate": 1}, "unknown config key train.learning_rate (did you mean train.lr?)"),
        ({"train__seed": 1}, "unknown config key train.seed (did you mean members.seeds?)"),
        (
            {"data__train_files": "[x.txt]"},
            "data.dataset=builtin:python-docs and data.train_files/test_files are both set; to use your "
            "own files add data.dataset=null",
        ),
        ({"data__encoding": "latin-9x"}, "data.encoding='latin-9x' is not a known encoding"),
        (
            {"data__dataset": "builtin:python-stdlb"},
            "data.dataset=builtin:python-stdlb is not a built-in text (did you mean builtin:python-stdlib?); "
            "use one of builtin:python-docs, builtin:python-stdlib",
        ),
        ({"train__per_device_batch_size": "four"}, "train.per_device_batch_size expects int, got 'four'"),
        ({"members__seeds": "[1, 2, 1]"}, "members.seeds has duplicate seeds [1]"),
        (
            {"data__text_column": "body"},
            "text column 'body' not in the dataset; set data.text_column to one of ['title', 'text']",
        ),
        (
            {"data__block_size": 128},
            "data.block_size=128 exceeds the model's context of 64 tokens; set data.block_size <= 64",
        ),
        (
            {"data__dataset": "null", "data__train_files": "[/nonexistent/train.txt]"},
            "data.train_files: file /nonexistent/train.txt not found; fix the path",
        ),
    ],
)
def test_bad_input_is_one_line(tmp_path, capsys, datasets_cache, extra, message):
    out = tmp_path / "run"
    _fails(capsys, tiny_overrides(out, datasets_cache, **extra), message)
    assert not (out / "members").exists()


def _text_files(tmp_path: Path, sherlock: Path) -> tuple[Path, Path]:
    """A Latin-1 book (as many Project Gutenberg books are) and a binary file saved as .txt."""
    text = sherlock.read_text()[:20000].replace(" the ", " thé ")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(text.encode("latin-1"))
    binary = tmp_path / "binary.txt"
    binary.write_bytes(gzip.compress(text.encode()))
    return latin1, binary


def test_text_that_is_not_utf8_is_one_line_for_train_and_evaluate(tmp_path, capsys, datasets_cache, sherlock):
    """Training on, or evaluating with, a file that is not UTF-8 says which byte, and how to fix
    it (data.encoding, or iconv); a binary file is named as such; nothing is left behind; with
    data.encoding=latin-1 both commands work."""
    from ensemble.cli.evaluate import evaluate_main

    latin1, binary = _text_files(tmp_path, sherlock)
    offset = latin1.read_bytes().index(b"\xe9")
    line = latin1.read_bytes()[:offset].count(b"\n") + 1
    own = {"data__dataset": "null", "data__txt_sample_by": "paragraph"}
    out = tmp_path / "run"
    _fails(
        capsys,
        tiny_overrides(out, datasets_cache, data__train_files=f"[{latin1}]", **own),
        f"{latin1} is not utf-8 text (byte 0xe9 at byte {offset}, line {line}); if it is in another "
        "encoding, set data.encoding (e.g. data.encoding=latin-1",
    )
    assert not out.exists()
    _fails(
        capsys,
        tiny_overrides(out, datasets_cache, data__train_files=f"[{binary}]", **own),
        f"{binary} holds binary data (a NUL byte at byte ",
    )
    assert not out.exists()
    argv = tiny_overrides(
        out, datasets_cache, data__train_files=f"[{latin1}]", data__encoding="latin-1", **own
    )
    assert train_main(argv) == 0

    def evaluate(*args: str) -> tuple[int, str]:
        code = evaluate_main([str(out), *args])
        return code, capsys.readouterr().err.strip().splitlines()[-1]

    results = (out / "results.json").read_bytes()
    code, last = evaluate("--data", str(latin1), "data.encoding=utf-8")
    assert code == 2 and last.startswith(f"error: {latin1} is not utf-8 text (byte 0xe9"), last
    assert last.endswith(f"convert it to utf-8: iconv -f latin1 -t utf-8 {latin1} > latin1.utf-8.txt"), last
    code, last = evaluate(
        "--data", str(latin1), "data.encoding=ascii"
    )  # the fix names the encoding asked for
    assert code == 2 and last.endswith(
        f"convert it to ascii: iconv -f latin1 -t ascii {latin1} > latin1.ascii.txt"
    ), last
    code, last = evaluate("--data", str(binary))
    assert code == 2 and last.startswith(f"error: {binary} holds binary data"), last
    code, last = evaluate("--data", str(tmp_path / "nonexistent.txt"))
    assert (
        code == 2
        and last == f"error: --data: file(s) ['{tmp_path / 'nonexistent.txt'}'] not found; fix the paths"
    )
    assert (out / "results.json").read_bytes() == results
    code, _ = evaluate("--data", str(latin1))  # the run's own data.encoding applies
    assert code == 0 and (out / "eval" / "latin1.txt-test" / "results.json").is_file()


def test_test_split_too_small(tmp_path, capsys, datasets_cache, sherlock):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    argv = tiny_overrides(
        tmp_path / "run",
        datasets_cache,
        data__dataset="null",
        data__train_files=f"[{sherlock}]",
        data__test_files=f"[{empty}]",
        data__txt_sample_by="paragraph",
    )
    _fails(
        capsys,
        argv,
        "the test split has 0 token(s): data.test_files hold no text; evaluation needs at least 2",
    )


def test_output_dir_not_writable(tmp_path, capsys, datasets_cache):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    _fails(
        capsys,
        tiny_overrides(blocker / "run", datasets_cache),
        f"output.dir '{blocker / 'run'}' is not writable",
    )


def test_existing_run_is_never_clobbered(tmp_path, capsys, datasets_cache):
    out = tmp_path / "run"
    assert train_main(tiny_overrides(out, datasets_cache, members__seeds="[1]")) == 0
    before = {p: p.read_bytes() for p in (out / "results.json", out / "members/member-0/model.safetensors")}
    _fails(
        capsys,
        tiny_overrides(out, datasets_cache, members__seeds="[2]"),
        "already holds a run (manifest.json); pass --resume auto to continue it, choose another "
        "output.dir, or pass output.overwrite=true to replace it",
    )
    assert all(p.read_bytes() == b for p, b in before.items())
    # with overwrite the old run is replaced, and no stale member survives
    assert (
        train_main(tiny_overrides(out, datasets_cache, members__seeds="[2]", output__overwrite="true")) == 0
    )
    info = json.loads((out / "members/member-0/member.json").read_text())
    assert info["seed"] == 2
    assert json.loads((out / "results.json").read_text())["members"][0]["seed"] == 2


def test_failed_member_leaves_no_member_directory(tmp_path, capsys, datasets_cache):
    out = tmp_path / "run"
    # an absurd learning rate without clipping drives the loss to inf/nan within a few steps
    argv = tiny_overrides(
        out,
        datasets_cache,
        members__seeds="[1]",
        train__lr=1e12,
        train__max_grad_norm="null",
        train__max_steps=6,
        train__logging_steps=2,
    )
    _fails(capsys, argv, "member-0 (seed 1): the training loss became")
    members = out / "members"
    assert not (members / "member-0").exists()
    assert [p.name for p in members.iterdir()] == []  # no temporary directory either
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["members"][0]["status"] == "failed"
    assert not (out / "results.json").exists()


def test_crash_while_saving_leaves_nothing_that_looks_finished(tmp_path, capsys, datasets_cache, monkeypatch):
    import ensemble.core.members as members_mod

    real = members_mod.atomic_write_json

    def broken(path, obj):
        if Path(path).name == members_mod.MEMBER_INFO:  # the member's last file, after its weights
            raise OSError(28, "No space left on device")
        real(path, obj)

    monkeypatch.setattr(members_mod, "atomic_write_json", broken)
    out = tmp_path / "run"
    _fails(
        capsys,
        tiny_overrides(out, datasets_cache, members__seeds="[1]"),
        f"could not write member-0 to {out / 'members' / 'member-0'} (No space left on device); nothing "
        "partial was kept",
    )
    assert list((out / "members").iterdir()) == []


def test_reference_config_offline_fails_at_once_with_the_fix(tmp_path):
    start = time.monotonic()
    proc = subprocess.run(
        [
            PYTHON,
            "launch/train.py",
            "--config",
            "configs/gpt2-enlightened.yaml",
            f"output.dir={tmp_path / 'ref'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "HF_ENDPOINT": "http://unreachable.invalid"},
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: cannot reach the Hugging Face Hub to fetch")
    assert "gpt2" in lines[0] and "model.name_or_path=DIR" in lines[0]
    assert elapsed < 30, f"took {elapsed:.0f}s: the Hub's retry loop was not short-circuited"


def test_cli_prints_a_single_error_line(tmp_path):
    proc = subprocess.run(
        [PYTHON, "launch/train.py", "--config", "configs/tiny.yaml", "train.lrr=1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: unknown config key train.lrr (did you mean lr?); valid keys in train: adam_betas, adam_eps, "
        "compile, gradient_accumulation_steps, logging_steps, lr, lr_scheduler, max_grad_norm, max_steps, "
        "mixed_precision, num_epochs, peak_tflops, per_device_batch_size, tf32, warmup_steps, weight_decay"
    ]


def test_mistyped_local_path_is_not_sent_to_the_hub(tmp_path, capsys, datasets_cache):
    _fails(
        capsys,
        tiny_overrides(tmp_path / "run", datasets_cache, data__dataset="./no-such-dir"),
        "data.dataset: dataset directory ./no-such-dir not found; fix the path",
    )
    _fails(
        capsys,
        tiny_overrides(tmp_path / "run", datasets_cache, model__tokenizer="/no/such/tokenizer"),
        "model.tokenizer: tokenizer directory /no/such/tokenizer not found; fix the path",
    )


def test_hub_dataset_offline_fails_at_once(tmp_path, capsys, datasets_cache, monkeypatch):
    from ensemble.core import hub

    monkeypatch.setenv("HF_ENDPOINT", "http://unreachable.invalid")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    hub.hub_reachable.cache_clear()
    try:
        start = time.monotonic()
        _fails(
            capsys,
            tiny_overrides(tmp_path / "run", datasets_cache, data__dataset="someone/some-data"),
            "cannot reach the Hugging Face Hub to fetch dataset 'someone/some-data' (unreachable.invalid:80",
        )
        assert time.monotonic() - start < 30
    finally:
        hub.hub_reachable.cache_clear()


def test_evaluate_errors(tmp_path, capsys):
    from ensemble.cli.evaluate import evaluate_main

    def fails(argv: list[str], message: str) -> None:
        assert evaluate_main(argv) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("error: ") and message in last, last

    fails([str(tmp_path / "nope")], f"run directory {tmp_path / 'nope'} not found")
    (tmp_path / "empty-run").mkdir()
    fails([str(tmp_path / "empty-run")], "holds no finished members")
    fails([], "give either a run directory or --members")
    (tmp_path / "m").mkdir()
    fails(["--members", str(tmp_path / "m")], "config " + str(tmp_path / "m" / "config.yaml") + " not found")


@pytest.mark.slow
def test_compile_where_it_cannot_run_stops_before_any_work(tmp_path, datasets_cache):
    """train.compile=true / eval.compile=true on a machine without a working C++ compiler (what
    inductor needs for CPU code): one line naming the setting and the fix, nothing written."""
    import os

    env = {
        **os.environ,
        "CXX": str(tmp_path / "no-such-compiler"),
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),  # nothing compiled before may be reused
    }
    out = tmp_path / "run"
    argv = tiny_overrides(out, datasets_cache, train__compile="true")
    proc = subprocess.run(
        [PYTHON, "launch/train.py", *argv], cwd=REPO, capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: train.compile=true but torch.compile fails on this cpu ("), last
    assert "InvalidCxxCompiler" in last
    assert last.endswith(
        "; install what it needs (a C++ compiler for CPU, Triton for GPU) or set train.compile=false"
    )
    assert not (out / "members").exists() and not (out / "manifest.json").exists()

    # evaluation: the run's previous results stay as they were
    assert train_main(tiny_overrides(out, datasets_cache, members__seeds="[42]", eval__plots="false")) == 0
    before = (out / "results.json").read_bytes()
    proc = subprocess.run(
        [PYTHON, "launch/evaluate.py", str(out), "eval.compile=true"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("error: eval.compile=true but torch.compile fails on this cpu (")
    )
    assert (out / "results.json").read_bytes() == before


def test_evaluating_a_run_with_unfinished_members_says_which_are_used(tmp_path, capsys, datasets_cache):
    """A run whose manifest lists members that are not finished (still training, failed) is
    evaluated with the finished ones, saying so; an ensemble of one member is labelled as such."""
    import shutil

    from ensemble.cli.evaluate import evaluate_main

    out = tmp_path / "run"
    assert train_main(tiny_overrides(out, datasets_cache, members__seeds="[1, 2]")) == 0
    shutil.rmtree(out / "members" / "member-1")
    capsys.readouterr()
    assert evaluate_main([str(out)]) == 0
    err = capsys.readouterr().err
    assert (
        f"{out}: 1 of 2 members are finished; using member-0, without member-1 (not finished: finish "
        f"them with launch/train.py --config {out / 'config.yaml'} --resume auto)"
    ) in err
    table = (out / "results.md").read_text()
    assert "| **Ensemble** (mean probability), of one member (= member-0) |" in table


@pytest.mark.parametrize(
    "command, argv, message",
    [
        ("train", ["train.lrr=1e-3"], "did you mean lr?"),
        ("evaluate", ["/nonexistent-run"], "not found"),
        ("distill", ["/nonexistent-run"], "not found"),
    ],
)
def test_a_typo_or_a_missing_run_is_reported_before_torch_is_imported(command, argv, message):
    """What a user meets first costs no torch import (3-13 s on 2 cores)."""
    code = (
        "import sys\n"
        f"from ensemble.cli.{command} import {command}_main\n"
        f"status = {command}_main({argv!r})\n"
        "print('status', status, 'torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    proc = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.stdout.split() == ["status", "2", "False", "False"], proc.stdout + proc.stderr
    assert message in proc.stderr
