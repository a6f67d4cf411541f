"""A real SLURM cluster on this machine: one controller and two node daemons (node1, node2) on
127.0.0.1, from Debian's slurm-wlm packages, with no authentication (auth/none) since every daemon
and client runs as the same user on one machine."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Dict, List

from launch import free_port

PACKAGES = ["slurmctld", "slurmd", "slurm-client"]


def ensure_installed() -> None:
    if all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "sbatch", "scontrol")):
        return
    if os.geteuid() != 0:
        raise RuntimeError(f"SLURM is not installed and installing it needs root: apt-get install {' '.join(PACKAGES)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", *PACKAGES], check=True, env=env, capture_output=True)


CONFIG = """\
ClusterName=mmcltest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.%n.log
MinJobAge=600
KillWait=10
InactiveLimit=0
NodeName=node1 NodeAddr=127.0.0.1 Port={node1_port} CPUs=2 RealMemory=4000 State=UNKNOWN
NodeName=node2 NodeAddr=127.0.0.1 Port={node2_port} CPUs=2 RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP
"""


class Cluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.daemons: List[subprocess.Popen] = []

    def start(self) -> "Cluster":
        (self.root / "state").mkdir(parents=True)
        self.conf.write_text(
            CONFIG.format(root=self.root, ctld_port=free_port(), node1_port=free_port(), node2_port=free_port())
        )
        self.daemons.append(
            subprocess.Popen(
                ["slurmctld", "-D", "-i", "-f", str(self.conf)],
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        for node in ("node1", "node2"):
            (self.root / "spool" / node).mkdir(parents=True)
            self.daemons.append(
                subprocess.Popen(
                    ["slurmd", "-D", "-N", node, "-f", str(self.conf)],
                    env=self.env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        self.wait(lambda: self.run("sinfo", "-h", "-o", "%T %D").split() == ["idle", "2"], 60, "nodes idle")
        return self

    def stop(self) -> None:
        subprocess.run(["scancel", "--full", "--user", "root"], env=self.env, capture_output=True)
        for daemon in self.daemons:
            daemon.terminate()
        for daemon in self.daemons:
            try:
                daemon.wait(timeout=20)
            except subprocess.TimeoutExpired:
                daemon.kill()

    def run(self, *command: str, cwd: Path | None = None, extra_env: Dict[str, str] | None = None) -> str:
        result = subprocess.run(
            command, env={**self.env, **(extra_env or {})}, cwd=cwd, capture_output=True, text=True, timeout=60
        )
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)}: {result.stderr.strip()}")
        return result.stdout.strip()

    def job(self, job_id: str) -> Dict[str, str]:
        """scontrol's fields of a job, e.g. JobState, Restarts, ExitCode."""
        fields = {}
        for item in self.run("scontrol", "show", "job", "-o", job_id).split():
            key, _, value = item.partition("=")
            fields[key] = value
        return fields

    def wait_for_state(self, job_id: str, states: set, timeout: float) -> Dict[str, str]:
        info: Dict[str, str] = {}

        def reached() -> bool:
            nonlocal info
            info = self.job(job_id)
            return info["JobState"] in states

        self.wait(reached, timeout, f"job {job_id} in {states} (last: {info.get('JobState')})")
        return info

    def wait(self, predicate, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while True:
            try:
                if predicate():
                    return
            except RuntimeError:
                pass  # the controller may not answer yet
            if time.time() > deadline:
                logs = "\n".join(p.read_text()[-2000:] for p in self.root.glob("*.log"))
                raise TimeoutError(f"timed out waiting for {what}\n{logs}")
            time.sleep(0.25)
