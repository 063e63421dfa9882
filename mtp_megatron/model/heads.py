"""The n parallel multi-token-prediction heads and their sequential backward.

This is the one idea mtp-megatron adds to megatron-core. On the last pipeline stage the trunk output ``z``
([s, b, h]) feeds n heads. Head i (1-based) is one transformer layer, followed by a norm and a vocab-parallel
unembedding that all heads share, and predicts token t+i at position t (Gloeckle et al. 2024). Head 1 is the
ordinary next-token path, so n=1 is a plain GPT. Targets: model/targets.py.

Training objective: the sum over heads of each head's mean cross-entropy over all of its target tokens in the
global batch (every microbatch on every data-parallel rank), as torchtitan and OLMo-core normalise. The training
step knows each head's global target count N_i before it runs the microbatches (engines/step.py) and hands
every head the factor ``weights[i]`` = num_microbatches x dp / N_i; a microbatch's loss is then
sum_i weights[i] x (sum of head i's token losses), which the schedule's 1/num_microbatches and DDP's 1/dp turn
into exactly sum_i (head i's global token-loss sum) / N_i. Without weights (evaluation) a microbatch's loss is the
sum of its own per-head means.

Two orders compute the same gradients:

* naive: every head's graph is built in forward and one backward runs through all of them. Peak logit memory
  grows with n (n heads' logits and cross-entropy buffers are alive at once).
* sequential (the paper's Fig. 2): forward keeps only ``z`` and returns a zero placeholder loss. When the
  pipeline schedule runs backward on it, ``_SequentialHeadsLoss.backward`` runs each head's forward and backward
  in turn with the schedule's real gradient scale (1/num_microbatches times any loss scale), adds each head's
  gradient into one dL/dz, and frees that head's logits before the next. Peak logit memory is one head's.
  This is variant D of docs/method.md: no recomputation, exact scale, and megatron DDP's gradient hooks
  fire during backward as the schedules expect. Its one caveat: the loss *values* are only known after
  backward, so they are written into a statistics tensor that the loss function hands to the schedule.

Chunked cross-entropy (``loss_chunk_size``, config/schema.py ``MTPConfig``): a head's layer runs once over the whole
sequence (its attention needs every position), but its norm, unembedding and cross-entropy run over chunks of
``loss_chunk_size`` positions. In the sequential backward each chunk's logits are formed, scored and backpropagated
into that chunk's slice of dL/d(head layer output) and freed before the next chunk; one backward through the head
layer follows. So the peak is one chunk's logits (b x chunk x V/tp fp32), not the microbatch's. Evaluation (no
grad) scores chunk by chunk too. The naive order builds every chunk's graph for its one backward, so it holds
all of them and gains nothing from chunking (its numbers are the same). Under sequence parallelism each TP rank
takes ``loss_chunk_size / tp`` positions of its own slice per chunk; the unembedding's all-gather joins the ranks'
slices into one chunk of ``loss_chunk_size`` positions, whose labels are picked from the same places.

Per-head statistics are a float64 tensor of shape [n, 3]: (sum of token losses, correct top-1 predictions,
number of target tokens), so they can be summed over microbatches and data-parallel ranks and then divided.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
from megatron.core.transformer.utils import sharded_state_dict_default

from mtp_megatron.model.initialization import seeded_init

STAT_LOSS_SUM, STAT_CORRECT, STAT_TOKENS = 0, 1, 2


@dataclass
class HeadInputs:
    """What every head needs besides the trunk output; built once per microbatch."""

    labels: list[Tensor]
    """Per head, [b, s] target ids (head i at position t: token t+i)."""
    loss_masks: list[Tensor]
    """Per head, [b, s] float mask: 1 where the target exists and counts."""
    attention_mask: Optional[Tensor]
    rotary_pos_emb: Optional[Tensor]
    weights: Optional[Tensor] = None
    """[n] float32: what each head's sum of token losses is multiplied by (see the module docstring); None = each
    head's mean over this microbatch."""


class MTPHeads(MegatronModule):
    """n head layers, one shared final norm and one shared vocab-parallel unembedding."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_spec: ModuleSpec,
        norm_spec: ModuleSpec,
        n_heads: int,
        vocab_size: int,
        trunk_num_layers: int,
        sequential_backward: bool,
        pg_collection,
        init_seed: Optional[int] = None,
        loss_chunk_size: int = 0,
    ):
        super().__init__(config=config)
        self.n_heads = n_heads
        self.sequential_backward = sequential_backward
        self.loss_chunk_size = loss_chunk_size
        self.tp_group = pg_collection.tp
        # TransformerLayer adds the pipeline offset to layer_number itself; the heads are numbered after the
        # whole trunk so that no head shares a trunk layer's number (inference KV-cache keys use it).
        offset = get_transformer_layer_offset(config, None, torch.distributed.get_rank(pg_collection.pp))
        self.layers = torch.nn.ModuleList(
            build_module(
                layer_spec,
                config=config,
                layer_number=trunk_num_layers + k + 1 - offset,
                pg_collection=pg_collection,
            )
            for k in range(n_heads)
        )
        self.final_norm = build_module(
            norm_spec, config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon
        )
        with seeded_init(init_seed, "output_layer") if init_seed is not None else contextlib.nullcontext():
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                config.hidden_size,
                vocab_size,
                config=config,
                init_method=config.init_method,
                bias=False,
                skip_bias_add=False,
                gather_output=False,
                tp_group=self.tp_group,
            )

    # ---------------------------------------------------------------- one head

    def layer_output(self, head: int, hidden: Tensor, inputs: HeadInputs) -> Tensor:
        """Head ``head``'s (0-based) transformer layer over the whole trunk output ``hidden`` ([s, b, h]; s/tp under
        sequence parallelism)."""
        # Under sequence parallelism each TP rank holds its own slice of the sequence, so dropout must draw from
        # the rank's own stream, as TransformerBlock arranges for the trunk's layers (the heads run outside it).
        rng = tensor_parallel.get_cuda_rng_tracker().fork() if self.config.sequence_parallel else contextlib.nullcontext()
        with rng:
            out, _ = self.layers[head](
                hidden, attention_mask=inputs.attention_mask, rotary_pos_emb=inputs.rotary_pos_emb
            )
        return out

    def unembed(self, out: Tensor) -> Tensor:
        """The shared final norm and vocab-parallel unembedding: logits [s, b, V/tp] (s gathered under sequence
        parallelism)."""
        logits, _ = self.output_layer(self.final_norm(out))
        return logits

    def logits(self, head: int, hidden: Tensor, inputs: HeadInputs) -> Tensor:
        """Vocab-parallel logits [s, b, V/tp] of head ``head`` (0-based) for trunk output ``hidden``, unchunked."""
        return self.unembed(self.layer_output(head, hidden, inputs))

    def head_loss(self, head: int, hidden: Tensor, inputs: HeadInputs) -> tuple[Tensor, Tensor]:
        """One head's loss (its share of the objective, see the module docstring) and its [3] statistics row, the
        logits formed chunk by chunk; the graph of every chunk is kept (naive order) unless grad is off."""
        out = self.layer_output(head, hidden, inputs)
        targets = _HeadTargets.of(inputs, head, self._sequence_shards())
        loss_sum, stats = out.new_zeros((), dtype=torch.float32), targets.empty_stats()
        for chunk in self._chunks(out.size(0)):
            chunk_loss_sum, correct = self._chunk_loss_sum(out[chunk], targets, chunk)
            loss_sum = loss_sum + chunk_loss_sum
            stats += _stats_row(chunk_loss_sum, correct)
        return _weigh(loss_sum, head, inputs, targets), stats

    def head_backward(self, head: int, hidden: Tensor, inputs: HeadInputs, grad_scale: Tensor,
                      last_head: bool) -> Tensor:
        """The sequential order's work for one head: its loss's gradients (times ``grad_scale``) into its layer,
        the shared norm and unembedding and ``hidden.grad``, one chunk's logits alive at a time. Returns the
        head's [3] statistics row."""
        out = self.layer_output(head, hidden, inputs)
        targets = _HeadTargets.of(inputs, head, self._sequence_shards())
        stats = targets.empty_stats()
        out_grad = torch.empty_like(out)
        chunks = list(self._chunks(out.size(0)))
        for k, chunk in enumerate(chunks):
            # The shared norm and unembedding receive one gradient per chunk of every head. DeepSpeed ZeRO reduces
            # a gradient as soon as it arrives unless told to wait (its flag for such loops; nothing else reads
            # it): reduce theirs once, after the last chunk of the last head.
            self._mark_shared_grads_ready(last_head and k == len(chunks) - 1)
            # A leaf per chunk: its backward stops here and leaves dL/d(this slice of the layer output).
            piece = out[chunk].detach().requires_grad_()
            chunk_loss_sum, correct = self._chunk_loss_sum(piece, targets, chunk)
            stats += _stats_row(chunk_loss_sum, correct)
            # The placeholder stands for the sum of head losses, so every chunk of every head gets its scale.
            torch.autograd.backward(_weigh(chunk_loss_sum, head, inputs, targets), grad_scale)
            del chunk_loss_sum  # the chunk's graph, logits included, is freed before the next chunk
            out_grad[chunk] = piece.grad
        torch.autograd.backward(out, out_grad)  # through the head layer into its weights and hidden.grad
        return stats

    def _chunk_loss_sum(self, out: Tensor, targets: "_HeadTargets", chunk: slice) -> tuple[Tensor, Tensor]:
        """(sum of the masked token losses, fp32 with its graph; number of correct top-1 targets) of one chunk
        of the head layer's output."""
        logits = self.unembed(out)
        labels, mask = targets.chunk(chunk)
        correct = (self._top1_correct(logits.detach(), labels) * mask).sum()
        # The cross-entropy runs in fp32 (bf16 logits are converted) and overwrites fp32 logits in place:
        # accuracy is read first.
        token_loss = self._cross_entropy(logits.float(), labels)
        del logits
        return (token_loss * mask).sum(), correct

    def _cross_entropy(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Per-token vocab-parallel cross-entropy [s, b]; megatron-core's fused form when the TransformerConfig
        asks for it (``cross_entropy_loss_fusion`` with the native implementation: compiled by megatron's
        ``jit_fuser``, i.e. torch.compile, so meant for CUDA runs; nothing in this project turns it on on CPU)."""
        if self.config.cross_entropy_loss_fusion and self.config.cross_entropy_fusion_impl == "native":
            from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy

            return fused_vocab_parallel_cross_entropy(logits, labels, self.tp_group)
        return tensor_parallel.vocab_parallel_cross_entropy(logits, labels)

    def _chunks(self, length: int):
        """Slices of ``length`` positions (this rank's, under sequence parallelism) of ``loss_chunk_size``
        positions in all (the last may be shorter); one slice when chunking is off."""
        step = self.loss_chunk_size // self._sequence_shards() if self.loss_chunk_size else length
        for start in range(0, length, step):
            yield slice(start, min(start + step, length))

    def _sequence_shards(self) -> int:
        """Over how many ranks the head layer's output is split along the sequence (TP under sequence
        parallelism, else 1); the unembedding gathers them."""
        return torch.distributed.get_world_size(self.tp_group) if self.config.sequence_parallel else 1

    def _mark_shared_grads_ready(self, ready: bool) -> None:
        for param in (*self.final_norm.parameters(), *self.output_layer.parameters()):
            param.ds_grad_is_ready = ready

    @torch.no_grad()
    def _top1_correct(self, logits: Tensor, labels: Tensor) -> Tensor:
        """1.0 where the target has the highest logit over the whole (vocab-parallel) vocabulary."""
        vocab_per_rank = logits.size(-1)
        vocab_start = torch.distributed.get_rank(self.tp_group) * vocab_per_rank
        local_max = logits.max(dim=-1).values
        torch.distributed.all_reduce(local_max, torch.distributed.ReduceOp.MAX, group=self.tp_group)
        in_range = (labels >= vocab_start) & (labels < vocab_start + vocab_per_rank)
        local_index = (labels - vocab_start).clamp(0, vocab_per_rank - 1)
        target_logit = logits.gather(-1, local_index.unsqueeze(-1)).squeeze(-1) * in_range
        torch.distributed.all_reduce(target_logit, group=self.tp_group)
        return (target_logit >= local_max).float()

    # ---------------------------------------------------------------- all heads

    def forward(self, hidden: Tensor, inputs: HeadInputs) -> tuple[Tensor, Tensor]:
        """Training loss (sum over heads) and the [n, 3] statistics.

        In the sequential order the loss is a zero placeholder whose backward does the work and the statistics
        are filled during that backward; otherwise both are computed here.
        """
        stats = torch.zeros(self.n_heads, 3, dtype=torch.float64, device=hidden.device)
        if self.sequential_backward and torch.is_grad_enabled() and hidden.requires_grad:
            loss = _SequentialHeadsLoss.apply(hidden, self, inputs, stats)
            return loss, stats
        total = hidden.new_zeros((), dtype=torch.float32)
        for head in range(self.n_heads):
            loss, stats[head] = self.head_loss(head, hidden, inputs)
            total = total + loss
        return total, stats

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        # A plain ModuleList would be saved as if replicated over TP (wrong on reload, see docs/platform.md):
        # each head layer shards itself, and the shared modules need the TP group.
        state = {}
        for k, layer in enumerate(self.layers):
            state.update(layer.sharded_state_dict(f"{prefix}layers.{k}.", sharded_offsets, metadata))
        for name in ("final_norm", "output_layer"):
            state.update(
                sharded_state_dict_default(
                    getattr(self, name), f"{prefix}{name}.", sharded_offsets, metadata, tp_group=self.tp_group
                )
            )
        return state


class _SequentialHeadsLoss(torch.autograd.Function):
    """Zero-valued loss whose backward runs the heads one after another (see the module docstring)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, heads: MTPHeads, inputs: HeadInputs, stats: Tensor) -> Tensor:
        ctx.heads, ctx.inputs, ctx.stats = heads, inputs, stats
        ctx.save_for_backward(hidden)
        return hidden.new_zeros((), dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (hidden,) = ctx.saved_tensors
        # The heads' graphs start at a leaf so each backward stops at z and only accumulates dL/dz there.
        hidden = hidden.detach().requires_grad_()
        # dL/dz summed over heads in fp32 (in bf16 each head's addition would round).
        grad_sum = torch.zeros_like(hidden, dtype=torch.float32)
        heads = ctx.heads
        with torch.enable_grad():
            for head in range(heads.n_heads):
                # grad_output is the schedule's scale for the placeholder (1/num_microbatches x loss scale).
                ctx.stats[head] = heads.head_backward(head, hidden, ctx.inputs, grad_output,
                                                      last_head=head == heads.n_heads - 1)
                grad_sum += hidden.grad
                hidden.grad = None
        ctx.heads = ctx.inputs = None
        return grad_sum.to(hidden.dtype), None, None, None


@dataclass
class _HeadTargets:
    """One head's labels and loss mask laid out as its logits are ([s, b]), and its target count."""

    labels: Tensor
    mask: Tensor
    num_tokens: Tensor
    shards: int
    """Sequence-parallel ranks whose slices the unembedding gathers into one chunk (1 without sequence
    parallelism)."""

    @classmethod
    def of(cls, inputs: HeadInputs, head: int, shards: int) -> "_HeadTargets":
        labels = inputs.labels[head].transpose(0, 1).contiguous()
        mask = inputs.loss_masks[head].transpose(0, 1).float()
        return cls(labels, mask, mask.sum(), shards)

    def chunk(self, local: slice) -> tuple[Tensor, Tensor]:
        """Labels and mask of the positions whose logits a chunk of this rank's ``local`` positions gives: those
        positions of every rank's slice of the sequence, in rank order (the all-gather's order)."""
        if self.shards == 1:
            return self.labels[local], self.mask[local]
        pick = lambda t: t.view(self.shards, -1, t.size(-1))[:, local].flatten(0, 1)  # noqa: E731
        return pick(self.labels), pick(self.mask)

    def empty_stats(self) -> Tensor:
        """A [3] statistics row with the head's target count filled in."""
        stats = torch.zeros(3, dtype=torch.float64, device=self.mask.device)
        stats[STAT_TOKENS] = self.num_tokens.double()
        return stats


def _weigh(loss_sum: Tensor, head: int, inputs: HeadInputs, targets: _HeadTargets) -> Tensor:
    """A head's (or one chunk's) share of the objective from its sum of token losses (see the module docstring):
    times the head's weight, or over the head's target count in this microbatch without weights."""
    if inputs.weights is not None:
        return loss_sum * inputs.weights[head]
    return loss_sum / targets.num_tokens.clamp(min=1)


def _stats_row(loss_sum: Tensor, correct: Tensor) -> Tensor:
    """[loss sum, correct, 0] in float64, to add to a head's statistics row."""
    return torch.stack([loss_sum.detach().double(), correct.double(), correct.new_zeros((), dtype=torch.float64)])
