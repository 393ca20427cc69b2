"""How the evaluator and the distillation teacher split the work over processes: which batches
and which members each process handles (:class:`Sharding`), and the few collectives that combine
their parts (:class:`Collectives`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ensemble.errors import EnsembleError


@dataclass(frozen=True)
class Sharding:
    """Which batches and members this process handles."""

    mode: str
    rank: int
    world_size: int
    num_members: int

    def __post_init__(self) -> None:
        if self.mode == "member" and self.world_size % self.num_members:
            raise EnsembleError(
                f"eval.mode=member needs the number of processes ({self.world_size}) to be a multiple "
                f"of the number of members ({self.num_members}); launch {self.num_members} x k processes "
                "or use eval.mode=data"
            )

    @property
    def group_size(self) -> int:
        return self.world_size // self.num_members if self.mode == "member" else self.world_size

    @property
    def group(self) -> int:
        return self.rank // self.group_size if self.mode == "member" else 0

    @property
    def column(self) -> int:
        return self.rank % self.group_size

    @property
    def members_held(self) -> set[int]:
        return {self.group} if self.mode == "member" else set(range(self.num_members))

    @property
    def accumulates(self) -> bool:
        """In member mode every process of a column scores the same chunks: only group 0 counts."""
        return self.group == 0

    def batches(self, n_batches: int) -> range:
        return range(self.column, n_batches, self.group_size)

    def column_ranks(self, column: int) -> list[int]:
        return [g * self.group_size + column for g in range(self.num_members)]


class Collectives:
    """The few collectives evaluation needs; no-ops in a single process."""

    def __init__(self, sharding: Sharding):
        import torch.distributed as dist

        self.sharding = sharding
        self.active = dist.is_available() and dist.is_initialized() and sharding.world_size > 1
        self._column_group = None
        if self.active and sharding.mode == "member":
            # every process creates every column's group, in the same order
            for column in range(sharding.group_size):
                group = dist.new_group(sharding.column_ranks(column))
                if column == sharding.column:
                    self._column_group = group

    @property
    def column_group(self) -> Any:
        """Member mode: the process group of this process's column (one process per member)."""
        return self._column_group

    def allreduce_sum(self, array: np.ndarray) -> np.ndarray:
        if not self.active:
            return array
        import torch.distributed as dist

        t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64)).to(self._device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu().numpy()

    def gather_members(
        self, logits: torch.Tensor, out: list[torch.Tensor] | None = None
    ) -> list[torch.Tensor]:
        """Member mode: every member's logits for this chunk, in member order (into ``out``)."""
        if not self.active:
            return [logits]
        import torch.distributed as dist

        out = out or [torch.empty_like(logits) for _ in range(self.sharding.num_members)]
        dist.all_gather(out, logits.contiguous(), group=self._column_group)
        return out

    @staticmethod
    def _device() -> torch.device:
        import torch.distributed as dist

        return (
            torch.device("cuda", torch.cuda.current_device())
            if dist.get_backend() == "nccl"
            else torch.device("cpu")
        )
