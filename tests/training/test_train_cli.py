"""The user-facing command: torchrun + ``python -m mtp_megatron.train`` with configs/tiny.yaml."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from mtp_megatron.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, **kwargs)


@pytest.mark.distributed
def test_tiny_config_trains_every_head_under_pipeline_parallelism(tmp_path):
    """50 steps of configs/tiny.yaml (n=4) on 2 ranks with PP=2: every head's loss falls; outputs are complete."""
    run_dir = tmp_path / "run"
    result = _run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "mtp_megatron.train",
         "--config", "configs/tiny.yaml", "parallel.pp=2", "train.iters=50", f"run.dir={run_dir}"],
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 51))
    expected = {"step", "loss", "lr", "grad_norm", "tokens_per_s"}
    expected |= {f"{kind}/head_{i}" for kind in ("loss", "acc") for i in range(1, 5)}
    assert expected <= set(records[0])

    for i in range(1, 5):
        first = sum(r[f"loss/head_{i}"] for r in records[:5]) / 5
        last = sum(r[f"loss/head_{i}"] for r in records[-5:]) / 5
        assert last < 0.8 * first, f"head {i}: loss {first:.3f} -> {last:.3f}"
        assert records[-1][f"acc/head_{i}"] > records[0][f"acc/head_{i}"]
    for r in records:  # the logged total is the sum of the heads
        assert r["loss"] == pytest.approx(sum(r[f"loss/head_{i}"] for i in range(1, 5)), rel=1e-9)

    # The resolved config next to the run reloads to the same config the run used.
    resolved = load_config(str(run_dir / "config.yaml"))
    assert resolved.parallel.pp == 2 and resolved.mtp.n_heads == 4 and resolved.run.dir == str(run_dir)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["iters"] == 50
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(run_dir / "tensorboard"))
    assert "step 50/50" in result.stdout


def test_bad_config_fails_before_any_work(tmp_path):
    """A config error exits with status 2 and a message naming the field and the fix, in well under a second of
    work (no process group, no model)."""
    result = _run([sys.executable, "-m", "mtp_megatron.train", "--config", "configs/tiny.yaml", "parallel.tp=3",
                   f"run.dir={tmp_path}/run"], timeout=120)
    assert result.returncode == 2
    assert "model.num_attention_heads" in result.stderr and "Fix:" in result.stderr
    assert not (tmp_path / "run").exists()

    result = _run([sys.executable, "-m", "mtp_megatron.train", "--config", "configs/tiny.yaml", "mtp.n_head=2"],
                  timeout=120)
    assert result.returncode == 2 and "did you mean 'mtp.n_heads'" in result.stderr


def test_unreadable_configs_are_one_line_each(tmp_path):
    """A missing --config file and a YAML syntax error (with file, line and column): exit 2, no traceback."""
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  iters: 3\n  seed: [1, 2\n")
    cases = {str(tmp_path / "missing.yaml"): "missing.yaml: No such file or directory",
             str(broken): f"{broken}:4:1: not valid YAML"}
    for path, expected in cases.items():
        result = _run([sys.executable, "-m", "mtp_megatron.train", "--config", path], timeout=120)
        assert result.returncode == 2 and expected in result.stderr, result.stderr[-2000:]
        assert "Traceback" not in result.stderr


def test_a_sequence_that_cannot_be_allocated_is_one_line(tmp_path):
    """model.seq_length=1e7 under a 6 GB address-space limit: out of memory in the first step, reported as one
    line naming the settings to change, and run_state.json says failed."""
    import resource

    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (6 * 10**9, 6 * 10**9))

    result = _run([sys.executable, "-m", "mtp_megatron.train", "--config", "configs/tiny.yaml",
                   "model.seq_length=10000000", "train.iters=1", "logging.tensorboard=false", f"run.dir={tmp_path}/run"],
                  timeout=300, preexec_fn=limit_memory)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "out of memory" in line and "model.seq_length=10000000" in line and "train.micro_batch_size" in line
    assert json.loads((tmp_path / "run" / "run_state.json").read_text())["state"] == "failed"
