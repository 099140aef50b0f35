"""Declared settings: one declaration (type, range, choices, default, help) for every run setting and every
method option, one checker, and the command-line flags generated from the declaration.

A setting is a dataclass field made by :func:`setting` (the run's :class:`~deltatune.training.TrainConfig`)
or by ``registry.option`` (a method's options): its annotation is its type (``int``, ``float | None``,
``bool | str``, ...), its metadata holds ``min``, ``max``, ``choices`` and ``help``. :func:`problem` checks a
value against a field; the caller words the error for its reader.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os

_TYPES = {"int": int, "float": float, "bool": bool, "str": str, "list": list, "dict": dict, "object": object}
_WHAT = {int: "a whole number", float: "a finite number", bool: "true or false", str: "a string", list: "a list",
         dict: "a mapping of options", object: "a value"}


def setting(default=dataclasses.MISSING, *, min=None, max=None, choices=None, help="", flag: bool = True,
            metavar: str | None = None, default_text: str | None = None, default_factory=dataclasses.MISSING):
    """A declared field: ``min``/``max`` bound numbers, ``choices`` lists the allowed values, ``help`` is the
    flag's help line (``default_text`` words its default where the value alone does not say it); ``flag=False``
    keeps it off the command line (API-only settings)."""
    meta = dict(min=min, max=max, choices=choices, help=help, flag=flag, metavar=metavar, default_text=default_text)
    if isinstance(default, (list, dict)):
        default_factory, default = (lambda d=default: type(d)(d)), dataclasses.MISSING
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


def types_of(f: dataclasses.Field) -> tuple[list[type], bool]:
    """(the Python types a field's annotation allows, whether None is allowed)."""
    text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", None) or str(f.type)
    names = [t.strip() for t in text.split("|")]
    return [_TYPES.get(n, object) for n in names if n != "None"], "None" in names


def is_type(value, want: type) -> bool:
    """``value`` is of ``want``: a bool is neither an int nor a float; an int is a float; floats are finite."""
    if want is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if want is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, want)


def bounds(f: dataclasses.Field, default_max=None):
    return f.metadata.get("min"), f.metadata.get("max") if f.metadata.get("max") is not None else default_max


def problem(value, f: dataclasses.Field, default_max=None) -> str | None:
    """What is wrong with ``value`` for field ``f`` ("type", "choices", "min", "max"), or None."""
    types, nullable = types_of(f)
    if value is None:
        return None if nullable else "type"
    choices = f.metadata.get("choices")
    if choices is not None:
        return None if any(value == c and type(value) is type(c) for c in choices) else "choices"
    if not any(is_type(value, t) for t in types):
        return "type"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        low, high = bounds(f, default_max)
        if low is not None and value < low:
            return "min"
        if high is not None and value > high:
            return "max"
    return None


def describe(f: dataclasses.Field, default_max=None) -> str:
    """The allowed values in words: 'a whole number in [1, 1024] or None', 'one of True, False, 'auto''."""
    types, nullable = types_of(f)
    choices = f.metadata.get("choices")
    if choices is not None:
        text = "one of " + ", ".join(map(repr, choices))
    else:
        text = " or ".join(_WHAT.get(t, t.__name__) for t in types)
        low, high = bounds(f, default_max)
        if low is not None and high is not None:
            text += f" in [{low}, {high}]"
    return text + (" or None" if nullable else "")


def check(obj) -> None:
    """Every declared field of the dataclass ``obj`` of its type, in its range and among its choices; a
    ConfigError naming the first that is not, its allowed values and the value given."""
    from .errors import ConfigError

    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if problem(value, f):
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise ConfigError(f"{f.name} must be {describe(f)}, got {shown}")


# ----------------------------------------------------------------------------- command-line flags

def on_off_auto(text: str):
    """A switch with an automatic setting: on -> True, off -> False, auto -> "auto"."""
    value = {"on": True, "off": False, "auto": "auto"}.get(text.strip().lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected on, off or auto, got {text!r}")
    return value


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def flag_fields(cls, skip=()) -> list[dataclasses.Field]:
    """The fields of ``cls`` that have a command-line flag."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("flag", False) and f.name not in skip]


def _default_text(f: dataclasses.Field) -> str:
    default = f.default if f.default is not dataclasses.MISSING else None
    if f.metadata.get("default_text"):
        return f.metadata["default_text"]
    return {True: "on", False: "off"}.get(default, default) if isinstance(default, bool) else str(default)


def add_flags(parser, cls, skip=()) -> None:
    """One flag per declared field of ``cls`` (``--max-steps`` for ``max_steps``), its help ending with its
    real default. Flags default to None: a flag not given leaves the engine's default in place."""
    for f in flag_fields(cls, skip):
        types, _ = types_of(f)
        help_text = f.metadata.get("help") or f.name.replace("_", " ")
        default = f.default if f.default is not dataclasses.MISSING else None
        choices = f.metadata.get("choices")
        if choices is not None and "auto" in choices:  # on | off | auto
            parser.add_argument(flag_of(f.name), nargs="?", const=True, type=on_off_auto, metavar="on|off|auto",
                                help=f"{help_text} (default: {_default_text(f)})")
        elif types == [bool]:
            parser.add_argument(flag_of(f.name), action="store_true", default=None,
                                help=help_text + (" (default: on)" if default else ""))
        else:
            kind = next((t for t in types if t in (int, float, str)), str)
            shown = _default_text(f) if f.metadata.get("default_text") or default is not None else "none"
            metavar = f.metadata.get("metavar") or {int: "N", float: "X", str: "NAME"}[kind]
            parser.add_argument(flag_of(f.name), type=kind, metavar=metavar, help=f"{help_text} (default: {shown})")


def values_from(args, cls, skip=()) -> dict:
    """The declared fields given on the command line (flags left out keep the declaration's default)."""
    return {f.name: getattr(args, f.name) for f in flag_fields(cls, skip) if getattr(args, f.name, None) is not None}


def argv_of(values: dict, cls) -> list[str]:
    """The flags that give ``values`` (e.g. to pass a parent's settings on to a child process)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = []
    for name, value in values.items():
        if value is None:
            continue
        if fields[name].metadata.get("choices") is not None and "auto" in fields[name].metadata["choices"]:
            out += [flag_of(name), {True: "on", False: "off"}.get(value, "auto")]
        elif value is True:
            out.append(flag_of(name))
        elif value is not False:
            out += [flag_of(name), str(value)]
    return out


def env_limit(env: str, default: float, error: type[Exception], unit: str = "megabytes", kind=float,
              reading: str = "") -> float:
    """A positive limit from the environment variable ``env`` (``default`` where it is unset or blank; ``inf``
    lifts it). Anything else is refused with ``error``, naming the variable, its value and what it must be."""
    text = os.environ.get(env, "").strip()
    if not text:
        return default
    try:
        value = kind(text)
    except ValueError:
        value = -1
    if not value > 0:
        where = f" (reading {reading})" if reading else ""
        raise error(f"{env}={text!r} must be a positive {'size in ' if kind is float else 'whole number of '}"
                    f"{unit}{where}")
    return value


NO_LIMIT = 2**62  # bytes: more than any file this machine holds


def env_bytes(env: str, default_mb: float, error: type[Exception], reading: str = "") -> tuple[int, float]:
    """(bytes, megabytes) of a size limit in megabytes from ``env`` (see :func:`env_limit`); a limit at or beyond
    :data:`NO_LIMIT` bytes (``inf``, ``1e308``) is none."""
    mb = env_limit(env, default_mb, error, reading=reading)
    size = mb * 2**20
    return (int(size) if size < NO_LIMIT else NO_LIMIT), mb
