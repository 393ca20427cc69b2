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
  weighted by the bin's share of tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

TOPK = 5
ECE_BINS = 15
# Sums kept per row, in this order, then the 3 x ECE_BINS bin sums.
SUMS = ("tokens", "correct", "correct_top5", "nll", "brier")


def top1_and_top5(
    logp: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prediction, its log-prob, top-1 correct, top-5 correct) with ties broken by token id."""
    k = min(TOPK, logp.shape[1])
    top = logp.topk(max(k, 2) if logp.shape[1] > 1 else 1, dim=1)
    best, pred = top.values[:, 0], top.indices[:, 0]
    if logp.shape[1] > 1:  # topk's order among equal values is unspecified: where the top is
        tied_top = (top.values[:, 1] == best).nonzero().squeeze(1)  # tied, take the first index
        if len(tied_top):
            pred = pred.clone()
            pred[tied_top] = logp[tied_top].argmax(dim=1)  # argmax returns the first maximum
    target_logp = logp.gather(1, targets[:, None]).squeeze(1)
    kth = top.values[:, k - 1]
    in_top = target_logp > kth  # strictly above the k-th value: rank < k whatever the ties
    tied = (target_logp == kth).nonzero().squeeze(1)
    if len(tied):  # rare: the exact rank, counting equal values of lower token id as ahead
        rows, t = logp[tied], target_logp[tied, None]
        ids = torch.arange(logp.shape[1], device=logp.device)
        ahead = (rows > t).sum(1) + ((rows == t) & (ids < targets[tied, None])).sum(1)
        in_top[tied] = ahead < k
    return pred, best, pred == targets, in_top


@dataclass
class RowSums:
    """Sums over predicted positions for one row (a member or a combination)."""

    sums: np.ndarray = field(default_factory=lambda: np.zeros(len(SUMS) + 3 * ECE_BINS))

    SIZE = len(SUMS) + 3 * ECE_BINS

    def update(
        self, logp: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Add positions with log-probabilities ``logp`` [n, vocab] (float32) and targets [n].
        Returns (top-1 predictions, per-position [correct, nll] as float64 for the caller's
        per-block sums, the probabilities exp(logp) for reuse)."""
        pred, best, correct, in_top = top1_and_top5(logp, targets)
        target_logp = logp.gather(1, targets[:, None]).squeeze(1).double()
        p = logp.exp()
        brier = (p * p).sum(1).double() - 2 * target_logp.exp() + 1
        confidence = best.double().exp()
        bins = (confidence * ECE_BINS).long().clamp(max=ECE_BINS - 1)
        s = self.sums
        s[0] += len(targets)
        s[1] += int(correct.sum())
        s[2] += int(in_top.sum())
        s[3] += -float(target_logp.sum())
        s[4] += float(brier.sum())
        base = len(SUMS)
        s[base : base + ECE_BINS] += torch.bincount(bins, minlength=ECE_BINS).double().cpu().numpy()
        s[base + ECE_BINS : base + 2 * ECE_BINS] += (
            torch.zeros(ECE_BINS, dtype=torch.float64, device=logp.device)
            .index_add_(0, bins, confidence)
            .cpu()
            .numpy()
        )
        s[base + 2 * ECE_BINS :] += (
            torch.zeros(ECE_BINS, dtype=torch.float64, device=logp.device)
            .index_add_(0, bins, correct.double())
            .cpu()
            .numpy()
        )
        return pred, torch.stack([correct.double(), -target_logp], dim=1), p


def light_update(sums: np.ndarray, logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Only tokens, top-1 and NLL (for the ensemble-size curve): one max, one gather. Returns
    per-position [correct, nll] as float64, like :meth:`RowSums.update`."""
    correct = logp.argmax(dim=1) == targets  # argmax returns the first maximum
    target_logp = logp.gather(1, targets[:, None]).squeeze(1).double()
    sums[0] += len(targets)
    sums[1] += int(correct.sum())
    sums[3] += -float(target_logp.sum())
    return torch.stack([correct.double(), -target_logp], dim=1)


def row_result(sums: np.ndarray) -> dict[str, float | int]:
    """The metrics of one row from its sums."""
    tokens = sums[0]
    if tokens == 0:
        raise ValueError("no predicted positions were evaluated")
    nll = sums[3] / tokens
    base = len(SUMS)
    conf = sums[base + ECE_BINS : base + 2 * ECE_BINS]
    corr = sums[base + 2 * ECE_BINS :]
    ece = float(np.sum(np.abs(corr - conf)) / tokens)  # sum_b n_b/N |acc_b - conf_b|
    return {
        "accuracy": sums[1] / tokens,
        "top5_accuracy": sums[2] / tokens,
        "nll": nll,
        "perplexity": math.exp(nll) if nll < 700 else math.inf,
        "ece": ece,
        "brier": sums[4] / tokens,
        "tokens": int(tokens),
    }


def reliability(sums: np.ndarray) -> dict[str, list]:
    """Per-bin token counts, mean confidence and accuracy (None for empty bins)."""
    base = len(SUMS)
    counts = sums[base : base + ECE_BINS]
    conf = sums[base + ECE_BINS : base + 2 * ECE_BINS]
    corr = sums[base + 2 * ECE_BINS :]
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


def kl_sum(p: torch.Tensor, logp: torch.Tensor, logq: torch.Tensor) -> float:
    """Sum over positions of KL(p || q) = sum_v p (log p - log q), 0 log 0 = 0.

    Reduced over the vocabulary in float32 (the terms are small and mostly of one sign), then
    over positions in float64: a float64 reduction over [positions, vocab] costs ~50x more on
    CPU. Rows where some p = 0 met log p = -inf (only with -inf logits) are redone with masking.
    """
    per_position = (p * (logp - logq)).sum(1)
    bad = torch.isnan(per_position).nonzero().squeeze(1)
    if len(bad):
        pb = p[bad]
        per_position[bad] = torch.where(pb > 0, pb * (logp[bad] - logq[bad]), 0.0).sum(1)
    return float(per_position.double().sum())
