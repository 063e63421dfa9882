"""launcher/torchrun.py (arguments and environment -> torchrun command) and launcher/mpirun.py (a real 4-rank
TP2 x PP2 run under Open MPI's mpirun)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"launcher_{name}", os.path.join(REPO, "launcher", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def torchrun_launcher(monkeypatch):
    for name in ("NNODES", "SLURM_NNODES", "NODE_RANK", "SLURM_NODEID", "NPROC_PER_NODE", "MASTER_ADDR",
                 "MASTER_PORT", "RDZV_ID", "RDZV_TIMEOUT", "SLURM_JOB_ID", "MAX_RESTARTS",
                 "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"):
        monkeypatch.delenv(name, raising=False)
    return _load("torchrun")


def test_torchrun_command_from_slurm_environment(torchrun_launcher, monkeypatch):
    monkeypatch.setenv("SLURM_NNODES", "16")
    monkeypatch.setenv("SLURM_NODEID", "3")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("MASTER_ADDR", "node001")
    monkeypatch.setenv("NPROC_PER_NODE", "8")
    args, train_args = torchrun_launcher.parse_args(["--", "--config", "configs/13b.yaml", "train.iters=5"])
    cmd = torchrun_launcher.torchrun_command(args, train_args)
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    for flag in ("--nnodes=16", "--nproc-per-node=8", "--rdzv-backend=c10d", "--rdzv-endpoint=node001:29500",
                 "--rdzv-id=4242", "--rdzv-conf=is_host=false,join_timeout=900", "--max-restarts=0"):
        assert flag in cmd
    assert cmd[-5:] == ["-m", "mtp_megatron.train", "--config", "configs/13b.yaml", "train.iters=5"]
    env = torchrun_launcher.launch_environment(args)
    assert "SIGTERM" not in env["TORCHELASTIC_SIGNALS_TO_HANDLE"]
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in env  # only needed for restarts


def test_torchrun_arguments_win_over_environment(torchrun_launcher, monkeypatch):
    monkeypatch.setenv("SLURM_NNODES", "16")
    args, _ = torchrun_launcher.parse_args(["--nnodes", "2", "--node-rank", "0", "--nproc-per-node", "4",
                                            "--master-addr", "10.0.0.1", "--master-port", "6000",
                                            "--max-restarts", "3", "--rdzv-timeout", "30"])
    cmd = torchrun_launcher.torchrun_command(args, [])
    assert "--nnodes=2" in cmd and "--rdzv-endpoint=10.0.0.1:6000" in cmd
    assert "--rdzv-conf=is_host=true,join_timeout=30" in cmd
    assert torchrun_launcher.launch_environment(args)["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"


def test_torchrun_rejects_a_node_rank_outside_the_job(torchrun_launcher, capsys):
    with pytest.raises(SystemExit):
        torchrun_launcher.parse_args(["--nnodes", "2", "--node-rank", "2"])
    assert "--node-rank 2 is outside 0..1" in capsys.readouterr().err


@pytest.mark.distributed
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="Open MPI is not installed (apt-get install openmpi-bin)")
def test_mpirun_launches_a_tp2_pp2_run(tmp_path):
    run_dir = tmp_path / "run"
    cmd = ["mpirun", "-np", "4", "--oversubscribe", "--mca", "btl", "self,vader", "--mca", "oob_tcp_if_include",
           "lo", "-x", "OMP_NUM_THREADS=1", "-x", "PYTHONPATH", sys.executable, "launcher/mpirun.py",
           "--config", "configs/tiny.yaml", "parallel.tp=2", "parallel.pp=2", "train.iters=3",
           "model.seq_length=64", f"run.dir={run_dir}", "logging.tensorboard=false", "checkpoint.save=false"]
    if os.geteuid() == 0:
        cmd.insert(1, "--allow-run-as-root")
    env = {key: value for key, value in os.environ.items() if key not in ("MASTER_ADDR", "MASTER_PORT")}
    result = subprocess.run(cmd, cwd=REPO, env={**env, "PYTHONPATH": REPO}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[-1]["loss"] < records[0]["loss"]
    config = (run_dir / "config.yaml").read_text()
    assert "tp: 2" in config and "pp: 2" in config
    assert json.loads((run_dir / "run_state.json").read_text())["state"] == "finished"
