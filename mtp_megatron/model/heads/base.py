"""The MTP heads' shared part: the final norm, the vocab-parallel unembedding, the chunked cross-entropy, and the
interface a head design fills in.

On the last pipeline stage the trunk output ``z`` ([s, b, h]) feeds n heads. Head i (1-based) makes a hidden state
from ``z`` (the design: transformer.py, linear.py, chained.py, cp.py), followed by a norm and a vocab-parallel
unembedding that all heads share, and predicts token t+i at position t (Gloeckle et al. 2024). Head 1 is the
ordinary next-token path, so n=1 with transformer heads is a plain GPT. Targets: model/targets.py.

Training objective: the sum over heads of each head's loss weight times its mean cross-entropy over all of its
target tokens in the global batch (every microbatch on every data-parallel rank), as torchtitan and OLMo-core
normalise. The training step knows each head's global target count N_i before it runs the microbatches
(engines/step.py) and hands every head the factor ``weights[i]`` = num_microbatches x dp / N_i; a microbatch's
loss is then sum_i lambda_i x weights[i] x (sum of head i's token losses), which the schedule's 1/num_microbatches
and DDP's 1/dp turn into exactly sum_i lambda_i x (head i's global token-loss sum) / N_i. Without weights
(evaluation) a microbatch's loss is the sum of its own per-head means. The CP design's objective is the mixture's
joint negative log-likelihood instead (cp.py).

A design says which heads' hidden states are made together (``groups``: one head each for the parallel designs,
the whole chain for the chained ones) and how (``hidden_states``); sequential.py owns the order in which they are
scored and back-propagated. Two orders compute the same gradients:

* naive: every head's graph is built in forward and one backward runs through all of them. Peak logit memory
  grows with n (n heads' logits and cross-entropy buffers are alive at once).
* sequential (the paper's Fig. 2, sequential.py): forward keeps only ``z`` and returns a zero placeholder loss;
  its backward makes each group's hidden states, scores and back-propagates one head (one chunk) at a time into
  them, freeing the logits before the next, then back-propagates the group's hidden states once into dL/dz.

Chunked cross-entropy (``loss_chunk_size``, config/schema.py ``MTPConfig``): a head's hidden state is made once over
the whole sequence (a transformer layer's attention needs every position), but its norm, unembedding and
cross-entropy run over chunks of ``loss_chunk_size`` positions. In the sequential order each chunk's logits are
formed, scored and backpropagated into that chunk's slice of dL/d(hidden state) and freed before the next chunk.
So the peak is one chunk's logits (b x chunk x V/tp fp32), not the microbatch's. Evaluation (no grad) scores chunk
by chunk too. The naive order builds every chunk's graph for its one backward, so it holds all of them. Under
sequence parallelism each TP rank takes ``loss_chunk_size / tp`` positions of its own slice per chunk; the
unembedding's all-gather joins the ranks' slices into one chunk of ``loss_chunk_size`` positions, whose labels are
picked from the same places.

Statistics: a float64 tensor of shape [n + len(extra_stats), 3], one row per head (inputs.py's columns) and then
the design's own rows, filled in forward (naive, evaluation) or during backward (sequential).
"""

from __future__ import annotations

import contextlib
from typing import ClassVar, Optional

import torch
from torch import Tensor

from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import sharded_state_dict_default

from mtp_megatron.model.heads.inputs import HeadInputs, HeadTargets, stats_row, weigh
from mtp_megatron.model.initialization import seeded_init


class MTPHeads(MegatronModule):
    """n heads, one shared final norm and one shared vocab-parallel unembedding; subclasses are the designs."""

    head_type: ClassVar[str] = ""
    extra_stats: tuple[str, ...] = ()
    """Names of the statistics rows after the n heads' (logged as ``<name>``: sum over count)."""

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
        self.init_seed = init_seed
        self.tp_group = pg_collection.tp
        self.layers = self.build_layers(layer_spec, trunk_num_layers, pg_collection)
        self.final_norm = build_module(
            norm_spec, config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon
        )
        with self.seeded("output_layer"):
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

    def seeded(self, key: str):
        """Initialise what is built inside from a stream of its own (model/initialization.py), if seeded."""
        return seeded_init(self.init_seed, key) if self.init_seed is not None else contextlib.nullcontext()

    # ---------------------------------------------------------------- the design's part

    def build_layers(self, layer_spec: ModuleSpec, trunk_num_layers: int, pg_collection) -> torch.nn.ModuleList:
        """One module per head, saved as ``layers.{k}`` (``layer_spec``: the trunk's transformer layer)."""
        raise NotImplementedError

    def apply_layer(self, head: int, hidden: Tensor, inputs: HeadInputs) -> Tensor:
        """Head ``head``'s (0-based) module over the whole of ``hidden`` ([s, b, h]; s/tp under sequence
        parallelism)."""
        raise NotImplementedError

    def groups(self) -> list[list[int]]:
        """Heads (0-based) whose hidden states are made together, in the order the sequential backward scores them;
        each group's hidden states are back-propagated once, after all of its heads are scored."""
        return [[head] for head in range(self.n_heads)]

    def hidden_states(self, group: list[int], z: Tensor, inputs: HeadInputs, recompute: bool = False) -> list[Tensor]:
        """The group's tensors made from the trunk output ``z`` (with their graph): here each head's hidden state,
        the input of the shared norm and unembedding. ``recompute`` (the sequential backward asks for it): a design
        whose group holds several head layers keeps only each layer's input and recomputes its activations in the
        group's backward (``checkpointed_layer``), so one head layer's activations are alive at a time."""
        return [self.apply_layer(head, z, inputs) for head in group]

    def checkpointed_layer(self, head: int, hidden: Tensor, inputs: HeadInputs) -> Tensor:
        """``apply_layer`` under megatron-core's activation checkpoint: its input is kept and its forward rerun in
        backward, with the RNG states restored (the same dropout masks, model-parallel streams included)."""
        return tensor_parallel.checkpoint(lambda x: self.apply_layer(head, x, inputs), False, hidden)

    def group_loss(self, group: list[int], hidden: list[Tensor], inputs: HeadInputs, stats: Tensor) -> Tensor:
        """The group's share of the objective with its graph (naive order, evaluation); fills its statistics
        rows."""
        total = hidden[0].new_zeros((), dtype=torch.float32)
        for head, out in zip(group, hidden):
            loss, stats[head] = self.head_loss(head, out, inputs)
            total = total + loss
        return total

    def group_backward(self, group: list[int], hidden: list[Tensor], inputs: HeadInputs, grad_scale: Tensor,
                       stats: Tensor, last_group: bool) -> list[Tensor]:
        """The sequential order's work for a group: its loss's gradients (times ``grad_scale``) into the shared norm
        and unembedding and into each of ``hidden`` (the detached values of ``hidden_states``), returned in
        order; fills its statistics rows."""
        grads = []
        for k, (head, out) in enumerate(zip(group, hidden)):
            grad, stats[head] = self.head_backward(head, out, inputs, grad_scale,
                                                   last=last_group and k == len(group) - 1)
            grads.append(grad)
        return grads

    def logits(self, head: int, z: Tensor, inputs: HeadInputs) -> Tensor:
        """Vocab-parallel logits [s, b, V/tp] of head ``head`` (0-based) for trunk output ``z``, unchunked: what
        evaluation and decoding score (the CP design gives its marginal log-probabilities)."""
        group = next(g for g in self.groups() if head in g)
        return self.unembed(self.hidden_states(group, z, inputs)[group.index(head)])

    # ---------------------------------------------------------------- one head's scoring

    def unembed(self, out: Tensor) -> Tensor:
        """The shared final norm and vocab-parallel unembedding: logits [s, b, V/tp] (s gathered under sequence
        parallelism)."""
        logits, _ = self.output_layer(self.final_norm(out))
        return logits

    def head_loss(self, head: int, out: Tensor, inputs: HeadInputs) -> tuple[Tensor, Tensor]:
        """One head's loss (its share of the objective) from its hidden state ``out`` and its [3] statistics row,
        the logits formed chunk by chunk; the graph of every chunk is kept (naive order) unless grad is off."""
        targets = self.targets(inputs, head)
        loss_sum, stats = out.new_zeros((), dtype=torch.float32), targets.empty_stats()
        for chunk in self.chunks(out.size(0)):
            chunk_loss_sum, correct = self._chunk_loss_sum(out[chunk], targets, chunk)
            loss_sum = loss_sum + chunk_loss_sum
            stats += stats_row(chunk_loss_sum, correct)
        return weigh(loss_sum, head, inputs, targets), stats

    def head_backward(self, head: int, out: Tensor, inputs: HeadInputs, grad_scale: Tensor,
                      last: bool) -> tuple[Tensor, Tensor]:
        """One head's loss's gradients (times ``grad_scale``) into the shared norm and unembedding, from its hidden
        state's value ``out``, one chunk's logits alive at a time: (dL/d out, the head's [3] statistics row).
        ``last``: no later scoring gives the shared modules a gradient in this backward."""
        targets = self.targets(inputs, head)
        stats = targets.empty_stats()
        out_grad = torch.empty_like(out)
        chunks = list(self.chunks(out.size(0)))
        for k, chunk in enumerate(chunks):
            self.mark_shared_grads_ready(last and k == len(chunks) - 1)
            # A leaf per chunk: its backward stops here and leaves dL/d(this slice of the hidden state).
            piece = out[chunk].detach().requires_grad_()
            chunk_loss_sum, correct = self._chunk_loss_sum(piece, targets, chunk)
            stats += stats_row(chunk_loss_sum, correct)
            # The placeholder stands for the sum of head losses, so every chunk of every head gets its scale.
            torch.autograd.backward(weigh(chunk_loss_sum, head, inputs, targets), grad_scale)
            del chunk_loss_sum  # the chunk's graph, logits included, is freed before the next chunk
            out_grad[chunk] = piece.grad
        return out_grad, stats

    def targets(self, inputs: HeadInputs, head: int) -> HeadTargets:
        return HeadTargets.of(inputs, head, self.sequence_shards())

    def _chunk_loss_sum(self, out: Tensor, targets: HeadTargets, chunk: slice) -> tuple[Tensor, Tensor]:
        """(sum of the masked token losses, fp32 with its graph; number of correct top-1 targets) of one chunk
        of a head's hidden state."""
        logits = self.unembed(out)
        labels, mask = targets.chunk(chunk)
        correct = (self.top1_correct(logits.detach(), labels) * mask).sum()
        # The cross-entropy runs in fp32 (bf16 logits are converted) and overwrites fp32 logits in place:
        # accuracy is read first.
        token_loss = self.cross_entropy(logits.float(), labels)
        del logits
        return (token_loss * mask).sum(), correct

    def cross_entropy(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Per-token vocab-parallel cross-entropy [s, b]; megatron-core's fused form when the TransformerConfig
        asks for it (``cross_entropy_loss_fusion`` with the native implementation: compiled by megatron's
        ``jit_fuser``, i.e. torch.compile, so meant for CUDA runs; nothing in this project turns it on on CPU)."""
        if self.config.cross_entropy_loss_fusion and self.config.cross_entropy_fusion_impl == "native":
            from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy

            return fused_vocab_parallel_cross_entropy(logits, labels, self.tp_group)
        return tensor_parallel.vocab_parallel_cross_entropy(logits, labels)

    def chunks(self, length: int):
        """Slices of ``length`` positions (this rank's, under sequence parallelism) of ``loss_chunk_size``
        positions in all (the last may be shorter); one slice when chunking is off."""
        step = self.loss_chunk_size // self.sequence_shards() if self.loss_chunk_size else length
        for start in range(0, length, step):
            yield slice(start, min(start + step, length))

    def sequence_shards(self) -> int:
        """Over how many ranks the hidden states are split along the sequence (TP under sequence parallelism, else
        1); the unembedding gathers them."""
        return torch.distributed.get_world_size(self.tp_group) if self.config.sequence_parallel else 1

    def mark_shared_grads_ready(self, ready: bool) -> None:
        """The shared norm and unembedding receive one gradient per chunk of every head. DeepSpeed ZeRO reduces a
        gradient as soon as it arrives unless told to wait (its flag for such loops; nothing else reads it):
        reduce theirs once, after the last chunk of the last head."""
        for param in (*self.final_norm.parameters(), *self.output_layer.parameters()):
            param.ds_grad_is_ready = ready

    @torch.no_grad()
    def top1_correct(self, logits: Tensor, labels: Tensor) -> Tensor:
        """1.0 where the target has the highest score over the whole (vocab-parallel) vocabulary."""
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

    def forward(self, z: Tensor, inputs: HeadInputs) -> tuple[Tensor, Tensor]:
        """Training loss and the statistics ([n + len(extra_stats), 3]).

        In the sequential order the loss is a zero placeholder whose backward does the work and the statistics
        are filled during that backward; otherwise both are computed here.
        """
        from mtp_megatron.model.heads.sequential import SequentialHeadsLoss

        stats = torch.zeros(self.n_heads + len(self.extra_stats), 3, dtype=torch.float64, device=z.device)
        if self.sequential_backward and torch.is_grad_enabled() and z.requires_grad:
            return SequentialHeadsLoss.apply(z, self, inputs, stats), stats
        total = z.new_zeros((), dtype=torch.float32)
        for group in self.groups():
            total = total + self.group_loss(group, self.hidden_states(group, z, inputs), inputs, stats)
        return total, stats

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        # A plain ModuleList would be saved as if replicated over TP (wrong on reload for TP-split layers, see
        # docs/platform.md): each megatron layer shards itself; plain modules (shared norm, a design's replicated
        # weights) need the TP group.
        state = {}
        for name, module in self.named_children():
            children = module.named_children() if isinstance(module, torch.nn.ModuleList) else [(None, module)]
            for key, child in children:
                child_prefix = f"{prefix}{name}." + (f"{key}." if key is not None else "")
                state.update(sharded_state_dict_default(child, child_prefix, sharded_offsets, metadata,
                                                        tp_group=self.tp_group))
        return state
