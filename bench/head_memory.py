"""Peak memory of one microbatch's forward + backward with n=1, n heads naive, n heads sequential, and n heads
sequential with the chunked cross-entropy (``mtp.loss_chunk_size``); and the step time of chunked vs unchunked.

    python bench/head_memory.py --megatron-gpt       # defaults: vocab 32000, seq 1024, hidden 256, 2-layer trunk
    python bench/head_memory.py --device cuda --seq 4096 --vocab 128256
    python bench/head_memory.py --head-type cp --cp-rank 4   # the n-head variants in another design

The first three variants run unchunked (``mtp.loss_chunk_size=0``), the fourth with ``--chunk`` positions per
chunk (default: the config default); the sequential and chunked variants are the same model, so their losses
must agree.

Each variant is built fresh on the same trunk (same seed, same weights), trained for one warm-up step (so Adam
state exists), then one more microbatch goes through megatron-core's forward-backward function exactly as
``train_step`` runs it (``Engine.forward_backward``, engines/megatron.py). What is reported is the peak of
that forward + backward above the memory already held before it (weights, main grads, optimizer state, data):

* CPU: the torch profiler's memory records (``profile_memory=True``): every allocation and free of the step in
  time order, running sum, maximum. Cross-check: the process's resident-set high-water mark (VmHWM, reset through
  /proc/self/clear_refs just before the step) minus the resident set before it, with glibc's mmap threshold fixed
  at 64 KiB so freed tensors go back to the OS and RSS tracks the tensors.
* GPU: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus ``memory_allocated`` before.

``--megatron-gpt`` adds megatron-core's own ``GPTModel`` of the n=1 model's depth, with the same layer spec, wrappers
and optimizer: a memory reference for the loss path. Its output layer and final norm initialise from megatron's
streams, not ours, so its head-1 loss is close to our n=1's but not equal (tests/model/test_gpt_equivalence.py
shows the two equal on the same weights).

With a single pipeline stage (world size 1) the last stage is the whole model, so the peak includes the trunk's
activations; they are the same in every variant, so the differences between variants are the heads'.

Step time (chunked vs unchunked, both sequential): the two are built side by side after the memory runs and
stepped round-robin with full ``train_step``s (forward-backward, optimizer, LR schedule), one step each per
round, so drift of the machine hits both alike; ``--time-warmup`` rounds untimed, median of ``--time-steps``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import (  # noqa: E402
    MEGATRON_GPT,
    MiB,
    Variant,
    add_shape_args,
    build_trainer,
    held_bytes,
    machine_line,
    make_config,
    release,
    shutdown,
    synchronize,
    table,
    median,
)

import torch  # noqa: E402

from mtp_megatron.config.schema import MTPConfig  # noqa: E402
from mtp_megatron.model.heads import DESIGNS  # noqa: E402

UNCHUNKED = ("mtp.loss_chunk_size=0",)


def head_variants(n_heads: int, chunk: int, head_type: str = "transformer", cp_rank: int = 4) -> list[Variant]:
    """n=1 (a plain GPT: one transformer head), n heads of ``head_type`` naive and sequential unchunked (as before
    chunking existed), then n heads sequential chunked: the same model as the third."""
    design = (f"mtp.head_type={head_type}", f"mtp.cp_rank={cp_rank}")
    label = "" if head_type == "transformer" else f" {head_type}" + (f" r={cp_rank}" if head_type == "cp" else "")
    return [Variant("n=1", 1, True, overrides=UNCHUNKED),
            Variant(f"n={n_heads}{label} naive", n_heads, False, overrides=UNCHUNKED + design),
            Variant(f"n={n_heads}{label} sequential", n_heads, True, overrides=UNCHUNKED + design),
            Variant(f"n={n_heads}{label} sequential chunked {chunk}", n_heads, True,
                    overrides=(f"mtp.loss_chunk_size={chunk}", *design))]


def step_times(args, timed: list[Variant]) -> dict[str, float]:
    """Median seconds of a full ``train_step`` per variant, the variants built side by side and stepped
    round-robin (as bench/step_time.py does)."""
    rounds = args.time_warmup + args.time_steps
    trainers = {v.name: build_trainer(make_config(args, v), max_steps=rounds + 1) for v in timed}
    seconds = {name: [] for name in trainers}
    for k in range(rounds):
        for name, trainer in trainers.items():
            synchronize(trainer.env.device)
            start = time.perf_counter()
            trainer.train_step()
            synchronize(trainer.env.device)
            if k >= args.time_warmup:
                seconds[name].append(time.perf_counter() - start)
    for trainer in trainers.values():
        release(trainer)
    return {name: median(s) for name, s in seconds.items()}


def _fix_glibc_mmap_threshold() -> bool:
    """Serve allocations >= 64 KiB with mmap and return them on free, so RSS follows live tensors (CPU only)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024))
    except OSError:
        return False


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _profiler_peak(prof, device_type: str) -> tuple[int, int, int]:
    """(peak of the running allocation sum, net bytes at the end, number of memory records) for one device type."""
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    want = "CUDA" if device_type == "cuda" else "CPU"
    events = [e for e in events if str(e.device_type()).split(".")[-1] == want]
    events.sort(key=lambda e: e.start_ns())
    running = peak = 0
    for e in events:
        running += e.nbytes()  # positive for an allocation, negative for a free
        peak = max(peak, running)
    return peak, running, len(events)


def measure(args, variant) -> dict:
    cfg = make_config(args, variant)
    trainer = build_trainer(cfg, max_steps=1 + args.warmup + 1, megatron_gpt=variant.megatron_gpt)
    device = trainer.env.device
    for _ in range(args.warmup):  # full train steps: creates the optimizer state and warms up every code path
        trainer.train_step()
    # What train_step does before the forward-backward, done before the baseline is taken.
    trainer.model.zero_grad_buffer()
    trainer.optimizer.zero_grad()
    gc.collect()
    synchronize(device)

    out = {"variant": variant.name, "held": held_bytes(trainer)}
    start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        losses = trainer.forward_backward()
        synchronize(device)
        out["peak"] = torch.cuda.max_memory_allocated() - base
        out["baseline"] = base
        out["end"] = torch.cuda.memory_allocated() - base
    else:
        from torch.profiler import ProfilerActivity, profile

        rss_before = _proc_status_kib("VmRSS")
        hwm_ok = _reset_hwm()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
            losses = trainer.forward_backward()
        hwm = _proc_status_kib("VmHWM")
        out["peak"], out["end"], out["records"] = _profiler_peak(prof, "cpu")
        del prof
        if hwm_ok and hwm is not None and rss_before is not None:
            out["rss_peak"] = (hwm - rss_before) * 1024
        out["baseline"] = rss_before * 1024 if rss_before is not None else None  # process RSS
    out["seconds"] = time.perf_counter() - start
    out["head_loss"] = trainer.head_losses(losses)
    out["device"], out["dtype"] = device, trainer.model.config.params_dtype
    out["vocab_padded"] = cfg.model.padded_vocab_size(cfg.parallel.tp)
    release(trainer)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(parser, trunk_layers=2, seq=1024)
    parser.add_argument("--warmup", type=int, default=1, help="full train steps before the measured one (default 1)")
    parser.add_argument("--megatron-gpt", action="store_true",
                        help="also measure megatron-core's own GPTModel (n=1) on the same trunk: its final norm, "
                             "output layer and vocab-parallel cross-entropy")
    parser.add_argument("--target", type=float, default=1.05,
                        help="goal for the sequential/n=1 peak ratio; exit 2 when it is missed (default 1.05)")
    parser.add_argument("--chunk", type=int, default=MTPConfig.loss_chunk_size,
                        help="mtp.loss_chunk_size of the chunked variant (default: the config default, %(default)s)")
    parser.add_argument("--gpt-target", type=float, default=1.0,
                        help="goal for the chunked n-head / megatron GPTModel n=1 peak ratio (with --megatron-gpt); "
                             "exit 2 when it is missed (default 1.0)")
    parser.add_argument("--time-target", type=float, default=1.03,
                        help="goal for the chunked / unchunked step-time ratio; exit 2 when it is missed "
                             "(default 1.03)")
    parser.add_argument("--time-steps", type=int, default=8,
                        help="timed train steps per variant for the step-time ratio; 0 skips it (default 8)")
    parser.add_argument("--time-warmup", type=int, default=2, help="untimed rounds before them (default 2)")
    parser.add_argument("--head-type", default="transformer", choices=sorted(DESIGNS),
                        help="mtp.head_type of the n-head variants; n=1 stays a plain GPT (default %(default)s)")
    parser.add_argument("--cp-rank", type=int, default=4, help="mtp.cp_rank with --head-type cp (default 4)")
    args = parser.parse_args(argv)
    if args.vocab < 32000 or args.seq < 1024:
        print(f"note: the project's goal is stated at vocab >= 32000 and seq >= 1024 (got {args.vocab}, {args.seq})")

    cpu_rss = args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
    mmap_fixed = _fix_glibc_mmap_threshold() if cpu_rss else False

    chosen = head_variants(args.n_heads, args.chunk, args.head_type, args.cp_rank) + ([MEGATRON_GPT] if args.megatron_gpt else [])
    results = [measure(args, v) for v in chosen]
    device, dtype = results[0]["device"], results[0]["dtype"]
    n = args.n_heads
    base = results[0]

    print("# head_memory: peak memory of one microbatch's forward+backward (last stage = whole model, pp=1)")
    print(f"machine: {machine_line(device)}")
    print(f"shape: vocab {args.vocab} (padded {base['vocab_padded']}), seq {args.seq}, hidden {args.hidden}, "
          f"{args.attn_heads} attention heads, trunk {args.trunk_layers} layers, micro batch {args.mbs}, {dtype}, "
          f"device {device}")
    method = ("torch.cuda.max_memory_allocated - memory_allocated before" if device.type == "cuda" else
              "torch profiler memory records (running sum of allocations, max); RSS = VmHWM - VmRSS before"
              + ("" if mmap_fixed else " (glibc mmap threshold NOT fixed: RSS may under-read)"))
    print(f"method: {method}")
    print()

    headers = ["variant", "peak above baseline (MiB)", "ratio to n=1"]
    if device.type == "cpu":
        headers += ["RSS peak delta (MiB)", "RSS ratio"]
    headers += ["held before: params+grads+optim (MiB)",
                "CUDA allocated before (MiB)" if device.type == "cuda" else "process RSS before (MiB)",
                "head-1 loss", "step s"]
    rows = []
    for r in results:
        row = [r["variant"], f"{r['peak'] / MiB:.1f}", f"{r['peak'] / base['peak']:.3f}x"]
        if device.type == "cpu":
            if "rss_peak" in r:
                row += [f"{r['rss_peak'] / MiB:.1f}", f"{r['rss_peak'] / base['rss_peak']:.3f}x"]
            else:
                row += ["n/a", "n/a"]
        before = f"{r['baseline'] / MiB:.0f}" if r["baseline"] is not None else "n/a"
        row += [f"{r['held'] / MiB:.0f}", before, f"{r['head_loss'][0]:.5f}", f"{r['seconds']:.1f}"]
        rows.append(row)
    print(table(headers, rows))

    # Theory (docs/method.md): one head's logits are b*s*V elements; the cross-entropy runs in fp32.
    elems = args.mbs * args.seq * base["vocab_padded"]
    logit_bytes = elems * torch.tensor([], dtype=dtype).element_size()
    fp32_bytes = elems * 4
    naive, seq, chunked = results[1], results[2], results[3]
    chunk_elems = args.mbs * min(args.chunk or args.seq, args.seq) * base["vocab_padded"]
    print()
    print("theory (docs/method.md): logits of one head = b*s*V elements")
    print(table(
        ["quantity", "MiB"],
        [
            [f"one head's logits, b*s*V = {elems:,} elements in {dtype}", f"{logit_bytes / MiB:.1f}"],
            ["one head's logits as fp32 (the cross-entropy's dtype)", f"{fp32_bytes / MiB:.1f}"],
            [f"{n} heads' logits alive at once (naive), fp32", f"{n * fp32_bytes / MiB:.1f}"],
            ["unfused cross-entropy, ~10 B per logit element, one head", f"{10 * elems / MiB:.1f}"],
            [f"unfused cross-entropy, ~10 B per logit element, {n} heads", f"{10 * n * elems / MiB:.1f}"],
            [f"measured: n={n} naive - n=1", f"{(naive['peak'] - base['peak']) / MiB:.1f}"],
            [f"  per extra head (/ {n - 1}): its fp32 logits + its layer's activations",
             f"{(naive['peak'] - base['peak']) / max(n - 1, 1) / MiB:.1f}"],
            [f"measured: n={n} sequential - n=1", f"{(seq['peak'] - base['peak']) / MiB:.1f}"],
            [f"one chunk's logits as fp32, b*{min(args.chunk or args.seq, args.seq)}*V", f"{chunk_elems * 4 / MiB:.1f}"],
            [f"measured: n={n} sequential - n={n} sequential chunked",
             f"{(seq['peak'] - chunked['peak']) / MiB:.1f}"],
        ],
    ))

    seq_ratio, naive_ratio = seq["peak"] / base["peak"], naive["peak"] / base["peak"]
    same = all(abs(a - b) <= 1e-4 * max(1.0, abs(a)) for a, b in zip(naive["head_loss"], seq["head_loss"]))
    chunked_same = all(abs(a - b) <= 1e-6 * max(1.0, abs(a)) for a, b in zip(seq["head_loss"], chunked["head_loss"]))
    print()
    print(f"n={n} naive / n=1 = {naive_ratio:.3f}x; n={n} sequential / n=1 = {seq_ratio:.3f}x "
          f"(goal <= {args.target:.2f}x: {'met' if seq_ratio <= args.target else 'MISSED'}); "
          f"naive and sequential per-head losses agree: {'yes' if same else 'NO'} "
          f"({', '.join(f'{x:.5f}' for x in seq['head_loss'])})")
    chunked_ratio = chunked["peak"] / base["peak"]
    print(f"n={n} sequential chunked ({args.chunk} positions) / n=1 = {chunked_ratio:.3f}x; chunked / unchunked "
          f"sequential = {chunked['peak'] / seq['peak']:.3f}x; chunked and unchunked per-head losses agree (1e-6): "
          f"{'yes' if chunked_same else 'NO'}")
    summary = {"vocab": args.vocab, "seq": args.seq, "device": str(device), "dtype": str(dtype), "chunk": args.chunk,
               "peak_mib": {r["variant"]: r["peak"] / MiB for r in results},
               "sequential_over_n1": seq_ratio, "naive_over_n1": naive_ratio, "losses_agree": same,
               "chunked_over_n1": chunked_ratio, "chunked_losses_agree": chunked_same}
    ok = seq_ratio <= args.target and same and chunked_same
    if args.megatron_gpt:
        gpt = results[4]
        gpt_ratio = chunked["peak"] / gpt["peak"]
        summary["chunked_over_megatron_gpt"] = gpt_ratio
        ok = ok and gpt_ratio <= args.gpt_target
        print(f"n={n} sequential chunked / megatron GPTModel n=1 = {gpt_ratio:.3f}x "
              f"(goal <= {args.gpt_target:.2f}x: {'met' if gpt_ratio <= args.gpt_target else 'MISSED'})")
        summary["sequential_over_megatron_gpt"] = seq["peak"] / gpt["peak"]
        summary["n1_over_megatron_gpt"] = base["peak"] / gpt["peak"]
        print(f"n={n} sequential / megatron GPTModel n=1 = {seq['peak'] / gpt['peak']:.3f}x; our n=1 / megatron "
              f"GPTModel n=1 = {base['peak'] / gpt['peak']:.3f}x (head-1 loss {base['head_loss'][0]:.5f} vs "
              f"{gpt['head_loss'][0]:.5f})")
    if args.time_steps > 0:
        seq_variant, chunk_variant = chosen[2], chosen[3]
        times = step_times(args, [seq_variant, chunk_variant])
        time_ratio = times[chunk_variant.name] / times[seq_variant.name]
        summary["step_s"] = times
        summary["chunked_over_unchunked_step_time"] = time_ratio
        ok = ok and time_ratio <= args.time_target
        print(f"step time (median of {args.time_steps} train steps, round-robin): unchunked "
              f"{times[seq_variant.name]:.3f} s, chunked {times[chunk_variant.name]:.3f} s, ratio {time_ratio:.3f}x "
              f"(goal <= {args.time_target:.2f}x: {'met' if time_ratio <= args.time_target else 'MISSED'})")
    print(json.dumps(summary))
    shutdown()
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main())
