"""One training (or evaluation) step through megatron-core's pipeline schedules.

``forward_step`` follows megatron-core's contract: ``(data_iterator, model) -> (output, loss_func)``. On the last
stage the model returns ``(loss, stats)``; the loss is what the schedule scales and back-propagates (a zero
placeholder in the sequential order, see model/heads.py), and ``stats`` ([n, 3]: loss sum, correct, tokens per
head) is passed through untouched so the values filled during backward can be read after the schedule returns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron.core.pipeline_parallel import get_forward_backward_func

from mtp_megatron.distributed.parallel import ParallelEnv
from mtp_megatron.model.heads import STAT_CORRECT, STAT_LOSS_SUM, STAT_TOKENS


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
    )
    return output, _loss_func


@dataclass
class StepResult:
    """Per-head metrics of one step, token-weighted over all microbatches and DP ranks (valid on every rank)."""

    stats: torch.Tensor
    """[n, 3] sums over the step: loss, correct top-1 predictions, target tokens (see model/heads.py)."""
    grad_norm: float | None = None
    update_skipped: bool = False

    @property
    def head_loss(self) -> list[float]:
        return (self.stats[:, STAT_LOSS_SUM] / self.stats[:, STAT_TOKENS].clamp(min=1)).tolist()

    @property
    def head_acc(self) -> list[float]:
        return (self.stats[:, STAT_CORRECT] / self.stats[:, STAT_TOKENS].clamp(min=1)).tolist()

    @property
    def loss(self) -> float:
        """The training objective's value: the sum of the heads' mean losses."""
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
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=data_iterator,
        model=model_chunks,
        num_microbatches=num_microbatches,
        seq_length=cfg.model.seq_length,
        micro_batch_size=cfg.train.micro_batch_size,
        forward_only=forward_only,
    )


def train_step(model_chunks, optimizer, scheduler, data_iterator, num_microbatches: int, cfg, env) -> StepResult:
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    losses_reduced = run_forward_backward(model_chunks, data_iterator, num_microbatches, cfg, forward_only=False)
    update_successful, grad_norm, _ = optimizer.step()
    if update_successful:
        scheduler.step(increment=1)
    result = reduce_head_stats(losses_reduced, cfg.mtp.n_heads, env)
    result.grad_norm, result.update_skipped = grad_norm, not update_successful
    return result


@torch.no_grad()
def eval_step(model_chunks, data_iterator, num_microbatches: int, cfg, env) -> StepResult:
    for chunk in model_chunks:
        chunk.eval()
    losses_reduced = run_forward_backward(model_chunks, data_iterator, num_microbatches, cfg, forward_only=True)
    for chunk in model_chunks:
        chunk.train()
    return reduce_head_stats(losses_reduced, cfg.mtp.n_heads, env)
