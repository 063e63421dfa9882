"""From our config to this pipeline stage's bare model (the engines wrap it for mixed precision and data
parallelism: engines/)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import scaled_init_method_normal

from mtp_megatron.config import Config
from mtp_megatron.distributed.parallel import ParallelEnv
from mtp_megatron.distributed.pipeline_split import megatron_split_arguments
from mtp_megatron.model.gpt import MTPGPTModel
from mtp_megatron.model.specs import layer_and_norm_specs

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(cfg: Config, device: torch.device) -> str:
    """'auto' is bf16 on GPU and fp32 on CPU."""
    if cfg.train.precision != "auto":
        return cfg.train.precision
    return "bf16" if device.type == "cuda" else "fp32"


def transformer_config(cfg: Config, device: torch.device) -> TransformerConfig:
    """The megatron-core TransformerConfig of the trunk (the heads reuse it)."""
    m, precision = cfg.model, resolve_precision(cfg, device)
    recompute = {
        "none": {},
        "selective": dict(recompute_granularity="selective"),
        "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    }[cfg.train.recompute]
    kwargs = dict(
        num_layers=cfg.trunk_num_layers(),
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.head_dim,  # None: megatron's hidden_size / num_attention_heads
        ffn_hidden_size=m.resolved_ffn_hidden_size(),
        normalization=m.normalization,
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=m.activation == "swiglu",
        activation_func=F.silu if m.activation == "swiglu" else F.gelu,
        add_bias_linear=m.add_bias_linear,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        init_method_std=m.init_method_std,
        tensor_model_parallel_size=cfg.parallel.tp,
        pipeline_model_parallel_size=cfg.parallel.pp,
        # parallel.layers_per_stage: an uneven split as megatron-core's first/last stage counts (none if even).
        **megatron_split_arguments(cfg),
        sequence_parallel=cfg.parallel.sequence_parallel,
        params_dtype=_DTYPES[precision],
        pipeline_dtype=_DTYPES[precision],
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        **recompute,
    )
    if device.type == "cpu":
        from mtp_megatron.distributed import cpu_compat

        kwargs.update(cpu_compat.transformer_config_overrides())
    elif device.type == "cuda":
        from mtp_megatron.model.fusions import cuda_fusions

        # megatron-core's fused kernels where installed and valid (train.fused_kernels=false: none).
        kwargs.update(cuda_fusions(cfg).kwargs)
    # Every weight is initialised as its full master tensor on the CPU, then sliced for this TP rank, on GPU too:
    # with per-layer streams (model/initialization.py) the same seed then gives the same model at every layout.
    kwargs["use_cpu_initialization"] = True
    config = TransformerConfig(**kwargs)
    # Initialise as the plain GPT of the same depth would: the residual-output init is scaled by the total
    # number of layers the signal passes through (trunk + one head), not by the trunk alone.
    config.output_layer_init_method = scaled_init_method_normal(
        m.init_method_std, cfg.trunk_num_layers() + 1, multiplier=2.0
    )
    return config


def build_model(cfg: Config, env: ParallelEnv, document_eod: Optional[int] = None) -> MTPGPTModel:
    """This stage's bare model (no DDP), on the run's device and in the run's precision. ``document_eod``: see
    ``construct_model``."""
    model = construct_model(cfg, transformer_config(cfg, env.device), env.groups, env.is_first_stage,
                            env.is_last_stage, cuda=env.device.type == "cuda", document_eod=document_eod)
    return model.to(env.device)


def construct_model(cfg: Config, config: TransformerConfig, groups, first_stage: bool,
                    last_stage: bool, cuda: bool = False, document_eod: Optional[int] = None) -> MTPGPTModel:
    """The stage's ``MTPGPTModel`` where torch creates tensors now (the planner builds it on the meta device).
    ``cuda``: it will run on CUDA, where ``model.transformer_impl=auto`` picks Transformer Engine if installed; a
    CPU build always has the local layers.

    ``document_eod``: the tokenizer's end-of-document id, required with ``data.reset_attention_mask`` (the heads
    then skip targets in a later document) and unused without. The caller reads it with
    ``mtp_megatron.data.tokenizer.document_eod``: the model package opens no tokenizer.
    """
    if cfg.data.reset_attention_mask and document_eod is None:
        raise ValueError("data.reset_attention_mask needs document_eod, the tokenizer's end-of-document id: pass "
                         "document_eod=mtp_megatron.data.tokenizer.document_eod(cfg.tokenizer, cfg.data)")
    if not cfg.data.reset_attention_mask:
        document_eod = None  # without document masks every target counts, whatever the caller passed
    layer_spec, norm_spec = layer_and_norm_specs(cfg.model, explicit_attention_mask=cfg.data.reset_attention_mask,
                                                 init_seed=cfg.train.seed, cuda=cuda)
    return MTPGPTModel(
        config,
        layer_spec,
        norm_spec,
        vocab_size=cfg.model.padded_vocab_size(cfg.parallel.tp),
        max_sequence_length=cfg.model.seq_length,
        n_heads=cfg.mtp.n_heads,
        sequential_backward=cfg.mtp.sequential_backward,
        loss_chunk_size=cfg.mtp.loss_chunk_size,
        head_type=cfg.mtp.head_type,
        cp_rank=cfg.mtp.cp_rank,
        cp_balance_coef=cfg.mtp.cp_balance_coef,
        pre_process=first_stage,
        post_process=last_stage,
        position_embedding_type=cfg.model.position_embedding,
        rotary_base=cfg.model.rotary_base,
        rope_scaling_type=cfg.model.rope_scaling_type,
        rope_scaling_factor=cfg.model.rope_scaling_factor,
        document_eod=document_eod,
        init_seed=cfg.train.seed,
        pg_collection=groups,
    )
