"""All n MTP heads, of every head design, on top of a ``transformers`` Llama exported by tools/convert_checkpoint.py.

    from mtp_megatron.convert.hf_heads import LlamaMTPHeads

    heads = LlamaMTPHeads.from_pretrained(folder, dtype=torch.float32)  # loads the folder's Llama too
    out = heads(input_ids)               # [n, batch, seq, vocab]: head i predicts token t+i
    next_token = heads.next_token_logits(input_ids)   # [batch, seq, vocab], head 1 only

``LlamaMTPHeads.from_pretrained(folder, model)`` reuses a Llama already loaded with
``LlamaForCausalLM.from_pretrained(folder)`` (transformer, causal, cp rank-1 and anticausal folders; the Llama's own
logits are then head 1's). For the linear and cp rank > 1 designs no Llama computes head 1 and the folder does not
load as one (convert/hf.py, layout ``trunk``): ``from_pretrained(folder)`` builds its trunk from config.json and
``mtp_trunk*.safetensors``; ``heads.model`` is that trunk, whose own ``lm_head`` output is no head's.

What each design computes (z: the trunk output, the hidden state after the last trunk layer; norm and lm_head: the
Llama's ``model.norm`` and ``lm_head``, shared by all heads; ours: model/heads/):

    transformer, cp rank 1: head 1 = the Llama; head k = lm_head(norm(layer_k(z)))
    causal:      h_1 = the Llama's last layer on z; h_k = layer_k(h_{k-1}); head k = lm_head(norm(h_k))
    anticausal:  the Llama's last n layers are layers n..1 of the chain; head k = lm_head(norm(h_k)), h_k the
                 hidden state after layer k of the chain; head 1 = the Llama
    linear:      head k = lm_head(norm(z W_k^T))
    cp rank r:   u_k = layer_k(z), factors f_{k,a} = u_k + (u_k E_k^T)[..., a h:(a+1) h], log w = log_softmax(z M^T);
                 head k = log sum_a w_a softmax(lm_head(norm(f_{k,a}))): log-probabilities (fp32), not logits

The outputs cover every row of ``lm_head``, as the training loss does; rows from ``heads.vocab_size`` on are
vocabulary padding, no token: drafting and decoding take the argmax over ``out[..., :heads.vocab_size]`` as our
decoder does (inference/decoder.py) and as generation_config.json's ``suppress_tokens`` makes ``generate`` do.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch

from mtp_megatron.convert.hf import (HEADS_CONFIG, LLAMA, LLAMA_CHAIN, TRUNK, chain_heads, file_heads, layout,
                                     weight_files)


class LlamaMTPHeads(torch.nn.Module):
    def __init__(self, model, n_heads: int, vocab_size: Optional[int] = None, head_type: str = "transformer",
                 cp_rank: int = 1, trunk_layers: Optional[int] = None):
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        super().__init__()
        # Not a submodule of ours (the caller owns it: our state dict and .to() are the heads' alone).
        self.__dict__["model"] = model
        config = model.config
        self.n_heads, self.head_type = n_heads, head_type
        self.cp_rank = cp_rank if head_type == "cp" else 1
        self.layout = layout(head_type, self.cp_rank)
        self.vocab_size = vocab_size or config.vocab_size  # real ids; the rows after them are padding
        on_top = len(chain_heads(self.layout, n_heads))
        self.trunk_layers = config.num_hidden_layers - on_top if trunk_layers is None else trunk_layers
        if self.trunk_layers + on_top != config.num_hidden_layers:
            raise ValueError(
                f"the Llama has {config.num_hidden_layers} layers; mtp.head_type={head_type} with {n_heads} heads on "
                f"{self.trunk_layers} trunk layers needs {self.trunk_layers + on_top}. Fix: load the folder's model "
                "with LlamaMTPHeads.from_pretrained(folder)")
        hidden = config.hidden_size
        self.heads = torch.nn.ModuleDict()  # heads.{k}: our mtp_heads.layers.{k} (0-based), as the file has them
        for k in file_heads(self.layout, n_heads):
            self.heads[str(k)] = (torch.nn.Linear(hidden, hidden, bias=False) if head_type == "linear"
                                  else LlamaDecoderLayer(config, layer_idx=config.num_hidden_layers + k))
        if self.cp_rank > 1:
            self.cp_mixture = torch.nn.Linear(hidden, self.cp_rank, bias=False)
            self.cp_expand = torch.nn.ModuleList(torch.nn.Linear(hidden, self.cp_rank * hidden, bias=False)
                                                 for _ in range(n_heads))

    @classmethod
    def from_pretrained(cls, folder: str, model=None, **llama_kwargs) -> "LlamaMTPHeads":
        """The folder's heads on ``model`` (default: the folder's Llama, loaded with ``llama_kwargs``, e.g.
        ``dtype``, ``attn_implementation``), in the model's dtype and on its device."""
        from safetensors.torch import load_file

        with open(os.path.join(folder, HEADS_CONFIG)) as f:
            meta = json.load(f)
        head_type = meta.get("head_type", "transformer")
        cp_rank = meta.get("cp_rank") or 1
        if model is None:
            model = load_llama(folder, meta, **llama_kwargs)
        heads = cls(model, meta["n_heads"], meta.get("vocab_size"), head_type, cp_rank, meta.get("trunk_layers"))
        heads = heads.to(dtype=model.dtype, device=model.device)
        if meta.get("heads_file"):
            heads.load_state_dict(load_file(os.path.join(folder, meta["heads_file"])))
        return heads.eval()

    # ---------------------------------------------------------------- running them

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Every head's logits (cp rank > 1: log-probabilities) [n, b, s, rows]; head i predicts token t+i."""
        return torch.stack(self._outputs(input_ids, list(range(self.n_heads))))

    @torch.no_grad()
    def next_token_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Head 1's logits (cp rank > 1: log-probabilities) [b, s, rows], computing only what head 1 needs."""
        return self._outputs(input_ids, [0])[0]

    def _outputs(self, input_ids: torch.Tensor, wanted: list[int]) -> list[torch.Tensor]:
        base, lm_head = self.model.model, self.model.lm_head
        layer_out: dict[int, torch.Tensor] = {}  # every Llama layer's output, before the final norm

        def keep(index):
            def hook(module, args, output):
                layer_out[index] = output[0] if isinstance(output, tuple) else output
            return hook

        hooks = [layer.register_forward_hook(keep(i)) for i, layer in enumerate(base.layers)]
        try:
            llama = base(input_ids=input_ids).last_hidden_state  # norm(the Llama's last layer output)
        finally:
            for hook in hooks:
                hook.remove()
        trunk = self.trunk_layers
        z = layer_out[trunk - 1] if trunk else base.embed_tokens(input_ids)

        def unembed(hidden):
            return lm_head(base.norm(hidden))

        out: dict[int, torch.Tensor] = {}
        if self.layout == LLAMA_CHAIN:  # the Llama's layer trunk + j is head n-j's: h_{n-j}
            for k in wanted:
                out[k] = lm_head(llama) if k == 0 else unembed(layer_out[trunk + self.n_heads - 1 - k])
        elif self.head_type == "linear":
            for k in wanted:
                out[k] = unembed(self.heads[str(k)](z))
        else:
            run = self._layer_runner(z, input_ids.shape[1])
            if self.cp_rank > 1:
                log_w = torch.log_softmax(self.cp_mixture(z).float(), dim=-1)
                for k in wanted:
                    out[k] = self._cp_marginal(k, run(k, z), log_w, unembed)
            elif self.head_type == "causal":
                hidden = layer_out[trunk]  # h_1: the Llama's last layer, before the final norm
                for k in range(1, max(wanted) + 1):
                    hidden = run(k, hidden)
                    if k in wanted:
                        out[k] = unembed(hidden)
            else:  # transformer, cp rank 1
                for k in wanted:
                    if k > 0:
                        out[k] = unembed(run(k, z))
            if self.layout == LLAMA and 0 in wanted:
                out[0] = lm_head(llama)
        return [out[k] for k in wanted]

    def _layer_runner(self, z: torch.Tensor, seq: int):
        """run(k, hidden): head k's (0-based) decoder layer over ``hidden`` [b, s, h], causal attention."""
        positions = torch.arange(seq, device=z.device).unsqueeze(0)
        rotary = self.model.model.rotary_emb(z, positions)
        causal = torch.full((seq, seq), torch.finfo(z.dtype).min, dtype=z.dtype, device=z.device)
        mask = torch.triu(causal, diagonal=1)[None, None]

        def run(k: int, hidden: torch.Tensor) -> torch.Tensor:
            out = self.heads[str(k)](hidden, attention_mask=mask, position_ids=positions,
                                     position_embeddings=rotary)
            return out[0] if isinstance(out, tuple) else out

        return run

    def _cp_marginal(self, k: int, u: torch.Tensor, log_w: torch.Tensor, unembed) -> torch.Tensor:
        """log sum_a w_a softmax(unembed(f_{k,a})) [b, s, rows] fp32 (model/heads/cp.py ``logits``)."""
        expanded = self.cp_expand[k](u).unflatten(-1, (self.cp_rank, -1))
        out = None
        for a in range(self.cp_rank):
            lp = torch.log_softmax(unembed(u + expanded[..., a, :]).float(), dim=-1) + log_w[..., a: a + 1]
            out = lp if out is None else torch.logaddexp(out, lp)
        return out


def load_llama(folder: str, meta: Optional[dict] = None, **llama_kwargs):
    """The folder's ``LlamaForCausalLM``: transformers' own loading, or for the trunk layout (linear, cp rank > 1:
    no Llama computes head 1, so the folder does not load as one) the trunk built from config.json and
    mtp_trunk*.safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if meta is None:
        with open(os.path.join(folder, HEADS_CONFIG)) as f:
            meta = json.load(f)
    if meta.get("layout") != TRUNK:
        return LlamaForCausalLM.from_pretrained(folder, **llama_kwargs).eval()
    from safetensors.torch import load_file

    state = {}
    for name in weight_files(folder, meta):
        state.update(load_file(os.path.join(folder, name)))
    config = LlamaConfig.from_pretrained(folder)
    return LlamaForCausalLM.from_pretrained(None, config=config, state_dict=state, **llama_kwargs).eval()
