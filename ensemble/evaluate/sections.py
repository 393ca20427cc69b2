"""The sections of results.json, registered in one place (:data:`SECTIONS`).

Each section is one top-level key: a function of the :class:`Evaluation` that returns its part
(typed in ensemble/core/results.py), and a condition saying when it is there. The order of
the registry is the order of the file. Adding a section: a builder and a line here, its type
in core/results.py. The sections that evaluate another model (the student, the soup, the
out-of-domain sets) run collectives, so every process builds every section; only the first
writes the file.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ensemble.core.combining import COMBINERS, HEADLINE
from ensemble.core.loading import LoadedMember, check_same_vocabulary, load_members
from ensemble.core.members import read_member_info
from ensemble.core.metrics import BOOT, SUMS, percentile_interval, reliability, row_result
from ensemble.core.paths import STUDENT
from ensemble.core.results import (
    SCHEMA_VERSION,
    CombinerRow,
    CurvePoint,
    DataInfo,
    Diversity,
    EnsembleRow,
    EvaluationInfo,
    Gain,
    GainKept,
    MemberRow,
    OutOfDomain,
    Reliability,
    Results,
    Selective,
    Skipped,
    SoupRow,
    StudentRow,
    Uncertainty,
)
from ensemble.core.soup import SOUP, make_soup, save_soup, soup_reason
from ensemble.errors import EnsembleError
from ensemble.evaluate.context import Evaluation, bootstrap_intervals
from ensemble.evaluate.ood import BLOCK_SCORES, TPR, block_scores, detection
from ensemble.evaluate.scoring import Fitted, Scorer
from ensemble.evaluate.selective import selective_results
from ensemble.evaluate.stream import Collect, evaluate_members
from ensemble.evaluate.token_export import write_html
from ensemble.runtime.compute import resolve_eval_precision
from ensemble.runtime.sharding import Sharding

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Section:
    build: Callable[[Evaluation], Any]
    wanted: Callable[[Evaluation], bool] = lambda ev: True


def build_results(ev: Evaluation) -> Results:
    """The results.json document: every wanted section, in the registry's order."""
    results: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    for key, section in SECTIONS.items():
        if section.wanted(ev):
            part = section.build(ev)
            if part is not None:  # (a section may decline, e.g. on the processes that do not write)
                results[key] = part
    return results  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# What was evaluated, and how


def _data(ev: Evaluation) -> DataInfo:
    blocks = ev.blocks
    return {
        **ev.data_info,
        "blocks": len(blocks),
        "block_size": blocks.block_size,
        "tokens_evaluated": ev.tokens_evaluated,
    }  # type: ignore[typeddict-item]


def _evaluation(ev: Evaluation) -> EvaluationInfo:
    s, cfg = ev.scorer, ev.cfg
    return {
        "mode": ev.sharding.mode,  # type: ignore[typeddict-item]
        "processes": ev.sharding.world_size,
        "combiners": list(s.combiners),
        "precision": resolve_eval_precision(cfg.precision, ev.device),
        "compiled": s.compiled,
        "temperature_scaling": cfg.temperature_scaling,
        "bootstrap": {
            "samples": s.bootstrap_samples,
            "seed": s.bootstrap_seed,
            "method": "Poisson bootstrap over blocks, 95% percentile intervals",
        },
    }


# --------------------------------------------------------------------------------------------
# The members and the combinations


def _members(ev: Evaluation) -> list[MemberRow]:
    return [
        {
            "name": m.name,
            "seed": m.seed,
            "path": str(m.path),
            "temperature": m.temperature,
            **ev.with_ci(m.name),
        }
        for m in ev.members
    ]  # type: ignore[typeddict-item]


def _combiners(ev: Evaluation) -> dict[str, CombinerRow]:
    s = ev.scorer
    rows: dict[str, Any] = {c: ev.with_ci(c if ev.n > 1 else ev.members[0].name) for c in s.combiners}
    if s.weights is not None:
        for c in s.combiners:
            if COMBINERS[c].fitted:
                rows[c]["weights"] = [float(w) for w in s.weights]
    return rows


def _ensemble(ev: Evaluation) -> EnsembleRow:
    return {"combiner": HEADLINE, "members": ev.n, **_combiners(ev)[HEADLINE]}  # type: ignore[typeddict-item]


def _curve(ev: Evaluation) -> list[CurvePoint]:
    """The first k members' ensemble for k = 1..N; with eval.uncertainty, the entropy of their
    mixture split into the mean of their entropies (aleatoric) and the rest (epistemic)."""
    n, rows = ev.n, ev.rows
    names = [ev.members[0].name] + [f"first-{k}" for k in range(2, n)] + ([HEADLINE] if n > 1 else [])
    curve: list[CurvePoint] = []
    for k, name in enumerate(names, start=1):
        row = rows[name]
        point: CurvePoint = {
            "k": k,
            "accuracy": row["accuracy"],
            "nll": row["nll"],
            "perplexity": row["perplexity"],
        }
        if ev.cfg.uncertainty:
            total = ev.scorer.sums[ev.scorer.index[name], SUMS.entropy] / ev.tokens_evaluated
            aleatoric = float(np.mean(list(ev.member_entropy.values())[:k]))
            point.update(total=total, aleatoric=aleatoric, epistemic=total - aleatoric)
        curve.append(point)
    return curve


def _diversity(ev: Evaluation) -> Diversity:
    s, n, tokens = ev.scorer, ev.n, ev.tokens_evaluated
    mean_member_nll = float(np.mean([ev.rows[m.name]["nll"] for m in ev.members]))
    pairs = [
        {"members": [ev.members[i].name, ev.members[j].name], "rate": float(s.disagree[q] / tokens)}
        for q, (i, j) in enumerate(s.pairs)
    ]
    return {
        "nll_gap": mean_member_nll - ev.rows[HEADLINE]["nll"],
        "mean_kl_to_mixture": float(s.kl[0] / tokens) if n > 1 else 0.0,
        "disagreement": {
            "pairs": pairs,  # type: ignore[typeddict-item]
            "mean": float(np.mean(s.disagree) / tokens) if s.pairs else 0.0,
        },
    }


def _gain(ev: Evaluation) -> Gain:
    """Ensemble (the headline combiner) minus the best member and minus the average member."""
    if ev.n == 1:
        return {}
    rows, boot = ev.rows, ev.boot
    names = [m.name for m in ev.members]
    ens = rows[HEADLINE]
    best_nll = min(names, key=lambda m: rows[m]["nll"])
    best_acc = max(names, key=lambda m: rows[m]["accuracy"])
    out: Gain = {
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


def _reliability(ev: Evaluation) -> Reliability:
    names = [m.name for m in ev.members] + ([HEADLINE] if ev.n > 1 else [])
    return {"bins": 15, "rows": {name: reliability(ev.scorer.sums[ev.scorer.index[name]]) for name in names}}  # type: ignore[misc]


# --------------------------------------------------------------------------------------------
# Uncertainty (eval.uncertainty)


def _uncertainty(ev: Evaluation) -> Uncertainty:
    member_entropy = ev.member_entropy
    if ev.n > 1:
        means = {name: value / ev.tokens_evaluated for name, value in ev.scorer.decomposition.items()}
    else:  # one member: all of its uncertainty is aleatoric
        (h,) = member_entropy.values()
        means = {"total": h, "aleatoric": h, "epistemic": 0.0, "pairwise_kl": 0.0}
    return {
        "unit": "nats per position",
        "total": means["total"],
        "aleatoric": means["aleatoric"],
        "epistemic": means["epistemic"],
        "expected_pairwise_kl": means["pairwise_kl"],
        "member_entropy": member_entropy,
    }


def _selective(ev: Evaluation) -> Selective:
    s = ev.scorer
    return selective_results(s.selective, s.selective_rows, s.ensemble_row)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# The ensemble in one model: the distilled student, the weight soup


def _student(ev: Evaluation) -> StudentRow:
    path = Path(ev.outputs.student)
    info = read_member_info(path)
    (student,) = load_members([path], ev.device)
    check_same_vocabulary(
        ev.members[0],
        f"the student {path}",
        student.config.vocab_size,
        student.tokenizer,
        fix="distil it from these members",
        against="the members",
    )
    student.name = STUDENT
    teachers = sorted(info.get("teachers", {}).values(), key=str)
    evaluated = sorted((read_member_info(m).get("weights_sha256", {}) for m in ev.member_paths), key=str)
    if teachers and teachers != evaluated:
        logger.warning(
            "the student %s was distilled from other members than those evaluated: the share of the "
            "gain it keeps is relative to these",
            path,
        )
    row = {"path": str(student.path), "seed": student.seed, **_one_model(ev, student)}
    row["distill"] = {**info.get("distill", {}), "teachers": sorted(info.get("teachers", {}))}
    return row  # type: ignore[return-value]


def _soup(ev: Evaluation) -> SoupRow | Skipped | None:
    reason = soup_reason(ev.member_paths)
    if reason:
        logger.info("soup skipped: %s", reason)
        return {"skipped": reason}
    outputs, ref = ev.outputs, ev.members[0]
    soup = make_soup(ev.member_paths)
    if outputs.save_soup and ev.sharding.rank == 0:
        save_soup(Path(outputs.save_soup), soup, ref.tokenizer, ev.member_paths)
    model = LoadedMember(
        Path(outputs.save_soup or SOUP), SOUP, None, ref.tokenizer, soup.config, soup.to(ev.device)
    )
    return {"path": str(model.path), "members": ev.n, **_one_model(ev, model)}  # type: ignore[return-value]


def _one_model(ev: Evaluation, model: LoadedMember) -> dict[str, Any]:
    """One model scored on the same blocks (every process a share of them), bootstrap included:
    its metrics and how much of the ensemble's gain it keeps."""
    one = evaluate_members(
        [model],
        ev.blocks,
        dataclasses.replace(ev.cfg, uncertainty=False),
        ev.device,
        Sharding("data", ev.sharding.rank, ev.sharding.world_size, 1),
        fit=Fitted.none(1),
        show_progress=False,
    )
    row: dict[str, Any] = row_result(one.sums[0])
    if one.bootstrap_samples:
        row["ci95"] = bootstrap_intervals(one, 1)[one.rows[0]]
    if ev.n >= 2:
        row["gain_kept"] = _gain_kept(one, ev.scorer, ev.members, row["nll"])
    return row


def _gain_kept(one: Scorer, scorer: Scorer, members: list[LoadedMember], nll: float) -> GainKept:
    """(mean member NLL - its NLL) / (mean member NLL - ensemble NLL), with a bootstrap interval
    (the replicates weigh the blocks alike in both evaluations: the weights depend on the seed
    and the block only)."""
    n = len(members)
    member_nll = scorer.sums[:n, SUMS.nll] / scorer.sums[:n, SUMS.tokens]
    ens = scorer.index[HEADLINE]
    ensemble_nll = scorer.sums[ens, SUMS.nll] / scorer.sums[ens, SUMS.tokens]
    best = int(np.argmin(member_nll))
    gain = float(member_nll.mean() - ensemble_nll)
    kept: GainKept = {
        "share": float((member_nll.mean() - nll) / gain) if gain > 0 else None,
        "ensemble_gain_nll": gain,
        "nll_vs_mean_member": float(nll - member_nll.mean()),
        "nll_vs_best_member": float(nll - member_nll[best]),
        "perplexity_ratio_vs_best_member": float(np.exp(nll - member_nll[best])),
        "best_member": members[best].name,
        "nll_vs_ensemble": float(nll - ensemble_nll),
    }
    keep = (scorer.boot_tokens > 0) & (one.boot_tokens > 0)
    if one.bootstrap_samples and gain > 0 and keep.any():
        with np.errstate(divide="ignore", invalid="ignore"):
            nlls = scorer.boot[keep][:, :, BOOT.nll] / scorer.boot_tokens[keep, None]
            own = one.boot[keep][:, 0, BOOT.nll] / one.boot_tokens[keep]
            mean_member = nlls[:, :n].mean(axis=1)
            share = (mean_member - own) / (mean_member - nlls[:, ens])
        kept["ci95"] = percentile_interval(share[np.isfinite(share)])
        kept["nll_vs_ensemble_ci95"] = percentile_interval(own - nlls[:, ens])
    return kept


# --------------------------------------------------------------------------------------------
# Out-of-domain detection (--ood) and the per-token export (--tokens-out, --html)


def _out_of_domain(ev: Evaluation) -> OutOfDomain:
    """Each file's blocks scored like the evaluated split's (same members, temperatures and
    weights), then told apart from them."""

    def scores(s: Scorer) -> dict[str, dict[str, np.ndarray]]:
        return block_scores(s.blocks, s.blocks_tokens, s.blocks_epistemic, s.selective_rows, s.ensemble_row)

    def scored_blocks(s: Scorer) -> int:  # blocks with a predicted position (the scored ones)
        return int(np.count_nonzero(s.blocks_tokens))

    in_domain = scores(ev.scorer)
    fitted = Fitted(np.array([m.temperature for m in ev.members]), ev.scorer.weights)
    cfg = dataclasses.replace(ev.cfg, bootstrap_samples=0)
    sets = []
    for path in ev.outputs.ood:
        blocks = _ood_blocks(ev, path)
        ood = evaluate_members(
            ev.members, blocks, cfg, ev.device, ev.sharding, fit=fitted, collect=Collect(blocks=True)
        )
        sets.append(
            {
                "path": str(path),
                "blocks": scored_blocks(ood),
                "tokens_evaluated": ood.tokens,
                "rows": detection(in_domain, scores(ood)),
            }
        )
    return {
        "in_domain": {"blocks": scored_blocks(ev.scorer), "split": ev.split},
        "tpr": TPR,
        "scores": {name: s.label for name, s in BLOCK_SCORES.items()},
        "sets": sets,  # type: ignore[typeddict-item]
    }


def _ood_blocks(ev: Evaluation, path: Path) -> Any:
    """The blocks of one out-of-domain file, tokenized like the evaluated data."""
    file_cfg = dataclasses.replace(
        ev.data_cfg,
        dataset=None,
        dataset_config=None,
        text_column=None,
        text_template=None,
        train_files=[],
        validation_files=[],
        test_files=[str(path)],
    )
    try:
        blocks = ev.load(file_cfg, "test").eval_blocks("test")
    except EnsembleError as e:
        raise EnsembleError(f"--ood {path}: {e}") from None
    logger.info("out-of-domain set %s: %d blocks", path, len(blocks))
    return blocks


def _first_writes(ev: Evaluation) -> bool:
    return ev.sharding.rank == 0 and ev.tokens is not None


def _html(ev: Evaluation) -> str:
    """The HTML view, made from the per-token export (the first process assembles the parts)."""
    tokens_path = ev.tokens_file
    write_html(
        tokens_path,
        ev.outputs.html,
        ev.outputs.html_tokens,
        title=f"{ev.split} split: where the members disagree",
    )
    if not ev.outputs.tokens_out:
        tokens_path.unlink()  # the temporary export the page was made from
    return str(ev.outputs.html)


def _tokens_out(ev: Evaluation) -> str:
    return str(ev.tokens_file)


SECTIONS: dict[str, Section] = {
    "split": Section(lambda ev: ev.split),
    "data": Section(_data),
    "evaluation": Section(_evaluation),
    "members": Section(_members),
    "ensemble": Section(_ensemble),
    "combiners": Section(_combiners),
    "curve": Section(_curve),
    "diversity": Section(_diversity),
    "gain": Section(_gain),
    "uncertainty": Section(_uncertainty, lambda ev: ev.cfg.uncertainty),
    "selective": Section(_selective, lambda ev: ev.cfg.uncertainty),
    "reliability": Section(_reliability),
    STUDENT: Section(_student, lambda ev: ev.outputs.student is not None),
    SOUP: Section(_soup, lambda ev: ev.cfg.soup or ev.outputs.save_soup is not None),
    "ood": Section(_out_of_domain, lambda ev: bool(ev.outputs.ood)),
    "html": Section(_html, lambda ev: _first_writes(ev) and ev.outputs.html is not None),
    "tokens_out": Section(_tokens_out, lambda ev: _first_writes(ev) and ev.outputs.tokens_out is not None),
}
"""results.json's top-level keys after ``schema_version`` and ``created``, in order."""
