"""A causal LM split into its transformer body and its output layer, the head applied a chunk of
positions at a time.

Full-vocabulary logits for a whole batch are what would make inference memory grow with the
batch times the vocabulary; running the body once and the head ``chunk_tokens`` positions at a
time bounds it by the chunk. The evaluator and the distillation teacher both score this way.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ensemble.errors import EnsembleError
from ensemble.runtime.compute import FLOAT32, autocast


def body_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The transformer body (ids -> final hidden states) and the output layer of a causal LM.

    It is checked once against the model's own logits so that a model with extra work after its
    head (logit scaling, soft-capping) is refused instead of mis-scored.
    """
    body, head = model.base_model, model.get_output_embeddings()
    if head is None or body is model:
        raise EnsembleError(f"{type(model).__name__} is not a causal LM with an output layer")
    probe = torch.arange(8, device=next(model.parameters()).device)[None] % model.config.vocab_size
    mask = torch.ones_like(probe)
    with torch.inference_mode():
        full = model(probe, attention_mask=mask, use_cache=False).logits.float()
        split = head(body(probe, attention_mask=mask, use_cache=False).last_hidden_state).float()
    if not torch.allclose(full, split, rtol=1e-4, atol=1e-4):
        raise EnsembleError(
            f"{type(model).__name__}'s logits are not its output layer applied to its last hidden "
            "state; such members are not supported by the evaluator"
        )
    return body, head


@dataclass
class ChunkedHead:
    """One model's body, run once per batch, and its head, run ``chunk_tokens`` rows at a time,
    both in ``precision``."""

    body: torch.nn.Module
    head: torch.nn.Module
    chunk_tokens: int
    precision: str
    device: torch.device
    model: torch.nn.Module | None = None
    """The model the body and head are of (an adapter member's view: see :func:`hidden_states_of`)."""

    @classmethod
    def of(
        cls, model: torch.nn.Module, chunk_tokens: int, precision: str, device: torch.device
    ) -> ChunkedHead:
        return cls(*body_and_head(model), chunk_tokens, precision, device, model)

    def hidden_states(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The body's final hidden states [batch, block, width]."""
        with autocast(self.precision, self.device):
            return self.body(ids, attention_mask=attention_mask, use_cache=False).last_hidden_state

    def spans(self, rows: int) -> Iterator[slice]:
        """The chunks of ``rows`` positions, in order."""
        for start in range(0, rows, self.chunk_tokens):
            yield slice(start, start + self.chunk_tokens)

    def logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The logits for ``hidden`` [rows, width], written into ``out`` when given: for a float32
        linear head, by the matmul itself (no [rows, vocab] allocation)."""
        head = self.head
        if (
            out is not None
            and self.precision == FLOAT32
            and isinstance(head, torch.nn.Linear)
            and hidden.dtype == head.weight.dtype == out.dtype
        ):
            if head.bias is None:
                return torch.mm(hidden, head.weight.t(), out=out)
            return torch.addmm(head.bias, hidden, head.weight.t(), out=out)
        with autocast(self.precision, self.device):
            logits = head(hidden)
        return logits if out is None else out.copy_(logits)


def hidden_states_of(
    parts: dict[int, ChunkedHead],
    ids: torch.Tensor,
    attention_mask: torch.Tensor,
    one_pass: bool | None = None,
) -> dict[int, torch.Tensor]:
    """Every part's final hidden states for the batch ``ids``; with ``one_pass``, adapter members
    of one base in one forward pass (the batch repeated once per member, each copy through its
    own adapter). None: one pass on GPUs only, where it saves a launch sequence per member; on
    CPU, where nothing is launch-bound, the members one after another measured faster (the
    larger batch's working set; docs/performance.md#adapter-members)."""
    from ensemble.core.adapters import AdapterView, batched_hidden_states

    if one_pass is None:
        one_pass = any(part.device.type == "cuda" for part in parts.values())
    groups: dict[int, list[int]] = {}
    for i, part in parts.items():
        if isinstance(part.model, AdapterView):
            groups.setdefault(id(part.model.shared), []).append(i)
    states = {}
    for members in groups.values():
        if one_pass and len(members) > 1:
            first = parts[members[0]]
            with autocast(first.precision, first.device):
                views = [parts[i].model for i in members]
                states.update(zip(members, batched_hidden_states(views, ids, attention_mask), strict=True))
    for i, part in parts.items():
        if i not in states:
            states[i] = part.hidden_states(ids, attention_mask)
    return states
