"""Our distributed checkpoints as one dense state dict, and back, in this single process.

A checkpoint saved at any TP x PP x DP layout (megatron or DeepSpeed backend: both store the model as the same
reshardable megatron-core dist checkpoint) is loaded into the TP1 x PP1 model, whose ``state_dict()`` is the
dense form every converter works on: our module names (``embedding.word_embeddings.weight``,
``decoder.layers.{i}.*``, ``mtp_heads.layers.{k}.*``, ``mtp_heads.final_norm.weight``,
``mtp_heads.output_layer.weight``), full tensors, the checkpoint's dtype. Writing goes the other way and gives a
weights-only checkpoint (start training from it with ``checkpoint.load=PATH checkpoint.finetune=true``), which
loads at any layout: dist checkpoints are resharded on load, so the target TP x PP is recorded in its config and
checked, not baked into the files. The whole model sits in this process's memory (13B in bf16: 26 GB).

By default that process is a CPU one (gloo, with mtp_megatron/distributed/cpu_compat.py applied). With
``device="cuda"`` the TP1 x PP1 model is built on the GPU instead (an NCCL world of one) and cpu_compat is never
imported: once applied, it would silently put every later CUDA tensor of the process on the CPU. So a process
that decodes or evaluates on a GPU must read and build on "cuda" from the start.
"""

from __future__ import annotations

import contextlib
import copy
import os
from typing import Iterator, Optional

import torch

from mtp_megatron.config import Config, config_from_dict
from mtp_megatron.distributed.topology import validate_for_world

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def with_vocab_rows(cfg: Config, rows: int, tp: int) -> Config:
    """``cfg`` with a ``model.make_vocab_size_divisible_by`` that pads the vocabulary to exactly ``rows`` at
    ``tp`` (megatron's padding depends on TP; a conversion keeps the rows it has, padding ones included)."""
    out = copy.deepcopy(cfg)
    for divisor in (128, 64, 32, 16, 8, 4, 2, 1):
        out.model.make_vocab_size_divisible_by = divisor
        if out.model.padded_vocab_size(tp) == rows:
            return out
    raise ValueError(f"the checkpoint's {rows} vocabulary rows cannot be split over tp={tp} with megatron's padding "
                     f"(vocab_size {cfg.model.vocab_size}); choose a tp that divides {rows}")


def dense_config(cfg: Config, precision: str, device: str = "cpu") -> Config:
    """``cfg`` as a single process on ``device`` holds it: TP1 x PP1, no ZeRO, the given precision."""
    local = copy.deepcopy(cfg)
    local.parallel.tp = local.parallel.pp = 1
    local.parallel.layers_per_stage = None  # one stage holds the whole trunk, whatever split the run trained with
    local.parallel.sharding, local.parallel.sequence_parallel = "none", False
    local.parallel.overlap_grad_reduce = local.parallel.overlap_param_gather = False
    local.parallel.deepspeed_config = None
    local.train.device, local.train.precision = device, precision
    local.data.reset_attention_mask = False  # masks change no weight; the tokenizer file may not be here
    local.model.transformer_impl = "local"  # the dense names are the local layers' (TE's hold the same tensors)
    local.checkpoint.async_save = False
    return local


@contextlib.contextmanager
def single_process(device: str = "cpu") -> Iterator:
    """A world of one process with megatron-core's parallel state at TP1 x PP1: gloo on "cpu", NCCL on "cuda"."""
    from mtp_megatron.config import ParallelConfig
    from mtp_megatron.distributed.parallel import destroy_distributed, init_distributed

    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    saved = {key: os.environ.pop(key, None) for key in keys}  # a launcher's world is not this one
    env = init_distributed(ParallelConfig(tp=1, pp=1), device, seed=0)
    try:
        yield env
    finally:
        destroy_distributed()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _stored_precision(path: str) -> str:
    """The dtype the checkpoint stores its weights in (bf16 for GPU runs, fp32 for CPU ones)."""
    from megatron.core import dist_checkpointing

    metadata = dist_checkpointing.load_tensors_metadata(path)
    dtype = next(t.dtype for key, t in metadata.items() if key.endswith("word_embeddings.weight"))
    return next(name for name, d in DTYPES.items() if d == dtype)


def read_checkpoint(path: str, device: str = "cpu") -> tuple[Config, dict[str, torch.Tensor]]:
    """(the run's config, dense state dict on ``device``) of our checkpoint at ``path`` (an ``iter_NNNNNNN``
    folder), in the dtype it stores."""
    from mtp_megatron.checkpoint.checkpointer import Checkpointer
    from mtp_megatron.checkpoint.state import read_meta
    from mtp_megatron.checkpoint.store import verify
    from mtp_megatron.engines import ModelOnly
    from mtp_megatron.model.builder import build_model

    verify(path)
    meta = read_meta(path)
    cfg = with_vocab_rows(config_from_dict(meta["config"]), meta["padded_vocab_size"], tp=1)
    with single_process(device) as env:
        local = dense_config(cfg, _stored_precision(path), device)
        model = build_model(local, env)
        Checkpointer(local, env, ModelOnly(local, env, model)).load(path, weights_only=True, verified=True)
        # No clone: the model is dropped on return, so the dict's tensors are the only copy of the weights.
        state = {k: v.detach() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    return cfg, state


def write_checkpoint(cfg: Config, state: dict[str, torch.Tensor], path: str, target_tp: int = 1,
                     target_pp: int = 1) -> None:
    """A weights-only checkpoint of ``state`` at ``path``, whose config names ``target_tp`` x ``target_pp``
    (checked to divide the model). ``path`` must not exist; it appears only when complete."""
    from mtp_megatron.checkpoint.checkpointer import save_weights

    if os.path.exists(path):
        raise FileExistsError(f"{path} exists; choose a new output folder")
    target = copy.deepcopy(cfg)
    if target_pp != cfg.parallel.pp:
        target.parallel.layers_per_stage = None  # the source's split is for its own pp: even at the target's
    target.parallel.tp, target.parallel.pp = target_tp, target_pp
    target.parallel.sharding = "distributed_optimizer"
    target.parallel.overlap_grad_reduce = target.parallel.overlap_param_gather = False
    validate_for_world(target, target_tp * target_pp)  # ConfigError naming what does not divide
    target = with_vocab_rows(target, state["embedding.word_embeddings.weight"].shape[0], target_tp)
    with dense_model(target, state) as (model, env):
        # The saved config is the target's (its layout and sharding); the tensors are the same at any layout.
        save_weights(model, env, target, path)


@contextlib.contextmanager
def dense_model(cfg: Config, state: dict[str, torch.Tensor], device: str = "cpu", precision: Optional[str] = None,
                consume: bool = False) -> Iterator:
    """(our TP1 x PP1 model holding ``state``, its ParallelEnv), in this process (evaluation, decoding, checks),
    on ``device`` in ``precision`` (default: ``state``'s dtype). With ``consume`` each tensor is popped from
    ``state`` once copied, so the weights are not held twice (``state`` is left empty)."""
    from mtp_megatron.model.builder import build_model

    embedding = state["embedding.word_embeddings.weight"]
    precision = precision or next(name for name, d in DTYPES.items() if d == embedding.dtype)
    local = dense_config(with_vocab_rows(cfg, embedding.shape[0], 1), precision, device)
    del embedding  # a consumed state must free it
    with single_process(device) as env:
        model = build_model(local, env)
        _load_dense(model, state, consume)
        yield model.eval(), env


def _load_dense(model, state: dict[str, torch.Tensor], consume: bool = False) -> None:
    """Copy ``state`` into ``model`` (any device or dtype to the model's), naming every missing, unexpected or
    misshapen tensor; with ``consume`` pop each tensor from ``state`` once copied (nothing is popped when the
    weights do not fit)."""
    own = {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}
    problems = [f"missing {k} {tuple(v.shape)}" for k, v in own.items() if k not in state]
    problems += [f"unexpected {k} {tuple(v.shape)}" for k, v in state.items() if k not in own]
    problems += [f"{k}: shape {tuple(state[k].shape)}, the model's is {tuple(v.shape)}"
                 for k, v in own.items() if k in state and state[k].shape != v.shape]
    if problems:
        raise ValueError("the weights do not fit the model:\n  - " + "\n  - ".join(problems))
    with torch.no_grad():
        for key, tensor in own.items():
            tensor.copy_(state.pop(key) if consume else state[key])
