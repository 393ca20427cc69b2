"""`--processes N` (ensemble/launcher.py): N ranks of one command on this machine, their own exit
status (not a launcher's 1 or 143), signals passed on, a failed world not left hanging."""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from ensemble import launcher
from ensemble.errors import PREEMPTED_EXIT

from .conftest import PYTHON, REPO


def _rank_program(body: str) -> list[str]:
    """A rank that knows RANK as ``rank`` (imports nothing heavy: these tests take milliseconds)."""
    return ["-c", "import os, signal, sys, time\nrank = int(os.environ['RANK'])\n" + textwrap.dedent(body)]


@pytest.mark.parametrize(
    "codes, status",
    [((0, 0), 0), ((0, 2), 2), ((PREEMPTED_EXIT, PREEMPTED_EXIT), PREEMPTED_EXIT), ((0, -9), 128 + 9)],
    ids=["done", "an error", "stopped to resume", "killed"],
)
def test_the_status_is_the_ranks_own(codes, status):
    body = f"code = {codes!r}[rank]\nos.kill(os.getpid(), -code) if code < 0 else sys.exit(code)"
    assert launcher.launch(_rank_program(body), 2) == status


def test_every_rank_gets_a_torchrun_environment(tmp_path):
    body = f"""
    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    open(os.path.join({str(tmp_path)!r}, str(rank)), "w").write(" ".join(os.environ[k] for k in keys))
    """
    assert launcher.launch(_rank_program(body), 3) == 0
    seen = [(tmp_path / str(r)).read_text().split() for r in range(3)]
    assert [s[:5] for s in seen] == [[str(r), str(r), "3", "3", "127.0.0.1"] for r in range(3)]
    assert len({s[5] for s in seen}) == 1 and int(seen[0][5]) > 0  # one rendezvous port


def test_the_first_failure_decides_and_a_stuck_rank_is_stopped(monkeypatch, capfd):
    monkeypatch.setattr(launcher, "FAILURE_GRACE_S", 0.3)
    body = "sys.exit(3) if rank == 1 else time.sleep(60)"  # rank 0 waits for a peer that is gone
    start = time.monotonic()
    assert launcher.launch(_rank_program(body), 2) == 3
    assert time.monotonic() - start < 30
    assert (
        "launcher: rank 1 failed (status 3); stopping rank(s) 0, still running 0 s later"
        in capfd.readouterr().err
    )


def test_ranks_that_stop_to_be_resumed_are_waited_for(monkeypatch):
    """A rank still writing its checkpoint is never killed, however long the others took."""
    monkeypatch.setattr(launcher, "FAILURE_GRACE_S", 0.1)
    body = f"time.sleep(1.0 if rank else 0)\nsys.exit({PREEMPTED_EXIT})"
    assert launcher.launch(_rank_program(body), 2) == PREEMPTED_EXIT


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT], ids=lambda s: s.name)
def test_a_signal_to_the_launcher_reaches_every_rank(tmp_path, sig):
    rank_body = f"""
    def stop(signum, frame):
        open(os.path.join({str(tmp_path)!r}, f"got-{{rank}}"), "w").write(str(signum))
        sys.exit({PREEMPTED_EXIT})
    for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(s, stop)
    open(os.path.join({str(tmp_path)!r}, f"ready-{{rank}}"), "w").close()
    time.sleep(60)
    sys.exit(1)
    """
    script = (
        f"import sys\nfrom ensemble.launcher import launch\nsys.exit(launch({_rank_program(rank_body)!r}, 2))"
    )
    # its own session: a signal sent to it alone, as kill or a scheduler sends it, not to a group
    proc = subprocess.Popen([PYTHON, "-c", script], cwd=REPO, start_new_session=True)
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready-{r}").exists() for r in range(2)):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == PREEMPTED_EXIT
    assert [(tmp_path / f"got-{r}").read_text() for r in range(2)] == [str(int(sig))] * 2


@pytest.mark.parametrize("processes, message", [(0, "--processes 0: give 1 or more")])
def test_a_bad_process_count_is_one_line(tmp_path, processes, message):
    proc = subprocess.run(
        [PYTHON, "launch/train.py", "--config", "configs/tiny.yaml", "--processes", str(processes)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"error: {message}"], proc.stderr


@pytest.mark.slow
def test_a_mistake_under_processes_is_one_line_per_rank_and_status_2(tmp_path):
    """`launch/train.py --processes 2` into a directory that holds a run: each rank says so in one
    line, nothing else (no launcher traceback), and the command exits 2, as a plain process does."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    command = [PYTHON, "launch/train.py", "--config", "configs/tiny.yaml", f"output.dir={out}"]
    plain = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    launched = subprocess.run(
        [*command, "--processes", "2"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    (line,) = plain.stderr.strip().splitlines()
    assert plain.returncode == 2 and line.startswith("error: output.dir") and "already holds a run" in line
    assert launched.returncode == 2, launched.stderr[-3000:]
    lines = sorted(x for x in launched.stderr.splitlines() if x.strip())  # a rank starts its line afresh
    assert lines == [line.replace("error: ", f"error: [rank {r}/2] ") for r in range(2)], launched.stderr
    assert sorted(Path(out).iterdir()) == [out / "manifest.json"]
    assert os.environ.get("RANK") is None  # the test process itself was never a rank
