"""A training run: check everything, prepare the data once, train every member on its group of
ranks, then hand the members to what follows (the evaluation). :func:`train_run` lists the steps; each step is a function below.

Which members a process trains is decided here (a :class:`~ensemble.runtime.placement.Placement`); how one member
trains is :mod:`ensemble.runtime.trainer`'s business, and where a resumed member starts is
:mod:`.resume`'s.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ensemble.config.schema import ExperimentConfig
from ensemble.core.adapters import BaseCache, base_record, check_adapter, check_base
from ensemble.core.architecture import count_parameters, resolve_block_size
from ensemble.core.data import PreparedData, iter_texts, load_splits, prepare_data
from ensemble.core.members import (
    MemberSpec,
    fit_model_config,
    is_complete_member,
    load_model_config,
    member_specs,
    read_manifest,
    write_manifest,
)
from ensemble.core.paths import RunPaths
from ensemble.core.tokenization import load_pretrained_tokenizer, load_tokenizer, needs_training_text
from ensemble.errors import EnsembleError, Preempted
from ensemble.files import atomic_write_text, create_once, remove_stale_tmp
from ensemble.runtime.checkpointing import (
    MemberCheckpoints,
    StopRequest,
    check_training_data,
    checkpoints_root,
    read_checkpoint_info,
)
from ensemble.runtime.compute import resolve_compile, resolve_mixed_precision
from ensemble.runtime.distributed import Worlds, local_device, state_kwargs
from ensemble.runtime.handoff import AfterTraining, Trained
from ensemble.runtime.launch_env import launch_info
from ensemble.runtime.placement import Placement, device_memory_bytes, estimate_bytes_per_device, plan_layout
from ensemble.runtime.throughput import flops_per_token
from ensemble.runtime.trainer import MemberDiverged, MemberJob, train_member
from ensemble.runtime.zero import ZeroSetup, check_batch, deepspeed_setup
from ensemble.train.resume import (
    ResumePlan,
    check_output_dir,
    clear_previous_run,
    plan_resume,
    select_members,
)

logger = logging.getLogger(__name__)


def train_run(
    cfg: ExperimentConfig,
    resume: str | None = None,
    only: list[int] | None = None,
    then: AfterTraining | None = None,
) -> dict[str, Any] | None:
    """Train the ensemble's members and evaluate it. ``resume``: None (a new run), "auto"
    (continue every unfinished member from its latest checkpoint, skip finished ones) or the path
    of one member's checkpoint.

    ``only``: train just these member indices into the shared run (e.g. one per task of a Slurm
    array, several launches at once); the ensemble is then not evaluated here, since the other
    members may still be training. ``then``: what runs next in the same processes (the
    evaluation, see :mod:`ensemble.runtime.handoff`); without it evaluation is left to
    launch/evaluate.py. Returns its results, or None when not evaluated."""
    zero = deepspeed_setup(cfg)
    worlds = Worlds(cfg.parallel.timeout_s)
    try:
        worlds.join("run", launch_info().rank, launch_info().world_size)
        setup = check_run(cfg, zero, resume, only)  # every cheap check, before any data
        base = base_record(cfg.model.name_or_path) if cfg.adapter.method else None
        tokenizer, data = prepare_run_data(cfg, setup, worlds, resume)
        for start in setup.plan.start.values():
            info = read_checkpoint_info(start)
            check_training_data(start, info, data.fingerprint["splits"]["train"]["sha256"])
            if base:
                check_base(f"checkpoint {start}", info.get("base"), base, "resume on that base")
        model_config = fit_model_config(cfg.model, setup.base_config, tokenizer)
        flops = flops_per_token(model_config, setup.block_size)  # before any DeepSpeed plugin exists
        run_info = prepare_output_dir(cfg, setup, data, resume, only)
        bases = BaseCache() if base and zero is None else None  # (DeepSpeed casts and shards its model)
        jobs = [
            MemberJob(
                cfg,
                spec,
                data,
                tokenizer,
                model_config,
                setup.paths,
                flops_per_token=flops,
                compile_model=setup.compile_model,
                zero=zero,
                run_id=run_info["run_id"],
                resume_from=setup.plan.start.get(spec.index),
                record={"base": base} if base else {},
                bases=bases,
            )
            for spec in setup.selected
        ]
        run_info["timing"] = {"train_seconds": train_members(setup, jobs, worlds)}
        record_failures(setup, data, run_info)
        results = None
        if only is not None or then is None:
            _log_pending(setup)
        else:  # every process takes part: the evaluator shards the test batches over the run's world
            results = then(
                Trained(cfg, [setup.paths.member(s) for s in setup.specs], data, worlds.main_first)
            )
        worlds.wait_all("finished")  # the ranks leave together (see Worlds.close)
        return results
    finally:
        worlds.close()


# --------------------------------------------------------------------------------------------
# Checks that run before any work


@dataclass(frozen=True)
class RunSetup:
    """What the checks decided: the members, their layout on the ranks, where each resumes."""

    paths: RunPaths
    checkpoints: Path  # the root of the members' checkpoint folders
    specs: list[MemberSpec]  # every member of the run
    selected: list[MemberSpec]  # those this launch trains
    base_config: Any  # the model's config before its vocabulary is fitted to the tokenizer
    block_size: int
    layout: Placement
    plan: ResumePlan
    compile_model: bool
    zero: ZeroSetup | None


def check_run(
    cfg: ExperimentConfig, zero: ZeroSetup | None, resume: str | None, only: list[int] | None
) -> RunSetup:
    """Cheap checks first: a mistake should cost seconds, not a dataset download."""
    launch = launch_info()
    paths = RunPaths(Path(cfg.output.dir))
    specs = member_specs(cfg)
    selected = select_members(specs, only)
    if only is not None and cfg.output.overwrite:
        raise EnsembleError(
            "--member trains into a run shared with other launches, which output.overwrite=true would "
            "remove; drop output.overwrite (pass --resume auto) or train all members"
        )
    check_output_dir(paths, cfg.output.overwrite, resume)
    base_config = load_model_config(cfg.model)
    if cfg.adapter.method:
        check_adapter(cfg.adapter, base_config)
    block_size = resolve_block_size(cfg, base_config)
    layout = plan_layout(
        cfg.parallel,
        launch.world_size,
        len(selected),
        launch.local_world_size,
        fits=_member_fits(cfg, base_config, block_size, zero),
    )
    if zero:
        check_batch(zero, cfg, layout.group_size)
    plan = plan_resume(cfg, paths, specs, resume, layout.group_size, selected)
    return RunSetup(
        paths,
        checkpoints_root(cfg),
        specs,
        selected,
        base_config,
        block_size,
        layout,
        plan,
        _compile_decision(cfg, zero),
        zero,
    )


def _member_fits(cfg: ExperimentConfig, model_config: Any, block_size: int, zero: ZeroSetup | None):
    """For placement=auto: does one member fit the devices of a group of k ranks?"""
    launch = launch_info()

    def fits(group_size: int) -> bool:
        need = estimate_bytes_per_device(
            model_config,
            count_parameters(model_config),
            cfg.train.per_device_batch_size,
            block_size,
            group_size,
            zero.stage if zero else 0,
            resolve_mixed_precision(cfg.train.mixed_precision) != "no",
        )
        have, what = device_memory_bytes(launch.local_world_size)
        logger.info(
            "placement auto: a member needs ~%.2f GiB per device in groups of %d; %.2f GiB available (%s)",
            need / 2**30,
            group_size,
            have / 2**30,
            what,
        )
        return need <= have

    return fits


def _compile_decision(cfg: ExperimentConfig, zero: ZeroSetup | None) -> bool:
    if cfg.train.compile == "auto" and zero and zero.stage == 3:
        # ZeRO-3's parameter-gathering hooks make dynamo recompile every step until it gives up
        # (and falls back to eager) after its recompile limit: nothing to gain by default.
        logger.info("train.compile=auto: off under ZeRO-3 (set train.compile=true to force it)")
        return False
    return resolve_compile(cfg.train.compile, local_device(), "train.compile")


# --------------------------------------------------------------------------------------------
# Data and the output directory


def prepare_run_data(
    cfg: ExperimentConfig, setup: RunSetup, worlds: Worlds, resume: str | None
) -> tuple[Any, PreparedData]:
    """(tokenizer, tokenized splits), read once: rank 0 fills the datasets cache (and trains a
    `bpe` tokenizer) while the others wait, then they read what it wrote."""
    rank, paths = launch_info().rank, setup.paths
    if not needs_training_text(cfg.model):
        tokenizer = load_tokenizer(cfg.model)
    with worlds.main_first("data"):
        raw = load_splits(cfg.data)
        if needs_training_text(cfg.model):
            if "train" not in raw:
                raise EnsembleError("model.tokenizer=bpe needs a training split to learn from")
            if rank == 0 and not (resume and paths.tokenizer.is_dir()):
                # On a resume (e.g. the tasks of a Slurm array starting together) the first
                # tokenizer published is the run's; a new run replaces any old one.
                tokenizer = load_tokenizer(
                    cfg.model, iter_texts(raw["train"], cfg.data), paths.tokenizer, replace=not resume
                )
            else:  # the run's tokenizer, never one trained separately
                tokenizer = load_pretrained_tokenizer(paths.tokenizer)
        data = prepare_data(cfg.data, tokenizer, setup.block_size, raw=raw)
    return tokenizer, data


def prepare_output_dir(
    cfg: ExperimentConfig, setup: RunSetup, data: PreparedData, resume: str | None, only: list[int] | None
) -> dict[str, Any]:
    """Rank 0 clears what must go (an overwritten run, interrupted saves, checkpoints later than
    an explicit resume point), then writes the config, the run id and the manifest. Returns the
    manifest's run information (layout, run id), the same on every rank."""
    from accelerate import PartialState

    paths, specs, plan = setup.paths, setup.specs, setup.plan
    run_info: dict[str, Any] = {"layout": setup.layout.summary()}
    ckpt_root = setup.checkpoints
    if launch_info().rank == 0:
        for line in setup.layout.describe([s.name for s in setup.selected]):
            logger.info(line)
        previous = read_manifest(paths) if resume else {}
        if cfg.output.overwrite:
            clear_previous_run(paths, ckpt_root)
        paths.members.mkdir(parents=True, exist_ok=True)
        if only is None:
            remove_stale_tmp(paths.members)
            remove_stale_tmp(paths.root)
        else:  # the other members' temporaries may be live: other launches are writing them
            remove_stale_tmp(paths.members, [s.name for s in setup.selected])
        for spec in setup.selected:
            member_ckpts = MemberCheckpoints(ckpt_root, spec.name)
            remove_stale_tmp(member_ckpts.dir)  # interrupted checkpoint saves
            if spec.index not in plan.complete:
                member_ckpts.clear_failure()
        if plan.explicit is not None:
            start = plan.start[plan.explicit]
            dropped = MemberCheckpoints(ckpt_root, specs[plan.explicit].name).drop_after(
                read_checkpoint_info(start)["step"]  # its record, not its folder name: it may be a copy
            )
            if dropped:
                logger.warning(
                    "removed %s: later than the checkpoint resumed from", ", ".join(map(str, dropped))
                )
        # Launches that share the run (--member) may start together: the first id written wins.
        run_info["run_id"] = create_once(paths.run_id, previous.get("run_id") or uuid.uuid4().hex[:12])
        atomic_write_text(paths.config, cfg.to_yaml())
        write_manifest(paths, specs, data.fingerprint, run_info)
    PartialState(
        **state_kwargs(deepspeed=setup.zero is not None, timeout_s=cfg.parallel.timeout_s)
    ).wait_for_everyone()
    run_info["run_id"] = read_manifest(paths)["run_id"]  # rank 0's, on every rank
    return run_info


# --------------------------------------------------------------------------------------------
# Training the members


def train_members(setup: RunSetup, jobs: list[MemberJob], worlds: Worlds) -> float:
    """Join this rank's group and train the group's members in turn, honouring stop signals
    between and inside members. A member that diverges is recorded and skipped; the others go
    on. Returns the seconds spent."""
    launch, layout = launch_info(), setup.layout
    group = layout.group_of(launch.rank)
    if layout.num_groups > 1:
        worlds.join(f"group-{group}", layout.rank_in_group(launch.rank), layout.group_size)
    # INFO from each group's first rank (its member's progress), warnings from every rank.
    logging.getLogger().setLevel(logging.INFO if layout.rank_in_group(launch.rank) == 0 else logging.WARNING)
    started = time.perf_counter()
    device = local_device()
    with StopRequest(publish=worlds.publish_stop, seen=worlds.stop_published) as stop:
        for index in layout.members_of(group):
            job = jobs[index]
            if job.spec.index in setup.plan.complete:
                logger.info("%s is complete: skipped", job.name)
                continue
            if stop.agreed(device):
                raise Preempted(f"stopped by {stop.reason()} before {job.name} started")
            try:
                train_member(job, stop)
            except MemberDiverged as e:
                # That member stops; the group goes on with its other members.
                logger.error("%s", e)
                if layout.rank_in_group(launch.rank) == 0:
                    MemberCheckpoints(setup.checkpoints, job.name).record_failure({**e.info, "error": str(e)})
        worlds.wait_all("training", stop=stop)  # groups finish at different times (rounds, member sizes)
        if layout.num_groups > 1:
            worlds.join("evaluate", launch.rank, launch.world_size)
        if stop.agreed(device):
            raise Preempted(f"stopped by {stop.reason()} after training; the evaluation did not run")
    logging.getLogger().setLevel(logging.INFO if launch.rank == 0 else logging.WARNING)
    return round(time.perf_counter() - started, 3)


def record_failures(setup: RunSetup, data: PreparedData, run_info: dict[str, Any]) -> None:
    """Every member's failure goes into the manifest; this launch fails on its own members' only."""
    paths, specs = setup.paths, setup.specs
    failed = {s.name: f for s in specs if (f := MemberCheckpoints(setup.checkpoints, s.name).failure())}
    failures = [failed[s.name] for s in setup.selected if s.name in failed]
    if launch_info().rank == 0:
        write_manifest(paths, specs, data.fingerprint, run_info, failed=set(failed))
    if failures:
        kept = [s.name for s in specs if is_complete_member(paths.member(s))]
        raise EnsembleError(
            " | ".join(f["error"] for f in failures)
            + f" | kept: {', '.join(kept) or 'no member'} (complete); the ensemble was not evaluated"
        )


def _log_pending(setup: RunSetup) -> None:
    pending = [s.name for s in setup.specs if not is_complete_member(setup.paths.member(s))]
    logger.info(
        "%s done; the ensemble is not evaluated here: %s",
        ", ".join(s.name for s in setup.selected),
        f"waiting for {', '.join(pending)}"
        if pending
        else f"every member is complete, run `python launch/evaluate.py {setup.paths.root}`",
    )
