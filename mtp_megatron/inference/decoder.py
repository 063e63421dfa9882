"""A KV-cached forward of our model for decoding, in plain torch, from the dense state dict (convert/native.py).

Training runs megatron-core's layers; decoding wants a cache and cropping it back after rejected drafts, which
is simplest on plain tensors. This is the same computation (RMSNorm, rotate-half RoPE, grouped-query attention,
SwiGLU, optional linear biases, any head width; the trunk, then the heads of the design ``mtp.head_type`` on the
trunk output, the shared norm and unembedding), checked against megatron's forward in tests/inference. RoPE as
megatron-core computes it: inverse frequencies in fp32 from ``model.rotary_base``, megatron's llama3 scaling or
linear position interpolation (``model.rope_scaling_type``). Llama-shaped models only (what convert/hf.py exports).

``forward(tokens, cache)`` runs the new tokens [b, t] after what ``cache`` holds and returns every head's logits
[n, b, t, V]: head 1 is the next token, head i the token i-1 after it. What each design runs on the trunk output z
(model/heads/), and what it keeps in the cache after the trunk's layers:

* ``transformer``: head k's layer on z. The head layers run stacked, as one batched layer (``_HeadStack``: one
  matmul gives every head's queries, keys and values, each head's input-norm weight folded into its projection):
  one cache layer, holding the n head layers' keys and values side by side (each attends over z of all earlier
  positions).
* ``linear``: z W_k^T for every head at once (one batched matmul); nothing cached for the heads.
* ``causal``: the chain h_1 = layer_1(z), h_k = layer_k(h_{k-1}); ``anticausal``: h_n = layer_n(z), h_k =
  layer_k(h_{k+1}), head 1 the deepest. Each layer runs on its own (they read different inputs), with a cache
  layer of its own over its own inputs, in the order the chain runs.
* ``cp`` (rank r, ``mtp.cp_rank``): the transformer design's stacked layers give u_s; at r > 1 head s returns its
  marginal log-probabilities log sum_a w_a softmax(unembed(u_s + (E_s u_s)_a)), log w = log_softmax(M z) (what
  training's ``CPHeads.logits`` gives, in at least fp32): their argmax is the head's most likely token, which is
  all greedy and speculative decoding read. Rank 1 is the transformer design (plain logits).

``step(tokens, cache)`` runs the trunk and puts every head's keys and values into the cache; its
``DecoderStep.hidden(positions, first, last)`` runs the rest of heads first+1..last only at the positions asked for
(the stacked designs; the chained and linear ones run their heads at every position) and ``logits(hidden, trunk,
first)`` unembeds them: a prompt's forward runs the heads at its last position alone. ``forward`` is ``step`` with
every head at every position. Grouped-query attention reads the cached keys per group (SDPA's ``enable_gqa``),
without copying them per query head.

``forward(..., heads=k)`` returns heads 1..k only and skips what they do not need: plain next-token decoding
(``heads=1``) runs head 1's layer alone (transformer, cp: the stack's first layer, and at r > 1 the mixture and
head 1's factors; causal: layer 1; linear: one matmul), except for anticausal heads, where head 1 needs the whole
chain (only its unembedding is skipped). The rows of a batch may hold different lengths (speculative decoding
accepts a different count of drafts per row; prompts of different lengths): row r's new tokens take positions
``cache.lengths[r]`` on, for RoPE and in the cache, and attend to that row's positions only.

An unknown ``mtp.head_type``, or a dense dict without a weight the design needs, is a ValueError naming it.

``MTPDecoder(cfg, dense, dtype, device)`` copies (and casts) every weight onto ``device`` once; everything a
forward creates (positions, the attention mask) is made on the weights' device, so ``tokens`` must be there too.
``resolve_device_dtype`` turns the commands' ``--device``/``--dtype auto`` into a torch device and dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from mtp_megatron.config import Config
from mtp_megatron.convert.hf import llama_problems, _qkv_split

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}


@dataclass
class KVCache:
    """Per layer (trunk, then the heads' layers: the stacked heads' kv_heads side by side, or each chained head
    layer's own; see the module docstring) keys and values [b, kv_heads, slots, d], and each row's length.

    Row r's positions 0 .. lengths[r]-1 fill its first slots; the slots after them are stale (rejected drafts, a
    shorter prompt's padding): never attended to, and overwritten by the row's next tokens. So cropping is setting
    lengths, and rows of one batch can hold different lengths. The lengths are kept on the host so that a forward
    needs no GPU sync to know how many slots to attend over.
    """

    keys: list = field(default_factory=list)
    values: list = field(default_factory=list)
    lengths: list = field(default_factory=list)
    """Valid positions per row (empty before the first forward)."""
    reserved: int = 0
    """Slots per row to allocate at the first forward (more are added when a forward needs them)."""

    @property
    def length(self) -> int:
        """The longest row's length: the slots a forward attends over before its new tokens."""
        return max(self.lengths, default=0)

    def crop(self, lengths: int | list[int]) -> None:
        """Forget every position from ``lengths`` on (one length for every row, or one per row)."""
        per_row = [lengths] * len(self.lengths) if isinstance(lengths, int) else lengths
        if len(per_row) != len(self.lengths):
            raise ValueError(f"crop to {len(per_row)} lengths, but the cache holds {len(self.lengths)} rows")
        self.lengths = [min(old, new) for old, new in zip(self.lengths, per_row)]

    def keep_rows(self, rows: list[int]) -> None:
        """Drop every row not in ``rows`` (rows that have finished), so later forwards skip them."""
        if not self.keys:
            self.lengths = [self.lengths[r] for r in rows]
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.keys[0].device)
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]
        self.lengths = [self.lengths[r] for r in rows]

    def take_first(self, count: int) -> "KVCache":
        """Remove the first ``count`` rows from this cache and return them as a cache of their own."""
        taken = KVCache(keys=[k[:count] for k in self.keys], values=[v[:count] for v in self.values],
                        lengths=self.lengths[:count])
        self.keys, self.values = [k[count:] for k in self.keys], [v[count:] for v in self.values]
        self.lengths = self.lengths[count:]
        return taken

    def extend(self, other: "KVCache") -> None:
        """Append ``other``'s rows after this cache's (rows joining a running batch, prefilled on their own). Both
        caches must hold the same layers; the shorter one's slots are padded with stale zeros."""
        if self.keys and other.keys and len(self.keys) != len(other.keys):
            raise ValueError(f"cannot join a cache of {len(other.keys)} layers to one of {len(self.keys)}")
        if not self.keys:
            self.keys, self.values = other.keys, other.values
        elif other.keys:
            slots = max(self.keys[0].shape[2], other.keys[0].shape[2])

            def join(mine, theirs):
                return torch.cat([F.pad(t, (0, 0, 0, slots - t.shape[2])) for t in (mine, theirs)])

            self.keys = [join(k, o) for k, o in zip(self.keys, other.keys)]
            self.values = [join(v, o) for v, o in zip(self.values, other.values)]
        self.lengths = self.lengths + other.lengths

    def replace_rows(self, rows: list[int], other: "KVCache") -> None:
        """Put ``other``'s rows in the places of rows ``rows`` (rows joining a running batch where finished ones
        were), copying only theirs: dropping and appending (``keep_rows``, ``extend``) copies every row's cache."""
        if len(rows) != len(other.lengths):
            raise ValueError(f"{len(other.lengths)} rows cannot take the places of {len(rows)}")
        if other.keys:
            if len(other.keys) != len(self.keys):
                raise ValueError(f"cannot put rows of a cache of {len(other.keys)} layers into one of {len(self.keys)}")
            slots = other.keys[0].shape[2]
            if self.keys[0].shape[2] < slots:
                grow = slots - self.keys[0].shape[2]
                self.keys = [F.pad(k, (0, 0, 0, grow)) for k in self.keys]
                self.values = [F.pad(v, (0, 0, 0, grow)) for v in self.values]
            index = torch.tensor(rows, dtype=torch.long, device=self.keys[0].device)
            for mine, theirs in zip(self.keys + self.values, other.keys + other.values):
                mine[index, :, :slots] = theirs  # the slots after theirs are stale: never attended to
        for row, length in zip(rows, other.lengths):
            self.lengths[row] = length

    def store(self, layer: int, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor,
              span: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one layer's new keys and values [b, kv_heads, t, d] at each row's ``slots`` [b, t]; return the
        layer's keys and values over its first ``span`` slots (all a forward's queries can see)."""
        if layer == len(self.keys):
            if self.length:  # a layer the earlier forwards did not fill would hold zeros for their positions
                raise ValueError(f"cache layer {layer} is new, but the cache already holds {self.length} positions: "
                                 "fill one cache with one forward(..., heads=) throughout")
            shape = (keys.shape[0], keys.shape[1], max(span, self.reserved), keys.shape[3])
            self.keys.append(keys.new_zeros(shape))
            self.values.append(values.new_zeros(shape))
        elif self.keys[layer].shape[2] < span:  # grow geometrically: a copy every few forwards, not every one
            grow = max(span, 2 * self.keys[layer].shape[2]) - self.keys[layer].shape[2]
            self.keys[layer] = F.pad(self.keys[layer], (0, 0, 0, grow))
            self.values[layer] = F.pad(self.values[layer], (0, 0, 0, grow))
        index = slots[:, None, :, None].expand_as(keys)
        self.keys[layer].scatter_(2, index, keys)
        self.values[layer].scatter_(2, index, values)
        return self.keys[layer][:, :, :span], self.values[layer][:, :, :span]


@dataclass
class _Placement:
    """Where one forward's new tokens go, shared by every layer: each token's position [b, t] (also its cache
    slot), the slots to attend over, the attention mask [b, 1, t, span] and the RoPE tables [b, 1, t, d]."""

    positions: torch.Tensor
    span: int
    mask: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor


HEAD_TYPES = ("transformer", "linear", "causal", "anticausal", "cp")
"""The head designs the decoder runs (config/schema.py ``MTPConfig.head_type``)."""


def _need(dense: dict, key: str, needed_by: str) -> torch.Tensor:
    """``dense[key]``, or a ValueError naming the missing key and what needs it."""
    if key not in dense:
        raise ValueError(f"the dense state dict has no {key!r}, which {needed_by} needs (a checkpoint of another "
                         "head design, or another mtp.n_heads / mtp.cp_rank, than its config says?)")
    return dense[key]


class _Layer:
    """One layer's tensors with megatron's fused ones split (q, k, v; gate, up); biases None without them."""

    REQUIRED = ("input_layernorm.weight", "self_attention.linear_qkv.weight", "self_attention.linear_proj.weight",
                "pre_mlp_layernorm.weight", "mlp.linear_fc1.weight", "mlp.linear_fc2.weight")

    def __init__(self, cfg: Config, dense: dict, prefix: str, dtype: torch.dtype, device: torch.device,
                 needed_by: str = "the trunk"):
        for name in self.REQUIRED:
            _need(dense, prefix + name, needed_by)

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


@dataclass
class _HeadStack:
    """The stacked design's head layers (transformer, cp) on a leading dimension [H, ...]. Every head reads the same
    trunk output z, so one matmul gives all heads' queries, keys and values: each head's input-norm weight is folded
    into its q/k/v columns (RMSNorm's weight scales z's features, the same as scaling the columns that read them;
    folded in at least fp32, then cast once). Batched matmuls run the rest of the layers (decoding a small batch is
    bound by the number of ops, not their size). In the cache the stack is one layer whose key/value heads are the H
    layers' side by side."""

    count: int
    qkv: torch.Tensor
    """[H * (q_heads + 2 kv_heads) * head_dim, hidden]: head k's q, k, v rows in turn, head-major."""
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    gate: torch.Tensor
    gate_bias: torch.Tensor | None
    up: torch.Tensor
    up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None
    norm2: torch.Tensor
    parts: dict = field(default_factory=dict, repr=False, compare=False)
    """``heads``' stacks, made once (each forward asks for the same ones)."""

    STACKED = ("o", "o_bias", "gate", "gate_bias", "up", "up_bias", "down", "down_bias", "norm2")

    @classmethod
    def of(cls, layers: list[_Layer], dtype: torch.dtype) -> "_HeadStack":
        """``layers`` (read in at least fp32, for the fold) as a stack of ``dtype`` tensors."""
        qkv = torch.cat([torch.cat([l.q, l.k, l.v]) * l.norm1 for l in layers])
        qkv_bias = (None if layers[0].q_bias is None
                    else torch.cat([torch.cat([l.q_bias, l.k_bias, l.v_bias]) for l in layers]).to(dtype))
        stacked = {name: None if getattr(layers[0], name) is None
                   else torch.stack([getattr(l, name) for l in layers]).to(dtype) for name in cls.STACKED}
        return cls(len(layers), qkv.to(dtype), qkv_bias, **stacked)

    def heads(self, first: int, last: int) -> "_HeadStack":
        """Heads first+1 .. last (views, no copy)."""
        if (first, last) not in self.parts:
            rows = slice(self.qkv.shape[0] // self.count * first, self.qkv.shape[0] // self.count * last)
            self.parts[first, last] = _HeadStack(
                last - first, self.qkv[rows], None if self.qkv_bias is None else self.qkv_bias[rows],
                **{name: None if getattr(self, name) is None else getattr(self, name)[first:last]
                   for name in self.STACKED})
        return self.parts[first, last]

    def linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """Each head's ``name`` projection of its input x [H, m, in] -> [H, m, out]."""
        weight, bias = getattr(self, name), getattr(self, name + "_bias")
        out = torch.bmm(x, weight.transpose(1, 2))
        return out if bias is None else out + bias[:, None]


@dataclass
class DecoderStep:
    """One forward's trunk output with every head's keys and values in the cache: what is left of the heads' layers
    runs where ``hidden`` asks for it. A prompt's forward (decoding.py ``_prefill``) needs the heads at each row's
    last prompt position only: their cost then does not grow with the prompt."""

    trunk: torch.Tensor
    """[b, t, d] the trunk output at the forward's new tokens."""
    count: int
    """The heads this forward serves (``heads=``)."""
    run: Callable[[torch.Tensor | None, int, int], torch.Tensor]
    """(positions [b, m], or None for all, first, last) -> heads first+1 .. last's hidden states
    [last - first, b, m, d]."""

    def hidden(self, positions: torch.Tensor | None = None, first: int = 0, last: int | None = None) -> torch.Tensor:
        """Heads first+1 .. last's (default: all ``count``) hidden states [last - first, b, m, d] at row r's new
        tokens ``positions[r]`` [b, m] (indices into this forward's tokens; default: all t of them)."""
        last = self.count if last is None else last
        if not 0 <= first < last <= self.count:
            raise ValueError(f"heads {first + 1}..{last}: this forward serves heads 1..{self.count}")
        return self.run(positions, first, last)

    def trunk_at(self, positions: torch.Tensor) -> torch.Tensor:
        """The trunk output [b, m, d] at row r's ``positions[r]`` [b, m] (CP's mixture weights read it)."""
        return self.trunk[torch.arange(len(positions), device=positions.device)[:, None], positions]


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
        self.head_type = cfg.mtp.head_type
        if self.head_type not in HEAD_TYPES:
            raise ValueError(f"mtp.head_type={self.head_type!r}: the decoder runs the head designs "
                             f"{', '.join(HEAD_TYPES)} only")
        self.n_heads, self.eps, self.dtype = cfg.mtp.n_heads, m.norm_epsilon, dtype
        self.heads_q, self.heads_kv = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
        self.head_dim = m.resolved_head_dim()
        self.vocab_size = m.vocab_size  # real ids only: padding rows are never predicted
        # Every weight is moved here, wherever the dense dict holds it (a ``with torch.device(...)`` block would
        # not move them: it only places tensors created inside it).
        self.device = device = torch.device(device)
        self.embedding = _need(dense, "embedding.word_embeddings.weight", "the embedding").to(device=device,
                                                                                              dtype=dtype)
        self.trunk = [_Layer(cfg, dense, f"decoder.layers.{i}.", dtype, device)
                      for i in range(cfg.trunk_num_layers())]
        design = f"mtp.head_type={self.head_type}"
        # The CP rank: 1 for every other design (and CP at rank 1 is the transformer design's model exactly).
        self.cp_rank = cfg.mtp.cp_rank if self.head_type == "cp" else 1
        self.heads = self.chain = self.linear = self.cp_mixture = self.cp_expand = None
        if self.head_type == "linear":  # [n, h, h]: every head's map, one bmm
            self.linear = torch.stack([_need(dense, f"mtp_heads.layers.{k}.weight", design)
                                       for k in range(self.n_heads)]).to(device=device, dtype=dtype)
        else:
            if self.head_type in ("causal", "anticausal"):  # one after another: no stacking
                self.chain = [_Layer(cfg, dense, f"mtp_heads.layers.{k}.", dtype, device, design)
                              for k in range(self.n_heads)]
            else:  # read in at least fp32 for the stack's norm-weight fold
                wide = torch.promote_types(dtype, torch.float32)
                self.heads = _HeadStack.of([_Layer(cfg, dense, f"mtp_heads.layers.{k}.", wide, device, design)
                                            for k in range(self.n_heads)], dtype)
        if self.cp_rank > 1:
            self.cp_mixture = _need(dense, "mtp_heads.cp_mixture.weight", f"{design} at cp_rank {self.cp_rank}").to(
                device=device, dtype=dtype)  # [r, h]
            self.cp_expand = torch.stack([  # [n, r*h, h]
                _need(dense, f"mtp_heads.cp_expand.{s}.weight", f"{design} at cp_rank {self.cp_rank}")
                for s in range(self.n_heads)]).to(device=device, dtype=dtype)
        self.final_norm = _need(dense, "mtp_heads.final_norm.weight", "the heads' shared norm").to(device=device,
                                                                                                   dtype=dtype)
        output = _need(dense, "mtp_heads.output_layer.weight", "the heads' shared unembedding")
        self.output = output[: self.vocab_size].to(device=device, dtype=dtype)
        # CP's factors are softmaxes over every row, vocabulary padding included, as in training: their
        # normalisers need the padding rows (which no token ever takes).
        self.output_padding = (output[self.vocab_size :].to(device=device, dtype=dtype)
                               if self.cp_mixture is not None and output.shape[0] > self.vocab_size else None)
        self.inv_freq = rope_inv_freq(cfg).to(device)
        # Linear scaling (megatron's seq_len_interpolation_factor) divides the positions.
        self.position_scale = m.rope_scaling_factor if m.rope_scaling_type == "linear" else 1.0

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * weight

    def _rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [b, 1, t, d] for the positions [b, t] (angles in fp64, as megatron-core's)."""
        angles = (positions.to(torch.float64) / self.position_scale)[..., None] * self.inv_freq
        return tuple(torch.cat([f, f], dim=-1).to(self.dtype)[:, None] for f in (angles.cos(), angles.sin()))

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    @staticmethod
    def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T / sqrt(d) + mask) v: queries [b, Hq, t, d] over keys and values [b, Hkv, span, d], query
        head j reading key head j // (Hq / Hkv): grouped-query attention without copying the cache per layer."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])

    def _layer(self, layer: _Layer, x: torch.Tensor, index: int, cache: KVCache, place: _Placement) -> torch.Tensor:
        b, t, _ = x.shape
        h = self._norm(x, layer.norm1)
        q = F.linear(h, layer.q, layer.q_bias).view(b, t, self.heads_q, self.head_dim).transpose(1, 2)
        k = F.linear(h, layer.k, layer.k_bias).view(b, t, self.heads_kv, self.head_dim).transpose(1, 2)
        v = F.linear(h, layer.v, layer.v_bias).view(b, t, self.heads_kv, self.head_dim).transpose(1, 2)
        q, k = self._rope(q, place.cos, place.sin), self._rope(k, place.cos, place.sin)
        k, v = cache.store(index, k, v, place.positions, place.span)
        attn = self._attention(q, k, v, place.mask)
        x = x + F.linear(attn.transpose(1, 2).reshape(b, t, -1), layer.o, layer.o_bias)
        h = self._norm(x, layer.norm2)
        mlp = F.silu(F.linear(h, layer.gate, layer.gate_bias)) * F.linear(h, layer.up, layer.up_bias)
        return x + F.linear(mlp, layer.down, layer.down_bias)

    def _stack_step(self, stack: _HeadStack, x: torch.Tensor, index: int, cache: KVCache,
                    place: _Placement) -> Callable[[torch.Tensor, int, int], torch.Tensor]:
        """Every head's queries, keys and values in ``stack`` from the trunk output x [b, t, d] (one matmul), the keys
        and values into cache layer ``index``; returns ``DecoderStep.run``, which runs the rest of the layers of the
        heads asked for at the positions asked for."""
        (b, t, d), count, hq, hkv, hd = x.shape, stack.count, self.heads_q, self.heads_kv, self.head_dim
        qkv = F.linear(self._norm(x, 1.0), stack.qkv, stack.qkv_bias).view(b, t, count, hq + 2 * hkv, hd)
        q, k, v = qkv.split([hq, hkv, hkv], dim=3)
        cos, sin = (table.transpose(1, 2)[:, :, None] for table in (place.cos, place.sin))  # [b, t, 1, 1, hd]
        q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)

        def heads_side_by_side(y):  # [b, t, H, hkv, hd] -> [b, H*hkv, t, hd], the cache's layout
            return y.reshape(b, t, count * hkv, hd).transpose(1, 2)

        keys, values = cache.store(index, heads_side_by_side(k), heads_side_by_side(v), place.positions, place.span)

        def run(positions: torch.Tensor | None, first: int, last: int) -> torch.Tensor:
            heads, queries, mask, residual = last - first, q[:, :, first:last], place.mask, x
            if positions is not None:  # row r's positions[r] only
                rows = torch.arange(b, device=x.device)[:, None]
                queries, residual = queries[rows, positions], x[rows, positions]
                mask = mask[:, 0][rows, positions][:, None]
            m = queries.shape[1]
            queries = queries.permute(0, 2, 3, 1, 4).reshape(b, heads * hq, m, hd)
            kv = slice(first * hkv, last * hkv)
            attn = self._attention(queries, keys[:, kv], values[:, kv], mask)  # each head's groups meet its keys
            attn = attn.view(b, heads, hq, m, hd).permute(1, 0, 3, 2, 4).reshape(heads, b * m, hq * hd)
            part = stack.heads(first, last)
            y = residual.reshape(1, b * m, d) + part.linear(attn, "o")
            h = self._norm(y, part.norm2[:, None])
            mlp = F.silu(part.linear(h, "gate")) * part.linear(h, "up")
            return (y + part.linear(mlp, "down")).view(heads, b, m, d)

        return run

    def _place(self, tokens: torch.Tensor, cache: KVCache) -> _Placement:
        """Row r's new tokens take positions ``cache.lengths[r]`` on."""
        b, t = tokens.shape
        if not cache.lengths:
            cache.lengths = [0] * b
        if len(cache.lengths) != b:
            raise ValueError(f"{b} rows of tokens after a cache of {len(cache.lengths)} rows")
        start = torch.tensor(cache.lengths, device=tokens.device)
        positions = start[:, None] + torch.arange(t, device=tokens.device)
        span = cache.length + t
        # Row r's query i (position start_r + i) sees that row's keys 0 .. start_r + i: never a stale slot after
        # the row's length, which a longer row's span includes.
        visible = torch.arange(span, device=tokens.device) <= positions[:, :, None]
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=tokens.device).masked_fill_(~visible, -math.inf)
        return _Placement(positions, span, mask[:, None], *self._rope_tables(positions))

    def _unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        """The shared final norm and unembedding of hidden states [..., d] -> logits [..., V]."""
        return self._norm(hidden, self.final_norm) @ self.output.T

    def _chain_heads(self, x: torch.Tensor, count: int, cache: KVCache, place: _Placement) -> torch.Tensor:
        """Causal / anticausal heads 1..count's hidden states [count, b, t, d]: the chain's layers one after another
        from the trunk output x, each its own cache layer (in the order they run, after the trunk's). Causal heads
        need the chain up to head ``count``; anticausal ones the whole chain (head 1 is its last layer)."""
        order = list(range(count)) if self.head_type == "causal" else list(reversed(range(self.n_heads)))
        out, hidden = {}, x
        for step, head in enumerate(order):
            hidden = out[head] = self._layer(self.chain[head], hidden, len(self.trunk) + step, cache, place)
        return torch.stack([out[head] for head in range(count)])

    def _cp_log_probs(self, u: torch.Tensor, x: torch.Tensor, first: int = 0) -> torch.Tensor:
        """CP heads' marginal log-probabilities log sum_a w_a softmax(unembed(u_s + (E_s u_s)_a)) [H, b, t, V] from
        heads first+1 .. first+H's layer outputs u [H, b, t, d] and the trunk output x [b, t, d] (log w =
        log_softmax(M x)); at least fp32 (training's CPHeads.logits)."""
        (count, b, t, d), r = u.shape, self.cp_rank
        dtype = torch.promote_types(self.dtype, torch.float32)
        log_w = torch.log_softmax((x @ self.cp_mixture.T).to(dtype), dim=-1)  # [b, t, r]
        expand = self.cp_expand[first:first + count]  # [H, r*h, h]: these heads' own
        expanded = torch.bmm(u.view(count, b * t, d), expand.transpose(1, 2)).view(count, b, t, r, d)
        out = None
        for a in range(r):  # one component's logits alive at a time
            normed = self._norm(u + expanded[..., a, :], self.final_norm)
            logits = (normed @ self.output.T).to(dtype)
            normaliser = torch.logsumexp(logits, dim=-1, keepdim=True)
            if self.output_padding is not None:  # the padding rows' share of the softmax, as training counts it
                padding = torch.logsumexp((normed @ self.output_padding.T).to(dtype), dim=-1, keepdim=True)
                normaliser = torch.logaddexp(normaliser, padding)
            lp = logits - normaliser + log_w[..., a, None]
            out = lp if out is None else torch.logaddexp(out, lp)
        return out

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, cache: KVCache, heads: int | None = None) -> torch.Tensor:
        """Every head's logits [n, b, t, V] (CP at rank > 1: marginal log-probabilities), or the first ``heads``
        heads' only (plain next-token decoding runs head 1 alone: the others' layers and unembeddings would be
        wasted work where the design allows). The heads' cache layers are as many (causal) or as wide (stacked
        transformer / CP heads) as ``heads`` makes them, so fill one cache with one ``heads`` throughout (another
        fails to store)."""
        return self.logits(*self.hidden_states(tokens, cache, heads))

    @torch.no_grad()
    def hidden_states(self, tokens: torch.Tensor, cache: KVCache,
                      heads: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` up to the unembedding: the heads' hidden states [count, b, t, d] and the trunk output
        [b, t, d], the cache filled as ``forward`` fills it."""
        step = self.step(tokens, cache, heads)
        return step.hidden(), step.trunk

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, cache: KVCache, heads: int | None = None) -> DecoderStep:
        """The trunk over the new tokens [b, t] and every head's keys and values into the cache; the heads' hidden
        states at the positions asked for come from the returned step (``DecoderStep.hidden``; ``logits`` of them
        is ``forward``'s there). The stacked designs (transformer, cp) run a head's attention and MLP only where
        it is asked for; the others run their heads at every position here (their chains need them)."""
        count = self.n_heads if heads is None else heads
        if not 1 <= count <= self.n_heads:
            raise ValueError(f"heads={heads}: give 1 to {self.n_heads} (the model's heads), or None for all")
        place = self._place(tokens, cache)
        x = self.embedding[tokens]
        for i, layer in enumerate(self.trunk):
            x = self._layer(layer, x, i, cache, place)
        if self.heads is not None:  # transformer, cp: the stacked head layers
            run = self._stack_step(self.heads.heads(0, count), x, len(self.trunk), cache, place)
        else:
            if self.linear is not None:  # no attention, no cache: x @ W_k^T for every head at once
                b, t, d = x.shape
                hidden = torch.matmul(x.reshape(1, b * t, d), self.linear[:count].transpose(1, 2)).view(count, b, t, d)
            else:
                hidden = self._chain_heads(x, count, cache, place)

            def run(positions, first, last):
                if positions is None:
                    return hidden[first:last]
                return hidden[first:last, torch.arange(len(positions), device=x.device)[:, None], positions]
        cache.lengths = [length + tokens.shape[1] for length in cache.lengths]
        return DecoderStep(x, count, run)

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor, trunk: torch.Tensor, first: int = 0) -> torch.Tensor:
        """Heads first+1 .. first+count's logits [count, ..., V] from their hidden states [count, ..., d] and the
        trunk output at the same positions [..., d] (which CP's mixture weights read)."""
        return self._unembed(hidden) if self.cp_mixture is None else self._cp_log_probs(hidden, trunk, first)
