"""The model part of the distributed checkpoint from each rank's shard of every parameter, for the engines that
shard parameters over data parallelism (ZeRO-3's flat partitions, FSDP2's dim-0 row blocks): a save writes and a
load reads only what the rank holds; no parameter is gathered whole.

Every engine writes the same global tensors (checkpoint/checkpointer.py), so that checkpoints reshard and load
across engines. Their structure (keys, global shapes, TP offsets, the SwiGLU ``linear_fc1`` factory that splits
the weight into gate and up halves) is megatron-core's ``sharded_state_dict`` of the bare model, taken here from a
twin built on the meta device (``model_on_meta``: shapes without memory). Each of its ShardedTensors covers a
contiguous range of its TP-local parameter flattened row-major (the whole parameter, or one fc1 half); a rank's
shard is another such range (``FlatShard``), and their intersection is split into rectangular blocks
(``flat_range_blocks``: a partial row, whole rows, a partial row, recursively in more dimensions), each one a
ShardedTensor with this rank's elements as data. megatron-core 0.16 writes such uneven shards through torch
distributed checkpoint's chunk metadata (``axis_fragmentations=None``; it no longer supports ``flattened_range``),
and a load of any layout reads any chunks, so the checkpoint holds the same tensors as a gathered save wrote.

A rank whose shard of a parameter is empty (padding: more DP ranks than rows or elements) writes and reads no
block of it; megatron-core counts a key as loaded when any rank asks for it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

from mtp_megatron.config import Config
from mtp_megatron.distributed.parallel import ParallelEnv


@dataclass(frozen=True)
class FlatShard:
    """What one rank holds of a parameter: elements ``[start, start + data.numel())`` of the TP-local parameter
    flattened row-major."""

    start: int
    data: torch.Tensor
    """1-D, without padding; a view into the engine's own storage (a load copies into it)."""


def local_layers(cfg: Config) -> Config:
    """``cfg`` with megatron-core's local layers (FSDP2 trains them; checkpoints are built from them)."""
    local = copy.deepcopy(cfg)
    local.model.transformer_impl = "local"
    return local


def model_on_meta(cfg: Config, env: ParallelEnv, document_eod: Optional[int]) -> torch.nn.Module:
    """The bare model's twin on the meta device, with megatron-core's local layers: the checkpoint's structure.
    ``use_cpu_initialization`` (always set by ``transformer_config``) makes megatron create weights with plain
    ``torch.empty``, which the meta device captures; Transformer Engine's fused layers have the same checkpoint
    keys (model/specs.py) and would name a device of their own."""
    from mtp_megatron.model.builder import construct_model, transformer_config

    local = local_layers(cfg)
    config = transformer_config(local, env.device)
    with torch.device("meta"):
        return construct_model(local, config, env.groups, env.is_first_stage, env.is_last_stage,
                               cuda=env.device.type == "cuda", document_eod=document_eod)


class ShardedModelState:
    """An engine's model part of checkpoints from its parameter shards: the meta-device twin (built at the first
    checkpoint) and the load in progress between ``sharded_state`` and ``load``."""

    def __init__(self, cfg: Config, env: ParallelEnv, module: torch.nn.Module):
        self.cfg, self.env, self.module = cfg, env, module
        self._twin: Optional[torch.nn.Module] = None
        self._loading: Optional[FlatShardCheckpoint] = None

    def sharded_state(self, shards: dict[str, "FlatShard"], metadata: dict, is_loading: bool) -> dict:
        """``{"model": ...}`` from this rank's ``shards`` (by parameter name)."""
        if self._twin is None:
            self._twin = model_on_meta(self.cfg, self.env, self.module.document_eod)
        checkpoint = FlatShardCheckpoint(self._twin, self.module, shards)
        self._loading = checkpoint if is_loading else None
        return {"model": checkpoint.sharded_state_dict(metadata, is_loading)}

    def load(self, state_dict: dict) -> list[str]:
        """What the load read into the shards of the last ``sharded_state(is_loading=True)``; keys that did not
        fit."""
        problems, self._loading = self._loading.load(state_dict), None
        return problems


def parameter_names(twin: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """{name: twin parameter}, under the local layers' names and under the checkpoint names that the layers' key
    maps give them (Transformer Engine's fused modules name their parameters so: ``input_layernorm.weight`` is
    ``self_attention.linear_qkv.layer_norm_weight`` there)."""
    names = dict(twin.named_parameters())
    for prefix, module in twin.named_modules():
        keys_map = getattr(getattr(module, "submodules_config", None), "sharded_state_dict_keys_map", None) or {}
        for local, renamed in keys_map.items():
            start = f"{prefix}.{local}"
            names.update({f"{prefix}.{renamed}{name[len(start):]}": param
                          for name, param in list(names.items()) if name.startswith(start)})
    return names


def flat_range_blocks(shape: tuple[int, ...], start: int, stop: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The rectangular blocks (offset, shape) that elements ``[start, stop)`` of a row-major tensor of ``shape``
    make, in order; each block is contiguous in the flattened tensor."""
    if start >= stop:
        return []
    if len(shape) <= 1:
        return [((start,), (stop - start,))]
    inner = math.prod(shape[1:])
    first, last = start // inner, stop // inner  # the rows the range starts in and ends before (or in)

    def within_row(row: int, begin: int, end: int):
        return [((row, *offset), (1, *size)) for offset, size in flat_range_blocks(shape[1:], begin, end)]

    if first == last:
        return within_row(first, start % inner, stop % inner)
    blocks = []
    if start % inner:
        blocks += within_row(first, start % inner, inner)
        first += 1
    if last > first:
        blocks.append(((first, *([0] * (len(shape) - 1))), (last - first, *shape[1:])))
    if stop % inner:
        blocks += within_row(last, 0, stop % inner)
    return blocks


@dataclass
class _Block:
    """One block of this rank's shard in the checkpoint: its ShardedTensor and where its elements live."""

    sharded: ShardedTensor
    target: torch.Tensor  # the view of the shard's data it is written from or loaded into


class FlatShardCheckpoint:
    """One save or load of the model from flat shards: ``sharded_state_dict`` for megatron-core's dist
    checkpointing, then for a load ``load`` with what it read."""

    def __init__(self, twin: torch.nn.Module, module: torch.nn.Module, shards: dict[str, FlatShard]):
        """``twin``: ``model_on_meta``'s; ``module``: the engine's bare model, whose ``_extra_state`` objects are
        saved and loaded; ``shards``: this rank's shard of each parameter, by the module's parameter names."""
        self.module = module
        names = parameter_names(twin)
        self._shards: dict[int, FlatShard] = {}  # by id of the twin's parameter
        for name, shard in shards.items():
            if name not in names:
                raise RuntimeError(f"{name}: a parameter of this model has no twin in the checkpoint structure "
                                   "(engines/flat_shards.py model_on_meta): the model and its meta build disagree")
            self._shards[id(names[name])] = shard
        self._twin_names = {id(param): name for name, param in twin.named_parameters()}
        self._twin = twin
        self._blocks: dict[str, list[_Block]] = {}

    def sharded_state_dict(self, metadata: dict, is_loading: bool) -> dict:
        """The model's sharded state: this rank's blocks of every parameter (a list per state-dict key; for a
        load, fresh tensors to read into) and the ``_extra_state`` objects of the engine's module."""
        state = {}
        for key, value in self._twin.sharded_state_dict(metadata=dict(metadata)).items():
            if isinstance(value, ShardedObject):
                state[key] = self._extra_state(key, value)
            elif isinstance(value, (ShardedTensor, ShardedTensorFactory)):
                blocks = [block for sharded, param, start in self._parts(key, value)
                          for block in self._blocks_of(sharded, param, start, is_loading)]
                self._blocks[key] = blocks
                state[key] = [block.sharded for block in blocks]
            else:
                raise TypeError(f"{key}: {type(value).__name__} in the model's sharded state dict; the flat-shard "
                                "checkpoint (engines/flat_shards.py) knows ShardedTensors, factories and objects")
        return state

    def load(self, loaded: dict) -> list[str]:
        """Copy what the load read into this rank's shards and the module's ``_extra_state``; the keys that did
        not fit."""
        problems = []
        with torch.no_grad():
            for key, blocks in self._blocks.items():
                tensors = loaded.get(key, [])
                if len(tensors) != len(blocks):
                    problems.append(f"{key}: {len(tensors)} of this rank's {len(blocks)} blocks were read")
                    continue
                for block, tensor in zip(blocks, tensors):
                    block.target.copy_(tensor.reshape(block.target.shape))
        for key, value in loaded.items():
            if key.endswith("_extra_state"):
                owner = self._submodule(key)
                if owner is not None:
                    owner.set_extra_state(value)
        return problems

    # -- building the blocks

    def _parts(self, key: str, value) -> Iterator[tuple[ShardedTensor, torch.Tensor, int]]:
        """The ShardedTensors of one state-dict entry, each with its parameter and the flat offset in it where
        the ShardedTensor's elements begin."""
        if id(value.data) not in self._twin_names:
            raise RuntimeError(f"{key}: the checkpoint holds a tensor that is not a parameter; the flat-shard "
                               "checkpoint (engines/flat_shards.py) writes parameters only")
        for part, start in contiguous_parts(value):
            yield part, value.data, start

    def _blocks_of(self, sharded: ShardedTensor, param: torch.Tensor, start: int, is_loading: bool) -> list[_Block]:
        """This rank's blocks of ``sharded``, which covers the elements of ``param`` (flattened) from ``start``."""
        shard = self._shards.get(id(param))
        if shard is None:
            raise RuntimeError(f"{self._twin_names[id(param)]}: the engine gave no shard of this parameter")
        begin = max(start, shard.start)
        end = min(start + sharded.data.numel(), shard.start + shard.data.numel())
        blocks = []
        position = begin - shard.start  # where the next block's elements are in the shard's data
        for offset, shape in flat_range_blocks(tuple(sharded.local_shape), begin - start, end - start):
            size = math.prod(shape)
            target = shard.data[position:position + size].view(shape)
            position += size
            data = torch.empty_like(target) if is_loading else target
            blocks.append(_Block(block_tensor(sharded, offset, shape, data), target))
        return blocks

    def _extra_state(self, key: str, value: ShardedObject) -> ShardedObject:
        """The engine's module's own ``_extra_state`` (Transformer Engine keeps FP8 metadata there) where it has
        the module, the twin's otherwise."""
        owner = self._submodule(key)
        return dataclasses.replace(value, data=owner.get_extra_state()) if owner is not None else value

    def _submodule(self, key: str) -> Optional[torch.nn.Module]:
        path = key[: -len("._extra_state")]
        try:
            return self.module.get_submodule(path)
        except AttributeError:
            return None


def contiguous_parts(value) -> list[tuple[ShardedTensor, int]]:
    """The ShardedTensors of a parameter's entry in a sharded state dict (itself, or a factory's parts: each a
    contiguous view of the parameter, as SwiGLU fc1's halves), each with the flat offset in the parameter where its
    elements begin."""
    param = value.data
    found = []
    for part in value.build() if isinstance(value, ShardedTensorFactory) else [value]:
        if not part.data.is_contiguous():
            raise RuntimeError(f"{value.key}: {part.key} is not a contiguous range of its parameter")
        found.append((part, part.data.storage_offset() - param.storage_offset()))
    return found


def range_blocks(value, start: int, flat: torch.Tensor, key: str, replica_id) -> list[ShardedTensor]:
    """ShardedTensors under ``key`` for ``flat``: elements ``[start, start + flat.numel())`` of the parameter
    that ``value`` (its ShardedTensor or factory) describes, flattened row-major; each block's data is a view of
    ``flat``. For state kept as flat ranges of the parameters (the distributed optimizer's)."""
    blocks, stop = [], start + flat.numel()
    for part, part_start in contiguous_parts(value):
        begin, end = max(start, part_start), min(stop, part_start + part.data.numel())
        position = begin - start
        for offset, shape in flat_range_blocks(tuple(part.local_shape), begin - part_start, end - part_start):
            size = math.prod(shape)
            block = block_tensor(part, offset, shape, flat[position:position + size])
            blocks.append(dataclasses.replace(block, key=key, replica_id=replica_id))
            position += size
    return blocks


def block_tensor(sharded: ShardedTensor, offset: tuple[int, ...], shape: tuple[int, ...],
                 data: torch.Tensor) -> ShardedTensor:
    """The ShardedTensor of the block at ``offset`` (within ``sharded``'s local tensor) of ``shape``, holding
    ``data``: the same global tensor, an uneven chunk of it. The prepended axes (megatron's layer axis) become
    size-1 dimensions of the chunk, the one form uneven chunks have. Only this DP rank holds the block: the DP
    coordinate of megatron's (pp, tp, dp) replica id is 0 (a TP-replicated weight stays a replica on TP ranks >
    0, as in a gathered save)."""
    prepended = sharded.prepend_axis_num
    if not (isinstance(sharded.replica_id, tuple) and len(sharded.replica_id) == 3):
        raise RuntimeError(f"{sharded.key}: replica id {sharded.replica_id!r} is not megatron's (pp, tp, dp)")
    local_shape = (1,) * prepended + tuple(shape)
    global_offset = (*sharded.global_offset[:prepended],
                     *(base + extra for base, extra in zip(sharded.global_offset[prepended:], offset)))
    return ShardedTensor(
        sharded.key, data.view(local_shape), data.dtype, local_shape, tuple(sharded.global_shape), global_offset,
        axis_fragmentations=None, replica_id=(*sharded.replica_id[:2], 0), prepend_axis_num=0,
        allow_shape_mismatch=sharded.allow_shape_mismatch)
