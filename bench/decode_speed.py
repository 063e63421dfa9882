"""Self-speculative decoding with the MTP heads vs plain greedy decoding, side by side, on held-out code.

    bash tools/quickstart.sh                  # once: trains the n=4 model this measures (about 3 min on 2 cores)
    python bench/decode_speed.py              # newest runs/quickstart checkpoint; batch 1 and 8
    python bench/decode_speed.py --checkpoint PATH --data PREFIX --tokenizer SPM --batch-sizes 1 8 --device cuda

Prompts are windows of ``--prompt-tokens`` tokens from the last documents of the dataset (the split's validation
and test part with Megatron's 969,30,1 document split, so not trained on), each continued for ``--new-tokens``
tokens both ways. Every row of a batch accepts its own drafts (inference/decoding.py). Reported per batch size:
tokens per forward (per row: its new tokens over the forwards it took part in, the prompt's forward counted), the
acceptance rate of each draft position (head 2, 3, ...: accepted / tried, a position being tried only when every
earlier draft was accepted), wall-clock time of each way, the speedup, and speedup / tokens per forward (how much
of the saved forwards survive the verification cost: 1.0 would be free verification). Each batch size runs
``--repeats`` rounds of greedy then speculative; the times are their medians, the speedup the ratio of the medians,
and each round's speedup is listed (a small shared machine runs slower for seconds at a time: single rounds have
read 0.9x to 1.7x for the same code at batch 8). Outputs must be identical both ways (the run fails otherwise).
``--device``/``--dtype`` as in ``python -m mtp_megatron.generate`` (auto: the GPU in bf16 when one is visible, else
the CPU in fp32).
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", category=UserWarning)

from mtp_megatron.convert.formats import read_any  # noqa: E402
from mtp_megatron.inference.decoder import DTYPES, MTPDecoder, resolve_device_dtype  # noqa: E402
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
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds of greedy then speculative per batch size; the medians are reported")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto (default): cuda when a GPU is visible, else cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                        help="auto (default): bf16 on cuda, fp32 on cpu")
    args = parser.parse_args()
    try:
        device, dtype = resolve_device_dtype(args.device, args.dtype)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    checkpoint = args.checkpoint or max(glob.glob(os.path.join(QUICKSTART, "checkpoints", "iter_*")), default=None)
    if checkpoint is None or not os.path.exists(args.data + ".idx"):
        print("error: no checkpoint/data: run `bash tools/quickstart.sh` first, or pass --checkpoint and --data",
              file=sys.stderr)
        return 2
    # Ours is read straight onto the device: reading on the CPU would apply the CPU patches to this process
    # (mtp_megatron/convert/native.py).
    cfg, dense, _ = read_any(checkpoint, device=device.type)
    parameters = sum(t.numel() for t in dense.values())
    decoder = MTPDecoder(cfg, dense, dtype, device)
    del dense  # the decoder's casts and splits are copies: do not hold the weights twice
    prompts = held_out_prompts(args.data, args.prompts, args.prompt_tokens).to(device)
    print(f"checkpoint {checkpoint}: n={cfg.mtp.n_heads} heads, {parameters:,} parameters; {args.prompts} held-out "
          f"prompts of {args.prompt_tokens} tokens, {args.new_tokens} new tokens each; {device.type}, "
          f"{next(name for name, d in DTYPES.items() if d == dtype)}, {torch.get_num_threads()} threads")
    speculative(decoder, prompts[:1], 8)  # warm-up
    print("| batch | tokens/forward | acceptance by draft position | greedy s | speculative s | speedup | "
          "speedup / tokens per forward | speedup by round |")
    print("|---:|---:|---|---:|---:|---:|---:|---|")
    for batch in args.batch_sizes:
        plain_s, fast_s = [], []
        for _ in range(args.repeats):  # alternately, so that a slow spell of the machine hits both ways
            # Greedy in chunks of ``batch`` rows (every row takes the same forwards, so no row waits for another);
            # speculative with ``batch`` rows at once, a waiting prompt joining as a row finishes.
            seconds, plain = 0.0, []
            for chunk in prompts.split(batch):
                tokens, plain_stats = greedy(decoder, chunk, args.new_tokens)
                seconds, plain = seconds + plain_stats.seconds, plain + [tokens]
            fast, stats = speculative(decoder, prompts, args.new_tokens, batch_size=batch)
            if not torch.equal(torch.cat(plain), fast):
                print("error: speculative output differs from greedy", file=sys.stderr)
                return 1
            plain_s, fast_s = plain_s + [seconds], fast_s + [stats.seconds]
        rates = " / ".join(f"{rate:.2f}" for rate in stats.acceptance())
        speedup = statistics.median(plain_s) / statistics.median(fast_s)
        rounds = ", ".join(f"{p / f:.2f}" for p, f in zip(plain_s, fast_s))
        print(f"| {batch} | {stats.tokens_per_forward:.2f} | {rates} | {statistics.median(plain_s):.2f} | "
              f"{statistics.median(fast_s):.2f} | {speedup:.2f}x | {speedup / stats.tokens_per_forward:.2f} | "
              f"{rounds} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
