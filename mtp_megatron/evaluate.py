"""Per-head loss and accuracy of a checkpoint on an indexed dataset, as one JSON line.

    python -m mtp_megatron.evaluate --checkpoint runs/quickstart/checkpoints/iter_0000200 \\
        --data runs/quickstart/data/stdlib_text_document --max-samples 64

``--checkpoint``: ours (any layout), a Hugging Face folder or Meta's format. The dataset's documents are read in
order as one token stream (Megatron's .bin/.idx, as tools/preprocess_data.py writes it) and cut into
consecutive samples of ``--seq-length`` tokens (default: the model's) plus their next tokens, the training
samples' shape. Head i at position t is scored on token t+i of the same sample, the last i-1 positions having
none, as in training. Prints ``{"loss/head_1": ..., "acc/head_1": ..., ..., "samples": N, "tokens/head_1": ...}``:
token-weighted mean cross-entropy (nats) and top-1 accuracy per head, defined as training defines them
(model/heads/base.py): the softmax runs over every row of the padded vocabulary, as megatron's vocab-parallel
cross-entropy does, and a target counts as correct when no row's logit exceeds its own.

``--device auto`` (the default) evaluates on the GPU when one is visible, else on the CPU; ``--dtype auto`` is
bf16 on a GPU, fp32 on the CPU. The model (ours, TP1 x PP1, convert/native.py ``dense_model``) is built there
in that dtype; our checkpoints are read straight onto the device. Memory stays near one copy of the weights plus
one head's logits: per batch the trunk runs once, then each head's logits are computed, scored (cross-entropy in
fp32) and freed before the next head's (never all n heads' logits at once, as model/gpt.py ``head_logits``
would hold them). For a 13B parameter-matched n=4 model in bf16: ~26 GB of weights (the checkpoint's copy is
parked on the CPU while the model is filled, so the GPU never holds two); one head's fp32 logits at batch B x
sequence 4096 x 32256 padded vocabulary rows are B x 0.53 GB, plus the softmax's temporary of the same size (and
the bf16 logits, half that, while they are converted). So one 80 GB GPU evaluates it at the default batch 8
(~9-11 GB of logits besides the weights).
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
    """Token-weighted per-head loss and accuracy of ``model`` (ours, TP1 x PP1) on ``windows`` (on the model's
    device), over all of its (padded) vocabulary rows, as the training loss is. One head's logits at a time."""
    seq = windows.shape[1] - 1
    positions = torch.arange(seq, device=windows.device)
    sums = torch.zeros(n_heads, 3, dtype=torch.float64)  # loss sum, correct, tokens
    for batch in windows.split(batch_size):
        tokens = batch[:, :-1]
        hidden, inputs = model.trunk_output(tokens, positions.expand_as(tokens))
        for k in range(n_heads):
            sums[k] += _head_scores(model, k, hidden, inputs, batch[:, k + 1:])
        del hidden, inputs
    out = {}
    for k in range(n_heads):
        out[f"loss/head_{k + 1}"] = sums[k, 0].item() / sums[k, 2].item()
        out[f"acc/head_{k + 1}"] = sums[k, 1].item() / sums[k, 2].item()
        out[f"tokens/head_{k + 1}"] = int(sums[k, 2])
    return {**out, "samples": len(windows)}


def _head_scores(model, k: int, hidden: torch.Tensor, inputs, targets: torch.Tensor) -> torch.Tensor:
    """[loss sum, correct, tokens] (fp64, on the CPU) of head ``k`` (0-based), whose ``targets`` [b, s-k] are the
    tokens k+1 after each of the first s-k positions; its logits are freed on return."""
    logits = model.mtp_heads.logits(k, hidden, inputs)  # [s, b, V], the model's dtype
    # Positions first, as the logits are laid out: slicing and flattening them is then a view, not a copy.
    predicted = logits[: targets.shape[1]].float().flatten(0, 1)  # fp32 (a copy unless the model is fp32)
    del logits  # the bf16 logits are not needed once converted
    targets = targets.T.flatten()
    loss = F.cross_entropy(predicted, targets, reduction="sum")
    # Training's top-1 (heads/base.py top1_correct): the target's logit is the highest, ties included.
    target_logit = predicted.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    correct = (target_logit >= predicted.max(dim=-1).values).sum()
    return torch.tensor([loss.item(), correct.item(), targets.numel()], dtype=torch.float64)


def main(argv=None) -> int:
    warnings.filterwarnings("ignore", category=UserWarning)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True, help="indexed-dataset prefix (path without .bin/.idx)")
    parser.add_argument("--max-samples", type=int, default=64)
    parser.add_argument("--seq-length", type=int, default=None, help="default: the model's")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto (default): cuda when a GPU is visible, else cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                        help="auto (default): bf16 on cuda, fp32 on cpu")
    args = parser.parse_args(argv)
    for name in ("max_samples", "batch_size", "seq_length"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")

    from mtp_megatron.checkpoint.store import CheckpointError
    from mtp_megatron.convert import native
    from mtp_megatron.convert.formats import read_any
    from mtp_megatron.data.index_file import DataFileError, inspect_indexed_dataset
    from mtp_megatron.inference.decoder import DTYPES, resolve_device_dtype

    try:
        device, dtype = resolve_device_dtype(args.device, args.dtype)
        # Ours is read straight onto the device (on "cpu" the CPU patches would be applied to this process).
        # Tied Hugging Face embeddings are untied as a copy: the same function.
        cfg, dense, _ = read_any(args.checkpoint, untie_embeddings=True, device=device.type)
        inspect_indexed_dataset(args.data, cfg.model.vocab_size)  # missing or damaged files, ids out of range
        if args.seq_length is not None and args.seq_length > cfg.model.seq_length:
            raise ValueError(f"--seq-length {args.seq_length} is past the {cfg.model.seq_length} positions the model "
                             f"was trained on (model.seq_length). Fix: --seq-length {cfg.model.seq_length} or less")
        windows = samples(args.data, args.seq_length or cfg.model.seq_length, args.max_samples)
    except (ValueError, DataFileError, FileNotFoundError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    # Ours was read onto the device: park its weights on the CPU while the model is built there, so the device
    # never holds two copies of them (26 GB each for 13B in bf16). Each move frees its device tensor.
    for key in list(dense):
        dense[key] = dense[key].cpu()
    precision = next(name for name, d in DTYPES.items() if d == dtype)
    # consume: each weight leaves ``dense`` once copied into the model, so they are not held twice.
    with native.dense_model(cfg, dense, device.type, precision, consume=True) as (model, _):
        print(json.dumps(evaluate(model, windows.to(device), cfg.mtp.n_heads, args.batch_size)))
    return 0


if __name__ == "__main__":  # the guard matters: dist_checkpointing's spawned helper re-imports this module
    sys.exit(main())
