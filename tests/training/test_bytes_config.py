"""configs/bytes.yaml, multi-byte prediction with n=8 heads, end to end as its header says: bytes preprocessed with
the byte tokenizer, trained under PP=2 with every head's loss falling, then decoded self-speculatively from the
checkpoint with output identical to greedy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 40


def _run(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-5000:]
    return result


@pytest.mark.distributed
@pytest.mark.slow
def test_bytes_config_trains_eight_heads_and_decodes_speculatively(tmp_path):
    corpus = os.path.join(sysconfig.get_paths()["stdlib"], "json")  # ~100 KB of Python, present everywhere
    prefix = tmp_path / "data" / "bytes"
    _run([sys.executable, "tools/preprocess_data.py", "--input", corpus, "--suffixes", ".py", "--tokenizer-type",
          "byte", "--append-eod", "--workers", "1", "--output-prefix", str(prefix)])
    run_dir = tmp_path / "run"
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "mtp_megatron.train",
          "--config", "configs/bytes.yaml", "parallel.pp=2", f"train.iters={STEPS}", "logging.log_interval=1",
          "logging.tensorboard=false", f"checkpoint.interval={STEPS}", f"run.dir={run_dir}",
          f"data.paths=[{prefix}_text_document]"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for i in range(1, 9):
        first = sum(r[f"loss/head_{i}"] for r in records[:5]) / 5
        last = sum(r[f"loss/head_{i}"] for r in records[-5:]) / 5
        assert last < 0.8 * first, f"head {i}: loss {first:.3f} -> {last:.3f}"
    assert records[0]["loss/head_1"] == pytest.approx(5.56, abs=0.5)  # about log(259): bytes, not 32k tokens

    result = _run([sys.executable, "-m", "mtp_megatron.generate", "--checkpoint",
                   str(run_dir / "checkpoints" / f"iter_{STEPS:07d}"), "--prompt", "def dumps(obj, ",
                   "--max-new-tokens", "48", "--compare"])
    report = json.loads(result.stdout.strip().splitlines()[-1])  # --compare exits 1 if the outputs differ
    assert report["greedy/tokens_per_forward"] == pytest.approx(1.0)
    assert report["speculative/tokens_per_forward"] >= 1.0
    assert len(report["speculative/acceptance"]) == 7  # heads 2..8 draft
