"""Our model config <-> a Hugging Face Llama ``config.json``: what maps exactly, and what is refused.

Export writes every setting the model was trained with (head width, biases, RoPE base and scaling, the
tokenizer's special ids). Import reads a Llama config through transformers' own ``LlamaConfig`` (so missing keys
take transformers' defaults and transformers-4 files with a top-level ``rope_scaling`` / ``rope_theta`` read as
transformers 5 reads them) and accepts only what megatron-core computes identically; anything else raises
``UnsupportedLlama`` naming the key and its value, before any output exists. What decides Llama's function:

    exact:    hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads,
              head_dim (megatron's kv_channels), rms_norm_eps, vocab_size, max_position_embeddings (our seq_length),
              rope_theta (any float), attention_bias == mlp_bias (megatron's add_bias_linear covers both),
              rope_type default | linear (megatron's seq_len_interpolation_factor) |
              llama3 with low_freq_factor 1, high_freq_factor 4, original_max_position_embeddings 8192 (the only
              values megatron-core's llama3 scaling has)
    refused:  model_type other than llama, hidden_act other than silu, attention_bias != mlp_bias, other rope types
              (dynamic, yarn, longrope, ...) or llama3 parameters, partial_rotary_factor != 1,
              tie_word_embeddings=true (unless untied explicitly: our heads' unembedding is untied),
              quantization_config, auto_map naming custom model code
    ignored:  no effect on the function: attention_dropout, initializer_range, use_cache, pretraining_tp (transformers
              5's Llama never reads it; in transformers 4 it only split the same matmuls), token ids, dtype
"""

from __future__ import annotations

from typing import Optional

import torch

from mtp_megatron.config import Config

# megatron-core's llama3 RoPE scaling (RotaryEmbedding._apply_scaling) takes only the factor; these are fixed.
MEGATRON_LLAMA3 = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
SILU_NAMES = ("silu", "swish")  # the same function in transformers' ACT2FN


class UnsupportedLlama(ValueError):
    """A Hugging Face config setting our model cannot compute exactly; the message names key and value."""


# -- export -------------------------------------------------------------------------------------------------------

def llama_problems(cfg: Config) -> list[str]:
    """The fields that keep this model from being a Llama (the only Hugging Face architecture exported)."""
    m = cfg.model
    required = {"normalization": "RMSNorm", "activation": "swiglu", "position_embedding": "rope"}
    return [f"model.{name}={getattr(m, name)!r} (Llama needs {value!r})" for name, value in required.items()
            if getattr(m, name) != value]


def rope_parameters(cfg: Config) -> dict:
    """transformers' ``rope_parameters`` for the RoPE our model computes."""
    m = cfg.model
    params = {"rope_type": m.rope_scaling_type or "default", "rope_theta": float(m.rotary_base)}
    if m.rope_scaling_type is not None:
        params["factor"] = float(m.rope_scaling_factor)
    if m.rope_scaling_type == "llama3":
        params.update(MEGATRON_LLAMA3)
    return params


def llama_config(cfg: Config, vocab_rows: int, dtype: torch.dtype, special_ids: Optional[dict] = None,
                 num_layers: Optional[int] = None, architectures: Optional[list] = None):
    """The ``LlamaConfig`` computing our next-token path: trunk + head 1, ``vocab_rows`` (padded) rows, and the
    tokenizer's ``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` (None where unknown). ``num_layers``: the
    Llama's decoder layers when they are not trunk + 1 (head designs other than transformer: convert/hf.py
    ``llama_layer_count``); ``architectures``: what config.json names (default: nothing)."""
    from transformers import LlamaConfig

    m = cfg.model
    extra = {"architectures": architectures} if architectures else {}
    ids = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None, **(special_ids or {})}
    return LlamaConfig(
        vocab_size=vocab_rows,
        hidden_size=m.hidden_size,
        intermediate_size=m.resolved_ffn_hidden_size(),
        num_hidden_layers=cfg.trunk_num_layers() + 1 if num_layers is None else num_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups or m.num_attention_heads,
        head_dim=m.resolved_head_dim(),
        hidden_act="silu",
        max_position_embeddings=m.seq_length,
        rms_norm_eps=m.norm_epsilon,
        rope_parameters=rope_parameters(cfg),
        tie_word_embeddings=False,
        attention_bias=m.add_bias_linear,
        mlp_bias=m.add_bias_linear,
        dtype=dtype,
        **ids,
        **extra,
    )


# -- import -------------------------------------------------------------------------------------------------------

def parse_llama(hf_config: dict):
    """transformers' ``LlamaConfig`` of a config.json, as ``LlamaForCausalLM.from_pretrained`` would read it."""
    from transformers import LlamaConfig

    if hf_config.get("model_type") != "llama":
        raise UnsupportedLlama(f"config.json: model_type={hf_config.get('model_type')!r}; only Llama folders "
                               "(model_type 'llama') convert")
    try:
        return LlamaConfig.from_dict(hf_config)
    except Exception as error:  # transformers' strict validation raises several types; all mean a bad file
        reason = " ".join(str(error).split())
        raise UnsupportedLlama(f"config.json: transformers cannot read it as a LlamaConfig: {reason}") from error


def _rope_settings(hf_config: dict, llama) -> tuple[float, Optional[str], float]:
    """(theta, our rope_scaling_type, factor) of the folder's RoPE, or ``UnsupportedLlama`` naming the key."""
    params = dict(llama.rope_parameters)
    key = "rope_scaling" if hf_config.get("rope_scaling") else "rope_parameters"  # where the file says it
    kind = params.get("rope_type", "default")
    partial = params.get("partial_rotary_factor", 1.0)
    if partial != 1.0:
        raise UnsupportedLlama(f"config.json: {key}.partial_rotary_factor={partial} cannot be represented: our RoPE "
                               "rotates the whole head (rotary_percent 1)")
    theta = float(params["rope_theta"])
    if kind == "default":
        return theta, None, 1.0
    if kind not in ("linear", "llama3"):
        raise UnsupportedLlama(f"config.json: {key}.rope_type={kind!r} cannot be represented exactly: megatron-core's "
                               "RoPE reproduces rope_type default, linear and llama3 (with its fixed parameters) only")
    factor = float(params["factor"])
    if kind == "llama3":
        for name, value in MEGATRON_LLAMA3.items():
            if params.get(name) != value:
                fixed = ", ".join(f"{n}={v}" for n, v in MEGATRON_LLAMA3.items())
                raise UnsupportedLlama(f"config.json: {key}.{name}={params.get(name)!r} (rope_type llama3) cannot be "
                                       f"represented: megatron-core's llama3 scaling has {fixed} fixed")
    return theta, kind, factor


def refusals(hf_config: dict, llama, untie_embeddings: bool) -> None:
    """Raise ``UnsupportedLlama`` for the first setting of a Llama config that our model cannot compute."""
    if llama.hidden_act not in SILU_NAMES:
        raise UnsupportedLlama(f"config.json: hidden_act={llama.hidden_act!r} cannot be represented: our Llama MLP "
                               "is SwiGLU (hidden_act 'silu')")
    if bool(llama.attention_bias) != bool(llama.mlp_bias):
        raise UnsupportedLlama(
            f"config.json: attention_bias={str(llama.attention_bias).lower()} with mlp_bias="
            f"{str(llama.mlp_bias).lower()} cannot be represented: megatron's add_bias_linear puts biases on the "
            "attention and MLP projections together (both true or both false)")
    if llama.tie_word_embeddings and not untie_embeddings:
        raise UnsupportedLlama(
            "config.json: tie_word_embeddings=true: this trainer's heads use an untied unembedding. Fix: pass "
            "--untie-embeddings to import it with lm_head = a copy of the embedding (then trained separately)")
    if hf_config.get("quantization_config"):
        method = hf_config["quantization_config"].get("quant_method", "?")
        raise UnsupportedLlama(f"config.json: quantization_config (quant_method={method!r}) is set: quantized weights "
                               "do not convert. Fix: convert the unquantized model")
    custom = sorted(k for k in (hf_config.get("auto_map") or {}) if k.startswith("AutoModel"))
    if custom:
        raise UnsupportedLlama(f"config.json: auto_map={custom} names custom model code, which may compute something "
                               "else than transformers' Llama; convert a folder without it")


def config_for_llama(hf_config: dict, n_heads: int, untie_embeddings: bool = False) -> Config:
    """Our config for a Llama ``config.json`` (refusing what it cannot represent) with ``n_heads`` heads."""
    from mtp_megatron.config import config_from_dict, config_to_dict

    llama = parse_llama(hf_config)
    refusals(hf_config, llama, untie_embeddings)
    theta, scaling, factor = _rope_settings(hf_config, llama)
    cfg = Config()
    m = cfg.model
    m.hidden_size, m.num_attention_heads = llama.hidden_size, llama.num_attention_heads
    m.num_query_groups = llama.num_key_value_heads or llama.num_attention_heads
    if llama.head_dim is not None and llama.head_dim != llama.hidden_size // llama.num_attention_heads:
        m.head_dim = llama.head_dim
    m.ffn_hidden_size, m.vocab_size = llama.intermediate_size, llama.vocab_size
    m.num_layers, m.seq_length = llama.num_hidden_layers, llama.max_position_embeddings
    m.norm_epsilon = llama.rms_norm_eps
    m.rotary_base, m.rope_scaling_type, m.rope_scaling_factor = theta, scaling, factor
    m.add_bias_linear = bool(llama.attention_bias)
    cfg.mtp.n_heads = n_heads
    cfg.mtp.match_params = False  # the Llama's layers are the trunk plus head 1; extra heads come on top
    dtype = hf_config.get("dtype") or hf_config.get("torch_dtype")
    cfg.train.precision = {"bfloat16": "bf16", "float16": "fp16"}.get(dtype, "fp32")
    return config_from_dict(config_to_dict(cfg), source="config.json")
