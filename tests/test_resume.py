"""Checkpoints, resume and preemption: a member killed at any moment and resumed ends bitwise
identical, on CPU, to the same member trained without interruption.

Kills are real SIGKILLs: the `ENSEMBLE_FAULT` hook (ensemble/runtime/faults.py) makes the training process
kill itself at a chosen step, half-way through writing a checkpoint, or half-way through writing a
finished member, so the tests hit those moments exactly instead of hoping a timer does.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ensemble.cli.train import train_main
from ensemble.config.loading import load_config
from ensemble.errors import PREEMPTED_EXIT, EnsembleError
from ensemble.runtime.checkpointing import (
    MemberCheckpoints,
    check_resumable,
    check_training_data,
    trajectory_config,
)

from .conftest import PYTHON, REPO, assert_same_members, tiny_overrides

SEEDS = [42, 123, 456]
# Dropout on: a resumed member must also continue the dropout stream exactly.
DROPOUT = (
    "{n_layer: 1, n_embd: 32, n_head: 2, n_positions: 64, resid_pdrop: 0.1, embd_pdrop: 0.1, attn_pdrop: 0.1}"
)
EVERY = 3  # checkpoint.every_steps in these tests


@pytest.fixture(scope="module")
def small_text(sherlock, tmp_path_factory) -> Path:
    """A few thousand characters of real text: about 11 optimizer steps per epoch, so that runs
    cross epoch boundaries (and their checkpoints) in a second or two."""
    path = tmp_path_factory.mktemp("text") / "small.txt"
    path.write_text(sherlock.read_text()[:6000])
    return path


def overrides(out: Path, cache: Path, text: Path, **extra: object) -> list[str]:
    values: dict[str, object] = {
        "model__gpt2_config": DROPOUT,
        "data__dataset": "null",
        "data__train_files": f"[{text}]",
        "data__txt_sample_by": "paragraph",
        "members__seeds": str(SEEDS),
        "train__max_steps": "null",
        "train__num_epochs": 3,
        "train__gradient_accumulation_steps": 2,  # and an odd number of batches per epoch
        "checkpoint__every_steps": EVERY,
        "eval__bootstrap_samples": 0,
        "eval__plots": "false",
    }
    values.update(extra)
    return tiny_overrides(out, cache, **values)


def train(argv: list[str], fault: str | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "ENSEMBLE_FAULT"}
    if fault:
        env["ENSEMBLE_FAULT"] = fault
    return subprocess.run(
        [PYTHON, "launch/train.py", *argv], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env
    )


def ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-4000:]


def killed(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == -signal.SIGKILL, f"not killed (status {proc.returncode}): {proc.stderr[-3000:]}"


def stray_temporaries(run: Path) -> list[Path]:
    return [p for p in run.rglob("*") if ".tmp-" in p.name]


def total_steps(run: Path) -> int:
    return json.loads((run / "members/member-0/member.json").read_text())["training"]["steps"]


def checkpoints(run: Path, member: int) -> MemberCheckpoints:
    return MemberCheckpoints(run / "checkpoints", f"member-{member}")


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, datasets_cache, small_text) -> Path:
    """Three members trained without interruption, in a process of their own."""
    out = tmp_path_factory.mktemp("baseline") / "run"
    ok(train(overrides(out, datasets_cache, small_text)))
    return out


# --------------------------------------------------------------------------------------------
# Checkpoints


@pytest.mark.slow
def test_checkpoints_are_complete_recorded_and_pruned(baseline):
    steps = total_steps(baseline)
    assert steps > 3 * EVERY
    for i, seed in enumerate(SEEDS):
        done = checkpoints(baseline, i).complete()
        assert len(done) == 2, done  # checkpoint.keep_last
        for path in done:
            info = json.loads((path / "checkpoint.json").read_text())
            assert MemberCheckpoints.step_of(path) == info["step"] < steps
            assert (info["member"], info["seed"], info["processes"]) == (f"member-{i}", seed, 1)
            assert info["config"]["train.lr"] == 1e-3 and info["config"]["members.seed"] == seed
            names = {p.name for p in path.iterdir()}
            # Accelerate's save_state: weights, optimizer, scheduler, RNG states, our progress
            assert {"model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl"} <= names
            assert "custom_checkpoint_0.pkl" in names
        # the newest is the last step that was due before the end: every 3 steps or an epoch end
        last = json.loads((done[-1] / "checkpoint.json").read_text())
        assert steps - last["step"] <= EVERY
    assert not stray_temporaries(baseline)


@pytest.mark.slow
def test_killed_mid_run_mid_checkpoint_and_mid_save_then_resumed_is_bitwise_identical(
    tmp_path, datasets_cache, small_text, baseline
):
    steps = total_steps(baseline)
    out = tmp_path / "run"
    argv = overrides(out, datasets_cache, small_text)
    resume = [*argv, "--resume", "auto"]
    k1 = steps // 2 - 1 if (steps // 2 - 1) % EVERY else steps // 2 - 2  # not a checkpoint step
    k2 = EVERY * (k1 // EVERY + 2)  # a checkpoint step after k1
    assert k2 < steps

    killed(train(argv, f"kill:0:{k1}"))
    member0 = checkpoints(out, 0)
    latest = member0.latest()
    assert latest is not None and MemberCheckpoints.step_of(latest) < k1
    assert not (out / "members" / "member-0").exists()

    killed(train(resume, f"kill-checkpoint:0:{k2}"))
    half_written = member0.dir / f".step-{k2:07d}.tmp-save"
    assert (half_written / "model.safetensors").is_file()  # the kill came mid-checkpoint...
    assert MemberCheckpoints.step_of(member0.latest()) < k2  # ...and it is not taken as complete

    killed(train(resume, "kill-save:1:0"))
    assert (out / "members" / "member-0" / "member.json").is_file()
    assert not (out / "members" / "member-1").exists()
    assert [p.name for p in (out / "members").iterdir() if p.name.startswith(".member-1.tmp-")]

    proc = train(resume)
    ok(proc)
    assert "member-0 is complete: skipped" in proc.stderr
    assert "member-1 resumes from" in proc.stderr
    assert_same_members(baseline, out, range(3))
    assert not stray_temporaries(out)
    info = json.loads((out / "members/member-1/member.json").read_text())
    assert info["training"]["resumed_from"]["step"] == MemberCheckpoints.step_of(
        Path(info["training"]["resumed_from"]["checkpoint"])
    )
    assert json.loads((out / "results.json").read_text())["ensemble"]["tokens"] > 0


@pytest.mark.slow
def test_fault_injection_at_random_points(tmp_path, datasets_cache, small_text, baseline):
    """Kill the training process at several random points (fixed seed), resume each time; at the
    end every member is complete, equals its uninterrupted twin, and no temporary is left."""
    steps = total_steps(baseline)
    rng = random.Random(20261125)
    points: set[tuple[int, int, str]] = set()
    while len(points) < 5:
        kind = rng.choice(["kill", "kill", "kill-checkpoint", "kill-save"])
        member = rng.randrange(len(SEEDS))
        if kind == "kill":
            step = rng.randrange(1, steps)
        elif kind == "kill-checkpoint":
            step = rng.choice(range(EVERY, steps, EVERY))
        else:
            step = steps + 1  # after the member's last step
        points.add((member, step, kind))
    out = tmp_path / "run"
    argv = overrides(out, datasets_cache, small_text)
    # In training order: each point lies after the checkpoint the previous kill resumes from.
    for n, (member, step, kind) in enumerate(sorted(points)):
        fault = f"{kind}:{member}:{0 if kind == 'kill-save' else step}"
        proc = train(argv if n == 0 else [*argv, "--resume", "auto"], fault)
        assert proc.returncode == -signal.SIGKILL, f"{fault} did not strike: {proc.stderr[-3000:]}"
    ok(train([*argv, "--resume", "auto"]))
    assert_same_members(baseline, out, range(3))
    assert not stray_temporaries(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [m["status"] for m in manifest["members"]] == ["complete"] * 3


@pytest.mark.slow
def test_resume_from_a_given_checkpoint(tmp_path, baseline):
    """--resume PATH trains that member again from PATH (later checkpoints of it are dropped);
    the other members, complete, are skipped."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(baseline, out)
    argv = [f"{k}={v}" for k, v in _saved_overrides(out).items()]
    older, newer = checkpoints(out, 0).complete()
    proc = train([*argv, "--resume", str(older)])
    ok(proc)
    assert f"member-0 is complete; it is trained again from {older}" in proc.stderr
    assert "member-1 is complete: skipped" in proc.stderr
    info = json.loads((out / "members/member-0/member.json").read_text())
    assert info["training"]["resumed_from"]["step"] == MemberCheckpoints.step_of(older)
    assert_same_members(baseline, out, range(3))
    assert [p.name for p in checkpoints(out, 0).complete()] == [older.name, newer.name]  # written anew


def _saved_overrides(run: Path) -> dict[str, str]:
    """The run's own config.yaml, as command-line overrides (output.dir pointing at the copy)."""
    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["output"]["dir"] = str(run)
    flat = {}
    for section, values in cfg.items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = (
                yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
            )
    return flat


# --------------------------------------------------------------------------------------------
# Signals


@pytest.fixture(scope="module")
def long_baseline(tmp_path_factory, datasets_cache, small_text) -> Path:
    """Two members trained long enough (30 epochs) to be signalled mid-way."""
    out = tmp_path_factory.mktemp("long") / "run"
    ok(train(overrides(out, datasets_cache, small_text, members__seeds="[42, 123]", train__num_epochs=30)))
    return out


def _wait_for_checkpoint(run: Path, member: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while checkpoints(run, member).latest() is None:
        assert proc.poll() is None, f"ended before its first checkpoint: {proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)


@pytest.mark.parametrize(
    "sig", [signal.SIGUSR1, signal.SIGTERM, signal.SIGINT], ids=["SIGUSR1", "SIGTERM", "Ctrl-C"]
)
@pytest.mark.slow
def test_signal_saves_a_checkpoint_exits_75_and_resumes_identically(
    sig, tmp_path, datasets_cache, small_text, long_baseline
):
    out = tmp_path / "run"
    argv = overrides(out, datasets_cache, small_text, members__seeds="[42, 123]", train__num_epochs=30)
    env = {k: v for k, v in os.environ.items() if k != "ENSEMBLE_FAULT"}
    proc = subprocess.Popen(
        [PYTHON, "launch/train.py", *argv],
        cwd=REPO,
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    _wait_for_checkpoint(out, 0, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED_EXIT, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"preempted: stopped by {sig.name}: member-0 checkpointed at step "), last
    step = int(last.split("at step ")[1].split()[0])
    assert step % 10 == 0  # stops are agreed every checkpoint.stop_check_steps (10) steps only
    assert MemberCheckpoints.step_of(checkpoints(out, 0).latest()) == step
    assert "--resume auto" in last and "exit status 75" in last
    assert not (out / "members" / "member-0").exists() and not stray_temporaries(out)
    if sig == signal.SIGTERM:  # what follows does not depend on the signal that stopped the run
        ok(train([*argv, "--resume", "auto"]))
        assert_same_members(long_baseline, out, range(2))


# --------------------------------------------------------------------------------------------
# Compiled members


@pytest.mark.slow
def test_compiled_member_killed_then_resumed_is_bitwise_identical(tmp_path, datasets_cache, small_text):
    """train.compile=true, forced on CPU: the compiled member (dropout, accumulation, epoch ends)
    checkpoints, resumes after a SIGKILL bitwise equal to its uninterrupted twin, and is saved in
    Hugging Face format (no `_orig_mod.` keys: it was compiled in place)."""
    from transformers import AutoModelForCausalLM

    common = {"members__seeds": "[42]", "train__compile": "true"}
    ref = tmp_path / "ref"
    ok(train(overrides(ref, datasets_cache, small_text, **common)))
    out = tmp_path / "run"
    argv = overrides(out, datasets_cache, small_text, **common)
    killed(train(argv, f"kill:0:{2 * EVERY + 2}"))
    assert MemberCheckpoints.step_of(checkpoints(out, 0).latest()) == 2 * EVERY
    proc = train([*argv, "--resume", "auto"])
    ok(proc)
    assert "member-0 resumes from" in proc.stderr
    assert "torch.compile on (train.compile=True)" in proc.stderr
    assert "first optimizer step" in proc.stderr and "(torch.compile compiled the member)" in proc.stderr
    assert_same_members(ref, out, [0])
    info = json.loads((out / "members/member-0/member.json").read_text())["training"]
    assert info["compiled"] is True and info["first_step_seconds"] > 0
    w = load_file(out / "members/member-0/model.safetensors")
    assert "transformer.wte.weight" in w and not [k for k in w if "_orig_mod" in k]
    assert AutoModelForCausalLM.from_pretrained(out / "members/member-0").transformer.h[0] is not None


# --------------------------------------------------------------------------------------------
# Two processes (torchrun, gloo)


def _torchrun(argv: list[str]) -> list[str]:
    return [str(Path(PYTHON).with_name("torchrun")), "--nproc_per_node", "2", "launch/train.py", *argv]


def _processes(argv: list[str]) -> list[str]:
    return [PYTHON, "launch/train.py", *argv, "--processes", "2"]


# one thread per rank under either launcher (torchrun's default), so that their members can match
ONE_THREAD = {**{k: v for k, v in os.environ.items() if k != "ENSEMBLE_FAULT"}, "OMP_NUM_THREADS": "1"}
PARALLEL = {"members__seeds": "[42, 123]", "train__num_epochs": 30, "parallel__placement": "parallel"}


@pytest.fixture(scope="module")
def parallel_reference(tmp_path_factory, datasets_cache, small_text) -> Path:
    """Two members trained by two torchrun ranks, one each, uninterrupted."""
    ref = tmp_path_factory.mktemp("parallel") / "ref"
    argv = overrides(ref, datasets_cache, small_text, **PARALLEL)
    ok(subprocess.run(_torchrun(argv), cwd=REPO, env=ONE_THREAD, capture_output=True, text=True))
    return ref


@pytest.mark.parametrize("launcher", [_torchrun, _processes], ids=["torchrun", "--processes"])
@pytest.mark.slow
def test_two_processes_parallel_sigterm_to_the_launcher_then_resume(
    launcher, tmp_path, datasets_cache, small_text, parallel_reference
):
    """SIGTERM to the launcher: it forwards the signal to both ranks (each training its own
    member), each saves a checkpoint and exits 75; the resumed members equal those of an
    uninterrupted torchrun launch of the same shape (one thread per process: not bitwise the
    single-process members). `--processes` exits 75 itself, with no traceback; torchrun does not."""
    out = tmp_path / "run"
    argv = overrides(out, datasets_cache, small_text, **PARALLEL)
    proc = subprocess.Popen(
        launcher(argv), cwd=REPO, env=ONE_THREAD, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    _wait_for_checkpoint(out, 1, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    for rank, member in ((0, 0), (1, 1)):
        assert (
            f"preempted: [rank {rank}/2] stopped by SIGTERM: member-{member} checkpointed at step" in err
        ), err[-4000:]
    if launcher is _processes:
        assert proc.returncode == PREEMPTED_EXIT and "Traceback" not in err, err[-4000:]
    assert not (out / "members" / "member-1").exists()
    resumed = subprocess.run(
        launcher([*argv, "--resume", "auto"]), cwd=REPO, env=ONE_THREAD, capture_output=True, text=True
    )
    ok(resumed)
    assert_same_members(parallel_reference, out, range(2))
    assert not stray_temporaries(out)


@pytest.mark.parametrize("zero", [None, 3], ids=["ddp", "zero3"])
@pytest.mark.slow
def test_two_processes_sequential_killed_mid_checkpoint_then_resume(
    zero, tmp_path, datasets_cache, small_text
):
    """Both ranks train each member (DDP, or DeepSpeed ZeRO-3 with its sharded optimizer and
    weights); rank 1 is SIGKILLed half-way through a checkpoint."""
    env = {k: v for k, v in os.environ.items() if k != "ENSEMBLE_FAULT"}
    common = {"members__seeds": "[42, 123]", "parallel__placement": "sequential"}
    if zero:
        common["parallel__deepspeed"] = str(REPO / "configs" / "deepspeed" / f"zero{zero}.json")
    ref = tmp_path / "ref"
    ok(
        subprocess.run(
            _torchrun(overrides(ref, datasets_cache, small_text, **common)),
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
        )
    )
    out = tmp_path / "run"
    argv = overrides(out, datasets_cache, small_text, **common)
    proc = subprocess.run(
        _torchrun(argv),
        cwd=REPO,
        env={**env, "ENSEMBLE_FAULT": f"kill-checkpoint:1:{2 * EVERY}:1"},
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert (checkpoints(out, 1).dir / f".step-{2 * EVERY:07d}.tmp-save").is_dir()
    assert (out / "members" / "member-0" / "member.json").is_file()
    ok(
        subprocess.run(
            _torchrun([*argv, "--resume", "auto"]), cwd=REPO, env=env, capture_output=True, text=True
        )
    )
    assert_same_members(ref, out, range(2))
    info = json.loads(
        (out / "checkpoints/member-1" / checkpoints(out, 1).latest().name / "checkpoint.json").read_text()
    )
    assert (info["processes"], info["zero_stage"]) == (2, zero)
    # the learning-rate schedule is part of every checkpoint (under DeepSpeed too)
    assert (checkpoints(out, 1).latest() / "scheduler.bin").is_file()
    assert not stray_temporaries(out)


# --------------------------------------------------------------------------------------------
# Bad input and failures


def _error(capsys, argv: list[str]) -> str:
    assert train_main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), lines[-5:]
    return lines[-1]


def test_resume_under_a_changed_config_is_refused(tmp_path, capsys, datasets_cache, small_text, baseline):
    before = (baseline / "manifest.json").read_bytes()
    line = _error(
        capsys, [*overrides(baseline, datasets_cache, small_text, train__lr=2e-3), "--resume", "auto"]
    )
    assert (
        f"output.dir '{baseline}' holds a run trained with a different config (train.lr: 0.001 -> 0.002)"
        in line
    )
    assert "resume with its config.yaml, or train into a new output.dir" in line
    assert (baseline / "manifest.json").read_bytes() == before
    # a checkpoint of another experiment offered for a new run
    other = checkpoints(baseline, 0).latest()
    line = _error(
        capsys,
        [
            *overrides(
                tmp_path / "new",
                datasets_cache,
                small_text,
                **{"model__gpt2_config": "{n_layer: 2, n_embd: 32, n_head: 2, n_positions: 64}"},
            ),
            "--resume",
            str(other),
        ],
    )
    assert f"checkpoint {other} was written with a different config (model.gpt2_config: " in line
    line = _error(
        capsys, [*overrides(tmp_path / "new2", datasets_cache, small_text), "--resume", str(tmp_path)]
    )
    assert "is not a complete checkpoint (no checkpoint.json)" in line
    line = _error(
        capsys,
        [*overrides(baseline, datasets_cache, small_text, output__overwrite="true"), "--resume", "auto"],
    )
    assert "drop one" in line


def test_resume_on_changed_training_data_is_refused(tmp_path, capsys, datasets_cache, small_text):
    text = tmp_path / "train.txt"
    text.write_text(small_text.read_text())
    out = tmp_path / "run"
    argv = overrides(out, datasets_cache, text, members__seeds="[42]")
    killed(train(argv, f"kill:0:{2 * EVERY + 1}"))
    text.write_text(small_text.read_text().replace("Holmes", "Watson"))
    line = _error(capsys, [*argv, "--resume", "auto"])
    assert (
        f"checkpoint {checkpoints(out, 0).latest()} was trained on different data (training tokens sha256"
        in line
    )


def test_checkpoint_from_another_number_of_processes_or_seed_is_refused(baseline):
    path = checkpoints(baseline, 1).latest()
    info = json.loads((path / "checkpoint.json").read_text())
    cfg = load_config(None, [f"{k}={v}" for k, v in _saved_overrides(baseline).items()])
    check_resumable(path, info, cfg, "member-1", 123, 1)  # its own: accepted
    check_training_data(path, info, info["train_sha256"])
    with pytest.raises(
        EnsembleError,
        match="was written by 1 process\\(es\\) training member-1, but this launch gives it 2; relaunch",
    ):
        check_resumable(path, info, cfg, "member-1", 123, 2)
    with pytest.raises(EnsembleError, match="was trained with seed 123 but the config gives member-1 seed 7"):
        check_resumable(path, info, cfg, "member-1", 7, 1)
    assert trajectory_config(cfg, 123) == info["config"]


@pytest.mark.slow
def test_non_finite_loss_stops_that_member_only(tmp_path, datasets_cache, small_text, baseline):
    out = tmp_path / "run"
    proc = train(overrides(out, datasets_cache, small_text), fault="nan:1:8")
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    # the loss is checked at every log (each 2 steps) and before every checkpoint (each 3 steps)
    last_check = max(s for s in range(1, 8) if s % 2 == 0 or s % EVERY == 0)
    good = checkpoints(out, 1).latest()
    assert MemberCheckpoints.step_of(good) == max(s for s in range(1, 8) if s % EVERY == 0)
    assert last.startswith(
        f"error: member-1 (seed 123): the training loss became nan between steps {last_check} and 8; "
        f"last good checkpoint: {good}; lower train.lr (or set train.max_grad_norm) and train into a new "
        "output.dir | kept: member-0, member-2 (complete)"
    ), last
    assert last.endswith("| kept: member-0, member-2 (complete); the ensemble was not evaluated"), last
    # the other members trained on, undisturbed, and are kept
    assert_same_members(baseline, out, [0, 2])
    assert not (out / "members" / "member-1").exists()
    assert not (out / "results.json").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert [m["status"] for m in manifest["members"]] == ["complete", "failed", "complete"]
    failure = json.loads((checkpoints(out, 1).dir / "failed.json").read_text())
    assert (failure["step"], failure["last_good_checkpoint"]) == (8, str(good))
    # every checkpoint of member-1 kept is finite
    for path in checkpoints(out, 1).complete():
        assert all(torch.isfinite(t).all() for t in load_file(path / "model.safetensors").values())


@pytest.mark.parametrize(
    "errno, text",
    [(28, "No space left on device"), (13, "Permission denied")],
    ids=["disk-full", "permission"],
)
@pytest.mark.slow
def test_checkpoint_write_error_keeps_the_previous_one(
    errno, text, tmp_path, capsys, datasets_cache, small_text, baseline, monkeypatch
):
    import accelerate.checkpointing

    real = accelerate.checkpointing.save
    calls = {"optimizer": 0}

    def failing(obj, f, *args, **kwargs):
        if str(f).endswith("optimizer.bin"):
            calls["optimizer"] += 1
            if calls["optimizer"] == 2:  # the second checkpoint fails half-way through a file
                Path(f).write_bytes(b"\0" * 1000)
                raise OSError(errno, text)
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(accelerate.checkpointing, "save", failing)
    out = tmp_path / "run"
    argv = overrides(out, datasets_cache, small_text)
    line = _error(capsys, argv)
    first = checkpoints(out, 0).dir / f"step-{EVERY:07d}"
    assert line == (
        f"error: member-0: could not write its checkpoint at step {2 * EVERY} in {checkpoints(out, 0).dir} ({text}); "
        f"nothing partial was kept and {first} is intact: free disk space or fix the permissions (or set "
        "checkpoint.dir), then rerun with --resume auto"
    )
    assert checkpoints(out, 0).complete() == [first]
    assert not stray_temporaries(out)
    monkeypatch.undo()
    ok(train([*argv, "--resume", "auto"]))
    assert_same_members(baseline, out, range(3))


# --------------------------------------------------------------------------------------------
# The evaluator refuses bad members and keeps the previous results


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory, datasets_cache) -> Path:
    out = tmp_path_factory.mktemp("evaluated") / "run"
    assert (
        train_main(tiny_overrides(out, datasets_cache, members__seeds="[1, 2, 3]", eval__bootstrap_samples=0))
        == 0
    )
    return out


def _no_weights(member: Path) -> None:
    (member / "model.safetensors").unlink()


def _truncated(member: Path) -> None:
    data = (member / "model.safetensors").read_bytes()
    (member / "model.safetensors").write_bytes(data[: len(data) // 2])


def _corrupt(member: Path) -> None:
    data = bytearray((member / "model.safetensors").read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(255 - b for b in data[middle : middle + 64])  # same size, other bytes
    (member / "model.safetensors").write_bytes(bytes(data))


def _truncated_unrecorded(member: Path) -> None:
    info = json.loads((member / "member.json").read_text())
    del info["weights_sha256"]  # as a member saved by other tools would be
    (member / "member.json").write_text(json.dumps(info))
    _truncated(member)


@pytest.mark.parametrize(
    "damage, message",
    [
        (_no_weights, "member member-1 ({member}) has no weights (no *.safetensors); re-train it"),
        (
            _truncated,
            "member member-1 ({member}): model.safetensors does not match the checksum saved with it",
        ),
        (_corrupt, "member member-1 ({member}): model.safetensors does not match the checksum saved with it"),
        (_truncated_unrecorded, "cannot load member member-1 ({member}): "),
    ],
    ids=["no-weights", "truncated", "corrupt", "truncated-no-checksum"],
)
def test_bad_member_is_named_and_previous_results_stay(damage, message, tmp_path, capsys, evaluated_run):
    import shutil

    from ensemble.cli.evaluate import evaluate_main

    run = tmp_path / "run"
    shutil.copytree(evaluated_run, run)
    before = {name: (run / name).read_bytes() for name in ("results.json", "results.md")}
    damage(run / "members" / "member-1")
    assert evaluate_main([str(run)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: " + message.format(member=run / "members" / "member-1")), lines[-1]
    assert {name: (run / name).read_bytes() for name in before} == before


def test_member_with_another_tokenizer_is_named(tmp_path, capsys, evaluated_run, gpt2_tokenizer_dir):
    import shutil

    from ensemble.cli.evaluate import evaluate_main

    run = tmp_path / "run"
    shutil.copytree(evaluated_run, run)
    before = (run / "results.json").read_bytes()
    member = run / "members" / "member-2"
    for f in member.glob("*token*"):
        f.unlink()
    for f in gpt2_tokenizer_dir.iterdir():
        shutil.copy(f, member / f.name)
    assert evaluate_main([str(run)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"error: member member-2 ({member}) uses a different tokenizer than member-0"), (
        last
    )
    assert (run / "results.json").read_bytes() == before


def test_fault_specs_name_the_kind_member_step_and_rank(monkeypatch):
    from ensemble.runtime import faults
    from ensemble.runtime.launch_env import launch_info

    monkeypatch.setenv("ENSEMBLE_FAULT", "raise:1:3, kill-save:0:0:1")
    monkeypatch.setenv("RANK", "1")
    launch_info.cache_clear()  # read once per process: read again under this test's RANK
    try:
        assert faults.armed("raise", 1, 3)
        assert not faults.armed("raise", 1, 4) and not faults.armed("raise", 0, 3)
        assert faults.armed("kill-save", 0, 17)  # at whatever step the member is saved
        with pytest.raises(RuntimeError, match="^injected failure in member-1 at step 3"):
            faults.inject("raise", 1, 3)
        faults.inject("kill", 1, 3)  # not armed: nothing happens
        monkeypatch.setenv("RANK", "0")
        launch_info.cache_clear()
        assert not faults.armed("kill-save", 0, 17) and faults.armed("raise", 1, 3)  # rank 1 only
        monkeypatch.setenv("ENSEMBLE_FAULT", "explode:0:1")
        with pytest.raises(ValueError, match="'explode:0:1' is not kind:member:step"):
            faults.armed("raise", 0, 1)
    finally:
        launch_info.cache_clear()


def test_output_dir_and_member_selection_are_checked_before_any_work(tmp_path):
    from ensemble.core.members import MemberSpec
    from ensemble.core.paths import RunPaths
    from ensemble.train.resume import check_output_dir, select_members

    specs = [MemberSpec(i, seed) for i, seed in enumerate((7, 8, 9))]
    assert select_members(specs, None) == specs
    assert [s.seed for s in select_members(specs, [2, 0])] == [7, 9]
    with pytest.raises(EnsembleError, match=r"^--member 3, 5: the config has 3 members \(indices 0 to 2"):
        select_members(specs, [5, 3, 1])
    paths = RunPaths(tmp_path / "run")
    check_output_dir(paths, overwrite=False)  # a new directory: found writable, not created
    assert not paths.root.exists() and not any(tmp_path.iterdir())  # the parent's probe is gone
    paths.root.mkdir()
    check_output_dir(paths, overwrite=False)  # an empty one: its own probe is gone too
    assert not any(paths.root.iterdir())
    paths.manifest.write_text("{}")
    with pytest.raises(EnsembleError, match=r"already holds a run \(manifest.json\); pass --resume auto"):
        check_output_dir(paths, overwrite=False)
    check_output_dir(paths, overwrite=False, resume="auto")
    check_output_dir(paths, overwrite=True)
    with pytest.raises(EnsembleError, match="drop one"):
        check_output_dir(paths, overwrite=True, resume="auto")
