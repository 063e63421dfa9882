"""HumanEval on CPU, greedy and self-speculative, side by side: the whole evaluation's time, tokens per forward,
and whether the two ways wrote the same completions.

    bash tools/quickstart.sh                 # once: the n=4 model this measures
    python bench/code_eval.py                # newest runs/quickstart checkpoint, all 164 problems
    python bench/code_eval.py --checkpoint PATH --max-new-tokens 128 --batch-size 8 --device cuda

Each way is one ``python -m mtp_megatron.evaluate_code`` process (model loading, decoding, sandboxed execution
and pass@k, as a user runs it), greedy first, then ``--speculative``; both write their samples to a temporary
folder and the benchmark compares them completion for completion (it fails if they differ).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench._common import machine_line  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="default: the newest runs/quickstart checkpoint")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, default=None, help="the first N problems (default: all 164)")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args()
    checkpoint = args.checkpoint or max(glob.glob(os.path.join(REPO, "runs/quickstart/checkpoints/iter_*[0-9]")),
                                        default=None)
    if checkpoint is None:
        print("error: no runs/quickstart checkpoint: run bash tools/quickstart.sh or give --checkpoint",
              file=sys.stderr)
        return 2
    import torch

    print(f"machine: {machine_line(torch.device(args.device if args.device != 'auto' else 'cpu'))}")
    print(f"checkpoint: {checkpoint}; HumanEval, --max-new-tokens {args.max_new_tokens}, --batch-size "
          f"{args.batch_size}{f', first {args.limit} problems' if args.limit else ''}")
    summaries, completions = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        for mode in ("greedy", "speculative"):
            output = os.path.join(folder, f"{mode}.jsonl")
            command = [sys.executable, "-m", "mtp_megatron.evaluate_code", "--checkpoint", checkpoint, "--task",
                       "humaneval", "--max-new-tokens", str(args.max_new_tokens), "--batch-size",
                       str(args.batch_size), "--device", args.device, "--output", output]
            command += ["--limit", str(args.limit)] if args.limit else []
            command += ["--speculative"] if mode == "speculative" else []
            start = time.perf_counter()
            result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
            wall = time.perf_counter() - start
            if result.returncode != 0:
                print(result.stderr[-3000:], file=sys.stderr)
                return 1
            summaries[mode] = {**json.loads(result.stdout.strip().splitlines()[-1]), "wall": wall}
            completions[mode] = [json.loads(line)["completion"] for line in open(output)]
    same = completions["greedy"] == completions["speculative"]
    print("\n| way | wall s | decode s | execution s | tokens per forward | pass@1 | truncated prompts |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for mode, s in summaries.items():
        print(f"| {mode} | {s['wall']:.1f} | {s['decode_seconds']:.1f} | {s['execution_seconds']:.1f} | "
              f"{s['tokens_per_forward']:.2f} | {s['pass@1']:.3f} | {s['truncated_prompts']} |")
    greedy, fast = summaries["greedy"], summaries["speculative"]
    print(f"\nspeculative / greedy decode time: {fast['decode_seconds'] / greedy['decode_seconds']:.3f}x "
          f"(speedup {greedy['decode_seconds'] / fast['decode_seconds']:.2f}x); completions identical: "
          f"{'yes' if same else 'NO'} ({len(completions['greedy'])} problems); sandbox network isolation: "
          f"{greedy['network_isolation']}")
    print(json.dumps({"summaries": summaries, "identical": same}))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
