"""The sequential backward over the heads (the paper's Fig. 2): one head's logits alive at a time, for every design.

Forward keeps only the trunk output ``z`` and returns a zero placeholder loss. When the pipeline schedule runs
backward on it, ``SequentialHeadsLoss.backward`` takes the design's groups in order (base.py ``groups``): it makes a
group's hidden states from a leaf copy of ``z`` with their graph, has the design score them and back-propagate
each head (each chunk) into their detached values with the schedule's real gradient scale (1/num_microbatches
times any loss scale), freeing each head's logits before the next, then back-propagates the group's hidden states
once, which adds the group's gradient into one fp32 dL/dz. For the parallel designs a group is one head, so one
head layer's activations are alive at a time too; for the chained ones (causal, anticausal) and CP it is every
head: their head layers run under activation checkpointing (base.py ``checkpointed_layer``), keeping only each
layer's input (d per position and head, cheap next to the logits) and recomputing one layer's activations at a
time in the group's backward: one more forward of each head layer, as the paper's chained heads pay.

This is variant D of docs/method.md: no recomputation, exact scale, and megatron DDP's gradient hooks fire during
backward as the schedules expect. DeepSpeed ZeRO's hooks are told to wait for the shared norm's and unembedding's
last gradient (base.py ``mark_shared_grads_ready``). Its one caveat: the loss *values* are only known after
backward, so they are written into the statistics tensor that the loss function hands to the schedule.
"""

from __future__ import annotations

import torch
from torch import Tensor


class SequentialHeadsLoss(torch.autograd.Function):
    """Zero-valued loss whose backward runs the heads one after another (see the module docstring)."""

    @staticmethod
    def forward(ctx, z: Tensor, heads, inputs, stats: Tensor) -> Tensor:
        ctx.heads, ctx.inputs, ctx.stats = heads, inputs, stats
        ctx.save_for_backward(z)
        return z.new_zeros((), dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (z,) = ctx.saved_tensors
        # The heads' graphs start at a leaf so each backward stops at z and only accumulates dL/dz there.
        z = z.detach().requires_grad_()
        # dL/dz summed over groups in fp32 (in bf16 each group's addition would round).
        grad_sum = torch.zeros_like(z, dtype=torch.float32)
        heads = ctx.heads
        groups = heads.groups()
        with torch.enable_grad():
            for k, group in enumerate(groups):
                hidden = heads.hidden_states(group, z, ctx.inputs, recompute=True)
                # grad_output is the schedule's scale for the placeholder (1/num_microbatches x loss scale).
                grads = heads.group_backward(group, [h.detach() for h in hidden], ctx.inputs, grad_output,
                                             ctx.stats, last_group=k == len(groups) - 1)
                torch.autograd.backward(hidden, grads)  # through the group's layers into their weights and z.grad
                del hidden, grads
                grad_sum += z.grad
                z.grad = None
        ctx.heads = ctx.inputs = None
        return grad_sum.to(z.dtype), None, None, None
