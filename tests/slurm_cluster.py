"""A real Slurm cluster on this machine, for the tests of slurm/: munged, slurmctld and two
slurmd daemons (nodes n1 and n2, both on localhost, so that multi-node jobs really run on two
Slurm nodes), configured in a temporary directory on free ports. Every daemon is started in the
foreground by us and stopped by its pid.

Needs Debian's `slurmctld slurmd slurm-client munge` (`.ci/run` installs them) and root (slurmd
starts jobs as their user).

With ENSEMBLE_SLURM_EVIDENCE=DIR the cluster keeps what tells why a job went wrong: the daemons
log at debug level, every change of a job's record seen while waiting is written to
`jobs.trail`, and on stop the logs, that trail, the jobs' output files and (where Debian's
`slurmdbd` and `mariadb-server` are installed, so that a real accounting database runs) `sacct`'s
records of every attempt are copied into DIR/<cluster>/ before the cluster's files are removed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
ACCOUNTING = ("mariadb-install-db", "mariadbd", "mariadb", "slurmdbd", "sacctmgr", "sacct")
CLIENTS = ("sbatch", "scontrol", "squeue", "scancel", "srun", "sinfo")
NODES = ("n1", "n2")
LIVE_STATES = ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED")  # a job not ended yet
CPUS_PER_NODE = 2


class Unavailable(Exception):
    """Slurm cannot run here; the message says why."""


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _find(name: str) -> str | None:
    return shutil.which(name) or next(
        (p for d in ("/usr/sbin", "/sbin") if os.access(p := f"{d}/{name}", os.X_OK)), None
    )


class LocalSlurm:
    # Slurm holds a requeued job for cred_expire + 1 seconds (its BeginTime) so that the nodes
    # have purged the previous attempt's credential, sockets and I/O before a new one starts
    # (job_mgr.c, batch_requeue_fini). The default 120 s would make every requeue test wait two
    # minutes; 10 s keeps the hold (5 is Slurm's minimum) while leaving a loaded machine time to
    # use a step credential (it expires after the same window).
    CRED_EXPIRE_S = 10

    def __init__(self) -> None:
        missing = [n for n in DAEMONS + CLIENTS if not _find(n)]
        if missing:
            raise Unavailable(
                f"{', '.join(missing)} not installed (apt-get install slurmctld slurmd slurm-client munge)"
            )
        if os.geteuid() != 0:
            raise Unavailable("slurmd must run as root to start jobs, and these tests do not run as root")
        # munged insists that every directory above its socket be world-searchable, and pytest's
        # tmp_path is not: a directory of our own under the system temp dir.
        self.dir = Path(tempfile.mkdtemp(prefix="ensemble-slurm-"))
        self.dir.chmod(0o755)
        self.procs: dict[str, subprocess.Popen] = {}
        self.evidence = (
            Path(os.environ["ENSEMBLE_SLURM_EVIDENCE"]) if os.environ.get("ENSEMBLE_SLURM_EVIDENCE") else None
        )
        self.accounting = self.evidence is not None and all(_find(n) for n in ACCOUNTING)
        self._trail: dict[str, str] = {}  # job id -> its last record written to jobs.trail
        self.env = {**os.environ, "SLURM_CONF": str(self.dir / "slurm.conf")}
        for var in [v for v in self.env if v.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]:
            if var != "SLURM_CONF":
                del self.env[var]  # a test run inside a Slurm job must not leak that job's settings

    # ---------------------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> LocalSlurm:
        d = self.dir
        for sub in ("state", "log", *(f"spool-{n}" for n in NODES)):
            (d / sub).mkdir()
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        ctld_port, db_port, dbd_port, *node_ports = _free_ports(3 + len(NODES))
        host = socket.gethostname()
        (d / "plugstack.conf").write_text("")
        nodes = "\n".join(
            f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={p} CPUs={CPUS_PER_NODE} State=UNKNOWN"
            for n, p in zip(NODES, node_ports, strict=True)
        )
        (d / "slurm.conf").write_text(
            f"""ClusterName=ensembletest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge.sock,cred_expire={self.CRED_EXPIRE_S}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool-%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
PlugStackConfig={d}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
{self._accounting_conf(dbd_port) if self.accounting else ""}
{"SlurmctldDebug=debug" + chr(10) + "SlurmdDebug=debug" if self.evidence else ""}
ReturnToService=2
InactiveLimit=0
KillWait=30
MinJobAge=3600
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
        )
        self._daemon(
            "munged",
            [_find("munged"), "--foreground", f"--key-file={key}", f"--socket={d}/munge.sock",
             f"--pid-file={d}/munged.pid", f"--log-file={d}/log/munged.log", f"--seed-file={d}/munged.seed"],
        )  # fmt: skip
        self._wait(lambda: (d / "munge.sock").exists(), 10, "munged did not create its socket")
        if self.accounting:
            self._start_accounting(db_port, dbd_port)
        self._daemon("slurmctld", [_find("slurmctld"), "-D", "-i", "-f", str(d / "slurm.conf")])
        for n in NODES:
            self._daemon(f"slurmd-{n}", [_find("slurmd"), "-D", "-N", n, "-f", str(d / "slurm.conf")])
        self._wait(self._nodes_idle, timeout, "the nodes did not become idle")
        return self

    def _accounting_conf(self, dbd_port: int) -> str:
        return (
            "AccountingStorageType=accounting_storage/slurmdbd\n"
            f"AccountingStorageHost=localhost\nAccountingStoragePort={dbd_port}\n"
            f"AccountingStoragePass={self.dir}/munge.sock"  # munge's socket, for the clients' connection
        )

    def _start_accounting(self, db_port: int, dbd_port: int) -> None:
        """A MariaDB server and slurmdbd of our own, so that sacct has every attempt's record
        (evidence only: the tests do not need it)."""
        d = self.dir
        self.run(
            [
                _find("mariadb-install-db"),
                "--user=root",
                f"--datadir={d}/db",
                "--auth-root-authentication-method=normal",
            ]
        )
        self._daemon(
            "mariadbd",
            [_find("mariadbd"), "--no-defaults", "--user=root", f"--datadir={d}/db", f"--socket={d}/db.sock",
             f"--port={db_port}", "--bind-address=127.0.0.1", "--skip-name-resolve", f"--pid-file={d}/db.pid",
             f"--log-error={d}/log/mariadb.log"],
        )  # fmt: skip
        sql = "CREATE USER 'slurm'@'127.0.0.1'; GRANT ALL ON *.* TO 'slurm'@'127.0.0.1';"
        self._wait(
            lambda: (
                self.run(
                    [_find("mariadb"), f"--socket={d}/db.sock", "-uroot", "-e", sql], check=False
                ).returncode
                == 0
            ),
            60,
            "mariadbd did not start",
        )
        conf = d / "slurmdbd.conf"
        conf.write_text(
            f"""AuthType=auth/munge
AuthInfo=socket={d}/munge.sock
DbdHost=localhost
DbdPort={dbd_port}
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={db_port}
StorageUser=slurm
StorageLoc=slurm_acct_db
PidFile={d}/slurmdbd.pid
LogFile={d}/log/slurmdbd.log
DebugLevel=debug
"""
        )
        conf.chmod(0o600)
        self._daemon("slurmdbd", [_find("slurmdbd"), "-D"])
        self._wait(
            lambda: (
                self.run(["sacctmgr", "-i", "add", "cluster", "ensembletest"], check=False).returncode == 0
            ),
            60,
            "slurmdbd did not start",
        )

    def _daemon(self, name: str, cmd: list[str]) -> None:
        log = open(self.dir / "log" / f"{name}.stdout", "w")
        self.procs[name] = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )

    def _nodes_idle(self) -> bool:
        proc = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False)
        states = dict(line.split() for line in proc.stdout.splitlines() if line.strip())
        return all(states.get(n) == "idle" for n in NODES)

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(
                    f"{what} ({', '.join(dead) + ' exited; ' if dead else ''}logs: {self.logs()})"
                )
            time.sleep(0.3)

    def stop(self) -> None:
        """Cancel every job, then stop the daemons we started (by pid), then remove the files
        (with ENSEMBLE_SLURM_EVIDENCE, after keeping what tells why a job went wrong)."""
        if self.evidence is not None:
            self.keep_evidence()
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run(["scancel", "--full", "--user", "root"], check=False)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.run(["squeue", "-h"], check=False).stdout.strip():
                time.sleep(0.5)
        for name in reversed(list(self.procs)):  # slurmd before slurmctld before munged
            proc = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def keep_evidence(self) -> Path:
        """Copy the daemons' logs, the jobs' trail and every attempt's accounting record into
        ENSEMBLE_SLURM_EVIDENCE/<cluster>/; returns that directory."""
        out = self.evidence / self.dir.name
        shutil.copytree(self.dir / "log", out, dirs_exist_ok=True)
        if self.accounting:
            fields = "JobIDRaw,JobName,State,ExitCode,DerivedExitCode,Reason,NodeList,Submit,Start,End"
            proc = self.run(
                ["sacct", "-a", "-D", "-X", "-P", "--starttime=2000-01-01", "-o", fields], check=False
            )  # -D: every attempt of a requeued job, not only the last
            (out / "sacct.txt").write_text(proc.stdout + proc.stderr)
            proc = self.run(["sacct", "-a", "-D", "-P", "--starttime=2000-01-01", "-o", fields], check=False)
            (out / "sacct-steps.txt").write_text(proc.stdout + proc.stderr)
        return out

    def discard(self, paths) -> None:
        """Remove files the jobs wrote (their logs); with ENSEMBLE_SLURM_EVIDENCE they are moved
        into the evidence directory instead."""
        for path in paths:
            if self.evidence is not None:
                (self.evidence / self.dir.name).mkdir(parents=True, exist_ok=True)
                shutil.move(path, self.evidence / self.dir.name / Path(path).name)
            else:
                Path(path).unlink()

    def _record_trail(self, jobs: list[dict[str, str]]) -> None:
        """Write each job's record to jobs.trail whenever it changed since the last one seen."""
        keep = (
            "JobState",
            "Reason",
            "Restarts",
            "BatchFlag",
            "ExitCode",
            "NodeList",
            "BatchHost",
            "StartTime",
            "EndTime",
            "Requeue",
        )
        with open(self.dir / "log" / "jobs.trail", "a") as trail:
            for job in jobs:
                line = json.dumps({k: job.get(k) for k in keep})
                if self._trail.get(job["JobId"]) != line:
                    self._trail[job["JobId"]] = line
                    trail.write(f"{time.strftime('%H:%M:%S')} {job['JobId']} {line}\n")

    def logs(self) -> str:
        return "\n".join(self.log_tail(path.name) for path in sorted((self.dir / "log").glob("*")))

    def log_tail(self, name: str, lines: int = 15) -> str:
        """The last lines of one daemon's log (e.g. ``slurmctld.log``), under its name."""
        path = self.dir / "log" / name
        tail = path.read_text(errors="replace").splitlines()[-lines:] if path.is_file() else []
        return f"--- {name}\n" + "\n".join(tail)

    # ---------------------------------------------------------------------------------------

    def run(self, cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            cmd, env=kw.pop("env", self.env), capture_output=True, text=True, timeout=120, **kw
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr}")
        return proc

    def job(self, job_id: str) -> list[dict[str, str]]:
        """`scontrol show job` as one dict per job (an array gives one per task)."""
        text = self.run(["scontrol", "show", "job", "--oneliner", job_id]).stdout
        jobs = []
        for line in text.splitlines():
            if line.strip():
                jobs.append(dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", line)))
        if self.evidence is not None:
            self._record_trail(jobs)
        return jobs

    def wait_for(self, ready, timeout: float) -> None:
        """Until ``ready()`` (e.g. a job has written its first checkpoint)."""
        self._wait(ready, timeout, "timed out waiting")

    def wait(self, job_ids: list[str], timeout: float) -> None:
        """Until none of these jobs is pending or running. A requeued job is left to Slurm: it
        starts again once its hold has passed (CRED_EXPIRE_S + 1 s), never sooner."""
        deadline = time.monotonic() + timeout
        while True:
            jobs = [j for i in job_ids for j in self.job(i)]
            if not any(j["JobState"] in LIVE_STATES for j in jobs):
                return
            if time.monotonic() > deadline:
                states = {j["JobId"]: (j["JobState"], j.get("Reason")) for j in jobs}
                raise TimeoutError(f"jobs still live after {timeout} s: {states}\n{self.logs()}")
            time.sleep(1)
