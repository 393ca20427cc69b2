"""Where this process sits in a launch, from the environment torchrun, `accelerate launch`,
srun or our --processes set. Free of torch, so that the error path of every command (which
asks whether this is rank 0) answers before torch is imported."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass


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
