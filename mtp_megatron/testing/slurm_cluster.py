"""TEST-ONLY: a real Slurm cluster on this machine (Debian's Slurm 22.05 and munge), for the launcher tests.

``SlurmCluster(folder, nodes=2, cpus_per_node=2).start()`` runs munged, slurmctld and one slurmd per emulated
node (the ``multiple-slurmd`` build: nodes ``n1..nN`` all at 127.0.0.1 on their own ports), everything under
``folder`` and as root, without systemd. ``env`` is what a client (``sbatch``, ``squeue``) needs; ``stop()``
cancels every job, waits for the queue to drain, shuts the daemons down in order and stops only the processes
it started. Requires the packages ``slurmctld slurmd slurm-client munge`` (.ci/run installs them).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from typing import Optional

_LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel")


def missing_binaries() -> list[str]:
    """The Slurm/munge programs not on PATH (also looked for in /usr/sbin)."""
    return [b for b in BINARIES if not (shutil.which(b) or os.path.exists(f"/usr/sbin/{b}"))]


def _binary(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class SlurmCluster:
    """A controller and ``nodes`` compute nodes of ``cpus_per_node`` CPUs, in partition ``test``."""

    def __init__(self, folder: str, nodes: int = 2, cpus_per_node: int = 2, memory_mb: int = 8000):
        self.folder, self.nodes, self.cpus, self.memory_mb = os.path.abspath(folder), nodes, cpus_per_node, memory_mb
        self.conf = os.path.join(self.folder, "slurm.conf")
        self.munge_socket = os.path.join(self.folder, "munge", "munge.socket")
        self._procs: list[subprocess.Popen] = []
        self.node_names = [f"n{i}" for i in range(1, nodes + 1)]

    @property
    def env(self) -> dict:
        """The environment for clients, and so for the jobs they submit: without any torch.distributed launcher
        variables of the calling process."""
        inherited = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARIABLES}
        return {**inherited, "SLURM_CONF": self.conf}

    # -- start ----------------------------------------------------------------------------------------------------

    def start(self, timeout_s: float = 60) -> "SlurmCluster":
        os.makedirs(self.folder, exist_ok=True)
        try:
            self._start_munge()
            self._write_configs()
            self._daemon([_binary("slurmctld"), "-D", "-f", self.conf], "slurmctld")
            for node in self.node_names:
                self._daemon([_binary("slurmd"), "-D", "-N", node, "-f", self._node_conf(node)], f"slurmd.{node}")
            self._wait_idle(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _daemon(self, cmd: list[str], name: str) -> None:
        log = open(os.path.join(self.folder, f"{name}.out"), "w")
        self._procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                            env={**os.environ, "SLURM_CONF": cmd[-1]}))

    def _start_munge(self) -> None:
        folder = os.path.dirname(self.munge_socket)
        os.makedirs(folder, exist_ok=True)
        os.chmod(folder, 0o755)
        key = os.path.join(folder, "munge.key")
        subprocess.run([_binary("mungekey"), "--create", f"--keyfile={key}"], check=True, capture_output=True)
        os.chmod(key, 0o600)
        self._procs.append(subprocess.Popen(
            [_binary("munged"), "--foreground", f"--socket={self.munge_socket}", f"--key-file={key}",
             f"--pid-file={folder}/munged.pid", f"--log-file={folder}/munged.log", f"--seed-file={folder}/seed",
             "--force"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        deadline = time.monotonic() + 10
        while not os.path.exists(self.munge_socket):
            if time.monotonic() > deadline:
                raise RuntimeError(f"munged did not create {self.munge_socket}")
            time.sleep(0.05)

    def _write_configs(self) -> None:
        f = self.folder
        ctld_port, *node_ports = _free_ports(1 + self.nodes)
        host = socket.gethostname().split(".")[0]
        lines = [
            "ClusterName=mtptest",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root", "SlurmdUser=root",
            f"AuthInfo=socket={self.munge_socket},cred_expire=10",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "MpiDefault=none", "ReturnToService=2", "MailProg=/bin/true", "JobRequeue=1",
            "KillWait=10", "MinJobAge=600",
            f"StateSaveLocation={f}/state", f"SlurmdSpoolDir={f}/spool.%n",
            f"SlurmctldPidFile={f}/slurmctld.pid", f"SlurmdPidFile={f}/slurmd.%n.pid",
            f"SlurmctldLogFile={f}/slurmctld.log", f"SlurmdLogFile={f}/slurmd.%n.log",
            "SlurmctldDebug=info", "SlurmdDebug=info",
        ]
        for name, port in zip(self.node_names, node_ports):
            lines.append(f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} "
                         f"CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN")
        lines.append(f"PartitionName=test Nodes={','.join(self.node_names)} Default=YES MaxTime=INFINITE State=UP "
                     "OverSubscribe=NO")
        os.makedirs(f"{f}/state", exist_ok=True)
        text = "\n".join(lines) + "\n"
        with open(self.conf, "w") as out:
            out.write(text)
        for name in self.node_names:  # each slurmd needs its own TmpFS (no %n there)
            tmpfs = f"{f}/tmp.{name}"
            os.makedirs(tmpfs, exist_ok=True)
            with open(self._node_conf(name), "w") as out:
                out.write(text + f"TmpFS={tmpfs}\n")

    def _node_conf(self, node: str) -> str:
        return os.path.join(self.folder, f"slurm.{node}.conf")

    def _wait_idle(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False)
            states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
            if len(states) == self.nodes and all(state == "idle" for state in states.values()):
                return
            for proc in self._procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"a Slurm daemon exited ({proc.args[0]}); logs in {self.folder}")
            time.sleep(0.2)
        raise RuntimeError(f"nodes not idle within {timeout_s} s; logs in {self.folder}")

    # -- use ------------------------------------------------------------------------------------------------------

    def run(self, cmd: list[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env={**self.env, **kwargs.pop("env", {})}, capture_output=True, text=True,
                              check=check, timeout=kwargs.pop("timeout", 60), **kwargs)

    def sbatch(self, args: list[str], env: Optional[dict] = None, cwd: Optional[str] = None) -> int:
        out = self.run(["sbatch", "--parsable", *args], env=env or {}, cwd=cwd)
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict:
        """``scontrol show job -o`` as a dict (JobState, ExitCode, Restarts, ...); {} once the job is forgotten."""
        out = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        fields = {}
        for item in out.stdout.split():
            key, sep, value = item.partition("=")
            if sep:
                fields[key] = value
        return fields

    def wait(self, job_id: int, timeout_s: float, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                           "NODE_FAIL", "OUT_OF_MEMORY")) -> dict:
        """Poll until the job reaches one of ``states`` (sbatch --wait polls too slowly); its fields."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {self.job(job_id).get('JobState')} after {timeout_s} s")

    # -- stop -----------------------------------------------------------------------------------------------------

    def stop(self) -> None:
        if any(p.poll() is None for p in self._procs[1:]):
            self.run(["scancel", "--user", "root"], check=False)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                out = self.run(["squeue", "-h"], check=False)
                if out.returncode != 0 or not out.stdout.strip():
                    break
                time.sleep(0.3)
            self.run(["scontrol", "shutdown"], check=False)
        for proc in reversed(self._procs):  # slurmds, slurmctld (told to shut down above), then munged
            if proc.args[0].endswith("munged") and proc.poll() is None:
                proc.terminate()
            if proc.poll() is None:
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGTERM)
                    try:
                        proc.wait(5)
                    except subprocess.TimeoutExpired:
                        os.killpg(proc.pid, signal.SIGKILL)
                        proc.wait()
        self._procs.clear()
