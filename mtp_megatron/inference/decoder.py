"""A KV-cached forward of our model for decoding, in plain torch, from the dense state dict (convert/native.py).

Training runs megatron-core's layers; decoding wants a cache and cropping it back after rejected drafts, which
is simplest on plain tensors. This is the same computation (RMSNorm, rotate-half RoPE, grouped-query attention,
SwiGLU, optional linear biases, any head width; the trunk, then every head's layer on the trunk output, the shared
norm and unembedding), checked against megatron's forward in tests/inference. RoPE as megatron-core computes it:
inverse frequencies in fp32 from ``model.rotary_base``, megatron's llama3 scaling or linear position interpolation
(``model.rope_scaling_type``). Llama-shaped models only (what convert/hf.py exports).

``forward(tokens, cache)`` runs the new tokens [b, t] after what ``cache`` holds and returns every head's logits
[n, b, t, V]: head 1 is the next token, head i the token i-1 after it. Each head layer keeps its own keys and
values (it attends over the trunk outputs of all earlier positions), so the cache has trunk + n layers.

``MTPDecoder(cfg, dense, dtype, device)`` copies (and casts) every weight onto ``device`` once; everything a
forward creates (positions, the attention mask) is made on the weights' device, so ``tokens`` must be there too.
``resolve_device_dtype`` turns the commands' ``--device``/``--dtype auto`` into a torch device and dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mtp_megatron.config import Config
from mtp_megatron.convert.hf import llama_problems, _qkv_split

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}


@dataclass
class KVCache:
    """Per layer (trunk, then heads) keys and values [b, kv_heads, T, d]; ``length`` = T."""

    keys: list = field(default_factory=list)
    values: list = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def crop(self, length: int) -> None:
        """Forget every position from ``length`` on (rejected drafts)."""
        self.keys = [k[:, :, :length] for k in self.keys]
        self.values = [v[:, :, :length] for v in self.values]


class _Layer:
    """One layer's tensors with megatron's fused ones split (q, k, v; gate, up); biases None without them."""

    def __init__(self, cfg: Config, dense: dict, prefix: str, dtype: torch.dtype, device: torch.device):
        def get(name):
            tensor = dense.get(prefix + name)
            return None if tensor is None else tensor.to(device=device, dtype=dtype)

        def qkv(kind):
            fused = get(f"self_attention.linear_qkv.{kind}")
            return (None,) * 3 if fused is None else _qkv_split(cfg, fused)

        def gate_up(kind):
            fused = get(f"mlp.linear_fc1.{kind}")
            return (None,) * 2 if fused is None else fused.chunk(2, dim=0)

        self.q, self.k, self.v = qkv("weight")
        self.q_bias, self.k_bias, self.v_bias = qkv("bias")
        self.o, self.o_bias = get("self_attention.linear_proj.weight"), get("self_attention.linear_proj.bias")
        self.gate, self.up = gate_up("weight")
        self.gate_bias, self.up_bias = gate_up("bias")
        self.down, self.down_bias = get("mlp.linear_fc2.weight"), get("mlp.linear_fc2.bias")
        self.norm1, self.norm2 = get("input_layernorm.weight"), get("pre_mlp_layernorm.weight")


def rope_inv_freq(cfg: Config) -> torch.Tensor:
    """RoPE's inverse frequencies exactly as megatron-core's RotaryEmbedding computes them (fp32, then its llama3
    scaling when ``rope_scaling_type=llama3``), as fp64 for the angles."""
    from mtp_megatron.convert.hf_config import MEGATRON_LLAMA3

    m = cfg.model
    dim = m.resolved_head_dim()
    inv_freq = 1.0 / (m.rotary_base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if m.rope_scaling_type == "llama3":
        factor, old_context = m.rope_scaling_factor, MEGATRON_LLAMA3["original_max_position_embeddings"]
        low, high = MEGATRON_LLAMA3["low_freq_factor"], MEGATRON_LLAMA3["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_context / high) * ~(wavelen > old_context / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq.to(torch.float64)


def resolve_device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """The commands' ``--device`` (auto: cuda when a GPU is visible, else cpu) and ``--dtype`` (auto: bf16 on cuda,
    fp32 on cpu). ValueError naming the fix when cuda is asked for and no GPU is visible."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device} but no GPU is visible (torch.cuda.is_available() is False). "
                         "Fix: --device cpu, or --device auto (a GPU when one is visible)")
    if dtype == "auto":
        dtype = "bf16" if torch.device(device).type == "cuda" else "fp32"
    return torch.device(device), DTYPES[dtype]


class MTPDecoder:
    def __init__(self, cfg: Config, dense: dict, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        problems = llama_problems(cfg)
        if problems:
            raise ValueError("decoding supports Llama-shaped models only:\n  - " + "\n  - ".join(problems))
        m = cfg.model
        self.n_heads, self.eps, self.dtype = cfg.mtp.n_heads, m.norm_epsilon, dtype
        self.heads_q, self.heads_kv = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
        self.head_dim = m.resolved_head_dim()
        self.vocab_size = m.vocab_size  # real ids only: padding rows are never predicted
        # Every weight is moved here, wherever the dense dict holds it (a ``with torch.device(...)`` block would
        # not move them: it only places tensors created inside it).
        self.device = device = torch.device(device)
        self.embedding = dense["embedding.word_embeddings.weight"].to(device=device, dtype=dtype)
        self.trunk = [_Layer(cfg, dense, f"decoder.layers.{i}.", dtype, device)
                      for i in range(cfg.trunk_num_layers())]
        self.heads = [_Layer(cfg, dense, f"mtp_heads.layers.{k}.", dtype, device) for k in range(self.n_heads)]
        self.final_norm = dense["mtp_heads.final_norm.weight"].to(device=device, dtype=dtype)
        self.output = dense["mtp_heads.output_layer.weight"][: self.vocab_size].to(device=device, dtype=dtype)
        self.inv_freq = rope_inv_freq(cfg).to(device)
        # Linear scaling (megatron's seq_len_interpolation_factor) divides the positions.
        self.position_scale = m.rope_scaling_factor if m.rope_scaling_type == "linear" else 1.0

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * weight

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        angles = torch.outer(positions.to(torch.float64) / self.position_scale, self.inv_freq)
        cos, sin = (torch.cat([f, f], dim=-1).to(x.dtype) for f in (angles.cos(), angles.sin()))
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def _layer(self, layer: _Layer, x: torch.Tensor, index: int, cache: KVCache, start: int) -> torch.Tensor:
        b, t, _ = x.shape
        h = self._norm(x, layer.norm1)
        positions = torch.arange(start, start + t, device=x.device)
        q = F.linear(h, layer.q, layer.q_bias).view(b, t, self.heads_q, self.head_dim).transpose(1, 2)
        k = F.linear(h, layer.k, layer.k_bias).view(b, t, self.heads_kv, self.head_dim).transpose(1, 2)
        v = F.linear(h, layer.v, layer.v_bias).view(b, t, self.heads_kv, self.head_dim).transpose(1, 2)
        q, k = self._rope(q, positions), self._rope(k, positions)
        if index < len(cache.keys):
            k, v = torch.cat([cache.keys[index], k], dim=2), torch.cat([cache.values[index], v], dim=2)
            cache.keys[index], cache.values[index] = k, v
        else:
            cache.keys.append(k)
            cache.values.append(v)
        repeat = self.heads_q // self.heads_kv
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        # Query i (absolute position start+i) sees keys 0 .. start+i.
        mask = torch.ones(t, start + t, dtype=torch.bool, device=x.device).tril(diagonal=start)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + F.linear(attn.transpose(1, 2).reshape(b, t, -1), layer.o, layer.o_bias)
        h = self._norm(x, layer.norm2)
        mlp = F.silu(F.linear(h, layer.gate, layer.gate_bias)) * F.linear(h, layer.up, layer.up_bias)
        return x + F.linear(mlp, layer.down, layer.down_bias)

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        start = cache.length
        x = self.embedding[tokens]
        for i, layer in enumerate(self.trunk):
            x = self._layer(layer, x, i, cache, start)
        logits = [self._norm(self._layer(layer, x, len(self.trunk) + k, cache, start), self.final_norm) @ self.output.T
                  for k, layer in enumerate(self.heads)]
        return torch.stack(logits)
