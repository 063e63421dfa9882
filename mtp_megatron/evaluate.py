"""Per-head loss and accuracy of a checkpoint on an indexed dataset, as one JSON line.

    python -m mtp_megatron.evaluate --checkpoint runs/quickstart/checkpoints/iter_0000200 \\
        --data runs/quickstart/data/stdlib_text_document --max-samples 64

``--checkpoint``: ours (any layout), a Hugging Face folder or Meta's format. The dataset's documents are read in
order as one token stream (Megatron's .bin/.idx, as tools/preprocess_data.py writes it) and cut into
consecutive samples of ``--seq-length`` tokens (default: the model's) plus their next tokens, the training
samples' shape. Head i at position t is scored on token t+i of the same sample, the last i-1 positions having
none, as in training. Prints ``{"loss/head_1": ..., "acc/head_1": ..., ..., "samples": N, "tokens/head_1": ...}``:
token-weighted mean cross-entropy (nats) and top-1 accuracy per head, defined as training defines them
(model/heads.py): the softmax runs over every row of the padded vocabulary, as megatron's vocab-parallel
cross-entropy does, and a target counts as correct when no row's logit exceeds its own.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

import torch
import torch.nn.functional as F


def samples(prefix: str, seq_length: int, max_samples: int) -> torch.Tensor:
    """[N, seq_length + 1] consecutive windows of the dataset's token stream (documents in order)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    stream, needed = [], max_samples * (seq_length + 1)
    for index in range(len(dataset)):
        stream.append(torch.from_numpy(dataset[index].astype("int64")))
        if sum(len(t) for t in stream) >= needed:
            break
    tokens = torch.cat(stream)
    count = min(max_samples, len(tokens) // (seq_length + 1))
    if count == 0:
        raise ValueError(f"{prefix} holds {len(tokens)} tokens, fewer than one sample of {seq_length + 1}")
    return tokens[: count * (seq_length + 1)].view(count, seq_length + 1)


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, n_heads: int, batch_size: int = 8) -> dict:
    """Token-weighted per-head loss and accuracy of ``model`` (ours, TP1 x PP1) on ``windows``, over all of its
    (padded) vocabulary rows, as the training loss is."""
    seq = windows.shape[1] - 1
    sums = torch.zeros(n_heads, 3, dtype=torch.float64)  # loss sum, correct, tokens
    for batch in windows.split(batch_size):
        tokens = batch[:, :-1]
        logits = model.head_logits(tokens, torch.arange(seq).expand_as(tokens)).transpose(1, 2).float()
        for k in range(n_heads):
            predicted, targets = logits[k, :, : seq - k], batch[:, k + 1:]
            loss = F.cross_entropy(predicted.flatten(0, 1), targets.flatten(), reduction="sum")
            # Training's top-1 (heads.py _top1_correct): the target's logit is the highest, ties included.
            target_logit = predicted.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            correct = (target_logit >= predicted.max(dim=-1).values).sum()
            sums[k] += torch.tensor([loss.item(), correct.item(), targets.numel()], dtype=torch.float64)
    out = {}
    for k in range(n_heads):
        out[f"loss/head_{k + 1}"] = sums[k, 0].item() / sums[k, 2].item()
        out[f"acc/head_{k + 1}"] = sums[k, 1].item() / sums[k, 2].item()
        out[f"tokens/head_{k + 1}"] = int(sums[k, 2])
    return {**out, "samples": len(windows)}


def main(argv=None) -> int:
    warnings.filterwarnings("ignore", category=UserWarning)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True, help="indexed-dataset prefix (path without .bin/.idx)")
    parser.add_argument("--max-samples", type=int, default=64)
    parser.add_argument("--seq-length", type=int, default=None, help="default: the model's")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    for name in ("max_samples", "batch_size", "seq_length"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")

    from mtp_megatron.checkpoint.store import CheckpointError
    from mtp_megatron.convert import native
    from mtp_megatron.convert.formats import read_any
    from mtp_megatron.data.index_file import DataFileError, inspect_indexed_dataset

    try:
        cfg, dense, _ = read_any(args.checkpoint, untie_embeddings=True)  # an untied copy: the same function
        inspect_indexed_dataset(args.data, cfg.model.vocab_size)  # missing or damaged files, ids out of range
        if args.seq_length is not None and args.seq_length > cfg.model.seq_length:
            raise ValueError(f"--seq-length {args.seq_length} is past the {cfg.model.seq_length} positions the model "
                             f"was trained on (model.seq_length). Fix: --seq-length {cfg.model.seq_length} or less")
        windows = samples(args.data, args.seq_length or cfg.model.seq_length, args.max_samples)
    except (ValueError, DataFileError, FileNotFoundError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    with native.dense_model(cfg, dense) as (model, _):
        print(json.dumps(evaluate(model, windows, cfg.mtp.n_heads, args.batch_size)))
    return 0


if __name__ == "__main__":  # the guard matters: dist_checkpointing's spawned helper re-imports this module
    sys.exit(main())
