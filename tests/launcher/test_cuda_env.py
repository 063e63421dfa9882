"""CUDA_DEVICE_MAX_CONNECTIONS=1 for tensor-parallel GPU runs (mtp_megatron/distributed/cuda_env.py): what a run
needs, how mtp_megatron.train sets or warns, and what the launchers hand their workers (called in-process; no job
is started)."""

from __future__ import annotations

import importlib.util
import os

import pytest

from mtp_megatron import train
from mtp_megatron.config import load_config
from mtp_megatron.distributed import cuda_env

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "configs", "tiny.yaml")
NAME = "CUDA_DEVICE_MAX_CONNECTIONS"


def _cfg(*overrides: str):
    return load_config(TINY, list(overrides))


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"launcher_{name}", os.path.join(REPO, "launcher", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _unset(monkeypatch):
    monkeypatch.delenv(NAME, raising=False)


@pytest.mark.parametrize("device, tp, expected", [
    ("cuda", 2, {NAME: "1"}), ("auto", 2, {NAME: "1"}), ("cpu", 2, {}),
    ("cuda", 1, {}), ("auto", 1, {}), ("cpu", 1, {}),
])
def test_launch_variables(device, tp, expected):
    assert cuda_env.launch_variables(_cfg(f"train.device={device}", f"parallel.tp={tp}")) == expected


def test_unset_is_set_and_a_matching_value_is_kept():
    cfg = _cfg("train.device=cuda", "parallel.tp=2")
    environ = {}
    assert cuda_env.apply_launch_variables(cfg, environ) is None and environ == {NAME: "1"}
    assert cuda_env.apply_launch_variables(cfg, environ) is None and environ == {NAME: "1"}
    environ = {}
    assert cuda_env.apply_launch_variables(_cfg("train.device=cuda", "parallel.tp=1"), environ) is None
    assert environ == {}


def test_another_value_is_kept_with_one_warning_on_rank_0(capsys):
    cfg = _cfg("train.device=cuda", "parallel.tp=2")
    environ = {NAME: "8", "RANK": "0"}
    message = cuda_env.apply_launch_variables(cfg, environ)
    assert environ[NAME] == "8"
    assert f"{NAME}=8, and parallel.tp=2 wants 1" in message and f"Fix: export {NAME}=1" in message
    assert capsys.readouterr().err == f"warning: {message}\n"
    assert cuda_env.apply_launch_variables(cfg, {NAME: "8", "RANK": "3"}) == message
    assert capsys.readouterr().err == ""  # other ranks say nothing


def test_too_late_once_cuda_is_initialised(monkeypatch, capsys):
    monkeypatch.setattr(cuda_env, "_cuda_context_exists", lambda: True)
    environ = {}
    message = cuda_env.apply_launch_variables(_cfg("train.device=cuda", "parallel.tp=2"), environ, rank=0)
    assert environ == {} and "CUDA is already initialised in this process" in message
    assert "warning:" in capsys.readouterr().err


def test_train_main_sets_it_before_any_cuda_work(monkeypatch):
    train.prepare_cuda_environment(_cfg("train.device=cuda", "parallel.tp=2"))
    assert os.environ[NAME] == "1"
    monkeypatch.delenv(NAME)
    train.prepare_cuda_environment(_cfg("train.device=cpu", "parallel.tp=2"))
    assert NAME not in os.environ
    # megatron's advice about the variable is no longer silenced for every run (train.py _KNOWN_NOTICES)
    assert not any("CUDA_DEVICE_MAX_CONNECTIONS" in pattern for _, pattern in train._KNOWN_NOTICES)


@pytest.fixture
def torchrun_launcher(monkeypatch):
    for name in ("NNODES", "SLURM_NNODES", "NODE_RANK", "SLURM_NODEID", "NPROC_PER_NODE", "MASTER_ADDR",
                 "MASTER_PORT", "RDZV_ID", "RDZV_TIMEOUT", "SLURM_JOB_ID", "MAX_RESTARTS"):
        monkeypatch.delenv(name, raising=False)
    return _load("torchrun")


def test_torchrun_launcher_hands_workers_the_variable(torchrun_launcher, monkeypatch):
    args, train_args = torchrun_launcher.parse_args(
        ["--nproc-per-node", "2", "--", "--config", TINY, "parallel.tp=2", "train.device=cuda"])
    cfg = torchrun_launcher.check_training_config(args, train_args)
    assert cfg.parallel.tp == 2
    assert torchrun_launcher.launch_environment(args, cfg)[NAME] == "1"
    monkeypatch.setenv(NAME, "4")  # the user's own value wins (and train warns about it)
    assert torchrun_launcher.launch_environment(args, cfg)[NAME] == "4"
    monkeypatch.delenv(NAME)
    args, train_args = torchrun_launcher.parse_args(["--nproc-per-node", "2", "--", "--config", TINY])
    assert NAME not in torchrun_launcher.launch_environment(args, torchrun_launcher.check_training_config(args, train_args))
    args, train_args = torchrun_launcher.parse_args(["--", "--help-config"])
    assert torchrun_launcher.check_training_config(args, train_args) is None


def test_mpirun_launcher_sets_it_before_mpi_starts():
    mpirun = _load("mpirun")
    mpirun.set_cuda_environment(["--config", TINY, "parallel.tp=2", "train.device=cuda"])
    assert os.environ[NAME] == "1"
    del os.environ[NAME]
    mpirun.set_cuda_environment(["--config", TINY, "parallel.tp=2"])  # tiny.yaml runs on the CPU
    mpirun.set_cuda_environment(["--config", TINY, "parallel.tp=x"])  # a bad config is train's to report
    assert NAME not in os.environ
