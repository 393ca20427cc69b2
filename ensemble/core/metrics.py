"""Next-token metrics as running sums, so evaluation streams over the data.

Only sums and counts are kept (float64), never per-token values: the state is a fixed number of
values per row (a member or a combination) whatever the size of the test set, and the sums of
several shards add up (one all-reduce).

Conventions, checked against brute force in the tests:
- top-1 prediction: the most probable token, the lowest token id among ties;
- top-5: the target's rank, ties broken by token id, is below 5;
- nll: -log p(target), natural log (inf when the target has probability 0);
- brier: sum_v p(v)^2 - 2 p(target) + 1 over the full vocabulary;
- ece: 15 equal-width bins on the top-1 probability; sum over bins of |accuracy - confidence|
  weighted by the bin's share of tokens;
- entropy: -sum_v p(v) log p(v), with 0 log 0 = 0 (the uncertainty decomposition and selective
  prediction build on it: see :mod:`ensemble.evaluate.selective`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

TOPK = 5
ECE_BINS = 15


class VectorLayout:
    """Named places in a flat vector, from one declaration of names and sizes: a name of size 1
    is an index, a longer one a slice (``sums[..., SUMS.nll]``, ``sums[..., SUMS.ece_count]``).
    Adding a quantity is one more keyword; nothing is addressed by a bare number."""

    def __init__(self, **sizes: int):
        start = 0
        for name, size in sizes.items():
            setattr(self, name, start if size == 1 else slice(start, start + size))
            start += size
        self.names = tuple(sizes)
        self.size = start

    def __getitem__(self, name: str) -> int | slice:
        return getattr(self, name)


# The sums kept per row (a member or a combination).
SUMS = VectorLayout(
    tokens=1,
    correct=1,  # top-1
    correct_top5=1,
    nll=1,
    brier=1,
    ece_count=ECE_BINS,  # tokens per bin of top-1 confidence
    ece_confidence=ECE_BINS,  # sum of the top-1 probability per bin
    ece_correct=ECE_BINS,  # top-1 hits per bin
    entropy=1,  # of the row's distribution (members, the headline mixture, the first-k mixtures)
)
SIZE = SUMS.size
# Per-position values summed per block (for the bootstrap, and the out-of-domain block scores),
# and the bootstrapped metric each one's mean is.
BOOT = VectorLayout(correct=1, nll=1, entropy=1)
BOOTSTRAPPED = {"accuracy": "correct", "nll": "nll"}


class PositionStats(NamedTuple):
    """What one row (a member or a combination) gives at each position of a chunk."""

    pred: torch.Tensor  # [n] top-1 token, the lowest id among ties
    best: torch.Tensor  # [n] its log-probability
    correct: torch.Tensor  # [n] bool
    in_top5: torch.Tensor  # [n] bool: the target's rank (ties by id) is below 5
    target_logp: torch.Tensor  # [n] log p(target)
    square_sum: torch.Tensor  # [n] sum_v p(v)^2
    entropy: torch.Tensor | None  # [n] -sum_v p(v) log p(v), where the plan asks for it


def _top1_and_top5_with_fixups(
    logp: torch.Tensor, targets: torch.Tensor, target_logp: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prediction, its log-prob, top-5 membership): one top-k, then the exact tie rules on the
    few rows that need them (found with `nonzero`, a host synchronisation: free on CPU)."""
    k = min(TOPK, logp.shape[1])
    top = logp.topk(max(k, 2) if logp.shape[1] > 1 else 1, dim=1)
    best, pred = top.values[:, 0], top.indices[:, 0]
    if logp.shape[1] > 1:  # topk's order among equal values is unspecified: where the top is
        tied_top = (top.values[:, 1] == best).nonzero().squeeze(1)  # tied, take the first index
        if len(tied_top):
            pred = pred.clone()
            pred[tied_top] = logp[tied_top].argmax(dim=1)  # argmax returns the first maximum
    kth = top.values[:, k - 1]
    in_top = target_logp > kth  # strictly above the k-th value: rank < k whatever the ties
    tied = (target_logp == kth).nonzero().squeeze(1)
    if len(tied):  # rare: the exact rank, counting equal values of lower token id as ahead
        rows, t = logp[tied], target_logp[tied, None]
        ids = torch.arange(logp.shape[1], device=logp.device)
        ahead = (rows > t).sum(1) + ((rows == t) & (ids < targets[tied, None])).sum(1)
        in_top[tied] = ahead < k
    return pred, best, in_top


def _top1_and_top5_branch_free(
    logp: torch.Tensor, targets: torch.Tensor, target_logp: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same without data-dependent branches or host synchronisations: every row pays for the
    exact rank, which costs extra passes in eager CPU code but fuses into one pass when compiled,
    and keeps a GPU from waiting on the host."""
    best, pred = logp.max(dim=1)  # the first maximum: the lowest id among ties
    t = target_logp[:, None]
    ids = torch.arange(logp.shape[1], device=logp.device)
    ahead = (logp > t).sum(1) + ((logp == t) & (ids < targets[:, None])).sum(1)
    return pred, best, ahead < min(TOPK, logp.shape[1])


def position_stats(
    logp: torch.Tensor,
    targets: torch.Tensor,
    branch_free: bool,
    p_out: torch.Tensor | None = None,
    square_out: torch.Tensor | None = None,
    with_entropy: bool = False,
) -> tuple[PositionStats, torch.Tensor]:
    """The per-position quantities of one row from its log-probabilities ``logp`` [n, vocab]
    (float32), and the probabilities exp(logp) for the KL that may follow. ``p_out`` and
    ``square_out``: [n, vocab] buffers to write into instead of allocating."""
    target_logp = logp.gather(1, targets[:, None]).squeeze(1)
    top = _top1_and_top5_branch_free if branch_free else _top1_and_top5_with_fixups
    pred, best, in_top = top(logp, targets, target_logp)
    p = torch.exp(logp, out=p_out)
    square_sum = torch.mul(p, p, out=square_out).sum(1)
    entropy = -weighted_sum(p, logp, branch_free, out=square_out) if with_entropy else None
    return PositionStats(pred, best, pred == targets, in_top, target_logp, square_sum, entropy), p


def weighted_sum(
    p: torch.Tensor, x: torch.Tensor, branch_free: bool, out: torch.Tensor | None = None
) -> torch.Tensor:
    """sum_v p(v) x(v) at each position, where a term with p = 0 counts 0 even when x = -inf
    (0 log 0 = 0). ``out``: an [n, vocab] buffer for the products (``x`` itself may be
    overwritten, ``p`` not).

    Reduced over the vocabulary in float32 (the caller sums positions in float64: a float64
    reduction over [positions, vocab] costs ~50x more on CPU). Where p = 0 met x = -inf (only
    with -inf logits) the product is NaN: those rows are redone with masking (branch-free:
    every row is masked)."""
    terms = torch.mul(x, p, out=out)
    if branch_free:
        return torch.where(p > 0, terms, 0.0).sum(1)
    per_position = terms.sum(1)
    bad = torch.isnan(per_position).nonzero().squeeze(1)
    if len(bad):
        per_position[bad] = torch.where(p[bad] > 0, terms[bad], 0.0).sum(1)
    return per_position


def add_row(sums: torch.Tensor, s: PositionStats) -> torch.Tensor:
    """Add a chunk's positions to one row's sums (a float64 tensor of :data:`SIZE` values, on
    the device: no host synchronisation). Returns per-position [correct, nll] as float64, for
    the caller's per-block sums."""
    target_logp = s.target_logp.double()
    brier = s.square_sum.double() - 2 * target_logp.exp() + 1
    confidence = s.best.double().exp()
    bins = (confidence * ECE_BINS).long().clamp(max=ECE_BINS - 1)
    correct = s.correct.double()
    sums[SUMS.tokens] += len(target_logp)
    sums[SUMS.correct] += correct.sum()
    sums[SUMS.correct_top5] += s.in_top5.sum()
    sums[SUMS.nll] -= target_logp.sum()
    sums[SUMS.brier] += brier.sum()
    entropy = s.entropy.double() if s.entropy is not None else torch.zeros_like(target_logp)
    sums[SUMS.entropy] += entropy.sum()
    for name, values in (
        ("ece_count", torch.ones_like(confidence)),
        ("ece_confidence", confidence),
        ("ece_correct", correct),
    ):
        sums[SUMS[name]] += torch.zeros_like(sums[SUMS[name]]).index_add_(0, bins, values)
    return per_position(correct=correct, nll=-target_logp, entropy=entropy)


def per_position(**values: torch.Tensor) -> torch.Tensor:
    """[positions, BOOT.size]: the per-position values the bootstrap needs, in :data:`BOOT`'s order."""
    return torch.stack([values[name] for name in BOOT.names], dim=1)


class LightStats(NamedTuple):
    """What a row of the ensemble-size curve gives at each position."""

    correct: torch.Tensor  # [n] bool, top-1
    target_logp: torch.Tensor  # [n]
    entropy: torch.Tensor | None  # [n], where the plan asks for it


def light_stats(
    logp: torch.Tensor,
    targets: torch.Tensor,
    branch_free: bool,
    with_entropy: bool = False,
    p_out: torch.Tensor | None = None,
) -> LightStats:
    """Only top-1 correctness, log p(target) and (optionally) the entropy, for the
    ensemble-size curve: one max, one gather (and an exp into ``p_out``; ``logp`` is then
    overwritten when it is a buffer)."""
    correct = logp.argmax(dim=1) == targets  # argmax returns the first maximum
    target_logp = logp.gather(1, targets[:, None]).squeeze(1)
    entropy = None
    if with_entropy:
        p = torch.exp(logp, out=p_out)
        entropy = -weighted_sum(p, logp, branch_free, out=logp if p_out is not None else None)
    return LightStats(correct, target_logp, entropy)


def add_light(sums: torch.Tensor, s: LightStats) -> torch.Tensor:
    """Add :func:`light_stats` to a row's tokens, top-1, NLL and entropy sums. Returns the
    per-position values like :func:`add_row`."""
    correct, target_logp = s.correct.double(), s.target_logp.double()
    entropy = s.entropy.double() if s.entropy is not None else torch.zeros_like(target_logp)
    sums[SUMS.tokens] += len(target_logp)
    sums[SUMS.correct] += correct.sum()
    sums[SUMS.nll] -= target_logp.sum()
    sums[SUMS.entropy] += entropy.sum()
    return per_position(correct=correct, nll=-target_logp, entropy=entropy)


def row_result(sums: np.ndarray) -> dict[str, float | int]:
    """The metrics of one row from its sums."""
    tokens = sums[SUMS.tokens]
    if tokens == 0:
        raise ValueError("no predicted positions were evaluated")
    nll = sums[SUMS.nll] / tokens
    # sum_b n_b/N |acc_b - conf_b|
    ece = float(np.sum(np.abs(sums[SUMS.ece_correct] - sums[SUMS.ece_confidence])) / tokens)
    return {
        "accuracy": sums[SUMS.correct] / tokens,
        "top5_accuracy": sums[SUMS.correct_top5] / tokens,
        "nll": nll,
        "perplexity": math.exp(nll) if nll < 700 else math.inf,
        "ece": ece,
        "brier": sums[SUMS.brier] / tokens,
        "tokens": int(tokens),
    }


def reliability(sums: np.ndarray) -> dict[str, list]:
    """Per-bin token counts, mean confidence and accuracy (None for empty bins)."""
    counts, conf, corr = sums[SUMS.ece_count], sums[SUMS.ece_confidence], sums[SUMS.ece_correct]
    return {
        "count": [int(c) for c in counts],
        "confidence": [float(cf / c) if c else None for cf, c in zip(conf, counts, strict=True)],
        "accuracy": [float(a / c) if c else None for a, c in zip(corr, counts, strict=True)],
    }


# --------------------------------------------------------------------------------------------
# Bootstrap over blocks


def poisson_weights(seed: int, block_ids: np.ndarray, samples: int) -> np.ndarray:
    """[samples, blocks] Poisson(1) weights, each block's a function of (seed, block id) only,
    so the replicates do not depend on how the blocks are split between processes."""
    return np.stack(
        [np.random.default_rng([seed, int(b)]).poisson(1.0, samples) for b in block_ids], axis=1
    ).astype(np.float64)


def percentile_interval(values: np.ndarray, level: float = 0.95) -> list[float]:
    lo, hi = np.percentile(values, [50 * (1 - level), 100 - 50 * (1 - level)])
    return [float(lo), float(hi)]


def kl_per_position(
    p: torch.Tensor,
    logp: torch.Tensor,
    logq: torch.Tensor,
    branch_free: bool,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(p || q) = sum_v p (log p - log q) at each position, 0 log 0 = 0 (``out``: an
    [n, vocab] buffer to use). The terms are small and mostly of one sign, so the float32
    reduction of :func:`weighted_sum` is accurate."""
    return weighted_sum(p, torch.sub(logp, logq, out=out), branch_free, out=out)
