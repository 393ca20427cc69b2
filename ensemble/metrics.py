"""Next-token metrics as running sums, so evaluation streams over the data.

Only sums and counts are kept (float64), never per-token values: the state is a few numbers per
predictor whatever the size of the test set, and sums from several shards add up exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

TOPK = 5


@dataclass
class TokenMetrics:
    """Sums over predicted positions for one predictor (a member or a combination)."""

    tokens: int = 0
    correct: int = 0
    correct_top5: int = 0
    nll_sum: float = 0.0

    def update(self, logp: torch.Tensor, targets: torch.Tensor) -> None:
        """Add positions with log-probabilities ``logp`` [n, vocab] (float32) and targets [n]."""
        if targets.numel() == 0:
            return
        target_logp = logp.gather(1, targets[:, None]).squeeze(1)
        top = logp.topk(min(TOPK, logp.shape[1]), dim=1).indices
        self.tokens += int(targets.numel())
        self.correct += int((top[:, 0] == targets).sum())
        self.correct_top5 += int((top == targets[:, None]).any(dim=1).sum())
        self.nll_sum += -float(target_logp.double().sum())

    def result(self) -> dict[str, float | int]:
        if self.tokens == 0:
            raise ValueError("no predicted positions were evaluated")
        nll = self.nll_sum / self.tokens
        return {
            "accuracy": self.correct / self.tokens,
            "top5_accuracy": self.correct_top5 / self.tokens,
            "nll": nll,
            "perplexity": math.exp(nll) if nll < 700 else math.inf,
            "tokens": self.tokens,
        }
