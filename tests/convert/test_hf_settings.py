"""Hugging Face Llama settings beyond the defaults through tools/convert_checkpoint.py: each setting megatron-core
computes exactly converts both ways with transformers' logits equal to ours (fp32, 1e-4), and each other one stops
with exit 2 naming the key and its value, writing nothing.

Import folders are written by transformers itself (``LlamaForCausalLM(LlamaConfig(...)).save_pretrained``) with
random weights, biases included, so a dropped or misplaced tensor shows; export starts from one of our checkpoints
with every setting on at once (head_dim != hidden/heads, biases, a fractional RoPE theta, RoPE scaling) and the
byte tokenizer's 259 ids padded to 384 rows, so generation has padding rows to avoid.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from mtp_megatron.config import load_config
from mtp_megatron.convert import hf, native
from tests.convert.test_convert import REPO, _convert, our_head_logits

LLAMA = dict(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
SEQ = 256  # long enough that RoPE scaling's low frequencies move the logits well past the tolerance


def _tokens(vocab: int, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(5))


def _as_transformers4(folder: str, type_key: str = "rope_type") -> None:
    """Rewrite config.json as transformers 4 wrote it: top-level ``rope_theta`` and ``rope_scaling``."""
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    kind = rope.pop("rope_type")
    config["rope_scaling"] = {type_key: kind, **rope} if kind != "default" else None
    with open(path, "w") as f:
        json.dump(config, f, indent=1)


def _llama_folder(folder: str, transformers4: str = "", **settings) -> str:
    """A Llama folder saved by transformers, random weights (std 0.1; norms around 1, biases included)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**LLAMA, **settings}))
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(1 + 0.1 * torch.randn_like(param) if "norm" in name else 0.1 * torch.randn_like(param))
    model.save_pretrained(folder)
    if transformers4:
        _as_transformers4(folder, transformers4)
    return folder


def _transformers_logits(folder: str, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}

# name: (LlamaConfig settings, transformers-4 rewrite (its rope_scaling type key) or "", our fields expected)
IMPORTED = {
    "biases+head_dim+fractional_theta": (
        dict(attention_bias=True, mlp_bias=True, head_dim=24, rope_parameters={"rope_theta": 12345.6}), "",
        dict(add_bias_linear=True, head_dim=24, rotary_base=12345.6, rope_scaling_type=None)),
    "linear": (dict(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}), "",
               dict(rope_scaling_type="linear", rope_scaling_factor=4.0, rotary_base=10000.0)),
    "linear_transformers4_type": (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.5}),
                                  "type", dict(rope_scaling_type="linear", rope_scaling_factor=2.0, rotary_base=500.5)),
    "llama3_transformers4": (dict(rope_parameters={**LLAMA3, "rope_theta": 10000.0}), "rope_type",
                             dict(rope_scaling_type="llama3", rope_scaling_factor=8.0, rotary_base=10000.0)),
}


@pytest.mark.parametrize("name", IMPORTED)
def test_supported_settings_import_with_transformers_logits(name, tmp_path):
    settings, transformers4, expected = IMPORTED[name]
    folder = _llama_folder(str(tmp_path / "llama"), transformers4, **settings)
    tokens = _tokens(LLAMA["vocab_size"])
    theirs = _transformers_logits(folder, tokens)
    result = _convert("--input", folder, "--output", str(tmp_path / "ours"), "--to", "megatron")
    assert result.returncode == 0, result.stderr[-3000:]
    cfg, dense = native.read_checkpoint(str(tmp_path / "ours"))
    ours = our_head_logits(cfg, dense, tokens)[0, ..., : LLAMA["vocab_size"]]
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=0), (ours - theirs).abs().max()
    assert {key: getattr(cfg.model, key) for key in expected} == expected


def test_tied_embeddings_import_only_untied_on_request(tmp_path):
    folder = _llama_folder(str(tmp_path / "tied"), tie_word_embeddings=True)
    tokens = _tokens(LLAMA["vocab_size"], seq=32)
    theirs = _transformers_logits(folder, tokens)
    refused = _convert("--input", folder, "--output", str(tmp_path / "refused"), "--to", "megatron")
    assert refused.returncode == 2 and "tie_word_embeddings=true" in refused.stderr and "--untie-embeddings" in \
        refused.stderr
    assert not os.path.exists(tmp_path / "refused")
    result = _convert("--input", folder, "--output", str(tmp_path / "ours"), "--to", "megatron", "--untie-embeddings")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the converted model is UNTIED" in result.stdout
    cfg, dense = native.read_checkpoint(str(tmp_path / "ours"))
    embedding, unembedding = dense["embedding.word_embeddings.weight"], dense["mtp_heads.output_layer.weight"]
    assert torch.equal(embedding, unembedding) and embedding.data_ptr() != unembedding.data_ptr()
    ours = our_head_logits(cfg, dense, tokens)[0, ..., : LLAMA["vocab_size"]]
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=0), (ours - theirs).abs().max()


def _edit_config(folder: str, **changes) -> None:
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    with open(path, "w") as f:
        json.dump({**config, **changes}, f)


# name: (LlamaConfig settings, transformers-4 rewrite or "", config.json edits, what stderr must name)
REFUSED = {
    "attention_bias_only": (dict(attention_bias=True), "", {}, "attention_bias=true with mlp_bias=false"),
    "mlp_bias_only": (dict(mlp_bias=True), "", {}, "attention_bias=false with mlp_bias=true"),
    "gelu": (dict(hidden_act="gelu"), "", {}, "hidden_act='gelu'"),
    "dynamic": (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}), "", {},
                "rope_parameters.rope_type='dynamic'"),
    "dynamic_transformers4": (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}),
                              "type", {}, "rope_scaling.rope_type='dynamic'"),
    "yarn": (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                   "original_max_position_embeddings": 16}), "", {}, "rope_type='yarn'"),
    "llama3_other_low_freq_factor": (dict(rope_parameters={**LLAMA3, "low_freq_factor": 2.0, "rope_theta": 1e4}), "",
                                     {}, "rope_parameters.low_freq_factor=2.0"),
    "llama3_transformers4_other_length": (
        dict(rope_parameters={**LLAMA3, "original_max_position_embeddings": 4096, "rope_theta": 1e4}), "rope_type",
        {}, "rope_scaling.original_max_position_embeddings=4096"),
    "partial_rotary": (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                             "partial_rotary_factor": 0.5}), "", {},
                       "rope_parameters.partial_rotary_factor=0.5"),
    "not_llama": ({}, "", {"model_type": "mistral"}, "model_type='mistral'"),
    "quantized": ({}, "", {"quantization_config": {"quant_method": "gptq", "bits": 4}},
                  "quantization_config (quant_method='gptq')"),
}


@pytest.fixture(scope="module")
def plain_weights(tmp_path_factory) -> str:
    """One transformers-written Llama's weights, linked into every refused folder (the refusal reads config.json)."""
    return _llama_folder(str(tmp_path_factory.mktemp("plain") / "llama")) + "/model.safetensors"


@pytest.mark.parametrize("name", REFUSED)
def test_unrepresentable_settings_exit_2_naming_key_and_value(name, plain_weights, tmp_path):
    from transformers import LlamaConfig

    settings, transformers4, edits, named = REFUSED[name]
    folder = str(tmp_path / "llama")
    LlamaConfig(**{**LLAMA, **settings}).save_pretrained(folder)
    os.link(plain_weights, os.path.join(folder, "model.safetensors"))
    if transformers4:
        _as_transformers4(folder, transformers4)
    if edits:
        _edit_config(folder, **edits)
    out = str(tmp_path / "out")
    result = _convert("--input", folder, "--output", out, "--to", "megatron")
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], lines
    assert not os.path.exists(out) and not os.path.exists(out + ".tmp")


# -- export -------------------------------------------------------------------------------------------------------

EXPORTED = {
    "linear": ["model.rotary_base=12345.6", "model.rope_scaling_type=linear", "model.rope_scaling_factor=2.0"],
    "llama3": ["model.rotary_base=10000.5", "model.rope_scaling_type=llama3", "model.rope_scaling_factor=8.0"],
}


def _model_with_every_setting(scaling: str):
    """(config, dense state) of our model: head_dim 24 (hidden 64 / 4 heads = 16), biases, the RoPE of
    ``EXPORTED[scaling]``, the byte tokenizer (259 ids, padded to 384 rows); random weights."""
    from mtp_megatron.model.builder import build_model
    from mtp_megatron.train import load_run_config

    cfg = load_run_config(os.path.join(REPO, "configs/tiny.yaml"), [
        "model.num_query_groups=2", "model.seq_length=64", "model.vocab_size=null", "model.head_dim=24",
        "model.add_bias_linear=true", "mtp.n_heads=3", "logging.tensorboard=false", *EXPORTED[scaling]])
    assert cfg.model.padded_vocab_size(1) == 384
    with native.single_process() as env:
        model = build_model(native.dense_config(cfg, "fp32"), env)
        dense = {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    # Larger than the initialisation (std 0.02, biases 0, norms 1), so that attention is far from uniform and
    # every setting moves the logits well past the tolerance.
    gen = torch.Generator().manual_seed(1)
    for key, value in dense.items():
        noise = 0.1 * torch.randn(value.shape, generator=gen)
        dense[key] = 1 + noise if "norm" in key else noise
    return cfg, dense


@pytest.fixture(scope="module", params=list(EXPORTED))
def exported(request, tmp_path_factory):
    """(our checkpoint, its Hugging Face export by the command line, config, dense state)."""
    folder = tmp_path_factory.mktemp(f"export_{request.param}")
    cfg, dense = _model_with_every_setting(request.param)
    native.write_checkpoint(cfg, dense, str(folder / "ours"))
    result = _convert("--input", str(folder / "ours"), "--output", str(folder / "hf"), "--to", "hf")
    assert result.returncode == 0, result.stderr[-3000:]
    return str(folder / "ours"), str(folder / "hf"), cfg, dense


def test_export_config_says_what_the_model_computes(exported):
    _, folder, cfg, _ = exported
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    assert (config["head_dim"], config["attention_bias"], config["mlp_bias"]) == (24, True, True)
    expected_rope = {"rope_type": cfg.model.rope_scaling_type, "rope_theta": cfg.model.rotary_base,
                     "factor": cfg.model.rope_scaling_factor}
    if cfg.model.rope_scaling_type == "llama3":
        expected_rope.update(low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    assert config["rope_parameters"] == expected_rope
    assert (config["vocab_size"], config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == \
        (384, 257, 256, 258)
    with open(os.path.join(folder, "generation_config.json")) as f:
        generation = json.load(f)
    assert generation["suppress_tokens"] == list(range(259, 384)) and generation["eos_token_id"] == 256


def test_export_gives_our_logits_in_transformers_and_our_decoder(exported):
    from transformers import LlamaForCausalLM

    from mtp_megatron.convert.hf_heads import LlamaMTPHeads
    from mtp_megatron.inference.decoder import KVCache, MTPDecoder

    _, folder, cfg, dense = exported
    tokens = _tokens(259)
    ours = our_head_logits(cfg, dense, tokens)
    theirs = _transformers_logits(folder, tokens)
    assert torch.allclose(theirs, ours[0], atol=1e-4, rtol=0), (theirs - ours[0]).abs().max()
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    heads = LlamaMTPHeads.from_pretrained(folder, model)
    assert heads.vocab_size == 259
    all_heads = heads(tokens)
    assert torch.allclose(all_heads, ours, atol=1e-4, rtol=0), (all_heads - ours).abs().amax(dim=(1, 2, 3))
    decoded = MTPDecoder(cfg, dense).forward(tokens, KVCache())
    assert torch.allclose(decoded, ours[..., :259], atol=1e-4, rtol=0), (decoded - ours[..., :259]).abs().max()
    # Each setting is really computed: without the RoPE scaling, or without the biases, the logits move.
    plain = native.dense_config(cfg, "fp32")
    plain.model.rope_scaling_type = None
    assert (our_head_logits(plain, dense, tokens)[0] - ours[0]).abs().max() > 1e-3
    unbiased = {k: (torch.zeros_like(v) if k.endswith(".bias") else v) for k, v in dense.items()}
    assert (our_head_logits(cfg, unbiased, tokens)[0] - ours[0]).abs().max() > 1e-3


def test_transformers_generate_skips_padding_rows_as_our_generate(exported, capsys):
    """``generate(do_sample=False)`` on the export continues as ``mtp_megatron.generate`` on our checkpoint, on a
    model whose padding rows (259..383, random) would otherwise be chosen."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mtp_megatron.generate import main

    checkpoint, folder, _, _ = exported
    prompt, new = "def parse(text):\n    ", 16
    capsys.readouterr()
    assert main(["--checkpoint", checkpoint, "--prompt", prompt, "--max-new-tokens", str(new), "--print-ids"]) == 0
    ours = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ids"][0]

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    inputs = tokenizer(prompt, return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == list(prompt.encode())
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new, do_sample=False)
        theirs = out[0, inputs["input_ids"].shape[1]:].tolist()
        unsuppressed = model(input_ids=out).logits[0, inputs["input_ids"].shape[1] - 1: -1].argmax(-1)
    assert theirs == ours
    assert (unsuppressed >= 259).any(), "the test needs a model whose padding rows would win somewhere"


def test_byte_tokenizer_export_round_trips_source_files(exported):
    from transformers import AutoTokenizer

    from mtp_megatron.data.tokenizer import ByteTokenizer
    from tests.convert.test_hf_tokenizer import _source_files

    tokenizer, ours = AutoTokenizer.from_pretrained(exported[1]), ByteTokenizer()
    for text in _source_files(count=50) + ["</s> <|eod|> <0x41>", " café 😀\t\r\n"]:
        ids = ours.tokenize(text)
        assert tokenizer(text)["input_ids"] == ids and tokenizer.decode(ids) == ours.detokenize(ids) == text
    assert (tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id) == (256, 257, 258)


def test_plain_export_reimports_with_the_same_settings(exported, tmp_path):
    """The export's config.json alone (no mtp_heads files: what another tool reads) gives back our settings and
    the trunk's and head 1's tensors bitwise."""
    _, folder, cfg, dense = exported
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in os.listdir(folder):
        if not name.startswith("mtp_heads"):
            os.link(os.path.join(folder, name), plain / name)
    back_cfg, back = hf.read_llama(str(plain))
    fields = ("head_dim", "add_bias_linear", "rotary_base", "rope_scaling_type", "rope_scaling_factor",
              "num_query_groups", "ffn_hidden_size")
    assert {f: getattr(back_cfg.model, f) for f in fields} == {f: getattr(cfg.model, f) for f in fields}
    assert back_cfg.mtp.n_heads == 1
    shared = [k for k in dense if not k.startswith("mtp_heads.layers.") or k.startswith("mtp_heads.layers.0.")]
    assert all(torch.equal(back[k], dense[k]) for k in shared)


def test_new_model_fields_are_validated_and_part_of_the_checkpoint_shape():
    """``model.head_dim`` and the RoPE scaling fields are checked at load, and a checkpoint of another head width
    is reported as a different model (checkpoint/state.py ``shape_mismatches``)."""
    from mtp_megatron.checkpoint.state import shape_mismatches
    from mtp_megatron.config import ConfigError, config_to_dict

    tiny = os.path.join(REPO, "configs/tiny.yaml")
    for overrides, named in ((["model.head_dim=0"], "model.head_dim: must be >= 1"),
                             (["model.rope_scaling_type=linear", "model.rope_scaling_factor=0.5"],
                              "model.rope_scaling_factor: must be >= 1"),
                             (["model.rope_scaling_type=dynamic"], "model.rope_scaling_type: 'dynamic' is not allowed")):
        with pytest.raises(ConfigError, match=named):
            load_config(tiny, overrides)
    assert load_config(tiny, ["model.rotary_base=500000.5"]).model.rotary_base == 500000.5
    wide, default = load_config(tiny, ["model.head_dim=24"]), load_config(tiny, [])
    assert any(line.startswith("model.head_dim: checkpoint 24, this run None")
               for line in shape_mismatches(config_to_dict(wide), 1024, default))
