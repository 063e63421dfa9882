"""Per-rank training state under each data-parallel sharding choice, side by side, at DP=2 and DP=4.

    python bench/sharding_memory.py                   # ~55M model, DP 2 and 4, every sharding (CPU: ~4 min)
    python bench/sharding_memory.py --world-sizes 2   # DP=2 only
    python bench/sharding_memory.py --device cuda     # on a GPU machine (one GPU per rank)

Model: ``configs/tiny.yaml`` widened to d 512, ffn 1408, vocab 32000, seq 128, ``model.num_layers=4`` with n=4
heads (a 3-layer trunk plus 4 head layers and the shared unembedding: about 55M parameters, printed), fp32,
micro-batch 1, two microbatches per step. Each (sharding, DP) pair runs in fresh processes
(``mtp_megatron.testing.distributed.run_distributed``), so the peak is that variant's alone.

Per rank it reports the bytes of parameters, gradients and optimizer state that rank holds during a training step
(``mtp_megatron.training.memory.state_bytes_in_a_step``: counted from tensor storages, once each; DeepSpeed's
gradients measured after each microbatch's backward, before the update frees them), and the process's peak
memory: the resident-set high-water mark on CPU (``ru_maxrss``, which includes the ~0.4 GB of the Python,
torch and megatron-core import), ``torch.cuda.max_memory_allocated`` on GPU. Ratios are to plain DDP at the same
DP. Ranks agree to within partition padding; the table shows rank 0.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mtp_megatron.config import load_config  # noqa: E402
from mtp_megatron.distributed.parallel import destroy_distributed, init_distributed  # noqa: E402
from mtp_megatron.testing.distributed import run_distributed  # noqa: E402
from mtp_megatron.training.memory import state_bytes_in_a_step  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARDINGS = ["none", "distributed_optimizer", "zero1", "zero2", "zero3", "fsdp"]
MODEL = ["model.hidden_size=512", "model.num_attention_heads=8", "model.ffn_hidden_size=1408", "model.num_layers=4",
         "model.vocab_size=32000", "model.seq_length=128", "mtp.n_heads=4", "train.precision=fp32"]
MIB = 2**20


def measure(run_dir: str, sharding: str, dp: int, device: str) -> dict:
    """One rank: the training state it holds in a step, its peak memory and the model's parameter count."""
    cfg = load_config(os.path.join(REPO, "configs/tiny.yaml"), [
        *MODEL, f"parallel.sharding={sharding}", "train.micro_batch_size=1", f"train.global_batch_size={2 * dp}",
        "train.iters=2", f"train.device={device}", f"run.dir={run_dir}", "checkpoint.save=false",
        "logging.tensorboard=false"])
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // dp))
    env = init_distributed(cfg.parallel, cfg.train.device, cfg.train.seed)
    try:
        held = state_bytes_in_a_step(cfg, env)
        if env.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {**held, "peak": peak}
    finally:
        destroy_distributed()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--shardings", nargs="+", default=SHARDINGS, choices=SHARDINGS)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()

    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.cuda.get_device_name() if args.device == 'cuda' else 'no GPU'}; fp32; rank 0 shown")
    with tempfile.TemporaryDirectory() as tmp:
        for dp in args.world_sizes:
            rows = {s: run_distributed(measure, dp, f"{tmp}/{s}_{dp}", s, dp, args.device)[0] for s in args.shardings}
            base = rows.get("none")
            print(f"\nDP={dp}")
            print(f"| sharding | params MiB | grads MiB | optimizer MiB | params+grads+optimizer MiB | "
                  f"{'peak RSS' if args.device == 'cpu' else 'peak allocated'} MiB | state vs none | peak vs none |")
            print("|---|---:|---:|---:|---:|---:|---:|---:|")
            for sharding, r in rows.items():
                state = r["params"] + r["grads"] + r["optimizer"]
                ratio = (f"{state / (base['params'] + base['grads'] + base['optimizer']):.3f}x" if base else "-")
                peak_ratio = f"{r['peak'] / base['peak']:.3f}x" if base else "-"
                print(f"| {sharding} | {r['params'] / MIB:.1f} | {r['grads'] / MIB:.1f} | {r['optimizer'] / MIB:.1f} | "
                      f"{state / MIB:.1f} | {r['peak'] / MIB:.0f} | {ratio} | {peak_ratio} |", flush=True)


if __name__ == "__main__":
    main()
