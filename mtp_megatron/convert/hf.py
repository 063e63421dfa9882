"""Our dense state dict <-> a Hugging Face folder: a standard ``LlamaForCausalLM`` plus the extra MTP heads.

The Llama model is the trunk with head 1 as its last decoder layer, the shared final norm as ``model.norm`` and
the unembedding as ``lm_head``: exactly our next-token path, so ``transformers`` loads it with no custom code and
gives our head-1 logits. The vocabulary keeps our padded rows (``vocab_size`` = the padded size), so nothing is
lost on the way back; generation_config.json suppresses them, so transformers' ``generate`` predicts what our
decoder does. config.json says everything the model computes (head_dim, biases, RoPE theta and scaling) and the
tokenizer's special ids; what a Llama config can say and ours cannot is refused on import (convert/hf_config.py).
The tokenizer goes along as files ``AutoTokenizer`` loads (convert/hf_tokenizer.py). Heads 2..n go to
``mtp_heads.safetensors`` under Llama's layer names:

    ours: mtp_heads.layers.{k}.<megatron layer keys>      (k = 1 .. n-1)
    file: heads.{k}.<LlamaDecoderLayer keys>               (input_layernorm.weight, self_attn.{q,k,v,o}_proj.weight,
                                                            post_attention_layernorm.weight,
                                                            mlp.{gate,up,down}_proj.weight, and their .bias with
                                                            add_bias_linear)

and ``mtp_heads.json`` records n, the head design (``head_type``, ``cp_rank``), the layout below, the trunk depth,
the real and padded vocabulary sizes and our full config. ``mtp_megatron.convert.hf_heads`` runs all n heads on
top of the ``transformers`` model.

That is the ``transformer`` design's layout (and ``cp`` at rank 1, the same model). The others (``mtp.head_type``,
model/heads/) are laid out so that a plain ``LlamaForCausalLM`` either gives their next-token logits exactly or
does not load at all, never silently something else (``layout``; docs/serving.md):

    llama        transformer, cp rank 1, causal: the Llama is trunk + head 1's layer (causal head 1 is layer 1 of
                 z). Heads 2..n: heads.{k}.* as above (causal: each reads the previous head's layer output, head
                 2 the Llama's last layer output before the final norm).
    llama_chain  anticausal: head 1 is the deepest, layer_1(layer_2(...layer_n(z))), so the Llama is the trunk +
                 the whole chain, model.layers.{trunk + j} = our mtp_heads.layers.{n-1-j} (j = 0..n-1): its
                 logits are head 1's exactly, head k reads the Llama's hidden state after its layer n-k+1 of the
                 chain. No mtp_heads.safetensors.
    trunk        linear, cp rank > 1: head 1 is no Llama layer (a d x d map; a mixture), so no Llama computes its
                 logits. config.json is the trunk's Llama config (num_hidden_layers = the trunk) naming
                 ``architectures: ["LlamaMTPHeads"]``, and the trunk's weights, Llama names, go to
                 ``mtp_trunk.safetensors`` (sharded: ``mtp_trunk.safetensors.index.json``) instead of
                 model.safetensors, so ``LlamaForCausalLM.from_pretrained`` (and any engine) fails with "no file
                 named model.safetensors" instead of serving lm_head(norm(z)). All n heads are in
                 mtp_heads.safetensors, heads.{k} for k = 0..n-1: linear heads.{k}.weight = our
                 mtp_heads.layers.{k}.weight ([h, h]); cp heads.{k}.<LlamaDecoderLayer keys>, cp_expand.{k}.weight
                 ([r h, h]) and cp_mixture.weight ([r, h]), our names. ``LlamaMTPHeads.from_pretrained(folder)``
                 loads it. Megatron's fused tensors
are split the Llama way, weights and biases alike: ``linear_qkv`` holds, per key/value group, that group's query
heads, then its key head, then its value head; ``linear_fc1`` is [gate; up]. Both use rotate-half rotary
embeddings, so no permutation is needed (Meta's original layout needs one: convert/meta.py).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import torch

from mtp_megatron.config import Config, config_from_dict, config_to_dict
from mtp_megatron.convert.hf_config import config_for_llama, llama_config, llama_problems  # noqa: F401 (re-export)

HEADS_FILE = "mtp_heads.safetensors"
HEADS_CONFIG = "mtp_heads.json"
WEIGHTS_INDEX = "model.safetensors.index.json"
TRUNK_PATTERN = "mtp_trunk{suffix}.safetensors"  # the trunk layout's weights: no name transformers loads
TRUNK_FILE, TRUNK_INDEX = "mtp_trunk.safetensors", "mtp_trunk.safetensors.index.json"
HF_CLASS = "LlamaMTPHeads"  # what a trunk folder's config.json names as its architecture

# Layouts of the Hugging Face folder (module docstring).
LLAMA, LLAMA_CHAIN, TRUNK = "llama", "llama_chain", "trunk"


def layout(head_type: str, cp_rank: int = 1) -> str:
    """The folder layout of a head design: llama (a plain Llama is the next-token model: trunk + head 1),
    llama_chain (a plain Llama is the next-token model: trunk + the whole anticausal chain) or trunk (no Llama
    computes the next-token logits; the folder does not load as one)."""
    if head_type in ("transformer", "causal") or (head_type == "cp" and cp_rank == 1):
        return LLAMA
    if head_type == "anticausal":
        return LLAMA_CHAIN
    if head_type in ("linear", "cp"):
        return TRUNK
    raise ValueError(f"mtp.head_type={head_type!r} has no Hugging Face layout")


def layout_of(cfg: Config) -> str:
    return layout(cfg.mtp.head_type, cfg.mtp.cp_rank)


def chain_heads(kind: str, n_heads: int) -> list[int]:
    """Our heads (0-based) whose layers are the Llama's last layers, in the Llama's order (after the trunk)."""
    return {LLAMA: [0], LLAMA_CHAIN: list(reversed(range(n_heads))), TRUNK: []}[kind]


def file_heads(kind: str, n_heads: int) -> list[int]:
    """Our heads (0-based) stored in mtp_heads.safetensors as heads.{k}."""
    return {LLAMA: list(range(1, n_heads)), LLAMA_CHAIN: [], TRUNK: list(range(n_heads))}[kind]


def llama_layer_count(cfg: Config) -> int:
    """Decoder layers of the folder's Llama (config.json num_hidden_layers)."""
    return cfg.trunk_num_layers() + len(chain_heads(layout_of(cfg), cfg.mtp.n_heads))


KEY_MAPS = {
    LLAMA: "model.layers.{trunk} = our mtp_heads.layers.0 (head 1); heads.{k}.<LlamaDecoderLayer keys> = our "
           "mtp_heads.layers.{k}, k = 1..n-1",
    LLAMA_CHAIN: "model.layers.{trunk + j} = our mtp_heads.layers.{n-1-j}, j = 0..n-1 (the anticausal chain; the "
                 "Llama's last layer is head 1's)",
    TRUNK: "the Llama (mtp_trunk*.safetensors) is the trunk only; heads.{k} = our mtp_heads.layers.{k}, k = 0..n-1 "
           "(linear: .weight [h, h]; cp: <LlamaDecoderLayer keys>), cp_expand.{k}.weight and cp_mixture.weight = "
           "ours",
}


# -- one transformer layer ----------------------------------------------------------------------------------------

def _qkv_sizes(cfg: Config) -> tuple[int, int, int]:
    m = cfg.model
    return m.num_attention_heads, m.num_query_groups or m.num_attention_heads, m.resolved_head_dim()


def _qkv_split(cfg: Config, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's fused ``linear_qkv`` weight [rows, hidden] or bias [rows] as Llama's q, k, v."""
    heads, groups, d = _qkv_sizes(cfg)
    rest = qkv.shape[1:]
    per_group = qkv.reshape(groups, (heads // groups + 2) * d, *rest)
    q, k, v = per_group.split([heads // groups * d, d, d], dim=1)
    return q.reshape(heads * d, *rest), k.reshape(groups * d, *rest), v.reshape(groups * d, *rest)


def _qkv_merge(cfg: Config, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Llama's q, k, v weights (or biases) as megatron's fused ``linear_qkv``: per group its queries, key, value."""
    heads, groups, d = _qkv_sizes(cfg)
    rest = q.shape[1:]
    grouped = [q.reshape(groups, heads // groups * d, *rest), k.reshape(groups, d, *rest),
               v.reshape(groups, d, *rest)]
    return torch.cat(grouped, dim=1).reshape((heads + 2 * groups) * d, *rest)


def _fused_to_llama(cfg: Config, ours: dict, prefix: str, kind: str) -> dict:
    """The ``kind`` ("weight" or "bias") tensors of one of our layers under LlamaDecoderLayer names."""
    q, k, v = _qkv_split(cfg, ours[f"{prefix}self_attention.linear_qkv.{kind}"])
    gate, up = ours[f"{prefix}mlp.linear_fc1.{kind}"].chunk(2, dim=0)
    return {f"self_attn.q_proj.{kind}": q, f"self_attn.k_proj.{kind}": k, f"self_attn.v_proj.{kind}": v,
            f"self_attn.o_proj.{kind}": ours[f"{prefix}self_attention.linear_proj.{kind}"],
            f"mlp.gate_proj.{kind}": gate, f"mlp.up_proj.{kind}": up,
            f"mlp.down_proj.{kind}": ours[f"{prefix}mlp.linear_fc2.{kind}"]}


def layer_to_llama(cfg: Config, ours: dict, prefix: str) -> dict:
    """One of our layers (keys under ``prefix``) as a ``LlamaDecoderLayer``'s state dict (biases when the model
    has them: megatron's add_bias_linear = Llama's attention_bias and mlp_bias)."""
    out = {"input_layernorm.weight": ours[f"{prefix}input_layernorm.weight"],
           "post_attention_layernorm.weight": ours[f"{prefix}pre_mlp_layernorm.weight"],
           **_fused_to_llama(cfg, ours, prefix, "weight")}
    if cfg.model.add_bias_linear:
        out.update(_fused_to_llama(cfg, ours, prefix, "bias"))
    return out


def layer_from_llama(cfg: Config, llama: dict, prefix: str) -> dict:
    """A ``LlamaDecoderLayer``'s tensors (keys under ``prefix``) under our layer's names (no prefix)."""
    def get(name: str) -> torch.Tensor:
        key = prefix + name
        if key not in llama:
            raise KeyError(f"{key} is missing")
        return llama[key]

    def fused(kind: str) -> dict:
        return {
            f"self_attention.linear_qkv.{kind}": _qkv_merge(cfg, get(f"self_attn.q_proj.{kind}"),
                                                            get(f"self_attn.k_proj.{kind}"),
                                                            get(f"self_attn.v_proj.{kind}")),
            f"self_attention.linear_proj.{kind}": get(f"self_attn.o_proj.{kind}"),
            f"mlp.linear_fc1.{kind}": torch.cat([get(f"mlp.gate_proj.{kind}"), get(f"mlp.up_proj.{kind}")]),
            f"mlp.linear_fc2.{kind}": get(f"mlp.down_proj.{kind}"),
        }

    out = {"input_layernorm.weight": get("input_layernorm.weight"),
           "pre_mlp_layernorm.weight": get("post_attention_layernorm.weight"), **fused("weight")}
    if cfg.model.add_bias_linear:
        out.update(fused("bias"))
    return out


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


class _Reads(dict):
    """A dict that remembers which keys were read (so no tensor of ours is left out of an export)."""

    def __init__(self, tensors: dict):
        super().__init__(tensors)
        self.read: set = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


def to_llama(cfg: Config, dense: dict) -> tuple[dict, dict]:
    """(LlamaForCausalLM state dict, extra heads' state dict) of our dense state dict, in the head design's layout
    (module docstring). Every tensor of ours goes somewhere: one the layout has no place for raises."""
    trunk, n, kind = cfg.trunk_num_layers(), cfg.mtp.n_heads, layout_of(cfg)
    ours = _Reads(dense)
    llama = {theirs: ours[key] for key, theirs in TOP_LEVEL.items()}
    for i in progress(range(trunk), "layers to Llama"):
        llama.update(_prefixed(f"model.layers.{i}.", layer_to_llama(cfg, ours, f"decoder.layers.{i}.")))
    for j, k in enumerate(chain_heads(kind, n)):
        llama.update(_prefixed(f"model.layers.{trunk + j}.", layer_to_llama(cfg, ours, f"mtp_heads.layers.{k}.")))
    heads = {}
    for k in file_heads(kind, n):
        if cfg.mtp.head_type == "linear":
            heads[f"heads.{k}.weight"] = ours[f"mtp_heads.layers.{k}.weight"]
        else:
            heads.update(_prefixed(f"heads.{k}.", layer_to_llama(cfg, ours, f"mtp_heads.layers.{k}.")))
    if cfg.mtp.head_type == "cp" and cfg.mtp.cp_rank > 1:
        heads["cp_mixture.weight"] = ours["mtp_heads.cp_mixture.weight"]
        for k in range(n):
            heads[f"cp_expand.{k}.weight"] = ours[f"mtp_heads.cp_expand.{k}.weight"]
    left = sorted(set(dense) - ours.read)
    if left:
        raise ValueError(f"mtp.head_type={cfg.mtp.head_type}: the Hugging Face export has no place for "
                         + ", ".join(left))
    # Own storage for each: q/k/v and gate/up are views into one fused tensor, which safetensors refuses.
    return {k: v.clone() for k, v in llama.items()}, {k: v.clone() for k, v in heads.items()}


def from_llama(cfg: Config, llama: dict, heads: Optional[dict]) -> dict:
    """Our dense state dict for ``cfg`` (its head design's layout) from a Llama state dict and (optionally) extra
    heads. In the llama layout, heads that the folder does not have start as copies of head 1, the last Llama
    layer (how the paper fine-tunes an existing model into n heads); the other layouts need all of theirs."""
    trunk, n, kind = cfg.trunk_num_layers(), cfg.mtp.n_heads, layout_of(cfg)
    missing = [theirs for theirs in TOP_LEVEL.values() if theirs not in llama]
    if missing:
        raise KeyError(f"{', '.join(missing)} missing from the Hugging Face weights")
    chain = chain_heads(kind, n)
    beyond = f"model.layers.{trunk + len(chain)}.input_layernorm.weight"
    if beyond in llama:
        raise ValueError(f"the Hugging Face weights have more than the {trunk + len(chain)} decoder layers that "
                         f"{trunk} trunk layers and mtp.head_type={cfg.mtp.head_type} with {n} heads make "
                         f"({beyond} exists)")
    dense = {ours: llama[theirs] for ours, theirs in TOP_LEVEL.items()}
    for i in progress(range(trunk), "layers from Llama"):
        dense.update(_prefixed(f"decoder.layers.{i}.", layer_from_llama(cfg, llama, f"model.layers.{i}.")))
    for j, k in enumerate(chain):
        dense.update(_prefixed(f"mtp_heads.layers.{k}.", layer_from_llama(cfg, llama, f"model.layers.{trunk + j}.")))
    if kind == LLAMA:
        head_one = {key[len("mtp_heads.layers.0."):]: t for key, t in dense.items()
                    if key.startswith("mtp_heads.layers.0.")}
        for k in range(1, n):
            source = heads if heads and f"heads.{k}.input_layernorm.weight" in heads else None
            layer = (layer_from_llama(cfg, source, f"heads.{k}.") if source
                     else {name: t.clone() for name, t in head_one.items()})
            dense.update(_prefixed(f"mtp_heads.layers.{k}.", layer))
        return dense
    file = _Lookup(heads or {}, f"{HEADS_FILE} (mtp.head_type={cfg.mtp.head_type} keeps its heads there)")
    for k in file_heads(kind, n):
        if cfg.mtp.head_type == "linear":
            dense[f"mtp_heads.layers.{k}.weight"] = file[f"heads.{k}.weight"]
        else:
            dense.update(_prefixed(f"mtp_heads.layers.{k}.", layer_from_llama(cfg, file, f"heads.{k}.")))
    if cfg.mtp.head_type == "cp" and cfg.mtp.cp_rank > 1:
        dense["mtp_heads.cp_mixture.weight"] = file["cp_mixture.weight"]
        for k in range(n):
            dense[f"mtp_heads.cp_expand.{k}.weight"] = file[f"cp_expand.{k}.weight"]
    return dense


class _Lookup(dict):
    """A dict whose missing keys raise a KeyError naming the file they should be in."""

    def __init__(self, tensors: dict, where: str):
        super().__init__(tensors)
        self.where = where

    def __missing__(self, key):
        raise KeyError(f"{key} is missing from {self.where}")


# -- folders ------------------------------------------------------------------------------------------------------

def write_folder(cfg: Config, dense: dict, out: str, tokenizer_model: Optional[str] = None,
                 max_shard_size: str = "5GB") -> None:
    """The Hugging Face folder ``out``, written under ``out.tmp`` and renamed when complete: config.json and
    generation_config.json (the tokenizer's special ids; the padded vocabulary rows suppressed), the weights, the
    heads, and the tokenizer (``tokenizer_model`` for sentencepiece, built in for ``tokenizer.type=byte``)."""
    from huggingface_hub import save_torch_state_dict
    from safetensors.torch import save_file

    from mtp_megatron.convert.hf_tokenizer import write_tokenizer
    from mtp_megatron.data.tokenizer import resolve_tokenizer_type

    problems = llama_problems(cfg)
    if problems:
        raise ValueError("this model cannot be written as a Llama:\n  - " + "\n  - ".join(problems))
    if os.path.exists(out):
        raise FileExistsError(f"{out} exists; choose a new output folder")
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    llama, heads = to_llama(cfg, dense)
    dtype, rows = llama["lm_head.weight"].dtype, llama["lm_head.weight"].shape[0]
    placement = layout_of(cfg)
    kind = resolve_tokenizer_type(cfg.tokenizer.type, tokenizer_model or cfg.tokenizer.model)
    special = write_tokenizer(kind, tokenizer_model, tmp, cfg.model.vocab_size) or {}
    llama_config(cfg, rows, dtype, special, num_layers=llama_layer_count(cfg),
                 architectures=[HF_CLASS] if placement == TRUNK else None).save_pretrained(tmp)
    generation_config(cfg, rows, special).save_pretrained(tmp)
    # The trunk layout's weights under a file name no Llama loader reads (module docstring).
    save_torch_state_dict(llama, tmp, max_shard_size=max_shard_size,
                          filename_pattern=TRUNK_PATTERN if placement == TRUNK else None)
    if heads:
        save_file(heads, os.path.join(tmp, HEADS_FILE), metadata={"format": "pt"})
    with open(os.path.join(tmp, HEADS_CONFIG), "w") as f:
        json.dump({"n_heads": cfg.mtp.n_heads, "head_type": cfg.mtp.head_type,
                   "cp_rank": cfg.mtp.cp_rank if cfg.mtp.head_type == "cp" else None,
                   "layout": placement, "llama_is_next_token_model": placement != TRUNK,
                   "trunk_layers": cfg.trunk_num_layers(), "llama_layers": llama_layer_count(cfg),
                   "weights": TRUNK_FILE if placement == TRUNK else "model.safetensors",
                   "heads_file": HEADS_FILE if heads else None,
                   "vocab_size": cfg.model.vocab_size, "padded_vocab_size": rows,
                   "key_map": KEY_MAPS[placement],
                   "mtp_megatron_config": config_to_dict(cfg)}, f, indent=1)
    os.rename(tmp, out)


def generation_config(cfg: Config, rows: int, special: dict):
    """Greedy decoding as ours: the tokenizer's ids (generation stops at EOD), and the padding rows past
    ``model.vocab_size`` suppressed: they are no token, and our decoder never predicts them
    (inference/decoder.py), while transformers' ``lm_head`` keeps all ``rows`` (so ours -> HF -> ours is bitwise)."""
    from transformers import GenerationConfig

    padding = list(range(cfg.model.vocab_size, rows))
    return GenerationConfig(do_sample=False, suppress_tokens=padding or None, **special)


def read_heads_meta(folder: str) -> Optional[dict]:
    """mtp_heads.json of a Hugging Face folder (None without one); a folder whose config.json names our class but
    that lost it is refused: its weights are no Llama without it."""
    path = os.path.join(folder, HEADS_CONFIG)
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    with open(os.path.join(folder, "config.json")) as f:
        architectures = json.load(f).get("architectures") or []
    if HF_CLASS in architectures:
        raise ValueError(f"{folder}: config.json names {HF_CLASS} (an MTP head design that no plain Llama "
                         f"computes) but {HEADS_CONFIG} is missing. Fix: copy {HEADS_CONFIG} back from the export")
    return None


def weight_files(folder: str, meta: Optional[dict]) -> list[str]:
    """The safetensors files holding the folder's Llama (the trunk layout's own names, or transformers')."""
    index, single = (TRUNK_INDEX, TRUNK_FILE) if (meta or {}).get("layout") == TRUNK else (WEIGHTS_INDEX,
                                                                                           "model.safetensors")
    if os.path.exists(os.path.join(folder, index)):
        with open(os.path.join(folder, index)) as f:
            return sorted(set(json.load(f)["weight_map"].values()))
    if os.path.exists(os.path.join(folder, single)):
        return [single]
    raise FileNotFoundError(f"{folder} has neither {index} nor {single} (safetensors weights)")


def read_folder(folder: str) -> tuple[dict, Optional[dict], dict, Optional[dict]]:
    """(Llama state dict, extra heads or None, config.json, mtp_heads.json or None) of a Hugging Face folder."""
    with open(os.path.join(folder, "config.json")) as f:
        hf_config = json.load(f)
    meta = read_heads_meta(folder)
    llama = {}
    for name in progress(weight_files(folder, meta), "reading shards"):
        llama.update(_load_safetensors(os.path.join(folder, name)))
    heads = None
    if meta and meta.get("heads_file"):
        heads = _load_safetensors(os.path.join(folder, meta["heads_file"]))
    return llama, heads, hf_config, meta


def _load_safetensors(path: str) -> dict:
    """The tensors of one safetensors file; a missing, truncated or corrupt one is a ValueError naming it."""
    from safetensors.torch import load_file

    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing (the folder's index or mtp_heads.json names it)")
    try:
        return load_file(path)
    except Exception as error:  # safetensors' own SafetensorError, or an OSError
        raise ValueError(f"{path} cannot be read as safetensors ({error}): truncated or corrupt. Fix: copy or "
                         "download the file again") from error


def config_for_folder(hf_config: dict, meta: Optional[dict], n_heads: Optional[int],
                      untie_embeddings: bool = False) -> Config:
    """Our config for a Hugging Face folder: the one it was exported with, if it has ours; else built from its
    Llama config (refusing, naming the key, what our model cannot compute: convert/hf_config.py), with ``n_heads``
    heads (default: the folder's, or 1). The vocabulary padding is set where the weights are written
    (``native.with_vocab_rows``), so the embedding keeps its rows exactly."""
    if meta and meta.get("mtp_megatron_config"):
        cfg = config_from_dict(meta["mtp_megatron_config"], source="mtp_heads.json")
        if n_heads is not None and n_heads != cfg.mtp.n_heads and layout_of(cfg) != LLAMA:
            raise ValueError(f"--n-heads {n_heads}: this folder's mtp.head_type={cfg.mtp.head_type} model has "
                             f"{cfg.mtp.n_heads} heads whose weights depend on each other or on n (only transformer, "
                             "causal and cp rank-1 heads can be added as copies of head 1). Fix: drop --n-heads")
        if n_heads is not None:
            cfg.mtp.n_heads = n_heads
        return cfg
    if meta and meta.get("head_type", "transformer") != "transformer":
        raise ValueError(f"{HEADS_CONFIG} names head_type={meta['head_type']!r} without mtp_megatron_config: the "
                         "model cannot be rebuilt. Fix: use the folder as exported")
    return config_for_llama(hf_config, n_heads or (meta or {}).get("n_heads", 1), untie_embeddings)


def read_llama(folder: str, n_heads: Optional[int] = None, untie_embeddings: bool = False) -> tuple[Config, dict]:
    """(our config, dense state dict) of a Hugging Face folder. A tied Llama (tie_word_embeddings=true) is refused
    unless ``untie_embeddings``: then ``lm_head`` becomes a copy of the embedding, the same function, untied."""
    llama, heads, hf_config, meta = read_folder(folder)
    cfg = config_for_folder(hf_config, meta, n_heads, untie_embeddings)
    if hf_config.get("tie_word_embeddings") and not (meta and meta.get("mtp_megatron_config")):
        llama["lm_head.weight"] = llama["model.embed_tokens.weight"].clone()
        print("[convert] tie_word_embeddings=true: lm_head is a copy of the embedding; the converted model is "
              "UNTIED (its unembedding trains separately from the embedding)", flush=True)
    return cfg, from_llama(cfg, llama, heads)
