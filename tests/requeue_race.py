"""Does a job that requeues itself from its batch script always run its second attempt? On the
test cluster of tests/slurm_cluster.py, submits small two-node jobs one after the other: each
runs a step on both nodes, calls `scontrol requeue` on itself and exits 0, as slurm/common.sh
does; its second attempt writes a line and ends. Prints how many jobs lost that attempt and the
log lines that tell why.

    python -m tests.requeue_race --jobs 20 --release early   # started the moment Slurm allows
    python -m tests.requeue_race --jobs 20 --release slurm   # left to Slurm's own hold

`early` is what the test harness used to do (`scontrol update JobId=N StartTime=now` as soon as
the requeued job was pending on its BeginTime); `slurm` waits for the hold (cred_expire + 1 s).
Needs root and Debian's slurmctld, slurmd, slurm-client and munge; --evidence DIR keeps every
daemon's debug log.
"""

from __future__ import annotations

import argparse
import os
import re
import time
from pathlib import Path

from tests.slurm_cluster import LIVE_STATES, LocalSlurm

JOB = """#!/bin/bash
#SBATCH --nodes=2 --ntasks-per-node=1 --requeue --open-mode=append
set -euo pipefail
srun --nodes=2 --ntasks=2 sleep {step_s}
if [[ ${{SLURM_RESTART_COUNT:-0}} -eq 0 ]]; then
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
echo "second attempt of $SLURM_JOB_ID" >> {done}
"""

LOG_LINES = re.compile(
    r"already killed|credential .*revoked|_job_complete|requeue|batch job complete failure"
    r"|sent from wrong node|Ignoring late|drain",
    re.IGNORECASE,
)


def run_job(slurm: LocalSlurm, index: int, release: str, step_s: float, timeout: float) -> dict:
    done = slurm.dir / f"done-{index}"
    script = slurm.dir / f"job-{index}.sh"
    script.write_text(JOB.format(step_s=step_s, done=done))
    out = slurm.dir / f"job-{index}.out"
    job_id = slurm.run(["sbatch", "--parsable", f"--output={out}", str(script)], cwd=slurm.dir).stdout.strip()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        (job,) = slurm.job(job_id)
        if job["JobState"] not in LIVE_STATES:
            break
        if release == "early" and job["JobState"] == "PENDING" and job.get("Reason") == "BeginTime":
            slurm.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=False)
        time.sleep(0.05)
    lost = not done.exists() or job["JobState"] != "COMPLETED" or job.get("Restarts") != "1"
    return {"job": job_id, "state": job["JobState"], "restarts": job.get("Restarts"), "lost": lost}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--release", choices=("early", "slurm"), required=True)
    parser.add_argument("--step-seconds", type=float, default=1.0, help="how long each step runs")
    parser.add_argument("--evidence", type=Path, help="keep the daemons' debug logs here")
    args = parser.parse_args()
    if args.evidence:
        os.environ["ENSEMBLE_SLURM_EVIDENCE"] = str(args.evidence)
    slurm = LocalSlurm().start()
    try:
        results = [run_job(slurm, i, args.release, args.step_seconds, timeout=120) for i in range(args.jobs)]
        lost = [r for r in results if r["lost"]]
        for r in results:
            print(f"job {r['job']}: {r['state']}, Restarts={r['restarts']}{'  LOST' if r['lost'] else ''}")
        print(f"release={args.release}: {len(lost)} of {len(results)} jobs lost their second attempt")
        lost_ids = {r["job"] for r in lost}
        for log in sorted((slurm.dir / "log").glob("*.log")):
            for line in log.read_text(errors="replace").splitlines():
                if LOG_LINES.search(line) and any(re.search(rf"\b{j}\b", line) for j in lost_ids):
                    print(f"{log.name}: {line}")
    finally:
        slurm.stop()


if __name__ == "__main__":
    main()
