"""Combining members' next-token distributions into the ensemble's.

Every combiner is registered once, in :data:`COMBINERS` (name, table label, what it averages,
whether it needs fitted weights); config validation, the scorer and the report all read it, so
adding one touches this file only. All are computed from the same forward passes:
- ``mean_prob``: the mixture, mean_i p_i (the headline), in log space: logsumexp_i log p_i - log N.
- ``mean_logit``: softmax of the mean of the members' logits (the reference tutorial's
  `sum(outputs) / 3`).
- ``geometric``: the renormalised geometric mean, softmax(mean_i log p_i). In exact arithmetic
  this equals ``mean_logit``: log p_i and the logits differ by a per-position constant, which
  softmax ignores. Both are reported because users ask for both; they differ by rounding only.
- ``weighted``: the mixture sum_i w_i p_i with weights fitted on the validation split by
  minimising its NLL (EM; the problem is convex in w, so EM reaches the optimum).

Per-member temperature scaling (optional) divides member i's logits by T_i, fitted on the
validation split by minimising that member's NLL (grid search, then a finer grid around the best).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch

TEMPERATURE_GRID = np.exp(np.linspace(math.log(0.25), math.log(4.0), 25))


def _into(buffer: torch.Tensor | None, *inputs: torch.Tensor) -> torch.Tensor | None:
    """``buffer`` to write a result into, or None (a fresh tensor) where autograd records any of
    ``inputs``: PyTorch's ``out=`` variants are not differentiable, and a user scoring without
    ``torch.no_grad()`` (or differentiating through the ensemble) must still get an answer."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return None
    return buffer


class MeanProb:
    """Running log of the mean of member probabilities over one chunk of positions; after k
    members, :meth:`logprobs` is the mixture of the first k. With ``log_weights``, the weighted
    mixture sum_i w_i p_i instead. ``out``: an [n, vocab] buffer to accumulate in instead of a
    fresh tensor (see `evaluate.scoring.Workspace`)."""

    def __init__(self, log_weights: np.ndarray | None = None, out: torch.Tensor | None = None) -> None:
        self._acc: torch.Tensor | None = None
        self._out = out
        self._n = 0
        self._log_weights = log_weights  # weighted mixture: add log w_i to member i

    def add(self, logp: torch.Tensor, tmp: torch.Tensor | None = None) -> None:
        """Add member ``logp``; ``tmp``: a buffer for its weighted copy."""
        if self._log_weights is not None:
            logp = torch.add(logp, float(self._log_weights[self._n]), out=_into(tmp, logp))
        if self._acc is None:
            self._acc = logp.clone() if self._out is None else self._out.copy_(logp)
        else:
            self._acc = torch.logaddexp(self._acc, logp, out=_into(self._acc, self._acc, logp))
        self._n += 1

    def result(self) -> torch.Tensor:
        """The mixture's log-probabilities, in the accumulator (no member is added afterwards)."""
        return self.logprobs(out=self._acc)

    def logprobs(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The mixture's log-probabilities (into ``out``, which may be the accumulator itself
        once no member is to be added)."""
        if self._acc is None:
            raise ValueError("no member was added")
        if self._log_weights is not None:
            return self._acc
        return torch.sub(self._acc, math.log(self._n), out=_into(out, self._acc))


class Mean:
    """Running mean of [n, vocab] tensors, summed in place (no [N, n, vocab] stack), in ``out``
    when given. The log-softmax of the mean is `mean_logit` (of the members' logits) or
    `geometric` (of their log-probabilities)."""

    def __init__(self, out: torch.Tensor | None = None) -> None:
        self._total: torch.Tensor | None = None
        self._out = out
        self._n = 0

    def add(self, x: torch.Tensor, tmp: torch.Tensor | None = None) -> None:
        if self._total is None:
            self._total = x.clone() if self._out is None else self._out.copy_(x)
        else:
            self._total += x
        self._n += 1

    def log_softmax(self) -> torch.Tensor:
        """log_softmax of the mean, in the accumulator's memory (the accumulator is spent)."""
        if self._total is None:
            raise ValueError("nothing was added")
        mean = self._total.div_(self._n)
        return torch.log_softmax(mean, dim=-1, out=_into(mean, mean) if self._out is not None else None)

    result = log_softmax


# --------------------------------------------------------------------------------------------
# The registry


class Accumulator(Protocol):
    """One combination over one chunk: members added one at a time, then its log-probabilities."""

    def add(self, x: torch.Tensor, tmp: torch.Tensor | None = None) -> None: ...

    def result(self) -> torch.Tensor: ...


@dataclass(frozen=True)
class Combiner:
    """An ensemble combination, as the scorer, the config and the report see it."""

    name: str
    label: str
    """Its row in results.md."""
    reads: Literal["logprobs", "logits"]
    """What it is fed per member: log-probabilities, or logits (after temperature scaling)."""
    start: Callable[[torch.Tensor | None, np.ndarray | None], Accumulator]
    """A fresh accumulator, given an [n, vocab] buffer to accumulate in (or None) and the fitted
    log-weights (or None when it is not fitted)."""
    fitted: bool = False
    """Needs mixture weights fitted on eval.fit_split (so at least 2 members)."""


HEADLINE = "mean_prob"  # the ensemble of the report: always computed, the diversity's reference
COMBINERS: dict[str, Combiner] = {}


def register_combiner(combiner: Combiner) -> Combiner:
    """Add a combiner (tests and extensions); its name becomes valid in eval.combiners."""
    COMBINERS[combiner.name] = combiner
    return combiner


for _c in (
    Combiner(HEADLINE, "**Ensemble** (mean probability)", "logprobs", lambda out, _: MeanProb(out=out)),
    Combiner("mean_logit", "Ensemble (mean logit)", "logits", lambda out, _: Mean(out)),
    Combiner("geometric", "Ensemble (geometric mean)", "logprobs", lambda out, _: Mean(out)),
    Combiner(
        "weighted",
        "Ensemble (fitted weights)",
        "logprobs",
        lambda out, log_w: MeanProb(log_weights=log_w, out=out),
        fitted=True,
    ),
):
    register_combiner(_c)


def usable_combiners(names: list[str], members: int) -> list[str]:
    """The combiners that apply to ``members`` members (fitted ones need two or more)."""
    return [c for c in names if members > 1 or not COMBINERS[c].fitted]


def needs_fitting(names: list[str], members: int) -> bool:
    """Whether any of ``names`` needs mixture weights fitted, for this many members."""
    return members > 1 and any(COMBINERS[c].fitted for c in names)


def fit_mixture_weights(
    target_logp: np.ndarray,
    allreduce: Callable[[np.ndarray], np.ndarray] = lambda x: x,
    max_iter: int = 5000,
    tol: float = 1e-10,
) -> np.ndarray:
    """Weights w on the simplex maximising sum_t log sum_i w_i p_i(y_t), by EM.

    ``target_logp`` [T, N] holds log p_i(y_t) for this process's positions; ``allreduce`` sums
    an array over processes, so every process gets the same weights. Positions where every
    member gives the target probability 0 carry no information about w and are left out.
    Each position's probabilities are scaled by their maximum once (the scale cancels in the EM
    update), so an iteration is two matrix-vector products.
    """
    n = target_logp.shape[1]
    informative = np.isfinite(target_logp).any(axis=1)
    lp = target_logp[informative]
    p = np.exp(lp - lp.max(axis=1, keepdims=True)) if len(lp) else np.zeros((0, n))
    total = allreduce(np.array([float(len(p))]))[0]
    w = np.full(n, 1.0 / n)
    for _ in range(max_iter):
        # w_i <- w_i * mean_t p_ti / (sum_j w_j p_tj)
        new = w * allreduce(((1.0 / (p @ w)) @ p) if len(p) else np.zeros(n)) / total
        new /= new.sum()  # guards rounding drift off the simplex
        if np.max(np.abs(new - w)) < tol:
            return new
        w = new
    return w


def mixture_nll(target_logp: np.ndarray, w: np.ndarray) -> float:
    """Mean NLL of the mixture with weights w (for checks)."""
    with np.errstate(divide="ignore"):
        return float(-np.mean(np.logaddexp.reduce(target_logp + np.log(w), axis=1)))


def refine_grid(grid: np.ndarray, best: int, points: int = 25) -> np.ndarray:
    """A finer grid between the neighbours of grid[best] (log-spaced)."""
    lo = grid[max(best - 1, 0)]
    hi = grid[min(best + 1, len(grid) - 1)]
    return np.exp(np.linspace(math.log(lo), math.log(hi), points))


def temperature_nll_sums(logits: torch.Tensor, targets: torch.Tensor, grid: np.ndarray) -> np.ndarray:
    """NLL summed over positions of softmax(logits / T) for every T of the grid."""
    target_logits = logits.gather(1, targets[:, None]).squeeze(1)
    out = np.empty(len(grid))
    for g, t in enumerate(grid):
        out[g] = float((torch.logsumexp(logits / float(t), dim=1) - target_logits / float(t)).double().sum())
    return out
