"""The schema: documented fields, derived sizes, the help listing."""

import dataclasses

import pytest

from mtp_megatron.config import Config, ModelConfig, describe_fields, format_config_help
from mtp_megatron.config.schema import sections

ALL_CLASSES = [Config] + [cls for _, cls in sections()]


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_every_field_has_a_docstring_and_a_default(cls):
    rows = describe_fields(cls)
    assert [r[0] for r in rows] == [f.name for f in dataclasses.fields(cls)]
    undocumented = [name for name, _, _, doc in rows if len(doc.split()) < 2]
    assert not undocumented, f"{cls.__name__} fields without a docstring: {undocumented}"
    assert all(default is not dataclasses.MISSING for _, _, default, _ in rows)


def test_describe_fields_gives_types_as_written():
    rows = {name: (type_str, default) for name, type_str, default, _ in describe_fields(ModelConfig)}
    assert rows["num_query_groups"] == ("Optional[int]", None)
    assert rows["normalization"] == ("Literal['RMSNorm', 'LayerNorm']", "RMSNorm")


def test_help_lists_every_setting_with_its_effective_default():
    text = format_config_help()
    assert "  mtp.n_heads: int = 4  -- Future tokens" in text
    assert "  data.paths: List[str] = []  -- " in text
    assert "  optim.warmup_iters: int = 5  -- " in text  # Config()'s tiny-run default, not OptimConfig's 2000
    n_fields = sum(len(dataclasses.fields(cls)) for _, cls in sections())
    assert sum(line.startswith("  ") for line in text.splitlines()) == n_fields


@pytest.mark.parametrize(
    "hidden, activation, ffn, expected",
    [
        (4096, "swiglu", None, 11008),  # Llama-2 7B
        (5120, "swiglu", None, 13824),  # Llama-2 13B
        (64, "swiglu", None, 256),
        (64, "gelu", None, 256),
        (100, "gelu", None, 400),
        (64, "swiglu", 100, 100),  # explicit wins
    ],
)
def test_resolved_ffn_hidden_size(hidden, activation, ffn, expected):
    model = ModelConfig(hidden_size=hidden, activation=activation, ffn_hidden_size=ffn)
    assert model.resolved_ffn_hidden_size() == expected


@pytest.mark.parametrize(
    "vocab, divisible_by, tp, expected",
    [
        (32000, 128, 1, 32000),
        (32000, 128, 2, 32000),
        (32000, 128, 4, 32256),
        (50257, 128, 1, 50304),
        (1000, 1, 3, 1002),
    ],
)
def test_padded_vocab_size_is_megatrons(vocab, divisible_by, tp, expected):
    model = ModelConfig(vocab_size=vocab, make_vocab_size_divisible_by=divisible_by)
    assert model.padded_vocab_size(tp) == expected


def test_trunk_and_head_layers():
    cfg = Config()
    cfg.model.num_layers, cfg.mtp.n_heads = 32, 4
    assert cfg.trunk_num_layers() == 31  # trunk = the n=1 model's layers[:-1]
    cfg.mtp.match_params = True
    assert cfg.trunk_num_layers() == 28  # trunk + heads = the n=1 model's 32 layers
