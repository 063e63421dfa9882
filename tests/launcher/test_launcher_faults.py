"""Launcher faults end clearly: each through the real command line in a fresh process, in a few seconds.

launcher/torchrun.py: a node without node 0's address, nodes missing at the rendezvous timeout, SIGTERM/SIGINT
while waiting, a bad config (reported once, before torchrun starts, without importing torch or megatron-core);
launcher/mpirun.py without mpi4py or without an MPI library; slurm/train_13b.sh outside a Slurm job.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TORCHRUN = [sys.executable, "launcher/torchrun.py"]
TINY = ["--config", "configs/tiny.yaml"]
_SCRUBBED = ("NNODES", "SLURM_NNODES", "NODE_RANK", "SLURM_NODEID", "NPROC_PER_NODE", "MASTER_ADDR", "MASTER_PORT",
             "RDZV_ID", "RDZV_TIMEOUT", "MAX_RESTARTS", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def clean_env(**extra: str) -> dict:
    """This process's environment without launcher or Slurm variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED and not k.startswith("SLURM_")}
    return {**env, "PYTHONPATH": REPO, **extra}


def run(cmd: list[str], timeout: float = 30, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=clean_env(**env), capture_output=True, text=True, timeout=timeout)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def free_port_pair() -> int:
    """A port P with P and P + 1 free (the rendezvous and the launcher's arrival check)."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("", 0))
            port = a.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("", port + 1))
                except OSError:
                    continue
            return port
    raise RuntimeError("no two consecutive free ports")


def node(rank: int, nnodes: int, port: int, *extra: str) -> list[str]:
    return [*TORCHRUN, "--nnodes", str(nnodes), "--node-rank", str(rank), "--nproc-per-node", "1",
            "--master-port", str(port), *extra, "--", *TINY]


# -- launcher/torchrun.py ---------------------------------------------------------------------------------------


def test_other_nodes_need_the_master_address():
    """Node 1 without --master-addr/MASTER_ADDR: one line naming both, exit 2 (it used to wait for a rendezvous
    host at 127.0.0.1 and fail minutes later with C++ frames)."""
    start = time.monotonic()
    result = run([*TORCHRUN, "--nnodes", "2", "--node-rank", "1", "--", *TINY])
    assert result.returncode == 2, result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: node 1 of 2"), result.stderr
    assert "--master-addr" in lines[0] and "MASTER_ADDR" in lines[0]
    assert time.monotonic() - start < 10  # decided before torch is imported


def test_rendezvous_timeout_names_the_missing_nodes():
    """4 nodes, only 0 and 2 started, --rdzv-timeout 3: both stop after 3 s, naming who arrived and who did not,
    and no torchrun is started."""
    port = free_port_pair()
    host = subprocess.Popen(node(0, 4, port, "--rdzv-timeout", "3"), cwd=REPO, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        other = run(node(2, 4, port, "--rdzv-timeout", "3"), MASTER_ADDR="127.0.0.1")
        out, err = host.communicate(timeout=30)
    finally:
        host.kill()
    for rank, code, stdout, stderr in [(0, host.returncode, out, err),
                                       (2, other.returncode, other.stdout, other.stderr)]:
        assert code == 1, (stdout, stderr)
        lines = error_lines(stderr)
        assert len(lines) == 1 and lines[0].startswith(f"error: node {rank}: rendezvous timed out after 3 s"), stderr
        assert "2 of 4 nodes arrived (node ranks 0,2), missing node ranks 1,3" in lines[0]
        assert "torch.distributed.run" not in stdout


def test_rendezvous_timeout_without_node_0():
    port = free_port_pair()
    result = run(node(1, 2, port, "--rdzv-timeout", "1"), MASTER_ADDR="127.0.0.1")
    assert result.returncode == 1, result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "node 0 never answered at 127.0.0.1" in lines[0], result.stderr


@pytest.mark.parametrize("rank,sig", [(0, signal.SIGTERM), (1, signal.SIGINT)],
                         ids=["node0-SIGTERM", "node1-SIGINT"])
def test_a_signal_ends_a_launcher_waiting_for_its_peers(tmp_path, rank, sig):
    """While waiting for the other nodes (default timeout, 15 minutes), SIGTERM/SIGINT end the launcher at once
    with a message and 128 + the signal (torchrun used to ignore SIGTERM there and wait forever)."""
    port = free_port_pair()
    stdout = tmp_path / "stdout"
    with open(stdout, "w") as out:
        proc = subprocess.Popen(node(rank, 2, port), cwd=REPO, env=clean_env(MASTER_ADDR="127.0.0.1"), stdout=out,
                                stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while "waiting up to 900 s" not in stdout.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, stdout.read_text()
            time.sleep(0.05)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, err
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith(f"error: node {rank} of 2: received {sig.name}"), err


def test_a_bad_config_is_reported_once_before_torchrun():
    """One node of 2 processes with an unknown key: our one message, no torchrun (no per-rank copies, no
    ChildFailedError report)."""
    result = run([*TORCHRUN, "--nproc-per-node", "2", "--", *TINY, "train.no_such_field=1"])
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("error: override 'train.no_such_field=1': unknown key 'train.no_such_field'")
    assert result.stderr.count("error:") == 1, result.stderr
    assert "torch.distributed.run" not in result.stdout and "Traceback" not in result.stderr


def test_a_config_that_does_not_fit_the_job_is_reported_by_node_0():
    """tp=4 does not divide 2 nodes x 3 processes: node 0 lists the problem for world size 6, node 1 says one
    short line; neither waits for the other or starts torchrun."""
    args = ["--nnodes", "2", "--nproc-per-node", "3", "--master-port", str(free_port_pair())]
    first = run([*TORCHRUN, "--node-rank", "0", *args, "--", *TINY, "parallel.tp=4"])
    other = run([*TORCHRUN, "--node-rank", "1", *args, "--", *TINY, "parallel.tp=4"], MASTER_ADDR="127.0.0.1")
    assert first.returncode == 2 and other.returncode == 2, (first.stderr, other.stderr)
    assert first.stderr.startswith("error: invalid configuration (1 problem):")
    assert "world size 6 is not a multiple of tp*pp=4" in first.stderr
    lines = error_lines(other.stderr)
    assert len(lines) == 1, other.stderr
    assert lines[0].startswith("error: node 1: the training config is invalid; node 0 reports the problems")
    assert "torch.distributed.run" not in first.stdout + other.stdout


def test_the_config_check_imports_neither_torch_nor_megatron():
    result = run([sys.executable, "-X", "importtime", "launcher/torchrun.py", "--nproc-per-node", "2", "--", *TINY,
                  "train.no_such_field=1"])
    assert result.returncode == 2
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "mtp_megatron.config" in imported
    assert not {name for name in imported if name.split(".")[0] in ("torch", "megatron", "deepspeed")}


# -- launcher/mpirun.py -----------------------------------------------------------------------------------------


def _shadow_mpi4py(folder, exception: str) -> str:
    """A folder whose ``mpi4py`` package raises ``exception`` on import, as the real one does in that case."""
    package = folder / "mpi4py"
    package.mkdir()
    (package / "__init__.py").write_text(f"raise {exception}\n")
    return f"{folder}{os.pathsep}{REPO}"


@pytest.mark.parametrize("case", ["no_mpi4py", "libmpi_not_found", "no_mpi_library"])
def test_mpirun_without_mpi_says_what_to_install(tmp_path, case):
    """mpi4py missing, its extension module's libmpi.so.40 missing (ImportError), or no MPI library at all
    (mpi4py 4.1's RuntimeError "cannot load MPI library", here from the real mpi4py pointed at a missing one)."""
    if case == "no_mpi4py":
        env = {"PYTHONPATH": _shadow_mpi4py(tmp_path, "ModuleNotFoundError(\"No module named 'mpi4py'\", "
                                                      "name='mpi4py')")}
        expected = "launcher/mpirun.py needs mpi4py, which is not installed"
    elif case == "libmpi_not_found":
        env = {"PYTHONPATH": _shadow_mpi4py(tmp_path, "ImportError('libmpi.so.40: cannot open shared object file: "
                                                      "No such file or directory')")}
        expected = "mpi4py cannot load an MPI library (libmpi.so.40: cannot open shared object file"
    else:
        if importlib.util.find_spec("mpi4py") is None:
            pytest.skip("mpi4py is not installed")
        env = {"MPI4PY_LIBMPI": str(tmp_path / "libmpi.so")}
        expected = "mpi4py cannot load an MPI library (cannot load MPI library; "
    result = run([sys.executable, "launcher/mpirun.py", *TINY], **env)
    assert result.returncode == 2, result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"error: {expected}"), result.stderr
    assert "apt-get install libopenmpi-dev openmpi-bin" in lines[0] and "pip install mpi4py" in lines[0]


# -- slurm/train_13b.sh -----------------------------------------------------------------------------------------


def test_train_13b_outside_slurm_says_to_submit_it(tmp_path):
    """``bash slurm/train_13b.sh`` without a job: one line with the sbatch command, exit 2, nothing written."""
    run_dir = tmp_path / "run"
    result = run(["bash", "slurm/train_13b.sh"], RUN_DIR=str(run_dir), CONFIG="configs/tiny.yaml")
    assert result.returncode == 2, result.stdout + result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: slurm/train_13b.sh runs as a Slurm batch job"), lines
    assert "sbatch slurm/train_13b.sh" in lines[0] and result.stdout == ""
    assert not run_dir.exists()
