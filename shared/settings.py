"""Typed settings from TOML, environment and `--set` overrides, with errors that name the key.

A settings schema is a tree of frozen dataclasses: each field is a section (another dataclass)
or a leaf of type bool, int, float, str, Path, or a `Literal[...]` of strings. Values are merged
in this order, later winning: dataclass defaults, the TOML file, environment variables
`{PREFIX}_{SECTION}_{KEY}` (upper case), then `section.key=value` overrides from the command line.
Every key therefore has a file, environment and CLI spelling. Unknown keys and wrong types raise
`ConfigError(key, problem)` naming the dotted key; `__post_init__` of a section may add its own
checks by raising ConfigError too. Whatever the source, an integer fits in 64 bits, a number is
finite (no nan or inf), and text holds no NUL character; ranges are the sections' business.

Pure: the caller passes the file text and the environment mapping in. `read_text` and
`writable_dir` are the filesystem side every command shares: files and directories named on a
command line, checked before any work starts, with errors that name the flag.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from fleetlearn.shared.errors import ConfigError

T = TypeVar("T")
INT_LIMIT = 2**63  # integers beyond 64 bits are nobody's setting (TOML allows any size)


def writable_dir(path: Path, key: str) -> Path:
    """`path`, created if missing, as a directory this process can write to; else ConfigError."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(key, f"{path} exists and is not a directory") from None
    except OSError as exc:
        raise ConfigError(key, f"cannot create {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ConfigError(key, f"cannot use {path!r}: {exc}") from None
    if not path.is_dir():
        raise ConfigError(key, f"{path} is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(key, f"{path} is not writable")
    return path


def read_text(path: Path, key: str) -> str:
    """The text of a settings file; ConfigError naming `key` when it cannot be read as UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(key, f"{path} is not UTF-8 text (byte {exc.start})") from None
    except ValueError as exc:  # e.g. a path with a NUL character
        raise ConfigError(key, f"cannot read {path!r}: {exc}") from None


def _leaf(hint: Any, key: str, value: Any, from_text: bool) -> Any:
    """Coerce one value to the field's type. `from_text` for env/CLI strings."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            choices = ", ".join(repr(a) for a in allowed)
            raise ConfigError(key, f"must be one of {choices}, got {value!r}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if (
            from_text
            and isinstance(value, str)
            and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off")
        ):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(key, f"must be true or false, got {value!r}")
    if hint is int:
        if from_text and isinstance(value, str):
            try:
                value = int(value.replace("_", ""))
            except ValueError:
                raise ConfigError(key, f"must be an integer, got {value!r}") from None
        if type(value) is not int:
            raise ConfigError(key, f"must be an integer, got {value!r}")
        if not -INT_LIMIT <= value < INT_LIMIT:
            raise ConfigError(key, f"{value:.3g} is out of range for any setting")
        return value
    if hint is float:
        if from_text and isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(key, f"must be a number, got {value!r}") from None
        if type(value) not in (int, float):
            raise ConfigError(key, f"must be a number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:  # an integer too large for a float
            raise ConfigError(key, f"{value:.3g} is out of range for any setting") from None
        if not math.isfinite(number):
            raise ConfigError(key, f"must be a finite number, got {value!r}")
        return number
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"must be a string, got {value!r}")
        if "\x00" in value:
            raise ConfigError(key, "must not contain a NUL character")
        return value
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(key, f"must be a path, got {value!r}")
        if "\x00" in value:
            raise ConfigError(key, "must not contain a NUL character")
        return Path(value)
    raise TypeError(f"{key}: unsupported settings type {hint!r}")


def _is_section(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def _build(cls: type[T], layers: list[tuple[Mapping[str, Any], bool]], prefix: str) -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for layer, _ in layers:
        for key in layer:
            if key not in names:
                where = f"{prefix}{key}"
                raise ConfigError(where, f"unknown setting (known: {', '.join(sorted(names))})")
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        key = f"{prefix}{f.name}"
        hint = hints[f.name]
        if _is_section(hint):
            sub_layers = []
            for layer, from_text in layers:
                if f.name in layer:
                    sub = layer[f.name]
                    if not isinstance(sub, Mapping):
                        raise ConfigError(key, "must be a table of settings")
                    sub_layers.append((sub, from_text))
            kwargs[f.name] = _build(hint, sub_layers, f"{key}.")
            continue
        for layer, from_text in layers:
            if f.name in layer:
                value = layer[f.name]
                if isinstance(value, Mapping):
                    raise ConfigError(key, "is a single value, not a table")
                kwargs[f.name] = _leaf(hint, key, value, from_text)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(prefix.rstrip(".") or "config", str(exc)) from None


def _nest(flat: Mapping[str, str], what: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dotted, value in flat.items():
        parts = dotted.split(".")
        if any(not p for p in parts):
            raise ConfigError(dotted, f"is not a valid key ({what})")
        node = out
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(dotted, f"conflicts with another {what} value")
            node = nxt
        node[parts[-1]] = value
    return out


def env_overrides(cls: type, env: Mapping[str, str], prefix: str) -> dict[str, str]:
    """`{PREFIX}_{SECTION}_{KEY}` variables that name a field of the schema, as dotted keys."""
    found: dict[str, str] = {}

    def walk(section: type, path: list[str]) -> None:
        hints = typing.get_type_hints(section)
        for f in dataclasses.fields(section):
            hint = hints[f.name]
            if _is_section(hint):
                walk(hint, [*path, f.name])
                continue
            var = "_".join([prefix, *path, f.name]).upper()
            if var in env:
                found[".".join([*path, f.name])] = env[var]

    walk(cls, [])
    return found


def parse_sets(items: Sequence[str]) -> dict[str, str]:
    """`["rounds.cohort=20", ...]` from repeated `--set` flags."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(item, "--set takes section.key=value")
        out[key.strip()] = value.strip()
    return out


def load(
    cls: type[T],
    *,
    toml_text: str | None = None,
    source: str = "config",
    env: Mapping[str, str] | None = None,
    env_prefix: str = "FLEETLEARN",
    sets: Mapping[str, str] | None = None,
) -> T:
    """Build `cls` from defaults < TOML < environment < `--set` overrides."""
    layers: list[tuple[Mapping[str, Any], bool]] = []
    if toml_text is not None:
        try:
            layers.append((tomllib.loads(toml_text), False))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(source, f"is not valid TOML: {exc}") from None
    if env:
        layers.append((_nest(env_overrides(cls, env, env_prefix), "environment"), True))
    if sets:
        layers.append((_nest(sets, "--set"), True))
    return _build(cls, layers, "")


def to_toml(obj: Any) -> str:
    """Render a settings tree as TOML (for `--print-config` and docs)."""
    scalars, sections = [], []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            sections.append((f.name, value))
        else:
            scalars.append((f.name, value))
    lines = [f"{k} = {_toml_value(v)}" for k, v in scalars]

    def emit(name: str, section: Any) -> None:
        inner_scalars = []
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if dataclasses.is_dataclass(value):
                emit(f"{name}.{f.name}", value)
            else:
                inner_scalars.append(f"{f.name} = {_toml_value(value)}")
        lines.extend(["", f"[{name}]", *inner_scalars])

    for name, section in sections:
        emit(name, section)
    return "\n".join(lines).lstrip() + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'
