"""Parallel transformer heads (``mtp.head_type=transformer``, Gloeckle et al. 2024): head i is one transformer layer
on the trunk output z, then the shared final norm and unembedding. Head 1 is a plain GPT's last layer."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from megatron.core import tensor_parallel
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from mtp_megatron.model.heads.base import MTPHeads
from mtp_megatron.model.heads.inputs import HeadInputs


class TransformerHeads(MTPHeads):
    head_type = "transformer"

    def build_layers(self, layer_spec: ModuleSpec, trunk_num_layers: int, pg_collection) -> torch.nn.ModuleList:
        # TransformerLayer adds the pipeline offset to layer_number itself; the heads are numbered after the
        # whole trunk so that no head shares a trunk layer's number (inference KV-cache keys use it).
        offset = get_transformer_layer_offset(self.config, None, torch.distributed.get_rank(pg_collection.pp))
        return torch.nn.ModuleList(
            build_module(layer_spec, config=self.config, layer_number=trunk_num_layers + k + 1 - offset,
                         pg_collection=pg_collection)
            for k in range(self.n_heads)
        )

    def apply_layer(self, head: int, hidden: Tensor, inputs: HeadInputs) -> Tensor:
        # Under sequence parallelism each TP rank holds its own slice of the sequence, so dropout must draw from
        # the rank's own stream, as TransformerBlock arranges for the trunk's layers (the heads run outside it).
        rng = tensor_parallel.get_cuda_rng_tracker().fork() if self.config.sequence_parallel else contextlib.nullcontext()
        with rng:
            out, _ = self.layers[head](
                hidden, attention_mask=inputs.attention_mask, rotary_pos_emb=inputs.rotary_pos_emb
            )
        return out
