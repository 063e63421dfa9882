"""Build a ``Config`` from defaults < a YAML file < ``section.key=value`` overrides, and dump it back.

Loading is strict: a misspelt key is an error with a suggestion rather than a silently ignored setting, and every
value is checked against its field's annotation.
"""

import dataclasses
import difflib
import os
import typing
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from mtp_megatron.config.errors import ConfigError
from mtp_megatron.config.schema import Config, sections
from mtp_megatron.config.validate import validate

CONFIG_FILENAME = "config.yaml"


def load_config(path: Optional[str], overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file at ``path`` (if any), then each ``section.key=value`` override in order.

    Override values are parsed as YAML, so ``[a,b]``, ``true``, ``1e-4`` and ``null`` work. The result is checked
    with ``validate`` and nothing else: no file is read but the YAML. Opening the tokenizer and data files (which
    fills a null ``model.vocab_size``) and reading a DeepSpeed JSON are an explicit later step,
    ``mtp_megatron.train.resolve_run_inputs``, and the world-size checks are
    ``mtp_megatron.distributed.topology.validate_for_world``, once the launcher knows it.
    """
    cfg = Config()
    if path is not None:
        for section, values in _read_yaml(path).items():
            for key, value in values.items():
                _set(cfg, section, key, value, source=path)
    for override in overrides:
        section, key, value = _parse_override(override)
        _set(cfg, section, key, value, source=f"override {override!r}")
    validate(cfg)
    return cfg


def config_from_dict(values: Dict[str, Dict[str, Any]], source: str = "a saved config") -> Config:
    """A ``Config`` from ``config_to_dict``'s output (a checkpoint's config), checked with ``validate``. Like
    ``load_config`` it opens no tokenizer or data file, which need not exist where a checkpoint is read."""
    cfg = Config()
    for section, section_values in values.items():
        for key, value in section_values.items():
            _set(cfg, section, key, value, source=source)
    validate(cfg)
    return cfg


def config_to_dict(cfg: Config) -> Dict[str, Dict[str, Any]]:
    """The config as plain nested dicts (YAML/JSON friendly)."""
    return dataclasses.asdict(cfg)


def save_resolved_config(cfg: Config, run_dir: str) -> str:
    """Write the resolved config to ``<run_dir>/config.yaml`` and return its path.

    The file loads back with ``load_config`` to an equal ``Config``, so a run can be reproduced from its folder.
    Written to a temporary file and renamed, so a crash never leaves half a config behind.
    """
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, CONFIG_FILENAME)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write("# Resolved configuration of this run (defaults < YAML file < overrides).\n")
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False, default_flow_style=False)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Reading and setting values


def _read_yaml(path: str) -> Dict[str, Dict[str, Any]]:
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"--config {path}: {e.strerror}. Fix: give an existing YAML file, e.g. configs/tiny.yaml")
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{where}: not valid YAML ({problem}). Fix: correct the file at that line and column")
    if data is None:  # an empty file means "all defaults"
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model:, train:, ...), got {type(data).__name__}")
    result = {}
    for section, values in data.items():
        _section_class(str(section), source=path)  # unknown section -> error with suggestion
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: section '{section}' must be a mapping of key: value, got {values!r}")
        result[str(section)] = values
    return result


def _parse_override(override: str) -> Tuple[str, str, Any]:
    expected = "expected the form section.key=value, e.g. train.iters=100 or data.paths=[/d/a,/d/b]"
    name, sep, raw = override.partition("=")
    parts = name.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise ConfigError(f"malformed override {override!r}: {expected}")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {override!r}: cannot parse the value as YAML ({e}); {expected}") from e
    return parts[0], parts[1], value


def _section_class(section: str, source: str) -> type:
    classes = dict(sections())
    if section not in classes:
        raise ConfigError(f"{source}: unknown section '{section}'{_suggest(section, list(classes))}")
    return classes[section]


def _set(cfg: Config, section: str, key: str, value: Any, source: str) -> None:
    cls = _section_class(section, source)
    names = [f.name for f in dataclasses.fields(cls)]
    if key not in names:
        # A key in the wrong section (train.lr) is a common slip: point at where it lives.
        elsewhere = [f"{s}.{key}" for s, c in sections() if key in {f.name for f in dataclasses.fields(c)}]
        if elsewhere:
            hint = f"; did you mean {' or '.join(repr(e) for e in elsewhere)}?"
        else:
            hint = _suggest(key, names, prefix=f"{section}.")
        raise ConfigError(f"{source}: unknown key '{section}.{key}'{hint}")
    annotation = typing.get_type_hints(cls)[key]
    try:
        coerced = _coerce(value, annotation, f"{section}.{key}")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    setattr(getattr(cfg, section), key, coerced)


def _suggest(name: str, candidates: List[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.5)
    if close:
        return f"; did you mean '{prefix}{close[0]}'?"
    return f"; valid: {', '.join(prefix + c for c in candidates)}"


# ---------------------------------------------------------------------------------------------------------------
# Type coercion against the field annotation


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against ``annotation`` and convert the few lossless cases (int -> float, '1e-4' -> float)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)

    if origin is typing.Union:  # Optional[X] is Union[X, None]
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], key)
        # Several forms (parallel.layers_per_stage: a list of integers or 'auto'): the first that accepts it.
        reasons = []
        for form in inner:
            try:
                return _coerce(value, form, key)
            except ConfigError as e:
                reasons.append(str(e).removeprefix(f"{key}: "))
        raise ConfigError(f"{key}: {value!r} is none of its forms ({'; or '.join(reasons)})")

    if origin is typing.Literal:
        if value not in args:
            allowed = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {allowed}")
        return value

    if origin in (list, List):
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list such as [a, b], got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]

    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value

    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value

    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 (PyYAML) reads 1e-4 (no dot) as a string; accept it as the number it obviously is.
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")

    if annotation is str:
        # Numbers become strings (a run name 2024, a blend weight 0.3 in data.paths); booleans do not, since YAML
        # turns yes/no/on/off into booleans and str(True) is surely not what was meant.
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r} (quote it: '\"...\"')")

    raise ConfigError(f"{key}: unsupported annotation {annotation}")
