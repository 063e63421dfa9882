"""Preprocessing into megatron-core indexed datasets: exact round trips, worker-count independence, bad input,
and that a failed or interrupted run leaves nothing behind."""

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from mtp_megatron.data import preprocess as preprocess_module
from mtp_megatron.data.preprocess import dataset_prefix, preprocess
from mtp_megatron.data.sources import EMPTY, INVALID_JSON, INVALID_UTF8, MISSING_KEY, DataError, InputError
from mtp_megatron.data.tokenizer import build_tokenizer
from mtp_megatron.data.tokenizer_training import train_tokenizer
from mtp_megatron.testing.data import make_documents, write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCUMENTS = make_documents(120, seed=1)


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    corpus = write_jsonl(folder / "corpus.jsonl", make_documents(300))
    return train_tokenizer([corpus], str(folder / "spm"), 512).model_path


def _inputs(kind: str, folder) -> str:
    """The test documents as a JSONL file, a gzipped JSONL file or a folder of source files (sorted names)."""
    if kind == "jsonl":
        return write_jsonl(folder / "docs.jsonl", DOCUMENTS)
    if kind == "jsonl.gz":
        with gzip.open(folder / "docs.jsonl.gz", "wt", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in DOCUMENTS)
        return str(folder / "docs.jsonl.gz")
    for i, text in enumerate(DOCUMENTS):
        (folder / "src" / f"m{i // 50}").mkdir(parents=True, exist_ok=True)
        (folder / "src" / f"m{i // 50}" / f"f{i:03d}.py").write_text(text)
    return str(folder / "src")


def _read(prefix: str) -> list:
    dataset = IndexedDataset(prefix)
    assert list(dataset.document_indices) == list(range(len(dataset) + 1))  # one sequence per document
    return [dataset[i].tolist() for i in range(len(dataset))]


def _files(folder) -> list:
    return sorted(p for p in os.listdir(folder) if not p.startswith("docs") and p != "src")


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "folder"])
@pytest.mark.parametrize("tokenizer_type", ["SentencePieceTokenizer", "ByteTokenizer"])
@pytest.mark.parametrize("append_eod", [False, True], ids=["no-eod", "eod"])
def test_round_trip(tmp_path, spm_model, kind, tokenizer_type, append_eod):
    summary = preprocess([_inputs(kind, tmp_path)], str(tmp_path / "out"), tokenizer_type=tokenizer_type,
                         tokenizer_model=spm_model, append_eod=append_eod, workers=2, progress=False)
    tokenizer = build_tokenizer("byte" if tokenizer_type == "ByteTokenizer" else "sentencepiece", spm_model)
    prefix = dataset_prefix(str(tmp_path / "out"), "text")
    assert summary.prefixes == {"text": prefix}
    assert _files(tmp_path) == ["out_text_document.bin", "out_text_document.idx", "out_text_document.tokenizer.json"]
    record = json.loads((tmp_path / "out_text_document.tokenizer.json").read_text())
    assert record["type"] == tokenizer.kind and record["eod_appended"] == append_eod

    expected = [tokenizer.tokenize(text) + ([tokenizer.eod] if append_eod else []) for text in DOCUMENTS]
    stored = _read(prefix)
    assert stored == expected
    assert [tokenizer.detokenize(ids) for ids in stored] == DOCUMENTS
    assert IndexedDataset(prefix).index.dtype == np.uint16
    assert (summary.documents, summary.tokens) == (len(DOCUMENTS), sum(map(len, expected)))
    record_bytes = [len(json.dumps({"text": t})) + 1 if kind != "folder" else len(t.encode()) for t in DOCUMENTS]
    assert summary.input_bytes == sum(record_bytes)
    assert summary.tokens_per_s > 0 and summary.skipped.total == 0


def test_worker_count_does_not_change_the_output(tmp_path, spm_model):
    corpus = write_jsonl(tmp_path / "docs.jsonl", DOCUMENTS * 3)  # 360 documents: every worker gets several tasks
    outputs = []
    for workers in (1, 3):
        prefix = dataset_prefix(str(tmp_path / f"w{workers}"), "text")
        preprocess([corpus], str(tmp_path / f"w{workers}"), tokenizer_model=spm_model, append_eod=True,
                   workers=workers, progress=False)
        outputs.append([open(prefix + suffix, "rb").read() for suffix in (".bin", ".idx")])
    assert outputs[0] == outputs[1]


def test_several_keys_give_aligned_datasets(tmp_path):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"title": f"t{i}", "text": t}) + "\n" for i, t in enumerate(DOCUMENTS)))
    summary = preprocess([str(corpus)], str(tmp_path / "out"), tokenizer_type="byte", json_keys=["text", "title"],
                         progress=False)
    assert set(summary.prefixes) == {"text", "title"}
    titles = _read(summary.prefixes["title"])
    assert [bytes(t).decode() for t in titles] == [f"t{i}" for i in range(len(DOCUMENTS))]
    assert [bytes(t).decode() for t in _read(summary.prefixes["text"])] == DOCUMENTS


def _bad_inputs(folder) -> list:
    """A JSONL file and a source folder, each with good documents and bad records of every kind."""
    lines = [json.dumps({"text": "good one"}), '{"text": "cut', json.dumps({"body": "x"}), json.dumps({"text": ""}),
             json.dumps({"text": "good two"})]
    jsonl = folder / "docs.jsonl"
    jsonl.write_bytes("\n".join(lines).encode() + b'\n{"text": "caf\xe9"}\n')
    (folder / "src").mkdir()
    (folder / "src" / "a.py").write_text("good = 3\n")
    (folder / "src" / "b.py").write_bytes(b"x = 1\n\xff\n")
    (folder / "src" / "c.py").write_text("  \n")
    (folder / "src" / "d.py").write_text("")
    return [str(jsonl), str(folder / "src")]


def test_bad_input_is_skipped_and_listed(tmp_path):
    paths = _bad_inputs(tmp_path)
    summary = preprocess(paths, str(tmp_path / "out"), tokenizer_type="byte", on_error="skip", progress=False)
    assert [bytes(t).decode() for t in _read(summary.prefixes["text"])] == [
        "good one", "good two", "good = 3\n", "  \n"]  # whitespace is text
    assert summary.skipped.counts == {INVALID_JSON: 1, MISSING_KEY: 1, INVALID_UTF8: 2}
    assert summary.empty.counts == {EMPTY: 2}
    jsonl, src = paths
    listed = summary.format()
    for where in [f"{jsonl}:2: {INVALID_JSON}", f"{jsonl}:3: {MISSING_KEY}", f"{jsonl}:4: {EMPTY}",
                  f"{jsonl}:6: {INVALID_UTF8}", f"{src}/b.py:2: {INVALID_UTF8}", f"{src}/d.py: {EMPTY}"]:
        assert where in listed
    assert "empty documents dropped: 2 records" in listed


def test_bad_input_fails_naming_file_and_line_and_leaves_nothing(tmp_path):
    paths = _bad_inputs(tmp_path)
    with pytest.raises(InputError, match=f"^{paths[0]}:2: {INVALID_JSON}"):
        preprocess(paths, str(tmp_path / "out"), tokenizer_type="byte", progress=False)
    assert _files(tmp_path) == []


def test_failure_after_documents_were_written_leaves_nothing(tmp_path, spm_model):
    corpus = write_jsonl(tmp_path / "docs.jsonl", DOCUMENTS * 3)
    with open(corpus, "a") as f:
        f.write('{"text": 1}\n')  # the last record, after 360 good documents (several tasks) were written
    with pytest.raises(InputError, match=f"docs.jsonl:{len(DOCUMENTS) * 3 + 1}: value is not a string"):
        preprocess([corpus], str(tmp_path / "out"), tokenizer_model=spm_model, workers=2, progress=False)
    assert _files(tmp_path) == []


def test_interrupt_leaves_nothing(tmp_path, monkeypatch):
    corpus = write_jsonl(tmp_path / "docs.jsonl", DOCUMENTS)
    written = []

    def add_then_interrupt(self, tokens):
        written.append(len(tokens))
        if len(written) == 50:
            raise KeyboardInterrupt  # as Ctrl-C would, in the writing process

    monkeypatch.setattr(preprocess_module._DatasetWriter, "add", add_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        preprocess([corpus], str(tmp_path / "out"), tokenizer_type="byte", workers=2, progress=False)
    assert len(written) == 50 and _files(tmp_path) == []


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    corpus = write_jsonl(tmp_path / "docs.jsonl", DOCUMENTS[:3])
    prefix = dataset_prefix(str(tmp_path / "out"), "text")
    with open(prefix + ".idx", "wb") as f:
        f.write(b"old")
    with pytest.raises(DataError, match=f"{prefix}.idx exists; pass --overwrite"):
        preprocess([corpus], str(tmp_path / "out"), tokenizer_type="byte", progress=False)
    assert open(prefix + ".idx", "rb").read() == b"old" and not os.path.exists(prefix + ".bin")

    with pytest.raises(InputError):  # a failing run with overwrite keeps the old output
        preprocess([corpus, str(tmp_path / "missing.jsonl")], str(tmp_path / "out"), tokenizer_type="byte",
                   overwrite=True, progress=False)
    assert open(prefix + ".idx", "rb").read() == b"old"

    preprocess([corpus], str(tmp_path / "out"), tokenizer_type="byte", overwrite=True, progress=False)
    assert [bytes(t).decode() for t in _read(prefix)] == DOCUMENTS[:3]


def test_unknown_tokenizer_type_is_an_error(tmp_path):
    with pytest.raises(DataError, match="unknown --tokenizer-type 'GPT2BPETokenizer'"):
        preprocess([write_jsonl(tmp_path / "docs.jsonl", ["x"])], str(tmp_path / "out"),
                   tokenizer_type="GPT2BPETokenizer")


def test_cli(tmp_path, spm_model):
    """One good and one bad run of the real script, side by side (each pays the megatron-core import)."""
    good = write_jsonl(tmp_path / "good.jsonl", DOCUMENTS[:10])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": \n')
    common = [sys.executable, "tools/preprocess_data.py", "--tokenizer-type", "SentencePieceTokenizer",
              "--tokenizer-model", spm_model, "--workers", "2", "--append-eod"]
    runs = [subprocess.Popen(common + ["--input", path, "--output-prefix", str(tmp_path / name)], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for path, name in ((good, "good"), (str(bad), "bad"))]
    (good_out, good_err), (_, bad_err) = [run.communicate(timeout=120) for run in runs]
    assert runs[0].returncode == 0, good_err
    assert "10 documents" in good_out
    assert IndexedDataset.exists(dataset_prefix(str(tmp_path / "good"), "text"))
    assert runs[1].returncode == 2
    assert f"error: {bad}:3: {INVALID_JSON}" in bad_err and "Traceback" not in bad_err
    assert not any(name.startswith("bad_") for name in os.listdir(tmp_path))


def _run_tool(*args: str) -> int:
    """tools/preprocess_data.py's ``main`` in this process (its argument parsing included)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("preprocess_data", os.path.join(REPO, "tools", "preprocess_data.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(list(args))


def test_megatron_lms_sentencepiece_tokenizer_names_mean_what_they_mean_there(tmp_path, spm_model):
    """GPTSentencePieceTokenizer encodes as SentencePieceTokenizer does (byte-identical files); Llama2Tokenizer
    also starts every document with the model's BOS, as Megatron-LM's ``_Llama2Tokenizer.tokenize`` does."""
    corpus = write_jsonl(tmp_path / "docs.jsonl", DOCUMENTS[:20])
    outputs = {}
    for name in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer"):
        code = _run_tool("--input", corpus, "--output-prefix", str(tmp_path / name), "--tokenizer-type", name,
                         "--tokenizer-model", spm_model, "--append-eod", "--workers", "1")
        assert code == 0, name
        outputs[name] = dataset_prefix(str(tmp_path / name), "text")
    plain = outputs["SentencePieceTokenizer"]
    for suffix in (".bin", ".idx"):
        with open(plain + suffix, "rb") as a, open(outputs["GPTSentencePieceTokenizer"] + suffix, "rb") as b:
            assert a.read() == b.read(), suffix
    bos = build_tokenizer("sentencepiece", spm_model).bos
    assert bos >= 0
    assert _read(outputs["Llama2Tokenizer"]) == [[bos, *document] for document in _read(plain)]


def test_empty_documents_are_dropped_by_default_and_no_documents_is_an_error(tmp_path):
    """An empty __init__.py is ordinary in code: dropped and counted under the default --on-error fail. Input
    with no document at all would be a 0-document dataset: an error, and nothing is written."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "__init__.py").write_text("")
    (src / "a.py").write_text("x = 1\n")
    code = _run_tool("--input", str(src), "--output-prefix", str(tmp_path / "out"), "--tokenizer-type", "byte",
                     "--workers", "1")
    assert code == 0 and [bytes(t).decode() for t in _read(dataset_prefix(str(tmp_path / "out"), "text"))] == ["x = 1\n"]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="no documents to write"):
        preprocess([str(empty)], str(tmp_path / "none"), tokenizer_type="byte", progress=False)
    assert not [name for name in os.listdir(tmp_path) if name.startswith("none")]


def test_a_killed_runs_temporary_files_are_removed_by_the_next_run(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    prefix = dataset_prefix(str(tmp_path / "out"), "text")
    stale = [f"{prefix}.tmp-{dead.pid}.bin", f"{prefix}.tmp-{dead.pid}.idx"]
    for path in stale:
        open(path, "wb").close()
    preprocess([write_jsonl(tmp_path / "docs.jsonl", DOCUMENTS[:3])], str(tmp_path / "out"), tokenizer_type="byte",
               progress=False)
    assert not any(os.path.exists(path) for path in stale)
    assert f"removed {stale[0]}: left by a preprocessing run that did not finish" in capsys.readouterr().err


def test_data_made_with_another_tokenizer_of_the_same_size_is_refused_at_load(tmp_path, spm_model):
    """preprocess_data records the tokenizer beside each dataset; a training config with another tokenizer of
    the same vocabulary size fails naming the dataset; a dataset without the record (Megatron-LM's tool) loads
    with a notice."""
    from mtp_megatron.config import ConfigError
    from mtp_megatron.train import load_run_config

    other = train_tokenizer([write_jsonl(tmp_path / "other.jsonl", make_documents(300, seed=9))],
                            str(tmp_path / "other"), 512).model_path
    assert build_tokenizer("sentencepiece", other).vocab_size == build_tokenizer("sentencepiece", spm_model).vocab_size
    corpus = write_jsonl(tmp_path / "docs.jsonl", DOCUMENTS)
    assert _run_tool("--input", corpus, "--output-prefix", str(tmp_path / "out"), "--tokenizer-model", spm_model,
                     "--append-eod", "--workers", "1") == 0
    prefix = dataset_prefix(str(tmp_path / "out"), "text")
    tiny = os.path.join(REPO, "configs", "tiny.yaml")
    common = ["data.synthetic=false", f"data.paths=[{prefix}]", "data.split=1,0,0"]
    load_run_config(tiny, [*common, f"tokenizer.model={spm_model}"])  # the right tokenizer loads
    with pytest.raises(ConfigError) as error:
        load_run_config(tiny, [*common, f"tokenizer.model={other}"])
    assert f"{prefix} was tokenized with sentencepiece tokenizer {spm_model}" in str(error.value)
    os.remove(prefix + ".tokenizer.json")
    load_run_config(tiny, [*common, f"tokenizer.model={other}"])  # unrecorded: cannot be checked, not refused
