"""Raw input documents for the data tools: JSONL files (plain or gzipped) and folders or globs of text files.

``tools/train_tokenizer.py`` and ``tools/preprocess_data.py`` read their ``--input`` through ``DocumentReader``, so
both see the same documents in the same order and treat bad records the same way.

What a path holds is decided by its name alone: ``.jsonl``, ``.json`` (Megatron-LM's name for JSONL) and their
``.gz`` forms hold one JSON object per line; every other file is one document. A folder is walked recursively
(hidden files and folders skipped, optionally only ``suffixes``), a glob pattern is expanded; both in sorted order,
so the output of a run never depends on the file system's listing order.

Bad records (malformed JSON, a missing or non-string key, invalid UTF-8) either stop the run with an
``InputError`` naming the file and line (``on_error="fail"``, the default: silent data loss is worse than a
stopped run) or are skipped and counted in a ``SkipLog`` for the run's summary (``on_error="skip"``).

Empty documents are not bad: code corpora are full of them (an empty ``__init__.py``), and Megatron-LM's tool
accepts them. They hold no tokens, so they are dropped and counted (``DocumentReader.empty``), whatever
``on_error`` says; a whitespace-only document is a document (its whitespace is text, as in Megatron-LM). A
record with several JSON keys is dropped when any of them is empty, so the keys' datasets stay aligned.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence, Tuple

ON_ERROR_CHOICES = ("fail", "skip")
JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
SKIPS_LISTED = 20  # skipped records named one by one in a summary; the rest only counted

# Reasons a record is bad (the keys of SkipLog.counts), with the fix an error message suggests.
INVALID_JSON = "invalid JSON"
NOT_AN_OBJECT = "not a JSON object"
MISSING_KEY = "missing key"
NOT_A_STRING = "value is not a string"
INVALID_UTF8 = "invalid UTF-8"
EMPTY = "empty document"
_FIXES = {
    INVALID_JSON: "repair the line",
    NOT_AN_OBJECT: "make each line a JSON object",
    MISSING_KEY: "pass the keys the records have with --json-keys",
    NOT_A_STRING: "pass the keys of the text fields with --json-keys",
    INVALID_UTF8: "re-encode the file as UTF-8 (or select text files with --suffixes)",
}


class DataError(ValueError):
    """A user error of the data tools (bad input, an output in the way); the message says what to do."""


class InputError(DataError):
    """A bad input record or path; the message starts with ``file:line:`` where there is a line."""


@dataclass(frozen=True)
class Document:
    """One input record: its text for each requested key (in ``json_keys`` order) and where it came from."""

    texts: Tuple[str, ...]
    path: str
    line: Optional[int]  # 1-based line of a JSONL record; None for a whole file
    nbytes: int  # size of the raw record (the JSONL line or the file), for throughput figures

    @property
    def origin(self) -> str:
        return _origin(self.path, self.line)


@dataclass(frozen=True)
class Skipped:
    """A record left out under ``on_error="skip"``."""

    path: str
    line: Optional[int]
    reason: str  # one of the reason constants above
    detail: str = ""

    def __str__(self) -> str:
        return f"{_origin(self.path, self.line)}: {self.reason}" + (f" ({self.detail})" if self.detail else "")


@dataclass
class SkipLog:
    """Skipped records: counted per reason, and the first ``SKIPS_LISTED`` kept to be named in the summary."""

    counts: Counter = field(default_factory=Counter)
    first: List[Skipped] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, skipped: Skipped) -> None:
        self.counts[skipped.reason] += 1
        if len(self.first) < SKIPS_LISTED:
            self.first.append(skipped)

    def format(self, title: str = "skipped") -> str:
        """A few lines for a summary: counts per reason, then the first skipped records by file and line."""
        if not self.total:
            return f"{title}: none"
        per_reason = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.counts.items()))
        lines = [f"{title}: {self.total} record{'s' if self.total != 1 else ''} ({per_reason})"]
        lines += [f"  {s}" for s in self.first]
        if self.total > len(self.first):
            lines.append(f"  ... and {self.total - len(self.first)} more")
        return "\n".join(lines)


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--input`` options both data tools share (their values go to ``DocumentReader``)."""
    group = parser.add_argument_group("input")
    group.add_argument("--input", nargs="+", required=True, metavar="PATH",
                       help="JSONL files (.jsonl/.json, optionally .gz), folders or glob patterns of text files "
                            "(each file one document)")
    group.add_argument("--json-keys", nargs="+", default=["text"], metavar="KEY",
                       help="keys of the JSONL records to read (default: %(default)s)")
    group.add_argument("--suffixes", nargs="+", default=None, metavar="SUFFIX",
                       help="only files with these suffixes when walking a folder, e.g. .py .md or py,md "
                            "(default: every file)")
    group.add_argument("--on-error", choices=ON_ERROR_CHOICES, default="fail",
                       help="bad records (malformed JSON, missing key, invalid UTF-8): stop with an error "
                            "naming file and line, or skip and list them in the summary (default: %(default)s)")


def is_jsonl(path: str) -> bool:
    return path.endswith(JSONL_SUFFIXES)


def resolve_inputs(paths: Sequence[str], suffixes: Optional[Sequence[str]] = None) -> List[str]:
    """The files named by ``paths``, in a deterministic order: each path in the order given, a folder's files and a
    glob's matches sorted by path. ``suffixes`` (``[".py", "md"]`` or ``[".py,.md"]``) filters the files found by
    walking a folder.

    A file named twice is read once. A path that is neither a file, a folder nor a matching glob is an error.
    """
    suffixes = _normalize_suffixes(suffixes)
    files: List[str] = []
    for path in paths:
        if os.path.isdir(path):
            files += _walk(path, suffixes)
        elif os.path.isfile(path):
            files.append(path)
        elif any(c in path for c in "*?["):  # a glob pattern
            matches = sorted(glob.glob(path, recursive=True))
            if not matches:
                raise InputError(f"{path}: no file matches this pattern")
            for match in matches:
                files += _walk(match, suffixes) if os.path.isdir(match) else [match]
        else:
            raise InputError(f"{path}: no such file or folder")
    unique = list(dict.fromkeys(files))
    if not unique:
        raise InputError(f"no input files in {', '.join(paths)}" + (f" with suffixes {suffixes}" if suffixes else ""))
    return unique


class DocumentReader:
    """Iterates the documents of ``paths`` (see the module docstring), applying the ``on_error`` policy.

    The input files are resolved on construction, so a wrong path fails before any work starts. Records skipped
    under ``on_error="skip"`` are collected in ``self.skipped``.
    """

    def __init__(self, paths: Sequence[str], json_keys: Sequence[str] = ("text",),
                 suffixes: Optional[Sequence[str]] = None, on_error: str = "fail"):
        if on_error not in ON_ERROR_CHOICES:
            raise DataError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
        if not json_keys:
            raise DataError("at least one JSON key is needed (--json-keys)")
        self.json_keys = tuple(json_keys)
        self.on_error = on_error
        self.files = resolve_inputs(paths, suffixes)
        plain = [f for f in self.files if not is_jsonl(f)]
        if plain and len(self.json_keys) > 1:
            raise DataError(f"{plain[0]}: a plain file is one text, but {len(self.json_keys)} JSON keys were asked "
                            "for; pass a single --json-keys for folders and text files")
        self.skipped = SkipLog()
        self.empty = SkipLog()
        """Empty documents, dropped (``EMPTY``; counted and the first few named in summaries)."""

    def __iter__(self) -> Iterator[Document]:
        for path in self.files:
            yield from (self._read_jsonl(path) if is_jsonl(path) else self._read_plain(path))

    def _bad(self, path: str, line: Optional[int], reason: str, detail: str) -> None:
        """Skip a bad record, or stop the run, as ``on_error`` says."""
        skipped = Skipped(path, line, reason, detail)
        if self.on_error == "fail":
            raise InputError(f"{skipped}. Fix: {_FIXES[reason]}, or pass --on-error skip to leave such records out")
        self.skipped.add(skipped)

    def _read_plain(self, path: str) -> Iterator[Document]:
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise InputError(f"{path}: cannot read the file ({e})") from e
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1  # name the line, so a stray byte can be found
            self._bad(path, line, INVALID_UTF8, f"byte 0x{raw[e.start]:02x} at offset {e.start}")
            return
        if _is_empty(text):
            self.empty.add(Skipped(path, None, EMPTY))
            return
        yield Document((text,), path, None, len(raw))

    def _read_jsonl(self, path: str) -> Iterator[Document]:
        opener = gzip.open if path.endswith(".gz") else open
        line = 0
        try:
            with opener(path, "rb") as f:
                for line, raw in enumerate(f, 1):
                    if raw.isspace():  # blank lines (e.g. a trailing one) are not records
                        continue
                    texts = self._parse_record(path, line, raw)
                    if texts is not None:
                        yield Document(texts, path, line, len(raw))
        except (OSError, EOFError, zlib.error) as e:  # a truncated or corrupt .gz: the rest cannot be read
            raise InputError(f"{_origin(path, line + 1)}: cannot read the file ({e})") from e

    def _parse_record(self, path: str, line: int, raw: bytes) -> Optional[Tuple[str, ...]]:
        """The record's texts, or None when it is bad (and skipped)."""
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            self._bad(path, line, INVALID_UTF8, f"byte 0x{raw[e.start]:02x} at column {e.start + 1}")
            return None
        except json.JSONDecodeError as e:
            self._bad(path, line, INVALID_JSON, str(e))
            return None
        if not isinstance(record, dict):
            self._bad(path, line, NOT_AN_OBJECT, f"got {type(record).__name__}")
            return None
        texts = []
        for key in self.json_keys:
            if key not in record:
                self._bad(path, line, MISSING_KEY, f"{key!r}; the record has {sorted(record)[:10]}")
                return None
            text = record[key]
            if not isinstance(text, str):
                self._bad(path, line, NOT_A_STRING, f"{key!r} holds {type(text).__name__}")
                return None
            if not text.isascii() and not _encodable(text):  # JSON escapes can smuggle in lone surrogates
                self._bad(path, line, INVALID_UTF8, f"{key!r} holds a lone surrogate escape")
                return None
            if _is_empty(text):
                self.empty.add(Skipped(path, line, EMPTY, f"{key!r}"))
                return None
            texts.append(text)
        return tuple(texts)


def _origin(path: str, line: Optional[int]) -> str:
    return path if line is None else f"{path}:{line}"


def _is_empty(text: str) -> bool:
    return not text


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _normalize_suffixes(suffixes: Optional[Sequence[str]]) -> Optional[Tuple[str, ...]]:
    """``["py", ".md,.txt"]`` -> ``(".py", ".md", ".txt")``; None (every file) stays None."""
    if suffixes is None:
        return None
    parts = [part.strip() for suffix in suffixes for part in suffix.split(",")]
    return tuple(p if p.startswith(".") else f".{p}" for p in parts if p)


def _walk(folder: str, suffixes: Optional[Tuple[str, ...]]) -> List[str]:
    """The files under ``folder``, sorted, skipping hidden files and folders (``.git``, ``.DS_Store``)."""
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files += [os.path.join(root, n) for n in names
                  if not n.startswith(".") and (suffixes is None or n.endswith(suffixes))]
    return sorted(files)
