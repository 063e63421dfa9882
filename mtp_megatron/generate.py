"""Greedy decoding from a checkpoint, plainly or self-speculatively with the MTP heads (single process, CPU/GPU).

    python -m mtp_megatron.generate --checkpoint runs/quickstart/checkpoints/iter_0000200 \\
        --prompt "def fibonacci(n):" --max-new-tokens 64 --speculative
    python -m mtp_megatron.generate --checkpoint hf/mtp-13b --prompt-file prompts.txt --speculative --compare

``--checkpoint`` is one of ours (an ``iter_NNNNNNN`` folder, any layout), a Hugging Face folder (with the heads
tools/convert_checkpoint.py writes) or Meta's MTP format. The tokenizer is the checkpoint's (``--tokenizer`` overrides). With
``--speculative`` heads 2..n draft and one forward verifies (mtp_megatron/inference/decoding.py): the text is
token for token plain greedy's. ``--compare`` decodes both ways, checks they agree and reports the speedup.
Printed per prompt: the continuation; at the end one JSON line with tokens per forward, acceptance per draft
position (heads 2..n) and wall-clock times.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

import torch


def main(argv=None) -> int:
    warnings.filterwarnings("ignore", category=UserWarning)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", help="one prompt")
    prompts.add_argument("--prompt-file", help="one prompt per line")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--speculative", action="store_true", help="draft with heads 2..n, verify in one forward")
    parser.add_argument("--compare", action="store_true", help="decode plainly and speculatively; report speedup")
    parser.add_argument("--tokenizer", default=None, help="sentencepiece .model (default: the checkpoint's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp64"])
    args = parser.parse_args(argv)

    from mtp_megatron.convert.formats import read_any
    from mtp_megatron.data.tokenizer import build_tokenizer
    from mtp_megatron.inference.decoder import MTPDecoder
    from mtp_megatron.inference.decoding import greedy, speculative

    cfg, dense, tokenizer_model = read_any(args.checkpoint)
    tokenizer_model = args.tokenizer or tokenizer_model
    tokenizer = build_tokenizer("sentencepiece" if tokenizer_model else "byte", tokenizer_model)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}[args.dtype]
    with torch.device(args.device):
        decoder = MTPDecoder(cfg, dense, dtype)
    texts = [args.prompt] if args.prompt is not None else [
        line.rstrip("\n") for line in open(args.prompt_file) if line.strip()]
    modes = ["greedy", "speculative"] if args.compare else ["speculative" if args.speculative else "greedy"]
    totals = {mode: {"tokens": 0, "forwards": 0, "seconds": 0.0, "accepted": None} for mode in modes}
    for text in texts:
        ids = torch.tensor([tokenizer.tokenize(text)], device=args.device)
        outputs = {}
        for mode in modes:
            out, stats = (speculative if mode == "speculative" else greedy)(decoder, ids, args.max_new_tokens)
            outputs[mode] = out[0].tolist()
            total = totals[mode]
            total["tokens"] += stats.tokens
            total["forwards"] += stats.forwards
            total["seconds"] += stats.seconds
            if stats.accepted:
                total["accepted"] = [[a + b for a, b in zip(x, y)] for x, y in
                                     zip(total["accepted"] or [[0, 0]] * len(stats.accepted), stats.accepted)]
        if args.compare and outputs["greedy"] != outputs["speculative"]:
            print(f"error: speculative output differs from greedy for prompt {text!r}", file=sys.stderr)
            return 1
        print(text + tokenizer.detokenize(outputs[modes[-1]]), flush=True)
    report = {}
    for mode, total in totals.items():
        report[f"{mode}/tokens_per_forward"] = total["tokens"] / max(total["forwards"], 1)
        report[f"{mode}/seconds"] = total["seconds"]
        if total["accepted"]:
            report[f"{mode}/acceptance"] = [hit / max(tried, 1) for hit, tried in total["accepted"]]
    if args.compare:
        report["speedup"] = totals["greedy"]["seconds"] / max(totals["speculative"]["seconds"], 1e-9)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":  # the guard matters: dist_checkpointing's spawned helper re-imports this module
    sys.exit(main())
