"""Shared plumbing of the benchmarks: one process (world size 1), variants built through the package as training does.

Every variant is built from a ``Config`` (``load_config(None, overrides)``) through the package's engine interface
(``mtp_megatron.engines.build_engine``: the model builder, the engine's wrapper, optimizer, LR scheduler and
schedule hooks) and its mock-data pipeline, and stepped with ``Engine.train_step`` / ``Engine.forward_backward``,
i.e. exactly the code path of ``python -m mtp_megatron.train``, minus logging and checkpoints.
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import os
import platform
import statistics
import sys
import warnings
from dataclasses import dataclass
from typing import Iterator, Optional

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # so `python bench/x.py` works from anywhere without PYTHONPATH
    sys.path.insert(0, REPO_ROOT)

# megatron-core warns once per missing optional dependency (Apex, Transformer Engine) on import: keep tables clean.
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\..*")
warnings.filterwarnings("ignore", category=FutureWarning)
# megatron's distributed optimizer reads .grad of its (non-leaf) shard views in zero_grad: harmless, once per run.
warnings.filterwarnings("ignore", message=".*non-leaf Tensor.*")
logging.getLogger("megatron.core.datasets").setLevel(logging.ERROR)  # "Unable to save MockGPTDataset indexes"

import torch  # noqa: E402

from mtp_megatron.config import Config, load_config  # noqa: E402

MiB = 1024 * 1024


def add_shape_args(parser, *, trunk_layers: int, seq: int, hidden: int = 256, heads: int = 4, vocab: int = 32000,
                   mbs: int = 1, n_heads: int = 4) -> None:
    """Model-shape and device options shared by both benchmarks."""
    g = parser.add_argument_group("shape")
    g.add_argument("--vocab", type=int, default=vocab, help="model.vocab_size (default %(default)s)")
    g.add_argument("--seq", type=int, default=seq, help="model.seq_length (default %(default)s)")
    g.add_argument("--hidden", type=int, default=hidden, help="model.hidden_size (default %(default)s)")
    g.add_argument("--attn-heads", type=int, default=heads, help="model.num_attention_heads (default %(default)s)")
    g.add_argument("--ffn", type=int, default=None,
                   help="model.ffn_hidden_size (default: the package's rule, swiglu int(8h/3) rounded up to 256)")
    g.add_argument("--trunk-layers", type=int, default=trunk_layers,
                   help="trunk layers shared by every variant (model.num_layers = this + 1, mtp.match_params=false, "
                        "so n=4 adds 3 head layers on the same trunk; default %(default)s)")
    g.add_argument("--mbs", type=int, default=mbs, help="train.micro_batch_size (default %(default)s)")
    g.add_argument("--n-heads", type=int, default=n_heads, help="MTP heads of the multi-head variants "
                                                               "(default %(default)s)")
    g = parser.add_argument_group("run")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="train.device; auto = cuda when a GPU is visible (default %(default)s)")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="train.precision; auto = fp32 on CPU, bf16 on GPU (default %(default)s)")
    g.add_argument("--impl", choices=["auto", "local", "transformer_engine"], default="auto",
                   help="model.transformer_impl (default %(default)s)")
    g.add_argument("--seed", type=int, default=1234, help="train.seed (default %(default)s)")
    g.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE",
                   help="extra config overrides applied to every variant, e.g. train.recompute=selective")


@dataclass(frozen=True)
class Variant:
    name: str
    n_heads: int
    sequential: bool
    megatron_gpt: bool = False
    """megatron-core's own ``GPTModel`` (n=1, its final norm, output layer and loss) instead of ours."""
    overrides: tuple = ()
    """Config overrides of this variant only (e.g. ``train.fused_kernels=false``)."""


MEGATRON_GPT = Variant("megatron GPTModel n=1", 1, True, megatron_gpt=True)


def variants(n_heads: int) -> list[Variant]:
    """n=1 (a plain GPT), then n heads in the naive and in the sequential order, on the same trunk."""
    return [Variant("n=1", 1, True), Variant(f"n={n_heads} naive", n_heads, False),
            Variant(f"n={n_heads} sequential", n_heads, True)]


def make_config(args, variant: Variant, extra: tuple = ()) -> Config:
    overrides = [
        f"model.vocab_size={args.vocab}",
        f"model.seq_length={args.seq}",
        f"model.hidden_size={args.hidden}",
        f"model.num_attention_heads={args.attn_heads}",
        f"model.num_layers={args.trunk_layers + 1}",
        f"model.transformer_impl={args.impl}",
        # Heads on top of the same trunk by default; parameter-matched (trunk = num_layers - n) on request.
        f"mtp.match_params={str(getattr(args, 'match_params', False)).lower()}",
        f"mtp.n_heads={variant.n_heads}",
        f"mtp.sequential_backward={str(variant.sequential).lower()}",
        f"train.micro_batch_size={args.mbs}",
        f"train.global_batch_size={args.mbs}",  # one microbatch per step (world size 1, dp 1)
        f"train.device={args.device}",
        f"train.precision={args.precision}",
        f"train.seed={args.seed}",
        "train.iters=1000",  # only the LR schedule's length; keeps megatron's scheduler happy (warmup < decay)
        "logging.tensorboard=false",
        "run.dir=runs/bench",
    ]
    if args.ffn is not None:
        overrides.append(f"model.ffn_hidden_size={args.ffn}")
    return load_config(None, overrides + list(extra) + list(args.set) + list(variant.overrides))


_ENV = None


def init_env(cfg: Config):
    """World-size-1 process group and megatron parallel state, once per process (shared by all variants)."""
    global _ENV
    if _ENV is None:
        from mtp_megatron.distributed.parallel import init_distributed

        _ENV = init_distributed(cfg.parallel, cfg.train.device, cfg.train.seed)
    return _ENV


def shutdown() -> None:
    from mtp_megatron.distributed.parallel import destroy_distributed

    destroy_distributed()


_DATASETS: dict = {}


def _dataset(cfg: Config, env, samples: int):
    """The mock GPT dataset of this shape, built once and shared, so every variant sees the same tokens."""
    key = (cfg.model.vocab_size, cfg.model.seq_length, cfg.train.seed)
    if key not in _DATASETS or len(_DATASETS[key]) < samples:
        from mtp_megatron.data.datasets import build_datasets

        with contextlib.redirect_stdout(io.StringIO()):  # the builder's progress lines
            _DATASETS[key], _ = build_datasets(cfg, env, samples)
    return _DATASETS[key]


@dataclass
class Trainer:
    """One variant, built exactly as ``mtp_megatron.train.train`` builds a run."""

    cfg: Config
    env: object
    engine: object
    data: Iterator[dict]
    megatron_gpt: bool = False

    @property
    def model(self):
        """The wrapped model the schedules run (megatron DDP for the megatron engine)."""
        return self.engine.model

    @property
    def optimizer(self):
        return self.engine.optimizer

    def train_step(self):
        if self.megatron_gpt:  # megatron's own loop body: zero, forward-backward, step
            self.forward_backward()
            self.optimizer.step()
            self.engine.scheduler.step(increment=1)  # one per iteration (engines/optim.py)
            return None
        return self.engine.train_step(self.data, 1)

    def forward_backward(self):
        """One microbatch's forward + backward through megatron-core's schedule, as ``train_step`` runs it."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        if not self.megatron_gpt:
            return self.engine.forward_backward(self.data, 1, forward_only=False)
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        return get_forward_backward_func()(
            forward_step_func=_megatron_gpt_forward_step, data_iterator=self.data, model=[self.model],
            num_microbatches=1, seq_length=self.cfg.model.seq_length,
            micro_batch_size=self.cfg.train.micro_batch_size, forward_only=False)

    def head_losses(self, losses) -> list[float]:
        from mtp_megatron.engines.step import reduce_head_stats

        if self.megatron_gpt:
            return [float(losses[0]["loss"])]
        return reduce_head_stats(losses, self.cfg.mtp, self.env).head_loss


def _megatron_gpt_forward_step(data_iterator, model):
    """megatron-core's GPTModel returns each token's loss [b, s]; the token mean over the loss mask is the loss."""
    batch = next(data_iterator)
    token_loss = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"])

    def loss_func(output):
        mask = batch["loss_mask"].float()
        loss = (output.float() * mask).sum() / mask.sum()
        return loss, {"loss": loss.detach()}

    return token_loss, loss_func


def build_trainer(cfg: Config, max_steps: int, megatron_gpt: bool = False) -> Trainer:
    """One variant: ours through ``engines.build_engine``, or (``megatron_gpt``) megatron-core's GPTModel with the
    same trunk in the same megatron engine (wrapper, optimizer, schedule)."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from mtp_megatron.data.loader import microbatches
    from mtp_megatron.engines import build_engine

    env = init_env(cfg)
    # Same seed before every build: the trunk (built first) gets the same weights in every variant, and the two
    # n-head variants are identical models (their losses must agree; the benchmarks print them).
    torch.manual_seed(cfg.train.seed)
    model_parallel_cuda_manual_seed(cfg.train.seed)
    engine = build_engine(cfg, env, _megatron_gpt(cfg, env) if megatron_gpt else None)
    samples = max_steps * cfg.train.global_batch_size
    data = microbatches(_dataset(cfg, env, samples), 0, cfg, env)
    return Trainer(cfg, env, engine, data, megatron_gpt)


def _megatron_gpt(cfg: Config, env):
    """megatron-core's ``GPTModel`` of the n=1 model's depth (our trunk + head 1 = ``model.num_layers`` layers), its
    own final norm, output layer and vocab-parallel cross-entropy, with our layer spec."""
    from megatron.core.models.gpt import GPTModel

    from mtp_megatron.model.builder import transformer_config
    from mtp_megatron.model.specs import layer_and_norm_specs

    config = transformer_config(cfg, env.device)
    config.num_layers = cfg.trunk_num_layers() + 1
    gpt = GPTModel(config, layer_and_norm_specs(cfg.model, init_seed=cfg.train.seed,
                                                  cuda=env.device.type == "cuda")[0],
                   cfg.model.padded_vocab_size(cfg.parallel.tp), cfg.model.seq_length,
                   share_embeddings_and_output_weights=False, position_embedding_type=cfg.model.position_embedding,
                   rotary_base=cfg.model.rotary_base, pg_collection=env.groups)
    return gpt.to(env.device)


def release(trainer: Optional[Trainer]) -> None:
    """Drop a variant's model, grads and optimizer state before the next one is built.

    The schedule hooks that the megatron engine's ``connect_schedule_hooks`` stores on the model's
    TransformerConfig (notably
    ``grad_scale_func = optimizer.scale_loss``) close a model -> config -> optimizer -> model cycle that Python's
    garbage collector does not reclaim here (measured: the whole variant, ~330 MiB at the head_memory defaults,
    stayed alive); unhooking them first lets the variant be freed.
    """
    if trainer is not None and trainer.engine is not None:
        for name in ("grad_scale_func", "no_sync_func", "finalize_model_grads_func", "grad_sync_func",
                     "param_sync_func"):
            setattr(trainer.model.config, name, None)
    if trainer is not None:
        trainer.engine = trainer.data = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def held_bytes(trainer: Trainer) -> int:
    """Bytes of the tensors a variant holds between steps: parameters, DDP grad buffers, optimizer state.

    Counted per distinct storage, so views (megatron's params and main_grads live inside flat buffers; the
    distributed optimizer's fp32 shards may view the params) are not counted twice.
    """
    storages = {}

    def add(t):
        if isinstance(t, torch.Tensor) and t.numel():
            s = t.untyped_storage()
            storages[(s.device.type, s.data_ptr())] = s.nbytes()

    for p in trainer.model.parameters():
        add(p)
        add(getattr(p, "main_grad", None))
    for buffer in list(getattr(trainer.model, "buffers", [])) + list(getattr(trainer.model,
                                                                             "expert_parallel_buffers", [])):
        add(getattr(buffer, "param_data", None))
        add(getattr(buffer, "grad_data", None))
    for opt in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer]):
        inner = getattr(opt, "optimizer", opt)
        for group in inner.param_groups:
            for p in group["params"]:
                add(p)
        for state in inner.state.values():
            for v in state.values():
                add(v)
    return sum(storages.values())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median(xs):
    return statistics.median(xs)


def machine_line(device: torch.device) -> str:
    import megatron.core

    if device.type == "cuda":
        where = f"GPU {torch.cuda.get_device_name()}"
    else:
        cpu = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        where = f"CPU {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    load = ""
    if hasattr(os, "getloadavg"):
        load = "; load average (1 min) now %.2f" % os.getloadavg()[0]
    return (f"{where}; python {platform.python_version()}, torch {torch.__version__}, "
            f"megatron-core {megatron.core.__version__}{load}")


def table(headers: list[str], rows: list[list], aligns: Optional[str] = None) -> str:
    """A plain Markdown table (readable in a terminal, pasteable into docs)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    aligns = aligns or "l" + "r" * (len(headers) - 1)

    def fmt(row):
        return "| " + " | ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, aligns)) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if a == "r" else ("-" * (w + 2)) for w, a in zip(widths, aligns)) + "|"
    return "\n".join([fmt(cells[0]), sep] + [fmt(r) for r in cells[1:]])
