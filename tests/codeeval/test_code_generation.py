"""Completions from a checkpoint: python -m mtp_megatron.evaluate_code --checkpoint on a quickstart-like model
(a sentencepiece tokenizer trained on standard-library code, configs/tiny.yaml's n=4 heads, a few steps):
--speculative gives greedy's completions token for token; sampling is reproducible and follows the nucleus;
--run-dir logs pass@1 next to the training losses."""

from __future__ import annotations

import json
import os
import sysconfig

import pytest
import torch

from mtp_megatron.config import load_config
from mtp_megatron.testing.distributed import run_distributed
from mtp_megatron.train import train
from tests.codeeval.test_evaluate_code import _records, _summary, evaluate_code
from tests.convert.test_hf_tokenizer import _run

STDLIB = sysconfig.get_paths()["stdlib"]
ITERS = 30


def _train(run_dir: str, data: str, model: str) -> None:
    train(load_config(os.path.join(REPO_CONFIG), [
        "model.vocab_size=null", f"train.iters={ITERS}", f"tokenizer.model={model}", f"data.paths=[{data}]",
        "data.synthetic=false", f"data.cache_dir={run_dir}/cache", f"run.dir={run_dir}",
        "logging.tensorboard=true"]))


REPO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                           "configs/tiny.yaml")


@pytest.fixture(scope="module")
def quickstart_like(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("code_model")
    corpus = [os.path.join(STDLIB, name) for name in ("json", "email", "http", "logging")]
    common = ["--suffixes", ".py", "--on-error", "skip"]
    _run("tools/train_tokenizer.py", "--input", *corpus, *common, "--vocab-size", "600", "--sample-bytes",
         "2000000", "--model-prefix", str(root / "spm"))
    _run("tools/preprocess_data.py", "--input", *corpus, *common, "--tokenizer-model", str(root / "spm.model"),
         "--append-eod", "--workers", "1", "--output-prefix", str(root / "code"))
    run_distributed(_train, 1, str(root / "run"), str(root / "code_text_document"), str(root / "spm.model"))
    return {"run": str(root / "run"), "checkpoint": str(root / f"run/checkpoints/iter_{ITERS:07d}"), "root": root}


def test_speculative_completions_equal_greedy_and_pass_at_1_is_logged_with_the_losses(quickstart_like):
    root, checkpoint = quickstart_like["root"], quickstart_like["checkpoint"]
    common = ["--checkpoint", checkpoint, "--task", "humaneval", "--limit", "6", "--max-new-tokens", "24",
              "--batch-size", "3"]
    greedy = _summary(evaluate_code(*common, "--output", str(root / "greedy.jsonl"), "--run-dir",
                                    quickstart_like["run"]))
    fast = _summary(evaluate_code(*common, "--speculative", "--output", str(root / "speculative.jsonl")))
    plain, drafted = _records(root / "greedy.jsonl"), _records(root / "speculative.jsonl")
    assert [r["completion"] for r in plain] == [r["completion"] for r in drafted]
    # The same prompts, as truncated to the context: room for the drafts either way.
    assert [r["prompt_tokens"] for r in plain] == [r["prompt_tokens"] for r in drafted]
    assert any(r["new_tokens"] > 0 for r in plain)
    assert greedy["mode"] == "greedy" and fast["mode"] == "speculative"
    assert greedy["tokens_per_forward"] == 1.0 and fast["tokens_per_forward"] >= 1.0
    assert greedy["truncated_prompts"] > 0  # HumanEval's prompts are longer than tiny.yaml's 128 positions
    # pass@1 at the checkpoint's step, in metrics.jsonl and TensorBoard next to the trainer's own records.
    records = [json.loads(line) for line in open(os.path.join(quickstart_like["run"], "metrics.jsonl"))]
    logged = [r for r in records if "code/humaneval/pass@1" in r]
    assert [(r["step"], r["code/humaneval/pass@1"]) for r in logged] == [(ITERS, greedy["pass@1"])]
    assert any("loss" in r and r["step"] == ITERS for r in records)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(quickstart_like["run"], "tensorboard"))
    events.Reload()
    assert "code/humaneval/pass@1" in events.Tags()["scalars"] and "loss" in events.Tags()["scalars"]
    assert [(e.step, e.value) for e in events.Scalars("code/humaneval/pass@1")] == [
        (ITERS, pytest.approx(greedy["pass@1"]))]


def test_sampling_is_reproducible_and_draws_from_the_nucleus(quickstart_like):
    from mtp_megatron.convert.formats import read_any
    from mtp_megatron.inference.decoder import MTPDecoder
    from mtp_megatron.inference.decoding import greedy, sample

    cfg, dense, _ = read_any(quickstart_like["checkpoint"], untie_embeddings=True, device="cpu")
    decoder = MTPDecoder(cfg, dense, torch.float32, torch.device("cpu"))
    prompt = torch.tensor([[5, 17, 40, 41, 99, 7], [8, 9, 10, 11, 12, 13]])
    plain, _ = greedy(decoder, prompt, 12)
    # A nucleus smaller than any token's probability holds the most likely token only: greedy's choice.
    tight, _ = sample(decoder, prompt, 12, temperature=1.0, top_p=1e-9, generator=torch.Generator().manual_seed(0))
    assert torch.equal(tight, plain)
    draws = [sample(decoder, prompt, 12, temperature=1.5, generator=torch.Generator().manual_seed(seed),
                    vocab_size=600)[0] for seed in (1, 1, 2)]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    assert not torch.equal(draws[0], plain) and int(max(d.max() for d in draws)) < 600
    # Through the entry point: three samples per task at temperature 0.8, pass@1 from all three.
    out = quickstart_like["root"] / "sampled.jsonl"
    summary = _summary(evaluate_code("--checkpoint", quickstart_like["checkpoint"], "--task", "humaneval",
                                     "--limit", "2", "--max-new-tokens", "16", "--samples-per-task", "3",
                                     "--temperature", "0.8", "--output", str(out)))
    assert summary["samples"] == 6 and summary["mode"] == "sample" and "pass@10" not in summary
    records = _records(out)
    assert [r["task_id"] for r in records] == ["HumanEval/0"] * 3 + ["HumanEval/1"] * 3
