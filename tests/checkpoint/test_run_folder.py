"""The run folder under faults and second thoughts: rolling back, damaged and corrupted checkpoints, a rejected
relaunch, a second job in the same folder, a full disk. Nothing may be lost, mixed or silently restarted.

Every run is the public ``train(cfg)`` (or the command line), reading a real dataset, one gloo rank.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mtp_megatron.checkpoint import store
from mtp_megatron.checkpoint.store import CheckpointError
from mtp_megatron.config import ConfigError, load_config
from mtp_megatron.testing.distributed import run_distributed
from mtp_megatron.train import train
from mtp_megatron.training.run_lock import LOCK_FILE, RunLockedError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(tmp: str, name: str, data: list[str], *overrides: str):
    return load_config(os.path.join(REPO, "configs/tiny.yaml"), [
        "model.seq_length=32", f"run.dir={tmp}/{name}", "logging.tensorboard=false", "data.synthetic=false",
        f"data.paths=[{','.join(data)}]", f"data.cache_dir={tmp}/cache", "checkpoint.interval=2", "mtp.n_heads=2",
        *overrides])


def _steps(history) -> list[int]:
    return [len(history)]


def _ckpts(run_dir: str) -> list[str]:
    return [os.path.basename(p) for p in store.committed(os.path.join(run_dir, "checkpoints"))]


def _error(fn) -> str:
    try:
        fn()
    except (CheckpointError, ConfigError, RunLockedError) as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def _metric_steps(run_dir: str) -> list[int]:
    return [json.loads(line)["step"] for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def rollbacks_and_damage(tmp: str, data: list[str]) -> dict:
    run = f"{tmp}/run"
    ckpts = f"{run}/checkpoints"
    out = {}
    train(_config(tmp, "run", data, "train.iters=6"))
    # Roll back to iter_4 by naming it: the run continues there, and the abandoned iter_6 is kept aside.
    rolled = train(_config(tmp, "run", data, "train.iters=8", f"checkpoint.load={ckpts}/iter_0000004"))
    out["rollback_steps"] = len(rolled)
    out["after_rollback"] = _ckpts(run)
    out["set_aside"] = sorted(os.listdir(f"{ckpts}/{store.SET_ASIDE}"))
    out["latest_after_rollback"] = open(f"{ckpts}/latest").read().strip()
    # The same command again (a requeue keeps its overrides): it continues from latest, not from iter_4 again.
    out["relaunch_steps"] = len(train(_config(tmp, "run", data, "train.iters=10",
                                              f"checkpoint.load={ckpts}/iter_0000004")))
    # A shard of the newest checkpoint corrupted in place, same size: named, and the one before is used.
    newest = f"{ckpts}/iter_0000010"
    shard = sorted(n for n in os.listdir(newest) if n.endswith(".distcp"))[0]
    with open(os.path.join(newest, shard), "r+b") as f:
        f.seek(os.path.getsize(os.path.join(newest, shard)) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    out["corrupted_shard"] = shard
    out["fallback_steps"] = len(train(_config(tmp, "run", data, "train.iters=12")))
    out["set_aside_after_fallback"] = sorted(os.listdir(f"{ckpts}/{store.SET_ASIDE}"))
    # Every checkpoint damaged: refused, naming each, and nothing deleted, pruned or appended.
    for name in _ckpts(run):
        folder = f"{ckpts}/{name}"
        shard = sorted(n for n in os.listdir(folder) if n.endswith(".distcp"))[0]
        with open(os.path.join(folder, shard), "r+b") as f:
            f.truncate(10)
    os.remove(f"{ckpts}/iter_0000002/common.pt")
    before = (_ckpts(run), _metric_steps(run))
    out["all_damaged"] = _error(lambda: train(_config(tmp, "run", data, "train.iters=14", "checkpoint.keep=1")))
    out["untouched"] = before == (_ckpts(run), _metric_steps(run))
    return out


@pytest.mark.distributed
def test_rolling_back_falling_back_and_refusing_damaged_checkpoints(tmp_path, byte_datasets):
    out = run_distributed(rollbacks_and_damage, 1, str(tmp_path), byte_datasets)[0]
    assert out["rollback_steps"] == 4  # steps 5..8 from iter_4
    assert out["after_rollback"] == ["iter_0000002", "iter_0000004", "iter_0000006", "iter_0000008"]
    assert len(out["set_aside"]) == 1  # the abandoned iter_6, in one timestamped folder
    assert out["latest_after_rollback"] == "iter_0000008"
    assert out["relaunch_steps"] == 2  # 9..10, from iter_8
    assert out["fallback_steps"] == 4  # 9..12 again, from iter_8: iter_10 is corrupted
    assert len(out["set_aside_after_fallback"]) == 2  # the corrupted iter_10 was kept when step 10 was saved again
    message = out["all_damaged"]
    assert message.startswith("CheckpointError:") and "none of them can be loaded" in message
    for name in ("iter_0000006", "iter_0000008", "iter_0000010", "iter_0000012"):
        assert name in message
    assert "common.pt is missing" in message and "new run.dir" in message
    assert out["untouched"]


def relaunches_and_locks(tmp: str, data: list[str]) -> dict:
    out = {}
    run = f"{tmp}/run"
    train(_config(tmp, "run", data, "train.iters=2"))
    saved_config = open(f"{run}/config.yaml").read()
    out["rejected"] = _error(lambda: train(_config(tmp, "run", data, "train.iters=4", "model.hidden_size=128")))
    out["config_kept"] = open(f"{run}/config.yaml").read() == saved_config
    # A second live job in the folder (a live process on this host holds the lock): refused by name.
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        with open(f"/proc/{holder.pid}/stat") as f:
            start = f.read().rsplit(")", 1)[1].split()[19]
        with open(f"{run}/{LOCK_FILE}", "w") as f:
            json.dump({"host": os.uname().nodename, "pid": holder.pid, "pid_start": start, "slurm_job_id": None,
                       "started": 0, "heartbeat": 0}, f)
        out["locked"] = _error(lambda: train(_config(tmp, "run", data, "train.iters=4")))
        out["metrics_after_locked"] = _metric_steps(run)
    finally:
        holder.kill()
        holder.wait()
    # Its holder is gone now: the lock is stale and the next run takes it over.
    out["takeover_steps"] = len(train(_config(tmp, "run", data, "train.iters=4")))
    out["lock_left"] = os.path.exists(f"{run}/{LOCK_FILE}")
    open(f"{tmp}/a_file", "w").close()
    out["file_run_dir"] = _error(lambda: train(_config(tmp, "a_file", data, "train.iters=2")))
    return out


@pytest.mark.distributed
def test_rejected_relaunches_and_second_jobs_change_nothing(tmp_path, byte_datasets):
    out = run_distributed(relaunches_and_locks, 1, str(tmp_path), byte_datasets)[0]
    assert out["rejected"].startswith("CheckpointError:") and "model.hidden_size" in out["rejected"]
    assert out["config_kept"]
    assert out["locked"].startswith("RunLockedError:") and "in use by another run" in out["locked"]
    assert out["metrics_after_locked"] == [1, 2]  # the refused job wrote nothing
    assert out["takeover_steps"] == 2 and not out["lock_left"]
    assert out["file_run_dir"].startswith("ConfigError:") and "is not a folder" in out["file_run_dir"]


@pytest.mark.parametrize("arguments", [[], ["--config", "configs/13b.yaml"]], ids=["no_config", "13b_without_data"])
def test_no_training_data_is_a_config_error(arguments, tmp_path):
    result = subprocess.run([sys.executable, "-m", "mtp_megatron.train", *arguments, f"run.dir={tmp_path}/run"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "data.paths: no training data is configured" in result.stderr and "data.synthetic=true" in result.stderr
    assert "Traceback" not in result.stderr and not os.path.exists(f"{tmp_path}/run")


@pytest.fixture
def small_disk(tmp_path):
    """A 14 MiB tmpfs: room for one checkpoint of the test model (about 8.5 MB), not for two."""
    folder = tmp_path / "small_disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=14m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()}): needs root")
    yield str(folder)
    subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_full_disk_during_a_save_ends_clearly_and_keeps_the_last_checkpoint(small_disk, tmp_path, byte_datasets):
    run = f"{small_disk}/run"
    result = subprocess.run(
        [sys.executable, "-m", "mtp_megatron.train", "--config", "configs/tiny.yaml", "model.seq_length=32",
         "mtp.n_heads=2", "train.iters=4", "checkpoint.interval=1", "logging.tensorboard=false",
         "data.synthetic=false", f"data.paths=[{byte_datasets[0]}]", f"data.cache_dir={tmp_path}/cache",
         f"run.dir={run}"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"no space left on device at {run}/checkpoints" in errors[0]
    assert f"The last complete checkpoint is {run}/checkpoints/iter_0000001" in errors[0]
    assert _ckpts(run) == ["iter_0000001"] and store.problems(f"{run}/checkpoints/iter_0000001") == []
    state = json.load(open(f"{run}/run_state.json"))
    assert state["state"] == "failed" and state["step"] == 2 and "SaveError" in state["reason"]
