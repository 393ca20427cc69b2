"""Distillation throughput against member training, measured back to back in one process.

For the same number of optimizer steps on the same run's data and processes:
- member: a member's training tokens/s (its own cross-entropy; `launch/train.py`'s loop);
- student: the distillation's tokens/s (the same loop; every batch also runs the N members in
  inference mode for the teacher, and the loss has a KL term over the vocabulary);
- ratio: student / member. A training step is about 3 forward passes' worth of work, so N
  teacher forwards should cost about N/3 steps: expect roughly 1 / (1 + N/3), 0.5 for 3
  members of the student's size.

    python benchmarks/distillation.py runs/tiny                # after training the default run
    python benchmarks/distillation.py runs/tiny --steps 100 --json figures.json

Nothing of the run is changed: both models are trained into a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a trained run directory (its members are the teacher)")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps of each (default 60)")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)

    from ensemble.cli.common import setup_logging
    from ensemble.config.loading import load_config
    from ensemble.core.members import member_specs
    from ensemble.core.paths import RunPaths
    from ensemble.distill.run import distill_run, run_config
    from ensemble.train.run import train_run

    setup_logging()
    run = RunPaths(Path(args.run))
    members = len(member_specs(run_config(run)))
    with tempfile.TemporaryDirectory() as tmp:
        common = [
            f"train.max_steps={args.steps}",
            f"train.logging_steps={max(args.steps // 6, 1)}",
            "checkpoint.every_steps=null",
            "checkpoint.at_epoch_end=false",
            "tracking.report_to=[none]",
        ]
        member_cfg = load_config(
            run.config, [*common, "members.seeds=[42]", f"output.dir={tmp}/member", "eval.plots=false"]
        )
        train_run(member_cfg)
        distill_run(
            run.root,
            [*common, f"distill.dir={tmp}/student", f"checkpoint.dir={tmp}/checkpoints"],
        )
        member = json.loads((Path(tmp) / "member/members/member-0/member.json").read_text())["training"]
        student = json.loads((Path(tmp) / "student/member.json").read_text())["training"]
    figures = {
        "steps": args.steps,
        "members": members,
        "member_tokens_per_s": member["tokens_per_s"],
        "student_tokens_per_s": student["tokens_per_s"],
        "ratio": student["tokens_per_s"] / member["tokens_per_s"],
        "expected_ratio": 1 / (1 + members / 3),
    }
    print(
        "\n| Training | Tokens/s |\n| --- | ---: |\n"
        f"| member (cross-entropy) | {figures['member_tokens_per_s']:,.0f} |\n"
        f"| student (distilled from {members} members) | {figures['student_tokens_per_s']:,.0f} |\n\n"
        f"distillation / member training: {figures['ratio']:.2f} (about {figures['expected_ratio']:.2f} "
        f"expected: each step also runs {members} teacher forward passes)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
