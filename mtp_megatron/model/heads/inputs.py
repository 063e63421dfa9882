"""What the heads read besides the trunk output, each head's targets laid out as its logits are, and the statistics
rows the heads fill in."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

STAT_LOSS_SUM, STAT_CORRECT, STAT_TOKENS = 0, 1, 2
"""Columns of a statistics row: (sum of token losses, correct top-1 predictions, number of target tokens), float64,
so rows sum over microbatches and data-parallel ranks and are divided at the end. A design's extra rows
(``MTPHeads.extra_stats``) use the loss-sum and token columns as (sum, count) of what they name."""


@dataclass
class HeadInputs:
    """What every head needs besides the trunk output; built once per microbatch."""

    labels: list[Tensor]
    """Per head, [b, s] target ids (head i at position t: token t+i)."""
    loss_masks: list[Tensor]
    """Per head, [b, s] float mask: 1 where the target exists and counts."""
    attention_mask: Optional[Tensor]
    rotary_pos_emb: Optional[Tensor]
    weights: Optional[Tensor] = None
    """[n] float32: the global normalisers, what each head's sum of token losses is multiplied by (see base.py's
    docstring); None = each head's mean over this microbatch."""
    loss_weights: Optional[Tensor] = None
    """[n] float32: the heads' loss weights at this step (``mtp.loss_weights``); None = all 1. Training only:
    evaluation scores every head unweighted."""


@dataclass
class HeadTargets:
    """One head's labels and loss mask laid out as its logits are ([s, b]), and its target count."""

    labels: Tensor
    mask: Tensor
    num_tokens: Tensor
    shards: int
    """Sequence-parallel ranks whose slices the unembedding gathers into one chunk (1 without sequence
    parallelism)."""

    @classmethod
    def of(cls, inputs: HeadInputs, head: int, shards: int) -> "HeadTargets":
        labels = inputs.labels[head].transpose(0, 1).contiguous()
        mask = inputs.loss_masks[head].transpose(0, 1).float()
        return cls(labels, mask, mask.sum(), shards)

    def chunk(self, local: slice) -> tuple[Tensor, Tensor]:
        """Labels and mask of the positions whose logits a chunk of this rank's ``local`` positions gives: those
        positions of every rank's slice of the sequence, in rank order (the all-gather's order)."""
        return self.take(self.labels, local), self.take(self.mask, local)

    def take(self, full: Tensor, local: slice) -> Tensor:
        """The rows of ``full`` ([s, ...], laid out as the labels) that a chunk of ``local`` positions covers."""
        if self.shards == 1:
            return full[local]
        return full.view(self.shards, -1, *full.shape[1:])[:, local].flatten(0, 1)

    def put(self, full: Tensor, local: slice, values: Tensor) -> None:
        """Write one chunk's ``values`` into its rows of ``full`` (the inverse of ``take``)."""
        if self.shards == 1:
            full[local] = values
        else:
            full.view(self.shards, -1, *full.shape[1:])[:, local] = values.view(self.shards, -1, *values.shape[1:])

    def empty_stats(self) -> Tensor:
        """A [3] statistics row with the head's target count filled in."""
        stats = torch.zeros(3, dtype=torch.float64, device=self.mask.device)
        stats[STAT_TOKENS] = self.num_tokens.double()
        return stats


def weigh(loss_sum: Tensor, head: int, inputs: HeadInputs, targets: HeadTargets) -> Tensor:
    """A head's (or one chunk's) share of the objective from its sum of token losses (see base.py's docstring): times
    the head's global normaliser, or over the head's target count in this microbatch without one; times the head's
    loss weight."""
    if inputs.weights is not None:
        out = loss_sum * inputs.weights[head]
    else:
        out = loss_sum / targets.num_tokens.clamp(min=1)
    if inputs.loss_weights is not None:
        out = out * inputs.loss_weights[head]
    return out


def stats_row(loss_sum: Tensor, correct: Tensor) -> Tensor:
    """[loss sum, correct, 0] in float64, to add to a head's statistics row."""
    return torch.stack([loss_sum.detach().double(), correct.double(), correct.new_zeros((), dtype=torch.float64)])
