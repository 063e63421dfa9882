"""Parameter counts of each pipeline stage, from the real model built on the meta device.

No hand formula: each stage's ``MTPGPTModel`` is built exactly as ``mtp_megatron.model.builder.build_model``
builds it (same ``transformer_config``, layer specs and constructor arguments), but under
``torch.device("meta")``, so shapes exist and no weight is allocated, in this one process. megatron-core needs a
process group and its parallel state for that; torch's fake process-group backend provides both without peers:
``init_process_group("fake", rank=r, world_size=tp*pp)`` makes this process believe it is rank ``r`` of the
model-parallel world, megatron then builds rank ``r``'s shard, and no collective is ever run. Only tp*pp ranks
are needed: data parallelism replicates (or, for ZeRO-3, partitions after building) the same shard.

For each stage the model of TP rank 0 is built. megatron marks the weights it splits over TP with
``tensor_model_parallel=True``; the others (norms) are whole copies on every TP rank. So one build per stage
gives both the per-GPU count and the whole model's: split * tp + replicated, summed over stages.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Iterator, List, Tuple

from mtp_megatron.config import Config
from mtp_megatron.distributed.pipeline_split import layers_per_stage
from mtp_megatron.distributed.topology import ParallelDims

if TYPE_CHECKING:
    import torch

# torch and megatron-core are imported inside the functions that build models: a plan that stops at a config error
# (or ``tools/plan.py --help``) then answers without their seconds of import time.


@dataclass(frozen=True)
class StageParams:
    """What one GPU of pipeline stage ``stage`` holds, in parameters (elements, not bytes)."""

    stage: int
    """Pipeline rank, 0-based."""

    trunk_layers: int
    """Trunk transformer layers on this stage."""

    has_embedding: bool
    """The first stage holds the word embedding (and a learned position table, if any)."""

    head_layers: int
    """MTP head layers here: n on the last stage (with the shared final norm and unembedding), 0 elsewhere."""

    params: int
    """Parameters on one GPU of this stage: its TP shard (TP rank 0; every TP rank holds the same count)."""

    tp_split: int
    """Of ``params``, those of weights split over TP (each TP rank holds another slice of the same size)."""

    replicated: int
    """Of ``params``, those replicated on every TP rank (norms; biases of row-parallel layers)."""

    largest_module: int
    """Parameters of the biggest single unit on this GPU: one transformer layer, the embedding or the
    unembedding. ZeRO-3 gathers parameters unit by unit, so this sizes its gathered working set."""

    def whole_stage(self, tp: int) -> int:
        """This stage's parameters over all its TP ranks, replicated ones counted once."""
        return self.tp_split * tp + self.replicated


def total_params(stages: List[StageParams], tp: int) -> int:
    """Parameters of the whole model: every stage, TP-split weights counted over all TP ranks, replicas once."""
    return sum(s.whole_stage(tp) for s in stages)


# Counts depend only on the architecture and the (tp, pp) layout; the suggestion search asks for the same layouts
# many times, and a 13B stage takes a fraction of a second to build even on meta.
_CACHE: Dict[Tuple, List[StageParams]] = {}


def _cache_key(cfg: Config) -> Tuple:
    return (dataclasses.astuple(cfg.model), cfg.mtp.n_heads, cfg.mtp.match_params, cfg.parallel.tp, cfg.parallel.pp,
            tuple(layers_per_stage(cfg)))


def stage_params(cfg: Config) -> List[StageParams]:
    """Per pipeline stage, what one GPU holds at ``cfg.parallel.tp`` x ``cfg.parallel.pp``.

    Builds the first stage, the last stage and (when pp > 2) one middle stage: all middle stages have the same
    modules (megatron-core splits them evenly, whatever ``parallel.layers_per_stage`` gives the first and last),
    so their counts are the same build's.
    """
    key = _cache_key(cfg)
    if key not in _CACHE:
        pp = cfg.parallel.pp
        built = {k: _count_stage(cfg, k) for k in sorted({0, min(1, pp - 1), pp - 1})}
        _CACHE[key] = [dataclasses.replace(built[k if k in built else 1], stage=k) for k in range(pp)]
    return list(_CACHE[key])


def _count_stage(cfg: Config, stage: int) -> StageParams:
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    dims = ParallelDims(world_size=tp * pp, tp=tp, pp=pp)
    # The global rank of (tp rank 0, pp rank ``stage``) in megatron's rank order, with dp = 1.
    rank = next(r for r in range(dims.world_size) if dims.rank_coords(r) == (0, stage, 0))
    with _fake_model_parallel(rank, dims) as groups:
        model = _build_on_meta(cfg, groups, first=stage == 0, last=stage == pp - 1)
        params = list(model.parameters())
        split = sum(p.numel() for p in params if getattr(p, "tensor_model_parallel", False))
        total = sum(p.numel() for p in params)
        units: List[torch.nn.Module] = list(model.decoder.layers)
        if model.pre_process:
            units.append(model.embedding)
        if model.has_heads:
            units += [*model.mtp_heads.layers, model.mtp_heads.output_layer]
        largest = max((sum(p.numel() for p in u.parameters()) for u in units), default=0)
        return StageParams(
            stage=stage,
            trunk_layers=len(model.decoder.layers),
            has_embedding=model.pre_process,
            head_layers=len(model.mtp_heads.layers) if model.has_heads else 0,
            params=total,
            tp_split=split,
            replicated=total - split,
            largest_module=largest,
        )


@contextmanager
def _fake_model_parallel(rank: int, dims: ParallelDims) -> Iterator[object]:
    """megatron-core's parallel state for ``rank`` of a ``dims`` world on torch's fake backend; torn down after."""
    # Imported here: registering the backend is a side effect of this (test-support) module of torch.
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection

    if dist.is_initialized() or parallel_state.model_parallel_is_initialized():
        # The fake world would replace (or clash with) the caller's groups; the planner never runs inside a job.
        raise RuntimeError("the planner builds models on a fake process group of its own: call it from a process "
                           "where torch.distributed is not initialised")
    # init_process_group wraps sys.excepthook to prefix tracebacks with "[rankN]"; restore it, or every stage's
    # fake rank would be stacked in front of any later traceback of this process.
    excepthook = sys.excepthook
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=dims.world_size)
    try:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=dims.tp,
            pipeline_model_parallel_size=dims.pp,
            create_gloo_process_groups=False,  # real gloo groups cannot be made on a fake store
        )
        yield ProcessGroupCollection.use_mpu_process_groups()
    finally:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
        sys.excepthook = excepthook


def _build_on_meta(cfg: Config, groups, first: bool, last: bool):
    """``build_model(cfg, env)`` for the stage (``builder.construct_model``), on the meta device.

    Two settings differ, neither changing a shape: ``transformer_config`` is asked for CPU
    (``use_cpu_initialization``: megatron then creates weights with plain ``torch.empty``, which the meta
    device context captures, where its GPU path names ``torch.cuda.current_device()`` explicitly), and the local
    layer spec without document masks (Transformer Engine's fused modules hold the same parameters, and may not be
    installed, or not support meta; document masks change no shape and would need the tokenizer's end-of-document
    id). Initialisation stays on: on meta it is a no-op, and it is what marks TP-split weights
    ``tensor_model_parallel``.
    """
    import torch

    from mtp_megatron.model.builder import construct_model, transformer_config

    local = copy.deepcopy(cfg)
    local.model.transformer_impl = "local"
    local.data.reset_attention_mask = False
    config = transformer_config(local, torch.device("cpu"))
    with torch.device("meta"):
        return construct_model(local, config, groups, first, last)
