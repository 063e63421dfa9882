"""Tokenizer, data and DeepSpeed JSON problems are config errors of the explicit step after ``load_config``
(``resolve_run_inputs``: mtp_megatron/data/inputs.py and the DeepSpeed check), each naming the field, the file and
the fix; the command line reports them with the other config errors, exit 2 before any work."""

import os
import subprocess
import sys

import pytest

from mtp_megatron.config import ConfigError, load_config
from mtp_megatron.data.inputs import parse_blend, resolve_inputs, split_document_counts
from mtp_megatron.train import load_run_config, resolve_run_inputs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "configs", "tiny.yaml")


def problems(overrides):
    cfg = load_config(TINY, [*overrides, "data.synthetic=false"])  # loading alone opens no file
    with pytest.raises(ConfigError) as e:
        resolve_run_inputs(cfg)
    return e.value.problems


def test_blend_forms():
    assert parse_blend(["/a", "/b"]) == (["/a", "/b"], None)
    assert parse_blend(["0.3", "/a", "0.7", "/b"]) == (["/a", "/b"], [0.3, 0.7])
    for bad in (["0.3", "/a", "/b"], ["/a", "0.3", "/b", "0.7"], ["0.3", "/a", "0.7"]):
        with pytest.raises(ValueError, match="mixes weights and prefixes"):
            parse_blend(bad)
    with pytest.raises(ValueError, match="positive sum"):
        parse_blend(["0", "/a", "0", "/b"])


def test_blend_weights_that_do_not_match_the_paths(byte_datasets):
    a, b = byte_datasets
    assert problems([f"data.paths=[0.3, {a}, {b}]"]) == [
        f"data.paths: ['0.3', '{a}', '{b}'] mixes weights and prefixes; weighted blends alternate weight, prefix "
        "(e.g. [0.7, /d/a_text_document, 0.3, /d/b_text_document])"]


def test_missing_prefix_is_named(byte_datasets, tmp_path):
    (found,) = problems([f"data.paths=[{byte_datasets[0]},{tmp_path}/missing_text_document]"])
    assert found.startswith(f"data.paths: {tmp_path}/missing_text_document: no ") and "Fix:" in found


def test_corrupt_file_is_refused_at_load(byte_datasets, tmp_path):
    prefix = str(tmp_path / "cut")
    for ext in (".bin", ".idx"):
        with open(byte_datasets[0] + ext, "rb") as src, open(prefix + ext, "wb") as dst:
            dst.write(src.read())
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(100)
    (found,) = problems([f"data.paths=[{prefix}]"])
    assert found.startswith(f"data.paths: {prefix}.bin: 100 bytes") and "truncated" in found


def test_split_that_empties_a_needed_part(byte_datasets):
    a, b = byte_datasets  # 200 and 120 documents
    assert split_document_counts("969,30,1", 120) == [116, 4, 0]  # megatron-core's rounding
    # 0.2% of 120 documents rounds to none: no validation data for b.
    found = problems([f"data.paths=[{a},{b}]", "data.split=996,2,2", "train.eval_interval=5"])
    assert found == [f"data.split: '996,2,2' leaves the valid part of {b} (120 documents) empty. Fix: give valid "
                     "a larger share, or add documents"]
    # Without evaluation the same split is fine, and an empty test part never matters.
    load_run_config(TINY, [f"data.paths=[{a},{b}]", "data.split=996,2,2", "data.synthetic=false"])
    # A zero validation weight with evaluation on is refused by load_config itself, without opening any file.
    with pytest.raises(ConfigError, match="data.split: '100,0,0' gives the validation split no documents"):
        load_config(TINY, ["data.split=100,0,0", "train.eval_interval=5"])


def test_tokenizer_larger_than_the_model_vocabulary():
    assert problems(["model.vocab_size=200"]) == [
        "model.vocab_size: the byte tokenizer has 259 ids but the model only 200. Fix: set model.vocab_size=null "
        "(the tokenizer's size, padded for TP) or >= 259"]
    cfg = load_config(TINY, ["model.vocab_size=null", "parallel.tp=2"])
    assert cfg.model.vocab_size is None
    resolve_inputs(cfg)
    assert cfg.model.vocab_size == 259 and cfg.model.padded_vocab_size(2) == 512
    resolve_inputs(cfg)  # idempotent: a resolved config stays as it is
    assert cfg.model.vocab_size == 259


def test_tokenizer_file_problems(tmp_path):
    with pytest.raises(ConfigError, match="tokenizer.model: is required"):  # no file to open: load_config says it
        load_config(TINY, ["tokenizer.type=sentencepiece"])
    (found,) = problems([f"tokenizer.model={tmp_path}/none.model"])
    assert found.startswith(f"tokenizer.model: tokenizer model '{tmp_path}/none.model' does not exist")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    assert "is not a sentencepiece model" in problems([f"tokenizer.model={junk}"])[0]
    with pytest.raises(ConfigError, match="tokenizer.model: is set"):
        load_config(TINY, [f"tokenizer.model={junk}", "tokenizer.type=byte"])


@pytest.mark.parametrize("content, expected", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "holds a list, not a JSON object"),
    ('{"train_batch_size": 64, "zero_optimization": {"stage": 3, "overlap_comm": true}}',
     "sets train_batch_size (set by train.global_batch_size), zero_optimization.stage (set by parallel.sharding)"),
])
def test_deepspeed_json_is_checked_with_the_inputs(tmp_path, content, expected):
    path = tmp_path / "ds.json"
    path.write_text(content)
    (found,) = problems(["data.synthetic=true", "parallel.sharding=zero2", f"parallel.deepspeed_config={path}"])
    assert found.startswith("parallel.deepspeed_config:") and expected in found and "Fix:" in found


def test_missing_deepspeed_json_is_named(tmp_path):
    (found,) = problems(["data.synthetic=true", "parallel.sharding=zero1",
                         f"parallel.deepspeed_config={tmp_path}/none.json"])
    assert f"cannot read {tmp_path}/none.json" in found


def test_the_command_line_reports_every_input_problem_once(tmp_path):
    """A missing tokenizer next to a world-size problem: exit 2 with one message listing both, from the command
    line's check before any work (no process group, no megatron-core)."""
    result = subprocess.run(
        [sys.executable, "-m", "mtp_megatron.train", "--config", "configs/tiny.yaml", "parallel.tp=2",
         f"tokenizer.model={tmp_path}/none.model", f"run.dir={tmp_path}/run"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: invalid configuration (2 problems):") and result.stderr.count("error:") == 1
    assert "world size 1 is not a multiple of tp*pp=2" in result.stderr
    assert f"tokenizer.model: tokenizer model '{tmp_path}/none.model' does not exist" in result.stderr
    assert not os.path.exists(tmp_path / "run")
