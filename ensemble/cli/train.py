"""The `launch/train.py` command line (and `ensemble-train`)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from typing import NoReturn

import yaml

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
from ensemble.config.loading import load_config
from ensemble.config.schema import ExperimentConfig
from ensemble.errors import ConfigError


def train_parser() -> argparse.ArgumentParser:
    p = command_parser(
        "launch/train.py",
        "Train seeded members and evaluate their ensemble.\n\n"
        + exit_statuses("checkpoints", "; Ctrl-C twice stops at once"),
        notes="overrides: dotted section.key=value pairs, values parsed as YAML.\n\n"
        "Config keys (defaults):\n" + describe(),
    )
    p.add_argument("--config", help="YAML experiment config (see configs/)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument(
        "--resume",
        metavar="auto|CHECKPOINT",
        help="continue the run in output.dir: `auto` resumes every unfinished member from its latest "
        "checkpoint and skips finished ones; a checkpoint folder (checkpoints/member-<i>/step-<N>) "
        "resumes that member from it, the others as with auto",
    )
    p.add_argument(
        "--member",
        type=int,
        action="append",
        metavar="INDEX",
        help="train only the member with this index (repeatable) into output.dir, beside other "
        "launches training the others (a Slurm array: one task per member); implies no evaluation",
    )
    p.add_argument(
        "--no-eval",
        action="store_true",
        help="do not evaluate the ensemble after training (run launch/evaluate.py on output.dir later)",
    )
    p.add_argument(
        "--list-members", action="store_true", help="print `index seed name` of each member and exit"
    )
    p.add_argument(
        "--get", metavar="SECTION.KEY", help="print one resolved config value (e.g. output.dir) and exit"
    )
    add_processes_option(p)
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    return p


def config_value(cfg: ExperimentConfig, key: str) -> str:
    """A resolved config value as text: strings as they are, anything else as YAML."""
    node: object = cfg
    for part in key.split("."):
        if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
            raise ConfigError(f"--get {key}: no such config key; see --help for the keys")
        node = getattr(node, part)
    if dataclasses.is_dataclass(node):
        return yaml.safe_dump(dataclasses.asdict(node), sort_keys=False).rstrip()
    if isinstance(node, str):
        return node
    return yaml.safe_dump(node, default_flow_style=True).strip().removesuffix("...").strip()


@guarded
def train_main(argv: Sequence[str] | None = None) -> int | None:
    args = train_parser().parse_intermixed_args(argv)  # flags may follow the overrides
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return
    if args.get:
        print(config_value(cfg, args.get))
        return
    if args.list_members:
        from ensemble.core.members import member_specs

        for spec in member_specs(cfg):
            # one write per line: under a launcher every rank prints into the same pipe, and
            # print() writes each field apart, so unbuffered lines of two ranks interleave
            sys.stdout.write(f"{spec.index} {spec.seed} {spec.name}\n")
        return
    if (status := relaunched(args, argv, train_entry)) is not None:
        return status
    setup_logging()
    from ensemble.evaluate.evaluator import evaluate_trained
    from ensemble.train.run import train_run

    then = None if args.no_eval else evaluate_trained
    train_run(cfg, resume=args.resume, only=args.member, then=then)


def train_entry() -> NoReturn:
    """`launch/train.py` and the `ensemble-train` command."""
    exit_with(train_main())
