"""A private, real Slurm cluster on this host for the tests: its own munge key and socket, one
``slurmctld`` and two ``slurmd`` (``node1``, ``node2``) on distinct ports, no cgroups, no
accounting, under a temporary directory; stopped, and every trace removed, by ``stop``.

Debian's ``slurmctld``, ``slurmd``, ``slurm-client`` and ``munge`` packages (22.05 here); the
daemons run as root. ``node1``/``node2`` must resolve (the scripts set ``MASTER_ADDR`` to the first
node's name), so an ``/etc/hosts`` line is added and removed again."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, Optional

HOSTS_TAG = "# crnet-megatron test cluster"
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel")


def unavailable() -> Optional[str]:
    """Why a private cluster cannot run here, or None."""
    missing = [d for d in DAEMONS if not (shutil.which(d) or os.path.exists(f"/usr/sbin/{d}"))]
    if missing:
        return (f"Slurm is not installed ({', '.join(missing)} missing): apt-get install "
                "slurmctld slurmd slurm-client munge")
    if os.geteuid() != 0:
        return "the private Slurm cluster's daemons run as root (slurmd starts every job's tasks)"
    if not os.access("/etc/hosts", os.W_OK):
        return "/etc/hosts is read-only: node1/node2 (the scripts' MASTER_ADDR) cannot resolve"
    return None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class Cluster:
    """Start with ``start()``; ``env`` is what a client command needs (``SLURM_CONF``)."""

    def __init__(self, root: Path, cpus_per_node: int = 4):
        self.root, self.cpus = Path(root), cpus_per_node
        self.conf = self.root / "slurm.conf"
        self.env: Dict[str, str] = {}

    def _write_conf(self) -> None:
        r = self.root
        for d in ("state", "spool", "log"):
            (r / d).mkdir(parents=True, exist_ok=True)
        key = r / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        ctld, n1, n2 = _free_port(), _free_port(), _free_port()
        self.conf.write_text(f"""ClusterName=crnettest
SlurmctldHost=localhost
SlurmctldPort={ctld}
AuthType=auth/munge
AuthInfo=socket={r}/munge.sock
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.%n.log
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SlurmdParameters=config_overrides
KillWait=10
NodeName=node1 NodeHostname=localhost Port={n1} CPUs={self.cpus} RealMemory=8000 State=UNKNOWN
NodeName=node2 NodeHostname=localhost Port={n2} CPUs={self.cpus} RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP
""")

    def start(self) -> "Cluster":
        self._write_conf()
        r = self.root
        self.env = {"SLURM_CONF": str(self.conf)}
        env = {**os.environ, **self.env}
        subprocess.run([_sbin("munged"), "--force", f"--socket={r}/munge.sock",
                        f"--key-file={r}/munge.key", f"--log-file={r}/log/munged.log",
                        f"--pid-file={r}/munged.pid", f"--seed-file={r}/munged.seed"],
                       check=True, timeout=30, capture_output=True)
        self._add_hosts()
        subprocess.run([_sbin("slurmctld"), "-i"], env=env, check=True, timeout=30)
        for node in ("node1", "node2"):
            subprocess.run([_sbin("slurmd"), "-N", node], env=env, check=True, timeout=30)
        self._wait_idle()
        return self

    def _wait_idle(self, timeout: float = 60.0) -> None:
        deadline = time.time() + timeout
        out = ""
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%T %D"], env={**os.environ, **self.env},
                                 capture_output=True, text=True, timeout=30).stdout
            if out.split()[:2] == ["idle", "2"]:
                return
            time.sleep(0.5)
        raise RuntimeError(f"the test cluster's nodes did not come up: {out!r}\n{self.logs()}")

    def _add_hosts(self) -> None:
        hosts = Path("/etc/hosts")
        text = hosts.read_text()
        if HOSTS_TAG not in text:
            hosts.write_text(text.rstrip("\n") + f"\n127.0.0.1 node1 node2 {HOSTS_TAG}\n")

    def stop(self) -> None:
        env = {**os.environ, **self.env}
        subprocess.run(["scancel", "--full", "--user=root"], env=env, timeout=30,
                       capture_output=True)
        for pidfile in sorted(self.root.glob("*.pid")):
            try:
                os.kill(int(pidfile.read_text().split()[0]), signal.SIGTERM)
            except (ValueError, OSError):
                pass
        time.sleep(1)
        hosts = Path("/etc/hosts")
        lines = hosts.read_text().splitlines(keepends=True)
        hosts.write_text("".join(line for line in lines if HOSTS_TAG not in line))

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text()[-3000:]}"
                         for p in sorted((self.root / "log").glob("*.log")))

    # -- jobs ------------------------------------------------------------------------------
    def sbatch(self, args, env: Dict[str, str], cwd: Path) -> str:
        out = subprocess.run(["sbatch", "--parsable", *args], env={**env, **self.env},
                             cwd=str(cwd), capture_output=True, text=True, timeout=60)
        if out.returncode:
            raise RuntimeError(f"sbatch failed: {out.stderr.strip()}")
        return out.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> Dict[str, str]:
        """``scontrol show job -o`` as a dict (polled: ``sbatch --wait`` returns late)."""
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id],
                             env={**os.environ, **self.env}, capture_output=True, text=True,
                             timeout=30).stdout
        return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", out))

    def wait(self, job_id: str, timeout: float, until=("COMPLETED", "FAILED", "CANCELLED",
                                                      "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")):
        """The job's record once its state is one of ``until``; a job still PENDING or RUNNING
        at ``timeout`` is cancelled and the test fails naming its state and reason."""
        deadline = time.time() + timeout
        info: Dict[str, str] = {}
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in until:
                return info
            time.sleep(1)
        self.scancel(job_id)
        raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout:.0f} s "
                           f"(Reason={info.get('Reason')})")

    def scancel(self, job_id: str, *args: str) -> None:
        subprocess.run(["scancel", *args, job_id], env={**os.environ, **self.env}, timeout=30,
                       capture_output=True)
