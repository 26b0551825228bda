"""Settings from layers, for train.py's dataclasses: a preset, then a TOML file, then command-line flags.

Every field of a dataclass becomes a flag of the same name (`micro_batch_size` -> `--micro-batch-size`),
typed by the field's annotation: `flag_kwargs` turns a type into argparse settings. `read_toml` reads the
file layer and refuses keys that no field has.
"""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path

from mlm.errors import ConfigError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, published before 3.11 took it in as tomli
    import tomli as tomllib


def flag_kwargs(hint) -> dict:
    """argparse settings for a field's type: `X | None` is an X; lists take one or more values, tuples a fixed
    count; `int | str` a number or a word (auto, epoch); booleans also take --no-NAME."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if set(typing.get_args(hint)) == {int, str}:
            return dict(type=lambda value: int(value) if value.lstrip("-").isdigit() else value)
        hint = next(t for t in typing.get_args(hint) if t is not type(None))
    origin, parts = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        return dict(action=argparse.BooleanOptionalAction)
    if origin is list:
        return dict(nargs="+", type=parts[0])
    if origin is tuple:
        return dict(nargs=len(parts), type=parts[0])
    return dict(type=hint)


def read_toml(path: str, fields: set[str], where: str) -> tuple[dict, dict]:
    """The settings in a TOML file: (top-level fields, the [model] table). A key that is neither is an error
    naming `where` the fields are documented."""
    try:
        loaded = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read --config {path}: {e}") from None
    unknown = set(loaded) - fields - {"model"}
    if unknown:
        raise ConfigError(f"unknown setting {sorted(unknown)[0]!r} in {path}; see {where}")
    return {k: v for k, v in loaded.items() if k != "model"}, dict(loaded.get("model", {}))
