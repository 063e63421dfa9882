"""megatron-core's distributed optimizer state in a checkpoint without a gather, reshardable to any TP x PP x DP.

Why: the distributed optimizer keeps, on each data-parallel rank, a contiguous range of its gradient buffer, so
each parameter's Adam moments and fp32 main weights live there as one flat range of that parameter (flattened in
its TP-local shape). megatron-core 0.16 offers two checkpoint forms for them: ``fully_reshardable`` all-gathers
every rank's ranges onto every rank while saving (the whole DP group's optimizer state on each GPU during the
save, which at 13B is what runs out of memory), and ``dp_reshardable`` writes the buffer ranges as they are, which
then load only at the same TP x PP. Its per-parameter form (``fully_sharded_model_space``) described the ranges
with ``ShardedTensor.flattened_range``, which 0.16 refuses.

So each DP rank writes its own range of every parameter as rectangular blocks of that parameter's global tensor
(engines/flat_shards.py ``range_blocks``: chunks on an irregular grid, which 0.16 accepts), under the keys and
with the whole tensors of the ``fully_reshardable`` form (``optimizer.state.{exp_avg,exp_avg_sq,param}.<model
key>``). A load builds the same blocks for its own ranges over fresh flat buffers, lets the checkpoint fill them,
and hands the flat ranges to megatron-core's own loader for its per-parameter form
(``load_parameter_state_from_fs_model_space``), so what reaches the optimizer is what its own code would set. The
non-tensor state (parameter groups, step, the fp16 loss scaler) is megatron-core's ``state_dict()``, written once
as common state, as in its reshardable forms.
"""

from __future__ import annotations

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from mtp_megatron.engines.flat_shards import range_blocks

FORMAT = "fully_sharded_model_space"  # megatron-core's name for per-parameter flat ranges; its loader reads them
# The checkpoint keys are those of megatron-core's fully_reshardable form (its ``param`` is the fp32 main weight,
# which its per-parameter-range loader calls ``fp32_param``): both forms hold the same tensors under the same keys.
CHECKPOINT_NAMES = {"fp32_param": "param"}


def _param_ranges(optimizer: DistributedOptimizer):
    """(index, model parameter, start, end of this rank's range in it), in megatron-core's own order."""
    index = 0
    for gbuf_range_maps in optimizer.gbuf_ranges:
        for per_bucket in gbuf_range_maps.values():
            for range_map in per_bucket:
                for param, param_range_map in range_map["param_map"].items():
                    param_range = param_range_map["param"]
                    yield index, param, param_range.start, param_range.end
                    index += 1


def _tensor_state(optimizer: DistributedOptimizer, model_sharded_state: dict, is_loading: bool) -> dict:
    """{parameter index: {state key: [pieces]}}: each piece a view of this rank's flat range (fresh buffers when
    loading, the live state when saving)."""
    sharded, _ = extract_sharded_tensors_and_factories(model_sharded_state)
    by_param = {base.data: base for base in nested_values(sharded)}
    state = {}
    for index, param, start, end in _param_ranges(optimizer):
        description = by_param[param]
        tensors = optimizer._get_main_param_and_optimizer_states(param)
        tensors["fp32_param"] = tensors.pop("param")
        tensors.pop("step", None)  # a scalar kept in the parameter groups (common state)
        # Every DP rank's range is its own: the DP coordinate of the replica id is the optimizer instance's.
        replica_id = (*description.replica_id[:2], optimizer.distributed_optimizer_instance_id)
        state[index] = {
            name: range_blocks(description, start, torch.empty_like(tensor) if is_loading else tensor.detach(),
                               f"optimizer.state.{CHECKPOINT_NAMES.get(name, name)}.{description.key}", replica_id)
            for name, tensor in tensors.items()}
    return state


def _parts(optimizer) -> list:
    return getattr(optimizer, "chained_optimizers", [optimizer])


def sharded_optimizer_state(optimizer, model_sharded_state: dict, is_loading: bool, metadata: dict):
    """The optimizer's sharded state dict: ours for each DistributedOptimizer part, megatron-core's own for the
    others (a non-distributed optimizer writes whole parameters, replicated over DP)."""
    states = []
    for part in _parts(optimizer):
        if not isinstance(part, DistributedOptimizer):
            states.append(part.sharded_state_dict(model_sharded_state, is_loading, metadata=metadata))
            continue
        state = part.state_dict()
        if is_loading:  # as megatron-core does: allocates the torch optimizer's state before it is filled
            part.load_state_dict(part.state_dict())
        state["param_state"] = _tensor_state(part, model_sharded_state, is_loading)
        state["param_state_sharding_type"] = FORMAT
        states.append(state)
    return states[0] if len(states) == 1 else dict(enumerate(states))


def _flat(loaded: list[torch.Tensor], views: list[torch.Tensor]) -> torch.Tensor:
    """The flat buffer that ``views`` (the pieces' data as requested) cut, holding what the checkpoint gave."""
    for tensor, view in zip(loaded, views):
        if tensor.data_ptr() != view.data_ptr():  # the strategy may load into tensors of its own
            view.copy_(tensor)
    return views[0]._base


def load_targets(optimizer, requested) -> list:
    """Per optimizer part, the data views of the pieces a load asked for ({index: {state key: [views]}}), kept
    before the load (which may replace the requested ShardedTensors in place); None for other parts."""
    parts = [requested] if len(_parts(optimizer)) == 1 else [requested[i] for i in range(len(_parts(optimizer)))]
    return [{index: {name: [piece.data for piece in pieces] for name, pieces in tensors.items()}
             for index, tensors in part["param_state"].items()}
            if part.get("param_state_sharding_type") == FORMAT else None for part in parts]


def load_optimizer_state(optimizer, loaded: dict, targets: list) -> None:
    """Fill the optimizer from ``loaded`` (what dist_checkpointing.load returned for the state dict
    ``sharded_optimizer_state`` built for loading; ``targets``: ``load_targets`` of that state dict)."""
    parts = _parts(optimizer)
    loaded = [loaded] if len(parts) == 1 else [loaded[i] for i in range(len(parts))]
    for part, part_loaded, views in zip(parts, loaded, targets):
        if views is not None:
            part_loaded = {**part_loaded, "param_state": {
                index: {name: _flat(pieces, views[index][name]) for name, pieces in tensors.items()}
                for index, tensors in part_loaded["param_state"].items()}}
        part.load_state_dict(part_loaded)
