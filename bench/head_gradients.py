"""Per-parameter gradients of the sequential head backward against the naive order, per dtype, on any device.

    python bench/head_gradients.py                                  # CPU, fp32 and bf16, small shape
    python bench/head_gradients.py --device cuda --hidden 1024 --attn-heads 8 --seq 2048

For each dtype, the naive and the sequential order are built from the same seed (the same weights: every layer
initialises from a stream of its own, model/initialization.py) and run one microbatch's forward + backward
through megatron-core's schedule, as ``train_step`` runs it; every parameter's gradient is then read from megatron
DDP's fp32 grad buffer (``main_grad``) and compared: relative error ``||g_seq - g_naive|| / ||g_naive||`` per
parameter, the worst one reported and checked against the dtype's tolerance:

* fp32: 1e-5. The two orders compute the same products; only the sum of the n heads' dL/dz at the trunk output
  is done in another order, which moves a result by a few fp32 roundings (u = 6e-8) before the trunk's backward
  spreads it.
* bf16: 2e-2. bf16 keeps 8 significant bits (u = 2**-8 = 3.9e-3). The naive order sums the n heads' dL/dz in
  bf16, rounding after each of its n - 1 additions; the sequential one sums in fp32 and rounds once
  (model/heads/sequential.py). That difference, a few u, then runs through the trunk's bf16 backward: the CPU tests
  (tests/model/test_sequential_backward.py) measured a worst 8.8e-3 at n=4, so 2e-2 (about 5u). A wrong scale or a
  missing head is off by O(1/n) or more.

Prints a table and one JSON line (``{"fp32": {...}, "bf16": {...}}``); exits 2 when a dtype misses its tolerance.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import (  # noqa: E402
    Variant,
    add_shape_args,
    build_trainer,
    machine_line,
    make_config,
    release,
    shutdown,
    table,
)

import torch  # noqa: E402

TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2}


def gradients(args, precision: str, sequential: bool) -> tuple[dict, list[float], object]:
    """{parameter name: fp32 gradient on the CPU}, the per-head losses, and the device, for one order."""
    args.precision = precision
    variant = Variant("sequential" if sequential else "naive", args.n_heads, sequential)
    trainer = build_trainer(make_config(args, variant), max_steps=2)
    losses = trainer.forward_backward()
    device = trainer.env.device
    grads = {name.split("module.")[-1]: p.main_grad.detach().float().cpu().clone()
             for name, p in trainer.model.named_parameters()}
    head_loss = trainer.head_losses(losses)
    release(trainer)
    return grads, head_loss, device


def compare(naive: dict, sequential: dict) -> tuple[float, str, float]:
    """(worst relative error, its parameter, the whole model's relative error)."""
    worst, where = 0.0, ""
    diff_sq = ref_sq = 0.0
    for name, g in naive.items():
        d = (sequential[name] - g).norm().item()
        ref = g.norm().item()
        diff_sq, ref_sq = diff_sq + d * d, ref_sq + ref * ref
        rel = d / max(ref, 1e-30)
        if rel > worst:
            worst, where = rel, name
    return worst, where, (diff_sq ** 0.5) / max(ref_sq ** 0.5, 1e-30)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(parser, trunk_layers=2, seq=256, vocab=8192)
    parser.add_argument("--dtypes", nargs="+", choices=list(TOLERANCE), default=list(TOLERANCE),
                        help="default: %(default)s")
    args = parser.parse_args(argv)

    results, rows, device = {}, [], None
    for precision in args.dtypes:
        naive, naive_loss, device = gradients(args, precision, sequential=False)
        seq, seq_loss, _ = gradients(args, precision, sequential=True)
        if naive.keys() != seq.keys():
            raise SystemExit(f"the two orders hold different parameters: {sorted(naive.keys() ^ seq.keys())}")
        worst, where, whole = compare(naive, seq)
        loss_diff = max(abs(a - b) for a, b in zip(naive_loss, seq_loss))
        ok = worst <= TOLERANCE[precision]
        results[precision] = {"worst_rel_error": worst, "worst_parameter": where, "model_rel_error": whole,
                              "tolerance": TOLERANCE[precision], "parameters": len(naive),
                              "head_loss_max_abs_diff": loss_diff, "passed": ok}
        rows.append([precision, len(naive), f"{worst:.2e}", where, f"{whole:.2e}", f"{TOLERANCE[precision]:.0e}",
                     f"{loss_diff:.1e}", "yes" if ok else "NO"])

    print("# head_gradients: sequential vs naive head backward, per-parameter gradients (megatron DDP main_grad)")
    print(f"machine: {machine_line(device)}")
    print(f"shape: vocab {args.vocab}, seq {args.seq}, hidden {args.hidden}, {args.attn_heads} attention heads, "
          f"trunk {args.trunk_layers} layers, n={args.n_heads} heads, micro batch {args.mbs}, device {device}")
    print()
    print(table(["dtype", "parameters", "worst rel. error", "worst parameter", "whole model", "tolerance",
                 "head-loss diff", "within"], rows, aligns="lrrlrrrl"))
    print(json.dumps(results))
    shutdown()
    return 0 if all(r["passed"] for r in results.values()) else 2


if __name__ == "__main__":
    sys.exit(main())
