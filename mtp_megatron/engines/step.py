"""What every engine's step shares: the forward step, the heads' objective weights and the per-head results.

``forward_step`` follows megatron-core's contract: ``(data_iterator, model) -> (output, loss_func)``. On the last
stage the model returns ``(loss, stats)``; the loss is what the schedule scales and back-propagates (a zero
placeholder in the sequential order, see model/heads/sequential.py), and ``stats`` ([n + extra rows, 3]: loss
sum, correct, tokens per head, then a design's extra rows) is passed through untouched so the values filled during
backward can be read after the schedule returns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron.core.pipeline_parallel import get_forward_backward_func

from mtp_megatron.distributed.parallel import ParallelEnv
from mtp_megatron.config.schema import MTPConfig
from mtp_megatron.model.heads import STAT_CORRECT, STAT_LOSS_SUM, STAT_TOKENS, extra_stat_names
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
        loss_weights=batch.get("loss_weights"),
    )
    return output, _loss_func


def loss_weights_at(mtp: MTPConfig, step: int) -> Optional[list[float]]:
    """The heads' loss weights of training step ``step`` (its number as logged, 1 = the first): ``mtp.loss_weights``,
    or the last phase of ``mtp.loss_weight_schedule`` that has begun by then; None = all 1."""
    weights = mtp.loss_weights
    for phase in mtp.loss_weight_schedule or []:
        if step >= phase[0]:
            weights = list(phase[1:])
    return weights


def with_head_weights(data_iterator, num_microbatches: int, n_heads: int, document_eod, env: ParallelEnv,
                      loss_weights: Optional[list[float]] = None):
    """The step's microbatches, each carrying the heads' objective weights (model/heads/base.py) and loss weights:
    read ahead on the last stage (as torchtitan does) so that each head's target count over the whole global
    batch is known before the first backward. Other stages read as the schedule asks."""
    if data_iterator is None or not env.is_last_stage:
        return data_iterator
    batches = [next(data_iterator) for _ in range(num_microbatches)]
    counts = sum(head_target_counts(b["labels"], b["loss_mask"], n_heads, document_eod) for b in batches)
    dist.all_reduce(counts, group=env.groups.dp)  # TP ranks hold the same batches; DP ranks hold the others
    weights = (num_microbatches * env.dims.dp / counts.clamp(min=1)).float()
    extra = {}
    if loss_weights is not None:
        extra["loss_weights"] = torch.tensor(loss_weights, dtype=torch.float32, device=weights.device)
    return iter([{**batch, "head_weights": weights, **extra} for batch in batches])


@dataclass
class StepResult:
    """Per-head metrics of one step, token-weighted over all microbatches and DP ranks (valid on every rank)."""

    stats: torch.Tensor
    """[n + extra rows, 3] sums over the step: loss, correct top-1 predictions, target tokens per head, then the
    design's extra rows (see model/heads/inputs.py)."""
    extra_stats: tuple[str, ...] = ()
    """Names of the rows after the heads' (``MTPHeads.extra_stats``)."""
    loss_weights: Optional[list[float]] = None
    """The heads' loss weights in the step's objective; None = all 1."""
    balance_coef: float = 0.0
    """The CP design's load-balance coefficient (its objective: joint loss + coef x balance)."""
    grad_norm: float | None = None
    update_skipped: bool = False
    skip_reason: str | None = None
    """Why the update was not applied: a non-finite loss or gradient norm, or an fp16 loss-scale overflow."""

    @property
    def n_heads(self) -> int:
        return self.stats.size(0) - len(self.extra_stats)

    @property
    def nonfinite_heads(self) -> list[int]:
        """1-based heads whose loss is not finite on some rank (the sums are all-reduced, so NaN spreads). A CP
        mixture with a non-finite weight or factor makes every head's marginal loss non-finite too."""
        values = self.stats[: self.n_heads, STAT_LOSS_SUM].tolist()
        return [i + 1 for i, value in enumerate(values) if not math.isfinite(value)]

    @property
    def head_loss(self) -> list[float]:
        """Each head's mean loss, unweighted (the CP design's: its marginal loss)."""
        return self._means()[: self.n_heads]

    @property
    def head_acc(self) -> list[float]:
        heads = self.stats[: self.n_heads]
        return (heads[:, STAT_CORRECT] / heads[:, STAT_TOKENS].clamp(min=1)).tolist()

    @property
    def extras(self) -> dict[str, float]:
        """The design's extra rows, each its sum over its count."""
        return dict(zip(self.extra_stats, self._means()[self.n_heads :]))

    def _means(self) -> list[float]:
        return (self.stats[:, STAT_LOSS_SUM] / self.stats[:, STAT_TOKENS].clamp(min=1)).tolist()

    @property
    def loss(self) -> float:
        """The training objective's value: the sum over heads of each head's loss weight times its mean loss over
        all of its target tokens in the step (every microbatch and data-parallel rank); for the CP design the
        mixture's mean loss plus the balance coefficient times the balance term."""
        extras = self.extras
        if "cp/joint" in extras:
            return extras["cp/joint"] + self.balance_coef * extras["cp/balance"]
        weights = self.loss_weights or [1.0] * self.n_heads
        return sum(w * loss for w, loss in zip(weights, self.head_loss))

    @staticmethod
    def merge(results: list["StepResult"]) -> "StepResult":
        """Token-weighted combination of several steps (validation over several batches)."""
        first = results[0]
        return StepResult(stats=sum(r.stats for r in results), extra_stats=first.extra_stats,
                          loss_weights=first.loss_weights, balance_coef=first.balance_coef)

    def as_dict(self, prefix: str = "") -> dict:
        out = {f"{prefix}loss": self.loss}
        for i, (loss, acc) in enumerate(zip(self.head_loss, self.head_acc), start=1):
            out[f"{prefix}loss/head_{i}"] = loss
            out[f"{prefix}acc/head_{i}"] = acc
        out.update({f"{prefix}{name}": value for name, value in self.extras.items()})
        return out


def reduce_head_stats(losses_reduced: list[dict], mtp: MTPConfig, env: ParallelEnv,
                      loss_weights: Optional[list[float]] = None) -> StepResult:
    """Sum the statistics ([n + extra rows, 3]) over microbatches and DP ranks, and share them with every rank;
    ``loss_weights``: those of the step's objective (None: all 1, as evaluation scores).

    Only the last stage's TP rank 0 contributes (TP ranks hold identical copies), so one all-reduce over the
    whole world both sums over DP and brings the numbers to rank 0, which logs them.
    """
    extra = extra_stat_names(mtp.head_type, mtp.cp_rank)
    stats = torch.zeros(mtp.n_heads + len(extra), 3, dtype=torch.float64, device=env.device)
    if env.is_last_stage and env.tp_rank == 0:
        for microbatch in losses_reduced:
            stats += microbatch["mtp_stats"]
    dist.all_reduce(stats)
    return StepResult(stats=stats.cpu(), extra_stats=extra, loss_weights=loss_weights,
                      balance_coef=mtp.cp_balance_coef if mtp.head_type == "cp" else 0.0)


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
