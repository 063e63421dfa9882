"""Loading: defaults < YAML < overrides, strict keys and types, the resolved-config round trip."""

import glob
import os

import pytest

from mtp_megatron.config import Config, ConfigError, load_config, save_resolved_config
from mtp_megatron.distributed.topology import validate_for_world

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHIPPED = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))
TINY = os.path.join(REPO, "configs", "tiny.yaml")


def _write(tmp_path, text: str) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return str(path)


def test_configs_are_shipped():
    assert {os.path.basename(p) for p in SHIPPED} >= {"tiny.yaml", "7b.yaml", "13b.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=os.path.basename)
def test_shipped_config_loads_and_validates(path):
    cfg = load_config(path)
    per_replica = cfg.parallel.tp * cfg.parallel.pp
    dims = validate_for_world(cfg, world_size=per_replica * cfg.train.global_batch_size // cfg.train.micro_batch_size)
    assert dims.num_microbatches(cfg.train.global_batch_size, cfg.train.micro_batch_size) == 1


def test_paper_configs_carry_the_paper_numbers():
    for name, d, layers, trunk, tp, pp in (("7b", 4096, 32, 28, 2, 2), ("13b", 5120, 40, 36, 4, 2)):
        cfg = load_config(os.path.join(REPO, "configs", f"{name}.yaml"))
        assert (cfg.model.hidden_size, cfg.model.num_layers, cfg.model.num_attention_heads) == (d, layers, layers)
        assert cfg.trunk_num_layers() == trunk and cfg.mtp.n_heads == 4 and cfg.mtp.match_params
        assert (cfg.parallel.tp, cfg.parallel.pp) == (tp, pp)
        assert cfg.train.global_batch_size * cfg.model.seq_length == 8 * 2**20
        assert (cfg.optim.lr, cfg.optim.min_lr_ratio, cfg.optim.weight_decay) == (3e-4, 0.03, 0.1)
        assert (cfg.optim.adam_beta1, cfg.optim.adam_beta2, cfg.optim.clip_grad) == (0.9, 0.95, 1.0)
        assert cfg.train.precision == "bf16" and cfg.parallel.sharding == "distributed_optimizer"


def test_defaults_are_a_valid_tiny_model():
    cfg = load_config(None)
    assert cfg == Config() and cfg.model.vocab_size is None  # the tokenizer's, once the inputs are resolved
    validate_for_world(cfg, world_size=1)


def test_loading_reads_nothing_but_the_yaml(tmp_path):
    """Tokenizer, data files and a DeepSpeed JSON are opened by the explicit next step (mtp_megatron.train's
    resolve_run_inputs; tests/data/test_inputs.py), not by load_config."""
    missing = tmp_path / "missing"
    cfg = load_config(TINY, [f"tokenizer.model={missing}.model", f"data.paths=[{missing}_text_document]",
                             "data.synthetic=false", "model.vocab_size=null", "parallel.sharding=zero1",
                             f"parallel.deepspeed_config={missing}.json"])
    assert cfg.tokenizer.model == f"{missing}.model" and cfg.model.vocab_size is None


def test_required_overrides(byte_datasets):
    a, b = byte_datasets
    cfg = load_config(
        TINY,
        [
            "mtp.n_heads=2",
            "mtp.sequential_backward=false",
            "parallel.tp=2",
            "parallel.pp=2",
            "train.iters=3",
            "train.micro_batch_size=1",
            "train.global_batch_size=4",
            "train.seed=7",
            "run.dir=/tmp/x",
            f"data.paths=[{a},{b}]",
            "data.synthetic=false",
        ],
    )
    assert cfg.mtp.n_heads == 2 and cfg.mtp.sequential_backward is False
    assert (cfg.parallel.tp, cfg.parallel.pp) == (2, 2)
    assert (cfg.train.iters, cfg.train.micro_batch_size, cfg.train.global_batch_size) == (3, 1, 4)
    assert cfg.train.seed == 7 and cfg.run.dir == "/tmp/x"
    assert cfg.data.paths == [a, b]
    assert cfg.model.hidden_size == 64  # untouched keys keep the YAML's values


def test_yaml_beats_defaults_and_overrides_beat_yaml_in_order(tmp_path):
    path = _write(tmp_path, "train:\n  iters: 11\n  seed: 5\n")
    cfg = load_config(path, ["train.iters=12", "train.iters=13"])
    assert (cfg.train.iters, cfg.train.seed, cfg.train.micro_batch_size) == (13, 5, Config().train.micro_batch_size)


@pytest.mark.parametrize(
    "override, section, key, expected",
    [
        ("optim.lr=1e-4", "optim", "lr", 1e-4),  # PyYAML reads 1e-4 as a string; it must still be a float
        ("optim.lr=1", "optim", "lr", 1.0),  # floats accept ints
        ("optim.decay_iters=null", "optim", "decay_iters", None),
        ("optim.decay_iters=40", "optim", "decay_iters", 40),
        ("model.num_query_groups=2", "model", "num_query_groups", 2),
        ("run.name=2024", "run", "name", "2024"),
        ("data.paths=[0.3, {a}, 0.7, {b}]", "data", "paths", ["0.3", "{a}", "0.7", "{b}"]),
        ("logging.tensorboard=false", "logging", "tensorboard", False),
        ("parallel.sharding=none", "parallel", "sharding", "none"),
    ],
)
def test_override_values_are_parsed_and_coerced(override, section, key, expected, byte_datasets):
    a, b = byte_datasets
    override = override.format(a=a, b=b)
    if isinstance(expected, list):
        expected = [e.format(a=a, b=b) for e in expected]
    value = getattr(getattr(load_config(TINY, [override, "data.synthetic=false"]), section), key)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model.hiden_size=3", "did you mean 'model.hidden_size'"),
        ("modle.hidden_size=3", "unknown section 'modle'; did you mean 'model'"),
        ("train.lr=3e-4", "did you mean 'optim.lr'"),  # right key, wrong section
        ("parallel.dp=2", "unknown key 'parallel.dp'"),
    ],
)
def test_unknown_override_keys_get_a_suggestion(override, expected):
    with pytest.raises(ConfigError, match="unknown") as e:
        load_config(TINY, [override])
    assert expected in str(e.value)


def test_unknown_yaml_keys_get_a_suggestion(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, "mtp:\n  n_head: 2\n"))
    assert "cfg.yaml" in str(e.value) and "did you mean 'mtp.n_heads'" in str(e.value)
    with pytest.raises(ConfigError, match="unknown section 'optimizer'; did you mean 'optim'"):
        load_config(_write(tmp_path, "optimizer:\n  lr: 0.1\n"))


@pytest.mark.parametrize("override", ["train.iters", "iters=3", "train.iters.x=3", "=3", ".iters=3"])
def test_malformed_override_says_the_expected_form(override):
    with pytest.raises(ConfigError, match=r"malformed override .*section\.key=value"):
        load_config(None, [override])


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.iters=2.5", "train.iters: expected an integer, got 2.5"),
        ("train.iters=ten", "train.iters: expected an integer"),
        ("train.iters=true", "train.iters: expected an integer"),
        ("optim.lr=fast", "optim.lr: expected a number"),
        ("mtp.sequential_backward=1", "mtp.sequential_backward: expected true or false"),
        ("run.dir=yes", "run.dir: expected a string"),
        ("data.paths=/d/a", "data.paths: expected a list"),
        ("parallel.sharding=zero4", "choose one of 'none', 'distributed_optimizer', 'zero1', 'zero2', 'zero3'"),
        ("train.precision=bf32", "choose one of 'auto', 'fp32', 'bf16', 'fp16'"),
        ("train.iters=null", "train.iters: expected an integer, got None"),
    ],
)
def test_values_are_checked_against_the_annotation(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [override])
    assert expected in str(e.value) and override in str(e.value)


def test_yaml_shape_errors(tmp_path):
    defaults = load_config(None)
    assert load_config(_write(tmp_path, "")) == defaults  # empty file: all defaults
    assert load_config(_write(tmp_path, "mtp:\n")) == defaults  # empty section
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(_write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="section 'train' must be a mapping"):
        load_config(_write(tmp_path, "train: 5\n"))


def test_load_config_validates():
    with pytest.raises(ConfigError, match="train.global_batch_size: 7 is not a multiple of micro_batch_size=2"):
        load_config(TINY, ["train.global_batch_size=7"])


@pytest.mark.parametrize("path", SHIPPED, ids=os.path.basename)
def test_resolved_config_round_trips(path, tmp_path, byte_datasets):
    a, b = byte_datasets
    cfg = load_config(path, ["optim.lr=1e-5", f"data.paths=[0.5, {a}, 0.5, {b}]", "data.synthetic=false",
                             "run.name=null"])
    saved = save_resolved_config(cfg, str(tmp_path / "run"))
    assert saved == str(tmp_path / "run" / "config.yaml")
    assert os.listdir(tmp_path / "run") == ["config.yaml"]  # no temporary file left behind
    assert load_config(saved) == cfg


def test_unreadable_config_files_are_named_with_the_place(tmp_path):
    with pytest.raises(ConfigError, match=r"--config .*missing.yaml: No such file or directory"):
        load_config(str(tmp_path / "missing.yaml"))
    broken = _write(tmp_path, "train:\n  iters: 3\n  seed: [1, 2\n")
    with pytest.raises(ConfigError, match=r"cfg.yaml:\d+:\d+: not valid YAML"):
        load_config(broken)
