"""`--processes N`: the entry scripts start N ranks of themselves on this machine (what `torchrun
--nproc_per_node N` does) and end with the ranks' own exit status; with `--nodes K --node-rank I
--main-address HOST:PORT` on every node (what slurm/launch_node.sh passes), the ranks of K
machines form one world.

Written here because the launchers we build on break the exit contract (a mistake in the input
is one error line and status 2; a stop after checkpointing is status 75, so that a script knows
to resume): `accelerate launch` and torchrun report a failed rank with a traceback of their own
(CalledProcessError, ChildFailedError) and exit 1, and on SIGTERM accelerate's one-process
launcher exits 143 at once while the trainer is still checkpointing, and torchrun kills ranks
that take more than 30 s to checkpoint (huggingface/accelerate#996). This module only starts the
processes, hosts their rendezvous store, passes signals on and waits: the process groups stay
torch's (``env://``), so every rank runs exactly as it would under torchrun.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from ensemble.errors import PREEMPTED_EXIT

# What a person or a scheduler sends the launcher reaches every rank. A terminal's Ctrl-C reaches
# the ranks directly too (they are in its process group): a rank takes the two copies, moments
# apart, as one request (see checkpointing.StopRequest).
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
# After a rank fails (other than by stopping to be resumed), how long the others get to see it and
# end on their own before they are killed: the failed rank's error is already out.
FAILURE_GRACE_S = 10.0
POLL_S = 0.05
# Machine 0's launcher holds the store until every machine's launcher has finished (their ranks may
# still be using it), or this long: torchrun's agents wait the same (its exit barrier, 300 s).
EXIT_BARRIER_S = 300.0
DONE_KEY = "launcher/machines-done"


@dataclass(frozen=True)
class Nodes:
    """Where this machine's ranks sit in a launch over several machines (torchrun's --nnodes,
    --node_rank, --master_addr and --master_port)."""

    count: int = 1
    """Machines in the launch, each running this launcher with the same arguments."""
    rank: int = 0
    """This machine's index; machine 0 holds the rendezvous store."""
    main_host: str = "127.0.0.1"
    """Machine 0's address, as the others reach it."""
    main_port: int = 0
    """The store's port on machine 0; 0: one the system picks (one machine only)."""


def host_store(nodes: Nodes) -> Any:
    """The launch's TCP store, in this process (on machine 0; None on the others, whose ranks reach
    machine 0's). As torchrun's agent does, the launcher holds it rather than rank 0: the ranks use
    it until each has left (see `runtime.distributed.Worlds`), and rank 0 may leave first."""
    import torch.distributed as dist

    if nodes.rank:
        return None
    return dist.TCPStore(nodes.main_host, nodes.main_port, is_master=True, wait_for_workers=False)


def rank_env(local_rank: int, processes: int, nodes: Nodes, port: int) -> dict[str, str]:
    """The environment torchrun gives a rank (what `env://` and our `runtime.distributed.launch_info`
    read: every rank a client of the launcher's store), and the machine's CPUs shared out, unless
    OMP_NUM_THREADS is set (torchrun sets 1 and warns; accelerate warns as well)."""
    threads = max(1, len(os.sched_getaffinity(0)) // processes)
    return {
        "OMP_NUM_THREADS": str(threads),
        **os.environ,
        "MASTER_ADDR": nodes.main_host,
        "MASTER_PORT": str(port),
        "TORCHELASTIC_USE_AGENT_STORE": "True",
        "WORLD_SIZE": str(processes * nodes.count),
        "LOCAL_WORLD_SIZE": str(processes),
        "GROUP_RANK": str(nodes.rank),
        "RANK": str(nodes.rank * processes + local_rank),
        "LOCAL_RANK": str(local_rank),
    }


def exit_status(returncode: int) -> int:
    """A process's status as a shell reports it: its exit code, or 128 + the signal that ended it."""
    return 128 - returncode if returncode < 0 else returncode


def launch(command: Sequence[str], processes: int, nodes: Nodes = Nodes()) -> int:
    """Run ``python COMMAND...`` as ``processes`` ranks of one world (on this machine, of
    ``nodes``); return 0 when every rank here succeeded, else the status of the rank that failed
    first (a stop to be resumed: 75)."""
    store = host_store(nodes)
    port = nodes.main_port if store is None else store.port
    ranks = [
        subprocess.Popen([sys.executable, *command], env=rank_env(r, processes, nodes, port))
        for r in range(processes)
    ]

    def forward(signum: int, frame: Any) -> None:
        for p in ranks:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS}
    try:
        status = _wait(ranks, first_rank=nodes.rank * processes)
        _exit_barrier(store, nodes)
        return status
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for p in ranks:  # only if the wait itself failed
            if p.poll() is None:
                p.kill()
                p.wait()


def _wait(ranks: list[subprocess.Popen], first_rank: int) -> int:
    """``ranks`` are this machine's, the first of them rank ``first_rank`` of the world."""
    failed, first, kill_at = 0, -1, None
    while True:
        codes = [p.poll() for p in ranks]
        for rank, code in enumerate(codes):
            if not code:
                continue
            if not failed:
                failed, first = exit_status(code), first_rank + rank
            # ranks that stop to be resumed are checkpointing: wait for all of them; any other
            # failure leaves the rest of the world stuck sooner or later
            if exit_status(code) != PREEMPTED_EXIT and kill_at is None:
                kill_at = time.monotonic() + FAILURE_GRACE_S
        if all(code is not None for code in codes):
            return failed
        if kill_at is not None and time.monotonic() > kill_at:
            alive = [r for r, code in enumerate(codes) if code is None]
            print(
                f"launcher: rank {first} failed (status {failed}); stopping rank(s) "
                f"{', '.join(str(first_rank + r) for r in alive)}, still running "
                f"{FAILURE_GRACE_S:.0f} s later",
                file=sys.stderr,
                flush=True,
            )
            for r in alive:
                ranks[r].kill()
            kill_at = float("inf")  # killed once; now only wait
        time.sleep(POLL_S)


def _exit_barrier(store: Any, nodes: Nodes) -> None:
    """Machine 0 (``store``) waits for every machine's launcher to be done; the others say so."""
    if nodes.count == 1:
        return
    if store is None:
        import torch.distributed as dist

        try:
            client = dist.TCPStore(
                nodes.main_host, nodes.main_port, is_master=False, timeout=timedelta(seconds=30)
            )
            client.add(DONE_KEY, 1)
        except RuntimeError:  # torch's DistError among them
            pass  # machine 0 is gone already: nothing to wait for
        return
    store.add(DONE_KEY, 1)
    deadline = time.monotonic() + EXIT_BARRIER_S
    while store.add(DONE_KEY, 0) < nodes.count and time.monotonic() < deadline:
        time.sleep(POLL_S)
