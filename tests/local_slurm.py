"""A single-node SLURM cluster on this machine, for the tests and the SLURM benchmark.

Needs the Debian packages ``slurm-wlm`` and ``munge`` and root (slurmd runs jobs as their user).
Everything the daemons write (munge key and socket, slurm.conf, state, spool, logs) lives under one
folder; the node is this host (``hostname -s``) with the CPUs and memory ``slurmd -C`` reports.
``start()`` sets ``SLURM_CONF`` in this process's environment, so ``sbatch``, ``squeue``,
``scontrol`` and ``scancel`` (and submitit, which calls them) talk to this cluster; ``stop()``
ends the daemons by the PIDs it started.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil

DAEMONS = ("munged", "slurmctld", "slurmd")


def missing() -> str | None:
    """Why a local cluster cannot start here, or None."""
    absent = [name for name in (*DAEMONS, "sbatch", "squeue") if shutil.which(name) is None
              and not Path("/usr/sbin", name).exists()]
    if absent:
        return (f"{', '.join(absent)} not found: install the Debian packages with `apt-get install -y "
                "--no-install-recommends slurm-wlm munge`")
    if os.geteuid() != 0:
        return "a local SLURM cluster needs root (slurmd starts each job as its user)"
    return None


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    """Running, not a zombie (a daemon that has exited but is not yet reaped)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class LocalSlurm:
    """munged + slurmctld + slurmd, one partition ``debug`` holding this host."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.host = socket.gethostname().split(".")[0]
        self.pids: dict[str, int] = {}
        self.conf = self.root / "slurm.conf"

    def _node_line(self) -> str:
        # `slurmd -C` prints this host's real CPUs, sockets, cores, threads and RealMemory.
        line = subprocess.run([_binary("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
        fields = [f for f in line.splitlines()[0].split() if not f.startswith("UpTime")]
        return " ".join(fields) + " State=UNKNOWN"

    def _write_config(self) -> None:
        r = self.root
        for sub in ("munge", "state", "spool", "log"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        key = r / "munge" / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        (r / "munge").chmod(0o700)
        ctl_port, d_port = _free_port(), _free_port()
        self.conf.write_text("\n".join([
            "ClusterName=flowad-test",
            f"SlurmctldHost={self.host}",
            f"SlurmctldPort={ctl_port}",
            f"SlurmdPort={d_port}",
            "SlurmUser=root",
            "AuthType=auth/munge",
            f"AuthInfo=socket={r / 'munge' / 'munge.socket'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "ReturnToService=2",
            "MpiDefault=none",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SchedulerType=sched/backfill",
            "KillWait=2",  # seconds from SIGTERM to SIGKILL when a job is cancelled or times out
            "MinJobAge=3600",  # finished jobs stay visible to `scontrol show job` for an hour
            self._node_line(),
            f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))

    def _start(self, name: str, args: list[str], pid_file: Path) -> None:
        subprocess.run([_binary(name), *args], check=True, capture_output=True,
                       env={**os.environ, "SLURM_CONF": str(self.conf)})
        for _ in range(100):  # the daemons fork and write their PID file
            if pid_file.exists() and pid_file.read_text().strip():
                self.pids[name] = int(pid_file.read_text().split()[0])
                return
            time.sleep(0.05)
        raise RuntimeError(f"{name} did not start: see {self.root / 'log'}")

    def start(self, timeout: float = 30.0) -> LocalSlurm:
        self._write_config()
        m = self.root / "munge"
        self._start("munged", [f"--key-file={m / 'munge.key'}", f"--socket={m / 'munge.socket'}",
                               f"--pid-file={m / 'munged.pid'}", f"--log-file={m / 'munged.log'}",
                               f"--seed-file={m / 'munged.seed'}", "--force"], m / "munged.pid")
        self._start("slurmctld", ["-i"], self.root / "slurmctld.pid")
        self._start("slurmd", [], self.root / "slurmd.pid")
        os.environ["SLURM_CONF"] = str(self.conf)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # the node registers with the controller
            state = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True).stdout
            if state.strip() in ("idle", "mixed", "allocated"):
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the local SLURM node did not come up within {timeout:.0f} s: see {self.root / 'log'}")

    def stop(self) -> None:
        for name in reversed(DAEMONS):
            pid = self.pids.pop(name, None)
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            for _ in range(100):
                if not _alive(pid):
                    break
                time.sleep(0.05)
        if os.environ.get("SLURM_CONF") == str(self.conf):
            del os.environ["SLURM_CONF"]
