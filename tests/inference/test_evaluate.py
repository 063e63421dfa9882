"""mtp_megatron.evaluate: per-head loss and accuracy, equal to the training loss's definition, for native and
Hugging Face checkpoints alike."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from mtp_megatron.convert import native
from mtp_megatron.evaluate import evaluate, samples

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_scores_are_the_training_losses_per_head(trained, cycles_dataset):
    """The evaluation's per-head numbers equal what the training forward reports as its statistics for the same
    samples (loss sums and token counts per head, from model/heads.py)."""
    cfg, dense = native.read_checkpoint(trained)
    windows = samples(cycles_dataset, 64, 16)
    assert windows.shape == (16, 65)
    with native.dense_model(cfg, dense) as (model, _), torch.no_grad():
        scores = evaluate(model, windows, cfg.mtp.n_heads, cfg.model.vocab_size, batch_size=4)
        tokens = windows[:, :-1]
        _, stats = model(tokens, torch.arange(64).expand_as(tokens), None, labels=windows[:, 1:],
                         loss_mask=torch.ones(16, 64))
    for k in range(4):
        assert scores[f"tokens/head_{k + 1}"] == stats[k, 2].item() == 16 * (64 - k)
        assert abs(scores[f"loss/head_{k + 1}"] - (stats[k, 0] / stats[k, 2]).item()) < 1e-5
        assert abs(scores[f"acc/head_{k + 1}"] - (stats[k, 1] / stats[k, 2]).item()) < 1e-6
        assert scores[f"acc/head_{k + 1}"] > 0.6  # the cycles were learned by every head


def test_cli_gives_the_same_line_for_the_hugging_face_conversion(trained, cycles_dataset, tmp_path, capsys):
    """The command line (in a fresh process) on our checkpoint, ``main`` here on its Hugging Face conversion."""
    from mtp_megatron.convert import hf
    from mtp_megatron.evaluate import main

    native_line = _run("-m", "mtp_megatron.evaluate", "--checkpoint", trained, "--data", cycles_dataset,
                       "--max-samples", "8")
    assert native_line.returncode == 0, native_line.stderr[-3000:]
    cfg, dense = native.read_checkpoint(trained)
    hf.write_folder(cfg, dense, str(tmp_path / "hf"))
    capsys.readouterr()
    assert main(["--checkpoint", str(tmp_path / "hf"), "--data", cycles_dataset, "--max-samples", "8"]) == 0
    ours = json.loads(native_line.stdout.strip().splitlines()[-1])
    theirs = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ours.keys() == theirs.keys() and ours["samples"] == 8
    assert all(abs(ours[k] - theirs[k]) <= 1e-6 * max(1.0, abs(ours[k])) for k in ours)
    assert main(["--checkpoint", trained, "--data", str(tmp_path / "nothing")]) == 2
    assert "nothing" in capsys.readouterr().err
