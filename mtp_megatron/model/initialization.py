"""Initial weights that depend on the seed and each layer's global index only, not on the parallel layout.

megatron-core draws every initial weight from the process's current random generators, so what a layer starts
from depends on what was built before it on the same rank: with pipeline parallelism the layers of stage 1 would
start from stage 0's stream (every rank seeds alike), and middle stages would start from identical layers. Here
each part of the model is built inside ``seeded_init(seed, key)``, which gives it a stream of its own, derived
from the run's seed and a key that names it globally (``layer/7`` is the 7th transformer layer of the whole
model on every layout; ``embedding``, ``output_layer``), and restores the surrounding generators afterwards.

With ``use_cpu_initialization`` (model/builder.py sets it on every device) megatron-core initialises each
tensor-parallel weight as the full master tensor on the CPU and keeps this rank's slices, so the same seed gives
the same initial model at every TP x PP layout, on CPU and GPU alike. Transformer Engine's layers initialise on
the GPU from megatron's RNG tracker, which ``seeded_init`` seeds per key as well: the same model at every PP
layout, but not across TP sizes (each TP rank draws its own slice).
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Iterator, Optional

import torch
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, model_parallel_cuda_manual_seed
from megatron.core.transformer.transformer_layer import TransformerLayer, get_transformer_layer_offset
from megatron.core.utils import get_pg_rank


def stream_seed(seed: int, key: str) -> int:
    """A 63-bit seed for ``key``'s stream: stable across processes and Python runs (unlike ``hash``)."""
    digest = hashlib.sha256(f"mtp-megatron/{seed}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@contextlib.contextmanager
def seeded_init(seed: int, key: str) -> Iterator[None]:
    """Run the body on generators seeded for ``key`` (CPU, CUDA, megatron's TP-region tracker); restore after."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    tracker = get_cuda_rng_tracker()
    tracker_states = tracker.get_states() if tracker.is_initialized() else None
    part_seed = stream_seed(seed, key)
    if tracker_states is not None:
        # megatron's own seeding of the TP-region streams (seed + 2718 + tp_rank), so TE's GPU initialisation of
        # TP-split weights draws from a stream of this key too.
        model_parallel_cuda_manual_seed(part_seed % 2**31)
    torch.manual_seed(part_seed)  # CPU (megatron's master weights) and every CUDA device
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)
        if tracker_states is not None:
            tracker.set_states(tracker_states)


class SeededTransformerLayer(TransformerLayer):
    """megatron-core's ``TransformerLayer``, built inside ``seeded_init(init_seed, 'layer/<global number>')``.

    The global number is the one ``TransformerLayer`` computes itself (local number plus the stage's offset), so
    layer 7 is initialised alike whichever stage holds it. The MTP heads are numbered after the trunk
    (model/heads/), so they get streams of their own too.
    """

    def __init__(self, config, submodules, layer_number: int = 1, *args, init_seed: Optional[int] = None,
                 pg_collection=None, vp_stage: Optional[int] = None, **kwargs):
        pp_rank = get_pg_rank(pg_collection.pp) if pg_collection is not None else None  # None: megatron's state
        global_number = layer_number + get_transformer_layer_offset(config, vp_stage, pp_rank)
        with seeded_init(init_seed, f"layer/{global_number}") if init_seed is not None else contextlib.nullcontext():
            super().__init__(config, submodules, layer_number, *args, pg_collection=pg_collection,
                             vp_stage=vp_stage, **kwargs)
