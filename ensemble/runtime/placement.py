"""Placement of members on ranks: which ranks train which member, and when.

W launched processes (ranks) are cut into G groups of k consecutive ranks (G x k = W). Group g
trains members g, g + G, g + 2G, ... one after another ("rounds"), data-parallel over its k
ranks and without talking to the other groups. `sequential` is the case G = 1: every rank
trains every member in turn.

Ranks are numbered node by node by every launcher we support (torchrun, `accelerate launch`,
srun via those), so a group of k consecutive ranks sits on one node when k divides the
processes per node, and spans nodes otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from ensemble.config.schema import ParallelConfig
from ensemble.core.architecture import model_shape
from ensemble.errors import EnsembleError


@dataclass(frozen=True)
class Placement:
    """A validated assignment of ``num_members`` members to ``world_size`` ranks."""

    mode: Literal["parallel", "sequential"]
    world_size: int
    num_members: int
    group_size: int

    def __post_init__(self) -> None:
        if self.world_size < 1 or self.num_members < 1 or self.group_size < 1:
            raise EnsembleError(f"invalid layout {self}: all sizes must be at least 1")
        if self.world_size % self.group_size:
            raise EnsembleError(
                f"group size {self.group_size} does not divide the {self.world_size} processes; "
                f"set parallel.group_size to a divisor of {self.world_size}"
            )
        if self.mode == "sequential" and self.group_size != self.world_size:
            raise EnsembleError(
                f"sequential placement trains on all {self.world_size} processes, not groups of {self.group_size}"
            )
        if self.num_groups > self.num_members:
            raise EnsembleError(
                f"{self.num_groups} groups of {self.group_size} ranks for {self.num_members} member(s) "
                f"would leave groups idle; set parallel.group_size to at least "
                f"{math.ceil(self.world_size / self.num_members)}"
            )

    @property
    def num_groups(self) -> int:
        return self.world_size // self.group_size

    @property
    def rounds(self) -> int:
        return math.ceil(self.num_members / self.num_groups)

    def group_of(self, rank: int) -> int:
        return rank // self.group_size

    def rank_in_group(self, rank: int) -> int:
        return rank % self.group_size

    def ranks_of(self, group: int) -> list[int]:
        return list(range(group * self.group_size, (group + 1) * self.group_size))

    def members_of(self, group: int) -> list[int]:
        """Member indices that ``group`` trains, in order (one per round)."""
        return list(range(group, self.num_members, self.num_groups))

    def summary(self) -> dict[str, Any]:
        """For manifest.json."""
        return {
            "mode": self.mode,
            "processes": self.world_size,
            "group_size": self.group_size,
            "groups": self.num_groups,
            "rounds": self.rounds,
        }

    def describe(self, names: list[str] | None = None) -> list[str]:
        """One line per group, for the log; ``names``: of the members (default member-<i>)."""
        lines = [
            f"placement {self.mode}: {self.world_size} process(es), {self.num_members} member(s), "
            f"{self.num_groups} group(s) of {self.group_size} rank(s), {self.rounds} round(s)"
        ]
        for g in range(self.num_groups):
            ranks = self.ranks_of(g)
            span = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
            members = ", ".join(names[m] if names else f"member-{m}" for m in self.members_of(g))
            lines.append(f"  group {g} ({span}) trains {members}")
        return lines


def parallel_group_size(world_size: int, num_members: int) -> int:
    """Group size for `parallel` without an explicit one: as many groups as possible, but no
    more than there are members, and a whole number of ranks each (the rounds rule)."""
    groups = max(g for g in range(1, world_size + 1) if world_size % g == 0 and g <= num_members)
    return world_size // groups


def plan_layout(
    cfg: ParallelConfig,
    world_size: int,
    num_members: int,
    local_world_size: int,
    fits: Callable[[int], bool] = lambda group_size: True,
) -> Placement:
    """The layout the config asks for, checked against the launch. ``fits(k)`` says whether a
    member fits on groups of k ranks (for `auto`)."""
    if cfg.placement == "sequential":
        layout = Placement("sequential", world_size, num_members, world_size)
    else:
        k = cfg.group_size or parallel_group_size(world_size, num_members)
        if cfg.group_size and world_size % cfg.group_size:
            raise EnsembleError(
                f"parallel.group_size={cfg.group_size} does not divide the {world_size} launched "
                f"processes; use a divisor of {world_size}"
            )
        if cfg.placement == "auto" and k < world_size and not fits(k):
            layout = Placement("sequential", world_size, num_members, world_size)
        elif k == world_size:
            layout = Placement("sequential", world_size, num_members, world_size)
        else:
            layout = Placement("parallel", world_size, num_members, k)
    if cfg.groups_within_node and layout.group_size > 1:
        k, local = layout.group_size, local_world_size
        if k > local or local % k:
            raise EnsembleError(
                f"parallel.groups_within_node=true needs the group size ({k}) to divide the "
                f"processes per node ({local}); change parallel.group_size or the processes per node"
            )
    return layout


# --------------------------------------------------------------------------------------------
# Does a member fit? (for placement=auto)


def estimate_bytes_per_device(
    model_config: Any,
    n_params: int,
    batch_size: int,
    block_size: int,
    group_size: int,
    zero_stage: int,
    mixed_precision: bool,
) -> int:
    """A rough upper estimate of one rank's training memory.

    Model states with AdamW in fp32: 16 bytes per parameter (weights 4, gradients 4, two Adam
    moments 8). ZeRO-2 shards gradients and optimizer states over the group (4 + 12/k), ZeRO-3
    everything (16/k). Activations per layer and token follow Korthikanti et al. (2022):
    34·C + 5·h·T bytes at 16 bit, doubled in fp32; plus the logits and their gradient in fp32.
    """
    states = {0: 16.0, 1: 4 + 12.0 / group_size, 2: 4 + 12.0 / group_size, 3: 16.0 / group_size}[zero_stage]
    shape = model_shape(model_config)
    c, layers, heads = shape.width, shape.layers, shape.heads
    scale = 1 if mixed_precision else 2
    activations = batch_size * block_size * layers * (34 * c + 5 * heads * block_size) * scale
    logits = batch_size * block_size * model_config.vocab_size * 4 * 2
    return int(states * n_params + activations + logits)


def device_memory_bytes(local_world_size: int) -> tuple[int, str]:
    """(bytes one rank may use, what that is) on this machine."""
    import torch

    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        return int(total * 0.9), f"90% of {torch.cuda.get_device_name()}"
    import psutil

    available = psutil.virtual_memory().available
    return available // max(local_world_size, 1), f"available RAM / {local_world_size} process(es)"
