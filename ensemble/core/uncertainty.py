"""What the members' disagreement says: the decomposition of an ensemble's uncertainty.

At one position, with member distributions p_1..p_N and their mixture p = mean_i p_i:
- total uncertainty: the entropy of the mixture, H(p);
- aleatoric: the mean of the members' entropies, mean_i H(p_i) (what every member finds
  unpredictable);
- epistemic: the mutual information between the prediction and the member,
  H(p) - mean_i H(p_i) >= 0 (what the members disagree on; 0 when they agree).

The decomposition is defined on the mixture whatever combiner makes the ensemble's prediction.
Members are added one at a time, so no [N, ..., vocab] stack is ever held.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch


class Uncertainty(NamedTuple):
    """Per position, in nats. ``pairwise_kl``: the mean KL(p_i || p_j) over ordered pairs of
    members, where it was computed (the evaluator)."""

    total: torch.Tensor
    aleatoric: torch.Tensor
    epistemic: torch.Tensor
    pairwise_kl: torch.Tensor | None = None

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Uncertainty:
        """The same with ``fn`` applied to every value present (e.g. a position, a device)."""
        return Uncertainty(*(None if x is None else fn(x) for x in self))


def entropy(logp: torch.Tensor) -> torch.Tensor:
    """Entropy over the last dimension of log-probabilities (a probability 0 contributes 0)."""
    return torch.special.entr(logp.exp()).sum(-1)


class Decomposition:
    """Running decomposition over members' log-probabilities [..., vocab]."""

    def __init__(self) -> None:
        self._mixture: torch.Tensor | None = None  # log sum_i p_i
        self._entropy: torch.Tensor | None = None  # sum_i H(p_i)
        self._n = 0

    def add(self, logp: torch.Tensor) -> None:
        logp = logp.float()
        h = entropy(logp)
        if self._mixture is None:
            self._mixture, self._entropy = logp.clone(), h
        else:
            self._mixture = torch.logaddexp(self._mixture, logp)
            self._entropy = self._entropy + h
        self._n += 1

    def result(self) -> Uncertainty:
        if self._mixture is None or self._entropy is None:
            raise ValueError("no member was added")
        total = entropy(self._mixture - math.log(self._n))
        aleatoric = self._entropy / self._n
        # >= 0 by Jensen's inequality; the clamp removes rounding below zero
        return Uncertainty(total, aleatoric, (total - aleatoric).clamp_min(0.0))
