"""One training (or evaluation) step through megatron-core's pipeline schedules.

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

from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import unwrap_model

from mtp_megatron.distributed.parallel import ParallelEnv
from mtp_megatron.training import deepspeed_engine
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
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=data_iterator,
        model=model_chunks,
        num_microbatches=num_microbatches,
        seq_length=cfg.model.seq_length,
        micro_batch_size=cfg.train.micro_batch_size,
        forward_only=forward_only,
    )


def _document_eod(model_chunk):
    """The EOD id across which the heads' targets are dropped (document masks), or None."""
    bare = model_chunk.module if deepspeed_engine.is_deepspeed_engine(model_chunk) else unwrap_model(model_chunk)
    return bare.document_eod


def train_step(model_chunks, optimizer, scheduler, data_iterator, num_microbatches: int, cfg, env) -> StepResult:
    data_iterator = with_head_weights(data_iterator, num_microbatches, cfg.mtp.n_heads,
                                      _document_eod(model_chunks[0]), env)
    if deepspeed_engine.is_deepspeed_engine(model_chunks[0]):
        return _deepspeed_train_step(model_chunks[0], scheduler, data_iterator, num_microbatches, cfg, env)
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    losses_reduced = run_forward_backward(model_chunks, data_iterator, num_microbatches, cfg, forward_only=False)
    # The losses first: every rank must know whether any head's loss was finite before anyone steps.
    result = reduce_head_stats(losses_reduced, cfg.mtp.n_heads, env)
    result.grad_norm, result.skip_reason = step_if_finite(optimizer, losses_finite=not result.nonfinite_heads)
    result.update_skipped = result.skip_reason is not None
    if not result.update_skipped:
        scheduler.step(increment=1)
    return result


def _deepspeed_train_step(engine, scheduler, data_iterator, num_microbatches: int, cfg, env) -> StepResult:
    """The same step through DeepSpeed's engine, which applies (or, for a non-finite norm, skips) the update."""
    losses_reduced = deepspeed_engine.forward_backward(engine, data_iterator, num_microbatches, forward_only=False)
    result = reduce_head_stats(losses_reduced, cfg.mtp.n_heads, env)
    result.grad_norm, result.skip_reason = deepspeed_engine.update_result(engine)
    if result.skip_reason and result.nonfinite_heads:
        result.skip_reason = "non-finite loss"
    result.update_skipped = result.skip_reason is not None
    if not result.update_skipped:
        scheduler.step(increment=1)
    return result


@torch.no_grad()
def step_if_finite(optimizer, losses_finite: bool) -> tuple[float | None, str | None]:
    """megatron-core's optimizer step (``ChainedOptimizer.step``: prepare grads, norm, clip, update), except that a
    non-finite loss or gradient norm skips the update. Megatron only skips on fp16 overflow; in fp32 and bf16 a
    NaN norm makes the clip factor NaN, which fails ``< 1`` and so lets NaN gradients into the update.

    Returns (grad norm or None, why the update was skipped or None).
    """
    if optimizer.prepare_grads():  # fp16: the loss scaler found inf/NaN and has already backed off
        return None, "fp16 loss-scale overflow"
    grad_norm = optimizer.get_grad_norm()
    if not losses_finite:
        return grad_norm, "non-finite loss"
    if not math.isfinite(grad_norm):
        return grad_norm, "non-finite gradient norm"
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        params = [] if getattr(part, "is_stub_optimizer", False) else part.get_parameters()
        if part.config.clip_grad > 0.0 and params:
            clip_grad_by_total_norm_fp32(params, part.config.clip_grad, grad_norm,
                                         part.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
    if not optimizer.step_with_ready_grads():
        return grad_norm, "optimizer reported an unsuccessful update"
    return grad_norm, None


@torch.no_grad()
def eval_step(model_chunks, data_iterator, num_microbatches: int, cfg, env) -> StepResult:
    for chunk in model_chunks:
        chunk.eval()
    if deepspeed_engine.is_deepspeed_engine(model_chunks[0]):
        losses_reduced = deepspeed_engine.forward_backward(model_chunks[0], data_iterator, num_microbatches,
                                                           forward_only=True)
    else:
        losses_reduced = run_forward_backward(model_chunks, data_iterator, num_microbatches, cfg, forward_only=True)
    for chunk in model_chunks:
        chunk.train()
    return reduce_head_stats(losses_reduced, cfg.mtp.n_heads, env)
