"""Every cross-field check of a ``Config``, in one place.

Checks collect problems instead of stopping at the first, and raise one ``ConfigError`` listing each as
``field: problem. Fix: ...``. ``validate`` needs only the config. What depends on the number of processes is
checked by ``mtp_megatron.distributed.topology.validate_for_world`` once the launcher knows it, and what the
config's files hold (tokenizer, data, DeepSpeed JSON) by ``mtp_megatron.train.resolve_run_inputs``: this package
reads nothing but the YAML and imports no other package of the project (tests/test_package_layout.py).
"""

from typing import List, Set

from mtp_megatron.config.errors import ConfigError
from mtp_megatron.config.schema import Config


def validate(cfg: Config) -> None:
    """Raise ``ConfigError`` if ``cfg`` cannot run at any world size."""
    found = problems(cfg)
    if found:
        raise ConfigError.from_problems(found)


def validate_for_training(cfg: Config) -> None:
    """What only a training launch needs, beyond ``validate`` (the planner, the converters and checkpoint readers
    need no data): training data, or an explicit ``data.synthetic``. Raises ``ConfigError``."""
    if not cfg.data.paths and not cfg.data.synthetic:
        raise ConfigError.from_problems([
            "data.paths: no training data is configured. Fix: set data.paths=[PREFIX, ...] (datasets written by "
            "tools/preprocess_data.py), or data.synthetic=true to train on synthetic tokens (smoke tests)"])


class _Problems(list):
    """Collects problems as ``field: problem. Fix: ...``; ``bad`` names the fields already reported invalid, so
    checks that divide by them are skipped instead of crashing or piling up follow-on noise."""

    def __init__(self) -> None:
        super().__init__()
        self.bad: Set[str] = set()

    def add(self, field: str, problem: str, fix: str) -> None:
        self.append(f"{field}: {problem}. Fix: {fix}")


def problems(cfg: Config) -> List[str]:
    """What ``validate`` would raise, as a list, for checks that add their own problems to the same message
    (``validate_for_world``)."""
    out = _Problems()
    for check in (_check_sizes, _check_shapes, _check_trunk_and_heads, _check_loss_chunks, _check_head_design,
                  _check_parallel,
                  _check_optim, _check_run):
        check(cfg, out)
    return list(out)


def _check_sizes(cfg: Config, out: _Problems) -> None:
    """Sizes that must be positive before any divisibility check means anything."""
    m, mtp, par, train = cfg.model, cfg.mtp, cfg.parallel, cfg.train
    positive = {
        "model.num_layers": m.num_layers,
        "model.hidden_size": m.hidden_size,
        "model.num_attention_heads": m.num_attention_heads,
        "model.make_vocab_size_divisible_by": m.make_vocab_size_divisible_by,
        "model.seq_length": m.seq_length,
        "model.rotary_base": m.rotary_base,
        "mtp.n_heads": mtp.n_heads,
        "parallel.tp": par.tp,
        "parallel.pp": par.pp,
        "train.iters": train.iters,
        "train.micro_batch_size": train.micro_batch_size,
        "train.global_batch_size": train.global_batch_size,
        "logging.log_interval": cfg.logging.log_interval,
    }
    for name in sorted(n for n, value in positive.items() if value < 1):
        out.bad.add(name)
        out.add(name, f"must be >= 1, got {positive[name]}", "use a positive value")
    if m.vocab_size is not None and m.vocab_size < 1:
        out.add("model.vocab_size", f"must be >= 1 or null, got {m.vocab_size}", "use null for the tokenizer's size")
        out.bad.add("model.vocab_size")
    if m.num_query_groups is not None and m.num_query_groups < 1:
        out.add("model.num_query_groups", f"must be >= 1 or null, got {m.num_query_groups}", "use null for MHA")
        out.bad.add("model.num_query_groups")
    if m.head_dim is not None and m.head_dim < 1:
        out.add("model.head_dim", f"must be >= 1 or null, got {m.head_dim}", "use null for hidden_size / heads")
        out.bad.add("model.head_dim")
    ffn = m.resolved_ffn_hidden_size()
    if ffn < 1:
        out.add("model.ffn_hidden_size", f"must be >= 1, got {ffn}", "use a positive value or null")
        out.bad.add("model.ffn_hidden_size")


def _check_loss_chunks(cfg: Config, out: _Problems) -> None:
    """``mtp.loss_chunk_size``: 0 (off) or a positive count of positions, which sequence parallelism splits evenly
    over the TP ranks (each takes its share of a chunk from its own slice of the sequence)."""
    chunk, par = cfg.mtp.loss_chunk_size, cfg.parallel
    if chunk < 0:
        out.add("mtp.loss_chunk_size", f"must be >= 0, got {chunk}",
                "use a count of sequence positions per chunk (e.g. 256), or 0 for no chunking")
    elif chunk and par.sequence_parallel and "parallel.tp" not in out.bad and chunk % par.tp:
        out.add("mtp.loss_chunk_size",
                f"{chunk} positions cannot be split over parallel.tp={par.tp} ranks under sequence parallelism "
                "(each rank forms its share of a chunk from its own slice of the sequence)",
                f"use a multiple of {par.tp} (e.g. {max(par.tp, chunk // par.tp * par.tp)}), or 0 for no chunking")


def _check_head_design(cfg: Config, out: _Problems) -> None:
    """The CP rank and balance coefficient, and the loss weights and their schedule: one weight per head, >= 0,
    phases at increasing steps."""
    mtp = cfg.mtp
    if mtp.cp_rank < 1:
        out.add("mtp.cp_rank", f"must be >= 1, got {mtp.cp_rank}", "use the number of mixture components, e.g. 4")
    if mtp.cp_balance_coef < 0:
        out.add("mtp.cp_balance_coef", f"must be >= 0, got {mtp.cp_balance_coef}", "use e.g. 0.01, or 0 for off")
    if "mtp.n_heads" in out.bad:
        return
    n = mtp.n_heads
    if mtp.loss_weights is not None:
        if len(mtp.loss_weights) != n:
            out.add("mtp.loss_weights", f"has {len(mtp.loss_weights)} entries for mtp.n_heads={n} heads",
                    f"give one weight per head ({n}), or null for all 1")
        elif any(w < 0 for w in mtp.loss_weights):
            out.add("mtp.loss_weights", f"{mtp.loss_weights} has a negative weight", "use weights >= 0")
    previous = 0
    for k, phase in enumerate(mtp.loss_weight_schedule or []):
        field = f"mtp.loss_weight_schedule[{k}]"
        if len(phase) != n + 1:
            out.add(field, f"{phase} has {len(phase)} entries", f"write [step, w_1, ..., w_{n}] ({n + 1} numbers)")
        elif phase[0] != int(phase[0]):
            out.add(field, f"starts at step {phase[0]}, which is not a whole step", "start each phase at an integer step")
        elif phase[0] <= previous:
            out.add(field, f"starts at step {int(phase[0])}, not after " + (f"the phase before it (step {int(previous)})"
                                                                            if previous else "step 0"),
                    "list the phases at increasing steps > 0")
        elif any(w < 0 for w in phase[1:]):
            out.add(field, f"{phase[1:]} has a negative weight", "use weights >= 0")
        else:
            previous = phase[0]


def _check_shapes(cfg: Config, out: _Problems) -> None:
    """Attention and MLP shapes, and their split over tensor-parallel ranks."""
    m, par = cfg.model, cfg.parallel
    ffn = m.resolved_ffn_hidden_size()
    if not out.bad & {"model.hidden_size", "model.num_attention_heads"}:
        if m.hidden_size % m.num_attention_heads:
            out.add(
                "model.hidden_size",
                f"{m.hidden_size} is not divisible by num_attention_heads={m.num_attention_heads}",
                f"use a multiple of {m.num_attention_heads} or change model.num_attention_heads",
            )
    if not out.bad & {"model.num_attention_heads", "parallel.tp"} and m.num_attention_heads % par.tp:
        out.add(
            "model.num_attention_heads",
            f"{m.num_attention_heads} heads cannot be split over parallel.tp={par.tp} ranks",
            f"make tp divide the head count ({_divisors(m.num_attention_heads)})",
        )
    if m.num_query_groups is not None and not out.bad & {"model.num_query_groups", "parallel.tp"}:
        g = m.num_query_groups
        if "model.num_attention_heads" not in out.bad and m.num_attention_heads % g:
            out.add(
                "model.num_query_groups",
                f"{g} does not divide num_attention_heads={m.num_attention_heads}",
                f"use one of {_divisors(m.num_attention_heads)}",
            )
        if g % par.tp:
            out.add(
                "model.num_query_groups",
                f"{g} key/value groups cannot be split over parallel.tp={par.tp} ranks",
                f"make tp divide num_query_groups ({_divisors(g)})",
            )
    if not out.bad & {"model.ffn_hidden_size", "parallel.tp"} and ffn % par.tp:
        out.add(
            "model.ffn_hidden_size",
            f"{ffn} is not divisible by parallel.tp={par.tp}",
            f"use a multiple of {par.tp} or change parallel.tp",
        )
    for name, p in (("model.hidden_dropout", m.hidden_dropout), ("model.attention_dropout", m.attention_dropout)):
        if not 0.0 <= p < 1.0:
            out.add(name, f"must be in [0, 1), got {p}", "use 0.0 for pre-training")
    if not m.norm_epsilon > 0:
        out.add("model.norm_epsilon", f"must be > 0, got {m.norm_epsilon}", "use 1e-5")
    if not m.init_method_std > 0:
        out.add("model.init_method_std", f"must be > 0, got {m.init_method_std}", "use 0.02")
    if m.rope_scaling_type is not None:
        if m.position_embedding != "rope":
            out.add("model.rope_scaling_type", f"{m.rope_scaling_type!r} needs position_embedding=rope, got "
                    f"{m.position_embedding!r}", "set model.rope_scaling_type=null or model.position_embedding=rope")
        if not m.rope_scaling_factor >= 1.0:
            out.add("model.rope_scaling_factor", f"must be >= 1 with rope_scaling_type={m.rope_scaling_type}, got "
                    f"{m.rope_scaling_factor}", "use the factor the model was scaled by (e.g. 8.0)")


def _check_trunk_and_heads(cfg: Config, out: _Problems) -> None:
    """The trunk is what pipeline stages split; the heads all sit on the last stage."""
    m, mtp, par = cfg.model, cfg.mtp, cfg.parallel
    if out.bad & {"model.num_layers", "mtp.n_heads"}:
        return
    if "model.seq_length" not in out.bad and m.seq_length <= mtp.n_heads:
        out.add(
            "model.seq_length",
            f"{m.seq_length} leaves head {mtp.n_heads} (predicting token t+{mtp.n_heads}) without any target",
            f"use seq_length > mtp.n_heads={mtp.n_heads}",
        )
    trunk = cfg.trunk_num_layers()
    if mtp.match_params:
        taken = f"num_layers {m.num_layers} - n_heads {mtp.n_heads}, as mtp.match_params is set"
        fix = f"set model.num_layers > mtp.n_heads (>= {mtp.n_heads + 1}) or mtp.match_params=false"
    else:
        taken = f"num_layers {m.num_layers} - 1 for head 1"
        fix = "set model.num_layers >= 2"
    if trunk < 1:
        out.add("model.num_layers", f"leaves {trunk} trunk layers ({taken})", fix)
    elif "parallel.pp" not in out.bad and par.layers_per_stage is not None:
        _check_layers_per_stage(par.layers_per_stage, trunk, par.pp, taken, out)
    elif "parallel.pp" not in out.bad and trunk % par.pp:
        # Suggest the pp values that fit, and the nearest layer counts that fit this pp.
        offset = m.num_layers - trunk
        lower, upper = (trunk // par.pp) * par.pp, (trunk // par.pp + 1) * par.pp
        layers = [n + offset for n in (lower, upper) if n >= 1]
        out.add(
            "parallel.pp",
            f"pp={par.pp} does not divide the trunk's {trunk} layers ({taken})",
            f"set parallel.pp to one of {_divisors(trunk)}, or model.num_layers to "
            f"{' or '.join(str(n) for n in layers)}" + (
                f", or parallel.layers_per_stage to a list of {par.pp} counts (e.g. "
                f"{_nearest_split([trunk // par.pp] * par.pp, trunk, par.pp)}) or auto" if trunk >= par.pp else ""),
        )


def pipeline_splits(trunk: int, pp: int) -> List[List[int]]:
    """Every split of ``trunk`` layers over ``pp`` stages that megatron-core builds (``num_layers_in_first_/
    last_pipeline_stage``): at least one layer per stage, any first and last counts, the stages between them
    equal. In order of the first stage's count, then the middle stages'."""
    if pp == 1:
        return [[trunk]] if trunk >= 1 else []
    if pp == 2:
        return [[first, trunk - first] for first in range(1, trunk)]
    splits = []
    for first in range(1, trunk):
        for middle in range(1, (trunk - first) // (pp - 2) + 1):
            last = trunk - first - middle * (pp - 2)
            if last >= 1:
                splits.append([first] + [middle] * (pp - 2) + [last])
    return splits


def _nearest_split(wanted: List[int], trunk: int, pp: int) -> List[int]:
    """The split megatron-core builds that differs least from ``wanted`` (padded or cut to ``pp`` entries)."""
    wanted = (list(wanted) + [0] * pp)[:pp]
    return min(pipeline_splits(trunk, pp), key=lambda split: sum(abs(a - b) for a, b in zip(split, wanted)))


def _check_layers_per_stage(split, trunk: int, pp: int, taken: str, out: _Problems) -> None:
    """``parallel.layers_per_stage``: ``auto``, or a list megatron-core can build for this trunk and pp."""
    name = "parallel.layers_per_stage"
    if trunk < pp:
        out.add(name, f"{split!r} cannot give each of the pp={pp} stages one of the trunk's {trunk} layers ({taken})",
                f"set parallel.pp to at most {trunk}")
        return
    if split == "auto":
        return
    nearest = _nearest_split(split, trunk, pp)
    fix = f"use {nearest} (the nearest split megatron-core builds), or auto for the FLOP-balanced one"
    if len(split) != pp:
        out.add(name, f"{split} has {len(split)} entr{'y' if len(split) == 1 else 'ies'}, but parallel.pp={pp}", fix)
    elif min(split) < 1:
        out.add(name, f"{split} leaves a stage without trunk layers (every stage needs >= 1)", fix)
    elif sum(split) != trunk:
        out.add(name, f"{split} sums to {sum(split)}, but the trunk has {trunk} layers ({taken})", fix)
    elif len(set(split[1:-1])) > 1:
        out.add(name, f"{split}: megatron-core splits the stages between the first and the last evenly, so their "
                "counts must be equal", fix)


DEEPSPEED_SHARDING = ("zero1", "zero2", "zero3")


def _check_parallel(cfg: Config, out: _Problems) -> None:
    """Sharding combinations, sequence parallelism and overlap settings."""
    par = cfg.parallel
    deepspeed = par.sharding in DEEPSPEED_SHARDING
    if deepspeed and "parallel.pp" not in out.bad and par.pp > 1:
        out.add(
            "parallel.sharding",
            f"{par.sharding} (DeepSpeed ZeRO) does not combine with pipeline parallelism (pp={par.pp}): DeepSpeed "
            "runs ZeRO-2/3 without pipelines, and ZeRO-1 only inside its own pipeline engine. Supported: none and "
            "distributed_optimizer with TP x PP x DP; zero1, zero2 and zero3 with TP x DP",
            "set parallel.sharding=distributed_optimizer (megatron's ZeRO-1-style sharding, which works with pp), "
            "or parallel.pp=1",
        )
    if deepspeed and (par.overlap_grad_reduce or par.overlap_param_gather):
        out.add(
            "parallel.overlap_grad_reduce" if par.overlap_grad_reduce else "parallel.overlap_param_gather",
            f"is megatron DDP's; sharding={par.sharding} runs DeepSpeed's engine",
            'drop it and set DeepSpeed\'s {"zero_optimization": {"overlap_comm": true}} in parallel.deepspeed_config',
        )
    if par.sharding == "fsdp":
        _check_fsdp(cfg, out)
    if par.deepspeed_config and not deepspeed:
        out.add("parallel.deepspeed_config", f"is only read with sharding zero1, zero2 or zero3, not {par.sharding}",
                "drop it, or choose a DeepSpeed sharding")
    if par.sequence_parallel and "parallel.tp" not in out.bad and par.tp == 1:
        out.add("parallel.sequence_parallel", "needs tensor parallelism (it splits the sequence over TP ranks)",
                "set parallel.tp > 1, or parallel.sequence_parallel=false")
    if par.sequence_parallel and deepspeed:
        out.add(
            "parallel.sequence_parallel",
            f"is not supported with sharding={par.sharding}: the norms' gradients must be summed over TP ranks, "
            "which megatron's DDP does and DeepSpeed's engine does not",
            "use sharding=distributed_optimizer (or none) with sequence parallelism",
        )
    if par.sequence_parallel and not out.bad & {"model.seq_length", "parallel.tp"} and cfg.model.seq_length % par.tp:
        out.add("model.seq_length", f"{cfg.model.seq_length} cannot be split over parallel.tp={par.tp} ranks "
                "(sequence parallelism)", f"use a multiple of {par.tp}")
    if par.overlap_param_gather and par.sharding == "none":
        out.add(
            "parallel.overlap_param_gather",
            f"needs sharding=distributed_optimizer (there is no parameter all-gather with sharding={par.sharding})",
            "set parallel.sharding=distributed_optimizer or parallel.overlap_param_gather=false",
        )
    if par.overlap_param_gather and not par.overlap_grad_reduce:
        out.add(
            "parallel.overlap_param_gather",
            "needs overlap_grad_reduce=true (megatron's rule)",
            "set parallel.overlap_grad_reduce=true",
        )


def _check_fsdp(cfg: Config, out: _Problems) -> None:
    """What the FSDP2 engine (engines/fsdp.py) does not run: pipeline stages, fp16's loss scaling, sequence
    parallelism, Transformer Engine's layers, and megatron DDP's overlap flags (FSDP2 overlaps its own
    collectives)."""
    par = cfg.parallel
    if par.pp > 1 and "parallel.pp" not in out.bad:
        out.add("parallel.sharding", f"fsdp runs without pipeline parallelism here (pp={par.pp})",
                "set parallel.pp=1, or parallel.sharding=distributed_optimizer for TP x PP x DP")
    if cfg.train.precision == "fp16":
        out.add("train.precision", "fp16 is not supported with sharding=fsdp (no loss scaler)",
                "use train.precision=bf16 (or fp32)")
    if par.sequence_parallel:
        out.add("parallel.sequence_parallel", "is not supported with sharding=fsdp: the norms' gradients must be "
                "summed over TP ranks, which megatron's DDP does", "use sharding=distributed_optimizer with it")
    if cfg.model.transformer_impl == "transformer_engine":
        out.add("model.transformer_impl", "transformer_engine is not used with sharding=fsdp (FSDP2 runs "
                "megatron-core's local layers: engines/fsdp.py)", "set model.transformer_impl=auto or local")
    for name in ("overlap_grad_reduce", "overlap_param_gather"):
        if getattr(par, name):
            out.add(f"parallel.{name}", "is megatron DDP's; sharding=fsdp overlaps its own all-gathers and "
                    "reduce-scatters", f"drop parallel.{name}")


def _check_optim(cfg: Config, out: _Problems) -> None:
    """Optimizer and learning-rate schedule."""
    opt = cfg.optim
    if not opt.lr > 0:
        out.add("optim.lr", f"must be > 0, got {opt.lr}", "use e.g. 3e-4")
    if not 0.0 <= opt.min_lr_ratio <= 1.0:
        out.add("optim.min_lr_ratio", f"must be in [0, 1], got {opt.min_lr_ratio}", "use 0.03 (code) or 0.1 (text)")
    if not opt.weight_decay >= 0:
        out.add("optim.weight_decay", f"must be >= 0, got {opt.weight_decay}", "use 0.1")
    for name, beta in (("optim.adam_beta1", opt.adam_beta1), ("optim.adam_beta2", opt.adam_beta2)):
        if not 0.0 <= beta < 1.0:
            out.add(name, f"must be in [0, 1), got {beta}", "use 0.9 for beta1, 0.95 for beta2")
    if not opt.adam_eps > 0:
        out.add("optim.adam_eps", f"must be > 0, got {opt.adam_eps}", "use 1e-8")
    if not opt.clip_grad >= 0:
        out.add("optim.clip_grad", f"must be >= 0 (0 disables clipping), got {opt.clip_grad}", "use 1.0")
    if opt.warmup_iters < 0:
        out.add("optim.warmup_iters", f"must be >= 0, got {opt.warmup_iters}", "use 0 for no warmup")
    if opt.decay_iters is not None and opt.decay_iters < 1:
        out.add("optim.decay_iters", f"must be >= 1 or null, got {opt.decay_iters}", "use null for train.iters")
    # Megatron's scheduler asserts warmup < decay. With decay_iters null a run shorter than the warmup is fine
    # (it ends during warmup; resolved_decay_iters keeps the scheduler valid), so only an explicit value can clash.
    if opt.decay_iters is not None and opt.decay_iters >= 1 and opt.warmup_iters >= opt.decay_iters:
        out.add(
            "optim.warmup_iters",
            f"{opt.warmup_iters} is not below optim.decay_iters={opt.decay_iters} (megatron's scheduler needs "
            f"warmup < decay)",
            f"use warmup_iters < {opt.decay_iters}, raise optim.decay_iters, or set it to null (= train.iters)",
        )


def _check_run(cfg: Config, out: _Problems) -> None:
    """Batch shape, precision, evaluation, data and checkpoint settings."""
    train = cfg.train
    if not out.bad & {"train.micro_batch_size", "train.global_batch_size"}:
        if train.global_batch_size % train.micro_batch_size:
            out.add(
                "train.global_batch_size",
                f"{train.global_batch_size} is not a multiple of micro_batch_size={train.micro_batch_size}",
                f"use a multiple of {train.micro_batch_size}",
            )
    if train.precision == "fp16" and train.device == "cpu":
        out.add(
            "train.precision",
            "fp16 needs a GPU (dynamic loss scaling and megatron's fp16 optimizer, with or without the "
            "distributed optimizer, run on CUDA only)",
            "use precision=fp32 or bf16 on CPU, or train.device=cuda",
        )
    if cfg.model.transformer_impl == "transformer_engine" and train.device == "cpu":
        out.add("model.transformer_impl", "transformer_engine layers run on CUDA only, and train.device=cpu",
                "set model.transformer_impl=auto (local layers on CPU, Transformer Engine on GPU) or local, or "
                "train.device=cuda")
    if train.eval_interval < 0:
        out.add("train.eval_interval", f"must be >= 0, got {train.eval_interval}", "use 0 to never evaluate")
    if train.eval_interval > 0 and train.eval_iters < 1:
        out.add("train.eval_iters", f"must be >= 1 when evaluating, got {train.eval_iters}", "use e.g. 10")

    if train.exit_duration_mins is not None and train.exit_duration_mins <= 0:
        out.add("train.exit_duration_mins", f"must be > 0, got {train.exit_duration_mins}",
                "use a few minutes under the job's time limit, or null for no budget")
    if train.stop_at_step is not None and train.stop_at_step < 1:
        out.add("train.stop_at_step", f"must be >= 1, got {train.stop_at_step}", "use null to run to train.iters")
    if train.nan_skip_limit < 1:
        out.add("train.nan_skip_limit", f"must be >= 1, got {train.nan_skip_limit}",
                "use e.g. 10, or nan_policy=stop to stop at the first non-finite step")

    _check_data(cfg, out)
    _check_checkpoint(cfg, out)


def _check_checkpoint(cfg: Config, out: _Problems) -> None:
    ckpt = cfg.checkpoint
    if ckpt.interval < 0:
        out.add("checkpoint.interval", f"must be >= 0, got {ckpt.interval}", "use 0 to save only at the end")
    if ckpt.keep is not None and ckpt.keep < 1:
        out.add("checkpoint.keep", f"must be >= 1 or null, got {ckpt.keep}", "use null to keep every checkpoint")
    if ckpt.finetune and not ckpt.load:
        out.add("checkpoint.finetune", "needs checkpoint.load (the checkpoint whose weights to start from)",
                "set checkpoint.load=PATH/iter_NNNNNNN, or finetune=false")
    if ckpt.async_save and cfg.parallel.sharding in DEEPSPEED_SHARDING:
        out.add("checkpoint.async_save", f"is not supported with sharding={cfg.parallel.sharding}: DeepSpeed's engine "
                "writes its optimizer partitions synchronously", "set checkpoint.async_save=false")
    if ckpt.async_save and not ckpt.save:
        out.add("checkpoint.async_save", "has no effect with checkpoint.save=false", "drop one of the two")


def _check_data(cfg: Config, out: _Problems) -> None:
    """Data and tokenizer settings that need no file (the files are checked by mtp_megatron.data.inputs)."""
    tok, data = cfg.tokenizer, cfg.data
    if tok.type == "sentencepiece" and not tok.model:
        out.add("tokenizer.model", "is required with tokenizer.type=sentencepiece",
                "give the .model file the data was preprocessed with (tools/train_tokenizer.py writes one)")
    if tok.type == "byte" and tok.model:
        out.add("tokenizer.model", f"is set ({tok.model!r}) but tokenizer.type=byte reads no model file",
                "drop tokenizer.model, or set tokenizer.type=sentencepiece")
    if data.reset_attention_mask and cfg.model.transformer_impl == "transformer_engine":
        out.add("data.reset_attention_mask",
                "needs an explicit attention mask, which Transformer Engine's causal attention ignores",
                "set model.transformer_impl=local (or auto, which then picks local)")
    if data.paths and data.synthetic:
        out.add("data.synthetic", f"is true, but data.paths is set too ({data.paths})",
                "set data.synthetic=false to train on data.paths (configs/tiny.yaml sets synthetic: true), or drop "
                "data.paths")
    if data.num_workers < 0:
        out.add("data.num_workers", f"must be >= 0, got {cfg.data.num_workers}", "use 0 to load in-process")
    if not _valid_split(cfg.data.split):
        out.add(
            "data.split",
            f"{cfg.data.split!r} is not up to three non-negative comma-separated weights with a positive first one",
            "use e.g. 969,30,1",
        )
    elif cfg.train.eval_interval > 0 and _split_weights(data.split)[1] == 0:
        out.add("data.split", f"{data.split!r} gives the validation split no documents, but "
                f"train.eval_interval={cfg.train.eval_interval} evaluates on it",
                "give it a share (e.g. 969,30,1) or set train.eval_interval=0")


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _split_weights(split: str) -> List[float]:
    """Train, valid and test weights of a split string (missing trailing ones are 0); ValueError if not numbers."""
    weights = [float(w) for w in split.split(",")]
    return weights + [0.0] * (3 - len(weights))


def _valid_split(split: str) -> bool:
    try:
        weights = _split_weights(split)
    except ValueError:
        return False
    return len(weights) == 3 and all(w >= 0 for w in weights) and weights[0] > 0
