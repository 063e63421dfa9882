"""The MTP model: megatron-core's GPTModel as the trunk, with the MTP heads on the last pipeline stage.

The trunk is a ``GPTModel`` built with ``post_process=False`` on every stage, so embedding, rotary cache,
pipeline input handling and the trunk's checkpoint keys are exactly megatron-core's. The last stage adds
``mtp_heads`` (see heads/base.py), which replace GPTModel's final norm and output layer.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from mtp_megatron.model.heads import HeadInputs, build_heads
from mtp_megatron.model.targets import shift_targets
from mtp_megatron.model.initialization import seeded_init


class MTPGPTModel(GPTModel):
    """One pipeline stage of the trunk, plus the n heads when ``has_heads``.

    Forward returns the trunk output on non-last stages, and ``(loss, stats)`` on the last stage
    (see ``MTPHeads.forward``).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_spec: ModuleSpec,
        norm_spec: ModuleSpec,
        vocab_size: int,
        max_sequence_length: int,
        n_heads: int,
        sequential_backward: bool,
        pre_process: bool,
        post_process: bool,
        position_embedding_type: str = "rope",
        rotary_base: float = 10000.0,
        rope_scaling_type: Optional[str] = None,
        rope_scaling_factor: float = 1.0,
        document_eod: Optional[int] = None,
        init_seed: Optional[int] = None,
        pg_collection=None,
        loss_chunk_size: int = 0,
        head_type: str = "transformer",
        cp_rank: int = 1,
        cp_balance_coef: float = 0.0,
    ):
        # The embedding (first stage) initialises from a stream of its own; each layer seeds itself (specs.py).
        with seeded_init(init_seed, "embedding") if init_seed is not None else contextlib.nullcontext():
            super().__init__(
                config=config,
                transformer_layer_spec=layer_spec,
                vocab_size=vocab_size,
                max_sequence_length=max_sequence_length,
                pre_process=pre_process,
                post_process=False,  # GPTModel's own norm/output layer are replaced by the heads
                share_embeddings_and_output_weights=False,  # untied, as in the paper
                position_embedding_type=position_embedding_type,
                rotary_base=rotary_base,
                # RoPE scaling (config/schema.py ModelConfig.rope_scaling_type): megatron-core's llama3 scaling,
                # or linear position interpolation.
                rope_scaling=rope_scaling_type == "llama3",
                rope_scaling_factor=rope_scaling_factor,
                seq_len_interpolation_factor=rope_scaling_factor if rope_scaling_type == "linear" else None,
                pg_collection=pg_collection,
            )
        self.has_heads = post_process
        # Set when documents are masked from each other: the heads then skip targets in a later document.
        self.document_eod = document_eod
        if post_process:
            self.mtp_heads = build_heads(
                head_type,
                config,
                layer_spec,
                norm_spec,
                n_heads=n_heads,
                vocab_size=vocab_size,
                trunk_num_layers=config.num_layers,
                sequential_backward=sequential_backward,
                init_seed=init_seed,
                pg_collection=self.pg_collection,
                loss_chunk_size=loss_chunk_size,
                cp_rank=cp_rank,
                cp_balance_coef=cp_balance_coef,
            )

    def forward(
        self,
        input_ids: Optional[Tensor],
        position_ids: Optional[Tensor],
        attention_mask: Optional[Tensor],
        labels: Optional[Tensor] = None,
        loss_mask: Optional[Tensor] = None,
        head_weights: Optional[Tensor] = None,
        loss_weights: Optional[Tensor] = None,
    ):
        decoder_input, rotary_pos_emb, *_ = self._preprocess(input_ids=input_ids, position_ids=position_ids)
        hidden = self.decoder(
            hidden_states=decoder_input, attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb
        )
        if not self.has_heads:
            return hidden
        head_labels, head_masks = shift_targets(labels, loss_mask, self.mtp_heads.n_heads, self.document_eod)
        inputs = HeadInputs(head_labels, head_masks, attention_mask, rotary_pos_emb, head_weights, loss_weights)
        return self.mtp_heads(hidden, inputs)

    def head_logits(self, input_ids: Tensor, position_ids: Tensor) -> Tensor:
        """Every head's vocab-parallel logits [n, s, b, V/tp] for a single-stage model (pp=1): evaluation, decoding
        and conversion checks; training never materialises more than one head's logits (see heads/base.py)."""
        hidden, inputs = self.trunk_output(input_ids, position_ids)
        return torch.stack([self.mtp_heads.logits(k, hidden, inputs) for k in range(self.mtp_heads.n_heads)])

    def trunk_output(self, input_ids: Tensor, position_ids: Tensor) -> tuple[Tensor, HeadInputs]:
        """(the trunk's output [s, b, h], the heads' inputs) of a single-stage model under causal attention, for
        ``mtp_heads.logits(k, ...)`` head by head (evaluation holds one head's logits at a time)."""
        decoder_input, rotary_pos_emb, *_ = self._preprocess(input_ids=input_ids, position_ids=position_ids)
        hidden = self.decoder(hidden_states=decoder_input, attention_mask=None, rotary_pos_emb=rotary_pos_emb)
        return hidden, HeadInputs([], [], None, rotary_pos_emb)
