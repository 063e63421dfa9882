"""Bytes of training state one rank holds, by kind: parameters, gradients, optimizer state.

For the sharding tests and bench/sharding_memory.py. Tensors are counted by their storage, once each, so views
into megatron's flat buffers or DeepSpeed's flat partitions are not counted twice, and an optimizer's "master"
copy counts only where it is a separate storage (fp32 training under megatron-core updates the weights in place;
DeepSpeed ZeRO keeps its own fp32 partition).
"""

from __future__ import annotations

from typing import Iterable

import torch

from mtp_megatron.training.deepspeed_engine import is_deepspeed_engine


def _storages(tensors: Iterable[torch.Tensor]) -> dict[int, int]:
    """{storage address: bytes} of the non-empty tensors given."""
    found = {}
    for tensor in tensors:
        if torch.is_tensor(tensor) and tensor.numel():
            storage = tensor.untyped_storage()
            found[storage.data_ptr()] = storage.nbytes()
    return found


def _adam_state(torch_optimizer) -> list[torch.Tensor]:
    return [value for state in torch_optimizer.state.values() for value in state.values() if torch.is_tensor(value)]


def state_bytes(model, optimizer) -> dict[str, int]:
    """{"params", "grads", "optimizer"}: bytes this rank holds for each now. Measure gradients once the step's
    backward is done and before its update: megatron's gradient buffers live throughout, but DeepSpeed allocates
    ZeRO-1's full and ZeRO-2's partitioned gradients for each step and frees them after the update
    (``deepspeed_engine.forward_backward(after_backward=...)``)."""
    if is_deepspeed_engine(model):
        return _deepspeed_bytes(model, optimizer)
    params = _storages(model.parameters())
    grads = _storages(buffer.grad_data for buffer in model.buffers)  # megatron DDP's flat gradient buffers
    moments, masters = [], []
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        moments += _adam_state(part.optimizer)
        for name in ("shard_fp32_from_float16_groups", "fp32_from_float16_groups", "shard_fp32_groups"):
            masters += [p for group in getattr(part, name, []) for p in group]
    state = {k: v for k, v in _storages([*moments, *masters]).items() if k not in params}
    return {"params": sum(params.values()), "grads": sum(grads.values()), "optimizer": sum(state.values())}


def _deepspeed_bytes(engine, optimizer) -> dict[str, int]:
    stage, module = engine.zero_optimization_stage(), engine.module
    if stage == 3:  # each rank keeps its partition of every parameter
        params = _storages(p.ds_tensor for p in module.parameters())
        grads = _storages([optimizer.grad_partitions_flat_buffer])
        masters = list(optimizer.fp32_partitioned_groups_flat)
    else:
        params = _storages(module.parameters())
        masters = list(optimizer.single_partition_of_fp32_groups)
        # The reduced partition, plus what the parameters still hold: ZeRO-1 accumulates full gradients
        # (``grad_accum``) over the microbatches and reduces them at the last, ZeRO-2 reduces them as they arrive.
        partition = [t for value in optimizer.averaged_gradients.values() if value is not None
                     for t in (value if isinstance(value, (list, tuple)) else [value])]
        grads = _storages([*partition, *(p.grad for p in module.parameters()),
                           *(getattr(p, "grad_accum", None) for p in module.parameters())])
    state = _storages([*_adam_state(optimizer.optimizer), *masters])
    return {"params": sum(params.values()), "grads": sum(grads.values()), "optimizer": sum(state.values())}


def state_bytes_in_a_step(cfg, env) -> dict[str, int]:
    """Build the run's model and optimizer, train one step (so the Adam state exists), then return the most
    parameter, gradient and optimizer bytes this rank holds during a second step: after its backward (megatron),
    or after each microbatch's backward before the update (DeepSpeed, whose gradients live only then)."""
    from mtp_megatron.data.datasets import build_datasets
    from mtp_megatron.data.loader import microbatches
    from mtp_megatron.training import deepspeed_engine
    from mtp_megatron.training.setup import setup_model_and_optimizer
    from mtp_megatron.training.step import train_step

    model, optimizer, scheduler = setup_model_and_optimizer(cfg, env)
    train_data, _ = build_datasets(cfg, env)
    data = microbatches(train_data, 0, cfg, env)
    num_microbatches = env.dims.num_microbatches(cfg.train.global_batch_size, cfg.train.micro_batch_size)
    train_step([model], optimizer, scheduler, data, num_microbatches, cfg, env)
    peak: dict[str, int] = {}

    def measure() -> None:
        for kind, value in state_bytes(model, optimizer).items():
            peak[kind] = max(value, peak.get(kind, 0))

    if is_deepspeed_engine(model):
        deepspeed_engine.forward_backward(model, data, num_microbatches, False, after_backward=measure)
    else:
        train_step([model], optimizer, scheduler, data, num_microbatches, cfg, env)
        measure()
    return peak
