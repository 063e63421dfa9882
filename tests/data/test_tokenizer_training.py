"""Training a sentencepiece model: the properties code needs (exact round trip, byte fallback, split digits, kept
whitespace), the fixed special ids, the seeded sample, and the refusals."""

import os
import subprocess
import sys

import pytest

from mtp_megatron.data.sources import DataError
from mtp_megatron.data.tokenizer import (SPM_BOS_ID, SPM_EOS_ID, SPM_PAD_ID, SPM_UNK_ID, SentencePieceTokenizer)
from mtp_megatron.data.tokenizer_training import (TokenizerTrainingError, chunk_text, sample_texts,
                                                  train_tokenizer)
from mtp_megatron.testing.data import make_documents, write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCAB = 512
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "code.jsonl", make_documents(300))


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("tok") / "spm")
    summary = train_tokenizer([corpus], prefix, VOCAB)
    return summary, SentencePieceTokenizer(summary.model_path)


def test_summary_and_files(trained, corpus):
    summary, tokenizer = trained
    assert os.path.isfile(summary.model_path) and os.path.isfile(summary.vocab_path)
    assert summary.vocab_size == tokenizer.vocab_size == VOCAB
    assert summary.documents_read == summary.documents_sampled == 300  # the corpus is below the sample budget
    assert summary.sample_bytes == sum(len(t.encode()) for t in make_documents(300))
    assert (summary.roundtrip_checked, summary.roundtrip_failed) == (20, [])
    assert "20/20" in summary.format() and "skipped: none" in summary.format()
    assert sorted(os.listdir(os.path.dirname(summary.model_path))) == ["spm.model", "spm.vocab"]  # no temp files


def test_special_ids_are_the_tokenizer_constants(trained):
    sp = trained[1]._sp
    assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (SPM_PAD_ID, SPM_UNK_ID, SPM_BOS_ID, SPM_EOS_ID)
    assert trained[1].eod == SPM_EOS_ID


def test_byte_fallback_round_trips_unseen_characters(trained):
    tokenizer = trained[1]
    text = "x = '🦄 ∑ 中文'"  # none of these characters is in the corpus
    ids = tokenizer.tokenize(text)
    assert SPM_UNK_ID not in ids
    assert [tokenizer._sp.id_to_piece(i) for i in tokenizer.tokenize("🦄")] == ["<0xF0>", "<0x9F>", "<0xA6>",
                                                                                 "<0x84>"]
    assert tokenizer.detokenize(ids) == text


def test_digits_are_split(trained):
    tokenizer = trained[1]
    assert [tokenizer._sp.id_to_piece(i) for i in tokenizer.tokenize("12345")] == list("12345")


def test_whitespace_and_newlines_are_kept(trained):
    tokenizer = trained[1]
    code = "def f(x):\n    if x:\n\n        return  x\t# tab\n\n\n  \n"
    assert tokenizer.detokenize(tokenizer.tokenize(code)) == code
    assert len(tokenizer.tokenize("        ")) < 8  # indentation is learned as whitespace-only pieces
    assert tokenizer.detokenize(tokenizer.tokenize(" leading space")) == " leading space"  # no dummy prefix


def test_training_is_deterministic_and_refuses_to_overwrite(trained, corpus):
    summary = trained[0]
    with open(summary.model_path, "rb") as f:
        before = f.read()
    prefix = summary.model_path[: -len(".model")]
    with pytest.raises(DataError, match=f"{summary.model_path} exists; pass --overwrite"):
        train_tokenizer([corpus], prefix, VOCAB)
    train_tokenizer([corpus], prefix, VOCAB, overwrite=True)
    with open(summary.model_path, "rb") as f:
        assert f.read() == before


def test_too_small_vocabularies_are_clear_errors(corpus, tmp_path):
    with pytest.raises(TokenizerTrainingError, match="--vocab-size 100 is too small"):
        train_tokenizer([corpus], str(tmp_path / "a"), 100)
    with pytest.raises(TokenizerTrainingError, match=r"pass --vocab-size \d+ or more"):
        train_tokenizer([corpus], str(tmp_path / "b"), 280)  # the corpus has more than 20 distinct characters
    with pytest.raises(TokenizerTrainingError, match=r"too high"):
        train_tokenizer([corpus], str(tmp_path / "c"), 100_000)
    assert os.listdir(tmp_path) == []  # neither models nor temporary files


def test_sample_is_seeded_within_budget_and_in_input_order():
    texts = [(f"f:{i}", "x" * (i % 7 + 1)) for i in range(1000)]
    sample, read = sample_texts(texts, max_bytes=500, seed=1)
    assert read == 1000
    assert 490 <= sum(len(t) for _, t in sample) <= 500
    positions = [int(origin[2:]) for origin, _ in sample]
    assert positions == sorted(positions) and positions[-1] > 900  # spread over the whole input
    assert sample_texts(texts, 500, seed=1)[0] == sample
    assert sample_texts(texts, 500, seed=2)[0] != sample
    assert sample_texts(texts, 10**9, seed=1)[0] == texts


def test_chunks_end_at_newlines_and_rejoin():
    text = "a = 1\n" * 1000 + "z" * 5000
    chunks = list(chunk_text(text, limit=100))
    assert "".join(chunks) == text
    assert all(len(c) <= 100 for c in chunks)
    assert all(c.endswith("\n") for c in chunks if "\n" in c) and len(chunks[0]) == 96


def test_cli_reports_bad_input_without_traceback(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "typo"}\n')
    result = subprocess.run([sys.executable, "tools/train_tokenizer.py", "--input", str(bad), "--vocab-size", "300",
                             "--model-prefix", str(tmp_path / "m")], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {bad}:2: missing key") and "Traceback" not in result.stderr
