"""The `launch/distill.py` command line (and `ensemble-distill`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from ensemble.cli.common import (
    add_processes_option,
    command_parser,
    exit_statuses,
    exit_with,
    guarded,
    relaunched,
    setup_logging,
)
from ensemble.config.docs import describe
from ensemble.core.paths import RunPaths, run_config
from ensemble.errors import ConfigError


def distill_parser() -> argparse.ArgumentParser:
    p = command_parser(
        "launch/distill.py",
        "Distil a run's finished members into one student, then evaluate it with them.\n\n"
        + exit_statuses("a checkpoint"),
        [
            "python launch/distill.py runs/tiny",
            "accelerate launch --config_file configs/accelerate/cpu.yaml launch/distill.py runs/tiny",
            "python launch/distill.py runs/tiny distill.alpha=0.5 distill.config='{n_layer: 1}'",
        ],
        "overrides: the run's config.yaml applies; distill.*, train.* (the student's budget; default:\n"
        "the members'), eval.*, checkpoint.* and tracking.* may be overridden.\n\n"
        "Config keys (defaults):\n" + describe(),
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the output.dir of a training run")
    p.add_argument(
        "--resume", metavar="auto", help="continue an interrupted distillation from its latest checkpoint"
    )
    p.add_argument("--overwrite", action="store_true", help="replace the run's student and its checkpoints")
    p.add_argument("--no-eval", action="store_true", help="do not evaluate the student with the members")
    add_processes_option(p)
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    return p


# The config sections a distillation may override: the members' model and data are the run's.
DISTILL_SECTIONS = ("distill", "train", "eval", "checkpoint", "tracking")


@guarded
def distill_main(argv: Sequence[str] | None = None) -> int | None:
    args = distill_parser().parse_intermixed_args(argv)
    for item in args.overrides:
        if not item.split("=", 1)[0].startswith(tuple(f"{s}." for s in DISTILL_SECTIONS)):
            raise ConfigError(
                f"override {item!r}: distillation takes {', '.join(f'{s}.*' for s in DISTILL_SECTIONS)} "
                "overrides (the members' model and data are the run's)"
            )
    run_config(
        RunPaths(Path(args.run_dir)), args.overrides
    )  # a typo or a wrong path: said before torch loads
    if (status := relaunched(args, argv, distill_entry)) is not None:
        return status
    setup_logging()
    from ensemble.distill.run import distill_run
    from ensemble.evaluate.evaluator import evaluate_trained

    then = None if args.no_eval else evaluate_trained
    distill_run(args.run_dir, args.overrides, args.resume, args.overwrite, then=then)


def distill_entry() -> NoReturn:
    """`launch/distill.py` and the `ensemble-distill` command."""
    exit_with(distill_main())
