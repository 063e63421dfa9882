"""How the trunk's layers split over pipeline stages (``parallel.layers_per_stage``), as pure arithmetic.

The last stage holds, besides its trunk layers, the n MTP head layers, n unembeddings (one shared matrix applied
once per head) and n cross-entropies; the first stage holds the embedding, a row lookup. An even split of the
trunk therefore leaves the other stages idle while the last one works: at 13B n=4 (configs/13b.yaml) it does
about 1.32x the first stage's FLOPs. ``auto`` picks the split whose slowest stage does the fewest FLOPs, among
the splits megatron-core builds: any first and last stage counts, the stages between them even
(``TransformerConfig.num_layers_in_first_pipeline_stage`` / ``num_layers_in_last_pipeline_stage``; the list is
checked in mtp_megatron/config/validate.py, ``pipeline_splits``).

The FLOP model (per token, training = forward + backward = 3 forward passes; the planner shows the same figures,
mtp_megatron/planner/estimate.py):

* a transformer layer (trunk or head): ``6 x`` its matmul weights (q, k, v, output projection, MLP) plus
  ``3 x 4 s a d`` for the attention score and value products (s = sequence, a = heads, d = head width: the
  ``12 L h s`` of the planner's total);
* a head's unembedding: ``6 h V`` (V = padded vocabulary); its cross-entropy ``12 V`` (about 4 element-wise
  operations per logit, times 3);
* the embedding: ``3 h`` (a row copy forward, a row addition backward), small but on the first stage;
* recomputation: ``full`` re-runs each trunk layer's forward (4 passes instead of 3; the heads run outside
  megatron's TransformerBlock and are not recomputed); ``selective`` re-runs the attention products of every
  layer, heads included (it lives in the attention module).

Biases and norms are left out (under 0.1% of a layer at any size this project trains).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

from mtp_megatron.config.errors import ConfigError
from mtp_megatron.config.schema import Config
from mtp_megatron.config.validate import pipeline_splits, problems as config_problems


@dataclass(frozen=True)
class TokenFlops:
    """Training FLOPs per token of each kind of part a stage can hold."""

    trunk_layer: float
    """One trunk transformer layer, recomputation included."""

    head: float
    """One MTP head: its transformer layer, its pass through the shared unembedding, its cross-entropy."""

    embedding: float
    """The word embedding (first stage)."""


def token_flops(cfg: Config) -> TokenFlops:
    """The FLOP model of the module docstring for ``cfg``'s shapes (needs ``model.vocab_size`` resolved)."""
    m = cfg.model
    h, s, heads = m.hidden_size, m.seq_length, m.num_attention_heads
    d = m.head_dim or h // heads
    groups = m.num_query_groups or heads
    attention_weights = h * heads * d + 2 * h * groups * d + heads * d * h  # q, k, v, output projection
    mlp_weights = h * m.resolved_ffn_hidden_size() * (3 if m.activation == "swiglu" else 2)
    matmul_forward = 2.0 * (attention_weights + mlp_weights)
    attention_forward = 4.0 * s * heads * d  # scores q k^T and their product with v, per token
    forward = matmul_forward + attention_forward
    recompute = cfg.train.recompute
    trunk_extra = forward if recompute == "full" else attention_forward if recompute == "selective" else 0.0
    head_extra = attention_forward if recompute == "selective" else 0.0
    vocab = m.padded_vocab_size(cfg.parallel.tp)
    unembedding_and_loss = 6.0 * h * vocab + 12.0 * vocab
    return TokenFlops(
        trunk_layer=3 * forward + trunk_extra,
        head=3 * forward + head_extra + unembedding_and_loss,
        embedding=3.0 * h,
    )


def stage_flops(cfg: Config, split: List[int]) -> List[float]:
    """Training FLOPs per token of each stage when the trunk is split as ``split``."""
    parts = token_flops(cfg)
    flops = [layers * parts.trunk_layer for layers in split]
    flops[0] += parts.embedding
    flops[-1] += cfg.mtp.n_heads * parts.head
    return flops


def pipeline_balance(flops: List[float]) -> float:
    """Slowest stage / mean stage: the step time over that of a perfectly balanced pipeline (1.0 at best)."""
    return max(flops) * len(flops) / sum(flops)


def balanced_split(cfg: Config) -> List[int]:
    """The split megatron-core can build whose slowest stage does the fewest FLOPs; ties go to the split nearest
    the even one, then to the first in ``pipeline_splits`` order, so the answer is the same on every rank and run."""
    trunk, pp = cfg.trunk_num_layers(), cfg.parallel.pp
    candidates = pipeline_splits(trunk, pp)
    if not candidates:
        raise ConfigError(f"parallel.layers_per_stage: auto cannot give each of the pp={pp} stages a layer of the "
                          f"trunk's {trunk}. Fix: use parallel.pp <= {trunk}")

    def cost(split: List[int]) -> tuple:
        return (max(stage_flops(cfg, split)), sum(abs(n * pp - trunk) for n in split))

    return min(candidates, key=cost)


def layers_per_stage(cfg: Config) -> List[int]:
    """Trunk layers on each stage, first to last: the configured list, ``auto``'s balanced one, or the even split."""
    chosen = cfg.parallel.layers_per_stage
    if chosen == "auto":
        return balanced_split(cfg)
    if chosen is None:
        return [cfg.trunk_num_layers() // cfg.parallel.pp] * cfg.parallel.pp
    if len(chosen) != cfg.parallel.pp:
        # A caller that changed parallel.pp on a validated config (a converter, the planner) kept the old split.
        raise ConfigError(f"parallel.layers_per_stage: {list(chosen)} is for {len(chosen)} stages, but "
                          f"parallel.pp={cfg.parallel.pp}. Fix: set it to null, auto or a list of {cfg.parallel.pp}")
    return list(chosen)


def resolve_layers_per_stage(cfg: Config) -> None:
    """Replace ``auto`` by the list it stands for, so the run's saved config.yaml shows the real split. Needs the
    vocabulary size (``resolve_run_inputs`` fills a null one first); calling it again changes nothing. A config
    that fails validation is left as it is, for the validation to report."""
    if cfg.parallel.layers_per_stage == "auto" and not config_problems(cfg):
        cfg.parallel.layers_per_stage = balanced_split(cfg)


def megatron_split_arguments(cfg: Config) -> dict:
    """The ``TransformerConfig`` arguments for the split: none for an even one (megatron-core's default), else
    the first and last stages' counts (megatron-core splits the rest evenly)."""
    split = layers_per_stage(cfg)
    if len(set(split)) == 1:
        return {}
    return {"num_layers_in_first_pipeline_stage": split[0], "num_layers_in_last_pipeline_stage": split[-1]}
