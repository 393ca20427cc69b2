"""Resuming and sharing a run directory: the checks on output.dir, which members this launch
trains, and where each unfinished member starts (a `ResumePlan`). Every mismatch is a one-line
error before any work starts."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ensemble.config.loading import config_from_dict
from ensemble.config.schema import ExperimentConfig
from ensemble.core.members import MemberSpec, find_members, is_complete_member, read_member_info
from ensemble.core.paths import RunPaths
from ensemble.errors import EnsembleError
from ensemble.files import tmp_name
from ensemble.runtime.checkpointing import (
    MemberCheckpoints,
    check_resumable,
    checkpoints_root,
    config_differences,
    read_checkpoint_info,
    trajectory_config,
)

logger = logging.getLogger(__name__)


def check_output_dir(paths: RunPaths, overwrite: bool, resume: str | None = None) -> None:
    """The output directory must be writable and must not hold a run we would clobber (unless
    we were asked to replace it, or to resume it)."""
    root = paths.root
    if resume and overwrite:
        raise EnsembleError(
            "--resume continues the run in output.dir but output.overwrite=true would replace it; drop one"
        )
    # Probe without creating output.dir (the run creates it once its data is read, so a bad data
    # file leaves nothing behind): a file in it if it exists, else a directory of this process's
    # own name in the nearest existing parent (every rank probes at once; names never collide).
    existing_dir = next(d for d in (root, *root.parents) if d.exists())
    try:
        probe = tmp_name(existing_dir / "write-probe")
        if existing_dir == root:
            probe.write_text("")
            probe.unlink()
        else:
            probe.mkdir()
            probe.rmdir()
    except OSError as e:
        raise EnsembleError(
            f"output.dir '{root}' is not writable ({e.strerror or e}); choose a writable output.dir"
        ) from None
    existing = [p for p in (paths.manifest, paths.results_json) if p.exists()] + find_members(root)
    if existing and not overwrite and not resume:
        raise EnsembleError(
            f"output.dir '{root}' already holds a run ({existing[0].relative_to(root)}); pass --resume "
            "auto to continue it, choose another output.dir, or pass output.overwrite=true to replace it"
        )


def clear_previous_run(paths: RunPaths, checkpoints: Path) -> None:
    """With output.overwrite: remove the old run first, so no stale member, result or checkpoint
    can be mistaken for part of the new one."""
    for path in (
        paths.manifest,
        paths.results_json,
        paths.results_md,
        paths.config,
        paths.run_id,
    ):
        path.unlink(missing_ok=True)
    # (the run's distilled student too: it was distilled from the members being replaced)
    for path in (paths.members, paths.logs, checkpoints, paths.student):
        shutil.rmtree(path, ignore_errors=True)


def select_members(specs: list[MemberSpec], only: list[int] | None) -> list[MemberSpec]:
    """The members this launch trains: all, or those whose indices ``only`` lists."""
    if only is None:
        return specs
    wrong = sorted({i for i in only if not 0 <= i < len(specs)})
    if wrong:
        raise EnsembleError(
            f"--member {', '.join(map(str, wrong))}: the config has {len(specs)} members (indices 0 to "
            f"{len(specs) - 1}, see --list-members); pass one of those, or add seeds to members.seeds"
        )
    chosen = set(only)
    return [s for s in specs if s.index in chosen]


@dataclass
class ResumePlan:
    """Which members to skip (complete) and which checkpoint each other member starts from."""

    complete: set[int] = field(default_factory=set)
    start: dict[int, Path] = field(default_factory=dict)
    explicit: int | None = None  # the member of `--resume PATH`


def plan_resume(
    cfg: ExperimentConfig,
    paths: RunPaths,
    specs: list[MemberSpec],
    resume: str | None,
    processes: int,
    selected: list[MemberSpec] | None = None,
) -> ResumePlan:
    """Check that the run in output.dir is this experiment and find where each member resumes;
    every mismatch is a one-line error before any work. ``selected``: the members this launch
    trains (default all); the checkpoints of the others are not looked at, as other launches may
    be writing them."""
    selected = specs if selected is None else selected
    plan = ResumePlan()
    if resume is None:
        return plan
    if paths.config.is_file():
        saved = config_from_dict(yaml.safe_load(paths.config.read_text()) or {})
        changed = config_differences(trajectory_config(saved, 0), trajectory_config(cfg, 0))
        if changed:
            raise EnsembleError(
                f"output.dir '{paths.root}' holds a run trained with a different config ({changed}); "
                "resume with its config.yaml, or train into a new output.dir"
            )
    for spec in specs:
        if is_complete_member(paths.member(spec)):
            seed = read_member_info(paths.member(spec)).get("seed")
            if seed != spec.seed:
                raise EnsembleError(
                    f"{spec.name} in '{paths.root}' was trained with seed {seed} but the config gives it "
                    f"seed {spec.seed}; keep members.seeds as they were (append new seeds at the end)"
                )
            plan.complete.add(spec.index)
    if resume != "auto":
        path = Path(resume)
        info = read_checkpoint_info(path)
        index = info.get("index")
        if not isinstance(index, int) or index >= len(specs) or specs[index].name != info.get("member"):
            raise EnsembleError(
                f"checkpoint {path} is of {info.get('member')}, which this config does not have "
                f"({len(specs)} members); pass a checkpoint of one of its members"
            )
        if specs[index] not in selected:
            raise EnsembleError(
                f"checkpoint {path} is of {specs[index].name}, which --member does not select; "
                f"add --member {index}"
            )
        if index in plan.complete:
            logger.warning(
                "%s is complete; it is trained again from %s and replaced", specs[index].name, path
            )
            plan.complete.discard(index)
        plan.explicit, plan.start[index] = index, path
    root = checkpoints_root(cfg)
    for spec in selected:
        if spec.index in plan.complete:
            continue
        start = plan.start.get(spec.index) or MemberCheckpoints(root, spec.name).latest()
        if start is not None:
            check_resumable(start, read_checkpoint_info(start), cfg, spec.name, spec.seed, processes)
            plan.start[spec.index] = start
    return plan
