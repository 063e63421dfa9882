"""Which checkpoint a run starts from: the folder rules of ``checkpoint.resume`` and ``checkpoint.load``.

The run's own checkpoints come first: ``latest``, then older ones (the caller verifies each and skips a damaged
one). ``checkpoint.load`` naming one of them rolls the run back to it (the later ones are set aside, never
deleted, checkpoint/store.py); naming another folder starts a run whose folder has no checkpoints yet, with its
weights only under ``checkpoint.finetune``. Pure file-system code on rank 0; checkpoint/checkpointer.py shares
the plan with every rank.
"""

from __future__ import annotations

import os
import warnings
from typing import Union

from mtp_megatron.checkpoint import store
from mtp_megatron.checkpoint.store import CheckpointError
from mtp_megatron.config.schema import CheckpointConfig


def start_plan(ckpt: CheckpointConfig, root: str) -> Union[dict, CheckpointError]:
    """Rank 0: which checkpoints to try, in order (see the module docstring), or the CheckpointError to raise.

    A dict: ``candidates`` (paths, best first), ``weights_only``, ``explicit`` (checkpoint.load named it: a damaged
    one is an error, not skipped), ``abandoned`` (checkpoints to set aside once the rollback target loads, or
    None) and ``notes`` (what to tell the user)."""
    plan = {"candidates": [], "weights_only": False, "explicit": False, "abandoned": None, "notes": []}
    for finished in store.finish_interrupted_commits(root):
        plan["notes"].append(f"{finished}: its save had finished and its commit was cut short; committed it now")
    for stale in store.stale_temporaries(root):  # our own saves that died (one live run per folder)
        warnings.warn(f"ignoring {stale}: a save that did not finish; deleting it")
        store._remove(stale)
    own = store.committed(root)
    if ckpt.resume == "never" and own:
        return CheckpointError(f"{root} already holds checkpoints and checkpoint.resume=never. Fix: use a new "
                               "run.dir, or checkpoint.resume=auto to continue that run.")
    load = os.path.realpath(ckpt.load) if ckpt.load else None
    line, abandoned = store.resume_line(root)
    if load is not None and os.path.dirname(load) == os.path.realpath(root):
        target = os.path.join(root, os.path.basename(load))
        if ckpt.finetune:
            return CheckpointError(f"checkpoint.load={ckpt.load} is a checkpoint of this run.dir, and "
                                   "checkpoint.finetune=true would start a new run in the same folder. Fix: "
                                   "use a new run.dir for the fine-tuned run.")
        done = store.rollback_done(root, target)
        latest = store.read_latest(root)
        if done and latest and (store.step_of(latest) or 0) > (store.step_of(target) or 0):
            plan["notes"].append(f"checkpoint.load={ckpt.load}: this rollback was done at {done['time']}; "
                                 f"continuing the run from {latest} (drop checkpoint.load from the command to "
                                 "silence this)")
            plan["candidates"] = line
            return plan
        plan.update(candidates=[target], explicit=True,
                    abandoned=[f for f in own if (store.step_of(f) or 0) > (store.step_of(target) or 0)])
        plan["notes"].append(f"checkpoint.load={ckpt.load} names a checkpoint of this run: rolling the run "
                             "back to it")
        return plan
    if own:
        plan["candidates"] = line
        if abandoned:
            plan["abandoned"] = abandoned
            plan["notes"].append(f"{os.path.join(root, store.LATEST)} names {line[0]}, older than "
                                 f"{', '.join(abandoned)}: rolling the run back to it")
        if load is not None:
            plan["notes"].append(f"checkpoint.load={ckpt.load} is not used: {root} has checkpoints of its own, "
                                 "which the run continues from (checkpoint.load starts a run whose folder has "
                                 "none; for a new run from it, use a new run.dir)")
        return plan
    if load is not None:
        plan.update(candidates=[load], weights_only=ckpt.finetune, explicit=True)
    return plan
