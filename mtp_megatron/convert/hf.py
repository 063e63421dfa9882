"""Our dense state dict <-> a Hugging Face folder: a standard ``LlamaForCausalLM`` plus the extra MTP heads.

The Llama model is the trunk with head 1 as its last decoder layer, the shared final norm as ``model.norm`` and
the unembedding as ``lm_head``: exactly our next-token path, so ``transformers`` loads it with no custom code and
gives our head-1 logits. The vocabulary keeps our padded rows (``vocab_size`` = the padded size), so nothing is
lost on the way back. Heads 2..n go to ``mtp_heads.safetensors`` under Llama's layer names:

    ours: mtp_heads.layers.{k}.<megatron layer keys>      (k = 1 .. n-1)
    file: heads.{k}.<LlamaDecoderLayer keys>               (input_layernorm.weight, self_attn.{q,k,v,o}_proj.weight,
                                                            post_attention_layernorm.weight,
                                                            mlp.{gate,up,down}_proj.weight)

and ``mtp_heads.json`` records n, the trunk depth and our full config. ``mtp_megatron.convert.hf_heads`` runs
all n heads on top of the ``transformers`` model. Megatron's fused tensors are split the Llama way: ``linear_qkv``
holds, per key/value group, that group's query heads, then its key head, then its value head; ``linear_fc1`` is
[gate; up]. Both use rotate-half rotary embeddings, so no permutation is needed (Meta's original layout needs one:
convert/meta.py).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import torch

from mtp_megatron.config import Config, config_from_dict, config_to_dict

HEADS_FILE = "mtp_heads.safetensors"
HEADS_CONFIG = "mtp_heads.json"
WEIGHTS_INDEX = "model.safetensors.index.json"


def llama_problems(cfg: Config) -> list[str]:
    """The fields that keep this model from being a Llama (the only Hugging Face architecture exported)."""
    m = cfg.model
    required = {"normalization": "RMSNorm", "activation": "swiglu", "position_embedding": "rope",
                "add_bias_linear": False}
    return [f"model.{name}={getattr(m, name)!r} (Llama needs {value!r})" for name, value in required.items()
            if getattr(m, name) != value]


def llama_config(cfg: Config, vocab_rows: int, dtype: torch.dtype):
    from transformers import LlamaConfig

    m = cfg.model
    return LlamaConfig(
        vocab_size=vocab_rows,
        hidden_size=m.hidden_size,
        intermediate_size=m.resolved_ffn_hidden_size(),
        num_hidden_layers=cfg.trunk_num_layers() + 1,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups or m.num_attention_heads,
        max_position_embeddings=m.seq_length,
        rms_norm_eps=m.norm_epsilon,
        rope_parameters={"rope_type": "default", "rope_theta": float(m.rotary_base)},
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        dtype=dtype,
    )


# -- one transformer layer ----------------------------------------------------------------------------------------

def _qkv_split(cfg: Config, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    m = cfg.model
    heads, groups = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    d = m.hidden_size // heads
    per_group = qkv.view(groups, (heads // groups + 2) * d, m.hidden_size)
    q, k, v = per_group.split([heads // groups * d, d, d], dim=1)
    return (q.reshape(heads * d, -1), k.reshape(groups * d, -1), v.reshape(groups * d, -1))


def _qkv_merge(cfg: Config, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    m = cfg.model
    heads, groups = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    d = m.hidden_size // heads
    grouped = [q.reshape(groups, heads // groups * d, -1), k.reshape(groups, d, -1), v.reshape(groups, d, -1)]
    return torch.cat(grouped, dim=1).reshape((heads + 2 * groups) * d, -1)


def layer_to_llama(cfg: Config, ours: dict, prefix: str) -> dict:
    """One of our layers (keys under ``prefix``) as a ``LlamaDecoderLayer``'s state dict."""
    q, k, v = _qkv_split(cfg, ours[f"{prefix}self_attention.linear_qkv.weight"])
    gate, up = ours[f"{prefix}mlp.linear_fc1.weight"].chunk(2, dim=0)
    return {
        "input_layernorm.weight": ours[f"{prefix}input_layernorm.weight"],
        "self_attn.q_proj.weight": q, "self_attn.k_proj.weight": k, "self_attn.v_proj.weight": v,
        "self_attn.o_proj.weight": ours[f"{prefix}self_attention.linear_proj.weight"],
        "post_attention_layernorm.weight": ours[f"{prefix}pre_mlp_layernorm.weight"],
        "mlp.gate_proj.weight": gate, "mlp.up_proj.weight": up,
        "mlp.down_proj.weight": ours[f"{prefix}mlp.linear_fc2.weight"],
    }


def layer_from_llama(cfg: Config, llama: dict, prefix: str) -> dict:
    """A ``LlamaDecoderLayer``'s tensors (keys under ``prefix``) under our layer's names (no prefix)."""
    def get(name: str) -> torch.Tensor:
        key = prefix + name
        if key not in llama:
            raise KeyError(f"{key} is missing")
        return llama[key]

    return {
        "input_layernorm.weight": get("input_layernorm.weight"),
        "self_attention.linear_qkv.weight": _qkv_merge(cfg, get("self_attn.q_proj.weight"),
                                                       get("self_attn.k_proj.weight"), get("self_attn.v_proj.weight")),
        "self_attention.linear_proj.weight": get("self_attn.o_proj.weight"),
        "pre_mlp_layernorm.weight": get("post_attention_layernorm.weight"),
        "mlp.linear_fc1.weight": torch.cat([get("mlp.gate_proj.weight"), get("mlp.up_proj.weight")]),
        "mlp.linear_fc2.weight": get("mlp.down_proj.weight"),
    }


def progress(items, what: str):
    """A progress bar on a terminal (large models take minutes), nothing in logs."""
    from tqdm.auto import tqdm

    return tqdm(items, desc=f"[convert] {what}", disable=None, leave=False)


def _prefixed(prefix: str, tensors: dict) -> dict:
    return {prefix + key: value for key, value in tensors.items()}


# -- whole model --------------------------------------------------------------------------------------------------

# Our tensors outside the transformer layers -> the Llama's.
TOP_LEVEL = {"embedding.word_embeddings.weight": "model.embed_tokens.weight",
             "mtp_heads.final_norm.weight": "model.norm.weight",
             "mtp_heads.output_layer.weight": "lm_head.weight"}


def to_llama(cfg: Config, dense: dict) -> tuple[dict, dict]:
    """(LlamaForCausalLM state dict, extra heads' state dict) of our dense state dict."""
    trunk = cfg.trunk_num_layers()
    llama = {theirs: dense[ours] for ours, theirs in TOP_LEVEL.items()}
    for i in progress(range(trunk), "layers to Llama"):
        llama.update(_prefixed(f"model.layers.{i}.", layer_to_llama(cfg, dense, f"decoder.layers.{i}.")))
    llama.update(_prefixed(f"model.layers.{trunk}.", layer_to_llama(cfg, dense, "mtp_heads.layers.0.")))
    heads = {}
    for k in range(1, cfg.mtp.n_heads):
        heads.update(_prefixed(f"heads.{k}.", layer_to_llama(cfg, dense, f"mtp_heads.layers.{k}.")))
    # Own storage for each: q/k/v and gate/up are views into one fused tensor, which safetensors refuses.
    return {k: v.clone() for k, v in llama.items()}, {k: v.clone() for k, v in heads.items()}


def from_llama(cfg: Config, llama: dict, heads: Optional[dict]) -> dict:
    """Our dense state dict for ``cfg`` from a Llama state dict and (optionally) extra heads. Heads that the
    folder does not have start as copies of head 1, the last Llama layer (how the paper fine-tunes an existing
    model into n heads)."""
    trunk = cfg.trunk_num_layers()
    missing = [theirs for theirs in TOP_LEVEL.values() if theirs not in llama]
    if missing:
        raise KeyError(f"{', '.join(missing)} missing from the Hugging Face weights")
    dense = {ours: llama[theirs] for ours, theirs in TOP_LEVEL.items()}
    for i in progress(range(trunk), "layers from Llama"):
        dense.update(_prefixed(f"decoder.layers.{i}.", layer_from_llama(cfg, llama, f"model.layers.{i}.")))
    head_one = layer_from_llama(cfg, llama, f"model.layers.{trunk}.")
    dense.update(_prefixed("mtp_heads.layers.0.", head_one))
    for k in range(1, cfg.mtp.n_heads):
        source = heads if heads and f"heads.{k}.input_layernorm.weight" in heads else None
        layer = layer_from_llama(cfg, source, f"heads.{k}.") if source else {n: t.clone() for n, t in head_one.items()}
        dense.update(_prefixed(f"mtp_heads.layers.{k}.", layer))
    return dense


# -- folders ------------------------------------------------------------------------------------------------------

def write_folder(cfg: Config, dense: dict, out: str, tokenizer_model: Optional[str] = None,
                 max_shard_size: str = "5GB") -> None:
    """The Hugging Face folder ``out``, written under ``out.tmp`` and renamed when complete."""
    from huggingface_hub import save_torch_state_dict
    from safetensors.torch import save_file

    problems = llama_problems(cfg)
    if problems:
        raise ValueError("this model cannot be written as a Llama:\n  - " + "\n  - ".join(problems))
    if os.path.exists(out):
        raise FileExistsError(f"{out} exists; choose a new output folder")
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    llama, heads = to_llama(cfg, dense)
    dtype = llama["lm_head.weight"].dtype
    llama_config(cfg, llama["lm_head.weight"].shape[0], dtype).save_pretrained(tmp)
    save_torch_state_dict(llama, tmp, max_shard_size=max_shard_size)
    if heads:
        save_file(heads, os.path.join(tmp, HEADS_FILE), metadata={"format": "pt"})
    with open(os.path.join(tmp, HEADS_CONFIG), "w") as f:
        json.dump({"n_heads": cfg.mtp.n_heads, "trunk_layers": cfg.trunk_num_layers(),
                   "heads_file": HEADS_FILE if heads else None,
                   "key_map": "heads.{k}.<LlamaDecoderLayer keys> = our mtp_heads.layers.{k}, k = 1..n-1; head 1 "
                              "is the last Llama layer",
                   "mtp_megatron_config": config_to_dict(cfg)}, f, indent=1)
    if tokenizer_model:
        _write_tokenizer(tokenizer_model, tmp)
    os.rename(tmp, out)


def _write_tokenizer(model_file: str, folder: str) -> None:
    """The sentencepiece model as a Llama tokenizer (tokenizer.model, and transformers' files when it can)."""
    shutil.copy(model_file, os.path.join(folder, "tokenizer.model"))
    try:
        from transformers import LlamaTokenizer

        LlamaTokenizer(vocab_file=model_file, add_bos_token=False, legacy=False).save_pretrained(folder)
    except Exception as error:  # the .model file alone still loads with sentencepiece
        print(f"[convert] wrote tokenizer.model only: transformers could not build a tokenizer from it ({error})")


def read_folder(folder: str) -> tuple[dict, Optional[dict], dict, Optional[dict]]:
    """(Llama state dict, extra heads or None, config.json, mtp_heads.json or None) of a Hugging Face folder."""
    from safetensors.torch import load_file

    with open(os.path.join(folder, "config.json")) as f:
        hf_config = json.load(f)
    index = os.path.join(folder, WEIGHTS_INDEX)
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(folder, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{folder} has neither {WEIGHTS_INDEX} nor model.safetensors (safetensors weights)")
    llama = {}
    for name in progress(files, "reading shards"):
        llama.update(load_file(os.path.join(folder, name)))
    meta, heads = None, None
    if os.path.exists(os.path.join(folder, HEADS_CONFIG)):
        with open(os.path.join(folder, HEADS_CONFIG)) as f:
            meta = json.load(f)
        if meta.get("heads_file"):
            heads = load_file(os.path.join(folder, meta["heads_file"]))
    return llama, heads, hf_config, meta


def config_for_folder(hf_config: dict, meta: Optional[dict], n_heads: Optional[int]) -> Config:
    """Our config for a Hugging Face folder: the one it was exported with, if it has ours; else built from its
    Llama config, with ``n_heads`` heads (default: the folder's, or 1). The vocabulary padding is set where the
    weights are written (``native.with_vocab_rows``), so the embedding keeps its rows exactly."""
    if meta and meta.get("mtp_megatron_config"):
        cfg = config_from_dict(meta["mtp_megatron_config"], source="mtp_heads.json")
        if n_heads is not None:
            cfg.mtp.n_heads = n_heads
        return cfg
    if hf_config.get("model_type") != "llama":
        raise ValueError(f"config.json has model_type {hf_config.get('model_type')!r}; only Llama folders convert")
    cfg = Config()
    m = cfg.model
    m.hidden_size, m.num_attention_heads = hf_config["hidden_size"], hf_config["num_attention_heads"]
    m.num_query_groups = hf_config.get("num_key_value_heads") or m.num_attention_heads
    m.ffn_hidden_size, m.vocab_size = hf_config["intermediate_size"], hf_config["vocab_size"]
    m.num_layers = hf_config["num_hidden_layers"]
    m.seq_length = hf_config.get("max_position_embeddings", 4096)
    m.norm_epsilon = hf_config.get("rms_norm_eps", 1e-5)
    rope = hf_config.get("rope_parameters") or {}
    m.rotary_base = int(rope.get("rope_theta", hf_config.get("rope_theta", 10000)))
    cfg.mtp.n_heads = n_heads or (meta or {}).get("n_heads", 1)
    cfg.mtp.match_params = False  # the Llama's layers are the trunk plus head 1; extra heads come on top
    cfg.train.precision = {"bfloat16": "bf16", "float16": "fp16"}.get(hf_config.get("dtype")
                                                                       or hf_config.get("torch_dtype"), "fp32")
    return config_from_dict(config_to_dict(cfg), source="config.json")
