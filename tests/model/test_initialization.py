"""The same seed gives the same initial model at every TP x PP layout, and no two layers start alike.

Each layout's model is built on real gloo ranks by ``build_model`` (the trainer's own path), with nothing loaded:
every rank's tensors are put under their global names (stage-local layer i of stage p is trunk layer
``p * layers_per_stage + i``) and compared with the TP1 x PP1 model's, a TP-split tensor with the slice of the
full tensor that megatron-core gives that TP rank.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch
from megatron.core import parallel_state

from mtp_megatron.config import load_config
from mtp_megatron.distributed.parallel import init_distributed
from mtp_megatron.model.builder import build_model
from mtp_megatron.testing.distributed import run_distributed

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAYOUTS = [(1, 1), (1, 2), (2, 1), (2, 2), (1, 4)]


def _global_name(name: str, pp_rank: int, layers_per_stage: int) -> str:
    if name.startswith("decoder.layers."):
        index = int(name.split(".")[2])
        return name.replace(f"decoder.layers.{index}.", f"decoder.layers.{pp_rank * layers_per_stage + index}.", 1)
    return name


def initial_weights(layouts: list[tuple[int, int]]) -> dict:
    """Per layout: this rank's parameters under global names, with how they are split over TP."""
    out = {}
    for tp, pp in layouts:
        cfg = load_config(os.path.join(REPO, "configs/tiny.yaml"), [
            f"parallel.tp={tp}", f"parallel.pp={pp}", "model.num_query_groups=2", "model.seq_length=32"])
        env = init_distributed(cfg.parallel, "cpu", cfg.train.seed)
        model = build_model(cfg, env)
        layers_per_stage = cfg.trunk_num_layers() // pp
        out[(tp, pp)] = {
            "tp_rank": env.tp_rank,
            "params": {
                _global_name(name, env.pp_rank, layers_per_stage): (
                    param.detach().clone(),
                    getattr(param, "partition_dim", -1) if getattr(param, "tensor_model_parallel", False) else None,
                    getattr(param, "partition_stride", 1),
                )
                for name, param in model.named_parameters()
            },
        }
        parallel_state.destroy_model_parallel()
    return out


def _tp_slice(full: torch.Tensor, dim: int, stride: int, tp: int, rank: int) -> torch.Tensor:
    """The part of ``full`` that TP rank ``rank`` of ``tp`` holds (megatron's split of a master weight)."""
    chunks = full.split(full.shape[dim] // (tp * stride), dim=dim)
    return torch.cat(chunks[rank::tp], dim=dim)


@pytest.fixture(scope="module")
def weights() -> list[dict]:
    return run_distributed(initial_weights, 4, LAYOUTS)


@pytest.mark.distributed
def test_every_layout_starts_from_the_tp1_pp1_model(weights):
    reference = weights[0][(1, 1)]["params"]
    for tp, pp in LAYOUTS[1:]:
        covered = set()
        for rank_weights in weights:
            layout = rank_weights[(tp, pp)]
            for name, (tensor, dim, stride) in layout["params"].items():
                full = reference[name][0]
                expected = full if dim is None else _tp_slice(full, dim, stride, tp, layout["tp_rank"])
                assert torch.equal(tensor, expected), f"tp{tp} pp{pp} rank {layout['tp_rank']}: {name} differs"
                covered.add(name)
        assert covered == set(reference), f"tp{tp} pp{pp}: parameters not compared: {set(reference) - covered}"


@pytest.mark.distributed
def test_no_two_layers_start_alike_at_pp4(weights):
    params = {}
    for rank_weights in weights:
        params.update(rank_weights[(1, 4)]["params"])
    layers = {name: tensor for name, (tensor, _, _) in params.items() if name.endswith("linear_qkv.weight")}
    assert len(layers) == 4 + 4  # 4 trunk layers (one per stage) and 4 head layers
    for (a, x), (b, y) in itertools.combinations(layers.items(), 2):
        assert not torch.equal(x, y), f"{a} and {b} start from the same weights"
