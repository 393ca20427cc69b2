"""`--processes N` (ensemble/runtime/launcher.py): N ranks of one command on this machine, their own exit
status (not a launcher's 1 or 143), signals passed on, a failed world not left hanging."""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from ensemble.errors import PREEMPTED_EXIT
from ensemble.runtime import launcher

from .conftest import PYTHON, REPO, free_port


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


def test_two_machines_form_one_world_with_the_store_on_machine_0(tmp_path):
    """`--nodes 2`: two launchers (here both on this machine), ranks numbered across them, every
    rank pointed at machine 0's store; machine 1 holds none of its own, and machine 0 keeps its
    store for machine 1's ranks that still use it after its own ranks ended."""
    port = free_port()
    body = f"""
    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_PORT")
    open(os.path.join({str(tmp_path)!r}, str(rank)), "w").write(" ".join(os.environ[k] for k in keys))
    if rank >= 2:  # machine 1's ranks use the store after machine 0's ranks are gone
        time.sleep(1)
        import datetime, torch.distributed as dist
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        store = dist.TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=20))
        store.set(f"late-{{rank}}", "1")
    """
    node1 = subprocess.Popen(
        [
            PYTHON,
            "-c",
            "import sys\nfrom ensemble.runtime.launcher import Nodes, launch\n"
            f"sys.exit(launch({_rank_program(body)!r}, 2, Nodes(2, 1, '127.0.0.1', {port})))",
        ],
        cwd=REPO,
    )
    assert launcher.launch(_rank_program(body), 2, launcher.Nodes(2, 0, "127.0.0.1", port)) == 0
    assert node1.wait(timeout=60) == 0
    seen = [(tmp_path / str(r)).read_text().split() for r in range(4)]
    assert seen == [[str(r), str(r % 2), "4", "2", str(r // 2), str(port)] for r in range(4)]


def test_ranks_start_with_the_signals_the_launcher_was_given_to_ignore(tmp_path):
    """launch_node.sh starts the launcher with USR1 ignored: the ranks inherit that until they set
    their own handler (a warning signal during their start-up is no stop), while the launcher
    itself passes USR1 on."""
    body = f"""
    open(os.path.join({str(tmp_path)!r}, str(rank)), "w").write(str(signal.getsignal(signal.SIGUSR1)))
    """
    script = (
        "import signal, sys\nfrom ensemble.runtime.launcher import launch\nsignal.signal(signal.SIGUSR1, signal.SIG_IGN)\n"
        f"sys.exit(launch({_rank_program(body)!r}, 2))"
    )
    assert subprocess.run([PYTHON, "-c", script], cwd=REPO, timeout=60).returncode == 0
    assert [(tmp_path / str(r)).read_text() for r in range(2)] == [str(signal.SIG_IGN)] * 2


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
    script = f"import sys\nfrom ensemble.runtime.launcher import launch\nsys.exit(launch({_rank_program(rank_body)!r}, 2))"
    # its own session: a signal sent to it alone, as kill or a scheduler sends it, not to a group
    proc = subprocess.Popen([PYTHON, "-c", script], cwd=REPO, start_new_session=True)
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready-{r}").exists() for r in range(2)):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == PREEMPTED_EXIT
    assert [(tmp_path / f"got-{r}").read_text() for r in range(2)] == [str(int(sig))] * 2


@pytest.mark.parametrize(
    "options, message",
    [
        ("--processes 0", "--processes 0: give 1 or more"),
        (
            "--nodes 2 --node-rank 2",
            "--nodes 2 --node-rank 2: give 1 or more nodes and a node rank from 0 to nodes-1",
        ),
        (
            "--nodes 2",
            "--nodes 2 needs --main-address HOST:PORT, the address of node 0, the same on every node",
        ),
        ("--nodes 2 --main-address node001", "--main-address node001: give HOST:PORT, e.g. node001:29500"),
    ],
)
def test_a_bad_process_count_is_one_line(tmp_path, options, message):
    proc = subprocess.run(
        [PYTHON, "launch/train.py", "--config", "configs/tiny.yaml", *options.split()],
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
