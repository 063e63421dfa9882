"""Self-speculative decoding with the MTP heads vs plain greedy decoding, side by side, on held-out code.

    bash tools/quickstart.sh                  # once: trains the n=4 model this measures (about 3 min on 2 cores)
    python bench/decode_speed.py              # newest runs/quickstart checkpoint; batch 1 and 8
    python bench/decode_speed.py --checkpoint PATH --data PREFIX --tokenizer SPM --batch-sizes 1 8 --device cuda

Prompts are windows of ``--prompt-tokens`` tokens from the last documents of the dataset (the split's validation
and test part with Megatron's 969,30,1 document split, so not trained on), each continued for
``--new-tokens`` tokens both ways. Reported per batch size: tokens per forward (the prompt's forward counted),
the acceptance rate of each draft position (head 2, 3, ...: accepted / tried, a position being tried only when
every earlier draft was accepted), wall-clock time of each way, the speedup, and speedup / tokens per forward
(how much of the saved forwards survive the verification cost: 1.0 would be free verification). Outputs must be
identical both ways (the run fails otherwise).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", category=UserWarning)

from mtp_megatron.convert.formats import read_any  # noqa: E402
from mtp_megatron.inference.decoder import MTPDecoder  # noqa: E402
from mtp_megatron.inference.decoding import greedy, speculative  # noqa: E402

QUICKSTART = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "runs", "quickstart")


def held_out_prompts(prefix: str, count: int, length: int) -> torch.Tensor:
    """[count, length] windows from the last documents that are long enough."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    prompts = []
    for index in range(len(dataset) - 1, -1, -1):
        document = torch.from_numpy(dataset[index].astype("int64"))
        if len(document) >= length:
            prompts.append(document[:length])
        if len(prompts) == count:
            return torch.stack(prompts)
    raise ValueError(f"{prefix}: fewer than {count} documents of {length} tokens")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="default: the newest runs/quickstart checkpoint")
    parser.add_argument("--data", default=os.path.join(QUICKSTART, "data", "stdlib_text_document"))
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = parser.parse_args()

    checkpoint = args.checkpoint or max(glob.glob(os.path.join(QUICKSTART, "checkpoints", "iter_*")), default=None)
    if checkpoint is None or not os.path.exists(args.data + ".idx"):
        print("error: no checkpoint/data: run `bash tools/quickstart.sh` first, or pass --checkpoint and --data",
              file=sys.stderr)
        return 2
    cfg, dense, _ = read_any(checkpoint)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    with torch.device(args.device):
        decoder = MTPDecoder(cfg, dense, dtype)
    prompts = held_out_prompts(args.data, args.prompts, args.prompt_tokens).to(args.device)
    print(f"checkpoint {checkpoint}: n={cfg.mtp.n_heads} heads, {sum(t.numel() for t in dense.values()):,} "
          f"parameters; {args.prompts} held-out prompts of {args.prompt_tokens} tokens, {args.new_tokens} new tokens "
          f"each; {args.device}, {args.dtype}, {torch.get_num_threads()} threads")
    speculative(decoder, prompts[:1], 8)  # warm-up
    print("| batch | tokens/forward | acceptance by draft position | greedy s | speculative s | speedup | "
          "speedup / tokens per forward |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for batch in args.batch_sizes:
        plain_s = fast_s = 0.0
        tokens = forwards = 0
        accepted = None
        for chunk in prompts.split(batch):
            plain, plain_stats = greedy(decoder, chunk, args.new_tokens)
            fast, stats = speculative(decoder, chunk, args.new_tokens)
            if not torch.equal(plain, fast):
                print("error: speculative output differs from greedy", file=sys.stderr)
                return 1
            plain_s, fast_s = plain_s + plain_stats.seconds, fast_s + stats.seconds
            tokens, forwards = tokens + stats.tokens, forwards + stats.forwards
            accepted = stats.accepted if accepted is None else [[a + c, b + d] for (a, b), (c, d)
                                                                in zip(accepted, stats.accepted)]
        per_forward = tokens / forwards
        rates = " / ".join(f"{hit / max(tried, 1):.2f}" for hit, tried in accepted)
        speedup = plain_s / fast_s
        print(f"| {batch} | {per_forward:.2f} | {rates} | {plain_s:.2f} | {fast_s:.2f} | {speedup:.2f}x | "
              f"{speedup / per_forward:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
