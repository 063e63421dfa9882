"""Throughput of tools/preprocess_data.py's pipeline (``mtp_megatron.data.preprocess``) against a plain loop.

Corpus: the ``.py`` files of the running interpreter's standard library (site-packages excluded), read as a folder of
source files; files that are not UTF-8 or are empty are left out up front, so every run writes the same documents.
Tokenizer: a sentencepiece model trained here on a small sample of that corpus (or ``--tokenizer-model``).

The configurations run round-robin, one run of each per round, for ``--repeats`` rounds; the medians of wall time
and of CPU time (this process plus the pool's workers) are reported:

* baseline: one process reads each file, encodes it with sentencepiece and appends it (EOD included) to
  megatron-core's ``IndexedDatasetBuilder``, the simplest correct implementation;
* ``preprocess`` with 1, 2 and ``os.cpu_count()`` tokenizing workers (the reading/writing process comes on top).

Every run's ``.bin``/``.idx`` must equal the baseline's byte for byte, which the table states.

    python bench/preprocess_throughput.py [--max-mb 8] [--repeats 5] [--tokenizer-model tok.model]

Against Megatron-LM's ``tools/preprocess_data.py`` (``--megatron-lm DIR``, a Megatron-LM checkout whose
``megatron/training/__init__.py`` imports only its global variables: the original imports the trainer, which needs
triton): both tools run as whole processes (``python tools/preprocess_data.py ...``, start-up included) on one
JSONL of the standard library's files repeated (each copy gains a ``# copy k`` line) up to ``--jsonl-mb`` MB, at
each of ``--workers`` counts; the outputs must be equal byte for byte. Where the time goes is measured once, in
this process: each tool's start-up (a run on a one-record JSONL), JSON parsing, tokenization (one process) and
writing.

    python bench/preprocess_throughput.py --megatron-lm ../megatron-lm-0.16.1 --jsonl-mb 100 --workers 1 2
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import functools
import os
import resource
import shlex
import statistics
import sys
import sysconfig
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import machine_line, table  # noqa: E402

import torch  # noqa: E402

from mtp_megatron.data.preprocess import dataset_prefix, preprocess  # noqa: E402
from mtp_megatron.data.tokenizer import SentencePieceTokenizer, token_dtype  # noqa: E402
from mtp_megatron.data.tokenizer_training import train_tokenizer  # noqa: E402

MB = 1e6
BASELINE = "baseline loop (1 process)"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-mb", type=float, default=None,
                        help="use only the first files (sorted by path) up to this many MB (default: all)")
    parser.add_argument("--tokenizer-model", default=None, help="a sentencepiece model (default: train one)")
    parser.add_argument("--vocab-size", type=int, default=1024, help="of the trained model (default %(default)s)")
    parser.add_argument("--sample-mb", type=float, default=4.0,
                        help="training sample of the trained model (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="rounds of timed runs (default %(default)s)")
    parser.add_argument("--megatron-lm", default=None, metavar="DIR",
                        help="compare with Megatron-LM's tools/preprocess_data.py from this checkout instead")
    parser.add_argument("--jsonl-mb", type=float, default=100.0, help="with --megatron-lm: corpus size (MB)")
    parser.add_argument("--workers", type=int, nargs="+", default=None,
                        help="with --megatron-lm: worker counts (default: 1 to os.cpu_count())")
    return parser.parse_args()


def write_jsonl(files: list, path: str, megabytes: float) -> tuple[int, int]:
    """The files as {"text": ...} records, repeated (copy k marked by a first line) up to ``megabytes``; returns
    (records, text bytes)."""
    import json

    records = written = copy = 0
    texts = [open(f, "rb").read().decode("utf-8") for f in files]
    with open(path, "w", encoding="utf-8") as out:
        while written < megabytes * MB:
            for text in texts:
                text = f"# copy {copy}\n{text}" if copy else text
                out.write(json.dumps({"text": text}) + "\n")
                records, written = records + 1, written + len(text.encode("utf-8"))
                if written >= megabytes * MB:
                    break
            copy += 1
    return records, written


def tool_command(tool_dir: str, jsonl: str, model: str, prefix: str, workers: int) -> list:
    """The tool's command line; the earlier round's output is removed first (ours refuses to overwrite it, and a
    stale file must not pass for the output of a run whose workers failed)."""
    for suffix in (".bin", ".idx"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(prefix + "_text_document" + suffix)
    return [sys.executable, os.path.join(tool_dir, "tools", "preprocess_data.py"), "--input", jsonl,
            "--output-prefix", prefix, "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", model,
            "--append-eod", "--workers", str(workers)]


def run_tool(command: list, tool_dir: str) -> None:
    import subprocess

    env = {**os.environ, "PYTHONPATH": tool_dir}
    result = subprocess.run(command, cwd=tool_dir, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"error: {shlex.join(command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")


def phases(jsonl: str, model: str) -> dict:
    """Seconds of each part of the work, one process: JSON parsing, tokenization, writing (numpy, like both)."""
    import json

    import numpy as np
    import sentencepiece

    start = time.perf_counter()
    with open(jsonl, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    parsed = time.perf_counter()
    processor = sentencepiece.SentencePieceProcessor(model_file=model)
    ids = [processor.encode(text) for text in texts]
    dtype = token_dtype(processor.vocab_size())  # as both tools choose it
    tokenized = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        for document in ids:
            out.write(np.asarray(document, dtype=dtype).tobytes())
    return {"JSON parsing": parsed - start, "tokenization (1 process)": tokenized - parsed,
            "writing": time.perf_counter() - tokenized}


def against_megatron_lm(args, files: list, model: str, tmp: str) -> None:
    model = os.path.abspath(model)  # the tools run in their own folders
    ours_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tools = {"Megatron-LM": os.path.abspath(args.megatron_lm), "ours": ours_dir}
    jsonl = os.path.join(tmp, "corpus.jsonl")
    records, nbytes = write_jsonl(files, jsonl, args.jsonl_mb)
    one = os.path.join(tmp, "one.jsonl")
    with open(jsonl, encoding="utf-8") as f, open(one, "w", encoding="utf-8") as out:
        out.write(f.readline())
    print(f"corpus: {records:,} JSONL records, {nbytes / MB:.1f} MB of text; median of {args.repeats} runs\n")
    rows = []
    for name, tool_dir in tools.items():
        prefix = os.path.join(tmp, f"startup_{name}")
        wall, cpu, _ = timed(lambda: run_tool(tool_command(tool_dir, one, model, prefix, 1), tool_dir))
        rows.append([f"{name}: start-up (a one-record run)", f"{wall:.2f}", f"{cpu:.2f}"])
    rows += [[name, f"{seconds:.2f}", f"{seconds:.2f}"] for name, seconds in phases(jsonl, model).items()]
    print(table(["where the time goes", "wall s", "CPU s"], rows, aligns="lrr") + "\n")
    rows = []
    for workers in args.workers or list(range(1, (os.cpu_count() or 1) + 1)):
        times = {name: [] for name in tools}
        prefixes = {name: os.path.join(tmp, f"{name}_w{workers}".replace("-", "")) for name in tools}
        for _ in range(args.repeats):  # round-robin, so that drift of the machine hits both alike
            for name, tool_dir in tools.items():
                times[name].append(timed(lambda: run_tool(
                    tool_command(tool_dir, jsonl, model, prefixes[name], workers), tool_dir)))
        outputs = {name: prefix + "_text_document" for name, prefix in prefixes.items()}
        for name, output in outputs.items():  # Megatron-LM's tool exits 0 when its workers fail
            if not os.path.exists(output + ".bin"):
                raise SystemExit(f"error: {name}'s tool wrote no {output}.bin: run its command by hand to see why")
        same = "yes" if same_output(outputs["ours"], outputs["Megatron-LM"]) else "NO"
        walls = {name: statistics.median(t[0] for t in times[name]) for name in tools}
        cpus = {name: statistics.median(t[1] for t in times[name]) for name in tools}
        rows.append([str(workers), f"{walls['Megatron-LM']:.2f}", f"{walls['ours']:.2f}",
                     f"{walls['Megatron-LM'] / walls['ours']:.2f}x", f"{cpus['Megatron-LM']:.2f}",
                     f"{cpus['ours']:.2f}", f"{nbytes / MB / walls['ours']:.2f}", same])
    print(table(["workers", "Megatron-LM s", "ours s", "ours faster", "Megatron-LM CPU s", "ours CPU s",
                 "ours MB/s", "same bytes"], rows, aligns="rrrrrrrl"))
    print(f"\nload average (1 min) at the end: {os.getloadavg()[0]:.2f}")


def stdlib_corpus(max_mb) -> list:
    """Sorted stdlib ``.py`` files that are valid, non-empty UTF-8, up to ``max_mb`` MB in total."""
    root = sysconfig.get_paths()["stdlib"]
    files, total = [], 0
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d != "site-packages" and not d.startswith(".")]
        files += [os.path.join(folder, n) for n in names if n.endswith(".py")]
    corpus = []
    for path in sorted(files):
        with open(path, "rb") as f:
            raw = f.read()
        try:
            if raw.decode("utf-8").isspace() or not raw:
                continue
        except UnicodeDecodeError:
            continue
        if max_mb is not None and total + len(raw) > max_mb * MB:
            break
        corpus.append(path)
        total += len(raw)
    return corpus


def baseline(files: list, model: str, prefix: str) -> int:
    """The plain loop; returns the tokens written."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    tokenizer = SentencePieceTokenizer(model)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=token_dtype(tokenizer.vocab_size))
    tokens = 0
    for path in files:
        with open(path, "rb") as f:  # bytes, not text mode, which would turn \r\n into \n
            ids = tokenizer.tokenize(f.read().decode("utf-8")) + [tokenizer.eod]
        builder.add_document(ids, [len(ids)])  # a list, as Megatron-LM's tools/preprocess_data.py passes it
        tokens += len(ids)
    builder.finalize(prefix + ".idx")
    return tokens


def run_preprocess(files: list, output: str, model: str, workers: int) -> int:
    """The package's pipeline, as tools/preprocess_data.py runs it; returns the tokens written."""
    return preprocess(files, output, tokenizer_model=model, append_eod=True, workers=workers, overwrite=True,
                      progress=False).tokens


def timed(run) -> tuple:
    """(wall seconds, CPU seconds of this process and of its finished child processes, i.e. the pool's workers,
    run's result). CPU time shows what a run costs whatever else the machine is doing; wall time is what a user
    waits."""
    before = (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    start = time.perf_counter()
    result = run()
    wall = time.perf_counter() - start
    after = (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    return wall, sum(a.ru_utime + a.ru_stime - b.ru_utime - b.ru_stime for a, b in zip(after, before)), result


def same_output(a: str, b: str) -> bool:
    return all(filecmp.cmp(a + suffix, b + suffix, shallow=False) for suffix in (".bin", ".idx"))


def main() -> None:
    args = parse_args()
    files = stdlib_corpus(args.max_mb)
    nbytes = sum(os.path.getsize(f) for f in files)
    command = shlex.join(["python", "bench/preprocess_throughput.py", *sys.argv[1:]])
    print(f"# preprocess throughput\n\ncommand: {command}")
    print(f"machine: {machine_line(torch.device('cpu'))}")
    with tempfile.TemporaryDirectory() as tmp:
        model = args.tokenizer_model
        if model is None:
            trained = train_tokenizer(files, os.path.join(tmp, "spm"), args.vocab_size,
                                      sample_bytes=int(args.sample_mb * MB))
            model = trained.model_path
            print(f"tokenizer: sentencepiece BPE, {trained.vocab_size} pieces, trained here on "
                  f"{trained.sample_bytes / MB:.1f} MB in {trained.seconds:.1f} s")
        else:
            print(f"tokenizer: {model}")
        if args.megatron_lm:
            return against_megatron_lm(args, files, model, tmp)
        print(f"corpus: {len(files)} stdlib .py files, {nbytes / MB:.1f} MB; EOD appended; "
              f"median of {args.repeats} runs\n")

        reference = os.path.join(tmp, "baseline")
        runs = {BASELINE: (reference, functools.partial(baseline, files, model, reference))}
        for workers in sorted({1, 2, os.cpu_count() or 1}):
            output = os.path.join(tmp, f"w{workers}")
            runs[f"preprocess, {workers} worker{'s' if workers > 1 else ''}"] = (
                dataset_prefix(output, "text"), functools.partial(run_preprocess, files, output, model, workers))
        # Round-robin, one run of each per round, so that drift of the machine (other load, clock) hits all alike.
        times = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, (_, run) in runs.items():
                times[name].append(timed(run))
        tokens = times[BASELINE][0][2]
        base_wall = statistics.median(t[0] for t in times[BASELINE])
        rows = []
        for name, (prefix, _) in runs.items():
            assert all(t[2] == tokens for t in times[name])
            wall, cpu = (statistics.median(t[i] for t in times[name]) for i in (0, 1))
            identical = "reference" if name == BASELINE else "yes" if same_output(prefix, reference) else "NO"
            rows.append([name, f"{wall:.2f}", f"{nbytes / MB / wall:.2f}", f"{tokens / wall:,.0f}",
                         f"{base_wall / wall:.2f}", f"{cpu:.2f}", identical])
    print(f"{tokens:,} tokens\n")
    print(table(["run", "seconds", "MB/s", "tokens/s", "x baseline", "CPU seconds", "same bytes"], rows,
                aligns="lrrrrrl"))
    print(f"\nload average (1 min) at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
