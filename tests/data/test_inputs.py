"""Data and tokenizer problems are config errors at load time, each naming the field, the file and the fix."""

import os

import pytest

from mtp_megatron.config import ConfigError, load_config
from mtp_megatron.data.inputs import parse_blend, split_document_counts

TINY = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "tiny.yaml")


def problems(overrides):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [*overrides, "data.synthetic=false"])
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
    load_config(TINY, [f"data.paths=[{a},{b}]", "data.split=996,2,2", "data.synthetic=false"])
    # A zero validation weight with evaluation on is refused without opening any file.
    assert problems(["data.split=100,0,0", "train.eval_interval=5"])[0].startswith(
        "data.split: '100,0,0' gives the validation split no documents")


def test_tokenizer_larger_than_the_model_vocabulary():
    assert problems(["model.vocab_size=200"]) == [
        "model.vocab_size: the byte tokenizer has 259 ids but the model only 200. Fix: set model.vocab_size=null "
        "(the tokenizer's size, padded for TP) or >= 259"]
    cfg = load_config(TINY, ["model.vocab_size=null", "parallel.tp=2"])
    assert cfg.model.vocab_size == 259 and cfg.model.padded_vocab_size(2) == 512


def test_tokenizer_file_problems(tmp_path):
    assert problems(["tokenizer.type=sentencepiece"])[0].startswith("tokenizer.model: is required")
    (found,) = problems([f"tokenizer.model={tmp_path}/none.model"])
    assert found.startswith(f"tokenizer.model: tokenizer model '{tmp_path}/none.model' does not exist")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    assert "is not a sentencepiece model" in problems([f"tokenizer.model={junk}"])[0]
    assert problems([f"tokenizer.model={junk}", "tokenizer.type=byte"])[0].startswith("tokenizer.model: is set")
