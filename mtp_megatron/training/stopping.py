"""Stop requests that end a run early but cleanly: SIGTERM, SIGUSR1, a ``STOP`` file and a wall-clock budget.

SLURM sends SIGTERM before it kills a job (preemption, ``scancel``, the time limit) and SIGUSR1 when asked with
``#SBATCH --signal=USR1@SECONDS``. A signal reaches some ranks and not others, and at any moment, so the handler
only records it; at each step boundary all ranks agree with one tiny all-reduce, and then all of them save a
checkpoint and leave the loop at the same step. The process then exits 0 and ``<run.dir>/run_state.json`` says
``stopped``: restarting the same command resumes (``checkpoint.resume=auto``).

A file named ``STOP`` in the run folder does the same without any signal (rank 0 looks for it at each step
boundary; the next start of the run removes it): ``touch <run.dir>/STOP`` stops a run by hand, and the SLURM
script (slurm/train_13b.sh) uses it to pass on its time-limit warning, which Slurm delivers to the batch shell
only, so no launcher or helper process ever receives a signal it might die of.

Exit 0, not a special code, because torchrun reads any other code as a failed worker: it would print a failure
and, with ``--max-restarts``, start the run again, which is what a preempted or time-limited job must not do.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Optional

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
STOP_FILE = "STOP"  # in the run folder
_TIME_BUDGET = len(STOP_SIGNALS) + 1  # reason codes after the signals' codes
_FILE = len(STOP_SIGNALS) + 2


class StopRequests:
    """Records stop signals and watches the time budget and ``stop_at_step``; ``agreed_reason`` is the collective
    check."""

    def __init__(self, exit_duration_mins: Optional[float], device: torch.device, stop_at_step: Optional[int] = None,
                 stop_file: Optional[str] = None):
        self.budget_s = exit_duration_mins * 60 if exit_duration_mins else None
        self.stop_at_step = stop_at_step
        self.device = device
        self.stop_file = stop_file  # watched where given (rank 0)
        self.start = time.monotonic()
        self._received: Optional[int] = None  # 1-based index into STOP_SIGNALS
        self._previous = {}

    def __enter__(self) -> "StopRequests":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self._received is None:
            self._received = STOP_SIGNALS.index(signum) + 1
            print(f"[stop] received {signal.Signals(signum).name}: saving a checkpoint and exiting at the end of "
                  "this step", flush=True)

    def agreed_reason(self, step: int) -> Optional[str]:
        """Collective, after ``step``: why the whole job should stop now (any rank's signal, the budget or
        ``stop_at_step``), or None."""
        if step == self.stop_at_step:
            return f"train.stop_at_step={self.stop_at_step} reached"
        local = self._received or 0
        if not local and self.budget_s is not None and time.monotonic() - self.start > self.budget_s:
            local = _TIME_BUDGET
        if not local and self.stop_file and os.path.exists(self.stop_file):
            local = _FILE
        flag = torch.tensor([local], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        code = int(flag.item())
        if code == 0:
            return None
        if code == _TIME_BUDGET:
            return f"train.exit_duration_mins={self.budget_s / 60:g} reached"
        if code == _FILE:
            return f"found the {STOP_FILE} file"
        return f"received {STOP_SIGNALS[code - 1].name}"


def clear_stop_file(path: str) -> None:
    """Remove a served stop request (rank 0, at start), so a resumed run does not stop at its first step."""
    if os.path.exists(path):
        os.remove(path)
