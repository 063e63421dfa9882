"""Training step time of n heads vs n=1 on the same trunk, and of the naive vs the sequential head order.

    python bench/step_time.py                        # defaults: vocab 32000, seq 512, hidden 256, 4-layer trunk
    python bench/step_time.py --device cuda --hidden 4096 --attn-heads 32 --trunk-layers 8 --seq 4096

A step is the package's ``train_step``: zero the grad buffers, megatron-core's forward-backward schedule over the
step's microbatches, the optimizer step (AdamW, grad clipping) and the LR scheduler, as ``python -m
mtp_megatron.train`` runs it. The three variants (n=1, n heads naive, n heads sequential) are built side by side
on the same trunk and stepped round-robin, one step each per round, so slow drift of the machine (frequency,
other load) hits all of them alike; the first ``--warmup`` rounds are not timed; the median over ``--steps``
rounds is reported.

Next to the measured ratio the script prints the ratio expected from training FLOPs
(``mtp_megatron.training.metrics.model_flops_per_token``): each extra head costs one transformer layer plus one
unembedding. At small widths the unembedding (6*d*V FLOPs per token) dwarfs a layer (~72*d^2 + 12*s*d), so the n=4
ratio is far above the paper's 1.09 at 13B (their Table S5: 1.04 / 1.09 for n = 2 / 4); the FLOPs estimate for the
13B configuration (configs/13b.yaml) is printed for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import (  # noqa: E402
    REPO_ROOT,
    Variant,
    add_shape_args,
    build_trainer,
    machine_line,
    make_config,
    median,
    release,
    shutdown,
    synchronize,
    table,
    variants,
)

from mtp_megatron.config import load_config  # noqa: E402
from mtp_megatron.training.metrics import model_flops_per_token, peak_flops_per_gpu  # noqa: E402

# Gloeckle et al. 2024, Table S5: training time relative to n=1, (n=2, n=4) per model size.
PAPER_TABLE_S5 = {"0.3B": (1.07, 1.22), "1.3B": (1.04, 1.12), "3B": (1.02, 1.07), "6.7B": (1.02, 1.07),
                  "13B": (1.04, 1.09)}


def flops_ratio_13b(n_heads: int, match_params: bool) -> float:
    path = os.path.join(REPO_ROOT, "configs", "13b.yaml")
    # pp=1: the 13B layout (pp=2) need not divide the n=1 trunk; pipeline layout does not change FLOPs.
    common = [f"mtp.match_params={str(match_params).lower()}", "parallel.pp=1"]
    n = load_config(path, common + [f"mtp.n_heads={n_heads}"])
    one = load_config(path, common + ["mtp.n_heads=1"])
    return model_flops_per_token(n) / model_flops_per_token(one)


def megatron_lm_flops_per_token(cfg) -> float:
    """Megatron-LM's closed form (its training.py ``num_floating_point_operations``, GQA and SwiGLU terms), per
    token, with the heads counted as layers and each head's unembedding: an independent check of
    ``model_flops_per_token``. 12 l h^2 [(1 + g/a + s/h) q/h + (ffn/h) * (3/2 for SwiGLU)] + 6 n h V."""
    m = cfg.model
    h, s, a = m.hidden_size, m.seq_length, m.num_attention_heads
    g = m.num_query_groups or a
    q_ratio = m.resolved_head_dim() * a / h
    glu = 1.5 if m.activation == "swiglu" else 1.0
    layers = cfg.trunk_num_layers() + cfg.mtp.n_heads
    return (12 * layers * h * h * ((1 + g / a + s / h) * q_ratio + m.resolved_ffn_hidden_size() / h * glu)
            + 6 * cfg.mtp.n_heads * h * m.vocab_size)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(parser, trunk_layers=4, seq=512)
    parser.add_argument("--microbatches", type=int, default=1,
                        help="microbatches per step (global batch = mbs * this; default %(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default %(default)s)")
    parser.add_argument("--steps", type=int, default=8, help="timed rounds; the median is reported "
                                                            "(default %(default)s)")
    parser.add_argument("--one-at-a-time", action="store_true",
                        help="build and time one variant after the other instead of side by side (less memory)")
    parser.add_argument("--match-params", action="store_true",
                        help="parameter-matched, as the paper compares: every variant has model.num_layers = "
                             "--trunk-layers + 1 layers in all, the heads' taken out of the trunk "
                             "(mtp.match_params=true)")
    parser.add_argument("--fusions-variant", action="store_true",
                        help="add the n-head sequential variant with train.fused_kernels=false, to measure "
                             "megatron-core's fused kernels (model/fusions.py; on CUDA only)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense bf16 peak of one device for MFU (default: the GPU's datasheet figure, "
                             "training/metrics.py, or MTP_PEAK_TFLOPS)")
    args = parser.parse_args(argv)

    vs = variants(args.n_heads)
    if args.fusions_variant:
        vs.append(Variant(f"n={args.n_heads} sequential, fusions off", args.n_heads, True,
                          overrides=("train.fused_kernels=false",)))
    extra = (f"train.global_batch_size={args.mbs * args.microbatches}",)
    cfgs = [make_config(args, v, extra) for v in vs]
    rounds = args.warmup + args.steps
    times = {v.name: [] for v in vs}
    losses = {v.name: [] for v in vs}
    params = {}

    def step(trainer, v, timed: bool):
        synchronize(trainer.env.device)
        start = time.perf_counter()
        result = trainer.train_step()
        synchronize(trainer.env.device)
        if timed:
            times[v.name].append(time.perf_counter() - start)
        losses[v.name].append(result.head_loss)

    def count(trainer, v):
        params[v.name] = sum(p.numel() for p in trainer.model.parameters())

    if args.one_at_a_time:
        for v, cfg in zip(vs, cfgs):
            trainer = build_trainer(cfg, max_steps=rounds + 1)
            device = trainer.env.device
            dtype = trainer.model.config.params_dtype
            count(trainer, v)
            for r in range(rounds):
                step(trainer, v, r >= args.warmup)
            release(trainer)
    else:
        trainers = [build_trainer(cfg, max_steps=rounds + 1) for cfg in cfgs]
        device, dtype = trainers[0].env.device, trainers[0].model.config.params_dtype
        for trainer, v in zip(trainers, vs):
            count(trainer, v)
        for r in range(rounds):
            for trainer, v in zip(trainers, vs):
                step(trainer, v, r >= args.warmup)
        for trainer in trainers:
            release(trainer)

    n = args.n_heads
    one, naive, seq = (v.name for v in vs[:3])
    med = {k: median(t) for k, t in times.items()}
    flops = {v.name: model_flops_per_token(cfg) for v, cfg in zip(vs, cfgs)}
    check = megatron_lm_flops_per_token(cfgs[0])
    tokens = args.mbs * args.microbatches * args.seq
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops_per_gpu()

    print(f"# step_time: full training step (forward, backward, optimizer), median of {args.steps} after "
          f"{args.warmup} warm-up")
    print(f"machine: {machine_line(device)}")
    print(f"shape: vocab {args.vocab}, seq {args.seq}, hidden {args.hidden}, {args.attn_heads} attention heads, "
          f"ffn {cfgs[0].model.resolved_ffn_hidden_size()}, {args.trunk_layers + 1} layers "
          f"{'in all (parameter-matched: the heads come out of the trunk)' if args.match_params else 'for n=1 (the heads added on top of a ' + str(args.trunk_layers) + '-layer trunk)'}, "
          f"micro batch {args.mbs} x {args.microbatches} microbatches, {dtype}, device {device}, "
          f"{'one variant at a time' if args.one_at_a_time else 'variants interleaved round-robin'}")
    print()
    rows, summary = [], {}
    for v in vs:
        t = times[v.name]
        tps = tokens / med[v.name]
        mfu = tps * flops[v.name] / peak if peak else None
        rows.append([v.name, f"{params[v.name] / 1e9:.3f}", f"{med[v.name] * 1e3:.0f}", f"{min(t) * 1e3:.0f}",
                     f"{max(t) * 1e3:.0f}", f"{tps:.0f}", f"{med[v.name] / med[one]:.3f}x",
                     f"{flops[v.name] / flops[one]:.3f}x", f"{mfu:.3f}" if mfu is not None else "n/a"])
        summary[v.name] = {"params": params[v.name], "median_s": med[v.name], "tokens_per_s": tps,
                           "ratio_to_n1": med[v.name] / med[one], "flops_per_token": flops[v.name], "mfu": mfu}
    print(table(["variant", "params (B)", "median ms", "min ms", "max ms", "tokens/s", "time ratio to n=1",
                 "FLOPs ratio to n=1", "MFU"], rows))
    print()
    print(f"FLOPs per token (mtp_megatron/training/metrics.py model_flops_per_token: matmuls, 2 per multiply-add, "
          f"backward = 2x forward, attention scores over the full sequence, each head one layer + one "
          f"unembedding): n=1 {flops[one]:.4e}; Megatron-LM's closed form for the same shape {check:.4e} "
          f"(ratio {flops[one] / check:.6f}). MFU = tokens/s x FLOPs per token / "
          + (f"{peak / 1e12:.0f} TFLOP/s (dense bf16 peak of one device)" if peak else "peak: unknown on this device"))

    same = all(
        abs(a - b) <= 1e-4 * max(1.0, abs(a))
        for la, lb in zip(losses[naive], losses[seq]) for a, b in zip(la, lb)
    )
    print()
    print(f"n={n} sequential / n=1 = {med[seq] / med[one]:.3f}x   n={n} naive / n=1 = {med[naive] / med[one]:.3f}x"
          f"   n={n} sequential / naive = {med[seq] / med[naive]:.3f}x  (medians)")
    mins = {k: min(t) for k, t in times.items()}
    print(f"n={n} sequential / n=1 = {mins[seq] / mins[one]:.3f}x   n={n} naive / n=1 = {mins[naive] / mins[one]:.3f}x"
          f"   n={n} sequential / naive = {mins[seq] / mins[naive]:.3f}x  (minimums: less sensitive to other load)")
    if args.fusions_variant:
        off = vs[3].name
        print(f"fused kernels: n={n} sequential with / without = {med[seq] / med[off]:.3f}x (medians)")
    print(f"naive and sequential per-head losses agree at every step: {'yes' if same else 'NO'} "
          f"(last step: {', '.join(f'{x:.5f}' for x in losses[seq][-1])})")
    print()
    print("context: the paper's training-time ratio to n=1 (Table S5, n=2 / n=4): "
          + "; ".join(f"{k} {a:.2f}/{b:.2f}" for k, (a, b) in PAPER_TABLE_S5.items()))
    print(f"FLOPs ratio n={n}/n=1 for configs/13b.yaml (d 5120, 40 layers, ffn 13824, V 32000, seq 4096): "
          f"{flops_ratio_13b(n, True):.3f}x parameter-matched (trunk 40-n, as the paper compares), "
          f"{flops_ratio_13b(n, False):.3f}x with the heads added on top (trunk 39, as this benchmark does)")
    print(json.dumps({"match_params": args.match_params, "device": str(device), "dtype": str(dtype),
                      "seq": args.seq, "variants": summary, "losses_agree": same,
                      "flops_check_ratio": flops[one] / check, "peak_tflops": peak / 1e12 if peak else None}))
    shutdown()
    return 0 if same else 2


if __name__ == "__main__":
    sys.exit(main())
