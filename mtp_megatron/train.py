"""Train an MTP model: ``torchrun --nproc_per_node=N -m mtp_megatron.train --config configs/tiny.yaml [a.b=c ...]``.

The whole flow, top to bottom: config -> parallel state -> model -> data -> optimizer -> loop.
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
    from mtp_megatron.data.datasets import build_datasets
    from mtp_megatron.distributed.parallel import destroy_distributed, init_distributed
    from mtp_megatron.training.loop import fit
    from mtp_megatron.training.metrics import MetricsLogger
    from mtp_megatron.training.setup import setup_model_and_optimizer

    env = init_distributed(cfg.parallel, cfg.train.device, cfg.train.seed)
    try:
        run_dir = cfg.run.dir
        if env.rank == 0:
            os.makedirs(run_dir, exist_ok=True)
            save_resolved_config(cfg, run_dir)

        model, optimizer, scheduler = setup_model_and_optimizer(cfg, env)

        train_data, valid_data = build_datasets(cfg, env)

        logger = MetricsLogger(cfg, run_dir, env.rank, env.dims.world_size)
        try:
            history = fit(cfg, env, model, optimizer, scheduler, train_data, valid_data, logger)
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
    train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
