"""bench/gpu_check.sh, the one-command GPU check, keeps working: its CPU smoke run (``--device cpu --quick``)
passes every step and writes its report, in a fresh process as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_gpu_check_quick_on_cpu(tmp_path):
    out, work = tmp_path / "report", tmp_path / "work"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "OUT")}
    done = subprocess.run(["bash", "bench/gpu_check.sh", "--device", "cpu", "--quick", "--out", str(out),
                           "--work", str(work)], cwd=REPO, env=dict(env, PYTHON=sys.executable),
                          capture_output=True, text=True, timeout=600)
    report = json.loads((out / "report.json").read_text())
    steps = {s["name"]: s for s in report["steps"]}
    assert done.returncode == 0 and report["passed"], done.stdout[-3000:] + (out / "gpu_check.log").read_text()[-4000:]
    assert list(steps) == ["install", "environment", "data", "smoke", "resume", "generate", "head_gradients",
                           "head_memory", "step_time", "deepspeed", "fsdp"]
    assert steps["install"]["status"] == "skipped"  # this machine has them installed
    assert all(s["status"] == "passed" for name, s in steps.items() if name != "install")
    assert (out / "report.md").read_text().startswith("# GPU check: passed")

    smoke = steps["smoke"]["figures"]
    assert smoke["steps"] == 10 and len(smoke["first"]) == 4
    assert all(smoke["last"][h] < smoke["first"][h] - 0.5 for h in smoke["first"])  # every head learns

    resume = steps["resume"]["figures"]
    assert resume["stopped_at"] == 5 and resume["logged_steps"] == 10
    assert resume["steps_differ"] == [] and resume["weights"]["differ"] == []
    assert resume["weights"]["entries"] > 100  # weights, optimizer state, RNG and data states, not a subset

    grads = steps["head_gradients"]["figures"]
    assert grads["fp32"]["worst_rel_error"] < 1e-5 and grads["bf16"]["worst_rel_error"] < 2e-2
    assert grads["bf16"]["worst_rel_error"] > grads["fp32"]["worst_rel_error"]  # bf16 really ran in bf16

    memory = next(iter(steps["head_memory"]["figures"].values()))
    assert memory["sequential_over_n1"] < 1.05 < memory["naive_over_n1"]
    assert set(memory["peak_mib"]) == {"n=1", "n=4 naive", "n=4 sequential", f"n=4 sequential chunked {memory['chunk']}",
                                        "megatron GPTModel n=1"}

    timing = steps["step_time"]["figures"]["matched"]
    assert timing["flops_check_ratio"] == 1.0 and timing["losses_agree"]
    assert {v["params"] for v in timing["variants"].values()} == {timing["variants"]["n=1"]["params"]}  # matched

    decode = steps["generate"]["figures"]
    assert decode["generate"]["speculative/tokens_per_forward"] > 1.0
    assert set(decode["decode_speed"]) == {"1", "8"}

    assert steps["deepspeed"]["figures"]["steps"] == steps["fsdp"]["figures"]["steps"] == 3
    # fp32 on CPU: the same model and batches under both engines.
    assert steps["fsdp"]["figures"]["loss"] == pytest.approx(steps["deepspeed"]["figures"]["loss"], rel=1e-5)
