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
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ensemble.config.schema import DataConfig, EvalConfig
from ensemble.core.architecture import context_length
from ensemble.core.combining import needs_fitting
from ensemble.core.data import EvalBlocks, PreparedData, prepare_data
from ensemble.core.loading import LoadedMember, load_members
from ensemble.core.results import Results
from ensemble.core.soup import soup_reason
from ensemble.errors import EnsembleError
from ensemble.evaluate.context import EvalOutputs, Evaluation
from ensemble.evaluate.report import format_table, write_plots, write_results
from ensemble.evaluate.sections import build_results
from ensemble.evaluate.stream import Collect, evaluate_members
from ensemble.evaluate.token_export import TokenWriter
from ensemble.runtime.distributed import local_device
from ensemble.runtime.handoff import Trained
from ensemble.runtime.sharding import Sharding

logger = logging.getLogger(__name__)

MainFirst = Callable[[str], contextlib.AbstractContextManager]


def evaluate_trained(trained: Trained) -> Results:
    """The evaluation of a run right after its training (or distillation) stage, in the same
    processes (an :data:`~ensemble.runtime.handoff.AfterTraining`): the split ``eval.split``,
    the results in ``output.dir``."""
    cfg = trained.cfg
    return evaluate(
        trained.members,
        EvalData(cfg.data, cfg.eval.split, prepared=trained.data),
        cfg.eval,
        Path(cfg.output.dir),
        local_device(),
        main_first=trained.main_first,
        outputs=EvalOutputs(student=trained.student),
    )


@dataclass(frozen=True)
class EvalData:
    """The data an evaluation reads."""

    cfg: DataConfig
    split: str
    """The split evaluated."""
    prepared: PreparedData | None = None
    """The data already tokenized (by training, in the same processes), reused when it has ``split``."""
    fit_cfg: DataConfig | None = None
    """Where the validation split fits use comes from (default: ``cfg``; a run's own data when
    evaluating on other files)."""


def evaluate(
    member_paths: list[Path],
    data: EvalData,
    eval_cfg: EvalConfig,
    out_dir: Path,
    device: torch.device | str,
    *,
    main_first: MainFirst | None = None,
    outputs: EvalOutputs | None = None,
) -> Results:
    """Evaluate members and their ensemble on a split, across all processes of the current
    world; the first process writes and prints the results. ``outputs``: the student, soup,
    out-of-domain sets and per-token files asked for."""
    outputs = outputs or EvalOutputs()
    data_cfg, split, prepared = data.cfg, data.split, data.prepared
    _check_outputs(outputs, eval_cfg, member_paths)
    sharding = Sharding(eval_cfg.mode, *_rank_and_world(), len(member_paths))
    members = load_members(member_paths, device, hold=sharding.members_held)
    block_size = data_cfg.block_size or min(context_length(m.config) for m in members)

    def load(cfg: DataConfig, which: str) -> PreparedData:
        # one process fills the datasets cache, the others then read it
        with (main_first or _barrier_main_first)(f"eval-data-{which}"):
            return prepare_data(cfg, members[0].tokenizer, block_size, splits=(which,))

    if prepared is None or split not in prepared.streams:
        prepared = load(data_cfg, split)
    blocks = prepared.eval_blocks(split)
    fit_blocks = _fit_blocks(prepared, data, eval_cfg, len(members), load)
    writer = _token_writer(outputs, members, sharding)
    scorer = evaluate_members(
        members,
        blocks,
        eval_cfg,
        device,
        sharding,
        fit_blocks,
        Collect(blocks=bool(outputs.ood), tokens=writer),
    )
    fingerprint = prepared.fingerprint
    data_info = {"source": fingerprint["source"], **fingerprint["splits"][split]}
    ev = Evaluation(
        members,
        scorer,
        eval_cfg,
        split,
        blocks,
        data_info,
        sharding,
        torch.device(device),
        outputs,
        data_cfg,
        load,
        writer,
    )
    results = build_results(ev)
    if sharding.rank == 0:
        _write(results, out_dir, eval_cfg.plots)
    return results


def _check_outputs(outputs: EvalOutputs, cfg: EvalConfig, member_paths: list[Path]) -> None:
    """What was asked for can be done: before any model is loaded."""
    if outputs.requested and not cfg.uncertainty:
        raise EnsembleError("--ood, --tokens-out and --html need eval.uncertainty=true; remove that override")
    if outputs.save_soup and (reason := soup_reason(member_paths)):
        raise EnsembleError(f"--save-soup: the members cannot be souped: {reason}")


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    return (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)


def _fit_blocks(
    prepared: PreparedData,
    data: EvalData,
    cfg: EvalConfig,
    n: int,
    load: Callable[[DataConfig, str], PreparedData],
) -> EvalBlocks | None:
    """The validation blocks temperatures and weights are fitted on (None when nothing is)."""
    if not (cfg.temperature_scaling or needs_fitting(cfg.combiners, n)):
        return None
    source = data.fit_cfg or data.cfg
    if source is data.cfg and cfg.fit_split in prepared.streams:
        return prepared.eval_blocks(cfg.fit_split)
    return load(source, cfg.fit_split).eval_blocks(cfg.fit_split)


def _token_writer(
    outputs: EvalOutputs, members: list[LoadedMember], sharding: Sharding
) -> TokenWriter | None:
    """This process's writer of the per-token export, when one is asked for and it accumulates."""
    path = outputs.tokens_path
    if path is None or not sharding.accumulates:
        return None
    ref = members[0]
    return TokenWriter(
        path,
        [m.name for m in members],
        ref.tokenizer,
        ref.config.vocab_size,
        sharding.column,
        sharding.group_size,
    )


def _write(results: Results, out_dir: Path, plots: bool) -> None:
    json_path, _ = write_results(results, out_dir)
    if plots:
        write_plots(results, out_dir)
    print(format_table(results), flush=True)
    logger.info("results written to %s", json_path)


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
