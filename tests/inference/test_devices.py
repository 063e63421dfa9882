"""Decoding and evaluation on the device asked for (the GPU itself is exercised by bench/gpu_check.py): the
decoder keeps every weight and every tensor it creates on its device (checked on ``meta``, which refuses any
mix with the CPU), the commands refuse ``--device cuda`` without a GPU, evaluation in bf16 is close to fp32 and
scores one head's logits at a time, and a process that applied the CPU patches refuses to start a CUDA world."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import weakref

import pytest
import torch

from mtp_megatron import evaluate, generate
from mtp_megatron.convert import native
from mtp_megatron.inference.decoder import KVCache, MTPDecoder, resolve_device_dtype
from tests.inference.test_bad_inputs import _assert_one_error, _exit_and_stderr

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_decoder_keeps_weights_and_its_tensors_on_its_device(trained):
    cfg, dense = native.read_checkpoint(trained)  # on the CPU
    decoder = MTPDecoder(cfg, dense, torch.bfloat16, device="meta")
    assert decoder.embedding.device.type == decoder.output.device.type == decoder.trunk[0].q.device.type == "meta"
    assert decoder.heads.down.dtype == decoder.heads.qkv.dtype == torch.bfloat16
    cache = KVCache()
    first = decoder.forward(torch.zeros(2, 5, dtype=torch.long, device="meta"), cache)
    second = decoder.forward(torch.zeros(2, 3, dtype=torch.long, device="meta"), cache)  # after the cache
    n, vocab = cfg.mtp.n_heads, cfg.model.vocab_size
    assert first.shape == (n, 2, 5, vocab) and second.shape == (n, 2, 3, vocab)
    assert first.device.type == second.device.type == "meta" and cache.length == 8
    assert all(k.device.type == "meta" for k in cache.keys)


def test_device_and_dtype_resolution(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device_dtype("auto", "auto") == (torch.device("cpu"), torch.float32)
    assert resolve_device_dtype("cpu", "bf16") == (torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ValueError, match="no GPU is visible.*Fix: --device cpu"):
        resolve_device_dtype("cuda", "auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device_dtype("auto", "auto") == (torch.device("cuda"), torch.bfloat16)
    assert resolve_device_dtype("cuda", "fp32") == (torch.device("cuda"), torch.float32)


def test_commands_refuse_cuda_without_a_gpu(trained, cycles_dataset, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a machine with a GPU
    _assert_one_error(*_exit_and_stderr(generate.main, "--checkpoint", trained, "--prompt", "abc",
                                        "--max-new-tokens", "4", "--device", "cuda"),
                      "--device cuda but no GPU is visible", "Fix: --device cpu")
    _assert_one_error(*_exit_and_stderr(evaluate.main, "--checkpoint", trained, "--data", cycles_dataset,
                                        "--device", "cuda"), "--device cuda but no GPU is visible")


def test_evaluation_in_bf16_is_close_to_fp32(trained, cycles_dataset):
    scores = {}
    for dtype in ("fp32", "bf16"):
        code, out = _exit_and_stdout(evaluate.main, "--checkpoint", trained, "--data", cycles_dataset,
                                     "--max-samples", "8", "--device", "cpu", "--dtype", dtype)
        assert code == 0
        scores[dtype] = json.loads(out.strip().splitlines()[-1])
    assert scores["fp32"].keys() == scores["bf16"].keys()
    for key, value in scores["fp32"].items():
        tolerance = 2e-2 if key.startswith("loss/") else 5e-2 if key.startswith("acc/") else 0
        assert abs(scores["bf16"][key] - value) <= tolerance, (key, value, scores["bf16"][key])


def test_evaluation_scores_one_heads_logits_at_a_time(trained, cycles_dataset):
    """The same numbers as scoring all heads' logits at once (model/gpt.py ``head_logits``), which is never called:
    at most one head's logits exist at any time."""
    cfg, dense = native.read_checkpoint(trained)
    windows = evaluate.samples(cycles_dataset, 64, 8)
    with native.dense_model(cfg, dense) as (model, _), torch.no_grad():
        tokens = windows[:, :-1]
        all_at_once = model.head_logits(tokens, torch.arange(64).expand_as(tokens)).float()  # [n, s, b, V]
        live, peak, logits = [0], [0], model.mtp_heads.logits

        def counted(*args, **kwargs):  # counts the heads' logits alive (until their last reference goes)
            out = logits(*args, **kwargs)
            live[0] += 1
            peak[0] = max(peak[0], live[0])
            weakref.finalize(out, lambda: live.__setitem__(0, live[0] - 1))
            return out

        model.mtp_heads.logits = counted
        model.head_logits = None  # evaluate must not build every head's logits at once
        scores = evaluate.evaluate(model, windows, cfg.mtp.n_heads, batch_size=4)
    assert peak[0] == 1
    for k in range(cfg.mtp.n_heads):
        predicted, targets = all_at_once[k, : 64 - k].transpose(0, 1), windows[:, k + 1:]
        loss = torch.nn.functional.cross_entropy(predicted.flatten(0, 1), targets.flatten()).item()
        correct = predicted.gather(-1, targets.unsqueeze(-1)).squeeze(-1) >= predicted.max(-1).values
        assert abs(scores[f"loss/head_{k + 1}"] - loss) < 1e-5
        assert abs(scores[f"acc/head_{k + 1}"] - correct.float().mean().item()) < 1e-6


def test_no_cuda_world_after_the_cpu_patches():
    """A fresh process: without cpu_compat the check passes; once applied, init_distributed on cuda refuses (with
    torch told a GPU is visible, so the refusal is the patches' and not a missing GPU's)."""
    script = (
        "import torch\n"
        "from mtp_megatron.config import ParallelConfig\n"
        "from mtp_megatron.distributed import parallel\n"
        "parallel._refuse_cuda_after_cpu_compat()\n"
        "from mtp_megatron.distributed import cpu_compat\n"
        "parallel._refuse_cuda_after_cpu_compat()  # imported but not applied\n"
        "cpu_compat.apply()\n"
        "torch.cuda.is_available = lambda: True\n"
        "try:\n"
        "    parallel.init_distributed(ParallelConfig(tp=1, pp=1), 'cuda', seed=0)\n"
        "except RuntimeError as error:\n"
        "    print('refused:', error)\n"
    )
    stdout = _fresh_process(script)
    assert "refused:" in stdout and "CPU compatibility patches" in stdout, stdout


def test_reading_a_checkpoint_on_the_cpu_leaves_no_patch_on_later_torch_calls(trained):
    """A fresh process reads a checkpoint on the CPU (what generate, evaluate and the benchmarks do before decoding):
    the CPU patches' torch function mode ends with the megatron-core world it served. Left on, it hooked every later
    torch call (plain decoding 1.3-1.9x slower) and turned ``device="cuda"`` into a CPU tensor."""
    script = (
        "import sys, torch\n"
        "from mtp_megatron.convert.formats import read_any\n"
        "cfg, dense, _ = read_any(sys.argv[1], device='cpu')\n"
        "print('modes:', len(torch.overrides._get_current_function_mode_stack()))\n"
        "try:\n"
        "    print('cuda tensor on:', torch.zeros(1, device='cuda').device)\n"
        "except (RuntimeError, AssertionError) as error:\n"
        "    print('cuda refused')\n"
        "cfg, dense, _ = read_any(sys.argv[1], device='cpu')  # a second read enters and leaves the mode again\n"
        "print('modes after a second read:', len(torch.overrides._get_current_function_mode_stack()))\n"
    )
    # CUDA_VISIBLE_DEVICES="": also on a machine with a GPU, a real CUDA tensor must not be possible.
    stdout = _fresh_process(script, trained, CUDA_VISIBLE_DEVICES="")
    assert "modes: 0" in stdout and "cuda refused" in stdout, stdout
    assert "modes after a second read: 0" in stdout, stdout


def test_a_plain_script_reads_a_checkpoint_and_starts_no_process(trained, tmp_path):
    """A user's script without an ``if __name__ == "__main__"`` guard reads a checkpoint: it must work, and start no
    helper process (megatron-core's writer helpers are for saves; a spawned one re-runs such a script and fails)."""
    script = (
        "import multiprocessing, sys\n"
        "from mtp_megatron.convert.formats import read_any\n"
        "cfg, dense, _ = read_any(sys.argv[1], device='cpu')\n"
        "print('tensors:', len(dense), 'children:', len(multiprocessing.active_children()))\n"
    )
    stdout = _fresh_process(script, trained, file=str(tmp_path / "read.py"))
    assert "children: 0" in stdout and "tensors: 0" not in stdout, stdout


def _fresh_process(script: str, *args: str, file: str | None = None, **env_overrides: str) -> str:
    """The stdout of ``python -c script args`` (or of ``python file args``, the script written there) in a fresh
    process outside any launcher's world (exit 0 asserted)."""
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", **env_overrides}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    if file is not None:
        with open(file, "w") as f:
            f.write(script)
    command = [sys.executable, *(["-c", script] if file is None else [file]), *args]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _exit_and_stdout(main, *args: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(args))
    return code, out.getvalue()
