"""Chained heads (Gloeckle et al. 2024, App. B): the head layers applied one after another, so head i sees the
layers of the heads before it (``causal``) or after it (``anticausal``).

* ``causal``: P(x_{t+i}) = softmax(f_u(f_{h_i}(...f_{h_1}(z)))); head 1's hidden state is layer 1 of z.
* ``anticausal``: P(x_{t+i}) = softmax(f_u(f_{h_i}(f_{h_{i+1}}(...f_{h_n}(z))))): the chain starts at the most
  distant token's head, and head 1, the next-token path, is the deepest.

The whole chain is one group (base.py ``groups``): the sequential backward runs the chain forward keeping only its
hidden states (d per position and head, cheap; each layer's activations are recomputed in backward), scores each
head from head 1 on (for anticausal heads, the one farthest from the trunk first) with one chunk's logits alive at
a time, then back-propagates the chain once, one layer's activations alive at a time.
"""

from __future__ import annotations

from torch import Tensor

from mtp_megatron.model.heads.inputs import HeadInputs
from mtp_megatron.model.heads.transformer import TransformerHeads


class CausalHeads(TransformerHeads):
    head_type = "causal"

    def chain_order(self) -> list[int]:
        """The heads (0-based) in the order the chain applies their layers, starting from z."""
        return list(range(self.n_heads))

    def groups(self) -> list[list[int]]:
        return [list(range(self.n_heads))]

    def hidden_states(self, group: list[int], z: Tensor, inputs: HeadInputs, recompute: bool = False) -> list[Tensor]:
        layer = self.checkpointed_layer if recompute else self.apply_layer
        out, hidden = {}, z
        for head in self.chain_order():
            hidden = out[head] = layer(head, hidden, inputs)
        return [out[head] for head in group]


class AnticausalHeads(CausalHeads):
    head_type = "anticausal"

    def chain_order(self) -> list[int]:
        return list(reversed(range(self.n_heads)))
