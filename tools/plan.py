"""Plan a training run: per-GPU memory of every pipeline stage, whether it fits, step time and days, e.g.

    python tools/plan.py --config configs/13b.yaml --nodes 16 --gpus-per-node 8 --gpu-memory-gb 80 \
        [--tokens 1e12] [--mfu 0.4] [--peak-tflops 989] [--reserve 0.1] [section.key=value ...]

Parameter counts come from each stage's real model built on the meta device (mtp_megatron/planner/stages.py);
the memory and time formulas are in mtp_megatron/planner/estimate.py and the output's footnotes. When a stage
does not fit, the first change that fits is suggested as overrides (or more nodes). Runs on CPU, no GPU needed.

Exit codes: 0 every stage fits, 1 some stage does not fit, 2 bad config (or a layout that cannot run on
nodes x gpus-per-node GPUs).
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from typing import List, Optional

# megatron-core warns at import about optional Apex / Transformer Engine kernels; irrelevant to a plan.
warnings.filterwarnings("ignore", category=UserWarning)

from mtp_megatron.config import ConfigError  # noqa: E402
from mtp_megatron.distributed.topology import validate_for_world  # noqa: E402
from mtp_megatron.planner.estimate import GIB, Hardware, Plan, StageMemory, estimate, suggest  # noqa: E402
from mtp_megatron.train import load_run_config  # noqa: E402


FOOTNOTE = """\
Formulas (P = params/GPU, w = bytes per param, dp = data-parallel size, t = TP; mtp_megatron/planner/estimate.py):
  weights P*w (zero3: P*w/dp + 2 gathered units). Grads: megatron DDP's fp32 buffer 4P; zero1 w*P; zero2/3
  w*P/dp; ZeRO adds DeepSpeed's 5e8-element reduce bucket. Optimizer: (8 Adam + 4 fp32 master, no master for
  fp32 megatron) * P, / dp when sharded.
  Activations per layer and microbatch (Korthikanti et al. 2022): s*b*h*(10 + 24/t + 5*a*s/(h*t)), with sequence
  parallel s*b*h*(34 + 5*a*s/h)/t; selective recompute drops the 5*a*s/h term; full keeps 2*s*b*h (/t with SP)
  per layer + one working layer; times min(pp - stage, microbatches) in flight (1F1B). Heads: naive = n head
  layers, sequential = 1 head layer + the stored trunk output; full recompute does not reach them.
  MTP logits: s*b*V/t*(w + 4 for the fp32 copy) per head; one head sequential, n heads naive.
  Compute: each stage's share of the training FLOPs per token: 6 x matmul weights + 12*s*a*d per layer; the last
  stage adds n x (6*h*V unembedding + 12*V cross-entropy); full recompute re-runs the trunk layers' forward,
  selective every layer's attention products (mtp_megatron/distributed/pipeline_split.py).
  The 5*a*s/h term is unfused attention's stored scores: flash attention keeps none (an upper bound there)."""


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the YAML config of the run")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, required=True)
    parser.add_argument("--gpu-memory-gb", type=float, required=True, help="memory per GPU in GiB (H100: 80)")
    parser.add_argument("--tokens", type=float, default=None,
                        help="token budget (default: train.iters x global batch tokens)")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation (default %(default)s)")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="dense peak TFLOP/s per GPU in the run's precision (default %(default)s, H100 bf16)")
    parser.add_argument("--reserve", type=float, default=0.10,
                        help="fraction of GPU memory kept free for the CUDA context, NCCL and fragmentation "
                             "(default %(default)s)")
    parser.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
    args = parser.parse_args(argv)
    for name in ("nodes", "gpus_per_node"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.gpu_memory_gb <= 0 or not 0 <= args.reserve < 1 or not 0 < args.mfu <= 1 or args.peak_tflops <= 0:
        parser.error("need --gpu-memory-gb > 0, 0 <= --reserve < 1, 0 < --mfu <= 1 and --peak-tflops > 0")
    if args.tokens is not None and not (args.tokens > 0 and math.isfinite(args.tokens)):
        parser.error(f"--tokens must be a positive number of training tokens (e.g. 2e11), got {args.tokens:g}")
    return args


def gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f}"


def count(n: int) -> str:
    """A parameter count for the table: 1.469 B, 12.35 M, or exact below a million."""
    return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n:,}"


def _stage_name(s: StageMemory) -> str:
    p = s.params
    parts = (["embed"] if p.has_embedding else []) + [f"{p.trunk_layers} layers"]
    if p.head_layers:
        parts.append(f"{p.head_layers} heads + unembed")
    return " + ".join(parts)


def _balance_line(plan: Plan) -> str:
    """Each stage's compute and the pipeline balance (slowest stage / mean stage), which paces the step."""
    per_stage = ", ".join(f"{flops / 1e9:.2f}" for flops in plan.stage_flops)
    split = " + ".join(str(s.params.trunk_layers) for s in plan.stages)
    return (f"Pipeline balance: slowest stage / mean stage = {plan.balance:.3f} (trunk layers {split}; training "
            f"GFLOP per token by stage: {per_stage}); the slowest stage paces each step: "
            f"{plan.paced_step_seconds:.2f} s/step.")


def render(plan: Plan, header: str) -> str:
    """The plan as a terminal-readable markdown table with totals and footnotes."""
    lay, hw, tput = plan.layout, plan.hardware, plan.throughput
    order = "sequential" if lay.sequential_backward else "naive"
    other = "naive" if lay.sequential_backward else "sequential"
    lines = [
        header,
        "",
        f"Layout: TP {lay.tp} x PP {lay.pp} x DP {lay.dp} = {lay.world_size} GPUs | sharding {lay.sharding} | "
        f"precision {lay.precision} | micro batch {lay.micro_batch} | global batch {lay.global_batch} "
        f"({lay.num_microbatches} microbatches per step) | recompute {lay.recompute} | "
        f"sequence parallel {'on' if lay.sequence_parallel else 'off'} | {lay.n_heads} MTP heads, {order} backward",
        "",
        f"Memory per GPU in GiB; fits = total <= {hw.usable_gib:.1f} GiB usable "
        f"({hw.gpu_memory_gib:g} GiB less {hw.reserve_fraction:.0%} reserved for the CUDA context, NCCL buffers "
        f"and fragmentation).",
        "",
    ]
    columns = ["stage", "holds", "compute", "params/GPU", "weights", "grads", "optimizer", "in flight", "activations",
               f"logits {order} ({other})", "total", "fits"]
    rows = []
    for s, flops in zip(plan.stages, plan.stage_flops):
        fits = "yes" if s.total <= hw.usable_gib * GIB else f"NO (+{gib(s.total - hw.usable_gib * GIB)})"
        logits = f"{gib(s.logits)} ({gib(s.logits_other)})" if s.params.head_layers else "-"
        share = f"{flops / sum(plan.stage_flops):.1%}"
        rows.append([str(s.params.stage), _stage_name(s), share, count(s.params.params), gib(s.weights),
                     gib(s.grads), gib(s.optimizer), str(s.in_flight), gib(s.activations), logits, gib(s.total), fits])
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    right = {2, 3, 4, 5, 6, 7, 8, 9, 10}
    fmt = lambda cells: "| " + " | ".join(  # noqa: E731
        c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    rule = "|" + "|".join(("-" * (w + 1) + ":") if i in right else "-" * (w + 2) for i, w in enumerate(widths)) + "|"
    lines += [fmt(columns), rule, *(fmt(r) for r in rows)]
    last = plan.stages[-1]
    if last.activations_other != last.activations:
        lines.append(f"With {other} head backward the last stage would hold "
                     f"{gib(last.total - last.activations - last.logits + last.activations_other + last.logits_other)}"
                     f" GiB (activations {gib(last.activations_other)}, logits {gib(last.logits_other)}).")
    peak_share = max(s.checkpoint_share for s in plan.stages)
    lines.append(f"Checkpoint save: no extra GPU memory (each GPU writes its own ranges of the weights and optimizer "
                 f"state, no gather); up to {gib(peak_share)} GiB of host memory per GPU while it writes (its share "
                 f"of the checkpoint: async saves stage all of it, sync saves measured 0.45-0.63x of it).")
    lines += [
        "",
        f"Model: {tput.total_params / 1e9:.3f} B parameters ({tput.total_params:,}; every stage, TP-split weights "
        f"over all TP ranks, replicated norms once), {tput.layers} transformer layers (trunk + heads).",
        f"Tokens: {tput.tokens_per_step:,} per step (global batch {lay.global_batch} x seq {lay.seq_length}); "
        f"budget {tput.tokens:.3g} tokens = {tput.steps:,} steps.",
        f"Compute: {tput.flops_per_token:.3g} FLOP/token = 6 x {tput.total_params:,} params + 12 x {tput.layers} "
        f"layers x {lay.hidden} hidden x {lay.seq_length} seq; at MFU {hw.mfu:g} of {hw.peak_tflops:g} TFLOP/s "
        f"per GPU: {tput.step_seconds:.2f} s/step, {tput.days:.2f} days "
        f"({tput.tokens_per_step / tput.step_seconds / lay.world_size:,.0f} tokens/s per GPU).",
        _balance_line(plan),
        "",
        *FOOTNOTE.splitlines(),
    ]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    world = args.nodes * args.gpus_per_node
    hardware = Hardware(gpu_memory_gib=args.gpu_memory_gb, reserve_fraction=args.reserve,
                        peak_tflops=args.peak_tflops, mfu=args.mfu)
    try:
        cfg = load_run_config(args.config, args.overrides)  # a null model.vocab_size: the tokenizer's
        validate_for_world(cfg, world)
        plan = estimate(cfg, world, hardware, args.tokens)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    header = (f"# Plan: {args.config}{' ' + ' '.join(args.overrides) if args.overrides else ''} on {args.nodes} "
              f"node{'s' if args.nodes != 1 else ''} x {args.gpus_per_node} GPUs ({world} GPUs, "
              f"{args.gpu_memory_gb:g} GiB each)")
    print(render(plan, header))
    print()
    if plan.fits:
        print(f"Verdict: fits. Peak stage {plan.peak.params.stage}: {gib(plan.peak.total)} of "
              f"{hardware.usable_gib:.1f} GiB usable.")
        return 0
    bad = [str(s.params.stage) for s in plan.stages if s.total > hardware.usable_gib * GIB]
    plural = len(bad) > 1
    print(f"Verdict: DOES NOT FIT. Stage{'s' if plural else ''} {', '.join(bad)} need{'' if plural else 's'} more than "
          f"{hardware.usable_gib:.1f} GiB (peak stage {plan.peak.params.stage}: {gib(plan.peak.total)} GiB).")
    found = suggest(cfg, args.nodes, args.gpus_per_node, hardware, args.tokens)
    if found is None:
        print(f"No change tried fits, up to {args.nodes * 64} nodes (tried: larger TP within a node, larger PP, "
              "more sharding, sequence parallelism, recompute, smaller micro batch, and their combinations).")
    else:
        what = " ".join(found.overrides) if found.overrides else "the same config"
        where = "" if found.nodes == args.nodes else f" on --nodes {found.nodes}"
        tput = found.plan.throughput
        print(f"Suggestion: {what}{where} fits: peak stage {found.plan.peak.params.stage} at "
              f"{gib(found.plan.peak.total)} of {hardware.usable_gib:.1f} GiB, {tput.step_seconds:.2f} s/step, "
              f"{tput.days:.2f} days.")
        rerun = ["python tools/plan.py", f"--config {args.config}", f"--nodes {found.nodes}",
                 f"--gpus-per-node {args.gpus_per_node}", f"--gpu-memory-gb {args.gpu_memory_gb:g}",
                 *([f"--reserve {args.reserve:g}"] if args.reserve != 0.10 else []), *args.overrides, *found.overrides]
        print("  " + " ".join(rerun))
    return 1


if __name__ == "__main__":
    sys.exit(main())
