"""Command lines of `launch/train.py`, `launch/evaluate.py` and `launch/generate.py`.

User mistakes (:class:`EnsembleError`) end as one ``error: ...`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

import yaml

from .config import ExperimentConfig, apply_override, config_from_dict, describe, load_config
from .errors import PREEMPTED_EXIT, ConfigError, EnsembleError, Preempted
from .launcher import Nodes, launch

USER_ERROR = 2


def _rank() -> int:
    from .distributed import launch_info

    return launch_info().rank


def _where() -> str:
    """`[rank r/W] ` in a multi-process job, else nothing."""
    from .distributed import launch_info

    launch = launch_info()
    return f"[rank {launch.rank}/{launch.world_size}] " if launch.distributed else ""


class _TiedWeightsNote(logging.Filter):
    """Accelerate warns at every checkpoint that it "removed shared tensor lm_head.weight": GPT-2
    ties its output layer to the embedding, which is restored on load (resumes are tested
    bitwise), so the warning says nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


def setup_logging() -> None:
    main = _rank() == 0
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        level=logging.INFO if main else logging.WARNING,
        force=True,
    )
    import datasets
    import transformers

    # Accelerate logs every file of every checkpoint at INFO; ours says where each one went.
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    logging.getLogger("accelerate.utils.other").addFilter(_TiedWeightsNote())
    transformers.logging.set_verbosity_warning()
    transformers.utils.logging.disable_progress_bar()  # per-file weight load/save bars are noise here
    datasets.logging.set_verbosity_warning()
    if not main:
        datasets.disable_progress_bars()


def _line_start() -> str:
    """In a multi-process job the ranks share the terminal, and another rank's progress bar may
    have left the cursor mid-line: start our line on a fresh one."""
    return "\n" if _where() else ""


def guarded(
    main: Callable[[Sequence[str] | None], int | None],
) -> Callable[[Sequence[str] | None], int]:
    """Wrap an entry point: user errors become one line on stderr and exit status 2. A main
    returns None when done, or a status of its own (that of the ranks it launched)."""

    def run(argv: Sequence[str] | None = None) -> int:
        try:
            status = main(argv)
        except EnsembleError as e:
            print(f"{_line_start()}error: {_where()}{e}", file=sys.stderr, flush=True)
            return USER_ERROR
        except Preempted as e:
            print(
                f"{_line_start()}preempted: {_where()}{e}; rerun the same command with --resume auto to continue "
                f"(exit status {PREEMPTED_EXIT})",
                file=sys.stderr,
                flush=True,
            )
            return PREEMPTED_EXIT
        except KeyboardInterrupt:  # Ctrl-C outside training (which checkpoints on it, see StopRequest)
            print(
                f"{_line_start()}interrupted: {_where()}what was written is kept (checkpoints, finished "
                "members, earlier results); rerun the same command (training: with --resume auto) to continue",
                file=sys.stderr,
                flush=True,
            )
            return 130
        except Exception as e:
            # In a multi-process job, say at once which rank failed and why, before the
            # traceback and before the launcher stops the other ranks.
            if _where():
                print(f"{_line_start()}error: {_where()}{type(e).__name__}: {e}", file=sys.stderr, flush=True)
            raise
        return 0 if status is None else status

    return run


def add_processes_option(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("several processes (instead of torchrun or accelerate launch)")
    g.add_argument(
        "--processes",
        type=int,
        default=1,
        metavar="N",
        help="start N processes of this command on this machine (like torchrun --nproc_per_node N) "
        "and exit with their own status; other launchers (torchrun, accelerate launch) work too",
    )
    g.add_argument(
        "--nodes",
        type=int,
        default=1,
        metavar="K",
        help="machines in the launch, each running this command with --processes N, its own "
        "--node-rank and the same --main-address (slurm/launch_node.sh does this); default 1",
    )
    g.add_argument("--node-rank", type=int, default=0, metavar="I", help="this machine's index, 0 to K-1")
    g.add_argument(
        "--main-address",
        metavar="HOST:PORT",
        help="where the other machines reach machine 0 (it holds the rendezvous on PORT); "
        "needed with --nodes above 1",
    )


def _nodes(args: argparse.Namespace) -> Nodes:
    """The machines of a --processes launch, checked."""
    if args.processes < 1:
        raise EnsembleError(f"--processes {args.processes}: give 1 or more")
    if args.nodes < 1 or not 0 <= args.node_rank < args.nodes:
        raise EnsembleError(
            f"--nodes {args.nodes} --node-rank {args.node_rank}: give 1 or more nodes and a node rank "
            "from 0 to nodes-1"
        )
    if args.main_address is None:
        if args.nodes > 1:
            raise EnsembleError(
                f"--nodes {args.nodes} needs --main-address HOST:PORT, the address of node 0, the "
                "same on every node"
            )
        return Nodes()
    host, _, port = args.main_address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise EnsembleError(f"--main-address {args.main_address}: give HOST:PORT, e.g. node001:29500")
    return Nodes(args.nodes, args.node_rank, host, int(port))


def relaunched(
    args: argparse.Namespace, argv: Sequence[str] | None, entry: Callable[[], object]
) -> int | None:
    """With ``--processes N`` (and ``--nodes``) outside any launcher: run this command as N ranks
    (see :mod:`launcher`) and return their status; None where this process is to do the work."""
    from .distributed import launch_info

    info = launch_info()
    nodes = _nodes(args)
    if info.distributed:  # a rank: of our own launcher (the same arguments), or of another one
        machines = info.world_size // info.local_world_size
        if args.processes not in (1, info.local_world_size) or nodes.count not in (1, machines):
            raise EnsembleError(
                f"--processes {args.processes} --nodes {nodes.count} under a launcher that started "
                f"{info.local_world_size} processes on each of {machines} machine(s); drop --processes "
                "and --nodes (the launcher decides) or run without the launcher"
            )
        return None
    if args.processes * nodes.count == 1:
        return None
    given = list(sys.argv[1:] if argv is None else argv)
    command = ["-c", f"from {entry.__module__} import {entry.__name__}; {entry.__name__}()", *given]
    return launch(command, args.processes, nodes)


# --------------------------------------------------------------------------------------------
# train


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch/train.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train seeded members and evaluate their ensemble.\n\nExit status: 0 done; 2 a "
        f"mistake in the input (one error line); {PREEMPTED_EXIT} stopped by SIGTERM/SIGUSR1 or Ctrl-C "
        "after saving checkpoints (continue with --resume auto; Ctrl-C twice stops at once).",
        epilog="overrides: dotted section.key=value pairs, values parsed as YAML.\n\n"
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
        from .members import member_specs

        for spec in member_specs(cfg):
            # one write per line: under a launcher every rank prints into the same pipe, and
            # print() writes each field apart, so unbuffered lines of two ranks interleave
            sys.stdout.write(f"{spec.index} {spec.seed} {spec.name}\n")
        return
    if (status := relaunched(args, argv, train_entry)) is not None:
        return status
    setup_logging()
    from .run import train_run

    train_run(cfg, resume=args.resume, only=args.member, evaluate_after=not args.no_eval)


# --------------------------------------------------------------------------------------------
# evaluate


def evaluate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch/evaluate.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Evaluate members and their ensemble (mean of the members' probabilities).",
        epilog="examples:\n"
        "  launch/evaluate.py runs/tiny                       # the run's test split\n"
        "  launch/evaluate.py runs/tiny --data book.txt       # a local file, whole\n"
        "  launch/evaluate.py --members a/ b/ --config c.yaml --output out/\n"
        "  launch/evaluate.py runs/tiny --ood other.txt --tokens-out tokens.parquet --html view.html\n"
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
    p.add_argument(
        "--ood",
        nargs="+",
        metavar="FILE",
        default=[],
        help="out-of-domain text file(s): their blocks are told apart from the split's by each "
        "uncertainty score (AUROC, FPR at 95%% TPR) in results.json and ood.png",
    )
    p.add_argument(
        "--tokens-out",
        metavar="FILE",
        help="write every predicted token (its probability under each member and the ensemble, "
        "entropy, mutual information) to this Parquet file, streamed",
    )
    p.add_argument(
        "--html",
        metavar="FILE",
        help="write a page showing the split's first tokens shaded by the members' disagreement",
    )
    p.add_argument(
        "--html-tokens", type=int, default=2000, metavar="N", help="tokens on the --html page (2000)"
    )
    p.add_argument(
        "--student",
        metavar="DIR",
        help="a distilled student to evaluate beside the members (default: RUN_DIR/student, when "
        "launch/distill.py wrote one)",
    )
    p.add_argument("--no-student", action="store_true", help="do not evaluate the run's student")
    p.add_argument(
        "--save-soup",
        metavar="DIR",
        help="save the uniform average of the members' weights in Hugging Face format (members "
        "fine-tuned from one pretrained model only)",
    )
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


def run_or_members(args: argparse.Namespace) -> str | list[str]:
    """The ensemble a command line names: its run directory, or its --members directories."""
    if bool(args.run_dir) == bool(args.members):
        raise EnsembleError("give either a run directory or --members DIR ..., not both or neither")
    return args.run_dir or args.members


def resolve_evaluation(
    args: argparse.Namespace,
) -> tuple[list[Path], ExperimentConfig, ExperimentConfig | None, str, Path]:
    """(member dirs, config whose data/eval sections apply, the run's own config when --data
    replaced its data (weights and temperatures are fitted on the run's validation split), split,
    output dir)."""
    from .members import member_dirs

    member_paths = member_dirs(run_or_members(args))

    config_path = (
        Path(args.config)
        if args.config
        else (Path(args.run_dir) / "config.yaml" if args.run_dir else member_paths[0] / "config.yaml")
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
        from .data import BUILDER_BY_SUFFIX

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
    from .members import RunPaths, is_complete_member

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
    setup_logging()
    member_paths, cfg, run_cfg, split, out = resolve_evaluation(args)
    from .distributed import Worlds, launch_info, local_device
    from .evaluation import EvalOutputs, evaluate

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
            cfg.data,
            cfg.eval,
            split,
            out,
            device,
            fit_data_cfg=run_cfg.data if run_cfg else None,
            main_first=worlds.main_first,
            outputs=outputs,
        )
        worlds.wait_all("finished")  # the ranks leave together (see Worlds.close)
    finally:
        worlds.close()


# --------------------------------------------------------------------------------------------
# distill


def distill_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch/distill.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Distil a run's finished members into one student, then evaluate it with them.\n\n"
        f"Exit status: 0 done; 2 a mistake in the input (one error line); {PREEMPTED_EXIT} stopped by "
        "SIGTERM/SIGUSR1 or Ctrl-C after saving a checkpoint (continue with --resume auto).",
        epilog="examples:\n"
        "  python launch/distill.py runs/tiny\n"
        "  accelerate launch --config_file configs/accelerate/cpu.yaml launch/distill.py runs/tiny\n"
        "  python launch/distill.py runs/tiny distill.alpha=0.5 distill.config='{n_layer: 1}'\n"
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
    if (status := relaunched(args, argv, distill_entry)) is not None:
        return status
    setup_logging()
    from .distill import distill_run

    distill_run(args.run_dir, args.overrides, args.resume, args.overwrite, evaluate_after=not args.no_eval)


# --------------------------------------------------------------------------------------------
# generate


def generate_parser() -> argparse.ArgumentParser:
    from .combining import COMBINERS, HEADLINE

    p = argparse.ArgumentParser(
        prog="launch/generate.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Continue prompts with the ensemble (one KV cache per member), streamed.",
        epilog="examples:\n"
        "  launch/generate.py runs/tiny --prompt 'The list type'\n"
        "  launch/generate.py runs/tiny --prompt 'x = ' --sample --top-p 0.9 --seed 1 --show-uncertainty\n"
        "  launch/generate.py --members a/ b/ --prompts-file prompts.txt --num-beams 4 --output out.jsonl",
    )
    p.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="a run directory written by launch/train.py")
    p.add_argument("--members", nargs="+", metavar="DIR", help="member directories (instead of a run)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    p.add_argument("--prompts-file", type=Path, help="a file of prompts, one per line")
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=50)
    g.add_argument("--sample", action="store_true", help="sample (default: greedy search)")
    g.add_argument("--temperature", type=float, help="sampling temperature (implies --sample)")
    g.add_argument("--top-k", type=int, help="sample from the k likeliest tokens (implies --sample)")
    g.add_argument("--top-p", type=float, help="nucleus sampling (implies --sample)")
    g.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams")
    g.add_argument("--num-return-sequences", type=int, default=1)
    g.add_argument("--seed", type=int, default=0, help="prompt i samples with seed + i")
    e = p.add_argument_group("ensemble")
    e.add_argument(
        "--combiner",
        default=HEADLINE,
        help=f"how members' distributions combine: {', '.join(COMBINERS)} (weighted: the weights the "
        "run's evaluation fitted)",
    )
    e.add_argument(
        "--no-fitted-temperatures", action="store_true", help="ignore temperatures fitted by the evaluation"
    )
    e.add_argument(
        "--devices",
        nargs="+",
        metavar="DEVICE",
        help="one device for all members, or one per member (cuda:0 cuda:1 ...); auto: one GPU per member "
        "round-robin (default: cuda:0, else cpu)",
    )
    e.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="the members' weights (auto: bfloat16 on GPUs that support it, else float32)",
    )
    u = p.add_argument_group("output")
    u.add_argument(
        "--show-uncertainty",
        action="store_true",
        help="mark each generated token by how much the members disagreed (mutual information)",
    )
    u.add_argument(
        "--uncertainty-levels",
        type=float,
        nargs=2,
        default=(0.1, 0.5),
        metavar=("MEDIUM", "HIGH"),
        help="mutual information (nats) from which a token is shaded as medium / high disagreement",
    )
    u.add_argument("--output", type=Path, help="also write the continuations as JSON lines")
    return p


@guarded
def generate_main(argv: Sequence[str] | None = None) -> None:
    args = generate_parser().parse_args(argv)
    source = run_or_members(args)
    prompts = list(args.prompt)
    if args.prompts_file:
        if not args.prompts_file.is_file():
            raise EnsembleError(f"--prompts-file {args.prompts_file} not found; fix the path")
        from_file = [line for line in args.prompts_file.read_text().splitlines() if line.strip()]
        if not from_file:
            raise EnsembleError(
                f"--prompts-file {args.prompts_file} holds no prompt (it wants one per line); "
                "write prompts into it, or pass --prompt TEXT"
            )
        prompts += from_file
    if not prompts:
        raise EnsembleError("no prompt; pass --prompt TEXT or --prompts-file FILE")
    from .decoding import Settings, continue_prompts, write_records
    from .generation import load_ensemble

    settings = Settings(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.sample or any(v is not None for v in (args.temperature, args.top_k, args.top_p)),
        temperature=1.0 if args.temperature is None else args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        num_beams=args.num_beams,
        num_return_sequences=args.num_return_sequences,
        seed=args.seed,
        levels=tuple(args.uncertainty_levels),
    )
    setup_logging()
    devices = args.devices[0] if args.devices and len(args.devices) == 1 else args.devices
    model, tokenizer = load_ensemble(
        source,
        combiner=args.combiner,
        devices=devices,
        dtype=args.dtype,
        fitted_temperatures=not args.no_fitted_temperatures,
    )
    results = continue_prompts(model, tokenizer, prompts, settings, show_uncertainty=args.show_uncertainty)
    if args.output:
        write_records(args.output, results)


# --------------------------------------------------------------------------------------------
# Process exit


def exit_with(code: int) -> NoReturn:
    """End the process of an entry script with ``code``. A process of a multi-process launch
    leaves through `distributed.leave`, without tearing the interpreter down (see there)."""
    from .distributed import launch_info, leave

    if launch_info().distributed:
        leave(code)
    sys.exit(code)


def train_entry() -> NoReturn:
    """`launch/train.py` and the `ensemble-train` command."""
    exit_with(train_main())


def generate_entry() -> NoReturn:
    """`launch/generate.py` and the `ensemble-generate` command."""
    exit_with(generate_main())


def distill_entry() -> NoReturn:
    """`launch/distill.py` and the `ensemble-distill` command."""
    exit_with(distill_main())


def evaluate_entry() -> NoReturn:
    """`launch/evaluate.py` and the `ensemble-evaluate` command."""
    exit_with(evaluate_main())
