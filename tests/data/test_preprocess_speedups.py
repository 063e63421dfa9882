"""tools/preprocess_data.py writes the .bin/.idx itself (no megatron-core import at start-up): its files must equal,
byte for byte, those of the plain loop over megatron-core's ``IndexedDatasetBuilder`` (what Megatron-LM's
tools/preprocess_data.py writes), for every input and option, and the tool must not import megatron-core or torch.
"""

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from mtp_megatron.data import preprocess as preprocess_module
from mtp_megatron.data.preprocess import dataset_prefix
from mtp_megatron.data.tokenizer import build_tokenizer, token_dtype
from mtp_megatron.data.tokenizer_training import train_tokenizer
from mtp_megatron.testing.data import make_documents, write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Unicode of every UTF-8 length, astral characters written raw and as JSON surrogate-pair escapes, and documents
# longer than one worker task's share; 150 documents make several tasks of CHUNKSIZE for every worker.
UNICODE = ["héllo wörld ✓ 中文 \U0001F600 end", "x = '\u00e9\u4e2d\U00010348'\n", "\t  \n", "a" * 5000]
DOCUMENTS = make_documents(146, seed=3) + UNICODE


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    return train_tokenizer([write_jsonl(folder / "c.jsonl", make_documents(300) + UNICODE)], str(folder / "spm"),
                           512).model_path


def _run_tool(*args: str) -> int:
    """tools/preprocess_data.py's ``main`` in this process (its argument parsing included)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("preprocess_data", os.path.join(REPO, "tools", "preprocess_data.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(list(args))


def _baseline(lines: list, key: str, prefix: str, tokenizer, append_eod: bool, bos: bool) -> None:
    """The plain loop, as Megatron-LM's tool writes (its ``Encoder.encode`` + ``IndexedDatasetBuilder``), with
    records that have an empty text left out as our tool drops them (every key's, so the datasets stay aligned)."""
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=token_dtype(tokenizer.vocab_size))
    for line in lines:
        record = json.loads(line)
        if not all(record.values()):
            continue
        text = record[key]
        ids = ([tokenizer.bos] if bos else []) + tokenizer.tokenize(text) + ([tokenizer.eod] if append_eod else [])
        builder.add_document(ids, [len(ids)])
    builder.finalize(prefix + ".idx")


def _same_files(a: str, b: str) -> None:
    for suffix in (".bin", ".idx"):
        with open(a + suffix, "rb") as x, open(b + suffix, "rb") as y:
            assert x.read() == y.read(), suffix


def _jsonl_lines(ensure_ascii: bool, empty: bool) -> list:
    records = [{"text": t, "title": t[:7] or "-"} for t in DOCUMENTS]
    if empty:
        records[5:5] = [{"text": "", "title": "dropped"}]
    return [json.dumps(r, ensure_ascii=ensure_ascii) + "\n" for r in records]


@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("tokenizer_type", ["GPTSentencePieceTokenizer", "Llama2Tokenizer", "ByteTokenizer"])
@pytest.mark.parametrize("append_eod", [False, True], ids=["no-eod", "eod"])
def test_cli_output_equals_the_builder_loop_byte_for_byte(tmp_path, spm_model, workers, tokenizer_type, append_eod):
    lines = _jsonl_lines(ensure_ascii=workers == 1, empty=True)  # raw UTF-8 and \u escapes alike
    corpus = tmp_path / "docs.jsonl.gz"
    with gzip.open(corpus, "wt", encoding="utf-8") as f:
        f.writelines(lines)
    code = _run_tool("--input", str(corpus), "--output-prefix", str(tmp_path / "out"), "--tokenizer-type",
                     tokenizer_type, "--tokenizer-model", spm_model, "--workers", str(workers), "--json-keys", "text",
                     "title", *(["--append-eod"] if append_eod else []))
    assert code == 0
    tokenizer = build_tokenizer("byte" if tokenizer_type == "ByteTokenizer" else "sentencepiece", spm_model)
    for key in ("text", "title"):
        reference = str(tmp_path / f"reference_{key}")
        _baseline(lines, key, reference, tokenizer, append_eod, bos=tokenizer_type == "Llama2Tokenizer")
        _same_files(dataset_prefix(str(tmp_path / "out"), key), reference)
    dataset = IndexedDataset(dataset_prefix(str(tmp_path / "out"), "text"))  # megatron-core reads it back
    assert len(dataset) == len(DOCUMENTS) and list(dataset.document_indices) == list(range(len(DOCUMENTS) + 1))
    if tokenizer_type == "ByteTokenizer":
        assert bytes(dataset[len(DOCUMENTS) - 4][:-1 if append_eod else None].tolist()).decode() == UNICODE[0]


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.int64])
def test_writer_equals_the_builder_for_every_dtype(tmp_path, dtype):
    """int32 is what a >= 65500-piece tokenizer gets; no small test model reaches it, so the writer is compared
    directly, with an empty sequence and one longer than a file buffer."""
    rng = np.random.default_rng(0)
    documents = [rng.integers(0, 200, size=n).astype(dtype) for n in (5, 0, 1, 70_000, 3)]
    writer = preprocess_module._DatasetWriter(str(tmp_path / "ours"), dtype)
    builder = IndexedDatasetBuilder(str(tmp_path / "reference.bin"), dtype=dtype)
    for tokens in documents:
        writer.add(tokens)
        builder.add_document(tokens, [len(tokens)])
    writer.finalize()
    writer.commit()
    builder.finalize(str(tmp_path / "reference.idx"))
    _same_files(str(tmp_path / "ours"), str(tmp_path / "reference"))


def test_writer_refuses_tokens_of_another_dtype(tmp_path):
    writer = preprocess_module._DatasetWriter(str(tmp_path / "ours"), np.uint16)
    with pytest.raises(TypeError, match="dtype int32 for a dataset of uint16"):
        writer.add(np.zeros(3, dtype=np.int32))
    writer.discard()
    assert os.listdir(tmp_path) == []


def test_the_tool_imports_neither_megatron_core_nor_torch(tmp_path):
    """Importing megatron-core (and torch with it) took about 4 s of every run before the first document."""
    corpus = write_jsonl(tmp_path / "docs.jsonl", DOCUMENTS[:40])
    script = ("import runpy, sys\n"
              f"sys.argv = ['tools/preprocess_data.py', '--input', {corpus!r}, '--output-prefix', "
              f"{str(tmp_path / 'out')!r}, '--tokenizer-type', 'ByteTokenizer', '--workers', '2']\n"
              "try:\n    runpy.run_path('tools/preprocess_data.py', run_name='__main__')\n"
              "except SystemExit as e:\n    assert e.code == 0, e.code\n"
              "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch' or m.startswith('megatron')))\n")
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "[]"
    assert len(IndexedDataset(dataset_prefix(str(tmp_path / "out"), "text"))) == 40
