"""Typed run configuration: nested dataclasses, recipe files (TOML or JSON) and `key.sub=value` overrides.

The loader is generic: `load_config(SomeConfig, "recipes/x.toml", ["optim.lr=1e-5", "stages.1.epochs=2"])` builds any
dataclass tree from a recipe file plus overrides, checking every value against the field's type annotation (bool, int,
float, str, `X | None`, `list[X]`, `tuple[X, ...]`, `dict[str, X]`, `Literal[...]`, nested dataclasses, `str | Table`
for a value written as a string or as a table). Each field carries a docstring
(the string literal under it, torchtitan's convention; `field_docs` reads them) and each class checks its values in
`__post_init__`. Every problem is a `ConfigError` naming the file and the dotted key, e.g.
`recipes/sft.toml: optim.lr: expected a number, got string 'fast'`.

Overrides: `a.b=value`; list items by index (`stages.1.min_tokens=6000`, or `stages[1].min_tokens=6000`). The value is
read as a TOML value when it parses as one (`1e-5`, `true`, `[1, 2]`, `"text"`), else kept as a bare string
(`model.path=/ckpt/qwen`); `none` or `null` clears an optional field. Relative paths are taken from the working
directory.

Renamed keys: a config class may list `RENAMED = {"old_key": "new.dotted.key"}` (a ClassVar); a recipe or override
that still uses an old key fails with `rollout.engine: renamed to engine.kind`, not with a bare "unknown key".
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import math
import os
import re
import sys
import textwrap
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from vibeperf.errors import UserError
from vibeperf.packaged import list_recipes, rebase_shipped_paths, resolve_recipe

T = TypeVar("T")


def _toml():
    """The TOML parser: tomllib (Python >= 3.11), else the tomli package."""
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib
    try:
        import tomli
    except ImportError as e:
        raise ConfigError("TOML recipes and override values need Python >= 3.11 or the tomli package "
                          f"(pip install tomli), or use a .json recipe: {e}") from None
    return tomli


class ConfigError(UserError, ValueError):
    """A bad recipe file, override or value; the message names the file and the dotted key."""


def check(ok: bool, key: str, problem: str) -> None:
    """Raise `ConfigError("key: problem")` unless `ok` (for `__post_init__`; the loader prefixes the key path)."""
    if not ok:
        raise ConfigError(f"{key}: {problem}")


def _type_name(value: Any) -> str:
    names = {bool: "bool", int: "integer", float: "number", str: "string", list: "list", dict: "table"}
    return names.get(type(value), type(value).__name__)


def _describe(value: Any) -> str:
    return f"{_type_name(value)} {value!r}" if isinstance(value, (str, int, float)) else _type_name(value)


def _optional_inner(tp: Any) -> Any | None:
    """X for `X | None` (or Optional[X]); None for anything else."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return None


def _arm_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """`value` checked against (and shaped into) the annotation `tp`; ConfigError naming `key` otherwise."""
    inner = _optional_inner(tp)
    if inner is not None:
        if value is None or (inner is not str and isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _convert(value, inner, key)
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {_describe(value)}")
        return _build(tp, value, key)
    if origin in (typing.Union, types.UnionType):  # `str | SomeTable`: a string, or a table of the dataclass
        arms = typing.get_args(tp)
        if not any(dataclasses.is_dataclass(a) for a in arms):  # e.g. `bool | Literal["auto"]`: the first arm that fits
            for arm in arms:
                try:
                    return _convert(value, arm, key)
                except ConfigError:
                    continue
            raise ConfigError(f"{key}: expected {' or '.join(_arm_name(a) for a in arms)}, got {_describe(value)}")
        if str in arms and isinstance(value, str):
            return value
        table = next((a for a in arms if dataclasses.is_dataclass(a)), None)
        if table is not None and isinstance(value, dict):
            return _build(table, value, key)
        raise ConfigError(f"{key}: expected a string or a table, got {_describe(value)}")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {_describe(value)}")
        key_tp, value_tp = typing.get_args(tp)
        return {_convert(k, key_tp, key): _convert(v, value_tp, f"{key}.{k}") for k, v in value.items()}
    if origin is Literal:
        if value not in typing.get_args(tp):
            allowed = ", ".join(repr(a) for a in typing.get_args(tp))
            raise ConfigError(f"{key}: expected one of {allowed}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {_describe(value)}")
        item = typing.get_args(tp)[0] if typing.get_args(tp) else Any
        items = [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {_describe(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {_describe(value)}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {_describe(value)}")
        return value
    raise TypeError(f"{key}: unsupported annotation {tp!r} in a config class")


def _hints(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _build(cls: type[T], data: dict, key: str) -> T:
    hints = _hints(cls)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        where = f"{key}.{unknown[0]}" if key else unknown[0]
        raise ConfigError(f"{where}: {_unknown(cls, unknown[0])}")
    kwargs = {}
    for name, tp in hints.items():
        sub = f"{key}.{name}" if key else name
        if name in data:
            kwargs[name] = _convert(data[name], tp, sub)
        elif _is_required(cls, name):
            raise ConfigError(f"{sub}: missing")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{key}.{e}" if key else str(e)) from None


def _unknown(cls: type, name: str) -> str:
    """Why `name` is not a key of `cls`: renamed (where to), or unknown (the valid keys)."""
    renamed = getattr(cls, "RENAMED", {})
    if name in renamed:
        return f"renamed to {renamed[name]} (update the recipe or override)"
    return f"unknown key (valid keys here: {', '.join(_hints(cls))})"


def _is_required(cls: type, name: str) -> bool:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def config_from_dict(cls: type[T], data: dict, *, source: str = "config") -> T:
    """Build `cls` from a plain nested dict (a parsed recipe); ConfigError prefixed with `source` on any problem."""
    try:
        return _build(cls, data, "")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def read_config_file(path: str | os.PathLike) -> dict:
    """The nested dict of a `.toml` or `.json` recipe; ConfigError naming the file on a syntax error."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such recipe file")
    try:
        if path.suffix == ".toml":
            return _toml().loads(path.read_text(encoding="utf-8"))
        if path.suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ConfigError(f"{path}: expected a JSON object at the top level, got {_type_name(data)}")
            return data
    except (ValueError, json.JSONDecodeError) as e:  # TOMLDecodeError is a ValueError
        raise ConfigError(f"{path}: invalid {path.suffix[1:].upper()}: {e}") from None
    raise ConfigError(f"{path}: a recipe must be a .toml or .json file")


def parse_override_value(text: str) -> Any:
    """A TOML value when `text` parses as one (`3`, `1e-5`, `true`, `[1, 2]`, `"a"`), else `text` itself."""
    toml = _toml()
    try:
        return toml.loads(f"v = {text}")["v"]
    except toml.TOMLDecodeError:
        return text


def _split_key(key: str) -> list[str]:
    parts = re.sub(r"\[(\d+)\]", r".\1", key.strip()).split(".")
    if not key.strip() or any(not p for p in parts):
        raise ConfigError(f"bad key {key!r}: expected dotted names like optim.lr or stages.1.epochs")
    return parts


def apply_overrides(cls: type, data: dict, overrides: Sequence[str]) -> dict:
    """A copy of `data` with each `key.sub=value` of `overrides` set; keys are checked against the fields of `cls`."""
    data = json.loads(json.dumps(data))
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. optim.lr=1e-5")
        parts = _split_key(key)
        node, tp, done = data, cls, []
        for i, part in enumerate(parts):
            tp = _optional_inner(tp) or tp
            last = i == len(parts) - 1
            here = ".".join(done + [part])
            if dataclasses.is_dataclass(tp):
                if not isinstance(node, dict):
                    raise ConfigError(f"override {item!r}: {'.'.join(done)} is not a table in the recipe")
                hints = _hints(tp)
                if part not in hints:
                    raise ConfigError(f"override {item!r}: {here}: {_unknown(tp, part)}")
                tp = hints[part]
                if last:
                    node[part] = parse_override_value(text)
                else:
                    child = node.get(part)
                    if child is None:
                        child = node[part] = [] if typing.get_origin(_optional_inner(tp) or tp) is list else {}
                    node = child
            elif typing.get_origin(tp) in (list, tuple):
                if not part.isdigit() or not isinstance(node, list) or int(part) >= len(node):
                    size = len(node) if isinstance(node, list) else 0
                    raise ConfigError(f"override {item!r}: {here}: no item {part} (the list has {size})")
                tp = typing.get_args(tp)[0]
                if last:
                    node[int(part)] = parse_override_value(text)
                else:
                    node = node[int(part)]
            else:
                raise ConfigError(f"override {item!r}: {'.'.join(done)} is a value, it has no key {part!r}")
            done.append(part)
    return data


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> T:
    """Build `cls` from the recipe at `path` (None: the class defaults) plus `key=value` overrides."""
    data = rebase_shipped_paths(Path(path), read_config_file(path)) if path is not None else {}
    source = os.fspath(path) if path is not None else "defaults"
    if overrides:
        try:
            data = apply_overrides(cls, data, overrides)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        source += f" (with {len(overrides)} override{'s' if len(overrides) > 1 else ''})"
    return config_from_dict(cls, data, source=source)


def config_to_dict(cfg: Any) -> dict:
    """The plain nested dict of a config (tuples as lists), ready for JSON and `config_from_dict`."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of the dataclass `cls` (empty string where a field has none)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for stmt, nxt in zip(body, body[1:] + [None]):
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            doc = ""
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                doc = " ".join(nxt.value.value.split())
            docs[stmt.target.id] = doc
    return {f.name: docs.get(f.name, "") for f in dataclasses.fields(cls)}


def describe_config(cls: type, prefix: str = "", defaults: Any = None) -> list[str]:
    """One line per leaf key of `cls`: `key: type = default  doc` (list items shown as `key.N.sub`). A section built
    by a default factory shows that instance's values (`defaults`), not its class defaults."""
    lines = []
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        inner = _optional_inner(tp) or tp
        key = f"{prefix}{f.name}"
        item = typing.get_args(inner)[0] if typing.get_origin(inner) is list else None
        table = next((a for a in typing.get_args(item) if dataclasses.is_dataclass(a)), None) if item else None
        if dataclasses.is_dataclass(inner):
            sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
            lines += describe_config(inner, key + ".", sub)
        elif item is not None and dataclasses.is_dataclass(item):
            lines.append(f"{key}: list of tables  {docs[f.name]}")
            lines += describe_config(item, key + ".N.")
        elif table is not None:
            lines.append(f"{key}: list of strings or tables  {docs[f.name]}")
            lines += describe_config(table, key + ".N.")
        else:
            default = f.default if f.default is not dataclasses.MISSING else "(required)"
            if defaults is not None:
                default = getattr(defaults, f.name)
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            if typing.get_origin(tp) is Literal:
                shown = "|".join(map(str, typing.get_args(tp)))
            else:
                shown = tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")
            lines.append(f"{key}: {shown} = {default!r}  {docs[f.name]}")
    return lines


def run_recipe_command(cls: type[T], args: argparse.Namespace, run: Callable[[T], int], name: str) -> int:
    """The body of a recipe subcommand: `--describe`, `--print-config`, or load the recipe and `run` it."""
    if args.describe:
        print("\n".join(describe_config(cls)))
        return 0
    if getattr(args, "recipe_list", False):
        print("\n".join(f"{path}\n    {summary}" for path, summary in list_recipes(name)))
        return 0
    if args.recipe is None:
        raise SystemExit(f"vibeperf {name}: a recipe file is needed (e.g. recipes/{name}_tiny.toml; --recipe-list)")
    cfg = load_config(cls, resolve_recipe(args.recipe), args.overrides)
    if args.print_config:
        print(json.dumps(config_to_dict(cfg), indent=1))
        return 0
    return run(cfg)
