"""Bytes of training state one rank holds in a step, by kind: parameters, gradients, optimizer state.

For the sharding tests and bench/sharding_memory.py. Each engine counts its own tensors by their storage, once
each (``Engine.state_bytes``: views into megatron's flat buffers or DeepSpeed's flat partitions count once; an
optimizer's "master" copy only where it is a separate storage).
"""

from __future__ import annotations


def state_bytes_in_a_step(cfg, env) -> dict[str, int]:
    """Build the run's engine, train one step (so the optimizer state exists), then return the most parameter,
    gradient and optimizer bytes this rank holds during a second step, measured after its backward and before
    its update (after each microbatch's backward under DeepSpeed, whose ZeRO-1/2 hold gradients only then)."""
    from mtp_megatron.data.datasets import build_datasets
    from mtp_megatron.data.loader import microbatches
    from mtp_megatron.engines import build_engine

    engine = build_engine(cfg, env)
    train_data, _ = build_datasets(cfg, env)
    data = microbatches(train_data, 0, cfg, env)
    num_microbatches = env.dims.num_microbatches(cfg.train.global_batch_size, cfg.train.micro_batch_size)
    engine.train_step(data, num_microbatches)
    peak: dict[str, int] = {}

    def measure(final: bool) -> None:
        for kind, value in engine.state_bytes().items():
            peak[kind] = max(value, peak.get(kind, 0))

    engine.train_step(data, num_microbatches, after_backward=measure)
    return peak
