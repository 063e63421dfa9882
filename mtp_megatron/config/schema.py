"""The configuration schema: one dataclass per concern, a docstring under every field.

The field docstrings are the documentation: ``describe_fields`` reads them back from the source (like megatron-core's
``TransformerConfig``), so ``--help-config`` listings and the docs cannot drift from the code. Cross-field checks live
in ``validate.py``, loading and overrides in ``loader.py``. The defaults of ``Config()`` are a tiny CPU model that
trains in well under a second per step; a section's own defaults may be the paper's (``OptimConfig``).
"""

import ast
import dataclasses
import functools
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, List, Literal, Optional, Tuple, Union


@dataclass
class ModelConfig:
    """The GPT architecture, sized as the equivalent plain next-token (n=1) model."""

    num_layers: int = 5
    """Transformer layers of the equivalent plain n=1 GPT: the trunk plus head 1. With ``mtp.match_params`` the
    n-1 extra heads are taken out of these; otherwise they are added on top. See ``Config.trunk_num_layers``."""

    hidden_size: int = 64
    """Model width d (residual stream size). Must be a multiple of ``num_attention_heads``."""

    num_attention_heads: int = 4
    """Query attention heads. Must divide ``hidden_size`` and be a multiple of ``parallel.tp``."""

    num_query_groups: Optional[int] = None
    """Key/value heads for grouped-query attention (GQA). None = multi-head attention (one group per head). Must
    divide ``num_attention_heads`` and be a multiple of ``parallel.tp``."""

    head_dim: Optional[int] = None
    """Width of each attention head (query, key and value), megatron's ``kv_channels``. None = hidden_size /
    num_attention_heads. Another value makes the attention's inner width num_attention_heads * head_dim differ
    from hidden_size (as in Hugging Face Llama configs with an explicit ``head_dim``)."""

    ffn_hidden_size: Optional[int] = None
    """Width of the MLP's inner layer. None = 4*hidden for gelu, or for swiglu the Llama rule int(8*hidden/3)
    rounded up to a multiple of 256 (4096 -> 11008). Must be a multiple of ``parallel.tp``."""

    vocab_size: Optional[int] = None
    """Vocabulary size before padding. None = the tokenizer's (32000 for the Llama-2 tokenizer, 259 for bytes).
    A fixed value keeps parameter shapes independent of the tokenizer; it must be at least the tokenizer's. The
    embedding and unembedding use ``padded_vocab_size(tp)`` rows."""

    make_vocab_size_divisible_by: int = 128
    """Pad the vocabulary to a multiple of this times ``parallel.tp``, as Megatron does, so each TP rank holds an
    equal, GEMM-friendly slice. Changing it changes parameter shapes (checkpoints)."""

    seq_length: int = 128
    """Tokens per training sequence (context length). Must exceed ``mtp.n_heads`` so every head has a target."""

    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    """Normalisation layer type. RMSNorm as in Llama (the paper's models)."""

    activation: Literal["swiglu", "gelu"] = "swiglu"
    """MLP activation. swiglu (gated, Llama) or gelu (GPT-2 style)."""

    position_embedding: Literal["rope", "learned_absolute"] = "rope"
    """Position encoding: rotary (Llama) or a learned absolute table of ``seq_length`` rows."""

    rotary_base: float = 10000.0
    """RoPE base (theta), any positive number (500000.0 in Llama 3). 10000 as in Llama-2; raise it for
    long-context training."""

    rope_scaling_type: Optional[Literal["linear", "llama3"]] = None
    """RoPE scaling for contexts longer than the model was pretrained on, as megatron-core implements it. None =
    plain RoPE; linear = positions divided by ``rope_scaling_factor`` (position interpolation; megatron's
    ``seq_len_interpolation_factor``, Hugging Face's rope_type linear); llama3 = Llama 3.1's frequency-dependent
    scaling by ``rope_scaling_factor`` with megatron-core's fixed low_freq_factor 1, high_freq_factor 4 and
    original_max_position_embeddings 8192 (Hugging Face's rope_type llama3 with those values)."""

    rope_scaling_factor: float = 1.0
    """The RoPE scaling factor of ``rope_scaling_type`` (>= 1; 8 in Llama 3.1). Unused without a scaling type."""

    norm_epsilon: float = 1e-5
    """Epsilon added inside the norms for numerical stability."""

    init_method_std: float = 0.02
    """Standard deviation of the normal weight initialisation."""

    hidden_dropout: float = 0.0
    """Dropout probability on the residual branches, in [0, 1). 0 for LLM pre-training."""

    attention_dropout: float = 0.0
    """Dropout probability on the attention probabilities, in [0, 1). 0 for LLM pre-training."""

    add_bias_linear: bool = False
    """Add biases to the linear layers. False as in Llama."""

    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    """Layer implementation: megatron-core's local (pure PyTorch) modules or Transformer Engine's fused ones (CUDA
    only). auto = Transformer Engine when it is installed and the model runs on CUDA, else local (CPU runs, and the
    converters, which build on the CPU). Both save the same checkpoint keys, so either loads the other's."""

    def resolved_ffn_hidden_size(self) -> int:
        """The MLP width actually used, applying the defaults described on ``ffn_hidden_size``."""
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        if self.activation == "swiglu":
            # Llama keeps swiglu's parameter count near a 4*h MLP: 2/3 of 4*h, rounded up to a multiple of 256.
            return 256 * math.ceil(int(8 * self.hidden_size / 3) / 256)
        return 4 * self.hidden_size

    def resolved_head_dim(self) -> int:
        """The attention head width actually used: ``head_dim``, or hidden_size / num_attention_heads."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tp: int) -> int:
        """Vocabulary rows after Megatron's padding: the next multiple of ``make_vocab_size_divisible_by * tp``.
        Needs ``vocab_size`` resolved (``mtp_megatron.data.inputs.resolve_inputs`` fills it from the tokenizer)."""
        if self.vocab_size is None:
            raise ValueError("model.vocab_size is unresolved: resolve the config's inputs "
                             "(mtp_megatron.train.resolve_run_inputs, or load_run_config), or set it")
        multiple = self.make_vocab_size_divisible_by * tp
        return multiple * math.ceil(self.vocab_size / multiple)


@dataclass
class MTPConfig:
    """The multi-token prediction heads (Gloeckle et al. 2024)."""

    n_heads: int = 4
    """Future tokens predicted per position: head i predicts token t+i from the trunk output at t. All heads share
    the final norm and unembedding. 1 with transformer heads = a plain GPT. The paper's best is 4 for a 32k
    vocabulary, 8 for bytes."""

    head_type: Literal["transformer", "linear", "causal", "anticausal", "cp"] = "transformer"
    """The head design (mtp_megatron/model/heads/). transformer: head i is one transformer layer on the trunk output
    z (Gloeckle et al. 2024); linear: one d x d linear map of z, no nonlinearity (their App. B); causal: head i
    applies head layers 1..i in a chain; anticausal: head i applies layers n..i (the most distant token's head
    first); cp: a rank-``cp_rank`` mixture of products of per-token factors (Basharin et al. 2024; rank 1 is the
    transformer design). Every design keeps one head's logits alive at a time in the sequential backward."""

    cp_rank: int = 4
    """head_type=cp: mixture components r. Each head's layer output is expanded into r factor states by a d -> r d
    linear map (r d^2 parameters per head) and a d -> r map of z gives the mixture weights; 1 = no mixture."""

    cp_balance_coef: float = 0.01
    """head_type=cp: coefficient of the Switch-Transformer load-balancing term r sum_a f_a P_a (f_a: share of
    positions whose largest mixture weight is component a, P_a: a's mean weight; 1 when balanced), which keeps all
    components in use. 0 = off."""

    loss_weights: Optional[List[float]] = None
    """One weight per head multiplying that head's loss in the objective (head_type=cp: the exponent of head s's
    factors in the mixture's likelihood); null = all 1. The logged per-head losses stay unweighted; the logged
    ``loss`` is the weighted objective. E.g. DeepSeek-V3's [1, 0.3, 0.3, 0.3]."""

    loss_weight_schedule: Optional[List[List[float]]] = None
    """Later phases of the loss weights: [[step, w_1, ..., w_n], ...] in ascending step order, each replacing the
    weights from that training step (numbered as logged, 1 = the first) on; e.g. [[10000, 1, 0.1, 0.1, 0.1]] after
    loss_weights [1, 0.3, 0.3, 0.3] is DeepSeek-V3's schedule. null = loss_weights throughout."""

    sequential_backward: bool = True
    """Run each head's forward and backward one at a time, accumulating the gradient at the trunk output, so only
    one head's logits are alive (peak memory O(V + d) per token instead of O(nV + d)). False = the naive order (sum
    the heads' losses, one backward); same gradients, more memory; for comparison and debugging."""

    match_params: bool = False
    """Take the n-1 extra head layers out of the trunk so the parameter count equals the n=1 model's, as in the
    paper's comparisons. False = add them on top."""

    loss_chunk_size: int = 512
    """Sequence positions whose logits each head forms at once: each head's layer runs over the whole sequence,
    then its final norm, unembedding and fp32 cross-entropy run chunk by chunk, each chunk's backward right after
    its loss in the sequential order (evaluation scores chunk by chunk too), so one chunk's logits (micro batch x
    chunk x V/tp) are alive instead of the microbatch's. Same gradients and statistics to float rounding; need not
    divide seq_length (the last chunk is shorter). 0 = no chunking. With parallel.sequence_parallel it must be a
    multiple of parallel.tp (each rank takes loss_chunk_size / tp positions of its slice). The naive order
    (sequential_backward=false) keeps every chunk's graph for its one backward, so chunking saves it nothing.
    docs/benchmarks.md section 1 measures the memory and step time."""


@dataclass
class ParallelConfig:
    """Model parallelism. Data parallelism is derived: dp = world_size / (tp * pp), never configured."""

    tp: int = 1
    """Tensor-parallel size: each layer's weights split across this many ranks (keep within one NVLink node)."""

    pp: int = 1
    """Pipeline-parallel size: the trunk's layers split into this many stages; the heads, final norm and
    unembedding sit on the last stage. Must divide the trunk's layer count unless ``layers_per_stage`` is set."""

    layers_per_stage: Union[List[int], Literal["auto"], None] = None
    """Trunk layers on each pipeline stage, first to last: ``pp`` entries >= 1 summing to the trunk's layer count
    (``Config.trunk_num_layers``), e.g. [21, 15] for 13B's 36-layer trunk at pp=2, so the last stage's heads
    and unembeddings do not leave the other stages idle. ``auto`` = the split whose slowest stage does the
    fewest training FLOPs, heads, unembeddings and cross-entropies included (FLOP model in
    mtp_megatron/distributed/pipeline_split.py; tools/plan.py prints each stage's share), replaced by its list
    when the run starts, so the run's config.yaml shows it. null = an even split. megatron-core sets the first
    and last stages' counts freely and splits the rest evenly, so with pp > 2 the middle entries must be equal.
    Checkpoints load at any split."""

    sharding: Literal["none", "distributed_optimizer", "zero1", "zero2", "zero3", "fsdp"] = "distributed_optimizer"
    """How training state is spread over data-parallel ranks. none = plain DDP: every DP rank keeps the full fp32
    master weights and Adam state; distributed_optimizer = megatron-core's distributed optimizer (master weights
    and Adam state sharded over DP, gradients reduce-scattered; works with TP x PP x DP); zero1 / zero2 / zero3 =
    DeepSpeed ZeRO stage 1 (optimizer state), 2 (+ gradients) or 3 (+ parameters, gathered layer by layer) with
    TP x DP, no pipeline parallelism (pp=1); fsdp = torch FSDP2 (``fully_shard``: parameters, gradients and
    optimizer state sharded over DP, each trunk layer gathered for its forward and backward) with TP x DP, pp=1,
    fp32 or bf16, no sequence parallelism."""

    fsdp_reshard_after_forward: bool = True
    """sharding=fsdp: free each layer's gathered parameters after its forward and gather them again for its
    backward (ZeRO-3's memory); false keeps them from forward to backward (ZeRO-2's memory, one all-gather less
    per layer and step)."""

    sequence_parallel: bool = False
    """Megatron's sequence parallelism: with TP, split the activations outside the tensor-parallel regions (norms,
    dropout, residuals) along the sequence over the TP ranks, saving activation memory. Needs tp > 1."""

    deepspeed_config: Optional[str] = None
    """A DeepSpeed JSON file merged on top of the config generated from this one (sharding zero1/2/3 only), for
    DeepSpeed settings we do not expose: bucket sizes, overlap_comm, offload. The merged config is written to
    ``<run.dir>/deepspeed_config.json``. Keys this config owns (batch sizes, precision, clipping, ZeRO stage)
    must not be set there."""

    overlap_grad_reduce: bool = False
    """Overlap the gradient all-reduce / reduce-scatter with the backward pass (megatron DDP buckets; sharding
    none or distributed_optimizer; DeepSpeed's own equivalent is ``overlap_comm`` in ``deepspeed_config``)."""

    overlap_param_gather: bool = False
    """Overlap the distributed optimizer's parameter all-gather with the next forward pass. Needs
    ``sharding=distributed_optimizer`` and ``overlap_grad_reduce`` (megatron's rule)."""


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule. Defaults are the paper's (Gloeckle et al., Tables S13/S14)."""

    lr: float = 3e-4
    """Peak learning rate, reached at the end of warmup."""

    min_lr_ratio: float = 0.03
    """Final learning rate as a fraction of ``lr``, in [0, 1]. The paper decays to 3% for code models and 10% for
    natural-language ones."""

    weight_decay: float = 0.1
    """Decoupled (AdamW) weight decay coefficient."""

    adam_beta1: float = 0.9
    """Adam's first-moment decay."""

    adam_beta2: float = 0.95
    """Adam's second-moment decay. 0.95 (rather than 0.999) is the usual choice for LLM stability."""

    adam_eps: float = 1e-8
    """Adam's denominator epsilon."""

    clip_grad: float = 1.0
    """Clip the global gradient L2 norm to this value; 0 disables clipping."""

    warmup_iters: int = 2000
    """Optimizer steps of linear warmup from 0 to ``lr``."""

    decay_iters: Optional[int] = None
    """Optimizer step at which the decay reaches ``lr * min_lr_ratio`` (counted from step 0, warmup included);
    must exceed ``warmup_iters``. None = ``train.iters``, or just past warmup when the run is shorter than the
    warmup (a smoke test of a long schedule, e.g. 7b.yaml with train.iters=10); see ``resolved_decay_iters``."""

    decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    """Shape of the decay after warmup. The paper uses cosine."""

    def resolved_decay_iters(self, train_iters: int) -> int:
        """The decay length to give megatron's ``OptimizerParamScheduler``, which requires warmup < decay."""
        if self.decay_iters is not None:
            return self.decay_iters
        return max(train_iters, self.warmup_iters + 1)


@dataclass
class TokenizerConfig:
    """How text became token ids: must be the tokenizer the data was preprocessed with."""

    type: Optional[Literal["sentencepiece", "byte"]] = None
    """sentencepiece (a .model file, see tools/train_tokenizer.py) or byte (UTF-8 bytes 0..255 plus EOD, BOS and
    PAD: 259 ids, for multi-byte prediction). None = sentencepiece when ``model`` is set, else byte."""

    model: Optional[str] = None
    """Path to the sentencepiece .model file. Its end-of-sequence piece is the EOD that separates documents."""


@dataclass
class DataConfig:
    """Training data: Megatron indexed datasets (.bin/.idx) read through megatron-core's GPTDataset."""

    paths: List[str] = field(default_factory=list)
    """Indexed-dataset prefixes (the path without .bin/.idx, e.g. /d/code_text_document), optionally weighted as
    Megatron's blends: [0.7, /d/a_text_document, 0.3, /d/b_text_document] (weights are normalised; without
    weights, datasets are mixed in proportion to their token counts). Required unless ``synthetic``."""

    synthetic: bool = False
    """Train on synthetic tokens from megatron-core's mock GPT dataset instead of ``paths`` (smoke tests and
    benchmarks; configs/tiny.yaml sets it). Never implied: a config without data is an error."""

    split: str = "969,30,1"
    """Train, validation, test proportions of each dataset's documents, comma separated (Megatron's format)."""

    cache_dir: Optional[str] = None
    """Where megatron-core caches the sample and shuffle indices it builds at start (reused by any run with the
    same data, split, seed and sequence length). None = ``<run.dir>/data_cache``; point several runs at one
    shared folder to build them once."""

    reset_position_ids: bool = False
    """Restart position ids at 0 after each EOD (Megatron's --reset-position-ids). Only learned absolute position
    embeddings read position ids; rotary embeddings do not."""

    reset_attention_mask: bool = False
    """Stop attention across EOD: each token sees only its own document (Megatron's --reset-attention-mask). The
    heads then also skip targets in a later document. Costs a [b, 1, s, s] mask per microbatch and needs the local
    layer implementation."""

    eod_mask_loss: bool = False
    """Do not train on predictions made at EOD positions (the next document's first token) (Megatron's
    --eod-mask-loss)."""

    num_workers: int = 2
    """DataLoader worker processes on each rank that reads data. 0 loads in the training process."""


@dataclass
class TrainConfig:
    """The training loop and batch shape."""

    iters: int = 50
    """Optimizer steps to train for."""

    micro_batch_size: int = 2
    """Sequences per forward/backward on one data-parallel rank. Raise until memory is full."""

    global_batch_size: int = 8
    """Sequences per optimizer step over all data-parallel ranks. Must be a multiple of micro_batch_size * dp;
    the quotient is the number of microbatches (gradient-accumulation steps, and the pipeline's depth of work)."""

    seed: int = 1234
    """Random seed for initialisation, data order and dropout."""

    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Parameter and compute dtype (master weights stay fp32 in mixed precision). auto = bf16 on GPU, fp32 on
    CPU. fp16 needs a GPU (loss scaling)."""

    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recomputation: none; selective = recompute the attention core only (cheap, saves the s^2
    part); full = recompute whole layers in backward (saves most activation memory for ~33% more compute)."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to run. auto = cuda when a GPU is visible, else cpu (gloo)."""

    fused_kernels: bool = True
    """megatron-core's fused kernels on CUDA where installed and valid (bias-dropout-add, swiglu, masked softmax,
    RoPE, gradient-accumulation fusion; the run's log says which are on and why the others are off, see
    mtp_megatron/model/fusions.py); false to measure without them. CPU runs never use them."""

    eval_interval: int = 0
    """Run validation every this many steps; 0 = never."""

    eval_iters: int = 10
    """Validation batches (global batches) per evaluation."""

    exit_duration_mins: Optional[float] = None
    """Wall-clock budget of this process in minutes: past it, every rank stops at the next step boundary, saves a
    checkpoint and exits 0 with ``run_state.json`` saying ``stopped`` (set it a few minutes under the job's time
    limit). null = no budget. SIGTERM and SIGUSR1 do the same at any time."""

    stop_at_step: Optional[int] = None
    """Stop after this step as on SIGUSR1 (save, exit 0, ``run_state.json`` says ``stopped``), leaving the LR
    schedule laid out for ``iters``: splits one run into pieces (queue slots, resumption checks). null = run to
    ``iters``."""

    nan_policy: Literal["skip", "stop"] = "skip"
    """What a step with a non-finite loss (any head) or gradient norm does; its update never reaches the weights
    either way. skip: drop the update, log it (``skipped_steps``) and go on; stop: raise an error that names the
    step and the heads, saving nothing."""

    nan_skip_limit: int = 10
    """With nan_policy=skip, stop with an error after this many skipped steps in a row (the run is diverging, and
    its last checkpoint is the one to restart from)."""


@dataclass
class CheckpointConfig:
    """Saving, resuming and loading (megatron-core distributed checkpoints, reshardable across TP x PP x DP)."""

    save: bool = True
    """Write checkpoints into ``<run.dir>/checkpoints``: every ``interval`` steps, at the end, and when the run is
    asked to stop (SIGTERM, SIGUSR1, ``train.exit_duration_mins``). false for throwaway runs."""

    interval: int = 0
    """Save every this many steps (0 = only at the end and on a stop). Each save holds the model (trunk and every
    head), optimizer state, LR schedule, step, consumed samples, every rank's RNG, the config and the tokenizer's
    identity, in ``iter_NNNNNNN``."""

    keep: Optional[int] = None
    """Keep only the newest this many complete checkpoints of the run (older ones are deleted after a newer one is
    complete); null = keep all."""

    async_save: bool = False
    """Write checkpoints in a background process: training goes on once the tensors are staged, and the
    checkpoint is committed (renamed, ``latest`` updated) at a later step boundary when every rank is done."""

    fully_parallel_load: bool = True
    """Split a load's reads among the data-parallel replicas (megatron-core's fully parallel load): each DP rank
    reads 1/dp of the tensors its TP x PP position needs and they exchange the rest, instead of every replica
    reading the whole TP x PP share from the (shared) file system. false = every rank reads all it needs itself
    (less exchange memory, dp times the reads)."""

    resume: Literal["auto", "never"] = "auto"
    """auto: continue from the newest complete checkpoint in ``<run.dir>/checkpoints`` if there is one (else from
    ``load``, else from scratch), so restarting the same command resumes; never: always start afresh (refused if
    the run folder already holds checkpoints, which this run would mix with its own)."""

    load: Optional[str] = None
    """A checkpoint folder (``.../iter_NNNNNNN``, saved at any TP x PP x DP layout) to start from when the run
    folder has none yet: the full training state, or only the weights with ``finetune``."""

    finetune: bool = False
    """Take only the model weights from ``load`` (fresh optimizer, LR schedule, step 0 and data from the start),
    e.g. to fine-tune a pretrained model or change the optimizer setup."""


@dataclass
class LoggingConfig:
    """Metrics."""

    log_interval: int = 1
    """Log training metrics (loss per head, lr, throughput) every this many steps."""

    tensorboard: bool = True
    """Also write TensorBoard event files under ``run.dir``."""


@dataclass
class RunConfig:
    """Where a run writes its outputs."""

    dir: str = "runs/default"
    """Output folder: the resolved config.yaml, metrics.jsonl, TensorBoard events and checkpoints."""

    name: Optional[str] = None
    """Human-readable run name for logs. None = the folder's name."""


@dataclass
class Config:
    """The whole configuration of a run. ``Config()`` is a tiny CPU model that trains in seconds."""

    run: RunConfig = field(default_factory=RunConfig)
    """Output folder and run name."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The GPT architecture."""

    mtp: MTPConfig = field(default_factory=MTPConfig)
    """The multi-token prediction heads."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Tensor and pipeline parallelism, optimizer sharding."""

    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-3, warmup_iters=5))
    """Optimizer and learning-rate schedule. ``Config()`` shortens the paper's warmup (2000 steps, longer than the
    tiny default run) to 5 and raises lr to 3e-3, which tiny models want; ``OptimConfig()`` alone is the paper's."""

    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """The tokenizer the data was prepared with."""

    data: DataConfig = field(default_factory=DataConfig)
    """Training data."""

    train: TrainConfig = field(default_factory=TrainConfig)
    """Loop length, batch sizes, precision, device."""

    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint saving and loading."""

    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics logging."""

    def trunk_num_layers(self) -> int:
        """Layers of the shared trunk (split over pipeline stages). As in the released code the trunk is the n=1
        model's layers[:-1] and its last layer is head 1; with match_params all n heads come out of the n=1
        model's layers."""
        return self.model.num_layers - (self.mtp.n_heads if self.mtp.match_params else 1)


def sections() -> List[Tuple[str, type]]:
    """(name, class) of each section of ``Config``, in declaration order."""
    return [(f.name, f.type) for f in dataclasses.fields(Config)]


@functools.lru_cache(maxsize=None)
def _field_source_info(cls: type) -> dict:
    """Map field name -> (annotation as written, docstring), parsed from the class source.

    Python keeps no attribute docstrings at runtime; the string literal right under an annotated assignment is
    only in the source, so read it from the AST.
    """
    tree = ast.parse(inspect.getsource(cls).lstrip())  # lstrip: allow classes defined in an indented block
    body = tree.body[0].body  # type: ignore[attr-defined]
    info = {}
    for node, following in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            doc = ""
            if (
                isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                doc = inspect.cleandoc(following.value.value)
            info[node.target.id] = (ast.unparse(node.annotation), doc)
    return info


def describe_fields(cls: type) -> List[Tuple[str, str, Any, str]]:
    """(name, type as written, default, docstring) for each field of a config dataclass; '' when undocumented."""
    info = _field_source_info(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        type_str, doc = info.get(f.name, (str(f.type), ""))
        rows.append((f.name, type_str, default, doc))
    return rows


def format_config_help() -> str:
    """Every setting as ``section.field: type = default  -- doc``, for a ``--help-config`` flag."""
    defaults = Config()  # the effective defaults: Config() overrides a few of its sections' own (see ``optim``)
    lines = []
    for section, cls in sections():
        lines.append(f"[{section}] {inspect.cleandoc(cls.__doc__ or '')}")
        for name, type_str, _, doc in describe_fields(cls):
            default = getattr(getattr(defaults, section), name)
            lines.append(f"  {section}.{name}: {type_str} = {default!r}  -- {' '.join(doc.split())}")
    return "\n".join(lines)
