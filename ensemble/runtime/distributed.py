"""Process groups: one world for the run, one per member group while members train.

Accelerate (and DeepSpeed through it) only ever use the *default* process group, and its DDP
wrapper takes no sub-group. So a group of ranks trains its member inside a world of its own:
every rank joins one TCP store (the launcher's MASTER_ADDR:MASTER_PORT, via torch's `env://`
rendezvous), and each world is a process group initialised on its own key prefix of that store.
Inside a group, Accelerate sees an ordinary world of group size; groups never talk to each other.
Between worlds the Accelerate singletons are reset, so nothing stale survives.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import torch

from ensemble.errors import EnsembleError, Preempted
from ensemble.runtime.launch_env import launch_info


def on_cpu() -> bool:
    """Whether this run computes on CPU (no GPU, or `accelerate launch --cpu`)."""
    from accelerate.utils import parse_flag_from_env

    return parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()


def backend() -> str:
    return "gloo" if on_cpu() else "nccl"


def local_device() -> torch.device:
    """This process's device: its GPU (by local rank) or the CPU."""
    if on_cpu():
        return torch.device("cpu")
    torch.cuda.set_device(launch_info().local_rank % torch.cuda.device_count())
    return torch.device("cuda", torch.cuda.current_device())


def reset_accelerate_state() -> None:
    """Forget Accelerate's process-wide singletons (keeping the torch process group) and the
    DeepSpeed config they registered with transformers.

    Accelerate keeps one global state per process and refuses a second Accelerator with its own
    DeepSpeed plugin; each member gets a fresh Accelerator, so the state is reset in between.
    """
    from accelerate.state import AcceleratorState, GradientState
    from transformers.integrations import unset_hf_deepspeed_config

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    # Selecting a DeepSpeed plugin registers its config globally in transformers; while a ZeRO-3
    # one is registered, every from_config/from_pretrained runs under zero.Init and issues
    # collectives (a single rank loading members for evaluation would then wait forever).
    unset_hf_deepspeed_config()


def state_kwargs(deepspeed: bool, timeout_s: int) -> dict[str, Any]:
    """Arguments for Accelerate's `PartialState` that match the world we set up.

    On CPU, Accelerate recognises several processes as one gloo job only when told `cpu=True`;
    but with `cpu=True` it skips DeepSpeed. For DeepSpeed on CPU it must instead be told the
    backend explicitly, which is what routes it through its DeepSpeed set-up with the right size.
    """
    kwargs: dict[str, Any] = {"cpu": on_cpu() and not deepspeed}
    if launch_info().distributed:
        kwargs.update(backend=backend(), timeout=dt.timedelta(seconds=timeout_s))
    return kwargs


def accelerator_kwargs(deepspeed: bool, timeout_s: int) -> dict[str, Any]:
    """The same, in the form `Accelerator` takes."""
    from accelerate.utils import InitProcessGroupKwargs

    kwargs = state_kwargs(deepspeed, timeout_s)
    cpu = kwargs.pop("cpu")
    return {"cpu": cpu, "kwargs_handlers": [InitProcessGroupKwargs(**kwargs)]} if kwargs else {"cpu": cpu}


class Worlds:
    """Switches this process between process groups built on one shared store, and waits for
    the other processes where a wait can be long.

    Collectives time out after ``timeout_s``, which is right for a step but not for waiting until
    another group has trained its members or the first process has tokenized a large dataset.
    Those waits go through the store instead, and end with an error only when a process that has
    not arrived shows no sign of life (a heartbeat counter every process bumps from a background
    thread) for ``timeout_s``: a dead process is noticed, a slow one is waited for.
    """

    BEAT_S = 5.0
    POLL_S = 1.0

    def __init__(self, timeout_s: int):
        import torch.distributed as dist

        self.launch = launch_info()
        self.timeout_s = timeout_s
        self.timeout = dt.timedelta(seconds=timeout_s)
        self.beat_s = min(self.BEAT_S, timeout_s / 4)  # several beats per timeout, however short
        self._store = None
        self._count = 0
        self._waits = 0
        self._stop = threading.Event()
        self._beat_thread: threading.Thread | None = None
        if self.launch.distributed:
            self._store, _, _ = next(dist.rendezvous("env://", timeout=self.timeout))
            self._client = self._connect()  # for waits; the heartbeat thread has its own
            self._beat_thread = threading.Thread(
                target=self._heartbeat, args=(self._connect(),), daemon=True, name="ensemble-heartbeat"
            )
            self._beat_thread.start()
            # Stop the thread before interpreter shutdown tears down the store it is using
            # (a store call cut off mid-way in a dying interpreter aborts the process).
            atexit.register(self._stop_heartbeat)

    def _connect(self) -> Any:
        import torch.distributed as dist

        addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        return dist.TCPStore(addr, port, is_master=False, timeout=self.timeout)

    def _heartbeat(self, store: Any) -> None:
        key = f"ensemble/alive/{self.launch.rank}"
        while not self._stop.is_set():
            try:
                store.add(key, 1)
            except Exception:  # the store is gone: the job is ending
                return
            self._stop.wait(self.beat_s)

    def _stop_heartbeat(self) -> None:
        self._stop.set()
        if self._beat_thread is not None:
            self._beat_thread.join(timeout=30)
            self._beat_thread = None

    def join(self, name: str, rank: int, size: int) -> None:
        """Make this process rank ``rank`` of the ``size``-process world ``name`` (the default
        process group from now on). Every rank must join the same sequence of worlds."""
        import torch.distributed as dist

        if self._store is None:
            return
        if dist.is_initialized():
            dist.destroy_process_group()
        reset_accelerate_state()
        self._count += 1  # a fresh key prefix per world: no stale rendezvous keys
        store = dist.PrefixStore(f"ensemble/{self._count}-{name}/", self._store)
        dist.init_process_group(backend(), store=store, rank=rank, world_size=size, timeout=self.timeout)
        # Accelerate and DeepSpeed read these; they must describe the world we are in.
        os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(size)

    STOP_KEY = "ensemble/stop"

    def publish_stop(self) -> None:
        """Tell every process of the launch that a stop was requested (see StopRequest)."""
        if self._store is not None:
            self._client.set(self.STOP_KEY, "1")

    def stop_published(self) -> bool:
        return self._store is not None and self._client.check([self.STOP_KEY])

    def _wait(
        self, name: str, arrived: Callable[[], bool], pending: Callable[[], list[int]], stop: Any = None
    ) -> None:
        """Poll until ``arrived()``; fail if a rank in ``pending()`` stops beating; leave with
        :class:`Preempted` when ``stop`` (a StopRequest) is requested meanwhile."""
        seen: dict[int, tuple[int, float]] = {}
        while not arrived():
            if stop is not None and stop.requested():
                raise Preempted(
                    f"stopped by {stop.reason()} while waiting ({name}); this process had finished"
                )
            now = time.monotonic()
            for r in pending():
                beats = self._client.add(f"ensemble/alive/{r}", 0)
                if r not in seen or seen[r][0] != beats:
                    seen[r] = (beats, now)
                elif now - seen[r][1] > self.timeout_s:
                    raise EnsembleError(
                        f"rank {r} gave no sign of life for {self.timeout_s}s while the others waited "
                        f"for it ({name}); it probably died: see its error above (parallel.timeout_s)"
                    )
            time.sleep(self.POLL_S)

    def wait_all(self, name: str, stop: Any = None) -> None:
        """A barrier for all processes of the launch, however long the slowest takes (or until
        ``stop``, a StopRequest, is requested)."""
        if self._store is None:
            return
        self._waits += 1
        key = f"ensemble/wait/{self._waits}-{name}"
        self._client.set(f"{key}/{self.launch.rank}", "1")
        world = self.launch.world_size

        def pending() -> list[int]:
            return [r for r in range(world) if not self._client.check([f"{key}/{r}"])]

        self._wait(name, lambda: not pending(), pending, stop)

    @contextlib.contextmanager
    def main_first(self, name: str) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. to fill a cache); the others wait, then run it."""
        if self._store is None:
            yield
            return
        self._waits += 1
        key = f"ensemble/main-first/{self._waits}-{name}"
        if self.launch.rank != 0:
            self._wait(name, lambda: self._client.check([key]), lambda: [0])
        yield
        if self.launch.rank == 0:
            self._client.set(key, "1")

    def close(self) -> None:
        """Stop the heartbeat and destroy the process groups. On success the ranks first meet in
        `wait_all` (through the store, not gloo), so that none closes its connections while
        another still uses them."""
        import torch.distributed as dist

        self._stop_heartbeat()
        if dist.is_initialized():
            dist.destroy_process_group()


def leave(code: int) -> NoReturn:
    """End a process of a multi-process launch: run the exit handlers (trackers, logging, our
    heartbeat's), flush, and exit without interpreter finalization.

    Why: gloo's C++ threads outlive `destroy_process_group` here. DDP keeps a reference to its
    ProcessGroupGloo that nothing in Python can release (a DDP wrapper built, freed and collected,
    then `destroy_process_group()`, still leaves `gloo_tcp_loop` and two `pt_gloo_runloop` threads
    in /proc/self/task). A C++ thread that touches a Python object while the interpreter is being
    finalized (a tensor's last reference dropped by a worker: the GIL it then takes belongs to a
    dying interpreter) makes glibc unwind it with pthread_exit, and C++ answers with
    `terminate called without an active exception` and SIGABRT, after the run's work is done
    (pytorch/pytorch#179291 and #190489 describe the same teardown race). Skipping finalization
    removes the race; the operating system reclaims the rest."""
    import atexit
    import logging

    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
