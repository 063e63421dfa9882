"""With n=1 the MTP model is a plain GPT: its loss and gradients equal megatron-core's GPTModel on the same weights.

Our trunk holds layers 0..L-2 and head 1 is layer L-1 with the final norm and output layer, so the GPTModel's
state dict maps onto ours by renaming. Checked without TP (each of 2 DP ranks on its own) and with TP=2.
"""

from __future__ import annotations

import pytest
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from mtp_megatron.config import load_config
from mtp_megatron.distributed.parallel import init_distributed
from mtp_megatron.model.builder import build_model, transformer_config
from mtp_megatron.model.specs import layer_and_norm_specs
from mtp_megatron.testing.batches import random_microbatches
from mtp_megatron.testing.distributed import run_distributed

NUM_LAYERS = 3


def _gpt_key(key: str) -> str:
    """Our parameter name -> GPTModel's."""
    last = NUM_LAYERS - 1
    return (
        key.replace("mtp_heads.layers.0.", f"decoder.layers.{last}.")
        .replace("mtp_heads.final_norm.", "decoder.final_layernorm.")
        .replace("mtp_heads.output_layer.", "output_layer.")
    )


def compare_with_gpt(tps: list[int]) -> list[dict]:
    out = []
    for tp in tps:
        cfg = load_config(None, [
            f"parallel.tp={tp}", "mtp.n_heads=1", f"model.num_layers={NUM_LAYERS}", "model.hidden_size=64",
            "model.num_attention_heads=4", "model.ffn_hidden_size=128", "model.vocab_size=512",
            "model.seq_length=32", "train.device=cpu", "train.precision=fp32",
        ])
        env = init_distributed(cfg.parallel, "cpu", cfg.train.seed)
        ours = build_model(cfg, env)

        gpt_config = transformer_config(cfg, env.device)
        gpt_config.num_layers = NUM_LAYERS
        gpt = GPTModel(gpt_config, layer_and_norm_specs(cfg.model)[0], cfg.model.padded_vocab_size(tp),
                       cfg.model.seq_length, position_embedding_type="rope")
        gpt.load_state_dict({_gpt_key(k): v for k, v in ours.state_dict().items()}, strict=True)

        batch = random_microbatches(1, 2, cfg.model.seq_length, cfg.model.vocab_size, seed=env.dp_rank)[0]
        args = (batch["tokens"], batch["position_ids"], batch["attention_mask"])
        token_loss = gpt(*args, labels=batch["labels"])  # [b, s]
        gpt_loss = (token_loss * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
        gpt_loss.backward()

        ours.mtp_heads.sequential_backward = True
        loss, stats = ours(*args, labels=batch["labels"], loss_mask=batch["loss_mask"])
        loss.backward()
        our_loss = stats[0, 0] / stats[0, 2]

        gpt_grads = dict(gpt.named_parameters())
        grad_errors = {
            name: ((p.grad - gpt_grads[_gpt_key(name)].grad).norm() / gpt_grads[_gpt_key(name)].grad.norm()).item()
            for name, p in ours.named_parameters()
        }
        out.append({"tp": tp, "gpt_loss": gpt_loss.item(), "our_loss": our_loss.item(), "grad_errors": grad_errors})
        parallel_state.destroy_model_parallel()
    return out


@pytest.mark.distributed
def test_n1_equals_megatron_gpt_model():
    for rank, results in enumerate(run_distributed(compare_with_gpt, 2, [1, 2])):
        for r in results:
            assert r["our_loss"] == pytest.approx(r["gpt_loss"], rel=1e-6), f"rank {rank} tp {r['tp']}"
            worst = max(r["grad_errors"].items(), key=lambda kv: kv[1])
            assert worst[1] < 1e-5, f"rank {rank} tp {r['tp']}: gradient of {worst[0]} off by {worst[1]:.2e}"
            assert len(r["grad_errors"]) == 1 + 6 * NUM_LAYERS + 2  # embedding, layers, final norm, output layer
