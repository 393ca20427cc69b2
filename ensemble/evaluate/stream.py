"""The scoring pass: every member's logits over the blocks, chunk by chunk, into a
:class:`~ensemble.evaluate.scoring.Scorer`, after fitting temperatures and weights on the
validation split when asked (see ensemble/evaluate/evaluator.py for how the work is sharded)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ensemble.config.schema import EvalConfig
from ensemble.core.architecture import context_length
from ensemble.core.combining import (
    TEMPERATURE_GRID,
    fit_mixture_weights,
    needs_fitting,
    refine_grid,
    temperature_nll_sums,
    usable_combiners,
)
from ensemble.core.data import EvalBlocks, collate_eval
from ensemble.core.heads import ChunkedHead, hidden_states_of
from ensemble.core.loading import LoadedMember
from ensemble.errors import EnsembleError
from ensemble.evaluate.scoring import BootstrapPlan, Fitted, Scorer, Workspace, log_probs_of_targets
from ensemble.evaluate.token_export import TokenWriter
from ensemble.runtime.compute import resolve_compile, resolve_eval_precision
from ensemble.runtime.progress import progress
from ensemble.runtime.sharding import Collectives, Sharding

# --------------------------------------------------------------------------------------------
# Streaming over the data


@dataclass
class MemberStream:
    """Turns batches of blocks into chunks of every member's logits: each held member's body runs
    once per batch, its head ``chunk_tokens`` positions at a time (:class:`ChunkedHead`)."""

    parts: dict[int, ChunkedHead]
    members: int
    vocab: int
    sharding: Sharding
    collectives: Collectives
    device: torch.device

    @classmethod
    def of(
        cls,
        members: list[LoadedMember],
        cfg: EvalConfig,
        sharding: Sharding,
        collectives: Collectives,
        device: torch.device,
    ) -> MemberStream:
        """The stream of the members this process holds, at ``eval.precision``."""
        precision = resolve_eval_precision(cfg.precision, device)
        parts = {
            i: ChunkedHead.of(members[i].model, cfg.chunk_tokens, precision, device)
            for i in sorted(sharding.members_held)
        }
        return cls(parts, len(members), members[0].config.vocab_size, sharding, collectives, device)

    def chunks(
        self, batch: dict[str, torch.Tensor], workspace: Callable[[int, int, int], torch.Tensor | None]
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]]:
        """(targets, local block index of each position, every member's logits) per chunk;
        ``workspace(member, rows, vocab)`` names the buffer a member's logits go to (or None)."""
        device = self.device
        ids = batch["input_ids"].to(device, non_blocking=True)
        attention_mask = batch["attention_mask"].to(device, non_blocking=True)
        mask = batch["target_mask"].to(device, non_blocking=True)
        targets = ids[:, 1:][mask]
        block_of = torch.arange(ids.shape[0], device=device)[:, None].expand_as(mask)[mask]
        states = {i: h[:, :-1][mask] for i, h in hidden_states_of(self.parts, ids, attention_mask).items()}
        for span in next(iter(self.parts.values())).spans(len(targets)):
            rows = len(targets[span])
            if self.sharding.mode == "member":
                ((i, part),) = self.parts.items()
                own = part.logits(states[i][span]).float()
                outs = [workspace(j, rows, self.vocab) for j in range(self.members)]
                logits = self.collectives.gather_members(own, None if outs[0] is None else outs)
            else:
                logits = [
                    self.parts[i].logits(states[i][span], workspace(i, rows, self.vocab))
                    for i in range(self.members)
                ]
            yield targets[span], block_of[span], logits


def batches(
    blocks: EvalBlocks, batch_size: int, which: range, pin: bool = False
) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """(first block, batch) for the batches in ``which``; ``pin``: in page-locked memory, so the
    copy to the GPU does not wait for the host."""
    for j in which:
        start = j * batch_size
        batch = collate_eval([blocks[b] for b in range(start, min(start + batch_size, len(blocks)))])
        yield start, {k: v.pin_memory() for k, v in batch.items()} if pin else batch


# --------------------------------------------------------------------------------------------
# Fitting on the validation split


def _fit(
    stream: MemberStream, blocks: EvalBlocks, cfg: EvalConfig, workspace: Workspace | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """(per-member temperatures, mixture weights or None) fitted on ``blocks``."""
    n, sharding, collectives = stream.members, stream.sharding, stream.collectives
    n_batches = -(-len(blocks) // cfg.per_device_batch_size)
    buffers = workspace.member if workspace is not None else (lambda *_: None)

    def chunks():
        for _, batch in batches(blocks, cfg.per_device_batch_size, sharding.batches(n_batches)):
            yield from stream.chunks(batch, buffers)

    temperatures = np.ones(n)
    if cfg.temperature_scaling:
        grids = [TEMPERATURE_GRID] * n
        for round_ in range(2):  # a coarse grid, then a finer one around each member's best
            sums = np.zeros((n, len(TEMPERATURE_GRID)))
            with torch.inference_mode():
                for targets, _, logits in chunks():
                    if sharding.accumulates:
                        for i in range(n):
                            sums[i] += temperature_nll_sums(logits[i].float(), targets, grids[i])
            sums = collectives.allreduce_sum(sums)
            best = sums.argmin(axis=1)
            temperatures = np.array([grids[i][best[i]] for i in range(n)])
            if round_ == 0:
                grids = [refine_grid(grids[i], best[i], len(TEMPERATURE_GRID)) for i in range(n)]
    weights = None
    if needs_fitting(cfg.combiners, n):
        target_logp = []
        with torch.inference_mode():
            for targets, _, logits in chunks():
                if sharding.accumulates:
                    target_logp.append(log_probs_of_targets(logits, targets, temperatures, workspace).cpu())
        local = torch.cat(target_logp).numpy() if target_logp else np.zeros((0, n))
        weights = fit_mixture_weights(local, allreduce=collectives.allreduce_sum)
    return temperatures, weights


# --------------------------------------------------------------------------------------------
# The pass


@dataclass(frozen=True)
class Collect:
    """What a pass keeps besides the sums."""

    blocks: bool = False
    """Every block's sums (the out-of-domain scores)."""
    tokens: TokenWriter | None = None
    """Where this process writes its per-token rows (the processes that accumulate)."""


def evaluate_members(
    members: list[LoadedMember],
    blocks: EvalBlocks,
    cfg: EvalConfig,
    device: torch.device | str,
    sharding: Sharding | None = None,
    fit: EvalBlocks | Fitted | None = None,
    collect: Collect = Collect(),
    show_progress: bool = True,
) -> Scorer:
    """Score ``blocks`` with every member and combiner; returns the (all-reduced) sums.
    ``fit``: the validation blocks to fit temperatures and weights on, or those already fitted
    (nothing is fitted then)."""
    device = torch.device(device)
    sharding = sharding or Sharding("data", 0, 1, len(members))
    collectives = Collectives(sharding)
    _check_context(members, blocks)
    compiled = resolve_compile(cfg.compile, device, "eval.compile")
    stream = MemberStream.of(members, cfg, sharding, collectives, device)
    fitted = _fitted(stream, fit, cfg, None if compiled else Workspace(device))
    for m, t in zip(members, fitted.temperatures, strict=True):
        m.temperature = float(t)
    scorer = Scorer(
        [m.name for m in members],
        usable_combiners(cfg.combiners, len(members)),
        fitted,
        BootstrapPlan(cfg.bootstrap_samples, cfg.bootstrap_seed),
        device=device,
        compile=cfg.compile if compiled else False,
        uncertainty=cfg.uncertainty,
    )
    if collect.blocks:
        scorer.keep_blocks(len(blocks))
    _score_blocks(stream, scorer, blocks, cfg.per_device_batch_size, collect.tokens, show_progress)
    scorer.unpack(collectives.allreduce_sum(scorer.pack()))  # the one all-reduce of the sums
    if scorer.tokens != blocks.num_predictions:  # a cheap guard on the protocol and the sharding
        raise RuntimeError(f"scored {scorer.tokens} positions, expected {blocks.num_predictions}")
    return scorer


def _check_context(members: list[LoadedMember], blocks: EvalBlocks) -> None:
    for m in members:
        ctx = context_length(m.config)
        if blocks.block_size > ctx:
            raise EnsembleError(
                f"data.block_size={blocks.block_size} exceeds the context of member {m.name} "
                f"({ctx} tokens); set data.block_size <= {ctx}"
            )


def _fitted(
    stream: MemberStream, fit: EvalBlocks | Fitted | None, cfg: EvalConfig, workspace: Workspace | None
) -> Fitted:
    n = stream.members
    if isinstance(fit, Fitted):
        return fit
    if not (cfg.temperature_scaling or needs_fitting(usable_combiners(cfg.combiners, n), n)):
        return Fitted.none(n)
    if fit is None:
        raise EnsembleError("fitting weights or temperatures needs a validation split; none was given")
    return Fitted(*_fit(stream, fit, cfg, workspace))


def _score_blocks(
    stream: MemberStream,
    scorer: Scorer,
    blocks: EvalBlocks,
    batch_size: int,
    tokens: TokenWriter | None,
    show_progress: bool,
) -> None:
    """This process's batches through the members into ``scorer`` (and ``tokens``)."""
    sharding, device = stream.sharding, stream.device
    mine = sharding.batches(-(-len(blocks) // batch_size))
    bar = progress(
        batches(blocks, batch_size, mine, pin=device.type == "cuda"),
        total=len(mine),
        desc="Evaluating",
        unit="batch",
        disable=not show_progress or sharding.rank != 0,
    )
    with torch.inference_mode():
        for first, batch in bar:
            if sharding.accumulates:
                scorer.begin_batch(len(batch["input_ids"]), device)
                if tokens is not None:
                    tokens.begin_batch(first, batch)
            for targets, block_of, logits in stream.chunks(batch, scorer.workspace):
                if sharding.accumulates:
                    out = scorer.score(logits, targets, block_of)
                    if tokens is not None:
                        tokens.add(out, targets)
            if sharding.accumulates:
                scorer.end_batch(first)
                if tokens is not None:
                    tokens.end_batch()
    if tokens is not None:
        tokens.close()  # before the all-reduce: once it returns, every part is complete
