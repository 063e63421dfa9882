"""The training command with a fault injected, for tests/checkpoint/test_fault_tolerance.py. It lives with the
tests, outside the package, so no installed trainer carries it. Never use it for real runs.

``MTP_FAULT=<spec> [torchrun ...] python -m tests.faults [the arguments of mtp_megatron.train]``, run from the
repository root (or with it on ``PYTHONPATH``), installs the fault that ``MTP_FAULT`` names, then runs
``mtp_megatron.train.main`` and exits with its code.
Faults (a rank SIGKILLs itself: no handler, no cleanup, like a node lost or the OOM killer):

* ``kill_rank=R,at_step=S``: rank R dies right after its part of optimizer step S is done (``TrainState.advance``
  to step S; before that step is logged, checkpointed or agreed on).
* ``kill_during_save=S,rank=R``: rank R dies while the checkpoint of step S is being saved, after its shard files
  are written and before the save is finished (megatron-core's finalize: gathering every rank's write results,
  writing ``.metadata``), so before the checkpoint can be committed (manifest, rename of ``iter_N.tmp``,
  ``latest``). Dying any later, after ``dist_checkpointing.save`` returned, would let rank 0 commit a complete
  checkpoint.
* ``kill_during_commit=S,rank=R``: rank R (rank 0 commits) dies in the commit of step S's checkpoint after its
  manifest is written and before ``iter_N.tmp`` is renamed (after any folder of that name was set aside).

A fault fires only in the first attempt of a torchrun job (``TORCHELASTIC_RESTART_COUNT`` unset or ``0``), so a
job restarted by ``torchrun --max-restarts`` runs clean. Without ``MTP_FAULT`` this is the plain training command.
"""

from __future__ import annotations

import os
import signal
import sys

ENV = "MTP_FAULT"
_FAULTS = {  # the keys of each fault: its own name first
    "kill_rank": ("kill_rank", "at_step"),
    "kill_during_save": ("kill_during_save", "rank"),
    "kill_during_commit": ("kill_during_commit", "rank"),
}


def parse(spec: str) -> dict[str, int]:
    """``"kill_rank=1,at_step=5"`` -> ``{"kill_rank": 1, "at_step": 5}``; ValueError for anything else."""
    fields = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit():
            raise ValueError(f"{ENV}: {item!r} is not key=<non-negative integer>")
        fields[key.strip()] = int(value)
    kinds = [key for key in fields if key in _FAULTS]
    if len(kinds) != 1 or set(fields) != set(_FAULTS[kinds[0]]):
        raise ValueError(f"{ENV}={spec!r}: expected one of " + ", ".join(
            ",".join(f"{key}=N" for key in keys) for keys in _FAULTS.values()))
    return fields


def first_attempt() -> bool:
    return os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _die(what: str) -> None:
    print(f"[fault] rank {_rank()}: SIGKILL {what}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def install(fault: dict[str, int]) -> None:
    """Monkeypatch this process for ``fault`` (see ``parse``); nothing on other ranks or in a restarted attempt."""
    from mtp_megatron.checkpoint import store

    if "kill_rank" in fault and fault["kill_rank"] == _rank():
        from mtp_megatron.training.state import TrainState

        step, advance = fault["at_step"], TrainState.advance

        def advance_then_die(self, global_batch_size: int) -> None:
            advance(self, global_batch_size)
            if self.step == step:
                _die(f"after step {step}")

        TrainState.advance = advance_then_die

    if "kill_during_save" in fault and fault["rank"] == _rank():
        # megatron-core's torch_dist strategy runs this on every rank once its own files are written (sync and
        # async saves alike); its first act is a gather of all ranks' write results, so nothing is final yet.
        from megatron.core.dist_checkpointing.strategies import torch as torch_strategy

        step, finalize = fault["kill_during_save"], torch_strategy.save_state_dict_async_finalize

        def die_before_finalize(storage_writer, *args, **kwargs):
            folder = str(storage_writer.checkpoint_dir)
            if folder.endswith(store.TMP_SUFFIX):
                folder = folder[: -len(store.TMP_SUFFIX)]
            if store.step_of(folder) == step:
                _die(f"while saving step {step}: shard files written to {storage_writer.checkpoint_dir}, not "
                     "finalized")
            return finalize(storage_writer, *args, **kwargs)

        torch_strategy.save_state_dict_async_finalize = die_before_finalize

    if "kill_during_commit" in fault and fault["rank"] == _rank():
        step, rename = fault["kill_during_commit"], store._rename

        def die_before_rename(source: str, destination: str) -> None:
            if source.endswith(store.TMP_SUFFIX) and store.step_of(destination) == step:
                _die(f"while committing step {step}: {source} complete, not renamed")
            rename(source, destination)

        store._rename = die_before_rename


def main(argv=None) -> int:
    spec = os.environ.get(ENV, "")
    if spec:
        try:
            fault = parse(spec)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        if first_attempt():
            install(fault)
    from mtp_megatron.train import main as train_main

    return train_main(argv)


if __name__ == "__main__":  # the guard matters: dist_checkpointing's spawned helper re-imports this module
    sys.exit(main())
