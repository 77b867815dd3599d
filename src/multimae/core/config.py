"""Typed run configuration: nested dataclasses built from YAML plus dotted CLI overrides.

A run config is a tree of ``@dataclass`` classes. :func:`load_config` reads an optional YAML
file (which may inherit from another file through a top-level ``defaults:`` key), applies
``a.b.c=value`` overrides and builds the dataclass tree, validating every value against its
annotation. Errors are :class:`ConfigError` and always name the full dotted key::

    @dataclass
    class Optim:
        lr: float = 1e-4
        betas: tuple[float, ...] = (0.9, 0.95)

    @dataclass
    class Run:
        optim: Optim = field(default_factory=Optim)
        modalities: list[str] = field(default_factory=lambda: ["rgb"])

    cfg = load_config(Run, "configs/pretrain/x.yaml", ["optim.lr=3e-4", "modalities=[rgb,depth]"])

Supported annotations: ``int``, ``float`` (an int is accepted and converted), ``bool``, ``str``,
``pathlib.Path`` (from a string), ``Optional[X]`` / ``X | None`` and other unions, ``Literal[...]``,
``list[X]``, ``tuple[X, ...]`` / ``tuple[X, Y]``, ``dict[str, X]``, nested dataclasses and ``Any``.
This module does not import torch, so configs can be loaded cheaply by any tool.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import reprlib
import types
import typing
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

__all__ = [
    "ConfigError",
    "load_config",
    "from_dict",
    "to_dict",
    "save_json",
    "load_yaml",
    "apply_overrides",
    "parse_value",
    "packaged_configs",
    "resolve_config_path",
]

T = TypeVar("T")

#: Top-level YAML key naming the file(s) a config inherits from (relative to that file).
DEFAULTS_KEY = "defaults"


class ConfigError(ValueError):
    """A config could not be read or does not match its dataclass schema."""


# --------------------------------------------------------------------------------------------
# YAML reading
# --------------------------------------------------------------------------------------------


MAX_YAML_NODES = 100_000  # a config has hundreds; anchors + aliases may not expand past this


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads YAML 1.2 floats such as ``1e-4`` (PyYAML needs ``1.0e-4``) and
    refuses a document whose aliases expand to more than :data:`MAX_YAML_NODES` nodes (a
    "billion laughs" of a few hundred bytes) or refer to themselves, before anything walks it."""

    def compose_document(self) -> yaml.Node:
        node = super().compose_document()
        _expanded_size(node, {})
        return node


def _expanded_size(node: yaml.Node, memo: dict[int, int | None]) -> int:
    """Nodes in ``node`` with every alias expanded, counted once per distinct node (memo)."""
    known = memo.get(id(node), 0)
    if known is None:
        raise yaml.YAMLError(f"an alias refers to a node that contains it (line {node.start_mark.line + 1})")
    if known:
        return known
    memo[id(node)] = None
    children = node.value if isinstance(node, yaml.SequenceNode) else \
        [x for kv in node.value for x in kv] if isinstance(node, yaml.MappingNode) else []
    n = 1 + sum(_expanded_size(c, memo) for c in children)
    if n > MAX_YAML_NODES:
        raise yaml.YAMLError(f"anchors and aliases expand to more than {MAX_YAML_NODES} values "
                             f"(line {node.start_mark.line + 1}; a YAML alias bomb?)")
    memo[id(node)] = n
    return n


_FLOAT_RE = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:float"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789."))


def parse_value(text: str) -> Any:
    """Parse one override value as YAML: ``1e-4`` -> float, ``true`` -> bool, ``[a,b]`` -> list.

    Text that is not valid YAML on its own (e.g. ``a: b: c``) is kept as the raw string.
    """
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError:
        return text


def _read_yaml_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid YAML in config file {path}: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must contain a mapping at the top level, got {type(data).__name__}"
        )
    return data


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``over`` into a copy of ``base``; nested mappings merge, everything else replaces."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _deep_merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


def load_yaml(path: str | os.PathLike[str], _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config file, resolving ``defaults: other.yaml`` inheritance (deep merge).

    ``defaults`` may be one path or a list of paths, each relative to the file that names it;
    they are merged in order, then the file's own keys are merged on top (later wins).
    """
    p = Path(path).resolve()
    if p in _seen:
        chain = " -> ".join(str(s) for s in (*_seen, p))
        raise ConfigError(f"circular 'defaults' inheritance: {chain}")
    data = _read_yaml_file(p)
    parents = data.pop(DEFAULTS_KEY, None)
    if parents is None:
        return data
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(x, str) for x in parents):
        raise ConfigError(
            f"{p}: '{DEFAULTS_KEY}' must be a path or a list of paths, got {short_repr(parents)}"
        )
    merged: dict[str, Any] = {}
    for parent in parents:
        merged = _deep_merge(merged, load_yaml(p.parent / parent, (*_seen, p)))
    return _deep_merge(merged, data)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with ``a.b.c=value`` overrides applied (values parsed as YAML).

    Intermediate mappings are created when missing or ``None``; validation of the keys happens
    later, when the dataclasses are built.
    """
    out = _deep_merge({}, data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} must look like 'a.b.c=value'")
        parts = key.split(".")
        node = out
        for i, part in enumerate(parts[:-1]):
            child = {} if node.get(part) is None else node[part]
            if not isinstance(child, Mapping):
                prefix = ".".join(parts[: i + 1])
                raise ConfigError(
                    f"override {item!r}: cannot set '{key}' because '{prefix}' is "
                    f"{type(child).__name__} {short_repr(child)}, not a mapping"
                )
            node[part] = dict(child)  # a copy: ``data`` is left as it was
            node = node[part]
        node[parts[-1]] = parse_value(raw.strip())
    return out


def load_config(
    cls: type[T], path: str | os.PathLike[str] | None = None, overrides: Sequence[str] = ()
) -> T:
    """Build the dataclass ``cls`` from an optional YAML file plus dotted overrides.

    Args:
        cls: the root config dataclass.
        path: YAML file (may use ``defaults:`` inheritance); ``None`` starts from the defaults.
        overrides: strings ``"a.b.c=value"``; values are parsed with YAML rules.
    Raises:
        ConfigError: unreadable file, unknown key (with the closest valid key suggested),
            or a value that does not match its annotation.
    """
    data = load_yaml(resolve_config_path(path)) if path is not None else {}
    data = apply_overrides(data, overrides)
    return from_dict(cls, data)


# --------------------------------------------------------------------------------------------
# Run configs shipped with the package
# --------------------------------------------------------------------------------------------


def packaged_configs(root: str | os.PathLike[str] | None = None) -> dict[str, list[Path]]:
    """``name -> [paths]`` of the shipped run configs (every ``<kind>/`` directory: pretrain,
    finetune, ...); ``kind/name`` keys are listed too. The run configs ship as
    ``multimae/configs/<kind>/<name>.yaml`` (in a source checkout a link to the repository's ``configs/``)."""
    base = Path(root) if root is not None else Path(__file__).resolve().parents[1] / "configs"
    out: dict[str, list[Path]] = {}
    for f in sorted(base.glob("*/*.yaml")):
        out.setdefault(f.stem, []).append(f)
        out.setdefault(f"{f.parent.name}/{f.stem}", []).append(f)
    return out


def resolve_config_path(path: str | os.PathLike[str], kind: str | None = None,
                        root: str | os.PathLike[str] | None = None) -> Path:
    """A config file path: ``path`` itself when it is a file, else a shipped config named by it.

    ``synthetic-tiny``, ``pretrain/synthetic-tiny`` and ``configs/pretrain/synthetic-tiny.yaml``
    (the repository path, from any directory) all name the shipped file. A bare name found under
    several kinds is an error unless ``kind`` (e.g. ``"pretrain"``) picks one.
    """
    p = Path(path)
    if p.is_file():
        return p
    parts = list(p.with_suffix("").parts) if p.suffix in (".yaml", ".yml") else list(p.parts)
    if parts and parts[0] == "configs":
        parts = parts[1:]
    shipped = packaged_configs(root)
    if 1 <= len(parts) <= 2:
        found = shipped.get("/".join(parts), [])
        if len(found) > 1 and kind is not None:
            found = [f for f in found if f.parent.name == kind]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            options = ", ".join(f"{f.parent.name}/{f.stem}" for f in found)
            raise ConfigError(f"config name {str(path)!r} is ambiguous: {options}")
    names = sorted(k for k in shipped if "/" in k)
    raise ConfigError(f"config file not found: {path} (not a file, and not a shipped config: {', '.join(names)})")


# --------------------------------------------------------------------------------------------
# Building and validating dataclasses
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    if tp is Any:
        return "Any"
    if tp is type(None):
        return "None"
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        return "Literal[" + ", ".join(repr(a) for a in args) + "]"
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[" + ", ".join("..." if a is Ellipsis else _type_name(a) for a in args) + "]"
    return getattr(tp, "__name__", str(tp))


_SHORT = reprlib.Repr()  # keyword arguments only from Python 3.12
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxdict, _SHORT.maxset = 3, 6, 6, 6, 6
_SHORT.maxstring = _SHORT.maxother = 120


def short_repr(value: Any) -> str:
    """``repr(value)`` of at most ~200 characters, built without walking all of a big value."""
    shown = _SHORT.repr(value)
    return shown if len(shown) <= 200 else shown[:200] + "..."


def _fail(key: str, tp: Any, value: Any) -> ConfigError:
    return ConfigError(
        f"config key '{key or '<root>'}': expected {_type_name(tp)}, got {type(value).__name__} {short_repr(value)}"
    )


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _convert(tp: Any, value: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; return it converted (dicts -> dataclasses)."""
    if tp is Any or tp is object:
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _build_dataclass(tp, value, key)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        for a in args:
            if type(value) is type(a) and value == a:
                return a
        raise _fail(key, tp, value)
    if origin in (Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise _fail(key, tp, value)
        for arm in args:
            if arm is type(None):
                continue
            try:
                return _convert(arm, value, key)
            except ConfigError as e:
                # A dataclass arm that matched the shape but had a bad field: report that error.
                if dataclasses.is_dataclass(arm) and isinstance(value, Mapping):
                    raise e
        raise _fail(key, tp, value)
    if origin in (list, Sequence, tuple) or tp in (list, tuple):
        fixed = origin is tuple and args and args[-1] is not Ellipsis  # tuple[X, Y]; not tuple[X, ...]
        if not isinstance(value, (list, tuple)) or (fixed and len(args) != len(value)):
            raise _fail(key, tp, value)
        item_types = args if fixed else [args[0] if args else Any] * len(value)
        items = [_convert(t, v, f"{key}[{i}]") for i, (t, v) in enumerate(zip(item_types, value))]
        return tuple(items) if tuple in (origin, tp) else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise _fail(key, tp, value)
        key_tp, val_tp = args or (Any, Any)
        out = {}
        for k, v in value.items():
            k = _convert(key_tp, k, f"{key} (key {k!r})")
            out[k] = _convert(val_tp, v, _join(key, str(k)))
        return out
    if tp in (int, float) and isinstance(value, bool):  # a bool is an int to Python, not to a config
        raise _fail(key, tp, value)
    if tp is float and isinstance(value, (int, float)):
        return float(value)
    if isinstance(tp, type) and issubclass(tp, Path) and isinstance(value, (str, os.PathLike)):
        return tp(value)
    if isinstance(tp, type):  # bool, int, float, str, Path, ...
        if isinstance(value, tp):
            return value
        raise _fail(key, tp, value)
    raise ConfigError(f"config key '{key or '<root>'}': unsupported annotation {tp!r}")


def _build_dataclass(cls: type[T], value: Any, key: str) -> T:
    if isinstance(value, cls):
        value = to_dict(value)
    if not isinstance(value, Mapping):
        raise _fail(key, cls, value)
    try:
        hints = typing.get_type_hints(cls)
    except Exception as e:  # noqa: BLE001 - unresolved forward references
        raise ConfigError(f"cannot resolve the annotations of {cls.__name__}: {e}") from e
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    value = _read_renamed(value, getattr(cls, "RENAMED_KEYS", None) or {}, key)
    unknown = [k for k in value if k not in fields]
    if unknown:
        bad = str(unknown[0])
        valid = sorted(fields)
        close = difflib.get_close_matches(bad, valid, n=1)
        hint = f" (did you mean '{_join(key, close[0])}'?)" if close else ""
        where = f"'{key}'" if key else "the top level"
        raise ConfigError(
            f"unknown config key '{_join(key, bad)}'{hint}; valid keys at {where}: "
            + ", ".join(valid)
        )
    kwargs = {}
    for name, f in fields.items():
        if name in value:
            given = value[name]
            if isinstance(given, Mapping) and f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
                if dataclasses.is_dataclass(default) and default != type(default)():
                    given = {**to_dict(default), **given}  # a section keeps its holder's own defaults
            kwargs[name] = _convert(hints.get(name, Any), given, _join(key, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required config key '{_join(key, name)}'")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"invalid config at '{key or cls.__name__}': {e}") from e


def _read_renamed(value: Mapping[str, Any], renamed: Mapping[str, tuple[str, str]], key: str) -> dict[str, Any]:
    """``value`` with each old key of a dataclass's ``RENAMED_KEYS`` (``{old: (new, why)}``) moved to
    its new name, with a FutureWarning naming both. The old key wins over a new one beside it: it
    only comes from the user (a YAML file, an override), the new one may come from a shipped config
    or a saved run."""
    out = dict(value)
    for old, (new, why) in renamed.items():
        if old not in out:
            continue
        v = out.pop(old)
        over = f" over {_join(key, new)}={short_repr(out[new])}" if new in out and out[new] != v else ""
        warnings.warn(f"config key '{_join(key, old)}' is now '{_join(key, new)}': {why}; "
                      f"read as {_join(key, new)}={short_repr(v)}{over}", FutureWarning, stacklevel=2)
        out[new] = v
    return out


def from_dict(cls: type[T], d: Mapping[str, Any], key: str = "") -> T:
    """Build dataclass ``cls`` from a plain (e.g. JSON) mapping with the same validation as YAML;
    ``key``: where the mapping sits in a larger config (``"model"``), named in errors."""
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
    return _build_dataclass(cls, d, key)


def to_dict(cfg: Any) -> Any:
    """Convert a config dataclass tree into JSON-serialisable builtins.

    Dataclasses become dicts, tuples become lists and paths become strings; ``from_dict``
    inverts this for any config whose fields are annotated.
    """
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, Mapping):
        return {str(k): to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, os.PathLike):
        return os.fspath(cfg)
    if cfg is None or isinstance(cfg, (bool, int, float, str)):
        return cfg
    raise TypeError(f"cannot serialise config value {cfg!r} of type {type(cfg).__name__}")


def save_json(cfg: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``to_dict(cfg)`` as indented JSON, atomically (temp file + fsync + rename)."""
    from multimae.core.io import save_bytes_atomic  # fsync + rename, the user's umask, disk-full named

    return save_bytes_atomic(path, (json.dumps(to_dict(cfg), indent=2, sort_keys=False) + "\n").encode())


def is_transfer_config(d: Mapping[str, Any]) -> bool:
    """Whether a run config dict is a fine-tuning / linear-probe one (``init`` at the top level,
    ``data.train_split`` or ``model.head``), not a pretraining one."""
    data, model = d.get("data"), d.get("model")
    return "init" in d or (isinstance(data, Mapping) and "train_split" in data) or \
        (isinstance(model, Mapping) and "head" in model)


def upgrade_saved_config(d: dict) -> dict:
    """A run config (pretraining or fine-tuning) saved by an earlier version, in the current schema
    (a copy; unknown keys stay unknown and are reported by ``from_dict``). ``train.attention``
    became ``model.attention``; a fine-tuning or probe run's ``data.split`` (its evaluated split)
    became ``data.eval_split`` (pretraining keeps ``data.split``, its training split)."""
    d = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}
    data = d.get("data")
    if isinstance(data, dict) and "split" in data and is_transfer_config(d):
        split = data.pop("split")
        data.setdefault("eval_split", split)
    train = d.get("train")
    if isinstance(train, dict) and "attention" in train:
        mode = train.pop("attention")
        model = d.setdefault("model", {})
        if isinstance(model, dict):
            model.setdefault("attention", mode)
    return d
