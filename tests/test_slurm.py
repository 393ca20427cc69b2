"""slurm/ on a real Slurm cluster started on this machine (tests/slurm_cluster.py): two nodes,
CPU only, tiny members.

Each pipeline is submitted with slurm/submit.sh and waited for; its members are compared with
members trained by one plain process (`python launch/train.py`, one thread as in the Slurm
tasks), and its results with a single-process evaluation. Without Slurm the module is skipped
with the reason; with REQUIRE_SLURM=1 (set by .ci/run once it has installed Slurm) it fails
instead.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from .conftest import PYTHON, REPO, assert_same_members
from .slurm_cluster import LocalSlurm, Unavailable

pytestmark = pytest.mark.slow
SUBMIT = REPO / "slurm" / "submit.sh"
SCRIPTS = sorted((REPO / "slurm").glob("*.sh")) + sorted((REPO / "slurm").glob("*.sbatch"))


@pytest.fixture(scope="module")
def slurm():
    try:
        cluster = LocalSlurm()
    except Unavailable as e:
        if os.environ.get("REQUIRE_SLURM"):
            pytest.fail(f"Slurm is required here (REQUIRE_SLURM) but cannot run: {e}")
        pytest.skip(f"no Slurm cluster: {e}")
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def tiny_config(path: Path, out: Path, cache: Path, **changes: object) -> Path:
    """A run of a few seconds: 1-layer GPT-2, a bpe tokenizer (trained by the first task that
    gets there: the array's tasks race for it), the Python docs, checkpoints every 2 steps."""
    cfg = {
        "model": {"gpt2_config": {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 64},
                  "tokenizer": "bpe", "tokenizer_vocab_size": 300},
        "data": {"dataset": "builtin:python-docs", "block_size": 64, "cache_dir": str(cache)},
        "members": {"seeds": [42, 123]},
        "train": {"max_steps": 6, "per_device_batch_size": 4, "lr": 1.0e-3, "logging_steps": 2},
        "checkpoint": {"every_steps": 2},
        "eval": {"per_device_batch_size": 64, "bootstrap_samples": 0, "plots": False},
        "tracking": {"report_to": ["none"]},
        "output": {"dir": str(out)},
    }  # fmt: skip
    for key, value in changes.items():
        section, name = key.split("__")
        cfg.setdefault(section, {})[name] = value
    path.write_text(yaml.safe_dump(cfg))
    return path


def env(**extra: str) -> dict[str, str]:
    """What the jobs see (sbatch --export=ALL): the test's Python, one thread per process."""
    out = {k: v for k, v in os.environ.items() if k != "ENSEMBLE_FAULT"}
    out.update(ENSEMBLE_PYTHON=PYTHON, OMP_NUM_THREADS="1", **extra)
    return out


def submit(slurm: LocalSlurm, *args: str, extra_env: dict | None = None) -> tuple[str, ...]:
    """slurm/submit.sh ARGS; returns (training job id, evaluation job id[, distillation job id])
    from what it prints."""
    proc = slurm.run(
        [str(SUBMIT), "--cpus-per-task", "1", *args],
        env={**slurm.env, **env(), **(extra_env or {})},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    train = re.search(r"^training job (\d+) ", proc.stdout, re.M)
    evaluation = re.search(r"^evaluation job (\d+) ", proc.stdout, re.M)
    assert train and evaluation, proc.stdout
    distill = re.search(r"^distillation job (\d+) ", proc.stdout, re.M)
    return (train.group(1), evaluation.group(1)) + ((distill.group(1),) if distill else ())


def plain_run(config: Path, out: Path) -> Path:
    """The same config trained by one plain process: the uninterrupted reference."""
    proc = subprocess.run(
        [PYTHON, "launch/train.py", "--config", str(config), f"output.dir={out}", "--no-eval"],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def job_log(pattern: str) -> str:
    """A job's log; a job that never started has none (said so, so that the report goes on)."""
    paths = list(REPO.glob(pattern))
    return paths[0].read_text(errors="replace") if paths else f"(no {pattern}: the job never started)"


def own_lines(log: str, keep: int = 40) -> str:
    """The last lines a job's scripts and our code wrote themselves (timestamped, or errors),
    without the launchers' tracebacks and the progress bars."""
    mine = re.compile(r"^(\d\d:\d\d:\d\d |srun: |scontrol: |slurmstepd: )|rror")
    return "\n".join([line for line in log.splitlines() if mine.search(line)][-keep:])


def states(slurm: LocalSlurm, job: str) -> list[str]:
    return sorted(j["JobState"] for j in slurm.job(job))


def numbers(results: dict) -> dict[str, float]:
    """Every number in results.json (except timings), by its path."""
    out = {}

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                if k not in ("timing", "seconds", "tokens_per_second", "written"):
                    walk(v, f"{path}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")
        elif isinstance(node, (int, float)) and not isinstance(node, bool):
            out[path] = float(node)

    walk(results, "")
    return out


@pytest.fixture(autouse=True)
def _no_stray_logs(request):
    """The jobs write their logs into the repository (where sbatch runs): remove them after."""
    yield
    if "slurm" in request.fixturenames:
        request.getfixturevalue("slurm").discard(REPO.glob("ensemble-*.out"))


# --------------------------------------------------------------------------------------------


def test_shell_scripts_are_clean():
    for script in SCRIPTS:
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script.name}: {proc.stderr}"
        text = script.read_text()
        assert "set -euo pipefail" in text or script.name == "common.sh", script.name
        assert not re.search(r"^\s*eval\b", text, re.M), f"{script.name} uses eval"
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck not installed (apt-get install shellcheck); bash -n passed")
    proc = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("failures, status", [(0, 0), (2, 0), (3, 75)])
def test_requeue_is_retried_and_a_failed_one_keeps_the_exit_status_of_a_stop(failures, status):
    """finish_training after a warning signal, with an `scontrol` that fails FAILURES times: the
    job requeues on a later try (status 0), or says how to continue and exits 75."""
    script = f"""
        set -euo pipefail
        source slurm/common.sh
        calls=0
        scontrol() {{ calls=$((calls + 1)); echo "scontrol $*" >&2; [[ $calls -gt {failures} ]]; }}
        sleep() {{ :; }}
        STEP_STATUS=1 STOP_SIGNALLED=1 SLURM_JOB_ID=7
        finish_training
    """
    proc = subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert proc.returncode == status, proc.stderr
    assert proc.stderr.count("scontrol requeue 7") == min(failures + 1, 3), proc.stderr
    assert ("submit the same command again to continue" in proc.stderr) == (status == 75), proc.stderr


def test_submit_rejects_bad_input_in_one_line(slurm, tmp_path):
    config = tiny_config(tmp_path / "c.yaml", tmp_path / "run", tmp_path / "cache")
    cases = {
        ("--mode", "grid"): "--mode grid: use array or multinode",
        ("--members", "5", "--config", str(config)): "index 5, but the config has 2 members",
        ("--members", "0", "--mode", "multinode", "--config", str(config)): "use it with --mode array",
        ("--config", "nope.yaml"): "config nope.yaml not found",
        ("--config", str(config), "--", "train.lr=-1"): "train.lr=-1.0 must be a positive number",
        ("--gpus", "2"): "unknown option --gpus",
    }
    for args, message in cases.items():
        proc = slurm.run([str(SUBMIT), *args], env={**slurm.env, **env()}, check=False)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert message in proc.stderr, (args, proc.stderr)
    assert not slurm.run(["squeue", "-h"]).stdout.strip()  # nothing was queued


@pytest.fixture(scope="module")
def array_run(slurm, tmp_path_factory):
    root = tmp_path_factory.mktemp("array")
    config = tiny_config(root / "config.yaml", root / "run", root / "cache")
    train, evaluation, distill = submit(
        slurm, "--config", str(config), "--eval-procs-per-node", "2", "--distill-arg", "distill.alpha=0.8"
    )
    slurm.wait([train, distill, evaluation], timeout=600)
    logs = {i: job_log(f"ensemble-train-{train}_{i}.out") for i in (0, 1)}
    eval_log = job_log(f"ensemble-eval-{evaluation}.out")
    distill_log = job_log(f"ensemble-distill-{distill}.out")
    slurm.discard(REPO.glob("ensemble-*.out"))
    return {
        "root": root,
        "config": config,
        "run": root / "run",
        "train": train,
        "eval": evaluation,
        "distill": distill,
        "logs": logs,
        "eval_log": eval_log,
        "distill_log": distill_log,
    }


def test_array_trains_one_member_per_task_then_evaluates(slurm, array_run, tmp_path):
    from transformers import AutoModelForCausalLM

    r = array_run
    assert states(slurm, r["train"]) == ["COMPLETED", "COMPLETED"], r["logs"]
    assert states(slurm, r["eval"]) == ["COMPLETED"], r["eval_log"]
    tasks = {int(j["ArrayTaskId"]): j for j in slurm.job(r["train"])}
    assert sorted(tasks) == [0, 1]
    (evaluation,) = slurm.job(r["eval"])
    (distill,) = slurm.job(r["distill"])
    assert distill["JobState"] == "COMPLETED", r["distill_log"]
    assert distill["StartTime"] >= max(t["EndTime"] for t in tasks.values())
    assert evaluation["Dependency"] in ("(null)", "") and evaluation["StartTime"] >= distill["EndTime"]
    # ISO timestamps: string order is time order
    assert "--processes 2 " in r["distill_log"] and "--resume auto --no-eval" in r["distill_log"]
    for i in (0, 1):
        assert f"--member {i} " in r["logs"][i] and "--processes 1 " in r["logs"][i]
        assert f"member-{i} done;" in r["logs"][i]
        assert f"member-{1 - i} saved" not in r["logs"][i]  # each task trains its own member only

    # Members: loadable, and the same as one plain process trains.
    reference = plain_run(r["config"], tmp_path / "plain")
    for i in (0, 1):
        model = AutoModelForCausalLM.from_pretrained(r["run"] / "members" / f"member-{i}")
        assert model.config.n_layer == 1
    assert_same_members(reference, r["run"], (0, 1))
    assert json.loads((r["run"] / "manifest.json").read_text())["members"][1]["status"] == "complete"

    # The evaluation job (2 processes sharing the test batches) = one process evaluating.
    assert "--processes 2 " in r["eval_log"]
    single = tmp_path / "single"
    proc = subprocess.run(
        [PYTHON, "launch/evaluate.py", "--members", *(str(r["run"] / "members" / f"member-{i}") for i in (0, 1)),
         "--config", str(r["run"] / "config.yaml"), "--output", str(single)],
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = json.loads((r["run"] / "results.json").read_text())
    theirs = json.loads((single / "results.json").read_text())
    # The distilled student (2 processes, alpha from --distill-arg), evaluated by the evaluation job
    student = json.loads((r["run"] / "student" / "member.json").read_text())
    assert student["distill"]["alpha"] == 0.8 and student["training"]["processes"] == 2
    assert ours["student"]["tokens"] == ours["ensemble"]["tokens"] and "student" not in theirs
    assert (ours["evaluation"].pop("processes"), theirs["evaluation"].pop("processes")) == (2, 1)
    ours, theirs = numbers(ours), numbers(theirs)
    shared = ours.keys() & theirs.keys()
    assert any("ensemble" in k and "nll" in k for k in shared), sorted(shared)[:20]
    for key in shared:
        if "path" not in key:
            assert math.isclose(ours[key], theirs[key], rel_tol=1e-6, abs_tol=1e-9), key


def test_resubmitted_array_skips_complete_members(slurm, array_run):
    r = array_run
    members = [r["run"] / "members" / f"member-{i}" / "model.safetensors" for i in (0, 1)]
    before = [(p.read_bytes(), p.stat().st_mtime_ns) for p in members]
    train, evaluation = submit(slurm, "--config", str(r["config"]))
    slurm.wait([train, evaluation], timeout=600)
    assert states(slurm, train) == ["COMPLETED", "COMPLETED"]
    for i in (0, 1):
        log = job_log(f"ensemble-train-{train}_{i}.out")
        assert f"member-{i} is complete: skipped" in log, log[-3000:]
        assert "optimizer steps" not in log  # nothing was trained
    assert [(p.read_bytes(), p.stat().st_mtime_ns) for p in members] == before


def test_failed_member_leaves_the_others_and_is_rerun_alone(slurm, array_run, tmp_path):
    """Task 1 fails (an injected error after step 3); task 0 finishes; the evaluation is
    cancelled. Re-submitting just member 1 (as the README says) resumes it from its checkpoint;
    it ends as the plain process's member, and the evaluation runs."""
    config = tiny_config(tmp_path / "c.yaml", tmp_path / "run", array_run["root"] / "cache")
    train, evaluation = submit(slurm, "--config", str(config), extra_env={"ENSEMBLE_FAULT": "raise:1:3"})
    slurm.wait([train, evaluation], timeout=600)
    tasks = {int(j["ArrayTaskId"]): j["JobState"] for j in slurm.job(train)}
    assert tasks == {0: "COMPLETED", 1: "FAILED"}, job_log(f"ensemble-train-{train}_1.out")[-3000:]
    assert states(slurm, evaluation) == ["CANCELLED"]  # its afterok can never be met
    run = tmp_path / "run"
    assert (run / "members" / "member-0" / "member.json").is_file()
    assert not (run / "members" / "member-1").exists()
    assert (run / "checkpoints" / "member-1" / "step-0000002").is_dir()
    assert "training failed" in job_log(f"ensemble-train-{train}_1.out")

    train, evaluation = submit(slurm, "--config", str(config), "--members", "1")
    slurm.wait([train, evaluation], timeout=600)
    assert states(slurm, train) == ["COMPLETED"] and states(slurm, evaluation) == ["COMPLETED"]
    (task,) = slurm.job(train)
    assert task["ArrayTaskId"] == "1"
    assert "member-1 resumes from" in job_log(f"ensemble-train-{train}_1.out")
    assert_same_members(array_run["run"], run, (0, 1))  # = the array run's = the plain process's
    assert (run / "results.json").is_file()


def test_multinode_job_checkpoints_on_the_warning_signal_requeues_and_resumes(slurm, tmp_path):
    """Two nodes, one process each: one launcher per node with its own machine rank; the two
    members train in parallel, one per rank. USR1 to the batch shell (what --signal=B:USR1@lead
    sends before the time limit): both ranks checkpoint, the job requeues itself and resumes;
    the members equal the plain process's."""
    cache = tmp_path / "cache"
    config = tiny_config(
        tmp_path / "c.yaml",
        tmp_path / "run",
        cache,
        train__max_steps=400,
        checkpoint__every_steps=20,
        parallel__placement="parallel",
    )
    reference = plain_run(config, tmp_path / "plain")
    train, evaluation = submit(slurm, "--mode", "multinode", "--nodes", "2", "--config", str(config))
    run = tmp_path / "run"
    slurm.wait_for(
        lambda: all(any((run / "checkpoints" / f"member-{i}").glob("step-*")) for i in (0, 1)), 300
    )
    slurm.run(["scancel", "--batch", "--signal=USR1", train])
    slurm.wait([train, evaluation], timeout=600)

    log = job_log(f"ensemble-train-{train}.out")
    eval_log = job_log(f"ensemble-eval-{evaluation}.out")
    # on failure: the jobs' records, the daemons' logs, the jobs' own lines (not the launchers'
    # tracebacks) and the controller's log (why Slurm failed a job or a restart), the most
    # telling last (a long report may be cut in its middle)
    assert states(slurm, train) == ["COMPLETED"] and states(slurm, evaluation) == ["COMPLETED"], (
        f"{slurm.job(train)}\n{slurm.job(evaluation)}\n{slurm.logs()}\n--- evaluation job\n{eval_log[-2000:]}\n"
        f"--- training job (its own lines)\n{own_lines(log)}\n{slurm.log_tail('slurmctld.log', 25)}"
    )
    (job,) = slurm.job(train)
    assert job["Restarts"] == "1", log[-4000:]
    for node in (0, 1):  # each node launched with its own rank, both pointing at the first node
        assert re.search(
            rf"\[node {node} of 2, .*--processes 1 --nodes 2 --node-rank {node} --main-address ", log
        )
    assert "stopped after checkpointing (status 75)" in log  # the ranks' own status, through srun
    for rank in (0, 1):
        assert f"preempted: [rank {rank}/2] stopped by SIGUSR1: member-{rank} checkpointed at step" in log
    assert "requeueing job" in log and "attempt 2 on 2 node(s)" in log
    for i in (0, 1):
        assert re.search(rf"member-{i} resumes from .*step-\d+ \(step \d+ of 400\)", log)
        info = json.loads((run / "members" / f"member-{i}" / "member.json").read_text())
        assert info["training"]["ranks"] == [i]  # placement parallel: a rank (a node) each
    assert_same_members(reference, run, (0, 1))
    assert (run / "results.json").is_file()


def test_a_mistake_in_a_multinode_job_is_its_one_line_and_status_2(slurm, tmp_path):
    """A mistake found by the ranks (an output.dir that cannot be written: it is under a file)
    under sbatch reads as under a plain process: each rank's one error line in the job's log (no
    launcher traceback), the step's and the job's exit status 2, and the evaluation cancelled."""
    blocker = tmp_path / "a-file"
    blocker.write_text("kept")
    config = tiny_config(tmp_path / "c.yaml", blocker / "run", tmp_path / "cache")
    train, evaluation = submit(slurm, "--mode", "multinode", "--nodes", "2", "--config", str(config))
    slurm.wait([train, evaluation], timeout=300)
    log = job_log(f"ensemble-train-{train}.out")
    (job,) = slurm.job(train)
    assert (job["JobState"], job["ExitCode"]) == ("FAILED", "2:0"), own_lines(log)
    errors = sorted(line for line in log.splitlines() if line.startswith("error: "))
    assert [e.split("]")[0] for e in errors] == ["error: [rank 0/2", "error: [rank 1/2"], log[-3000:]
    assert all("is not writable" in e for e in errors), errors
    assert "Traceback" not in log and "training failed (status 2)" in log, log[-3000:]
    assert states(slurm, evaluation) == ["CANCELLED"]
    assert blocker.read_text() == "kept"
