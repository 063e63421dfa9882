"""Per-GPU memory, step time and training days of a config at a layout, and the smallest change that fits.

All byte counts are per GPU of a pipeline stage; parameter counts ``P`` are that GPU's TP shard (from
``stages.stage_params``, the real model built on meta); ``dp`` is the data-parallel size; ``w`` the bytes of a
parameter (bf16/fp16 2, fp32 4). ``train.precision=auto`` plans as bf16, what a GPU run uses.

Training state (what the trainer's engines keep; mtp_megatron/training/memory.py measures the same on CPU):

* weights: ``P * w``; ZeRO-3 keeps ``P * w / dp`` plus its gathered working set, taken as 2 units (the one being
  computed and the one prefetched), a unit being the largest of one layer, the embedding and the unembedding.
  FSDP2 (engines/fsdp.py) keeps fp32 shards, ``4 P / dp``, and the same gathered working set in ``w``.
* gradients: megatron-core DDP (sharding none / distributed_optimizer) keeps an fp32 buffer of every gradient
  (``grad_reduce_in_fp32=True`` in engines/megatron.py ``wrap_model``; the distributed optimizer reduce-scatters
  inside that same full buffer): ``4 P``. DeepSpeed accumulates gradients in the parameter dtype by default
  (the generated config sets no ``data_types.grad_accum_dtype``): ZeRO-1 keeps the full gradients, ``w P``;
  ZeRO-2 and ZeRO-3 only their partition, ``w P / dp``; every ZeRO stage also allocates one reduce bucket of
  ``reduce_bucket_size`` elements in that dtype, whatever the model's size (DeepSpeed's default 5e8, i.e.
  0.93 GiB in bf16; one buffer, as ``overlap_comm`` is off by default). FSDP2 keeps its fp32 shard,
  ``4 P / dp``. docs/benchmarks.md section 5 measured these shares (fp32, CPU).
* optimizer: Adam's exp_avg and exp_avg_sq, ``8 P``, plus an fp32 master copy, ``4 P``, when the weights are not
  fp32 (megatron-core) or always (DeepSpeed keeps its own fp32 partition; FSDP2's fp32 shards are the master
  copy); divided by ``dp`` under distributed_optimizer, zero1/2/3 and fsdp.

Activations, per transformer layer and microbatch, for 16-bit activations (Korthikanti et al. 2022, "Reducing
Activation Recomputation in Large Transformer Models", Sec. 4), s = sequence, b = micro batch, h = hidden,
a = attention heads, t = TP:

* no recompute: ``s b h (10 + 24/t + 5 a s / (h t))``, or ``s b h (34 + 5 a s / h) / t`` with sequence parallel;
* selective (core attention recomputed): ``s b h (10 + 24/t)``, or ``34 s b h / t`` with sequence parallel;
* full (layer inputs kept): ``2 s b h`` per layer (``/ t`` with sequence parallel), plus, once, one layer's
  no-recompute activations while it is recomputed in backward.

The paper's counts are for a GPT MLP of width 4h with dropout masks; they are used as they are for SwiGLU. The
``5 a s / h`` term is the unfused attention's stored s x s scores; flash attention (Transformer Engine) does not
keep them, so without recompute the estimate is an upper bound there. fp32 activations count twice the bytes.

Stage k holds ``min(pp - k, microbatches)`` microbatches in flight under 1F1B (1 without pipelining). The MTP heads
(last stage) are transformer layers called outside megatron's TransformerBlock, so full recompute does not apply
to them (selective does, it lives in the attention module): their layers count as no-recompute layers then. Naive
backward: all n head layers' activations per microbatch in flight. Sequential backward: the stored trunk output
(``2 s b h``, ``/ t`` with sequence parallel) per microbatch in flight, plus one head layer's activations, once.

MTP logits (last stage): per head ``s b V/t`` elements, kept as the ``w``-byte logits plus the fp32 copy that the
cross-entropy takes (``logits.float()`` in model/heads/base.py; the same tensor in fp32); sequential backward holds one
head's at a time, naive backward all n heads'.

Throughput: FLOPs per token = ``6 N + 12 L h s`` (N = parameters of the whole model, L = trunk + head layers,
the attention score and value products); step time = FLOPs per token x tokens per step / (GPUs x peak x MFU).
MFU counts model FLOPs only, so recomputation shows up as a lower achievable MFU, not as more FLOPs here.

Pipeline balance: each stage's training FLOPs per token (mtp_megatron/distributed/pipeline_split.py: its trunk
layers; the embedding on the first stage; the n head layers, n passes through the unembedding and n
cross-entropies on the last; recomputation included), and slowest stage / mean stage. Every stage runs every
microbatch, so the slowest one paces the step: the balanced step time above, times the balance.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Sequence, Tuple

from mtp_megatron.config import Config, ConfigError
from mtp_megatron.distributed.pipeline_split import layers_per_stage, pipeline_balance, stage_flops
from mtp_megatron.distributed.topology import validate_for_world
from mtp_megatron.planner.stages import StageParams, stage_params, total_params

GIB = 2**30
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
DEEPSPEED_REDUCE_BUCKET = 500_000_000  # DeepSpeed's default zero_optimization.reduce_bucket_size, in elements
SHARDED_OPTIMIZER = ("distributed_optimizer", "zero1", "zero2", "zero3", "fsdp")


@dataclass(frozen=True)
class Hardware:
    """The GPUs and what to assume about them."""

    gpu_memory_gib: float
    """Memory of one GPU, GiB."""

    reserve_fraction: float = 0.10
    """Kept free for the CUDA context, NCCL buffers and allocator fragmentation."""

    peak_tflops: float = 989.0
    """Dense bf16 peak per GPU (H100 SXM: 989)."""

    mfu: float = 0.4
    """Model FLOPs utilisation assumed for the step time."""

    @property
    def usable_gib(self) -> float:
        return self.gpu_memory_gib * (1.0 - self.reserve_fraction)


@dataclass(frozen=True)
class Layout:
    """The parts of a config (and its world size) that the estimate reads."""

    tp: int
    pp: int
    dp: int
    sharding: str
    precision: str
    micro_batch: int
    global_batch: int
    num_microbatches: int
    recompute: str
    sequence_parallel: bool
    n_heads: int
    sequential_backward: bool
    seq_length: int
    hidden: int
    attention_heads: int
    padded_vocab: int
    trunk_layers: int
    loss_chunk: int = 0
    """``mtp.loss_chunk_size``: sequence positions whose logits a head forms at once (0: the whole sequence)."""

    @classmethod
    def of(cls, cfg: Config, world_size: int) -> "Layout":
        """Raises ``ConfigError`` when ``cfg`` cannot run on ``world_size`` GPUs."""
        dims = validate_for_world(cfg, world_size)
        precision = "bf16" if cfg.train.precision == "auto" else cfg.train.precision
        return cls(
            tp=dims.tp, pp=dims.pp, dp=dims.dp, sharding=cfg.parallel.sharding, precision=precision,
            micro_batch=cfg.train.micro_batch_size, global_batch=cfg.train.global_batch_size,
            num_microbatches=dims.num_microbatches(cfg.train.global_batch_size, cfg.train.micro_batch_size),
            recompute=cfg.train.recompute, sequence_parallel=cfg.parallel.sequence_parallel,
            n_heads=cfg.mtp.n_heads, sequential_backward=cfg.mtp.sequential_backward,
            seq_length=cfg.model.seq_length, hidden=cfg.model.hidden_size,
            attention_heads=cfg.model.num_attention_heads, padded_vocab=cfg.model.padded_vocab_size(dims.tp),
            trunk_layers=cfg.trunk_num_layers(), loss_chunk=cfg.mtp.loss_chunk_size,
        )

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def weight_bytes(self) -> int:
        return DTYPE_BYTES[self.precision]

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_length


# ------------------------------------------------------------------------------------------------ memory terms


def weights_bytes(p: int, largest_module: int, lay: Layout) -> float:
    """``P w``; ZeRO-3: ``P w / dp + 2 * largest_module * w`` (own partition + gathered working set); FSDP2 the
    same with fp32 shards."""
    if lay.sharding in ("zero3", "fsdp"):
        shard = 4 if lay.sharding == "fsdp" else lay.weight_bytes
        return p * shard / lay.dp + 2 * min(largest_module, p) * lay.weight_bytes
    return p * lay.weight_bytes


def grads_bytes(p: int, lay: Layout) -> float:
    """megatron DDP: ``4 P``; ZeRO-1: ``w P``; ZeRO-2/3: ``w P / dp``; ZeRO also its reduce bucket (``5e8 w``);
    FSDP2: ``4 P / dp``."""
    w = lay.weight_bytes
    if lay.sharding in ("none", "distributed_optimizer"):
        return 4.0 * p
    if lay.sharding == "fsdp":
        return 4.0 * p / lay.dp
    bucket = DEEPSPEED_REDUCE_BUCKET * w  # torch.empty(reduce_bucket_size) in ZeRO's optimizer, not sized by P
    if lay.sharding == "zero1":
        return w * p + bucket
    return w * p / lay.dp + bucket


def optimizer_bytes(p: int, lay: Layout) -> float:
    """``(8 + 4 if a separate fp32 master copy) P``, ``/ dp`` when the optimizer state is sharded."""
    deepspeed = lay.sharding.startswith("zero")
    master = 4 if (deepspeed or (lay.precision != "fp32" and lay.sharding != "fsdp")) else 0
    per_param = 8 + master
    return per_param * p / (lay.dp if lay.sharding in SHARDED_OPTIMIZER else 1)


def layer_activation_bytes(lay: Layout, recompute: str) -> float:
    """One transformer layer's stored activations for one microbatch (Korthikanti et al. 2022; module doc)."""
    s, b, h, a, t = lay.seq_length, lay.micro_batch, lay.hidden, lay.attention_heads, lay.tp
    sbh = s * b * h
    scores = 5 * a * s / (h * t)
    sp = lay.sequence_parallel
    if recompute == "none":
        per = (34 / t + scores) if sp else (10 + 24 / t + scores)
    elif recompute == "selective":
        per = 34 / t if sp else 10 + 24 / t
    elif recompute == "full":
        per = 2 / t if sp else 2.0
    else:
        raise ValueError(f"unknown recompute {recompute!r}")
    # The paper counts 16-bit activations (2 bytes); fp32 doubles every term (its 1-byte dropout masks too: a
    # slight overestimate).
    return sbh * per * lay.weight_bytes / 2


def in_flight(stage: int, lay: Layout) -> int:
    """Microbatches whose activations stage ``stage`` holds at once under 1F1B: ``min(pp - stage, m)``."""
    return min(lay.pp - stage, lay.num_microbatches)


def activations_bytes(st: StageParams, lay: Layout, sequential: bool) -> float:
    """Trunk layers x in-flight microbatches (+ full recompute's working layer), and the heads (module doc)."""
    m = in_flight(st.stage, lay)
    total = st.trunk_layers * m * layer_activation_bytes(lay, lay.recompute)
    if lay.recompute == "full" and st.trunk_layers:
        total += layer_activation_bytes(lay, "none")  # the layer being recomputed in backward
    if st.head_layers:
        # Heads run outside TransformerBlock: megatron's full recompute does not reach them.
        head_mode = "none" if lay.recompute == "full" else lay.recompute
        head_layer = layer_activation_bytes(lay, head_mode)
        if sequential:
            trunk_output = 2 * lay.seq_length * lay.micro_batch * lay.hidden / (lay.tp if lay.sequence_parallel else 1)
            total += m * trunk_output * lay.weight_bytes / 2 + head_layer
        else:
            total += m * st.head_layers * head_layer
    return total


def logits_bytes(st: StageParams, lay: Layout, sequential: bool) -> float:
    """``c b V/t (w + 4)`` per head (``4`` alone in fp32), ``c`` the positions formed at once (the sequence, or
    ``mtp.loss_chunk_size`` in the sequential order); one head (sequential) or all n (naive, whose one backward
    keeps every chunk's graph)."""
    if not st.head_layers:
        return 0.0
    per_element = lay.weight_bytes + (4 if lay.weight_bytes != 4 else 0)
    positions = min(lay.seq_length, lay.loss_chunk) if sequential and lay.loss_chunk > 0 else lay.seq_length
    one_head = positions * lay.micro_batch * (lay.padded_vocab // lay.tp) * per_element
    return one_head * (1 if sequential else st.head_layers)


def checkpoint_share_bytes(p: int, lay: Layout) -> float:
    """What one GPU writes into a checkpoint: fp32 weights ``4 P / dp`` (megatron's fully parallel save splits
    the DP-replicated ones; ZeRO-3 and FSDP2 hold ``1/dp`` already) plus its optimizer state. Each rank writes
    its own ranges with no gather (engines/distributed_optimizer_checkpoint.py, engines/flat_shards.py), so a
    save adds no GPU memory beyond one tensor's copy at a time; a synchronous save buffers up to about this much
    in host memory while writing (bench/checkpoint_io.py measured 0.45-0.63x on CPU), an async save stages all of
    it in host memory."""
    return 4 * p / lay.dp + optimizer_bytes(p, lay)


# ------------------------------------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class StageMemory:
    """Bytes on one GPU of a stage, by kind; ``logits_other`` is the other head order's logits, for comparison."""

    params: StageParams
    in_flight: int
    weights: float
    grads: float
    optimizer: float
    activations: float
    logits: float
    logits_other: float
    activations_other: float
    checkpoint_share: float = 0.0
    """Bytes this GPU writes into a checkpoint (``checkpoint_share_bytes``): the host memory a save buffers."""

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.logits


@dataclass(frozen=True)
class Throughput:
    total_params: int
    layers: int
    flops_per_token: float
    tokens_per_step: int
    tokens: float
    steps: int
    step_seconds: float

    @property
    def days(self) -> float:
        return self.steps * self.step_seconds / 86400


@dataclass(frozen=True)
class Plan:
    layout: Layout
    hardware: Hardware
    stages: List[StageMemory]
    throughput: Throughput
    stage_flops: List[float]
    """Training FLOPs per token of each pipeline stage (all its TP ranks together; module docstring)."""

    @property
    def peak(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.total)

    @property
    def balance(self) -> float:
        """Slowest stage / mean stage (1.0: no stage waits for another)."""
        return pipeline_balance(self.stage_flops)

    @property
    def paced_step_seconds(self) -> float:
        """The step time when the slowest stage paces the pipeline: ``throughput.step_seconds x balance``."""
        return self.throughput.step_seconds * self.balance

    @property
    def fits(self) -> bool:
        return self.peak.total <= self.hardware.usable_gib * GIB


def estimate(cfg: Config, world_size: int, hardware: Hardware, tokens: Optional[float] = None) -> Plan:
    """The plan of ``cfg`` on ``world_size`` GPUs; ``tokens`` defaults to ``train.iters`` global batches.

    Raises ``ConfigError`` when the config cannot run on that many GPUs.
    """
    lay = Layout.of(cfg, world_size)
    params = stage_params(cfg)
    stages = []
    seq = lay.sequential_backward
    for st in params:
        stages.append(StageMemory(
            params=st,
            in_flight=in_flight(st.stage, lay),
            weights=weights_bytes(st.params, st.largest_module, lay),
            grads=grads_bytes(st.params, lay),
            optimizer=optimizer_bytes(st.params, lay),
            activations=activations_bytes(st, lay, seq),
            logits=logits_bytes(st, lay, seq),
            logits_other=logits_bytes(st, lay, not seq),
            activations_other=activations_bytes(st, lay, not seq),
            checkpoint_share=checkpoint_share_bytes(st.params, lay),
        ))
    n = total_params(params, lay.tp)
    layers = lay.trunk_layers + lay.n_heads
    flops_per_token = 6.0 * n + 12.0 * layers * lay.hidden * lay.seq_length
    budget = float(tokens) if tokens is not None else float(cfg.train.iters) * lay.tokens_per_step
    step_seconds = flops_per_token * lay.tokens_per_step / (
        world_size * hardware.peak_tflops * 1e12 * hardware.mfu)
    throughput = Throughput(
        total_params=n, layers=layers, flops_per_token=flops_per_token, tokens_per_step=lay.tokens_per_step,
        tokens=budget, steps=math.ceil(budget / lay.tokens_per_step), step_seconds=step_seconds,
    )
    return Plan(layout=lay, hardware=hardware, stages=stages, throughput=throughput,
                stage_flops=stage_flops(cfg, layers_per_stage(cfg)))


# ------------------------------------------------------------------------------------------------ suggestions

Change = Tuple[Tuple[str, str, Any], ...]
"""One candidate change: ((section, field, value), ...), applied together."""


@dataclass(frozen=True)
class Suggestion:
    """A change that fits: config overrides (possibly none) and the node count (possibly the given one)."""

    overrides: Tuple[str, ...]
    nodes: int
    plan: Plan


def override_string(section: str, key: str, value: Any) -> str:
    """``section.key=value`` as ``load_config`` parses it (YAML: ``true``, not ``True``)."""
    text = str(value).lower() if isinstance(value, bool) else str(value)
    return f"{section}.{key}={text}"


def apply_change(cfg: Config, change: Change) -> Config:
    """A copy of ``cfg`` with the change's fields set (validated later, with the world size)."""
    out = copy.deepcopy(cfg)
    for section, key, value in change:
        setattr(getattr(out, section), key, value)
    return out


_SHARDING_STRENGTH = {"none": 0, "distributed_optimizer": 1, "zero1": 1, "zero2": 2, "zero3": 3, "fsdp": 3}
_RECOMPUTE_STRENGTH = {"none": 0, "selective": 1, "full": 2}


def _dimensions(cfg: Config, gpus_per_node: int) -> List[List[Change]]:
    """The kinds of change, in the order they are tried (cheapest in speed first), each with its options."""
    par, train = cfg.parallel, cfg.train
    trunk = cfg.trunk_num_layers()
    # A larger TP only within one node: TP's all-reduces run every layer and need NVLink.
    tps = [[("parallel", "tp", t)] for t in range(par.tp + 1, gpus_per_node + 1) if gpus_per_node % t == 0]
    # A configured split (a list, or auto) is for the configured pp: another pp gets the balanced split of its own.
    resplit = [("parallel", "layers_per_stage", "auto")] if par.layers_per_stage is not None else []
    pps = [[("parallel", "pp", p), *resplit] for p in range(par.pp + 1, trunk + 1) if trunk % p == 0]
    shardings = []
    for name in ("distributed_optimizer", "zero2", "zero3"):
        if _SHARDING_STRENGTH[name] > _SHARDING_STRENGTH[par.sharding]:
            change = [("parallel", "sharding", name)]
            if name.startswith("zero"):  # megatron's overlap flags do not apply to DeepSpeed's engine
                change += [("parallel", k, False) for k in ("overlap_grad_reduce", "overlap_param_gather")
                           if getattr(par, k)]
            shardings.append(change)
    sp = [] if par.sequence_parallel else [[("parallel", "sequence_parallel", True)]]
    recompute = [[("train", "recompute", r)] for r in ("selective", "full")
                 if _RECOMPUTE_STRENGTH[r] > _RECOMPUTE_STRENGTH[train.recompute]]
    micro = []
    mbs = train.micro_batch_size // 2
    while mbs >= 1:
        micro.append([("train", "micro_batch_size", mbs)])
        mbs //= 2
    dims = [tps, pps, shardings, sp, recompute, micro]
    return [[tuple(option) for option in dim] for dim in dims if dim]


def candidate_changes(cfg: Config, gpus_per_node: int) -> Iterator[Change]:
    """Every combination of the changes, fewest kinds of change first, then in the dimensions' order."""
    dims = _dimensions(cfg, gpus_per_node)
    for k in range(1, len(dims) + 1):
        for chosen in itertools.combinations(dims, k):
            for options in itertools.product(*chosen):
                yield tuple(item for option in options for item in option)


def suggest(cfg: Config, nodes: int, gpus_per_node: int, hardware: Hardware,
            tokens: Optional[float] = None, max_node_factor: int = 64) -> Optional[Suggestion]:
    """The first change (``candidate_changes`` order) that fits on ``nodes``; failing that, the fewest nodes (up to
    ``max_node_factor`` times as many, doubling) on which the config fits as it is or with a change."""
    node_counts = [nodes * 2**i for i in range(int(math.log2(max_node_factor)) + 1)]
    for count in node_counts:
        changes: Sequence[Change] = ([()] if count != nodes else []) + list(candidate_changes(cfg, gpus_per_node))
        for change in changes:
            candidate = apply_change(cfg, change)
            try:
                plan = estimate(candidate, count * gpus_per_node, hardware, tokens)
            except ConfigError:
                continue  # e.g. pp not dividing the world, zero with pp > 1, a global batch dp does not divide
            if plan.fits:
                return Suggestion(tuple(override_string(*c) for c in change), count, plan)
    return None
