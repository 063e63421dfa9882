"""A KV-cached forward of our model for decoding, in plain torch, from the dense state dict (convert/native.py).

Training runs megatron-core's layers; decoding wants a cache and cropping it back after rejected drafts, which
is simplest on plain tensors. This is the same computation (RMSNorm, rotate-half RoPE, grouped-query attention,
SwiGLU; the trunk, then every head's layer on the trunk output, the shared norm and unembedding), checked against
megatron's forward in tests/inference. Llama-shaped models only (what convert/hf.py exports).

``forward(tokens, cache)`` runs the new tokens [b, t] after what ``cache`` holds and returns every head's logits
[n, b, t, V]: head 1 is the next token, head i the token i-1 after it. Each head layer keeps its own keys and
values (it attends over the trunk outputs of all earlier positions), so the cache has trunk + n layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mtp_megatron.config import Config
from mtp_megatron.convert.hf import llama_problems, _qkv_split


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
    def __init__(self, cfg: Config, dense: dict, prefix: str, dtype: torch.dtype):
        def get(name):
            return dense[prefix + name].to(dtype)

        self.q, self.k, self.v = (t.to(dtype) for t in _qkv_split(cfg, dense[prefix + "self_attention.linear_qkv.weight"]))
        self.o = get("self_attention.linear_proj.weight")
        self.gate, self.up = get("mlp.linear_fc1.weight").chunk(2, dim=0)
        self.down = get("mlp.linear_fc2.weight")
        self.norm1, self.norm2 = get("input_layernorm.weight"), get("pre_mlp_layernorm.weight")


class MTPDecoder:
    def __init__(self, cfg: Config, dense: dict, dtype: torch.dtype = torch.float32):
        problems = llama_problems(cfg)
        if problems:
            raise ValueError("decoding supports Llama-shaped models only:\n  - " + "\n  - ".join(problems))
        m = cfg.model
        self.n_heads, self.eps, self.dtype = cfg.mtp.n_heads, m.norm_epsilon, dtype
        self.heads_q, self.heads_kv = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
        self.head_dim = m.hidden_size // m.num_attention_heads
        self.vocab_size = m.vocab_size  # real ids only: padding rows are never predicted
        self.embedding = dense["embedding.word_embeddings.weight"].to(dtype)
        self.trunk = [_Layer(cfg, dense, f"decoder.layers.{i}.", dtype) for i in range(cfg.trunk_num_layers())]
        self.heads = [_Layer(cfg, dense, f"mtp_heads.layers.{k}.", dtype) for k in range(self.n_heads)]
        self.final_norm = dense["mtp_heads.final_norm.weight"].to(dtype)
        self.output = dense["mtp_heads.output_layer.weight"][: self.vocab_size].to(dtype)
        self.inv_freq = 1.0 / (m.rotary_base ** (torch.arange(0, self.head_dim, 2, dtype=torch.float64)
                                                 / self.head_dim))

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * weight

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        angles = torch.outer(positions.to(torch.float64), self.inv_freq)
        cos, sin = (torch.cat([f, f], dim=-1).to(x.dtype) for f in (angles.cos(), angles.sin()))
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def _layer(self, layer: _Layer, x: torch.Tensor, index: int, cache: KVCache, start: int) -> torch.Tensor:
        b, t, _ = x.shape
        h = self._norm(x, layer.norm1)
        positions = torch.arange(start, start + t)
        q = self._rope((h @ layer.q.T).view(b, t, self.heads_q, self.head_dim).transpose(1, 2), positions)
        k = self._rope((h @ layer.k.T).view(b, t, self.heads_kv, self.head_dim).transpose(1, 2), positions)
        v = (h @ layer.v.T).view(b, t, self.heads_kv, self.head_dim).transpose(1, 2)
        if index < len(cache.keys):
            k, v = torch.cat([cache.keys[index], k], dim=2), torch.cat([cache.values[index], v], dim=2)
            cache.keys[index], cache.values[index] = k, v
        else:
            cache.keys.append(k)
            cache.values.append(v)
        repeat = self.heads_q // self.heads_kv
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        # Query i (absolute position start+i) sees keys 0 .. start+i.
        mask = torch.ones(t, start + t, dtype=torch.bool).tril(diagonal=start)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + attn.transpose(1, 2).reshape(b, t, -1) @ layer.o.T
        h = self._norm(x, layer.norm2)
        return x + (F.silu(h @ layer.gate.T) * (h @ layer.up.T)) @ layer.down.T

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        start = cache.length
        x = self.embedding[tokens]
        for i, layer in enumerate(self.trunk):
            x = self._layer(layer, x, i, cache, start)
        logits = [self._norm(self._layer(layer, x, len(self.trunk) + k, cache, start), self.final_norm) @ self.output.T
                  for k, layer in enumerate(self.heads)]
        return torch.stack(logits)
