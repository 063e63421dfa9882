"""Reading raw documents: which files, in which order, and what happens to each kind of bad record."""

import gzip
import json
import os

import pytest

from mtp_megatron.data.sources import (EMPTY, INVALID_JSON, INVALID_UTF8, MISSING_KEY, NOT_A_STRING, NOT_AN_OBJECT,
                                       SKIPS_LISTED, DataError, DocumentReader, InputError, SkipLog, Skipped,
                                       resolve_inputs)


def _write(path, data) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode("utf-8"))
    return str(path)


def _jsonl(records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def test_folders_are_walked_sorted_recursively_without_hidden_files(tmp_path):
    for name in ["b.py", "a/z.py", "a/b/c.md", "a.txt", ".hidden.py", ".git/config", "a/.cache/x.py"]:
        _write(tmp_path / "src" / name, "x\n")
    files = resolve_inputs([str(tmp_path / "src")])  # sorted by path: "a.txt" < "a/..." as "." < "/"
    assert [os.path.relpath(f, tmp_path / "src") for f in files] == ["a.txt", "a/b/c.md", "a/z.py", "b.py"]
    py = resolve_inputs([str(tmp_path / "src")], suffixes=(".py",))
    assert [os.path.basename(f) for f in py] == ["z.py", "b.py"]
    assert len(resolve_inputs([str(tmp_path / "src")], suffixes=("py,.md",))) == 3


def test_paths_keep_their_order_globs_are_sorted_and_duplicates_read_once(tmp_path):
    for name in ["d/2.jsonl", "d/1.jsonl", "d/sub/3.jsonl", "e.txt"]:
        _write(tmp_path / name, _jsonl([{"text": name}]))
    files = resolve_inputs([str(tmp_path / "e.txt"), str(tmp_path / "d" / "**" / "*.jsonl"), str(tmp_path / "e.txt")])
    assert [os.path.relpath(f, tmp_path) for f in files] == ["e.txt", "d/1.jsonl", "d/2.jsonl", "d/sub/3.jsonl"]


@pytest.mark.parametrize("path, message", [("missing.jsonl", "no such file or folder"),
                                           ("*.nothing", "no file matches this pattern")])
def test_missing_inputs_are_errors(tmp_path, path, message):
    with pytest.raises(InputError, match=message):
        DocumentReader([str(tmp_path / path)])


def test_jsonl_plain_and_gzipped_give_texts_with_their_lines(tmp_path):
    records = [{"text": "first", "id": 1}, {"text": "second\n  line"}, {"text": "third 🦄"}]
    body = _jsonl(records[:2]) + "\n" + _jsonl(records[2:])  # a blank line is not a record
    plain = _write(tmp_path / "a.jsonl", body)
    packed = str(tmp_path / "b.json.gz")
    with gzip.open(packed, "wt", encoding="utf-8") as f:
        f.write(body)
    documents = list(DocumentReader([plain, packed]))
    assert [d.texts[0] for d in documents] == [r["text"] for r in records] * 2
    assert [d.origin for d in documents] == [f"{plain}:1", f"{plain}:2", f"{plain}:4",
                                             f"{packed}:1", f"{packed}:2", f"{packed}:4"]
    assert documents[0].nbytes == len(json.dumps(records[0])) + 1


def test_plain_files_are_one_document_each(tmp_path):
    code = "def f(x):\n\treturn x  \n\n\n"  # kept byte for byte: tabs, trailing spaces, blank lines
    path = _write(tmp_path / "src" / "f.py", code)
    [document] = DocumentReader([str(tmp_path / "src")])
    assert (document.texts, document.origin, document.nbytes) == ((code,), path, len(code))


def test_several_keys_come_in_key_order(tmp_path):
    path = _write(tmp_path / "a.jsonl", _jsonl([{"text": "t", "title": "h"}]))
    [document] = DocumentReader([path], json_keys=["title", "text"])
    assert document.texts == ("h", "t")
    _write(tmp_path / "b.txt", "plain")
    with pytest.raises(DataError, match="single --json-keys"):
        DocumentReader([path, str(tmp_path / "b.txt")], json_keys=["title", "text"])


# (file name, contents, the bad record's line or None for a whole file, reason)
BAD = [
    ("json.jsonl", b'{"text": "ok"}\n{"text": "broken"\n', 2, INVALID_JSON),
    ("object.jsonl", b'{"text": "ok"}\n["text"]\n', 2, NOT_AN_OBJECT),
    ("key.jsonl", b'{"text": "ok"}\n\n{"body": "no text key"}\n', 3, MISSING_KEY),
    ("string.jsonl", b'{"text": "ok"}\n{"text": 7}\n', 2, NOT_A_STRING),
    ("utf8.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', 2, INVALID_UTF8),
    ("surrogate.jsonl", b'{"text": "ok"}\n{"text": "\\udc80 lone"}\n', 2, INVALID_UTF8),
    ("utf8.py", b"x = 1\ny = '\xff'\n", 2, INVALID_UTF8),
]


@pytest.mark.parametrize("name, data, line, reason", BAD, ids=[b[0] for b in BAD])
def test_bad_records_fail_naming_file_and_line(tmp_path, name, data, line, reason):
    path = _write(tmp_path / name, data)
    where = path if line is None else f"{path}:{line}"
    with pytest.raises(InputError) as e:
        list(DocumentReader([path], on_error="fail"))
    assert str(e.value).startswith(f"{where}: {reason}")
    assert "--on-error skip" in str(e.value)


@pytest.mark.parametrize("name, data, line, reason", BAD, ids=[b[0] for b in BAD])
def test_bad_records_are_skipped_and_listed(tmp_path, name, data, line, reason):
    path = _write(tmp_path / name, data)
    good = _write(tmp_path / "good.jsonl", _jsonl([{"text": "ok"}]))
    reader = DocumentReader([path, good], on_error="skip")
    texts = [d.texts[0] for d in reader]
    assert texts == (["ok"] if name.endswith(".py") else ["ok", "ok"])
    assert reader.skipped.counts == {reason: 1}
    [skipped] = reader.skipped.first
    assert (skipped.path, skipped.line, skipped.reason) == (path, line, reason)
    assert str(skipped) in reader.skipped.format()


def test_empty_documents_are_dropped_and_counted_whatever_the_policy(tmp_path):
    """Empty files and empty JSONL texts hold no tokens: dropped and counted, never an error; whitespace is text."""
    files = [_write(tmp_path / "src" / "__init__.py", b""), _write(tmp_path / "src" / "blank.py", b"\n\n"),
             _write(tmp_path / "a.jsonl", b'{"text": "ok"}\n{"text": ""}\n{"text": " \\n\\t"}\n'),
             _write(tmp_path / "b.jsonl.gz", gzip.compress(b'{"text": ""}\n'))]
    for policy in ("fail", "skip"):
        reader = DocumentReader([str(tmp_path / "src"), *files[2:]], on_error=policy)
        assert [d.texts[0] for d in reader] == ["\n\n", "ok", " \n\t"]
        assert reader.empty.counts == {EMPTY: 3} and reader.skipped.total == 0
        assert [(s.path, s.line) for s in reader.empty.first] == [(files[0], None), (files[2], 2), (files[3], 1)]


def test_skip_log_lists_the_first_records_and_counts_all():
    log = SkipLog()
    for line in range(1, 31):
        log.add(Skipped("a.jsonl", line, INVALID_JSON if line % 3 else EMPTY, "x"))
    text = log.format()
    assert log.total == 30 and log.counts == {INVALID_JSON: 20, EMPTY: 10}
    assert f"skipped: 30 records ({EMPTY}: 10, {INVALID_JSON}: 20)" in text
    assert "a.jsonl:20:" in text and "a.jsonl:21:" not in text and f"... and {30 - SKIPS_LISTED} more" in text
    assert SkipLog().format() == "skipped: none"


def test_unknown_policy_is_an_error(tmp_path):
    with pytest.raises(DataError, match="on_error"):
        DocumentReader([_write(tmp_path / "a.txt", "x")], on_error="ignore")
