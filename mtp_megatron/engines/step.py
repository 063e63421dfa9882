"""What every engine's step shares: the forward step, the heads' objective weights and the per-head results.

``forward_step`` follows megatron-core's contract: ``(data_iterator, model) -> (output, loss_func)``. On the last
stage the model returns ``(loss, stats)``; the loss is what the schedule scales and back-propagates (a zero
placeholder in the sequential order, see model/heads.py), and ``stats`` ([n, 3]: loss sum, correct, tokens per
head) is passed through untouched so the values filled during backward can be read after the schedule returns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron.core.pipeline_parallel import get_forward_backward_func

from mtp_megatron.distributed.parallel import ParallelEnv
from mtp_megatron.model.heads import STAT_CORRECT, STAT_LOSS_SUM, STAT_TOKENS
from mtp_megatron.model.targets import head_target_counts


def _loss_func(output):
    loss, stats = output
    return loss, {"mtp_stats": stats}


def forward_step(data_iterator, model):
    # A stage reads only what it consumes (data/loader.py): a middle stage may read nothing at all.
    batch = next(data_iterator) if data_iterator is not None else {}
    output = model(
        batch.get("tokens"),
        batch.get("position_ids"),
        batch.get("attention_mask"),
        labels=batch.get("labels"),
        loss_mask=batch.get("loss_mask"),
        head_weights=batch.get("head_weights"),
    )
    return output, _loss_func


def with_head_weights(data_iterator, num_microbatches: int, n_heads: int, document_eod, env: ParallelEnv):
    """The step's microbatches, each carrying the heads' objective weights (model/heads.py): read ahead on the
    last stage (as torchtitan does) so that each head's target count over the whole global batch is known before
    the first backward. Other stages read as the schedule asks."""
    if data_iterator is None or not env.is_last_stage:
        return data_iterator
    batches = [next(data_iterator) for _ in range(num_microbatches)]
    counts = sum(head_target_counts(b["labels"], b["loss_mask"], n_heads, document_eod) for b in batches)
    dist.all_reduce(counts, group=env.groups.dp)  # TP ranks hold the same batches; DP ranks hold the others
    weights = (num_microbatches * env.dims.dp / counts.clamp(min=1)).float()
    return iter([{**batch, "head_weights": weights} for batch in batches])


@dataclass
class StepResult:
    """Per-head metrics of one step, token-weighted over all microbatches and DP ranks (valid on every rank)."""

    stats: torch.Tensor
    """[n, 3] sums over the step: loss, correct top-1 predictions, target tokens (see model/heads.py)."""
    grad_norm: float | None = None
    update_skipped: bool = False
    skip_reason: str | None = None
    """Why the update was not applied: a non-finite loss or gradient norm, or an fp16 loss-scale overflow."""

    @property
    def nonfinite_heads(self) -> list[int]:
        """1-based heads whose loss is not finite on some rank (the sums are all-reduced, so NaN spreads)."""
        return [i + 1 for i, value in enumerate(self.stats[:, STAT_LOSS_SUM].tolist()) if not math.isfinite(value)]

    @property
    def head_loss(self) -> list[float]:
        return (self.stats[:, STAT_LOSS_SUM] / self.stats[:, STAT_TOKENS].clamp(min=1)).tolist()

    @property
    def head_acc(self) -> list[float]:
        return (self.stats[:, STAT_CORRECT] / self.stats[:, STAT_TOKENS].clamp(min=1)).tolist()

    @property
    def loss(self) -> float:
        """The training objective's value: the sum over heads of each head's mean loss over all of its target
        tokens in the step (every microbatch and data-parallel rank)."""
        return sum(self.head_loss)

    @staticmethod
    def merge(results: list["StepResult"]) -> "StepResult":
        """Token-weighted combination of several steps (validation over several batches)."""
        return StepResult(stats=sum(r.stats for r in results))

    def as_dict(self, prefix: str = "") -> dict:
        out = {f"{prefix}loss": self.loss}
        for i, (loss, acc) in enumerate(zip(self.head_loss, self.head_acc), start=1):
            out[f"{prefix}loss/head_{i}"] = loss
            out[f"{prefix}acc/head_{i}"] = acc
        return out


def reduce_head_stats(losses_reduced: list[dict], n_heads: int, env: ParallelEnv) -> StepResult:
    """Sum the [n, 3] statistics over microbatches and DP ranks, and share them with every rank.

    Only the last stage's TP rank 0 contributes (TP ranks hold identical copies), so one all-reduce over the
    whole world both sums over DP and brings the numbers to rank 0, which logs them.
    """
    stats = torch.zeros(n_heads, 3, dtype=torch.float64, device=env.device)
    if env.is_last_stage and env.tp_rank == 0:
        for microbatch in losses_reduced:
            stats += microbatch["mtp_stats"]
    dist.all_reduce(stats)
    return StepResult(stats=stats.cpu())


def run_forward_backward(model_chunks, data_iterator, num_microbatches: int, cfg, forward_only: bool):
    """megatron-core's schedule for the run's layout (1F1B with pipeline stages, plain accumulation without)."""
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=data_iterator,
        model=model_chunks,
        num_microbatches=num_microbatches,
        seq_length=cfg.model.seq_length,
        micro_batch_size=cfg.train.micro_batch_size,
        forward_only=forward_only,
    )
