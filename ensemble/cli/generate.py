"""The `launch/generate.py` command line (and `ensemble-generate`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from ensemble.cli.common import command_parser, exit_with, guarded, run_or_members, setup_logging
from ensemble.errors import EnsembleError


def _add_ensemble_options(p: argparse.ArgumentParser) -> None:
    from ensemble.core.combining import COMBINERS, HEADLINE

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


def generate_parser() -> argparse.ArgumentParser:
    p = command_parser(
        "launch/generate.py",
        "Continue prompts with the ensemble (one KV cache per member), streamed.",
        [
            "launch/generate.py runs/tiny --prompt 'The list type'",
            "launch/generate.py runs/tiny --prompt 'x = ' --sample --top-p 0.9 --seed 1 --show-uncertainty",
            "launch/generate.py --members a/ b/ --prompts-file prompts.txt --num-beams 4 --output out.jsonl",
        ],
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
    _add_ensemble_options(p)
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
    from ensemble.generate.model import load_ensemble
    from ensemble.generate.printer import Settings, continue_prompts, write_records

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


def generate_entry() -> NoReturn:
    """`launch/generate.py` and the `ensemble-generate` command."""
    exit_with(generate_main())
