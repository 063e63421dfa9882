"""Step metrics: one progress line, one metrics.jsonl record and TensorBoard scalars per step, on rank 0 only."""

from __future__ import annotations

import json
import math
import os
from typing import Optional

import torch

from mtp_megatron.config import Config

# Dense bf16 peak of the GPUs we expect to run on, for MFU. Override with MTP_PEAK_TFLOPS.
_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "B200": 2250.0}


def model_flops_per_token(cfg: Config) -> float:
    """Training FLOPs per token (forward + backward = 3x forward) of the trunk and all n heads.

    Matmul FLOPs only, counted as Megatron-LM does: 2 per multiply-accumulate, attention scores over the full
    sequence. Each head adds one transformer layer and one unembedding (the paper's ~6*d*V per extra head).
    """
    m = cfg.model
    h, s, ffn = m.hidden_size, m.seq_length, m.resolved_ffn_hidden_size()
    kv = h * (m.num_query_groups or m.num_attention_heads) // m.num_attention_heads
    attention = 2 * h * h + 2 * h * kv  # q and output projections; k and v (GQA-sized)
    mlp = (3 if m.activation == "swiglu" else 2) * h * ffn
    layers = cfg.trunk_num_layers() + cfg.mtp.n_heads
    forward = 2 * layers * (attention + mlp) + 2 * layers * 2 * s * h + 2 * cfg.mtp.n_heads * h * m.vocab_size
    return 3.0 * forward


def peak_flops_per_gpu() -> Optional[float]:
    if "MTP_PEAK_TFLOPS" in os.environ:
        return float(os.environ["MTP_PEAK_TFLOPS"]) * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((tflops * 1e12 for key, tflops in _PEAK_TFLOPS.items() if key in name), None)


class MetricsLogger:
    """Writes ``<run.dir>/metrics.jsonl``, TensorBoard event files and the console line (rank 0 only)."""

    def __init__(self, cfg: Config, run_dir: str, rank: int, world_size: int, start_step: int = 0):
        self.enabled = rank == 0
        self.n_heads = cfg.mtp.n_heads
        self.world_size = world_size
        self.flops_per_token = model_flops_per_token(cfg)
        self.peak_flops = peak_flops_per_gpu()
        self.jsonl = self.tensorboard = None
        self.last_validation: Optional[dict] = None  # the latest val/ record, for the end-of-run summary
        if not self.enabled:
            return
        self.jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a", buffering=1)
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # A resumed run drops the events an earlier attempt logged after its checkpoint, so curves do not fold.
            self.tensorboard = SummaryWriter(os.path.join(run_dir, "tensorboard"),
                                             purge_step=start_step + 1 if start_step else None)

    def log(self, step: int, values: dict, total_steps: Optional[int] = None) -> None:
        if not self.enabled:
            return
        record = {"step": step, **values}
        if "val/loss" in values:
            self.last_validation = record
        self.jsonl.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.tensorboard.add_scalar(key, value, step)
        print(self._progress_line(step, total_steps, values), flush=True)

    def print_validation_summary(self) -> None:
        """Per-head validation loss and accuracy of the latest evaluation, one line per head."""
        record = self.last_validation
        if not self.enabled or record is None:
            return
        print(f"validation at step {record['step']}: loss {record['val/loss']:.4f} (sum over heads)")
        for i in range(1, self.n_heads + 1):
            print(f"  head {i} (token t+{i}): loss {record[f'val/loss/head_{i}']:.4f}  "
                  f"acc {record[f'val/acc/head_{i}']:.3f}", flush=True)

    def throughput(self, tokens: int, seconds: float) -> dict:
        """tokens_per_s for the whole job, and MFU where the GPU's peak is known."""
        tokens_per_s = tokens / seconds
        out = {"tokens_per_s": tokens_per_s}
        if self.peak_flops:
            out["mfu"] = tokens_per_s * self.flops_per_token / (self.peak_flops * self.world_size)
        return out

    def _progress_line(self, step: int, total: Optional[int], values: dict) -> str:
        prefix = "val/" if any(k.startswith("val/") for k in values) else ""
        heads = " ".join(f"{values[f'{prefix}loss/head_{i}']:.3f}" for i in range(1, self.n_heads + 1))
        parts = [f"step {step}" + (f"/{total}" if total else ""), f"{prefix}loss {values[prefix + 'loss']:.4f}",
                 f"heads [{heads}]"]
        if "lr" in values:
            parts.append(f"lr {values['lr']:.2e}")
        if values.get("grad_norm") is not None:
            parts.append(f"grad_norm {values['grad_norm']:.3f}")
        if "tokens_per_s" in values:
            parts.append(f"{values['tokens_per_s']:.0f} tok/s")
        if "mfu" in values:
            parts.append(f"mfu {100 * values['mfu']:.1f}%")
        return " | ".join(parts)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
