"""Linear heads (``mtp.head_type=linear``, Gloeckle et al. 2024, App. B): head i is one d x d linear map of the trunk
output z, no nonlinearity ("linear probing" of z), then the shared final norm and unembedding."""

from __future__ import annotations

import torch
from torch import Tensor

from megatron.core.transformer.spec_utils import ModuleSpec

from mtp_megatron.model.heads.base import MTPHeads
from mtp_megatron.model.heads.inputs import HeadInputs


class ReplicatedLinear(torch.nn.Module):
    """y = x W^T with W ([out, in]) whole on every tensor-parallel rank.

    The inputs it sees are the same on every TP rank, and so are the gradients reaching its output (the vocab-
    parallel unembedding all-reduces its input gradient), so W's gradient is too, with one exception: under sequence
    parallelism each rank holds a slice of the sequence, and W's gradient must be summed over the TP group.
    megatron-core does that for every parameter marked ``sequence_parallel`` (as it marks the layer norms'), in its
    finalize_model_grads. Checkpoints save W once (replicated over TP), and it loads at any TP.
    """

    def __init__(self, in_features: int, out_features: int, config, init_method):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features, dtype=config.params_dtype))
        init_method(self.weight)
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: Tensor) -> Tensor:
        return torch.nn.functional.linear(x, self.weight)


class LinearHeads(MTPHeads):
    head_type = "linear"

    def build_layers(self, layer_spec: ModuleSpec, trunk_num_layers: int, pg_collection) -> torch.nn.ModuleList:
        layers = []
        for k in range(self.n_heads):
            with self.seeded(f"linear_head/{k}"):
                layers.append(ReplicatedLinear(self.config.hidden_size, self.config.hidden_size, self.config,
                                               self.config.init_method))
        return torch.nn.ModuleList(layers)

    def apply_layer(self, head: int, hidden: Tensor, inputs: HeadInputs) -> Tensor:
        return self.layers[head](hidden)
