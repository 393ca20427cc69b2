"""The `launch/evaluate.py` command line (and `ensemble-evaluate`)."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import yaml

from ensemble.cli.common import (
    add_processes_option,
    command_parser,
    exit_with,
    guarded,
    relaunched,
    run_or_members,
    setup_logging,
)
from ensemble.config.loading import apply_override, config_from_dict
from ensemble.config.schema import ExperimentConfig
from ensemble.core.paths import CONFIG, RunPaths, check_run_dir
from ensemble.errors import ConfigError, EnsembleError


def _add_output_options(p: argparse.ArgumentParser) -> None:
    """What an evaluation adds on request (ensemble/evaluate/context.py's EvalOutputs)."""
    g = p.add_argument_group("outputs on request")
    g.add_argument(
        "--ood",
        nargs="+",
        metavar="FILE",
        default=[],
        help="out-of-domain text file(s): their blocks are told apart from the split's by each "
        "uncertainty score (AUROC, FPR at 95%% TPR) in results.json and ood.png",
    )
    g.add_argument(
        "--tokens-out",
        metavar="FILE",
        help="write every predicted token (its probability under each member and the ensemble, "
        "entropy, mutual information) to this Parquet file, streamed",
    )
    g.add_argument(
        "--html",
        metavar="FILE",
        help="write a page showing the split's first tokens shaded by the members' disagreement",
    )
    g.add_argument(
        "--html-tokens", type=int, default=2000, metavar="N", help="tokens on the --html page (2000)"
    )
    g.add_argument(
        "--student",
        metavar="DIR",
        help="a distilled student to evaluate beside the members (default: RUN_DIR/student, when "
        "launch/distill.py wrote one)",
    )
    g.add_argument("--no-student", action="store_true", help="do not evaluate the run's student")
    g.add_argument(
        "--save-soup",
        metavar="DIR",
        help="save the uniform average of the members' weights in Hugging Face format (members "
        "fine-tuned from one pretrained model only)",
    )


def evaluate_parser() -> argparse.ArgumentParser:
    p = command_parser(
        "launch/evaluate.py",
        "Evaluate members and their ensemble (mean of the members' probabilities).",
        [
            "launch/evaluate.py runs/tiny                       # the run's test split",
            "launch/evaluate.py runs/tiny --data book.txt       # a local file, whole",
            "launch/evaluate.py --members a/ b/ --config c.yaml --output out/",
            "launch/evaluate.py runs/tiny --ood other.txt --tokens-out tokens.parquet --html view.html",
        ],
        "overrides: data.* and eval.* keys, e.g. eval.per_device_batch_size=8",
    )
    p.add_argument(
        "items",
        nargs="*",
        metavar="RUN_DIR | section.key=value",
        help="the run directory written by launch/train.py (unless --members), then data.*/eval.* overrides",
    )
    p.add_argument("--members", nargs="+", metavar="DIR", help="member directories (instead of a run)")
    p.add_argument("--config", help="YAML config for the data (default: the run's or first member's)")
    p.add_argument(
        "--data",
        nargs="+",
        metavar="PATH_OR_NAME",
        help="evaluate on local file(s), taken whole as the test split, or a Hub dataset / saved "
        "dataset directory instead of the run's data",
    )
    p.add_argument(
        "--split", default=None, choices=["test", "validation"], help="split to evaluate (default: test)"
    )
    p.add_argument("--output", help="directory for results.json/.md (default: the run, or <run>/eval/<data>)")
    _add_output_options(p)
    add_processes_option(p)
    return p


# `section.key=value`: what an override looks like, as opposed to a path or a dataset name.
OVERRIDE_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+=")


def _is_override(item: str) -> bool:
    return bool(OVERRIDE_RE.match(item)) and not Path(item).exists()


def evaluate_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse an evaluate command line. Overrides may come before, between or after the options:
    the ones that a list option (--data, --members) swallowed are taken back from it."""
    args = evaluate_parser().parse_intermixed_args(argv)
    swallowed = []
    for option in ("data", "members", "ood"):
        values = getattr(args, option)
        if values:
            swallowed += [v for v in values if _is_override(v)]
            setattr(args, option, [v for v in values if not _is_override(v)] or None)
    positional = [i for i in args.items if not _is_override(i)]
    given = list(sys.argv[1:] if argv is None else argv)
    args.overrides = sorted([i for i in args.items if _is_override(i)] + swallowed, key=given.index)
    if len(positional) > 1:
        raise EnsembleError(
            f"more than one run directory given ({', '.join(positional)}); give one, or --members"
        )
    args.run_dir = positional[0] if positional else None
    return args


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80] or "data"


def resolve_evaluation(
    args: argparse.Namespace,
) -> tuple[list[Path], ExperimentConfig, ExperimentConfig | None, str, Path]:
    """(member dirs, config whose data/eval sections apply, the run's own config when --data
    replaced its data (weights and temperatures are fitted on the run's validation split), split,
    output dir)."""
    source = run_or_members(args)
    if isinstance(source, str):
        check_run_dir(source)  # said before torch is imported
    from ensemble.core.members import member_dirs

    member_paths = member_dirs(source)

    config_path = (
        Path(args.config)
        if args.config
        else (RunPaths(Path(args.run_dir)).config if args.run_dir else member_paths[0] / CONFIG)
    )
    if not config_path.is_file():
        raise EnsembleError(f"config {config_path} not found; pass --config with the data section to use")
    raw = yaml.safe_load(config_path.read_text()) or {}
    run_cfg = config_from_dict(raw) if args.data else None
    if args.data:
        data = raw.setdefault("data", {})
        for key in ("dataset", "dataset_config", "text_column", "text_template"):
            data[key] = None
        for key in ("train_files", "validation_files", "test_files"):
            data[key] = []
        from ensemble.core.data import BUILDER_BY_SUFFIX

        if all(Path(d).is_file() for d in args.data):
            data["test_files"] = list(args.data)
        elif len(args.data) == 1 and Path(args.data[0]).suffix.lower() not in BUILDER_BY_SUFFIX:
            data["dataset"] = args.data[0]  # a saved dataset or a Hub name (a file has a suffix)
        else:
            missing = [d for d in args.data if not Path(d).is_file()]
            raise EnsembleError(f"--data: file(s) {missing} not found; fix the paths")
    for item in args.overrides:
        if not item.split("=", 1)[0].startswith(("data.", "eval.")):
            raise ConfigError(f"override {item!r}: evaluation takes only data.* and eval.* overrides")
        apply_override(raw, item)
    cfg = config_from_dict(raw)
    split = args.split or "test"

    if args.output:
        out = Path(args.output)
    elif args.run_dir and not args.data and split == "test":
        out = Path(args.run_dir)
    elif args.run_dir:
        name = _slug("-".join(Path(d).name for d in args.data)) if args.data else "run-data"
        out = Path(args.run_dir) / "eval" / f"{name}-{split}"
    else:
        raise EnsembleError("--output is required with --members; say where results.json should go")
    return member_paths, cfg, run_cfg, split, out


def _student(args: argparse.Namespace) -> Path | None:
    """The student to evaluate: --student, else the run's own (unless --no-student)."""
    from ensemble.core.members import is_complete_member

    if args.student and args.no_student:
        raise EnsembleError("--student and --no-student contradict each other; give one")
    if args.student or args.no_student:
        return Path(args.student) if args.student else None
    own = RunPaths(Path(args.run_dir)).student if args.run_dir else None
    return own if own is not None and is_complete_member(own) else None


@guarded
def evaluate_main(argv: Sequence[str] | None = None) -> int | None:
    """Evaluate in one process, or sharded over the processes of a launcher (--processes,
    torchrun, `accelerate launch`)."""
    args = evaluate_args(argv)
    if (status := relaunched(args, argv, evaluate_entry)) is not None:
        return status
    member_paths, cfg, run_cfg, split, out = resolve_evaluation(args)  # before torch loads
    setup_logging()
    from ensemble.evaluate.context import EvalOutputs
    from ensemble.evaluate.evaluator import EvalData, evaluate
    from ensemble.runtime.distributed import Worlds, local_device
    from ensemble.runtime.launch_env import launch_info

    outputs = EvalOutputs(
        ood=tuple(Path(f) for f in args.ood),
        tokens_out=Path(args.tokens_out) if args.tokens_out else None,
        html=Path(args.html) if args.html else None,
        html_tokens=args.html_tokens,
        student=_student(args),
        save_soup=Path(args.save_soup) if args.save_soup else None,
    )

    device = local_device()
    worlds = Worlds(cfg.parallel.timeout_s)
    worlds.join("evaluate", launch_info().rank, launch_info().world_size)
    try:
        evaluate(
            member_paths,
            EvalData(cfg.data, split, fit_cfg=run_cfg.data if run_cfg else None),
            cfg.eval,
            out,
            device,
            main_first=worlds.main_first,
            outputs=outputs,
        )
        worlds.wait_all("finished")  # the ranks leave together (see Worlds.close)
    finally:
        worlds.close()


def evaluate_entry() -> NoReturn:
    """`launch/evaluate.py` and the `ensemble-evaluate` command."""
    exit_with(evaluate_main())
