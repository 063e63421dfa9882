"""Train an MTP model: ``torchrun --nproc_per_node=N -m mtp_megatron.train --config configs/tiny.yaml [a.b=c ...]``.

The whole flow, top to bottom: config -> its files (tokenizer, data, DeepSpeed JSON) -> parallel state -> run
folder -> engine (model, optimizer, schedule) -> checkpoint -> data -> loop.

Restarting the same command resumes from the newest complete checkpoint of ``run.dir`` (``checkpoint.resume``).
Exit codes:
  0  finished, or stopped cleanly on SIGTERM/SIGUSR1/``train.exit_duration_mins``/``train.stop_at_step`` after
     saving a checkpoint
     (``<run.dir>/run_state.json`` says which: ``finished`` or ``stopped``; rerun to continue a stopped run)
  2  bad config or checkpoint, reported before training starts
  3  a non-finite loss or gradient norm under ``train.nan_policy`` (nothing bad was applied or saved)
  1  anything else: a crash, a checkpoint that could not be written (a full disk), out of memory; the last two
     with one ``error:`` line
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Callable, List, Optional, Sequence

from mtp_megatron.config import Config, ConfigError, format_config_help, load_config, validate_for_training
from mtp_megatron.data.inputs import resolve_inputs
from mtp_megatron.distributed.pipeline_split import resolve_layers_per_stage
from mtp_megatron.distributed.topology import validate_for_world


def resolve_run_inputs(cfg: Config) -> None:
    """The explicit step after ``load_config``, which reads nothing but the YAML: open the tokenizer and the data
    files (a null ``model.vocab_size`` becomes the tokenizer's; mtp_megatron/data/inputs.py) and read the
    DeepSpeed JSON. Raises one ``ConfigError`` listing every problem; calling it again changes nothing."""
    _raise_if_any(_input_problems(cfg))


def load_run_config(path: Optional[str], overrides: Sequence[str] = ()) -> Config:
    """``load_config`` then ``resolve_run_inputs``: a config whose files are opened and checked, for the tools and
    tests that need its vocabulary size or its checks (tools/plan.py)."""
    cfg = load_config(path, overrides)
    resolve_run_inputs(cfg)
    return cfg


def check_launch(cfg: Config, world_size: int) -> None:
    """Everything a training launch checks before any process group exists (``validate_for_world``,
    ``validate_for_training``, ``resolve_run_inputs``), as one ``ConfigError`` that lists every problem, so the
    command line and launcher/torchrun.py report a bad launch in one message."""
    problems = _problems_of(lambda: validate_for_world(cfg, world_size))
    problems += _problems_of(lambda: validate_for_training(cfg))
    problems += _input_problems(cfg)
    _raise_if_any(problems)


def _input_problems(cfg: Config) -> List[str]:
    return _problems_of(lambda: resolve_inputs(cfg)) + _deepspeed_json_problems(cfg)


def _deepspeed_json_problems(cfg: Config) -> List[str]:
    if not cfg.parallel.deepspeed_config:
        return []
    # Imported only when there is a file to read: the engines package loads torch and megatron-core, which a
    # config check (the launchers', tests/launcher/test_launcher_faults.py) does not need.
    from mtp_megatron.engines.deepspeed_config import deepspeed_config_problems

    return deepspeed_config_problems(cfg)


def _problems_of(check: Callable[[], object]) -> List[str]:
    try:
        check()
    except ConfigError as error:
        return list(error.problems)
    return []


def _raise_if_any(problems: List[str]) -> None:
    if problems:
        raise ConfigError.from_problems(problems)


def train(cfg: Config):
    """Run one training job in this process (one rank of the job); returns every step's result.

    Resolves the config's inputs first (``resolve_run_inputs``), so ``train(load_config(...))`` is a complete run.
    """
    resolve_run_inputs(cfg)
    return _train_resolved(cfg)


def _train_resolved(cfg: Config):
    """``train`` for a config whose inputs are resolved already (``main`` has checked the whole launch)."""
    # Heavy imports here: `--help` and config errors answer without importing megatron-core.
    from mtp_megatron.checkpoint.checkpointer import Checkpointer
    from mtp_megatron.data.datasets import build_datasets
    from mtp_megatron.distributed.parallel import destroy_distributed, init_distributed
    from mtp_megatron.engines import build_engine
    from mtp_megatron.training.loop import fit
    from mtp_megatron.training.metrics import MetricsLogger
    from mtp_megatron.training.run_folder import claim_run_folder, record_run
    from mtp_megatron.training.stopping import STOP_FILE, StopRequests, clear_stop_file

    validate_for_training(cfg)
    # parallel.layers_per_stage=auto becomes its list (it needs the vocabulary size, resolved by now), so the
    # run's saved config.yaml shows the split it trains with.
    resolve_layers_per_stage(cfg)
    env = init_distributed(cfg.parallel, cfg.train.device, cfg.train.seed)
    lock = None
    try:
        lock = claim_run_folder(cfg, env.rank)  # one live run per folder; nothing is written into it yet
        stop_file = os.path.join(cfg.run.dir, STOP_FILE) if env.rank == 0 else None
        # From here on SIGTERM/SIGUSR1 (or a STOP file) mean "save and stop at the next step boundary", not "die now".
        with StopRequests(cfg.train.exit_duration_mins, env.device, cfg.train.stop_at_step, stop_file) as stop:
            engine = build_engine(cfg, env)  # megatron-core, DeepSpeed or FSDP2, by parallel.sharding
            checkpointer = Checkpointer(cfg, env, engine)
            # The newest checkpoint of the run, checkpoint.load, or a fresh start; checked against this config
            # before this launch writes anything into the run folder (a rejected relaunch leaves it as it was).
            state = checkpointer.restore()
            if env.rank == 0:
                clear_stop_file(stop_file)  # served by the stop that wrote the checkpoint this run resumes from
            record_run(cfg, engine, env.rank, env.device)

            train_data, valid_data = build_datasets(cfg, env)

            logger = MetricsLogger(cfg, cfg.run.dir, env.rank, env.dims.world_size, start_step=state.step)
            try:
                history = fit(cfg, env, engine, train_data, valid_data, logger, state=state,
                              checkpointer=checkpointer, stop=stop)
                logger.print_validation_summary()
                return history
            finally:
                logger.close()
    finally:
        if lock is not None:
            lock.release()
        destroy_distributed()


# Known, harmless notices that every rank would print at start (megatron-core 0.16 and torch 2.13): optional
# fused kernels that are absent, and deprecations inside megatron-core's own calls. Anything else still shows.
# megatron's advice to set CUDA_DEVICE_MAX_CONNECTIONS is not among them: runs that need it get it
# (distributed/cuda_env.py), so on CUDA it only shows where a user's own value overrides ours.
_KNOWN_NOTICES = [
    (UserWarning, r".*(Transformer Engine|Apex) (and Apex )?(is|are) not installed"),
    (UserWarning, r"full scope is deprecated"),
    (UserWarning, r"The \.grad attribute of a Tensor that is not a leaf"),  # the pipeline's p2p buffers
    (FutureWarning, r"`torch\.distributed\.\w+` is deprecated"),
    # megatron-core's dist_checkpointing load calls torch's deprecated load_state_dict and ShardedTensor.
    (FutureWarning, r"`load_state_dict` is deprecated and will be removed"),
    (FutureWarning, r"Please use DTensor instead and we are deprecating ShardedTensor"),
]


def _silence_known_notices() -> None:
    for category, message in _KNOWN_NOTICES:
        warnings.filterwarnings("ignore", message=message, category=category)


def prepare_cuda_environment(cfg: Config) -> None:
    """Before any CUDA work (the context is created in ``init_distributed``): the environment variables the run
    needs (distributed/cuda_env.py), set where unset, a warning on rank 0 where set otherwise."""
    from mtp_megatron.distributed import cuda_env

    cuda_env.apply_launch_variables(cfg)
    if not cuda_env.may_use_cuda(cfg):  # megatron's CUDA_DEVICE_MAX_CONNECTIONS advice means nothing on CPU
        warnings.filterwarnings("ignore", message=r".*CUDA_DEVICE_MAX_CONNECTIONS", category=UserWarning)


def main(argv=None) -> int:
    _silence_known_notices()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file (configs/tiny.yaml, configs/13b.yaml, ...)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. mtp.n_heads=2")
    parser.add_argument("--help-config", action="store_true", help="list every config field with its meaning")
    args = parser.parse_args(argv)
    if args.help_config:
        print(format_config_help())
        return 0
    # Every config error surfaces here, before any process group or model exists; every rank finds the same
    # one, and rank 0 says it.
    try:
        cfg = load_config(args.config, args.overrides)
        check_launch(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as error:
        _report(error)
        return 2
    prepare_cuda_environment(cfg)
    from mtp_megatron.checkpoint.store import CheckpointError, SaveError
    from mtp_megatron.training.loop import NonFiniteStepError
    from mtp_megatron.training.run_lock import RunLockedError

    try:
        _train_resolved(cfg)
    except (ConfigError, CheckpointError, RunLockedError) as error:  # found once the job runs
        _report(error)
        return 2
    except NonFiniteStepError as error:
        _report(error)
        return 3
    except SaveError as error:  # a fault, not bad input: run_state.json says failed, and Slurm does not requeue
        _report(error)
        return 1
    except (MemoryError, RuntimeError) as error:
        if not _out_of_memory(error):
            raise
        print(f"error: out of memory on rank {os.environ.get('RANK', '0')} ({str(error).strip()[:200]}) with "
              f"model.seq_length={cfg.model.seq_length}, train.micro_batch_size={cfg.train.micro_batch_size}. Fix: "
              "lower those, set train.recompute=selective|full, or raise parallel.tp/pp; tools/plan.py estimates "
              "each stage's memory", file=sys.stderr, flush=True)
        return 1
    return 0


def _out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation failure (CPU or GPU): torch raises it as a RuntimeError."""
    import torch

    text = str(error)
    return (isinstance(error, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in text
            or "CUDA out of memory" in text)


def _report(error: Exception) -> None:
    if os.environ.get("RANK", "0") == "0":  # every rank raises the same error; say it once
        print(f"error: {error}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
