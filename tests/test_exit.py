"""How a process of a multi-process launch ends (`distributed.leave`): exit handlers run, output
is flushed, the status is kept, and the interpreter is not finalized (gloo's C++ threads outlive
destroy_process_group, and finalizing with them alive can abort the process; see `leave`)."""

from __future__ import annotations

import os
import subprocess
import textwrap

import pytest

from .conftest import PYTHON, REPO

SCRIPT = textwrap.dedent(
    """
    import atexit, sys
    from ensemble.runtime.distributed import leave

    class Finalized:
        def __del__(self):
            print("finalized", flush=True)

    kept = Finalized()  # a module global: only interpreter finalization deletes it
    atexit.register(lambda: print("exit handler ran", end=""))
    print("work done", end="")  # buffered: leave must flush it
    sys.stdout.write(" ")
    leave(3)
    """
)


def test_leave_runs_exit_handlers_keeps_the_status_and_skips_finalization():
    proc = subprocess.run([PYTHON, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert proc.stdout == "work done exit handler ran"  # flushed, handlers run, no finalizer
    assert "finalized" not in proc.stdout


@pytest.mark.slow
def test_the_entry_scripts_leave_that_way_under_a_launcher(tmp_path):
    """torchrun workers of launch/train.py run their exit handlers and are not finalized; a
    plain process (no launcher) still ends the ordinary way."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        textwrap.dedent(
            """
            import atexit, sys

            class Finalized:
                def __del__(self):
                    sys.stderr.write("FINALIZED\\n")

            kept = Finalized()
            atexit.register(lambda: sys.stderr.write("EXIT HANDLER\\n"))
            """
        )
    )
    # unbuffered as on CI: the two ranks' lines reach the shared pipe as they are written
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONUNBUFFERED": "1"}
    command = ["launch/train.py", "--config", "configs/tiny.yaml", "--list-members"]
    launched = subprocess.run(
        [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", *command],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert launched.returncode == 0 and launched.stdout.splitlines().count("0 42 member-0") == 2, (
        launched.stderr[-2000:]
    )
    workers = [line for line in launched.stderr.splitlines() if line in ("EXIT HANDLER", "FINALIZED")]
    # the two workers leave without finalizing; the launcher itself (a plain process) finalizes
    assert workers.count("EXIT HANDLER") == 3 and workers.count("FINALIZED") == 1, launched.stderr[-3000:]
    plain = subprocess.run([PYTHON, *command], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert plain.returncode == 0
    assert "EXIT HANDLER" in plain.stderr and "FINALIZED" in plain.stderr
