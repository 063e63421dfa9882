"""Microbatches for this rank: read on tensor-parallel rank 0, broadcast to the other TP ranks.

Order: Megatron's pretraining sampler. Global sample indices are read in consecutive blocks of
``micro_batch_size * dp``; DP rank r takes the r-th ``micro_batch_size`` slice of each block. The position is
``consumed_samples``, the number of samples the whole job has read, which the training state carries: a run
resumed at ``consumed_samples`` reads exactly the batches the uninterrupted run read from there on.

Which stage needs what (as Megatron-LM's ``get_batch``): the first pipeline stage embeds ``tokens`` (and
``position_ids``), the last stage's heads need ``labels`` and ``loss_mask``, and every stage needs the
``attention_mask`` when documents are masked from each other (``data.reset_attention_mask``); otherwise middle
stages read nothing. Only TP rank 0 of a stage that needs data opens a dataset; its TP peers receive the same
tensors, so all TP ranks of a stage compute on identical inputs.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler

from mtp_megatron.config import Config
from mtp_megatron.distributed.parallel import ParallelEnv

# key -> (dtype, shape as a function of (micro_batch_size, seq_length)), for receivers to allocate.
BATCH_LAYOUT = {
    "tokens": (torch.int64, lambda b, s: (b, s)),
    "position_ids": (torch.int64, lambda b, s: (b, s)),
    "labels": (torch.int64, lambda b, s: (b, s)),
    "loss_mask": (torch.float32, lambda b, s: (b, s)),
    "attention_mask": (torch.bool, lambda b, s: (b, 1, s, s)),
}


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


def stage_batch_keys(cfg: Config, env: ParallelEnv) -> tuple[str, ...]:
    """The batch entries this pipeline stage consumes (empty for a middle stage without document masks)."""
    keys = []
    if env.is_first_stage:
        keys += ["tokens", "position_ids"]
    if env.is_last_stage:
        keys += ["labels", "loss_mask"]
    if cfg.data.reset_attention_mask:
        keys.append("attention_mask")
    return tuple(keys)


def reads_data(cfg: Config, env: ParallelEnv) -> bool:
    """Whether this rank opens the datasets: TP rank 0 of every stage that consumes a batch."""
    return env.tp_rank == 0 and bool(stage_batch_keys(cfg, env))


def microbatches(dataset, consumed_samples: int, cfg: Config, env: ParallelEnv) -> Optional[Iterator[dict]]:
    """This rank's iterator of batch dicts on ``env.device`` (the schedules call ``next`` on it), or None for a
    stage that consumes nothing. ``dataset`` is only read where ``reads_data`` holds (None elsewhere)."""
    keys = stage_batch_keys(cfg, env)
    if not keys:
        return None
    local = None
    if env.tp_rank == 0:
        local = _load(dataset, consumed_samples, cfg.train.micro_batch_size, env, cfg.data.num_workers)
    if cfg.parallel.tp == 1:
        return ({key: batch[key] for key in keys} for batch in local)
    return _broadcast_batches(local, keys, cfg.train.micro_batch_size, cfg.model.seq_length, env)


def _load(dataset, consumed_samples: int, micro_batch_size: int, env: ParallelEnv, num_workers: int):
    sampler = PretrainingSampler(len(dataset), consumed_samples, micro_batch_size, env.dp_rank, env.dims.dp)
    # Its own generator: each DataLoader iterator draws a seed from the one it is given, and from torch's default
    # generator otherwise, which would shift the dropout stream of a resumed run (its iterator starts mid-run)
    # against the uninterrupted one. The samples themselves are deterministic (megatron-core's indices).
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                        pin_memory=env.device.type == "cuda", persistent_workers=False,
                        generator=torch.Generator().manual_seed(0))
    for batch in loader:
        yield {key: value.to(env.device, non_blocking=True) for key, value in batch.items()}


def _broadcast_batches(local: Optional[Iterator[dict]], keys, micro_batch_size: int, seq_length: int,
                       env: ParallelEnv) -> Iterator[dict]:
    """TP rank 0 sends each batch of ``local`` to its TP group; the others receive into fresh tensors."""
    group = env.groups.tp
    source = dist.get_global_rank(group, 0)
    while True:
        # A flag first, so the receivers learn when the sender's data ends instead of waiting forever.
        batch = next(local, None) if local is not None else None
        more = torch.tensor([batch is not None], dtype=torch.int64, device=env.device)
        dist.broadcast(more, source, group=group)
        if not more.item():
            return
        out = {}
        for key in keys:
            dtype, shape = BATCH_LAYOUT[key]
            if batch is not None:
                tensor = batch[key].to(dtype).contiguous()
            else:
                tensor = torch.empty(shape(micro_batch_size, seq_length), dtype=dtype, device=env.device)
            # gloo has no bool collectives: masks travel as bytes.
            wire = tensor.to(torch.uint8) if dtype == torch.bool else tensor
            dist.broadcast(wire, source, group=group)
            out[key] = wire.to(torch.bool) if dtype == torch.bool else wire
        yield out
