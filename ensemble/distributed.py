"""Process groups: one world for the run, one per member group while members train.

Accelerate (and DeepSpeed through it) only ever use the *default* process group, and its DDP
wrapper takes no sub-group. So a group of ranks trains its member inside a world of its own:
every rank joins one TCP store (the launcher's MASTER_ADDR:MASTER_PORT, via torch's `env://`
rendezvous), and each world is a process group initialised on its own key prefix of that store.
Inside a group, Accelerate sees an ordinary world of group size; groups never talk to each other.
Between worlds the Accelerate singletons are reset, so nothing stale survives.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class LaunchInfo:
    """Where this process sits in the launch (as torchrun / `accelerate launch` set it up)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


@functools.lru_cache(maxsize=1)
def launch_info() -> LaunchInfo:
    """Read once, before any world of ours rewrites RANK and WORLD_SIZE."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", 1))
    return LaunchInfo(
        rank=int(env.get("RANK", 0)),
        world_size=world,
        local_rank=int(env.get("LOCAL_RANK", 0)),
        local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)),
    )


def on_cpu() -> bool:
    """Whether this run computes on CPU (no GPU, or `accelerate launch --cpu`)."""
    from accelerate.utils import parse_flag_from_env

    return parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()


def backend() -> str:
    return "gloo" if on_cpu() else "nccl"


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
    """Switches this process between process groups built on one shared store."""

    def __init__(self, timeout_s: int):
        import torch.distributed as dist

        self.launch = launch_info()
        self.timeout = dt.timedelta(seconds=timeout_s)
        self._store = None
        self._count = 0
        if self.launch.distributed:
            self._store, _, _ = next(dist.rendezvous("env://", timeout=self.timeout))

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

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
