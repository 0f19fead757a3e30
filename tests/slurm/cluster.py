"""A private single-node Slurm cluster (slurmctld + slurmd) for tests.

Everything lives under one directory: ``slurm.conf`` (auth/none, cred/none,
so no munge daemon), state, spool, logs, pid files and the job-completion
log. Ports are chosen free at start, so the cluster neither needs nor touches
a system Slurm installation's configuration, and several can coexist.
Clients (``sbatch``, ``scontrol``, ``sinfo``) reach it through ``SLURM_CONF``,
which :meth:`LocalSlurm.env` provides. The daemons run in the foreground
(``-D``) as children of the test process and are stopped by PID.
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

SLURM_BINARIES = ("slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "srun")


def slurm_available() -> bool:
    return all(shutil.which(b) for b in SLURM_BINARIES)


def ensure_slurm_installed() -> str | None:
    """Install Debian's ``slurm-wlm`` when missing; ``None`` on success, else why not.

    Installing needs root and apt; elsewhere the caller decides whether a
    missing Slurm is a skip (developer machine) or a failure (CI).
    """
    if slurm_available():
        return None
    if not shutil.which("apt-get"):
        return "slurm-wlm is not installed and there is no apt-get to install it"
    if os.geteuid() != 0:
        return "slurm-wlm is not installed and installing it needs root"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "--no-install-recommends", "slurm-wlm"]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            return f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}"
    return None if slurm_available() else "slurm-wlm installed but its binaries are not on PATH"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LocalSlurm:
    """One controller and one compute node named ``localhost`` under ``root``."""

    root: Path
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def jobcomp_log(self) -> Path:
        return self.root / "jobcomp.log"

    def env(self) -> dict[str, str]:
        """The test process's environment pointed at this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def write_conf(self) -> None:
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # An empty plugin stack keeps a host's SPANK plugins (pyxis, ...) out.
        (self.root / "plugstack.conf").write_text("")
        user = getpass.getuser()
        r = self.root
        lines = [
            "ClusterName=nemogdrotest",
            "SlurmctldHost=localhost",
            f"SlurmUser={user}",
            f"SlurmdUser={user}",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            # No munge daemon: the cluster is private to this machine.
            "AuthType=auth/none",
            "CredType=cred/none",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            f"PlugStackConfig={r / 'plugstack.conf'}",
            # No cgroups in containers: track processes by parent PID, bind nothing.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            # No slurmdbd, so sacct has nothing; the completion log records final states.
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={self.jobcomp_log}",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/builtin",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "ReturnToService=2",
            # Keep finished jobs visible to `scontrol show job` for the assertions.
            "MinJobAge=3600",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=30",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            f"NodeName=localhost CPUs={self.cpus} State=UNKNOWN",
            "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 60.0) -> None:
        self.write_conf()
        env = self.env()
        log_dir = self.root / "log"
        # -i: ignore any stale state; -D: foreground, so the PID we hold is the daemon's.
        self.procs["slurmctld"] = subprocess.Popen(
            ["slurmctld", "-D", "-i", "-f", str(self.conf)],
            env=env, stdout=open(log_dir / "slurmctld.stdout", "wb"), stderr=subprocess.STDOUT,
        )
        self._wait(lambda: self._ok(["scontrol", "ping"], "UP"), timeout, "slurmctld to answer `scontrol ping`")
        self.procs["slurmd"] = subprocess.Popen(
            ["slurmd", "-D", "-N", "localhost", "-f", str(self.conf)],
            env=env, stdout=open(log_dir / "slurmd.stdout", "wb"), stderr=subprocess.STDOUT,
        )
        self._wait(self._node_idle, timeout, "node localhost to become idle in `sinfo`")

    def _ok(self, cmd: list[str], needle: str) -> bool:
        proc = subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=30)
        return proc.returncode == 0 and needle in proc.stdout

    def _node_idle(self) -> bool:
        proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], env=self.env(), capture_output=True, text=True, timeout=30)
        return proc.returncode == 0 and proc.stdout.strip().startswith("idle")

    def _wait(self, cond: object, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for {what}\n{self.logs()}")
            if cond():  # type: ignore[operator]
                return
            time.sleep(0.5)
        raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}\n{self.logs()}")

    def logs(self, tail: int = 40) -> str:
        out = []
        for path in sorted((self.root / "log").glob("*")):
            lines = path.read_text(errors="replace").splitlines()[-tail:]
            out.append(f"--- {path.name} ---\n" + "\n".join(lines))
        return "\n".join(out)

    def stop(self) -> None:
        """Stop the daemons this object started, by PID (slurmd first, so it does
        not report the controller's disappearance as a node failure)."""
        for name in ("slurmd", "slurmctld"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    # ------------------------------------------------------------------ jobs
    def sbatch(self, args: list[str], env: dict[str, str], cwd: Path) -> int:
        proc = subprocess.run(["sbatch", "--parsable", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch failed ({proc.returncode}): {proc.stderr}\n{self.logs()}")
        return int(proc.stdout.strip().split(";")[0])

    def job_fields(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (empty once the record is gone)."""
        proc = subprocess.run(
            ["scontrol", "show", "job", "-o", str(job_id)], env=self.env(), capture_output=True, text=True, timeout=30
        )
        if proc.returncode != 0:
            return {}
        return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", proc.stdout))

    def wait_job(self, job_id: int, timeout: float) -> dict[str, str]:
        """Poll until the job leaves PENDING/RUNNING/COMPLETING; its final fields."""
        deadline = time.monotonic() + timeout
        fields: dict[str, str] = {}
        while time.monotonic() < deadline:
            fields = self.job_fields(job_id)
            state = fields.get("JobState", "")
            if state and state not in {"PENDING", "RUNNING", "COMPLETING", "CONFIGURING", "REQUEUED"}:
                return fields
            time.sleep(2)
        subprocess.run(["scancel", str(job_id)], env=self.env(), timeout=30)
        raise TimeoutError(f"job {job_id} still {fields.get('JobState')} after {timeout:.0f}s\n{self.logs()}")

    def jobcomp_state(self, job_id: int) -> str | None:
        """The final state the controller wrote to the job-completion log (its latest record:
        a requeued job gets one per run)."""
        if not self.jobcomp_log.exists():
            return None
        state = None
        for line in self.jobcomp_log.read_text().splitlines():
            if f"JobId={job_id} " in line:
                m = re.search(r"JobState=(\S+)", line)
                state = m.group(1) if m else None
        return state
