"""Microbatches for this data-parallel rank, in a deterministic order that resumes from consumed samples.

The order is Megatron's pretraining sampler: global sample indices are read in consecutive blocks of
``micro_batch_size * dp``; DP rank r takes the r-th ``micro_batch_size`` slice of each block. The position is
the number of samples consumed so far by the whole job, so the same global batches are read for any DP size.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Sampler

BATCH_KEYS = ("tokens", "labels", "loss_mask", "attention_mask", "position_ids")


class PretrainingSampler(Sampler):
    """Index lists of one microbatch for one DP rank, starting after ``consumed_samples``."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int):
        if consumed_samples >= total_samples:
            raise ValueError(f"no samples left: consumed {consumed_samples} of {total_samples}")
        self.total_samples, self.consumed_samples = total_samples, consumed_samples
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size

    def __len__(self) -> int:
        return (self.total_samples - self.consumed_samples) // (self.micro_batch_size * self.dp_size)

    def __iter__(self) -> Iterator[list[int]]:
        block = self.micro_batch_size * self.dp_size
        start = self.dp_rank * self.micro_batch_size
        for first in range(self.consumed_samples, self.total_samples - block + 1, block):
            yield list(range(first + start, first + start + self.micro_batch_size))


def microbatches(dataset, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 device: torch.device, num_workers: int = 0) -> Iterator[dict]:
    """Endless-until-exhausted iterator of batch dicts on ``device`` (the schedules call ``next`` on it)."""
    sampler = PretrainingSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=device.type == "cuda")
    for batch in loader:
        yield {key: batch[key].to(device, non_blocking=True) for key in BATCH_KEYS if key in batch}
