"""Training a subset of the members (`--member I`), several launches into one run at once (what
the tasks of a Slurm array do), and the pieces that make that safe without Slurm."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import pytest

from ensemble.cli.train import train_main
from ensemble.errors import Preempted
from ensemble.files import atomic_directory, create_once, remove_stale_tmp, tmp_name
from ensemble.runtime.checkpointing import StopRequest

from .conftest import PYTHON, REPO, assert_same_members, tiny_overrides


def _error(capsys, argv: list[str]) -> str:
    assert train_main(argv) == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_member_index_out_of_range_and_overwrite_are_refused(tmp_path, capsys, datasets_cache):
    out = tmp_path / "run"
    line = _error(capsys, [*tiny_overrides(out, datasets_cache), "--member", "2", "--resume", "auto"])
    assert line == (
        "error: --member 2: the config has 2 members (indices 0 to 1, see --list-members); pass one of "
        "those, or add seeds to members.seeds"
    )
    line = _error(capsys, [*tiny_overrides(out, datasets_cache, output__overwrite="true"), "--member", "0"])
    assert "--member trains into a run shared with other launches, which output.overwrite=true" in line
    assert not out.exists() or not any(out.iterdir())


def test_list_members_and_get(capsys, tmp_path, datasets_cache):
    argv = tiny_overrides(tmp_path / "run", datasets_cache, members__seeds="[7, 8, 9]")
    assert train_main([*argv, "--list-members"]) == 0
    assert capsys.readouterr().out.splitlines() == ["0 7 member-0", "1 8 member-1", "2 9 member-2"]
    for key, shown in [
        ("output.dir", str(tmp_path / "run")),
        ("members.seeds", "[7, 8, 9]"),
        ("train.max_steps", "4"),
        ("data.text_column", "null"),
    ]:
        assert train_main([*argv, "--get", key]) == 0
        assert capsys.readouterr().out == shown + "\n"
    assert train_main([*argv, "--get", "train.nope"]) == 2
    assert "--get train.nope: no such config key" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # neither trains nor writes anything


@pytest.mark.slow
def test_concurrent_launches_of_single_members_equal_one_full_run(tmp_path, datasets_cache):
    """Two processes start together, each with one --member, into the same new run with a bpe
    tokenizer (both race to train and publish it): the members equal those of one process
    training both, and nothing is evaluated until asked."""
    extra = {"model__tokenizer": "bpe", "model__tokenizer_vocab_size": 300, "checkpoint__every_steps": 2}
    full = tmp_path / "full"
    proc = subprocess.run(
        [PYTHON, "launch/train.py", *tiny_overrides(full, datasets_cache, **extra)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    shared = tmp_path / "shared"
    argv = tiny_overrides(shared, datasets_cache, **extra)
    procs = [
        subprocess.Popen(
            [PYTHON, "launch/train.py", *argv, "--resume", "auto", "--member", str(i)],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in (0, 1)
    ]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs[0][-2000:] + errs[1][-2000:]
    for i in (0, 1):
        assert f"member-{i} done;" in errs[i]
    assert_same_members(full, shared, (0, 1))
    assert not (shared / "results.json").exists()
    assert "every member is complete, run `python launch/evaluate.py" in errs[0] + errs[1]
    manifest = json.loads((shared / "manifest.json").read_text())
    assert manifest["run_id"] == (shared / "run_id").read_text()  # one id, whoever wrote it first
    assert [m["status"] for m in manifest["members"]] == ["complete", "complete"]
    assert not [p for p in shared.rglob("*") if ".tmp-" in p.name]


def test_create_once_first_writer_wins(tmp_path):
    path = tmp_path / "run_id"
    got: list[str] = []
    threads = [
        threading.Thread(target=lambda i=i: got.append(create_once(path, f"id-{i}"))) for i in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 1 and got[0] == path.read_text()
    assert create_once(path, "later") == got[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run_id"]


def test_atomic_directory_keeps_an_existing_one_when_asked(tmp_path):
    final = tmp_path / "tokenizer"
    with atomic_directory(final) as tmp:
        (tmp / "a").write_text("first")
    with atomic_directory(final, replace=False) as tmp:
        (tmp / "a").write_text("second")
    assert (final / "a").read_text() == "first"
    with atomic_directory(final) as tmp:
        (tmp / "a").write_text("third")
    assert (final / "a").read_text() == "third"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer"]


def test_stale_temporaries_of_other_members_are_left_alone(tmp_path):
    for name in ("member-0", "member-1"):
        tmp_name(tmp_path / name).mkdir()
    removed = remove_stale_tmp(tmp_path, ["member-1"])
    assert [p.name for p in removed] == [tmp_name(tmp_path / "member-1").name]
    assert tmp_name(tmp_path / "member-0").is_dir()


def test_a_signal_delivered_twice_at_once_is_one_request():
    """Slurm signals every process of a step, and the launcher forwards what it got: the worker
    gets the same request twice within moments, which must not count as "stop now"."""
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested() and stop.reason() == "SIGUSR1"
    with StopRequest(repeat_window_s=0.0) as stop:
        os.kill(os.getpid(), signal.SIGUSR1)
        with pytest.raises(Preempted, match="second SIGUSR1 while stopping"):
            os.kill(os.getpid(), signal.SIGUSR1)


def test_ctrl_c_asks_for_a_checkpoint_and_ctrl_c_again_stops_at_once():
    """The first Ctrl-C is a stop request like SIGTERM; the launcher's forwarded copy, moments
    later, is the same request; a second press after that stops at once."""
    from ensemble.runtime.checkpointing import CTRL_C_REPEAT_WINDOW_S

    before = signal.getsignal(signal.SIGINT)
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # the launcher's copy
        assert stop.requested() and stop.reason() == "SIGINT"
        time.sleep(CTRL_C_REPEAT_WINDOW_S + 0.05)
        with pytest.raises(Preempted, match="second Ctrl-C while stopping: stopped at once"):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before  # restored


@pytest.mark.parametrize("resume", ["auto", "member-1-checkpoint"])
def test_resume_path_of_an_unselected_member_is_refused(tmp_path, capsys, datasets_cache, resume):
    out = tmp_path / "run"
    argv = tiny_overrides(out, datasets_cache, checkpoint__every_steps=2)
    assert train_main([*argv, "--member", "1", "--resume", "auto"]) == 0
    ckpt = next((out / "checkpoints" / "member-1").glob("step-*"))
    capsys.readouterr()
    if resume == "auto":  # member-1 complete: skipped; member-0 trains now
        assert train_main([*argv, "--member", "0", "--resume", "auto"]) == 0
        assert "member-1 saved" not in capsys.readouterr().err
        assert (out / "members" / "member-0" / "member.json").is_file()
    else:
        line = _error(capsys, [*argv, "--member", "0", "--resume", str(ckpt)])
        assert (
            line == f"error: checkpoint {ckpt} is of member-1, which --member does not select; add --member 1"
        )


def test_cli_member_flag_is_documented():
    out = subprocess.run(
        [PYTHON, "launch/train.py", "--help"], cwd=REPO, capture_output=True, text=True
    ).stdout
    for flag in ("--member INDEX", "--no-eval", "--list-members", "--get SECTION.KEY"):
        assert flag in out
