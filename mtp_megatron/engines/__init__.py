"""Training engines behind one interface (engines/base.py): megatron-core, DeepSpeed ZeRO and torch FSDP2."""

from __future__ import annotations

from mtp_megatron.config import Config
from mtp_megatron.config.validate import DEEPSPEED_SHARDING
from mtp_megatron.distributed.parallel import ParallelEnv
from mtp_megatron.engines.base import Engine, EngineStateError, ModelOnly

__all__ = ["Engine", "EngineStateError", "ModelOnly", "build_engine"]


def build_engine(cfg: Config, env: ParallelEnv, module=None) -> Engine:
    """The engine ``parallel.sharding`` names, around ``module`` (default: this stage's freshly initialised
    ``MTPGPTModel``; a checkpoint is loaded into the engine by checkpoint.Checkpointer)."""
    from mtp_megatron.data.tokenizer import document_eod
    from mtp_megatron.model.builder import build_model, resolve_precision

    sharding = cfg.parallel.sharding
    if module is None:
        from mtp_megatron.engines.flat_shards import local_layers  # FSDP2 runs megatron-core's local layers

        built = local_layers(cfg) if sharding == "fsdp" else cfg
        module = build_model(built, env, document_eod=document_eod(cfg.tokenizer, cfg.data))
    if sharding in DEEPSPEED_SHARDING:
        from mtp_megatron.engines.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(cfg, env, module, resolve_precision(cfg, env.device))
    if sharding == "fsdp":
        from mtp_megatron.engines.fsdp import FSDP2Engine

        return FSDP2Engine(cfg, env, module, resolve_precision(cfg, env.device))
    from mtp_megatron.engines.megatron import MegatronEngine

    return MegatronEngine(cfg, env, module)
