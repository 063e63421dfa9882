"""The exported tokenizer and generation settings through the public APIs a user calls: ``AutoTokenizer`` encodes
and decodes real source files id for id as our sentencepiece tokenizer, and ``AutoModelForCausalLM.generate`` on
the exported folder continues a prompt as ``python -m mtp_megatron.generate`` does on our checkpoint.

The pipeline is the quickstart's, tiny: a 600-piece sentencepiece model trained with tools/train_tokenizer.py on
part of the running interpreter's standard library, data from tools/preprocess_data.py, configs/tiny.yaml trained
a few steps (its vocabulary of 600 ids padded to 640 rows), exported with tools/convert_checkpoint.py.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import sysconfig

import pytest
import torch

from mtp_megatron.config import load_config
from mtp_megatron.data.tokenizer import SentencePieceTokenizer
from mtp_megatron.testing.distributed import run_distributed
from mtp_megatron.train import train
from tests.convert.test_convert import REPO, _convert

STDLIB = sysconfig.get_paths()["stdlib"]
VOCAB, PADDED = 600, 640


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _train(run_dir: str, data: str, model: str) -> None:
    train(load_config(os.path.join(REPO, "configs/tiny.yaml"), [
        "model.num_query_groups=2", "model.seq_length=64", "model.vocab_size=null", "mtp.n_heads=2",
        "train.iters=8", f"tokenizer.model={model}", f"data.paths=[{data}]", "data.synthetic=false", f"data.cache_dir={run_dir}/cache",
        f"run.dir={run_dir}", "logging.tensorboard=false"]))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> dict:
    """Tokenizer, data, a trained checkpoint and its Hugging Face export, all made by the command-line tools."""
    root = tmp_path_factory.mktemp("spm_pipeline")
    corpus = [os.path.join(STDLIB, name) for name in ("json", "email", "http", "logging")]
    common = ["--suffixes", ".py", "--on-error", "skip"]  # skip: empty __init__.py files
    _run("tools/train_tokenizer.py", "--input", *corpus, *common, "--vocab-size", str(VOCAB), "--sample-bytes",
         "2000000", "--model-prefix", str(root / "spm"))
    _run("tools/preprocess_data.py", "--input", *corpus[:2], *common, "--tokenizer-model", str(root / "spm.model"),
         "--append-eod", "--workers", "1", "--output-prefix", str(root / "code"))
    run_distributed(_train, 1, str(root / "run"), str(root / "code_text_document"), str(root / "spm.model"))
    checkpoint = str(root / "run/checkpoints/iter_0000008")
    result = _convert("--input", checkpoint, "--output", str(root / "hf"), "--to", "hf")
    assert result.returncode == 0, result.stderr[-3000:]
    return {"model": str(root / "spm.model"), "checkpoint": checkpoint, "hf": str(root / "hf"),
            "converter_output": result.stdout}


def _source_files(count: int = 300, max_bytes: int = 8000) -> list[str]:
    """``count`` of the standard library's .py files, spread over all of it (site-packages excluded)."""
    paths = sorted(p for p in glob.glob(os.path.join(STDLIB, "**", "*.py"), recursive=True)
                   if "site-packages" not in p and os.path.getsize(p) <= max_bytes)
    texts = []
    for path in paths[:: max(1, len(paths) // (2 * count))]:
        try:
            with open(path, encoding="utf-8") as f:
                texts.append(f.read())
        except UnicodeDecodeError:  # the test suite's deliberately broken files
            continue
    return texts[:count]


def test_autotokenizer_encodes_and_decodes_source_files_as_ours(pipeline):
    from transformers import AutoTokenizer

    ours = SentencePieceTokenizer(pipeline["model"])
    theirs = AutoTokenizer.from_pretrained(pipeline["hf"])
    texts = _source_files()
    assert len(texts) >= 290
    # Special pieces' text is text; "▁" decodes to a space in sentencepiece itself, so it round-trips in neither.
    special_text = ["<s>", "</s>", "<pad>", "<unk>", "<0x41>", "x</s>\n<s>y", "▁ ▁▁", "\t\r\n", "日本語 😀"]
    tokens = 0
    for text in texts + special_text:
        for variant in (text, " " + text):  # with and without a leading space: no dummy prefix either way
            ids = ours.tokenize(variant)
            assert theirs(variant)["input_ids"] == ids, variant[:200]
            assert theirs.decode(ids) == ours.detokenize(ids), variant[:200]
            assert "▁" in variant or ours.detokenize(ids) == variant
            tokens += len(ids)
    assert tokens > 200_000  # a real amount of code went through
    print(f"round trip: {len(texts)} files + {len(special_text)} strings, each with and without a leading space: "
          f"{tokens} tokens, all equal")
    # No BOS or EOS added; the special ids are the model's (EOD = </s> = 3).
    assert theirs("def f").input_ids == ours.tokenize("def f")
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id, theirs.unk_token_id) == (2, 3, 0, 1)


def test_config_files_name_the_tokenizers_ids_and_padding_rows(pipeline):
    assert "tokenizer: sentencepiece, 600 ids, tokenizer.json for AutoTokenizer" in pipeline["converter_output"]
    with open(os.path.join(pipeline["hf"], "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(pipeline["hf"], "generation_config.json")) as f:
        generation = json.load(f)
    assert (config["vocab_size"], config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == \
        (PADDED, 2, 3, 0)
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (2, 3, 0)
    assert generation["suppress_tokens"] == list(range(VOCAB, PADDED))


def test_transformers_generate_continues_as_our_generate(pipeline, tmp_path, capsys):
    """``python -m mtp_megatron.generate``'s ``main`` (here, to spare a process start) on the checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mtp_megatron.generate import main

    prompts, new = ["def parse(text):", "import os, sys", "    return "], 24
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    capsys.readouterr()
    assert main(["--checkpoint", pipeline["checkpoint"], "--prompt-file", str(tmp_path / "prompts.txt"),
                 "--max-new-tokens", str(new), "--print-ids"]) == 0
    *lines, report = capsys.readouterr().out.rstrip("\n").split("\n")
    ours = json.loads(report)["ids"]
    printed = "\n".join(line for line in lines if not line.startswith("[checkpoint]"))  # the loader's notice

    tokenizer = AutoTokenizer.from_pretrained(pipeline["hf"])
    model = AutoModelForCausalLM.from_pretrained(pipeline["hf"], dtype=torch.float32).eval()
    texts = []
    for prompt, ours_ids in zip(prompts, ours):
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=new, do_sample=False)
        theirs = out[0, inputs["input_ids"].shape[1]:].tolist()
        assert theirs == ours_ids, prompt
        assert len(theirs) == new or theirs[-1] == tokenizer.eos_token_id  # both stop after EOD
        texts.append(prompt + tokenizer.decode(theirs, skip_special_tokens=True))
    assert "\n".join(texts) == printed
