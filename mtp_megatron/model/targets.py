"""What each MTP head is trained to predict, and how many targets each head has.

Head i (1-based) at position t predicts token t+i of the same sample. A sample holds ``seq_length`` tokens and
their next-token ``labels`` exactly as for a plain GPT, so head i's targets are the labels shifted by i-1, and
the last i-1 positions of a sample, which have no such token, are masked.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def shift_targets(labels: Tensor, loss_mask: Tensor, n_heads: int,
                  document_eod: Optional[int] = None) -> tuple[list[Tensor], list[Tensor]]:
    """Targets of every head from the next-token ``labels`` ([b, s], labels[t] = token t+1).

    Head i's target at position t is token t+i = labels[t+i-1], weighted by loss_mask[t+i-1] (the mask belongs
    to the target token). The last i-1 positions have no target inside the sample and are masked out. With
    ``document_eod`` (documents masked from each other), head i also skips targets that lie in a later document
    than token t+1, i.e. when one of the tokens t+1..t+i-1 it would predict across is that EOD; head 1 is
    unchanged, as in Megatron. (Context parallelism would need megatron's CP-aware ``roll_tensor``; the config
    refuses CP.)
    """
    all_labels, all_masks = [labels], [loss_mask]
    if document_eod is not None:
        # eods_before[:, j] = EODs among labels[:, :j]; EODs in labels[t..t+k-1] = eods_before[t+k] - eods_before[t].
        is_eod = (labels == document_eod).to(torch.int32)
        eods_before = torch.nn.functional.pad(is_eod.cumsum(dim=1), (1, 0))
    for k in range(1, n_heads):
        shifted_labels = torch.zeros_like(labels)
        shifted_mask = torch.zeros_like(loss_mask)
        shifted_labels[:, :-k] = labels[:, k:]
        shifted_mask[:, :-k] = loss_mask[:, k:]
        if document_eod is not None:
            crosses = (eods_before[:, k:-1] - eods_before[:, : -k - 1]) > 0
            shifted_mask[:, :-k] = shifted_mask[:, :-k].masked_fill(crosses, 0.0)
        all_labels.append(shifted_labels)
        all_masks.append(shifted_mask)
    return all_labels, all_masks


def head_target_counts(labels: Tensor, loss_mask: Tensor, n_heads: int,
                       document_eod: Optional[int] = None) -> Tensor:
    """[n] float64: the number of target tokens of each head in this microbatch (what its loss averages over)."""
    _, masks = shift_targets(labels, loss_mask, n_heads, document_eod)
    return torch.stack([mask.sum(dtype=torch.float64) for mask in masks])
