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
from tests.inference.conftest import TINY

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_scores_are_the_training_losses_per_head(trained, cycles_dataset):
    """The evaluation's per-head numbers equal what the training forward reports as its statistics for the same
    samples (loss sums and token counts per head, from model/heads/inputs.py)."""
    cfg, dense = native.read_checkpoint(trained)
    windows = samples(cycles_dataset, 64, 16)
    assert windows.shape == (16, 65)
    with native.dense_model(cfg, dense) as (model, _), torch.no_grad():
        scores = evaluate(model, windows, cfg.mtp.n_heads, batch_size=4)
        tokens = windows[:, :-1]
        _, stats = model(tokens, torch.arange(64).expand_as(tokens), None, labels=windows[:, 1:],
                         loss_mask=torch.ones(16, 64))
    for k in range(4):
        assert scores[f"tokens/head_{k + 1}"] == stats[k, 2].item() == 16 * (64 - k)
        assert abs(scores[f"loss/head_{k + 1}"] - (stats[k, 0] / stats[k, 2]).item()) < 1e-5
        assert abs(scores[f"acc/head_{k + 1}"] - (stats[k, 1] / stats[k, 2]).item()) < 1e-6
        assert scores[f"acc/head_{k + 1}"] > 0.6  # the cycles were learned by every head


def test_scores_are_the_training_losses_on_a_padded_vocabulary(cycles_dataset, tmp_path, capsys):
    """The byte tokenizer's 259 ids padded to 384 rows (make_vocab_size_divisible_by=128): training's softmax and
    top-1 run over all 384 rows (megatron's vocab-parallel cross-entropy), and so does the evaluation command."""
    from mtp_megatron.evaluate import main
    from mtp_megatron.model.builder import build_model
    from mtp_megatron.train import load_run_config

    cfg = load_run_config(os.path.join(REPO, "configs/tiny.yaml"), [*TINY, "model.vocab_size=null"])
    assert (cfg.model.vocab_size, cfg.model.padded_vocab_size(1)) == (259, 384)
    with native.single_process() as env:  # an untrained model: its padding rows are as likely as any token
        model = build_model(native.dense_config(cfg, "fp32"), env)
        dense = {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    native.write_checkpoint(cfg, dense, str(tmp_path / "ckpt"))
    capsys.readouterr()
    assert main(["--checkpoint", str(tmp_path / "ckpt"), "--data", cycles_dataset, "--max-samples", "8"]) == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    windows = samples(cycles_dataset, 64, 8)
    tokens = windows[:, :-1]
    with native.dense_model(cfg, dense) as (model, _), torch.no_grad():
        _, stats = model(tokens, torch.arange(64).expand_as(tokens), None, labels=windows[:, 1:],
                         loss_mask=torch.ones(8, 64))
        real_rows_only = model.head_logits(tokens, torch.arange(64).expand_as(tokens))[0, ..., :259]
    real_rows_loss = torch.nn.functional.cross_entropy(real_rows_only.transpose(0, 1).flatten(0, 1).float(),
                                                       windows[:, 1:].flatten()).item()
    for k in range(4):
        assert scores[f"tokens/head_{k + 1}"] == stats[k, 2].item() == 8 * (64 - k)
        assert abs(scores[f"loss/head_{k + 1}"] - (stats[k, 0] / stats[k, 2]).item()) < 1e-5
        assert abs(scores[f"acc/head_{k + 1}"] - (stats[k, 1] / stats[k, 2]).item()) < 1e-6
    assert scores["loss/head_1"] - real_rows_loss > 0.1  # the padding rows are in the loss, as in training


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
