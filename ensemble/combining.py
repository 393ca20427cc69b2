"""Combining members' next-token distributions into the ensemble's.

The ensemble distribution is the mixture (mean) of the members' probabilities, formed in log
space: log mean_i p_i = logsumexp_i(log p_i) - log N. Members are added one at a time, so only
one running buffer exists however many members there are.
"""

from __future__ import annotations

import math

import torch


class MeanProb:
    """Running log of the mean of member probabilities, for one chunk of positions."""

    def __init__(self) -> None:
        self._acc: torch.Tensor | None = None
        self._n = 0

    def add(self, logp: torch.Tensor) -> None:
        if self._acc is None:
            self._acc = logp.clone()
        else:
            torch.logaddexp(self._acc, logp, out=self._acc)
        self._n += 1

    def logprobs(self) -> torch.Tensor:
        if self._acc is None:
            raise ValueError("no member was added")
        return self._acc - math.log(self._n)
