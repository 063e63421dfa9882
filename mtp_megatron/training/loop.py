"""The training loop: steps, periodic validation, metrics."""

from __future__ import annotations

import json
import os
import time

import torch

from mtp_megatron.config import Config
from mtp_megatron.data.loader import microbatches
from mtp_megatron.distributed.parallel import ParallelEnv
from mtp_megatron.engines import Engine
from mtp_megatron.engines.step import StepResult
from mtp_megatron.training.metrics import MetricsLogger
from mtp_megatron.training.state import TrainState
from mtp_megatron.training.stopping import StopRequests


class NonFiniteStepError(RuntimeError):
    """Training met a non-finite loss or gradient norm that its ``train.nan_policy`` does not tolerate."""


def fit(cfg: Config, env: ParallelEnv, engine: Engine, train_data, valid_data, logger: MetricsLogger,
        state: TrainState | None = None, checkpointer=None, stop: StopRequests | None = None) -> list[StepResult]:
    """Train from ``state`` (a fresh run by default) to ``cfg.train.iters``, or until ``stop`` says so, saving
    through ``checkpointer`` (checkpoint/checkpointer.py, built on the same engine; None: no checkpoints);
    updates ``state`` in place and returns every step's result (for tests and callers)."""
    state = state if state is not None else TrainState()
    data = microbatches(train_data, state.consumed_samples, cfg, env)
    history, stop_reason = [], None
    write_run_state(cfg, env, "running", state)
    try:
        stop_reason = _train_steps(cfg, env, engine, data, valid_data, logger, state, checkpointer, stop, history)
        if checkpointer is not None:
            checkpointer.close()  # wait for a background save: the run is not safe to leave before it is committed
    except BaseException as error:  # say so in run_state.json (launchers read it), then fail as before
        write_run_state(cfg, env, "failed", state, f"{type(error).__name__}: {str(error)[:500]}")
        raise
    write_run_state(cfg, env, "stopped" if stop_reason else "finished", state, stop_reason)
    return history


def _train_steps(cfg: Config, env: ParallelEnv, engine: Engine, data, valid_data, logger: MetricsLogger,
                 state: TrainState, checkpointer, stop: StopRequests | None, history: list) -> str | None:
    """Steps until ``train.iters`` or an agreed stop (whose reason it returns), saving as configured."""
    num_microbatches = env.dims.num_microbatches(cfg.train.global_batch_size, cfg.train.micro_batch_size)
    tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_length
    saving = checkpointer is not None and cfg.checkpoint.save
    skips = _SkipCounter(cfg)
    stop_reason = None
    while state.step < cfg.train.iters:
        lr = engine.lr  # the rate this step's update uses
        start = time.perf_counter()
        result = engine.train_step(data, num_microbatches, step=state.step + 1)  # the step's number, as logged
        if env.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        state.advance(cfg.train.global_batch_size)
        step, last = state.step, state.step == cfg.train.iters
        skips.update(step, result, checkpointer)
        history.append(result)
        if step % cfg.logging.log_interval == 0 or last or result.update_skipped:
            logger.log(step, {**result.as_dict(), "lr": lr,
                              "grad_norm": result.grad_norm, "update_skipped": result.update_skipped,
                              "skipped_steps": skips.total, "consumed_samples": state.consumed_samples,
                              "step_time_s": elapsed, **logger.throughput(tokens_per_step, elapsed)},
                       total_steps=cfg.train.iters)
        # Every rank joins the evaluation, also those that read no data (valid_data None on them).
        if cfg.train.eval_interval and (step % cfg.train.eval_interval == 0 or last):
            logger.log(step, evaluate(cfg, env, engine, valid_data).as_dict(prefix="val/"))
        if checkpointer is not None:
            checkpointer.finalize()  # commit a finished background save
        stop_reason = stop.agreed_reason(step) if stop is not None else None
        if saving and (last or stop_reason or (cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0)):
            checkpointer.save(state)
        if stop_reason:
            if env.rank == 0:
                print(f"[stop] {stop_reason}: stopped at step {step} of {cfg.train.iters}"
                      f"{' after saving a checkpoint' if saving else ' (checkpoint.save=false: nothing saved)'}; "
                      "start the same command again to resume", flush=True)
            break
    return stop_reason


class _SkipCounter:
    """Applies ``train.nan_policy`` to steps whose update was skipped for a non-finite loss or gradient norm."""

    def __init__(self, cfg: Config):
        self.policy, self.limit, self.lr = cfg.train.nan_policy, cfg.train.nan_skip_limit, cfg.optim.lr
        self.total = self.in_a_row = 0

    def update(self, step: int, result: StepResult, checkpointer) -> None:
        if result.skip_reason is None or result.skip_reason.startswith("fp16"):  # fp16 overflow is routine
            self.in_a_row = 0
            return
        self.total += 1
        self.in_a_row += 1
        heads = result.nonfinite_heads
        what = (f"the loss of head{'s' if len(heads) > 1 else ''} {', '.join(map(str, heads))} "
                f"({', '.join(f'{result.head_loss[h - 1]}' for h in heads)})" if heads
                else f"the gradient norm ({result.grad_norm})")
        newest = (f" The newest checkpoint is {checkpointer.last_committed}."
                  if checkpointer is not None and checkpointer.last_committed else "")
        if self.policy == "stop":
            raise NonFiniteStepError(f"step {step}: {what} is not finite; the update was not applied and nothing "
                                     f"was saved (train.nan_policy=stop).{newest}")
        if self.in_a_row > self.limit:
            raise NonFiniteStepError(f"step {step}: {what} is not finite, {self.in_a_row} skipped steps in a row "
                                     f"(train.nan_skip_limit={self.limit}): the run is diverging.{newest} "
                                     + self._rollback_advice(step - self.in_a_row + 1, checkpointer))
        print(f"[nan] step {step}: {what} is not finite; update skipped ({self.in_a_row} in a row, "
              f"{self.total} in all)", flush=True)

    def _rollback_advice(self, first_bad_step: int, checkpointer) -> str:
        """A command line that restarts from the newest checkpoint saved before the streak, at half the lr."""
        target = checkpointer.newest_before(first_bad_step) if checkpointer is not None else None
        if target is None:
            return "No checkpoint precedes the diverging steps: start over with a lower optim.lr, or investigate the data."
        return (f"To roll back, rerun the same command with checkpoint.load={target} optim.lr={self.lr / 2:g} "
                "(the run continues from that checkpoint; the later ones are kept in checkpoints/set_aside/), or "
                "investigate the data.")


def write_run_state(cfg: Config, env: ParallelEnv, status: str, state: TrainState, reason: str | None = None) -> None:
    """``<run.dir>/run_state.json``: whether the run is running, finished, stopped early (and resumable) or failed
    (with the error), read by launchers (slurm/) to decide whether to requeue."""
    if env.rank != 0:
        return
    record = {"state": status, "reason": reason, "step": state.step, "iters": cfg.train.iters,
              "consumed_samples": state.consumed_samples, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path = os.path.join(cfg.run.dir, "run_state.json")
    try:
        with open(path + ".tmp", "w") as f:
            json.dump(record, f, indent=1)
        os.replace(path + ".tmp", path)
    except OSError as error:  # a full disk must not hide the error being reported
        print(f"[run] could not write {path}: {error.strerror}", flush=True)


def evaluate(cfg: Config, env: ParallelEnv, engine: Engine, valid_data) -> StepResult:
    """Per-head loss and accuracy over the first ``eval_iters`` global batches of the validation split.

    Collective over the whole job: ranks that read no data pass ``valid_data=None``.
    """
    num_microbatches = env.dims.num_microbatches(cfg.train.global_batch_size, cfg.train.micro_batch_size)
    data = microbatches(valid_data, 0, cfg, env)
    with engine.gathered_parameters():  # overlap_param_gather: this step's weights on every rank first
        results = [engine.eval_step(data, num_microbatches) for _ in range(cfg.train.eval_iters)]
    return StepResult.merge(results)
