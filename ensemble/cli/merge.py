"""`launch/merge.py`: adapter members merged into full Hugging Face models."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from ensemble.cli.common import command_parser, exit_with, guarded, run_or_members, setup_logging
from ensemble.errors import EnsembleError


def merge_parser() -> argparse.ArgumentParser:
    p = command_parser(
        "launch/merge.py",
        "Write adapter members merged into full Hugging Face models (the base's weights plus each "
        "member's update), which AutoModelForCausalLM.from_pretrained loads without PEFT.",
        [
            "launch/merge.py runs/lora                 # into runs/lora/merged/member-<i>",
            "launch/merge.py --members runs/lora/members/member-0 --output merged/",
        ],
    )
    p.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="a run of adapter members (adapter.method)")
    p.add_argument(
        "--members", nargs="+", metavar="DIR", help="adapter member directories (instead of a run)"
    )
    p.add_argument("--output", type=Path, help="where the merged members go (default: RUN_DIR/merged)")
    return p


@guarded
def merge_main(argv: Sequence[str] | None = None) -> None:
    args = merge_parser().parse_args(argv)
    source = run_or_members(args)
    if args.output is None and args.members:
        raise EnsembleError("--members needs --output DIR (where the merged members go)")
    out = args.output or Path(source) / "merged"
    setup_logging()
    from ensemble.core.adapters import save_merged
    from ensemble.core.members import member_dirs

    members = member_dirs(source)
    taken = [str(out / m.name) for m in members if (out / m.name).exists()]
    if taken:  # refused before anything is written
        raise EnsembleError(f"{', '.join(taken)} exist(s); remove them or pass another --output")
    for member in members:
        save_merged(member, out / member.name)
        print(f"{member} -> {out / member.name}", flush=True)


def merge_entry() -> NoReturn:
    """`launch/merge.py` and the `ensemble-merge` command."""
    exit_with(merge_main())
