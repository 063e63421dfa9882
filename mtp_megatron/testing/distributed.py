"""Run a function on N real processes joined in one gloo process group, and collect what each returns.

Modelled on OLMo-core's ``run_distributed_test``: ``run_distributed(fn, world_size=4, *args)`` spawns the
ranks with torchrun's environment variables set, so ``init_distributed`` sees exactly what it sees under
torchrun. ``fn`` must be importable (a module-level function). A rank's exception fails the call with that
rank's traceback.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import traceback
from typing import Any, Callable

import torch

from mtp_megatron.distributed.parallel import destroy_distributed, free_port


def _worker(fn: Callable, rank: int, world_size: int, port: int, out_dir: str, args: tuple) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    try:
        result = fn(*args)
        torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
    except BaseException:
        with open(os.path.join(out_dir, f"{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise SystemExit(1)
    finally:
        if torch.distributed.is_initialized():
            destroy_distributed()


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout_s: float = 600) -> list:
    """Run ``fn(*args)`` on ``world_size`` ranks; returns the per-rank results in rank order."""
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, out_dir, args)) for r in range(world_size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout_s)
        for p in procs:
            if p.is_alive():
                p.kill()
        errors = []
        for rank, p in enumerate(procs):
            err = os.path.join(out_dir, f"{rank}.err")
            if os.path.exists(err):
                errors.append(f"--- rank {rank} ---\n{open(err).read()}")
            elif p.exitcode != 0:
                errors.append(f"--- rank {rank} --- exit code {p.exitcode} (killed, timed out or crashed)")
        if errors:
            raise RuntimeError("distributed run failed:\n" + "\n".join(errors))
        return [torch.load(os.path.join(out_dir, f"{r}.pt"), weights_only=False) for r in range(world_size)]
