"""Meta's released multi-token-prediction checkpoints (``consolidated.pth`` + ``params.json``) to our dense form.

Meta's format (facebook/multi-token-prediction, the Llama reference code plus ``n_future_tokens``): the trunk is
``layers[:-1]``, head 1 is ``layers[-1]``, heads 2..n are ``extra_heads.{k}`` (same keys as a layer), all fed the
trunk's output, then the shared ``norm`` and ``output``. Per layer: ``attention.w{q,k,v,o}``,
``feed_forward.w1`` (gate), ``w3`` (up), ``w2`` (down), ``attention_norm``, ``ffn_norm``. Its rotary embedding
rotates adjacent pairs (complex numbers), ours (and Hugging Face's) the two halves of each head, so ``wq`` and
``wk`` rows are permuted per head, as transformers' Llama conversion does. Sizes come from the tensors, the rest
from params.json (``dim``, ``n_heads``, ``n_kv_heads``, ``norm_eps``, ``rope_theta``, ``n_future_tokens``).
Single-file checkpoints only (``consolidated.pth``, or one ``consolidated.00.pth``).
"""

from __future__ import annotations

import glob
import json
import os

import torch

from mtp_megatron.config import Config, config_from_dict, config_to_dict
from mtp_megatron.convert.hf import _prefixed, _qkv_merge, progress


def _to_rotate_half(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a query/key projection from adjacent-pair rotary order to half-split order, per head."""
    rows, cols = weight.shape
    return weight.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _layer(cfg: Config, meta: dict, prefix: str) -> dict:
    def get(name: str) -> torch.Tensor:
        if prefix + name not in meta:
            raise KeyError(f"{prefix}{name} is missing from the Meta checkpoint")
        return meta[prefix + name]

    m = cfg.model
    groups = m.num_query_groups or m.num_attention_heads
    q = _to_rotate_half(get("attention.wq.weight"), m.num_attention_heads)
    k = _to_rotate_half(get("attention.wk.weight"), groups)
    return {
        "input_layernorm.weight": get("attention_norm.weight"),
        "self_attention.linear_qkv.weight": _qkv_merge(cfg, q, k, get("attention.wv.weight")),
        "self_attention.linear_proj.weight": get("attention.wo.weight"),
        "pre_mlp_layernorm.weight": get("ffn_norm.weight"),
        "mlp.linear_fc1.weight": torch.cat([get("feed_forward.w1.weight"), get("feed_forward.w3.weight")]),
        "mlp.linear_fc2.weight": get("feed_forward.w2.weight"),
    }


def read_meta_folder(folder: str, seq_length: int = 4096) -> tuple[Config, dict]:
    """(our config, dense state dict) of a Meta MTP checkpoint folder."""
    with open(os.path.join(folder, "params.json")) as f:
        params = json.load(f)
    files = sorted(glob.glob(os.path.join(folder, "consolidated*.pth")))
    if len(files) != 1:
        raise ValueError(f"{folder} holds {len(files)} consolidated*.pth files; one (unsharded) is supported. Fix: "
                         "merge Meta's model-parallel shards into one consolidated.pth first")
    meta = torch.load(files[0], map_location="cpu", weights_only=True)
    layers = 1 + max(int(key.split(".")[1]) for key in meta if key.startswith("layers."))
    extra = sorted({int(key.split(".")[1]) for key in meta if key.startswith("extra_heads.")})
    n_heads = params.get("n_future_tokens", 1 + len(extra))
    if len(extra) != n_heads - 1:
        raise ValueError(f"params.json says n_future_tokens={n_heads}, the checkpoint has {len(extra)} extra_heads")

    cfg = Config()
    m = cfg.model
    m.hidden_size, m.num_attention_heads = params["dim"], params["n_heads"]
    m.num_query_groups = params.get("n_kv_heads") or params["n_heads"]
    m.ffn_hidden_size = meta["layers.0.feed_forward.w1.weight"].shape[0]
    m.vocab_size = meta["tok_embeddings.weight"].shape[0]
    m.num_layers, m.seq_length = layers, seq_length
    m.norm_epsilon = params.get("norm_eps", 1e-5)
    m.rotary_base = float(params.get("rope_theta", 10000.0))
    cfg.mtp.n_heads, cfg.mtp.match_params = n_heads, False  # trunk = layers[:-1], head 1 = layers[-1]
    cfg.train.precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(meta["output.weight"].dtype, "fp32")
    cfg = config_from_dict(config_to_dict(cfg), source=os.path.join(folder, "params.json"))

    dense = {"embedding.word_embeddings.weight": meta["tok_embeddings.weight"],
             "mtp_heads.final_norm.weight": meta["norm.weight"],
             "mtp_heads.output_layer.weight": meta["output.weight"]}
    for i in progress(range(layers - 1), "layers from Meta"):
        dense.update(_prefixed(f"decoder.layers.{i}.", _layer(cfg, meta, f"layers.{i}.")))
    dense.update(_prefixed("mtp_heads.layers.0.", _layer(cfg, meta, f"layers.{layers - 1}.")))
    for k, index in enumerate(extra, start=1):
        dense.update(_prefixed(f"mtp_heads.layers.{k}.", _layer(cfg, meta, f"extra_heads.{index}.")))
    return cfg, dense
