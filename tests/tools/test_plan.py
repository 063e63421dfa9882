"""tools/plan.py and mtp_megatron/planner: parameter counts from meta-device builds equal the analytic count and
the real model's, the memory terms are the documented formulas, and the CLI's verdicts and exit codes.

13B at 16 nodes x 8 x 80 GiB fits as configs/13b.yaml stands (peak stage 0 with 21 of the 36 trunk layers, about
57 of 72 usable GiB, most of it the unfused attention's stored scores); 1 node x 8 x 16 GiB does not fit and gets a suggestion that fits.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from mtp_megatron.config import Config, load_config
from mtp_megatron.planner.estimate import GIB, Hardware, estimate, suggest
from mtp_megatron.planner.stages import stage_params, total_params
from mtp_megatron.testing.distributed import run_distributed

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
C13B = os.path.join(REPO, "configs", "13b.yaml")
TINY = os.path.join(REPO, "configs", "tiny.yaml")
PLAN = os.path.join(REPO, "tools", "plan.py")
H100 = Hardware(gpu_memory_gib=80)
# 13B without pipeline stages and without megatron's overlap flags, as DeepSpeed ZeRO needs.
ZERO_PP1 = ["parallel.pp=1", "parallel.overlap_grad_reduce=false", "parallel.overlap_param_gather=false"]


def _cli():
    spec = importlib.util.spec_from_file_location("plan_cli", PLAN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def analytic_params(cfg: Config) -> int:
    """The whole model's parameters, by hand from the config's shape."""
    m, tp = cfg.model, cfg.parallel.tp
    h, ffn, vocab = m.hidden_size, m.resolved_ffn_hidden_size(), m.padded_vocab_size(tp)
    heads, groups = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    d = h // heads  # per-head width
    bias = m.add_bias_linear
    norm = h * (2 if m.normalization == "LayerNorm" else 1)  # LayerNorm has a bias, RMSNorm not
    qkv = h * (heads + 2 * groups) * d + (heads + 2 * groups) * d * bias
    proj = heads * d * h + h * bias
    fc1_out = 2 * ffn if m.activation == "swiglu" else ffn
    mlp = h * fc1_out + fc1_out * bias + ffn * h + h * bias
    layer = qkv + proj + mlp + 2 * norm
    embedding = vocab * h + (m.seq_length * h if m.position_embedding == "learned_absolute" else 0)
    heads_part = cfg.mtp.n_heads * layer + norm + vocab * h  # n head layers, shared final norm, unembedding
    return embedding + cfg.trunk_num_layers() * layer + heads_part


def test_13b_parameter_count_matches_the_analytic_count():
    cfg = load_config(C13B)
    stages = stage_params(cfg)
    assert [s.trunk_layers for s in stages] == [21, 15] and [s.head_layers for s in stages] == [0, 4]
    assert total_params(stages, cfg.parallel.tp) == analytic_params(cfg) == 13_018_485_760
    # Per GPU: the TP-split part is a quarter of the stage's, norms are whole copies (2 per layer, + final norm).
    h = cfg.model.hidden_size
    assert [s.replicated for s in stages] == [21 * 2 * h, 19 * 2 * h + h]
    assert all(s.params == s.tp_split + s.replicated for s in stages)


@pytest.mark.parametrize("overrides", [
    ["parallel.tp=2", "parallel.pp=2"],
    ["parallel.tp=2", "model.num_query_groups=2", "model.add_bias_linear=true", "model.activation=gelu",
     "model.ffn_hidden_size=null", "model.normalization=LayerNorm", "model.position_embedding=learned_absolute"],
    ["parallel.pp=4", "model.num_layers=12", "mtp.match_params=true", "model.vocab_size=1000"],
], ids=["tp2pp2", "gqa_bias_gelu_layernorm_learned", "pp4_match_params"])
def test_tiny_variants_match_the_analytic_count(overrides):
    cfg = load_config(TINY, overrides)
    assert total_params(stage_params(cfg), cfg.parallel.tp) == analytic_params(cfg)


def real_stage_params(layouts: list[tuple[int, int]]) -> list[tuple[int, int, int, int, int]]:
    """On each rank, for each layout: (tp, pp, pp rank, tp rank, parameters of the model build_model builds)."""
    from megatron.core import parallel_state

    from mtp_megatron.distributed.parallel import init_distributed
    from mtp_megatron.model.builder import build_model

    out = []
    for tp, pp in layouts:
        cfg = load_config(TINY, [f"parallel.tp={tp}", f"parallel.pp={pp}"])
        env = init_distributed(cfg.parallel, "cpu", cfg.train.seed)
        model = build_model(cfg, env)
        out.append((tp, pp, env.pp_rank, env.tp_rank, sum(p.numel() for p in model.parameters())))
        del model
        parallel_state.destroy_model_parallel()
    return out


@pytest.mark.distributed
def test_stage_counts_equal_the_real_models_on_every_rank():
    layouts = [(2, 2), (2, 1), (1, 2)]
    results = [row for rank in run_distributed(real_stage_params, 4, layouts) for row in rank]
    assert len(results) == 4 * len(layouts)
    for tp, pp, pp_rank, tp_rank, real in results:
        planned = stage_params(load_config(TINY, [f"parallel.tp={tp}", f"parallel.pp={pp}"]))
        assert planned[pp_rank].params == real, f"tp{tp} pp{pp} stage {pp_rank} tp rank {tp_rank}"
    assert {r[4] for r in results if r[:3] == (2, 2, 0)} == {98_560}
    assert {r[4] for r in results if r[:3] == (2, 2, 1)} == {230_208}


def test_13b_memory_terms_are_the_documented_formulas():
    cfg = load_config(C13B)
    plan = estimate(cfg, 128, H100)
    lay = plan.layout
    assert (lay.tp, lay.pp, lay.dp, lay.num_microbatches, lay.precision) == (4, 2, 16, 128, "bf16")
    first, last = plan.stages
    s, b, h, a, t, dp = 4096, 1, 5120, 40, 4, 16
    p0 = first.params.params
    assert first.weights == 2 * p0 and first.grads == 4 * p0  # bf16 weights, megatron's fp32 grad buffer
    assert first.optimizer == pytest.approx(12 * p0 / dp)  # fp32 master + Adam's 2 moments, sharded over DP
    layer = s * b * h * (10 + 24 / t + 5 * a * s / (h * t))  # Korthikanti et al., TP without SP, no recompute
    assert first.in_flight == 2 and last.in_flight == 1
    assert first.activations == pytest.approx(21 * 2 * layer)  # configs/13b.yaml: layers_per_stage auto = [21, 15]
    # Sequential heads: one head layer + the stored trunk output; one chunk of one head's logits (bf16 + fp32
    # copy; mtp.loss_chunk_size positions). Naive: every head's logits for the whole sequence.
    assert last.activations == pytest.approx(15 * layer + layer + 2 * s * b * h)
    chunk = cfg.mtp.loss_chunk_size
    assert 0 < chunk < s
    assert last.logits == chunk * b * (32256 // t) * (2 + 4) and last.logits_other == 4 * s * b * (32256 // t) * 6
    assert last.activations_other == pytest.approx(15 * layer + 4 * layer)
    assert first.total / GIB == pytest.approx(56.67, abs=0.01) and plan.fits
    # 6N + 12 L h s FLOPs per token, at 0.4 of 989 TFLOP/s on 128 GPUs.
    tput = plan.throughput
    assert tput.flops_per_token == 6 * 13_018_485_760 + 12 * 40 * h * s
    assert tput.steps == 25_000 and tput.tokens_per_step == 2048 * 4096
    assert tput.step_seconds == pytest.approx(tput.flops_per_token * 2048 * 4096 / (128 * 989e12 * 0.4))


def test_recompute_sequence_parallel_and_zero_terms():
    cfg = load_config(C13B, [*ZERO_PP1, "parallel.sharding=zero3", "train.recompute=full"])
    plan = estimate(cfg, 64, H100)
    (stage,) = plan.stages
    s, b, h, a, t, dp, p = 4096, 1, 5120, 40, 4, 16, stage.params.params
    assert plan.layout.dp == dp and stage.in_flight == 1
    assert stage.weights == pytest.approx(2 * p / dp + 2 * 2 * stage.params.largest_module)
    assert stage.grads == pytest.approx(2 * p / dp + 2 * 5e8)  # bf16 partition + DeepSpeed's reduce bucket
    zero1 = estimate(load_config(C13B, [*ZERO_PP1, "parallel.sharding=zero1"]), 64, H100).stages[0]
    assert zero1.grads == pytest.approx(2 * p + 2 * 5e8) and zero1.weights == 2 * p  # full bf16 gradients
    assert stage.optimizer == pytest.approx(12 * p / dp)
    full_layer, no_recompute = 2 * s * b * h, s * b * h * (10 + 24 / t + 5 * a * s / (h * t))
    # Trunk layers keep their inputs; the recomputed layer and the head layer (outside TransformerBlock) keep all.
    assert stage.activations == pytest.approx(36 * full_layer + no_recompute + (2 * s * b * h + no_recompute))

    # FSDP2: fp32 shards of weights and gradients, AdamW's moments on them (no separate master copy), and the
    # gathered bf16 working set of ZeRO-3.
    fsdp = estimate(load_config(C13B, [*ZERO_PP1, "parallel.sharding=fsdp", "train.recompute=full"]), 64, H100)
    (fsdp_stage,) = fsdp.stages
    assert fsdp_stage.weights == pytest.approx(4 * p / dp + 2 * 2 * stage.params.largest_module)
    assert fsdp_stage.grads == pytest.approx(4 * p / dp)
    assert fsdp_stage.optimizer == pytest.approx(8 * p / dp)

    sp = estimate(load_config(C13B, ["parallel.sequence_parallel=true", "train.recompute=selective"]), 128, H100)
    assert sp.stages[0].activations == pytest.approx(21 * 2 * 34 * s * b * h / t)


def test_13b_fits_on_16_nodes_of_8_h100s():
    assert _cli().main(["--config", C13B, "--nodes", "16", "--gpus-per-node", "8", "--gpu-memory-gb", "80"]) == 0


def test_13b_on_one_node_of_16_gib_gpus_does_not_fit_and_gets_a_suggestion_that_fits(capsys):
    args = ["--config", C13B, "--nodes", "1", "--gpus-per-node", "8", "--gpu-memory-gb", "16"]
    assert _cli().main(args) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "| NO (+" in out
    cfg = load_config(C13B)
    found = suggest(cfg, 1, 8, Hardware(gpu_memory_gib=16))
    assert found is not None and found.plan.fits
    assert f"Suggestion: {' '.join(found.overrides)}" in out
    # The suggestion is exact: its overrides and node count, given to the planner, fit.
    again = estimate(load_config(C13B, list(found.overrides)), found.nodes * 8, Hardware(gpu_memory_gib=16))
    assert again.fits and again.peak.total == found.plan.peak.total
    # 13B's training state alone (16 bytes/param, no DP to shard it over) is 24 GiB per GPU on 8 GPUs.
    assert found.nodes > 1


def test_a_single_change_is_suggested_when_one_fits():
    # At 48 GiB (43.2 usable) the 13B layout's stage 0 (56.7 GiB) does not fit; TP 8 within the node, the first
    # kind of change tried, halves its activations' TP-split part and fits on its own.
    cfg = load_config(C13B)
    found = suggest(cfg, 16, 8, Hardware(gpu_memory_gib=48))
    assert found is not None and found.nodes == 16 and found.overrides == ("parallel.tp=8",)


def test_cli_end_to_end(tmp_path):
    run = lambda *extra: subprocess.run(  # noqa: E731
        [sys.executable, PLAN, "--config", TINY, "--nodes", "1", "--gpus-per-node", "4", "--gpu-memory-gb", "1",
         *extra], capture_output=True, text=True, cwd=REPO, timeout=120)
    ok = run("parallel.tp=2", "parallel.pp=2", "--tokens", "1e6")
    assert ok.returncode == 0, ok.stderr
    assert "TP 2 x PP 2 x DP 1" in ok.stdout and "Verdict: fits" in ok.stdout
    assert "98,560" in ok.stdout and "230,208" in ok.stdout  # per-GPU parameters of the two stages
    assert "budget 1e+06 tokens = 977 steps" in ok.stdout  # ceil(1e6 / (8 x 128))
    bad = run("parallel.tpp=2")
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "parallel.tp" in bad.stderr


def test_a_layout_the_world_cannot_hold_is_exit_2(capsys):
    args = ["--config", TINY, "--nodes", "1", "--gpus-per-node", "4", "--gpu-memory-gb", "1", "parallel.tp=8"]
    assert _cli().main(args) == 2  # 4 GPUs cannot hold tp 8
    assert "error: invalid configuration" in capsys.readouterr().err


@pytest.mark.parametrize("tokens", ["-1e12", "0", "nan", "inf"])
def test_a_token_budget_that_is_not_positive_is_exit_2(tokens, capsys):
    with pytest.raises(SystemExit) as exit_:
        _cli().main(["--config", TINY, "--nodes", "1", "--gpus-per-node", "4", "--gpu-memory-gb", "1",
                     f"--tokens={tokens}"])
    assert exit_.value.code == 2 and "--tokens must be a positive number" in capsys.readouterr().err
