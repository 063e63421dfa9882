"""Greedy decoding from a checkpoint, plainly or self-speculatively with the MTP heads (single process, CPU/GPU).

    python -m mtp_megatron.generate --checkpoint runs/quickstart/checkpoints/iter_0000200 \\
        --prompt "def fibonacci(n):" --max-new-tokens 64 --speculative
    python -m mtp_megatron.generate --checkpoint hf/mtp-13b --prompt-file prompts.txt --speculative --compare

``--checkpoint`` is one of ours (an ``iter_NNNNNNN`` folder, any layout), a Hugging Face folder (with the heads
tools/convert_checkpoint.py writes) or Meta's MTP format. The tokenizer is the checkpoint's (``--tokenizer`` overrides). With
``--speculative`` heads 2..n draft and one forward verifies (mtp_megatron/inference/decoding.py): the text is
token for token plain greedy's. ``--compare`` decodes both ways, checks they agree and reports the speedup.
Printed per prompt: the continuation, up to and including the first EOD (the document ends there; transformers'
``generate`` on the exported folder stops there too); at the end one JSON line with tokens per forward,
acceptance per draft position (heads 2..n), wall-clock times and, with ``--print-ids``, each continuation's ids.

``--device auto`` (the default) decodes on the GPU when one is visible, else on the CPU; ``--dtype auto`` is
bf16 on a GPU, fp32 on the CPU. Every weight is moved to that device (mtp_megatron/inference/decoder.py), and
our checkpoints are read straight onto it (mtp_megatron/convert/native.py ``read_checkpoint``).
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
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto (default): cuda when a GPU is visible, else cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp64"],
                        help="auto (default): bf16 on cuda, fp32 on cpu")
    parser.add_argument("--print-ids", action="store_true", help="add each continuation's token ids to the JSON line")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")

    from mtp_megatron.checkpoint.store import CheckpointError
    from mtp_megatron.convert.formats import read_any
    from mtp_megatron.data.tokenizer import build_tokenizer
    from mtp_megatron.inference.decoder import MTPDecoder, resolve_device_dtype
    from mtp_megatron.inference.decoding import greedy, speculative

    try:
        device, dtype = resolve_device_dtype(args.device, args.dtype)  # a missing GPU is refused before reading
        # Tied Hugging Face embeddings are untied as a copy: the same function, and decoding trains nothing.
        cfg, dense, tokenizer_model = read_any(args.checkpoint, untie_embeddings=True, device=device.type)
        tokenizer_model = args.tokenizer or tokenizer_model
        tokenizer = build_tokenizer("sentencepiece" if tokenizer_model else "byte", tokenizer_model)
        decoder = MTPDecoder(cfg, dense, dtype, device)
        del dense  # what the decoder cast or split is a copy: do not hold the weights twice
    except (ValueError, KeyError, FileNotFoundError, CheckpointError) as error:  # each names what is wrong
        print(f"error: {error}", file=sys.stderr)
        return 2
    modes = ["greedy", "speculative"] if args.compare else ["speculative" if args.speculative else "greedy"]
    try:
        texts = read_prompts(args.prompt, args.prompt_file)
        prompts = [tokenizer.tokenize(text) for text in texts]
        drafts = cfg.mtp.n_heads - 1 if "speculative" in modes else 0
        check_context(prompts, texts, args.max_new_tokens, drafts, cfg.model.seq_length)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    totals = {mode: {"tokens": 0, "forwards": 0, "seconds": 0.0, "accepted": None} for mode in modes}
    continuations = []
    for text, prompt in zip(texts, prompts):
        ids = torch.tensor([prompt], device=device)
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
        continuation = outputs[modes[-1]]
        if tokenizer.eod in continuation:
            continuation = continuation[: continuation.index(tokenizer.eod) + 1]
        continuations.append(continuation)
        print(text + tokenizer.detokenize(continuation), flush=True)
    report = {}
    for mode, total in totals.items():
        report[f"{mode}/tokens_per_forward"] = total["tokens"] / max(total["forwards"], 1)
        report[f"{mode}/seconds"] = total["seconds"]
        if total["accepted"]:
            report[f"{mode}/acceptance"] = [hit / max(tried, 1) for hit, tried in total["accepted"]]
    if args.compare:
        report["speedup"] = totals["greedy"]["seconds"] / max(totals["speculative"]["seconds"], 1e-9)
    if args.print_ids:
        report["ids"] = continuations
    print(json.dumps(report))
    return 0


def read_prompts(prompt, prompt_file) -> list[str]:
    """The prompts: ``--prompt``, or the non-blank lines of ``--prompt-file``; ValueError if there are none."""
    if prompt is not None:
        return [prompt]
    try:
        with open(prompt_file) as f:
            texts = [line.rstrip("\n") for line in f if line.strip()]
    except OSError as error:
        raise ValueError(f"--prompt-file {prompt_file}: {error.strerror}") from None
    if not texts:
        raise ValueError(f"--prompt-file {prompt_file} holds no prompt (every line is blank)")
    return texts


def check_context(prompts: list[list[int]], texts: list[str], max_new_tokens: int, drafts: int,
                  context: int) -> None:
    """Refuse an empty prompt, and a prompt plus continuation longer than the context the model was trained on
    (its positions past that were never trained)."""
    for ids, text in zip(prompts, texts):
        if not ids:
            raise ValueError(f"prompt {text!r} is empty: give at least one character to continue")
        # The last forward sees the prompt, all but the last new token, and (speculative) the drafts after it.
        needed = len(ids) + max_new_tokens - 1 + drafts
        if needed > context:
            room = context - len(ids) + 1 - drafts
            fix = f"--max-new-tokens {room} or less" if room >= 1 else "a shorter prompt"
            raise ValueError(f"prompt {text[:40]!r}... of {len(ids)} tokens plus {max_new_tokens} new tokens"
                             f"{f' and {drafts} drafts' if drafts else ''} needs {needed} positions; the model was "
                             f"trained on {context} (model.seq_length). Fix: {fix}")


if __name__ == "__main__":  # the guard matters: dist_checkpointing's spawned helper re-imports this module
    sys.exit(main())
