"""Training and validation datasets through megatron-core's BlendedMegatronDatasetBuilder.

With ``data.paths`` empty the builder serves megatron-core's mock GPT data (synthetic token sequences), which
exercises the same sample format, split logic and sampler as real Megatron .bin/.idx data.

Every sample holds ``seq_length`` input tokens and their next-token labels. Head i's targets are the labels
shifted by i-1 inside the model; the last i-1 positions of a sample have no target for head i and are masked
(``mtp_megatron.model.heads.shift_targets``).
"""

from __future__ import annotations

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, MockGPTDataset
from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer

from mtp_megatron.config import Config


def build_datasets(cfg: Config, num_train_samples: int, num_valid_samples: int):
    """(train, valid) datasets. Must be called on every rank (the builder synchronises index building)."""
    if cfg.data.paths:
        raise NotImplementedError("Real data prefixes arrive with the data pipeline; leave data.paths empty.")
    # Token ids 0..vocab_size-2 and EOD = vocab_size-1, inside the model's (padded) vocabulary.
    tokenizer = NullTokenizer(cfg.model.vocab_size - 1)
    dataset_config = GPTDatasetConfig(
        random_seed=cfg.train.seed,
        sequence_length=cfg.model.seq_length,
        blend=None,
        split=cfg.data.split,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=True,
    )
    train, valid, _ = BlendedMegatronDatasetBuilder(
        MockGPTDataset, [num_train_samples, num_valid_samples, 0], lambda: True, dataset_config
    ).build()
    return train, valid
