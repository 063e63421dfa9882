"""Run a function on N real processes joined in one gloo process group, and collect what each returns.

Modelled on OLMo-core's ``run_distributed_test``: ``run_distributed(fn, world_size=4, *args)`` starts the
ranks with torchrun's environment variables set, so ``init_distributed`` sees exactly what it sees under
torchrun. ``fn`` must be importable (a module-level function). A rank's exception fails the call with that
rank's traceback.

The ranks are forked from a multiprocessing forkserver that has imported torch and megatron-core once (``PRELOAD``)
instead of spawned: importing them costs about 6 s of CPU per process, which at a few hundred ranks per test run is
most of a 2-core machine's time. The forkserver itself is a fresh interpreter (nothing of the caller's state, no
threads, no process group); each rank gets the caller's environment and working directory as they are at the
call (what torch and megatron-core read from the environment on import comes from the first call's).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import time
import traceback
from typing import Any, Callable

import torch

from mtp_megatron.distributed.parallel import destroy_distributed, free_port


PRELOAD = ["torch", "torch.distributed", "megatron.core", "megatron.core.models.gpt", "megatron.core.optimizer"]
"""What the forkserver imports before forking ranks (the modules every rank imports; none of them starts a thread
or sets anything up on import)."""


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _worker(fn: Callable, rank: int, world_size: int, port: int, out_dir: str, args: tuple,
            environ: dict) -> None:
    # A forked rank starts with the forkserver's environment, not the caller's (multiprocessing's preparation
    # data carries only the caller's working directory and sys.path).
    os.environ.clear()
    os.environ.update(environ)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    # One world group for the worker's life: ``fn`` may run several jobs (train() calls) one after another, and
    # init_distributed/destroy_distributed then only rebuild megatron's parallel state inside it.
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(*args)
        torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
    except BaseException:
        with open(os.path.join(out_dir, f"{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise SystemExit(1)
    finally:
        destroy_distributed()
        torch.distributed.destroy_process_group()


def _wait_all_or_first_failure(procs: list, timeout_s: float, grace_s: float = 20) -> None:
    """Wait until every rank has exited; once one fails, give the others ``grace_s`` to write their own error,
    then kill them (they would otherwise wait in a collective for the dead rank until gloo's 30-minute timeout)."""
    deadline = time.monotonic() + timeout_s
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        if any(p.exitcode not in (None, 0) for p in procs):
            deadline = min(deadline, time.monotonic() + grace_s)
        time.sleep(0.1)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout_s: float = 600) -> list:
    """Run ``fn(*args)`` on ``world_size`` ranks; returns the per-rank results in rank order."""
    ctx = _context()
    port = free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, out_dir, args, dict(os.environ)))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        _wait_all_or_first_failure(procs, timeout_s)
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
