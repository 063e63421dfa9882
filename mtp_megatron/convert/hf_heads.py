"""All n MTP heads on top of a ``transformers`` Llama exported by tools/convert_checkpoint.py.

    from transformers import LlamaForCausalLM
    from mtp_megatron.convert.hf_heads import LlamaMTPHeads

    model = LlamaForCausalLM.from_pretrained(folder)
    heads = LlamaMTPHeads.from_pretrained(folder, model)
    logits = heads(input_ids)            # [n, batch, seq, vocab]: head i predicts token t+i

Head 1 is the Llama itself. Heads 2..n are ``LlamaDecoderLayer``s that read the trunk output, the hidden state
entering the Llama's last layer, and share its final norm and ``lm_head`` (see convert/hf.py for the key map).
The logits cover every row of ``lm_head``, as the training loss does; rows from ``heads.vocab_size`` on are
vocabulary padding, no token: drafting and decoding take the argmax over ``logits[..., :heads.vocab_size]`` as our
decoder does (inference/decoder.py) and as generation_config.json's ``suppress_tokens`` makes ``generate`` do.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch

from mtp_megatron.convert.hf import HEADS_CONFIG


class LlamaMTPHeads(torch.nn.Module):
    def __init__(self, model, n_heads: int, vocab_size: Optional[int] = None):
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        super().__init__()
        self.model = model  # not a submodule of ours: the caller owns it
        config = model.config
        self.vocab_size = vocab_size or config.vocab_size  # real ids; the rows after them are padding
        self.trunk_layers = config.num_hidden_layers - 1
        self.extra = torch.nn.ModuleList(LlamaDecoderLayer(config, layer_idx=config.num_hidden_layers + k)
                                         for k in range(n_heads - 1))

    @classmethod
    def from_pretrained(cls, folder: str, model) -> "LlamaMTPHeads":
        from safetensors.torch import load_file

        with open(os.path.join(folder, HEADS_CONFIG)) as f:
            meta = json.load(f)
        heads = cls(model, meta["n_heads"], meta.get("vocab_size")).to(dtype=model.dtype)
        if meta.get("heads_file"):
            state = load_file(os.path.join(folder, meta["heads_file"]))
            heads.extra.load_state_dict({key[len("heads."):]: value for key, value in _renumbered(state).items()})
        return heads

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        base = self.model.model
        out = base(input_ids=input_ids, output_hidden_states=True)
        trunk = out.hidden_states[self.trunk_layers]  # [b, s, h]: what enters the last Llama layer (head 1)
        logits = [self.model.lm_head(out.last_hidden_state)]
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        rotary = base.rotary_emb(trunk, positions)
        seq = input_ids.shape[1]
        causal = torch.full((seq, seq), torch.finfo(trunk.dtype).min, dtype=trunk.dtype, device=trunk.device)
        mask = torch.triu(causal, diagonal=1)[None, None]
        for layer in self.extra:
            hidden = layer(trunk, attention_mask=mask, position_ids=positions, position_embeddings=rotary)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
            logits.append(self.model.lm_head(base.norm(hidden)))
        return torch.stack(logits)


def _renumbered(state: dict) -> dict:
    """``heads.{k}.*`` (k = 1..n-1) -> ``heads.{k-1}.*``, the ModuleList's indices."""
    out = {}
    for key, value in state.items():
        _, k, rest = key.split(".", 2)
        out[f"heads.{int(k) - 1}.{rest}"] = value
    return out
