"""Cross-field checks: each rule fires and its message names the field and a fix."""

import itertools
import os

import pytest

from mtp_megatron.config import Config, ConfigError, load_config, validate
from mtp_megatron.distributed.topology import validate_for_world

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "configs", "tiny.yaml")


def _problems(overrides, world_size=None):
    """The problems the tiny config plus ``overrides`` has (at ``world_size``, if given)."""
    with pytest.raises(ConfigError) as e:
        cfg = load_config(TINY, overrides)
        if world_size is not None:
            validate_for_world(cfg, world_size)
    return e.value.problems, str(e.value)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["mtp.n_heads=0"], ["mtp.n_heads: must be >= 1"]),
        (["mtp.match_params=true", "model.num_layers=4"], ["model.num_layers: leaves 0 trunk layers", ">= 5"]),
        (["model.num_layers=1"], ["model.num_layers: leaves 0 trunk layers", "model.num_layers >= 2"]),
        (["model.hidden_size=66"], ["model.hidden_size: 66 is not divisible by num_attention_heads=4"]),
        (["parallel.tp=3"], ["model.num_attention_heads: 4 heads cannot be split over parallel.tp=3", "[1, 2, 4]"]),
        (["model.num_query_groups=3"], ["model.num_query_groups: 3 does not divide num_attention_heads=4"]),
        (["model.num_query_groups=1", "parallel.tp=2"], ["model.num_query_groups: 1 key/value groups cannot"]),
        (["model.num_query_groups=0"], ["model.num_query_groups: must be >= 1 or null"]),
        (["model.ffn_hidden_size=255", "parallel.tp=2"], ["model.ffn_hidden_size: 255 is not divisible by"]),
        (["parallel.pp=3"], ["parallel.pp: pp=3 does not divide the trunk's 4 layers", "[1, 2, 4]", "4 or 7"]),
        (
            ["model.num_layers=32", "mtp.match_params=true", "parallel.pp=3"],
            ["parallel.pp: pp=3 does not divide the trunk's 28 layers", "match_params", "31 or 34"],
        ),
        (["model.seq_length=4"], ["model.seq_length: 4 leaves head 4", "seq_length > mtp.n_heads=4"]),
        (["train.micro_batch_size=0"], ["train.micro_batch_size: must be >= 1"]),
        (["train.global_batch_size=0"], ["train.global_batch_size: must be >= 1"]),
        (["train.global_batch_size=7"], ["train.global_batch_size: 7 is not a multiple of micro_batch_size=2"]),
        (["optim.lr=0"], ["optim.lr: must be > 0"]),
        (["optim.min_lr_ratio=1.5"], ["optim.min_lr_ratio: must be in [0, 1]"]),
        (["optim.min_lr_ratio=-0.1"], ["optim.min_lr_ratio: must be in [0, 1]"]),
        (["optim.decay_iters=5"], ["optim.warmup_iters: 5 is not below optim.decay_iters=5"]),
        (["optim.decay_iters=0"], ["optim.decay_iters: must be >= 1 or null"]),
        (["optim.warmup_iters=-1"], ["optim.warmup_iters: must be >= 0"]),
        (["optim.adam_beta2=1.0"], ["optim.adam_beta2: must be in [0, 1)"]),
        (["optim.adam_eps=0"], ["optim.adam_eps: must be > 0"]),
        (["optim.clip_grad=-1"], ["optim.clip_grad: must be >= 0"]),
        (["optim.weight_decay=-0.1"], ["optim.weight_decay: must be >= 0"]),
        (["train.iters=0"], ["train.iters: must be >= 1"]),
        (["train.precision=fp16", "train.device=cpu"], ["train.precision: fp16 needs a GPU", "precision=fp32"]),
        (["model.hidden_dropout=1.0"], ["model.hidden_dropout: must be in [0, 1)"]),
        (["model.attention_dropout=-0.1"], ["model.attention_dropout: must be in [0, 1)"]),
        (
            ["parallel.overlap_param_gather=true", "parallel.overlap_grad_reduce=true", "parallel.sharding=none"],
            ["parallel.overlap_param_gather: needs sharding=distributed_optimizer"],
        ),
        (["parallel.overlap_param_gather=true"], ["parallel.overlap_param_gather: needs overlap_grad_reduce=true"]),
        (["model.vocab_size=0"], ["model.vocab_size: must be >= 1"]),
        (["parallel.pp=0"], ["parallel.pp: must be >= 1"]),
        (["data.split=a,b"], ["data.split: 'a,b' is not"]),
        (["data.num_workers=-1"], ["data.num_workers: must be >= 0"]),
        (["checkpoint.interval=-1"], ["checkpoint.interval: must be >= 0"]),
        (["logging.log_interval=0"], ["logging.log_interval: must be >= 1"]),
        (["train.eval_interval=5", "train.eval_iters=0"], ["train.eval_iters: must be >= 1 when evaluating"]),
        # sharding: what is supported is listed, and the fix names a combination that works
        (["parallel.sharding=zero2", "parallel.pp=2"],
         ["parallel.sharding: zero2 (DeepSpeed ZeRO) does not combine with pipeline parallelism (pp=2)",
          "Supported: none and distributed_optimizer with TP x PP x DP; zero1, zero2 and zero3 with TP x DP",
          "parallel.sharding=distributed_optimizer"]),
        (["parallel.sharding=zero1", "parallel.pp=2"], ["parallel.sharding: zero1 (DeepSpeed ZeRO) does not"]),
        (["parallel.sharding=zero3", "parallel.overlap_grad_reduce=true"],
         ["parallel.overlap_grad_reduce: is megatron DDP's", "overlap_comm"]),
        (["parallel.deepspeed_config=ds.json"], ["parallel.deepspeed_config: is only read with sharding zero1"]),
        (["parallel.sequence_parallel=true"], ["parallel.sequence_parallel: needs tensor parallelism"]),
        (["parallel.sequence_parallel=true", "parallel.tp=2", "parallel.sharding=zero2"],
         ["parallel.sequence_parallel: is not supported with sharding=zero2", "sharding=distributed_optimizer"]),
        (["parallel.sequence_parallel=true", "parallel.tp=2", "model.seq_length=33"],
         ["model.seq_length: 33 cannot be split over parallel.tp=2 ranks (sequence parallelism)"]),
        (["parallel.sharding=zero2", "checkpoint.async_save=true"],
         ["checkpoint.async_save: is not supported with sharding=zero2"]),
        # What FSDP2 does not run here (engines/fsdp.py), each refused at load.
        (["parallel.sharding=fsdp", "parallel.pp=2"], ["parallel.sharding: fsdp runs without pipeline parallelism"]),
        (["parallel.sharding=fsdp", "train.precision=fp16", "train.device=cuda"],
         ["train.precision: fp16 is not supported with sharding=fsdp"]),
        (["parallel.sharding=fsdp", "parallel.sequence_parallel=true", "parallel.tp=2"],
         ["parallel.sequence_parallel: is not supported with sharding=fsdp"]),
        (["parallel.sharding=fsdp", "model.transformer_impl=transformer_engine"],
         ["model.transformer_impl: transformer_engine is not used with sharding=fsdp"]),
        (["parallel.sharding=fsdp", "parallel.overlap_grad_reduce=true"],
         ["parallel.overlap_grad_reduce: is megatron DDP's; sharding=fsdp"]),
        (["parallel.sharding=fsdp", "parallel.deepspeed_config=ds.json"],
         ["parallel.deepspeed_config: is only read with sharding zero1"]),
    ],
)
def test_rule_fires_naming_the_field(overrides, expected):
    problems, message = _problems(overrides)
    assert all(p.count(". Fix: ") >= 1 for p in problems), problems
    for text in expected:
        assert text in message, f"{text!r} not in:\n{message}"


@pytest.mark.parametrize(
    "overrides",
    [
        ["parallel.overlap_grad_reduce=true", "parallel.sharding=none"],  # grad overlap needs no sharding
        ["parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true"],
        ["train.iters=3"],  # shorter than the warmup: ends during warmup, allowed with decay_iters null
        ["train.precision=fp16", "train.device=cuda"],
        ["model.num_layers=5", "mtp.match_params=true", "mtp.n_heads=4"],  # trunk of 1 layer
        ["mtp.n_heads=1"],  # a plain GPT
        ["model.num_query_groups=2", "parallel.tp=2"],
        ["data.split=1"],
        ["parallel.sharding=zero3", "parallel.tp=2"],
        ["parallel.sequence_parallel=true", "parallel.tp=2", "parallel.pp=2"],
        ["parallel.sharding=fsdp", "parallel.tp=2", "train.precision=bf16", "train.recompute=full",
         "parallel.fsdp_reshard_after_forward=false"],
    ],
)
def test_valid_combinations_pass(overrides):
    load_config(TINY, overrides)


def test_every_problem_is_reported_at_once():
    problems, message = _problems(["optim.lr=0", "train.iters=0", "mtp.n_heads=0"])
    assert len(problems) == 3
    assert message.startswith("invalid configuration (3 problems):")
    assert all(f"  - {p}" in message for p in problems)


def test_validate_accepts_the_default_config():
    validate(Config())


@pytest.mark.parametrize("tp, pp, world", [(t, p, w) for t, p, w in itertools.product((1, 2), (1, 2), (1, 2, 4))])
def test_tiny_runs_on_every_small_layout(tp, pp, world):
    cfg = load_config(TINY, [f"parallel.tp={tp}", f"parallel.pp={pp}"])
    if world % (tp * pp):
        with pytest.raises(ConfigError, match="not a multiple of tp\\*pp"):
            validate_for_world(cfg, world)
        return
    dims = validate_for_world(cfg, world)
    assert dims.dp == world // (tp * pp)
    assert dims.num_microbatches(cfg.train.global_batch_size, cfg.train.micro_batch_size) == 8 // (2 * dims.dp)


def test_world_size_not_a_multiple_of_the_model_layout():
    problems, message = _problems(["parallel.tp=2", "parallel.pp=2"], world_size=6)
    assert "world size 6 is not a multiple of tp*pp=4" in message
    assert "launch with a multiple of 4 processes or change parallel.tp/pp" in message


def test_global_batch_not_divisible_over_data_parallel_ranks():
    # world 4, tp 1, pp 1 -> dp 4: 12 sequences of micro batch 2 are 1.5 microbatches per rank.
    problems, message = _problems(["train.global_batch_size=12"], world_size=4)
    assert len(problems) == 1
    assert "train.global_batch_size: 12 is not a multiple of micro_batch_size*dp = 2*4 = 8" in message
    assert "number of microbatches would be 1.5" in message
    assert "Fix: use 8 (1 microbatch per step) or 16 (2 microbatches per step)" in message


def test_world_checks_include_the_config_checks():
    cfg = load_config(TINY)
    cfg.optim.lr = 0.0  # configs are plain dataclasses; a later edit must still be caught
    with pytest.raises(ConfigError) as e:
        validate_for_world(cfg, world_size=3)
    assert len(e.value.problems) == 2 and "optim.lr" in str(e.value) and "world size 3" in str(e.value)
