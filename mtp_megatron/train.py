"""Train an MTP model: ``torchrun --nproc_per_node=N -m mtp_megatron.train --config configs/tiny.yaml [a.b=c ...]``.

The whole flow, top to bottom: config -> parallel state -> model -> checkpoint -> data -> optimizer -> loop.

Restarting the same command resumes from the newest complete checkpoint of ``run.dir`` (``checkpoint.resume``).
Exit codes:
  0  finished, or stopped cleanly on SIGTERM/SIGUSR1/``train.exit_duration_mins``/``train.stop_at_step`` after
     saving a checkpoint
     (``<run.dir>/run_state.json`` says which: ``finished`` or ``stopped``; rerun to continue a stopped run)
  2  bad config or checkpoint, reported before training starts
  3  a non-finite loss or gradient norm under ``train.nan_policy`` (nothing bad was applied or saved)
  1  anything else (a crash)
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from mtp_megatron.config import (
    Config,
    ConfigError,
    format_config_help,
    load_config,
    save_resolved_config,
    validate_for_world,
)


def train(cfg: Config):
    """Run one training job in this process (one rank of the job); returns every step's result."""
    # Heavy imports here: `--help` and config errors answer without importing megatron-core.
    from mtp_megatron.checkpoint.checkpointer import Checkpointer
    from mtp_megatron.data.datasets import build_datasets
    from mtp_megatron.distributed.parallel import destroy_distributed, init_distributed
    from mtp_megatron.training.loop import fit
    from mtp_megatron.training.metrics import MetricsLogger
    from mtp_megatron.training.setup import setup_model_and_optimizer
    from mtp_megatron.training.stopping import STOP_FILE, StopRequests, clear_stop_file

    env = init_distributed(cfg.parallel, cfg.train.device, cfg.train.seed)
    run_dir = cfg.run.dir
    stop_file = os.path.join(run_dir, STOP_FILE) if env.rank == 0 else None
    # From here on SIGTERM/SIGUSR1 (or a STOP file) mean "save and stop at the next step boundary", not "die now".
    with StopRequests(cfg.train.exit_duration_mins, env.device, cfg.train.stop_at_step, stop_file) as stop:
        try:
            if env.rank == 0:
                os.makedirs(run_dir, exist_ok=True)
                clear_stop_file(stop_file)  # served by the stop that wrote the checkpoint this run resumes from
                save_resolved_config(cfg, run_dir)

            model, optimizer, scheduler = setup_model_and_optimizer(cfg, env)
            checkpointer = Checkpointer(cfg, env, model, optimizer, scheduler)
            state = checkpointer.restore()  # the newest checkpoint of the run, checkpoint.load, or a fresh start

            train_data, valid_data = build_datasets(cfg, env)

            logger = MetricsLogger(cfg, run_dir, env.rank, env.dims.world_size, start_step=state.step)
            try:
                history = fit(cfg, env, model, optimizer, scheduler, train_data, valid_data, logger,
                              state=state, checkpointer=checkpointer, stop=stop)
                logger.print_validation_summary()
                return history
            finally:
                logger.close()
        finally:
            destroy_distributed()


# Known, harmless notices that every rank would print at start (megatron-core 0.16 and torch 2.13): optional
# fused kernels that are absent, and deprecations inside megatron-core's own calls. Anything else still shows.
_KNOWN_NOTICES = [
    (UserWarning, r".*(Transformer Engine|Apex) (and Apex )?(is|are) not installed"),
    (UserWarning, r".*CUDA_DEVICE_MAX_CONNECTIONS"),
    (UserWarning, r"full scope is deprecated"),
    (UserWarning, r"The \.grad attribute of a Tensor that is not a leaf"),  # the pipeline's p2p buffers
    (FutureWarning, r"`torch\.distributed\.\w+` is deprecated"),
]


def _silence_known_notices() -> None:
    for category, message in _KNOWN_NOTICES:
        warnings.filterwarnings("ignore", message=message, category=category)


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
    # Every config error surfaces here, before any process group or model exists.
    try:
        cfg = load_config(args.config, args.overrides)
        validate_for_world(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from mtp_megatron.checkpoint.store import CheckpointError
    from mtp_megatron.training.loop import NonFiniteStepError

    try:
        train(cfg)
    except CheckpointError as error:
        _report(error)
        return 2
    except NonFiniteStepError as error:
        _report(error)
        return 3
    return 0


def _report(error: Exception) -> None:
    if os.environ.get("RANK", "0") == "0":  # every rank raises the same error; say it once
        print(f"error: {error}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
