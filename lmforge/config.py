"""Typed configuration shared by every stage.

Dataclasses are the schema, YAML files are presets and ``--section.key=value`` flags override them.
Unknown keys and values of the wrong type are :class:`ConfigError`s that name the dotted key::

    cfg = load_config(PretrainConfig, "configs/pretrain/tiny.yaml", ["--train.max_steps=10"])
    print(dump_yaml(cfg))

A field's comment in the dataclass is its documentation; ``field_docs`` is not needed because the
resolved config is printed as YAML with the same names.

A stage resolves its config once at start-up (``auto`` precision and ZeRO stage, a resumed run's
global batch, fine-tuning's step count: :func:`resolved` makes the changed copy), then :func:`freeze`
makes it read-only: nothing that runs later can change what ``config.yaml`` and the checkpoints record.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from lmforge.errors import ConfigError

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Check ``value`` against the type hint ``tp`` and convert the lossless cases (int → float)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for opt in options:
            if opt is type(None):
                continue
            try:
                return _coerce(opt, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            choices = "|".join(str(a) for a in get_args(tp))
            raise ConfigError(f"{key}: expected one of {choices}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        scalar = getattr(tp, "__scalar_field__", None)
        if scalar and not isinstance(value, dict):
            value = {scalar: value}  # `--resume=auto` sets the section's main field
        elif scalar and "" in value:
            value = {**{k: v for k, v in value.items() if k}, scalar: value[""]}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for section {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        is_tuple = origin is tuple or tp is tuple
        if not isinstance(value, list | tuple) and not isinstance(value, dict) and not is_tuple:
            value = [value]  # `--data.shards=out/shards` is what users type for a one-item list
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = get_args(tp)[:1] or (Any,)
        items = [_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if is_tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        args = get_args(tp)
        val_tp = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(val_tp, v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:  # "1e6" or "1_000" on the command line
                f = float(value.replace("_", ""))
                if f.is_integer():
                    return int(f)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:  # YAML 1.1 reads "3e-4" as a string
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a nested dict; unknown keys and wrong types name the dotted key."""
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    for k in data:
        if k not in names:
            near = ", ".join(sorted(names))
            raise ConfigError(f"unknown config key '{prefix}{k}' (valid keys in this section: {near})")
    kwargs = {k: _coerce(hints[k], v, f"{prefix}{k}") for k, v in data.items()}
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # a required field without default
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (tuples become lists so it round-trips through YAML)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, list | tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return plain(cfg)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.get(p)
        if not isinstance(child, dict):
            # a bare value given earlier (`--resume=auto`) is kept under "" for the section's main field
            child = {} if child is None else {"": child}
            node[p] = child
        node = child
    if isinstance(node.get(parts[-1]), dict) and not isinstance(value, dict):
        node[parts[-1]][""] = value
    else:
        node[parts[-1]] = value


def parse_overrides(args: Sequence[str]) -> dict[str, Any]:
    """``["--train.lr=3e-4", "--zero.stage", "2"]`` → nested dict; values are parsed as YAML."""
    tree: dict[str, Any] = {}
    i = 0
    args = list(args)
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument '{arg}': overrides look like --section.key=value")
        key, eq, raw = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError(f"override '{arg}' has no value: write --{key}=VALUE")
            raw = args[i + 1]
            i += 1
        key = key.replace("-", "_")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key, value)
        i += 1
    return tree


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``over`` wins. Neither input is modified."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        elif isinstance(v, dict) and k in out and out[k] is not None:
            out[k] = {"": out[k], **v}  # a section's bare value in the preset, keys from overrides
        elif isinstance(out.get(k), dict) and not isinstance(v, dict):
            out[k] = {**out[k], "": v}
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} not found: pass a YAML preset such as configs/pretrain/tiny.yaml")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else "parse error"
        raise ConfigError(f"{p}: invalid YAML ({first})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of config sections at the top level")
    # Presets may inherit: `base: other.yaml` (relative to this file) is loaded first.
    base = data.pop("base", None)
    if base:
        data = merge(read_yaml(p.parent / base), data)
    return data


def load_config(cls: type[T], path: str | Path | None, overrides: Sequence[str] = ()) -> T:
    """Preset (optional) + dotted overrides → validated ``cls`` instance."""
    data = read_yaml(path) if path else {}
    data = merge(data, parse_overrides(overrides))
    return from_dict(cls, data)


def split_cli(argv: Sequence[str]) -> tuple[str | None, list[str], set[str]]:
    """Split ``CONFIG [--a.b=v ...] [--dry-run]`` into (config path, overrides, bare flags)."""
    path = None
    overrides: list[str] = []
    flags: set[str] = set()
    args = list(argv)
    i = 0
    bare = {"--dry-run", "--help", "-h"}
    while i < len(args):
        a = args[i]
        if a in bare:
            flags.add(a.lstrip("-"))
        elif not a.startswith("-") and path is None and not overrides:
            path = a
        else:
            overrides.append(a)
            # "--key value" form: keep the value with its key
            if "=" not in a and i + 1 < len(args) and not args[i + 1].startswith("--"):
                overrides.append(args[i + 1])
                i += 1
        i += 1
    return path, overrides, flags


def config_help(cls: type, prefix: str = "") -> str:
    """One line per key with type and default, for ``--help``."""
    lines = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(config_help(tp, f"{prefix}{f.name}."))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "<required>"
        lines.append(f"  --{prefix}{f.name}={default!r}  ({_type_name(tp)})")
    return "\n".join(lines)


__all__ = [
    "ConfigError",
    "config_help",
    "dump_yaml",
    "from_dict",
    "load_config",
    "merge",
    "parse_overrides",
    "read_yaml",
    "split_cli",
    "to_dict",
]


def resolved(cfg: T, changes: dict[str, Any]) -> T:
    """A copy of ``cfg`` with dotted keys set (``{"train.max_steps": 10}``), validated like a loaded config;
    ``cfg`` itself is not touched (and may be frozen)."""
    data = to_dict(cfg)
    for dotted, value in changes.items():
        _set_dotted(data, dotted, to_dict(value) if dataclasses.is_dataclass(value) else value)
    return from_dict(getattr(type(cfg), "_lmforge_thawed", type(cfg)), data)


def _refuse_change(self, name: str, value: Any = None) -> None:
    raise ConfigError(f"the config is frozen after start-up: {type(self).__name__}.{name} cannot change "
                      "(a stage resolves its config once, before freeze(); use resolved() for a changed copy)")


_FROZEN: dict[type, type] = {}


def freeze(cfg: T) -> T:
    """Make ``cfg`` and every section in it read-only, in place (assigning a field raises
    :class:`ConfigError`); returns it. Reading, ``to_dict``, ``dump_yaml`` and :func:`resolved` work as before."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            freeze(v)
    cls = type(cfg)
    if not getattr(cls, "_lmforge_thawed", None):
        if cls not in _FROZEN:
            _FROZEN[cls] = type(cls.__name__, (cls,), {"__setattr__": _refuse_change, "__delattr__": _refuse_change,
                                                        "_lmforge_thawed": cls, "__module__": cls.__module__,
                                                        "__qualname__": cls.__qualname__})
        object.__setattr__(cfg, "__class__", _FROZEN[cls])
    return cfg


def is_frozen(cfg: Any) -> bool:
    return bool(getattr(type(cfg), "_lmforge_thawed", None))
