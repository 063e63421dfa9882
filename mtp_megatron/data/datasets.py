"""Training and validation datasets: megatron-core's ``GPTDataset`` through its ``BlendedMegatronDatasetBuilder``.

``data.paths`` names Megatron indexed datasets (optionally weighted, as Megatron's blends); each is split into
train/valid/test documents by ``data.split``, and the sample, shuffle and blend indices are cached under
``data.cache_dir``. With ``data.synthetic`` the builder serves megatron-core's mock GPT data, which exercises
the same sample format, split logic and sampler.

MTP targets: every sample holds ``seq_length`` input tokens and their next-token labels, exactly as for a plain
GPT (Megatron reads ``seq_length + 1`` tokens). Head i's target at position t is token t+i = ``labels[t+i-1]``
of the same sample; the last i-1 positions of a sample have no target for head i and are masked, rather than
reading n-1 extra tokens per sample, so n=1 and n=4 runs see identical samples and head 1 is the plain GPT's
next-token objective. With ``data.reset_attention_mask`` a head also skips targets beyond the end of the
current document (see ``mtp_megatron.model.targets.shift_targets``).
"""

from __future__ import annotations

import os
from typing import Optional

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

from mtp_megatron.config import Config
from mtp_megatron.data.index_file import inspect_indexed_dataset
from mtp_megatron.data.inputs import parse_blend
from mtp_megatron.data.loader import reads_data
from mtp_megatron.data.tokenizer import Tokenizer, build_tokenizer
from mtp_megatron.distributed.parallel import ParallelEnv


def gpt_dataset_config(cfg: Config, tokenizer: Tokenizer) -> GPTDatasetConfig:
    """megatron-core's dataset config for ``cfg`` (mock data when ``data.paths`` is empty)."""
    data = cfg.data
    return GPTDatasetConfig(
        random_seed=cfg.train.seed,
        sequence_length=cfg.model.seq_length,
        blend=_weighted_blend(data.paths) if data.paths else None,
        split=data.split,
        path_to_cache=(data.cache_dir or os.path.join(cfg.run.dir, "data_cache")) if data.paths else None,
        tokenizer=tokenizer,
        reset_position_ids=data.reset_position_ids,
        reset_attention_mask=data.reset_attention_mask,
        eod_mask_loss=data.eod_mask_loss,
        # Without document resets the mask is the plain causal one, which attention builds itself.
        create_attention_mask=data.reset_attention_mask,
        mmap_bin_files=True,
    )


def _weighted_blend(paths: list[str]) -> tuple[list[str], Optional[list[float]]]:
    """The blend with weights: unweighted prefixes are weighted by their token counts.

    megatron-core blends unweighted prefixes by one epoch of each and caps every split at that epoch, so a run
    longer than one pass over the data would run dry mid-training; token-count weights give the same mixture
    and let each dataset repeat as weighted blends do.
    """
    prefixes, weights = parse_blend(paths)
    if weights is None and len(prefixes) > 1:
        weights = [float(inspect_indexed_dataset(prefix).num_tokens) for prefix in prefixes]
    return prefixes, weights


def build_datasets(cfg: Config, env: ParallelEnv, num_train_samples: Optional[int] = None):
    """(train, valid) datasets for this rank; None where the rank reads no data (``loader.reads_data``).

    Sizes: ``train.iters`` global batches of training samples (unless ``num_train_samples`` is given) and
    ``train.eval_iters`` global batches of validation samples, which every evaluation re-reads, so successive
    validation losses are measured on the same tokens. Collective: every rank must call it (the builder lets
    rank 0 build and cache the indices first).
    """
    batch = cfg.train.global_batch_size
    if num_train_samples is None:
        num_train_samples = cfg.train.iters * batch
    num_valid_samples = cfg.train.eval_iters * batch if cfg.train.eval_interval else 0
    sizes = [num_train_samples, num_valid_samples, 0]
    config = gpt_dataset_config(cfg, build_tokenizer(cfg.tokenizer.type, cfg.tokenizer.model))
    # Parts nobody reads are not built. The document boundaries stay those of data.split; and megatron-core
    # would loop forever building 0 samples from a part that holds no documents (e.g. the test part of a
    # small dataset).
    config.split_matrix = [bounds if size else None for bounds, size in zip(config.split_matrix, sizes)]
    train, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset if cfg.data.paths else MockGPTDataset, sizes, lambda: reads_data(cfg, env), config
    ).build()
    for dataset in (train, valid):
        _without_mask_cache(dataset)
    return train, valid


def _without_mask_cache(dataset) -> None:
    """Switch off GPTDataset's cache of the loss mask (megatron-core 0.16.1), which stores the first sample's mask
    after zeroing that sample's padding positions in place: every later sample read by the same process then
    also loses those positions, and which sample comes first depends on where a (resumed) loader starts and on
    how samples fall to DataLoader workers. Recomputing the masks per sample is cheap."""
    if isinstance(dataset, GPTDataset):
        dataset.masks_and_position_ids_are_cacheable = False
    for child in getattr(dataset, "datasets", None) or []:
        _without_mask_cache(child)
