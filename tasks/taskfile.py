"""Task files: TOML (or a record's JSON dict) that mirrors the spec dataclasses one to one, read strictly."""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from pathlib import Path

from tasks.datasets import mismatch
from tasks.layers import LAYER_TYPES, SpecError
from tasks.optim import OPTIMIZERS, SCHEDULES
from tasks.spec import Stage, TaskSpec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


class TaskFileError(ValueError):
    """A task file that cannot be read as a TaskSpec; the message names the file, the layer and the field."""


def fits_type(value, hint) -> bool:
    """Whether a TOML/JSON value fits a dataclass field's annotation (lists stand for tuples)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(fits_type(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is tuple:
        return isinstance(value, (list, tuple)) and all(fits_type(v, args[0]) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True  # nested dataclasses are converted by their own reader


def _convert(value):
    return tuple(_convert(v) for v in value) if isinstance(value, list) else value


def _build(cls, table: dict, where: str, nested: dict | None = None, path: str | None = None):
    """cls(**table), refusing unknown fields and wrong types with a message that says `where`.

    nested: field -> reader for fields holding tables; they are located as `path.field`.
    """
    path = where if path is None else path
    if not isinstance(table, dict):
        raise TaskFileError(f"{where}: expected a table, got {table!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in table.items():
        if key == "kind":
            continue
        if key not in fields:
            raise TaskFileError(f"{where}: unknown field {key!r}; valid: {', '.join(fields)}")
        if nested and key in nested:
            kwargs[key] = nested[key](value, f"{path}.{key}" if path else key)
            continue
        if not fits_type(value, hints[key]):
            raise TaskFileError(f"{where}: field {key!r} must be {_describe(hints[key])}, got {value!r}")
        kwargs[key] = _convert(value)
    missing = [n for n, f in fields.items() if n not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise TaskFileError(f"{where}: missing field {missing[0]!r}")
    try:
        return cls(**kwargs)
    except SpecError as exc:
        # A layer's own message names it; `where` already does, with its place in the file.
        own = f"layer {kwargs['name']!r}: " if isinstance(kwargs.get("name"), str) else ""
        raise TaskFileError(f"{where}: {str(exc).removeprefix(own) if own else exc}") from None


def _describe(hint) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _kind_of(table, registry: dict, where: str):
    if not isinstance(table, dict) or "kind" not in table:
        raise TaskFileError(f"{where}: missing field 'kind'; valid: {', '.join(registry)}")
    try:
        return registry[table["kind"]]
    except (KeyError, TypeError):
        raise TaskFileError(f"{where}: unknown kind {table['kind']!r}; valid: {', '.join(registry)}") from None


def layer_from_dict(table: dict, where: str):
    cls = _kind_of(table, LAYER_TYPES, where)
    label = f"{where} ({table['name']!r})" if isinstance(table.get("name"), str) else where
    return _build(cls, table, f"layer {label}", nested={"body": _layers} if cls.kind == "residual" else None,
                  path=where)


def _layers(items, where: str) -> tuple:
    if not isinstance(items, (list, tuple)) or not items:
        raise TaskFileError(f"{where}: expected a non-empty list of layer tables")
    return tuple(layer_from_dict(t, f"{where}[{i}]") for i, t in enumerate(items))


def _schedule(table, where: str):
    return _build(_kind_of(table, SCHEDULES, where), table, where)


def _optimizer(table, where: str):
    if isinstance(table, dict) and "kind" not in table and table.get("name") in OPTIMIZERS:
        table = {**{k: v for k, v in table.items() if k != "name"}, "kind": table["name"]}  # records before v2
    return _build(_kind_of(table, OPTIMIZERS, where), table, where, nested={"schedule": _schedule})


def _stages(items, where: str) -> tuple:
    if not isinstance(items, (list, tuple)) or not items:
        raise TaskFileError(f"{where}: expected a non-empty list of stage tables")
    return tuple(_build(Stage, t, f"{where}[{i}]") for i, t in enumerate(items))


# Bounds on a task description from someone else, checked before it is read: a real task
# is a few KiB and nests a residual block or two.
MAX_TASK_FILE_BYTES = 1 << 20
MAX_DEPTH = 32


def nesting_depth(value) -> int:
    """How deep tables and lists nest in `value` (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, (list, tuple)) else None
        if children is None:
            continue
        depth += 1
        if depth > MAX_DEPTH:
            return depth
        deepest = max(deepest, depth)
        stack.extend((child, depth) for child in children)
    return deepest


def spec_from_dict(table: dict, where: str = "task") -> TaskSpec:
    """A TaskSpec from a dict shaped like TaskSpec.to_dict() (a record's or checkpoint's spec, or a TOML file)."""
    if not isinstance(table, dict):
        raise TaskFileError(f"{where}: expected a table, got a {type(table).__name__}")
    if nesting_depth(table) > MAX_DEPTH:
        raise TaskFileError(f"{where}: nested deeper than {MAX_DEPTH} tables and lists")
    table = {k: v for k, v in table.items() if k != "loss"}  # fixed, written out for readers only
    return _build(TaskSpec, table, where, nested={"layers": _layers, "optimizer": _optimizer, "stages": _stages})


def load_task_file(path: Path) -> TaskSpec:
    """The TaskSpec a TOML file describes, its input fitting its dataset (the dataset table's);
    TaskFileError("<file>: ...") on any problem."""
    from harness.confine import UntrustedInput, read_bytes

    path = Path(path)
    try:  # a regular file of bounded size: a FIFO or a huge file is refused before it is read
        text = read_bytes(path, limit=MAX_TASK_FILE_BYTES).decode("utf-8")
        table = tomllib.loads(text)
    except OSError as exc:
        raise TaskFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (UntrustedInput, UnicodeDecodeError) as exc:
        raise TaskFileError(f"{path}: {str(exc).removeprefix(f'{path} ')}") from None
    except tomllib.TOMLDecodeError as exc:
        raise TaskFileError(f"{path}: TOML syntax: {exc}") from None
    except RecursionError:  # tomllib parses nested arrays and inline tables recursively
        raise TaskFileError(f"{path}: nested deeper than {MAX_DEPTH} tables and lists") from None
    dataset, shape = table.get("dataset"), table.get("input_shape")
    # Before the spec is built: its own checks of the head against the labels follow from the dataset.
    why = mismatch(dataset, tuple(shape)) if isinstance(dataset, str) and isinstance(shape, list) else None
    if why:
        raise TaskFileError(f"{path}: field 'dataset': {why}")
    try:
        return spec_from_dict(table, where="")
    except TaskFileError as exc:
        raise TaskFileError(f"{path}: {str(exc).removeprefix(': ')}") from None
