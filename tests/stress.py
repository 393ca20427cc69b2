"""Run some tests many times in a row, to find out whether (and how often) they fail.

    python -m tests.stress --runs 30 --load 1 --out stress/slurm -- tests/test_slurm.py -k multinode

Each run is one `python -m pytest -x ARGS` in a fresh process, one after the other. With
``--load N``, N CPU-bound processes of our own spin beside the tests the whole time (the machine
busy, as on a shared CI runner). Every run's pytest output goes to OUT/run-K/pytest.txt, and the
Slurm cluster of tests/slurm_cluster.py keeps its evidence there (ENSEMBLE_SLURM_EVIDENCE): the
daemons' debug logs, every job record seen, the jobs' own logs and sacct's records. A run that
passed has its evidence removed unless ``--keep-passed``. OUT/summary.txt gets one line per run;
the last line printed is the failure rate.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _spin(kind: str) -> None:
    if kind == "python":
        while True:
            pass
    import torch  # another training job: matrix products on every core

    a = torch.randn(512, 512)
    while True:
        a = torch.tanh(a @ a)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=10, help="how many runs (default 10)")
    parser.add_argument(
        "--load", type=int, default=0, help="CPU-bound processes beside the tests (default 0)"
    )
    parser.add_argument(
        "--load-kind",
        choices=["python", "torch"],
        default="python",
        help="python: each spins one core; torch: each multiplies matrices on all cores, as a training job does",
    )
    parser.add_argument("--out", type=Path, required=True, help="where each run's output and evidence go")
    parser.add_argument("--keep-passed", action="store_true", help="keep the evidence of runs that passed")
    parser.add_argument("pytest_args", nargs="+", help="what to give pytest (after --)")
    args = parser.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"--out {args.out} is not empty: choose a new directory, so that no evidence is mixed")
    args.out.mkdir(parents=True, exist_ok=True)

    hogs = [
        multiprocessing.Process(target=_spin, args=(args.load_kind,), daemon=True) for _ in range(args.load)
    ]
    for hog in hogs:
        hog.start()
    # stopped by a signal: end the load too (daemon processes are only ended on a normal exit)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    failures = 0
    try:
        for k in range(1, args.runs + 1):
            run_dir = args.out / f"run-{k:03d}"
            run_dir.mkdir()
            env = {**os.environ, "ENSEMBLE_SLURM_EVIDENCE": str(run_dir.resolve())}
            start = time.monotonic()
            with open(run_dir / "pytest.txt", "w") as log:
                status = subprocess.run(
                    [sys.executable, "-m", "pytest", "-x", "-p", "no:cacheprovider", *args.pytest_args],
                    cwd=REPO,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                ).returncode
            seconds = time.monotonic() - start
            failures += status != 0
            line = f"run {k}: {'passed' if status == 0 else f'FAILED (pytest exit {status})'} in {seconds:.0f} s, load {args.load} ({args.load_kind})"
            with open(args.out / "summary.txt", "a") as summary:
                summary.write(line + "\n")
            print(line, flush=True)
            if status == 0 and not args.keep_passed:
                shutil.rmtree(run_dir)
    finally:
        for hog in hogs:
            hog.terminate()
    print(
        f"{failures} of {args.runs} runs failed ({' '.join(args.pytest_args)}; load {args.load} {args.load_kind})"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
