"""The run folder (``run.dir``): claimed by one job at a time, written only once the run is known to fit it.

``claim_run_folder`` runs before anything is written: it refuses a ``run.dir`` that is a file, creates the
folder and takes its lock (training/run_lock.py) on rank 0, and shares the verdict so every rank raises the
same error. The resolved config and engine files are written later, by ``record_run``, after the checkpoint the
run resumes from has been checked against this config: a rejected relaunch leaves the folder as it was.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist

from mtp_megatron.config import Config, ConfigError, save_resolved_config
from mtp_megatron.training.run_lock import RunLock, RunLockedError


def claim_run_folder(cfg: Config, rank: int) -> Optional[RunLock]:
    """Collective: create ``run.dir`` and lock it (rank 0). Raises ConfigError or RunLockedError on every rank."""
    lock, error = None, None
    if rank == 0:
        try:
            lock = _claim(cfg.run.dir)
        except (ConfigError, RunLockedError) as e:
            error = e
    verdict = [error]
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise verdict[0]
    return lock


def _claim(run_dir: str) -> RunLock:
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise ConfigError.from_problems([f"run.dir: {run_dir} exists and is not a folder. Fix: choose another "
                                         "run.dir (the run writes its config, metrics and checkpoints there)"])
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as e:
        raise ConfigError.from_problems([f"run.dir: cannot create {run_dir}: {e.strerror}. Fix: choose a "
                                         "writable folder"]) from None
    lock = RunLock(run_dir).acquire()
    if lock.notice:
        print(f"[run] {lock.notice}", flush=True)
    return lock


def record_run(cfg: Config, engine, rank: int, device: Optional[torch.device] = None) -> None:
    """Rank 0: the resolved ``config.yaml`` and the engine's own files (a DeepSpeed run's generated JSON); on CUDA
    (``device``) one log line saying which of megatron-core's fused kernels the model uses, and why not the others."""
    if rank != 0:
        return
    if device is not None and device.type == "cuda":
        from mtp_megatron.model.fusions import cuda_fusions

        print(f"[run] fused kernels: {cuda_fusions(cfg).summary()}", flush=True)
    save_resolved_config(cfg, cfg.run.dir)
    engine.write_run_files(cfg.run.dir)
