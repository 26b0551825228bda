"""Settings from layers, for the config dataclasses: a preset, then a TOML file, then command-line
flags.

Every field of a dataclass becomes a flag of the same name (`micro_batch_size` ->
`--micro-batch-size`), typed by the field's annotation (`flag_kwargs`) and explained by the comment
the field carries in its source (`field_comments`): the dataclass stays the one place a setting is
written down. `read_toml` reads the file layer and refuses keys that no field has."""

from __future__ import annotations

import argparse
import inspect
import io
import re
import tokenize
import types
import typing
from pathlib import Path

from mlm.errors import ConfigError

try:
    import tomllib
# Python 3.10: the same parser, published before 3.11 took it in as tomli
except ModuleNotFoundError:
    import tomli as tomllib


def flag_kwargs(hint) -> dict:
    """argparse settings for a field's type: `X | None` is an X; lists take one or more values,
    tuples a fixed count; `int | str` a number or a word (auto, epoch); booleans also take
    --no-NAME."""
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
        return dict(nargs="+" if parts[-1] is Ellipsis else len(parts), type=parts[0])
    return dict(type=hint)


def field_comments(cls: type) -> dict[str, str]:
    """Each field's comment in a dataclass's source: the one at the end of its line, else the
    comment lines right above it. Only the class body's own lines are read, so a field without a
    comment has none."""
    lines = inspect.getsource(cls).splitlines()
    comments: dict[int, str] = {}  # line number (from 1) -> comment text
    for tok in tokenize.generate_tokens(io.StringIO("\n".join(lines) + "\n").readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    out, above = {}, []
    for number, line in enumerate(lines, start=1):
        field = re.match(r"\s+(\w+)\s*:", line)
        if line.strip().startswith("#"):
            above.append(comments.get(number, ""))
            continue
        if field and not line.strip().startswith(("def ", "@")):
            text = comments.get(number) or " ".join(above)
            if text:
                out.setdefault(field.group(1), text)
        above = []
    return out


def read_toml(path: str, fields: set[str], where: str) -> tuple[dict, dict]:
    """The settings in a TOML file: (top-level fields, the [model] table). A key that is neither is
    an error naming `where` the fields are documented."""
    try:
        loaded = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read --config {path}: {e}") from None
    unknown = set(loaded) - fields - {"model"}
    if unknown:
        raise ConfigError(f"unknown setting {sorted(unknown)[0]!r} in {path}; see {where}")
    return {k: v for k, v in loaded.items() if k != "model"}, dict(loaded.get("model", {}))
