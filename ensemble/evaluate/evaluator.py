"""The ensemble evaluator: sharded, exact, streaming, one pass over the test data.

Sharding is by *batches* of blocks, round-robin over the processes, never by individual blocks:
every batch then has the same composition whatever the number of processes, so every position
gets bitwise the same logits and only the (float64) order of summation differs. Each process
accumulates sums (per row: tokens, correct, top-5, NLL, Brier, 15 ECE bins; pairwise
disagreement; KL to the mixture; Poisson-bootstrap replicates) and one all-reduce at the end
combines them.

- ``data`` mode: each process runs every member on its batches.
- ``member`` mode: one group of processes per member, each holding only its member; the k
  processes of a group split the batches (column j takes batches j, j+k, ...). For every chunk
  of positions the N processes of a column all-gather their member's logits, so each column
  holds every member's distribution for the chunk and scores it with the same code as data
  mode (group 0 accumulates; the others contribute zeros to the all-reduce).

For each batch every member's transformer body runs once; its final hidden states become
full-vocabulary logits ``eval.chunk_tokens`` positions at a time (float32 log-softmax), so
memory is bounded by the batch and the chunk, never by the test set, and no full-vocabulary
logits are copied to the host.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ensemble.config.schema import DataConfig, EvalConfig
from ensemble.core.architecture import context_length
from ensemble.core.combining import (
    COMBINERS,
    HEADLINE,
    TEMPERATURE_GRID,
    fit_mixture_weights,
    needs_fitting,
    refine_grid,
    temperature_nll_sums,
    usable_combiners,
)
from ensemble.core.data import EvalBlocks, PreparedData, collate_eval, prepare_data
from ensemble.core.heads import ChunkedHead
from ensemble.core.loading import LoadedMember, check_same_vocabulary, load_members
from ensemble.core.members import is_complete_member, read_member_info
from ensemble.core.metrics import BOOT, BOOTSTRAPPED, SUMS, percentile_interval, reliability, row_result
from ensemble.core.paths import STUDENT
from ensemble.core.soup import SOUP, make_soup, save_soup, soup_reason
from ensemble.errors import EnsembleError
from ensemble.evaluate.ood import BLOCK_SCORES, TPR, block_scores, detection
from ensemble.evaluate.report import format_table, write_plots, write_results
from ensemble.evaluate.scoring import Scorer, Workspace, log_probs_of_targets
from ensemble.evaluate.selective import selective_results
from ensemble.evaluate.token_export import HTML_TOKENS, TokenWriter, write_html
from ensemble.runtime.compute import resolve_compile, resolve_eval_precision
from ensemble.runtime.distributed import local_device
from ensemble.runtime.handoff import Trained
from ensemble.runtime.sharding import Collectives, Sharding

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Streaming over the data


@dataclass
class _Stream:
    """Turns batches of blocks into chunks of every member's logits: each held member's body runs
    once per batch, its head ``chunk_tokens`` positions at a time (:class:`ChunkedHead`)."""

    parts: dict[int, ChunkedHead]
    members: int
    vocab: int
    sharding: Sharding
    collectives: Collectives
    device: torch.device

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
        states = {i: part.hidden_states(ids, attention_mask)[:, :-1][mask] for i, part in self.parts.items()}
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


def _batches(
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
    stream: _Stream, blocks: EvalBlocks, cfg: EvalConfig, workspace: Workspace | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """(per-member temperatures, mixture weights or None) fitted on ``blocks``."""
    n, sharding, collectives = stream.members, stream.sharding, stream.collectives
    n_batches = -(-len(blocks) // cfg.per_device_batch_size)
    buffers = workspace.member if workspace is not None else (lambda *_: None)

    def chunks():
        for _, batch in _batches(blocks, cfg.per_device_batch_size, sharding.batches(n_batches)):
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
# The whole evaluation


def evaluate_members(
    members: list[LoadedMember],
    blocks: EvalBlocks,
    cfg: EvalConfig,
    device: torch.device | str,
    sharding: Sharding | None = None,
    fit_blocks: EvalBlocks | None = None,
    show_progress: bool = True,
    fitted: tuple[np.ndarray, np.ndarray | None] | None = None,
    keep_blocks: bool = False,
    tokens: TokenWriter | None = None,
) -> Scorer:
    """Score ``blocks`` with every member and combiner; returns the (all-reduced) sums.
    ``fitted``: temperatures and weights already fitted (nothing is fitted then);
    ``keep_blocks``: keep every block's sums (out-of-domain scores); ``tokens``: where this
    process writes its per-token rows (the processes that accumulate)."""
    device = torch.device(device)
    sharding = sharding or Sharding("data", 0, 1, len(members))
    collectives = Collectives(sharding)
    for m in members:
        ctx = context_length(m.config)
        if blocks.block_size > ctx:
            raise EnsembleError(
                f"data.block_size={blocks.block_size} exceeds the context of member {m.name} "
                f"({ctx} tokens); set data.block_size <= {ctx}"
            )
    precision = resolve_eval_precision(cfg.precision, device)
    compiled = resolve_compile(cfg.compile, device, "eval.compile")
    parts = {
        i: ChunkedHead.of(members[i].model, cfg.chunk_tokens, precision, device)
        for i in sorted(sharding.members_held)
    }
    stream = _Stream(parts, len(members), members[0].config.vocab_size, sharding, collectives, device)
    n = len(members)
    combiners = usable_combiners(cfg.combiners, n)
    temperatures, weights = fitted if fitted is not None else (np.ones(n), None)
    if fitted is None and (cfg.temperature_scaling or needs_fitting(combiners, n)):
        if fit_blocks is None:
            raise EnsembleError("fitting weights or temperatures needs a validation split; none was given")
        temperatures, weights = _fit(stream, fit_blocks, cfg, None if compiled else Workspace(device))
    for m, t in zip(members, temperatures, strict=True):
        m.temperature = float(t)
    scorer = Scorer(
        [m.name for m in members],
        combiners,
        temperatures,
        weights,
        cfg.bootstrap_samples,
        cfg.bootstrap_seed,
        device=device,
        compile=cfg.compile if compiled else False,
        precision=precision,
        uncertainty=cfg.uncertainty,
    )
    if keep_blocks:
        scorer.keep_blocks(len(blocks))
    n_batches = -(-len(blocks) // cfg.per_device_batch_size)
    mine = sharding.batches(n_batches)
    with torch.inference_mode():
        for first, batch in tqdm(
            _batches(blocks, cfg.per_device_batch_size, mine, pin=device.type == "cuda"),
            total=len(mine),
            desc="Evaluating",
            unit="batch",
            disable=not show_progress or sharding.rank != 0,
        ):
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
    scorer.unpack(collectives.allreduce_sum(scorer.pack()))  # the one all-reduce of the sums
    expected = blocks.num_predictions
    tokens = scorer.tokens
    if tokens != expected:  # a cheap guard on the protocol and the sharding
        raise RuntimeError(f"scored {tokens} positions, expected {expected}")
    return scorer


def results_dict(
    members: list[LoadedMember],
    scorer: Scorer,
    cfg: EvalConfig,
    split: str,
    blocks: EvalBlocks,
    data_info: dict[str, Any],
    sharding: Sharding,
) -> dict[str, Any]:
    """The results.json document (schema in the README)."""
    n = len(members)
    rows = {name: row_result(scorer.sums[r]) for name, r in scorer.index.items()}
    if n == 1:  # one member: every combination is that member
        rows.update({c: rows[members[0].name] for c in scorer.combiners})
    boot = _bootstrap(scorer, n) if scorer.bootstrap_samples else {}

    def with_ci(name: str) -> dict[str, Any]:
        out = dict(rows[name])
        if name in boot:
            out["ci95"] = boot[name]
        return out

    member_rows = [
        {"name": m.name, "seed": m.seed, "path": str(m.path), "temperature": m.temperature, **with_ci(m.name)}
        for m in members
    ]
    combiner_rows = {c: with_ci(c if n > 1 else members[0].name) for c in scorer.combiners}
    if scorer.weights is not None:
        for c in scorer.combiners:
            if COMBINERS[c].fitted:
                combiner_rows[c]["weights"] = [float(w) for w in scorer.weights]
    curve = [{"k": 1, **_curve_point(rows[members[0].name])}]
    curve += [{"k": k, **_curve_point(rows[f"first-{k}"])} for k in range(2, n)]
    if n > 1:
        curve.append({"k": n, **_curve_point(rows[HEADLINE])})
    tokens = rows[HEADLINE]["tokens"]
    member_entropy = {m.name: scorer.sums[r, SUMS.entropy] / tokens for r, m in enumerate(members)}
    if cfg.uncertainty:
        # entropy of the first k's mixture, minus the mean of those k members' entropies
        for point in curve:
            k = point["k"]
            row = members[0].name if k == 1 else (HEADLINE if k == n else f"first-{k}")
            total = scorer.sums[scorer.index[row], SUMS.entropy] / tokens
            aleatoric = float(np.mean(list(member_entropy.values())[:k]))
            point.update(total=total, aleatoric=aleatoric, epistemic=total - aleatoric)
    mean_member_nll = float(np.mean([rows[m.name]["nll"] for m in members]))
    results: dict[str, Any] = {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "split": split,
        "data": {
            **data_info,
            "blocks": len(blocks),
            "block_size": blocks.block_size,
            "tokens_evaluated": tokens,
        },
        "evaluation": {
            "mode": sharding.mode,
            "processes": sharding.world_size,
            "combiners": list(scorer.combiners),
            "precision": scorer.precision,
            "compiled": scorer.compiled,
            "temperature_scaling": cfg.temperature_scaling,
            "bootstrap": {
                "samples": scorer.bootstrap_samples,
                "seed": scorer.bootstrap_seed,
                "method": "Poisson bootstrap over blocks, 95% percentile intervals",
            },
        },
        "members": member_rows,
        "ensemble": {"combiner": HEADLINE, "members": n, **combiner_rows[HEADLINE]},
        "combiners": combiner_rows,
        "curve": curve,
        "diversity": {
            "nll_gap": mean_member_nll - rows[HEADLINE]["nll"],
            "mean_kl_to_mixture": float(scorer.kl[0] / tokens) if n > 1 else 0.0,
            "disagreement": {
                "pairs": [
                    {
                        "members": [members[i].name, members[j].name],
                        "rate": float(scorer.disagree[q] / tokens),
                    }
                    for q, (i, j) in enumerate(scorer.pairs)
                ],
                "mean": float(np.mean(scorer.disagree) / tokens) if scorer.pairs else 0.0,
            },
        },
        "gain": _gain(rows, members, boot),
        **(_uncertainty(scorer, member_entropy, tokens) if cfg.uncertainty else {}),
        "reliability": {
            "bins": 15,
            "rows": {
                name: reliability(scorer.sums[scorer.index[name]])
                for name in [*(m.name for m in members)] + ([HEADLINE] if n > 1 else [])
            },
        },
    }
    return results


def _uncertainty(scorer: Scorer, member_entropy: dict[str, float], tokens: int) -> dict[str, Any]:
    """The "uncertainty" and "selective" sections (see the README's schema), given each
    member's mean entropy."""
    if len(member_entropy) > 1:
        means = {name: value / tokens for name, value in scorer.decomposition.items()}
    else:  # one member: all of its uncertainty is aleatoric
        (h,) = member_entropy.values()
        means = {"total": h, "aleatoric": h, "epistemic": 0.0, "pairwise_kl": 0.0}
    return {
        "uncertainty": {
            "unit": "nats per position",
            "total": means["total"],
            "aleatoric": means["aleatoric"],
            "epistemic": means["epistemic"],
            "expected_pairwise_kl": means["pairwise_kl"],
            "member_entropy": member_entropy,
        },
        "selective": selective_results(scorer.selective, scorer.selective_rows, scorer.ensemble_row),
    }


def _curve_point(row: dict[str, Any]) -> dict[str, Any]:
    return {"accuracy": row["accuracy"], "nll": row["nll"], "perplexity": row["perplexity"]}


def _bootstrap(scorer: Scorer, n: int) -> dict[str, Any]:
    """95% intervals of accuracy and NLL for every row, and of the gains (under "gain:*")."""
    keep = scorer.boot_tokens > 0
    with np.errstate(divide="ignore", invalid="ignore"):  # [replicates, rows] per metric
        means = {
            metric: (scorer.boot[:, :, BOOT[value]] / scorer.boot_tokens[:, None])[keep]
            for metric, value in BOOTSTRAPPED.items()
        }
    out = {
        name: {metric: percentile_interval(m[:, r]) for metric, m in means.items()}
        for name, r in scorer.index.items()
    }
    if n > 1:
        acc, nll = means["accuracy"], means["nll"]
        members = list(range(n))
        point_nll = scorer.sums[members, SUMS.nll] / scorer.sums[members, SUMS.tokens]
        point_acc = scorer.sums[members, SUMS.correct] / scorer.sums[members, SUMS.tokens]
        ens = scorer.index[HEADLINE]
        best_nll, best_acc = int(np.argmin(point_nll)), int(np.argmax(point_acc))
        out["gain:best"] = {
            "nll": percentile_interval(nll[:, ens] - nll[:, best_nll]),
            "accuracy": percentile_interval(acc[:, ens] - acc[:, best_acc]),
        }
        out["gain:mean"] = {
            "nll": percentile_interval(nll[:, ens] - nll[:, members].mean(axis=1)),
            "accuracy": percentile_interval(acc[:, ens] - acc[:, members].mean(axis=1)),
        }
    return out


def _gain(rows: dict[str, Any], members: list[LoadedMember], boot: dict[str, Any]) -> dict[str, Any]:
    """Ensemble (the headline combiner) minus the best member and minus the average member."""
    if len(members) == 1:
        return {}
    names = [m.name for m in members]
    ens = rows[HEADLINE]
    best_nll = min(names, key=lambda m: rows[m]["nll"])
    best_acc = max(names, key=lambda m: rows[m]["accuracy"])
    out = {
        "vs_best_member": {
            "nll": ens["nll"] - rows[best_nll]["nll"],
            "accuracy": ens["accuracy"] - rows[best_acc]["accuracy"],
            "perplexity_ratio": ens["perplexity"] / rows[best_nll]["perplexity"],
            "best_member_by_nll": best_nll,
            "best_member_by_accuracy": best_acc,
        },
        "vs_mean_member": {
            "nll": ens["nll"] - float(np.mean([rows[m]["nll"] for m in names])),
            "accuracy": ens["accuracy"] - float(np.mean([rows[m]["accuracy"] for m in names])),
        },
    }
    if "gain:best" in boot:
        out["vs_best_member"]["ci95"] = boot["gain:best"]
        out["vs_mean_member"]["ci95"] = boot["gain:mean"]
    return out


def _out_of_domain(
    files: tuple[Path, ...],
    members: list[LoadedMember],
    scorer: Scorer,
    data_cfg: DataConfig,
    eval_cfg: EvalConfig,
    device: torch.device | str,
    sharding: Sharding,
    load: Callable[[DataConfig, str], PreparedData],
) -> dict[str, Any]:
    """Each file's blocks scored like the evaluated split's (same members, temperatures and
    weights), then told apart from them: results.json's "ood" section."""

    def scores(s: Scorer) -> dict[str, dict[str, np.ndarray]]:
        return block_scores(s.blocks, s.blocks_tokens, s.blocks_epistemic, s.selective_rows, s.ensemble_row)

    def scored_blocks(s: Scorer) -> int:  # blocks with a predicted position (the scored ones)
        return int(np.count_nonzero(s.blocks_tokens))

    in_domain = scores(scorer)
    fitted = (np.array([m.temperature for m in members]), scorer.weights)
    cfg = dataclasses.replace(eval_cfg, bootstrap_samples=0)
    sets = []
    for path in files:
        file_cfg = dataclasses.replace(
            data_cfg,
            dataset=None,
            dataset_config=None,
            text_column=None,
            text_template=None,
            train_files=[],
            validation_files=[],
            test_files=[str(path)],
        )
        try:
            blocks = load(file_cfg, "test").eval_blocks("test")
        except EnsembleError as e:
            raise EnsembleError(f"--ood {path}: {e}") from None
        logger.info("out-of-domain set %s: %d blocks", path, len(blocks))
        ood = evaluate_members(members, blocks, cfg, device, sharding, fitted=fitted, keep_blocks=True)
        out_domain = scores(ood)
        sets.append(
            {
                "path": str(path),
                "blocks": scored_blocks(ood),
                "tokens_evaluated": ood.tokens,
                "rows": detection(in_domain, out_domain),
            }
        )
    return {
        "in_domain": {"blocks": scored_blocks(scorer)},
        "tpr": TPR,
        "scores": {name: s.label for name, s in BLOCK_SCORES.items()},
        "sets": sets,
    }


def _one_models(
    member_paths: list[Path],
    members: list[LoadedMember],
    scorer: Scorer,
    cfg: EvalConfig,
    blocks: EvalBlocks,
    device: torch.device | str,
    outputs: EvalOutputs,
    no_soup: str | None,
    rank: int,
    world: int,
) -> dict[str, Any]:
    """The ensemble in one model: the distilled student (when given) and the weight soup (when
    the members can be souped), each scored on the same blocks, bootstrap replicates included,
    as results.json's "student" and "soup" sections."""
    ref = members[0]
    models: dict[str, LoadedMember] = {}
    if outputs.student is not None:
        path = Path(outputs.student)
        info = read_member_info(path)
        (student,) = load_members([path], device)
        check_same_vocabulary(
            ref,
            f"the student {path}",
            student.config.vocab_size,
            student.tokenizer,
            fix="distil it from these members",
            against="the members",
        )
        student.name = STUDENT
        models[STUDENT] = student
        teachers = sorted(info.get("teachers", {}).values(), key=str)
        evaluated = sorted((read_member_info(m).get("weights_sha256", {}) for m in member_paths), key=str)
        if teachers and teachers != evaluated:
            logger.warning(
                "the student %s was distilled from other members than those evaluated: the share of the "
                "gain it keeps is relative to these",
                path,
            )
    out: dict[str, Any] = {}
    if no_soup:
        if cfg.soup:
            logger.info("soup skipped: %s", no_soup)
            out[SOUP] = {"skipped": no_soup}
    else:
        soup = make_soup(member_paths)
        if outputs.save_soup and rank == 0:
            save_soup(Path(outputs.save_soup), soup, ref.tokenizer, member_paths)
        models[SOUP] = LoadedMember(
            Path(outputs.save_soup or SOUP), SOUP, None, ref.tokenizer, soup.config, soup.to(device)
        )
    single = dataclasses.replace(cfg, uncertainty=False)
    for name, model in models.items():
        one = evaluate_members(
            [model],
            blocks,
            single,
            device,
            Sharding("data", rank, world, 1),
            fitted=(np.ones(1), None),
            show_progress=False,
        )
        out[name] = {
            "path": str(model.path),
            **({"seed": model.seed} if name == STUDENT else {"members": len(members)}),
            **_one_model_row(one, scorer, members),
        }
        if name == STUDENT:  # (info: the student's member.json, read above)
            out[name]["distill"] = {**info.get("distill", {}), "teachers": sorted(info.get("teachers", {}))}
    return out


def _one_model_row(one: Scorer, scorer: Scorer, members: list[LoadedMember]) -> dict[str, Any]:
    """One model's metrics and how much of the ensemble's gain it keeps: (mean member NLL - its
    NLL) / (mean member NLL - ensemble NLL), with a bootstrap interval (the replicates weigh the
    blocks alike in both evaluations: the weights depend on the seed and the block only)."""
    row: dict[str, Any] = row_result(one.sums[0])
    n = len(members)
    if one.bootstrap_samples:
        row["ci95"] = _bootstrap(one, 1)[one.rows[0]]
    if n < 2:
        return row
    member_nll = scorer.sums[:n, SUMS.nll] / scorer.sums[:n, SUMS.tokens]
    ens = scorer.index[HEADLINE]
    ensemble_nll = scorer.sums[ens, SUMS.nll] / scorer.sums[ens, SUMS.tokens]
    best = int(np.argmin(member_nll))
    gain = float(member_nll.mean() - ensemble_nll)
    kept = {
        "share": float((member_nll.mean() - row["nll"]) / gain) if gain > 0 else None,
        "ensemble_gain_nll": gain,
        "nll_vs_mean_member": float(row["nll"] - member_nll.mean()),
        "nll_vs_best_member": float(row["nll"] - member_nll[best]),
        "perplexity_ratio_vs_best_member": float(np.exp(row["nll"] - member_nll[best])),
        "best_member": members[best].name,
    }
    keep = (scorer.boot_tokens > 0) & (one.boot_tokens > 0)
    if one.bootstrap_samples and gain > 0 and keep.any():
        with np.errstate(divide="ignore", invalid="ignore"):
            nll = scorer.boot[keep][:, :, BOOT.nll] / scorer.boot_tokens[keep, None]
            own = one.boot[keep][:, 0, BOOT.nll] / one.boot_tokens[keep]
            mean_member = nll[:, :n].mean(axis=1)
            share = (mean_member - own) / (mean_member - nll[:, ens])
        kept["ci95"] = percentile_interval(share[np.isfinite(share)])
    row["gain_kept"] = kept
    return row


@contextlib.contextmanager
def _barrier_main_first(name: str) -> Iterator[None]:
    """main_first with plain barriers (collective timeout), when no Worlds is at hand."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    if distributed and rank != 0:
        dist.barrier()
    yield
    if distributed and rank == 0:
        dist.barrier()


@dataclass(frozen=True)
class EvalOutputs:
    """What an evaluation adds on request (`launch/evaluate.py` options); none by default."""

    ood: tuple[Path, ...] = ()
    """Text files to tell apart from the evaluated split (out-of-domain detection, see ensemble/evaluate/ood.py)."""
    tokens_out: Path | None = None
    """The per-token Parquet export (see ensemble/evaluate/token_export.py)."""
    html: Path | None = None
    """The HTML view of the first ``html_tokens`` tokens, shaded by epistemic uncertainty."""
    html_tokens: int = HTML_TOKENS
    student: Path | None = None
    """A distilled student (launch/distill.py) evaluated beside the members: the `student` row."""
    save_soup: Path | None = None
    """Where to save the members' weight soup in Hugging Face format (see ensemble/core/soup.py)."""

    def __post_init__(self) -> None:
        if self.student is not None and not is_complete_member(Path(self.student)):
            raise EnsembleError(
                f"--student {self.student} is not a finished student (no member.json); distil one with "
                "launch/distill.py RUN_DIR"
            )
        if self.html_tokens < 1:
            raise EnsembleError(f"--html-tokens {self.html_tokens}: show at least 1 token")
        for path in self.ood:
            if not Path(path).is_file():
                raise EnsembleError(f"--ood: file {path} not found; fix the path")

    @property
    def requested(self) -> bool:
        return bool(self.ood or self.tokens_out or self.html)


def evaluate_trained(trained: Trained) -> dict[str, Any]:
    """The evaluation of a run right after its training (or distillation) stage, in the same
    processes (an :data:`~ensemble.runtime.handoff.AfterTraining`): the split ``eval.split``,
    the results in ``output.dir``."""
    cfg = trained.cfg
    return evaluate(
        trained.members,
        cfg.data,
        cfg.eval,
        cfg.eval.split,
        Path(cfg.output.dir),
        local_device(),
        trained.data,
        main_first=trained.main_first,
        outputs=EvalOutputs(student=trained.student),
    )


def evaluate(
    member_paths: list[Path],
    data_cfg: DataConfig,
    eval_cfg: EvalConfig,
    split: str,
    out_dir: Path,
    device: torch.device | str,
    prepared: PreparedData | None = None,
    fit_data_cfg: DataConfig | None = None,
    main_first: Callable[[str], contextlib.AbstractContextManager] | None = None,
    outputs: EvalOutputs | None = None,
) -> dict[str, Any]:
    """Evaluate members and their ensemble on ``split`` of ``data_cfg``, across all processes
    of the current world; the first process writes and prints the results. ``prepared`` reuses
    data already tokenized by training; fits use ``fit_data_cfg`` (default: ``data_cfg``);
    ``outputs``: the out-of-domain sets and per-token files asked for."""
    import torch.distributed as dist

    outputs = outputs or EvalOutputs()
    if outputs.requested and not eval_cfg.uncertainty:
        raise EnsembleError("--ood, --tokens-out and --html need eval.uncertainty=true; remove that override")

    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    n = len(member_paths)
    no_soup = soup_reason(member_paths) if eval_cfg.soup or outputs.save_soup else "eval.soup=false"
    if outputs.save_soup and no_soup:
        raise EnsembleError(f"--save-soup: the members cannot be souped: {no_soup}")
    sharding = Sharding(eval_cfg.mode, rank, world, n)
    members = load_members(member_paths, device, hold=sharding.members_held)
    block_size = data_cfg.block_size or min(context_length(m.config) for m in members)
    needs_fit = eval_cfg.temperature_scaling or needs_fitting(eval_cfg.combiners, n)
    fit_split = eval_cfg.fit_split

    def load(cfg: DataConfig, which: str) -> PreparedData:
        # one process fills the datasets cache, the others then read it
        with (main_first or _barrier_main_first)(f"eval-data-{which}"):
            return prepare_data(cfg, members[0].tokenizer, block_size, splits=(which,))

    if prepared is None or split not in prepared.streams:
        prepared = load(data_cfg, split)
    fit_blocks = None
    if needs_fit:
        fit_source = fit_data_cfg or data_cfg
        if fit_source is data_cfg and fit_split in prepared.streams:
            fit_prepared = prepared
        else:
            fit_prepared = load(fit_source, fit_split)
        fit_blocks = fit_prepared.eval_blocks(fit_split)
    blocks = prepared.eval_blocks(split)
    n_batches = -(-len(blocks) // eval_cfg.per_device_batch_size)
    # with --html alone, the tokens go to a temporary export that the page is made from (a name
    # every process derives alike: each writes its part next to it)
    html_tokens = outputs.html.with_name(f".{outputs.html.name}.tokens.parquet") if outputs.html else None
    tokens_path = outputs.tokens_out or html_tokens
    writer = None
    if tokens_path is not None and sharding.accumulates:
        writer = TokenWriter(
            Path(tokens_path),
            [m.name for m in members],
            members[0].tokenizer,
            members[0].config.vocab_size,
            sharding.column,
            sharding.group_size,
        )
    scorer = evaluate_members(
        members, blocks, eval_cfg, device, sharding, fit_blocks, keep_blocks=bool(outputs.ood), tokens=writer
    )
    fingerprint = prepared.fingerprint
    results = results_dict(
        members,
        scorer,
        eval_cfg,
        split,
        blocks,
        {"source": fingerprint["source"], **fingerprint["splits"][split]},
        sharding,
    )
    results.update(
        _one_models(member_paths, members, scorer, eval_cfg, blocks, device, outputs, no_soup, rank, world)
    )
    if outputs.ood:
        results["ood"] = _out_of_domain(
            outputs.ood, members, scorer, data_cfg, eval_cfg, device, sharding, load
        )
        results["ood"]["in_domain"]["split"] = split
    if rank == 0 and writer is not None:
        writer.finish(n_batches)
        if outputs.html:
            write_html(
                Path(tokens_path),
                outputs.html,
                outputs.html_tokens,
                title=f"{split} split: where the members disagree",
            )
            results["html"] = str(outputs.html)
        if outputs.tokens_out:
            results["tokens_out"] = str(outputs.tokens_out)
        else:
            Path(tokens_path).unlink()
    if rank == 0:
        json_path, _ = write_results(results, out_dir)
        if eval_cfg.plots:
            write_plots(results, out_dir)
        print(format_table(results), flush=True)
        logger.info("results written to %s", json_path)
    return results
