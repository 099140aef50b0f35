"""The search space of a sweep: which run settings and method options vary, and over what.

A dimension is one declared field, a :class:`~deltatune.training.TrainConfig` setting (``lr``) or an option of
the method (``options.r``), with the type, range and choices of its declaration (``settings.setting`` /
``registry.option``). It is written as text, typed by that declaration:

- ``4,8,16`` or ``4|8|16``: these values (a list-valued field takes ``|`` between its lists:
  ``attn.q,attn.v|attn.q,attn.k,attn.v,attn.o``); a single value is not searched, it is fixed;
- ``1e-4..1e-2``: a range, ``log:1e-5..1e-2`` a log-uniform one (both ends above zero); an int field's
  range holds whole numbers; ``:N`` after a range (``log:1e-5..1e-2:4``) gives the grid its number of points.

Everything is checked before the first trial: an unknown setting or option, a value of the wrong type or
outside the declared range, an empty range and a log range through zero are one-line errors naming the
dimension as it was given.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
from dataclasses import dataclass

from .. import settings
from ..errors import ConfigError

# TrainConfig fields a sweep sets itself (per trial) or that would make trials something else than runs.
RESERVED = {"seed": "the seeds are --seeds (every trial runs each of them)",
            "out_dir": "each trial's folder is chosen by the sweep (under --storage)",
            "resume": "a sweep resumes its unfinished trials itself", "overwrite": "a sweep never replaces a trial",
            "stop_after": "trials run to their end", "score_test": "trials never score the test split",
            "progress": "trials show no progress bars", "json_log": "a trial's validation curve is read from its log",
            "model": "a sweep searches one model: run one sweep per model",
            "task": "a sweep searches one task: run one sweep per task",
            "method": "a sweep searches one method: run one sweep per method (its options are searchable)"}
GRID_POINTS = 4  # points of a range on a grid, where the range does not say (:N)
MAX_POINTS = 10_000  # the most a range's own :N may ask for (as --grid-points)
_TRUE, _FALSE = ("true", "yes", "on"), ("false", "no", "off")
_RANGE = re.compile(r"^(?P<low>[^:]+?)\.\.(?P<high>[^:]+?)(?::(?P<points>\d+))?$")


@dataclass(frozen=True)
class Dimension:
    """One searched field. ``path``: ("lr",) for a run setting, ("options", "r") for a method option;
    ``values``: the choices (kind "choice"); ``low``/``high``/``log``/``integer``/``points``: a range."""

    path: tuple
    kind: str  # "choice" | "range"
    values: tuple = ()
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    points: int | None = None

    @property
    def name(self) -> str:
        """The name shown in tables: ``lr``, ``r`` (a method option by its own name)."""
        return self.path[-1]

    @property
    def key(self) -> str:
        """Unambiguous: ``lr`` for a run setting, ``options.r`` for a method option."""
        return ".".join(self.path)

    @property
    def numeric(self) -> bool:
        """Ordered numbers (a range, or choices that are all numbers): plotted on an axis, extended on a grid."""
        return self.kind == "range" or all(_is_number(v) for v in self.values)

    def grid(self, points: int | None = None) -> list:
        """The grid's values: the choices, or ``points`` (else the range's own :N, else 4) points of the range,
        evenly spaced (on a log scale for a log range); an int range's points are rounded and distinct."""
        if self.kind == "choice":
            return list(self.values)
        n = self.points or points or GRID_POINTS
        if self.log:
            raw = [math.exp(math.log(self.low) + (math.log(self.high) - math.log(self.low)) * i / (n - 1)) for i in range(n)]
        else:
            raw = [self.low + (self.high - self.low) * i / (n - 1) for i in range(n)]
        raw[0], raw[-1] = self.low, self.high  # the ends exactly as given
        if self.integer:
            return sorted({int(round(x)) for x in raw})
        return [float(f"{x:.6g}") for x in raw]  # 1e-05, 0.0001, ... rather than 9.999999999999999e-05

    def sample(self, rng) -> object:
        """A value drawn with ``rng`` (random.Random): a uniform choice, or uniform (log-uniform) in the range."""
        if self.kind == "choice":
            return self.values[rng.randrange(len(self.values))]
        if self.integer:
            if self.log:
                value = math.exp(rng.uniform(math.log(self.low - 0.5), math.log(self.high + 0.5)))
                return min(int(self.high), max(int(self.low), int(round(value))))
            return rng.randint(int(self.low), int(self.high))
        if self.log:
            return math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        return rng.uniform(self.low, self.high)

    def size(self) -> float:
        """How many distinct values it holds (inf for a real range)."""
        if self.kind == "choice":
            return len(self.values)
        return int(self.high) - int(self.low) + 1 if self.integer else math.inf

    def to_json(self) -> dict:
        out = {"path": list(self.path), "kind": self.kind}
        if self.kind == "choice":
            out["values"] = list(self.values)
        else:
            out.update(low=self.low, high=self.high, log=self.log, integer=self.integer, points=self.points)
        return out

    @classmethod
    def from_json(cls, data: dict) -> Dimension:
        values = tuple(tuple(v) if isinstance(v, list) else v for v in data.get("values", ()))
        return cls(tuple(data["path"]), data["kind"], values, data.get("low"), data.get("high"),
                   data.get("log", False), data.get("integer", False), data.get("points"))

    def describe(self) -> str:
        """As a user would write it: ``log:1e-05..0.01``, ``4,8,16``."""
        if self.kind == "choice":
            return ("|" if any(isinstance(v, (list, tuple)) for v in self.values) else ",").join(
                show(v) for v in self.values)
        text = f"{'log:' if self.log else ''}{show(self.low)}..{show(self.high)}"
        return text + (f":{self.points}" if self.points else "")


def show(value) -> str:
    """A value as a cell: 0.001 -> 0.001, 1.2345678e-4 -> 0.000123457, [a, b] -> a,b, None -> none."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return ",".join(show(v) for v in value)
    return str(value)


def params_text(params: dict) -> str:
    """``lr=0.001, r=8``: a point as the log shows it."""
    return ", ".join(f"{k.split('.')[-1]}={show(v)}" for k, v in params.items()) or "(no searched settings)"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ----------------------------------------------------------------------------- the declarations

def train_fields() -> dict[str, dataclasses.Field]:
    from ..training.config import TrainConfig

    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def option_fields(method: str) -> dict[str, dataclasses.Field]:
    from ..registry import REGISTRY

    if method not in REGISTRY:
        raise ConfigError(f"unknown method {method!r}; registered methods: {', '.join(sorted(REGISTRY))}")
    return {f.name: f for f in dataclasses.fields(REGISTRY[method])}


def field_of(path: tuple, method: str) -> dataclasses.Field:
    """The declaration of a run setting (``("lr",)``) or a method option (``("options", "r")``)."""
    if len(path) == 2 and path[0] == "options":
        fields = option_fields(method)
        if path[1] not in fields:
            raise ConfigError(f"method {method!r} has no option {path[1]!r}; its options: {', '.join(fields)} "
                              "(run settings such as lr are flags of their own: --lr)")
        return fields[path[1]]
    fields = train_fields()
    if len(path) != 1 or path[0] not in fields or path[0] == "options":
        raise ConfigError(f"no run setting {'.'.join(path)!r}; the settings of a run are TrainConfig's: "
                          f"{', '.join(n for n in fields if n not in RESERVED and n != 'options')}; a method option "
                          "is --set NAME=VALUES")
    if path[0] in RESERVED:
        raise ConfigError(f"{path[0]} cannot be set for a sweep's trials: {RESERVED[path[0]]}")
    return fields[path[0]]


def default_max(f: dataclasses.Field, path: tuple):
    """The bound registry._check_value puts on a method option's number without a declared max."""
    if path[0] != "options" or f.metadata.get("max") is not None:
        return None
    from ..registry import MAX_SIZE

    types, _ = settings.types_of(f)
    return MAX_SIZE if int in types and float not in types else 1e6 if float in types else None


# ----------------------------------------------------------------------------- parsing

def parse_value(text: str, f: dataclasses.Field, label: str):
    """One value of field ``f`` from text, typed by the declaration: ``none`` for a field that allows None, a
    declared choice by its name (``on``/``off``/``auto``), then the annotation's types in order."""
    types, nullable = settings.types_of(f)
    raw, low = text.strip(), text.strip().lower()
    if nullable and low in ("none", "null"):
        return None
    choices = f.metadata.get("choices")
    if choices is not None:
        for choice in choices:
            if (choice is True and low in _TRUE) or (choice is False and low in _FALSE) or \
                    (not isinstance(choice, bool) and str(choice).lower() == low):
                return choice
        raise ConfigError(f"{label}: {raw!r} is not one of {', '.join(show(c) for c in choices)}")
    for kind in types:
        if kind is bool and low in _TRUE + _FALSE:
            return low in _TRUE
        if kind is int and re.fullmatch(r"[+-]?\d+", raw):
            return int(raw)
        if kind is float:
            try:
                value = float(raw)
            except ValueError:
                continue
            if math.isfinite(value):
                return value
        if kind is list:
            from ..names import number_or_text

            return [number_or_text(part.strip()) for part in raw.split(",") if part.strip()]
        if kind is dict:
            try:
                value = json.loads(raw)
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
        if kind in (str, object):
            return raw
    raise ConfigError(f"{label}: {raw!r} is not {settings.describe(f)}")


def parse(text, path: tuple, method: str, label: str | None = None) -> Dimension | tuple:
    """A dimension from its text (or from a Python value: a list means choices), or ``("fixed", value)``
    where the text holds one value. ``label`` names it in errors (``--lr`` or ``--set r``)."""
    f = field_of(path, method)
    label = label or ".".join(path)
    types, _ = settings.types_of(f)
    if isinstance(text, Dimension):
        return check_dimension(text, f, label)
    if not isinstance(text, str):  # the API: a value, or a list of them (a list-valued field: a list of lists)
        many = isinstance(text, (list, tuple)) and (list not in types or any(isinstance(v, (list, tuple)) for v in text))
        values = [list(v) if isinstance(v, tuple) else v for v in text] if many else [text]
        for value in values:
            check_value(value, f, path, label)
        return ("fixed", values[0]) if len(values) == 1 else \
            check_dimension(Dimension(path, "choice", tuple(_frozen(v) for v in _distinct(values))), f, label)
    raw = text.strip()
    if not raw:
        raise ConfigError(f"{label}: empty; give a value, values (4,8,16) or a range (log:1e-5..1e-2)")
    log = raw.lower().startswith("log:")
    body = raw[4:].strip() if log else raw
    match = _RANGE.match(body) if list not in types else None
    if match:
        return check_dimension(_range(match, f, path, label, log), f, label)
    if log:
        raise ConfigError(f"{label}: {raw!r}: log: takes a range, e.g. log:1e-5..1e-2")
    parts = raw.split("|") if "|" in raw or list in types else raw.split(",")
    if any(not p.strip() for p in parts):
        raise ConfigError(f"{label}: {raw!r} has an empty value; separate values with commas: 4,8,16")
    values = [parse_value(p, f, label) for p in parts]
    for value in values:
        check_value(value, f, path, label)
    if len(_distinct(values)) == 1:
        return ("fixed", values[0])
    return check_dimension(Dimension(path, "choice", tuple(_frozen(v) for v in _distinct(values))), f, label)


def _range(match, f, path, label, log) -> Dimension:
    types, _ = settings.types_of(f)
    integer = int in types and float not in types
    if not (integer or float in types):
        raise ConfigError(f"{label} is {settings.describe(f)}: it takes values (a,b,c), not a range")
    ends = []
    for text in (match["low"], match["high"]):
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"{label}: range end {text.strip()!r} is not a number") from None
        if not math.isfinite(value):
            raise ConfigError(f"{label}: range end {text.strip()!r} is not a finite number")
        if integer and value != int(value):
            raise ConfigError(f"{label} is a whole number: range end {text.strip()!r} is not one")
        ends.append(int(value) if integer else value)
    points = None
    if match["points"]:
        points = int(match["points"]) if len(match["points"]) <= 6 else MAX_POINTS + 1
        if not 2 <= points <= MAX_POINTS:
            raise ConfigError(f"{label}: a range's grid takes 2 to {MAX_POINTS} points, got :{match['points']}")
    return Dimension(path, "range", low=ends[0], high=ends[1], log=log, integer=integer, points=points)


def check_dimension(dim: Dimension, f: dataclasses.Field, label: str) -> Dimension:
    """An empty range, a log range through zero, and values outside the declaration are refused."""
    if dim.kind == "choice":
        if not dim.values:
            raise ConfigError(f"{label}: no values; give values (4,8,16) or a range (log:1e-5..1e-2)")
        for value in dim.values:
            check_value(list(value) if isinstance(value, tuple) else value, f, dim.path, label)
        return dim
    text = f"{'log:' if dim.log else ''}{show(dim.low)}..{show(dim.high)}"
    if dim.low > dim.high:
        raise ConfigError(f"{label}: the range {text} is empty (its low end is above its high end); "
                          f"write it low..high: {'log:' if dim.log else ''}{show(dim.high)}..{show(dim.low)}")
    if dim.low == dim.high:
        raise ConfigError(f"{label}: the range {text} holds one value; give it as a value ({show(dim.low)}) or "
                          "widen the range")
    if dim.log and dim.low <= 0:
        raise ConfigError(f"{label}: the log range {text} reaches zero or below, where a log scale has no points; "
                          f"start it above zero (e.g. log:{show(dim.high / 1000)}..{show(dim.high)}), or search a "
                          f"linear range ({show(dim.low)}..{show(dim.high)})")
    for end in (dim.low, dim.high):
        check_value(end, f, dim.path, label)
    return dim


def check_value(value, f: dataclasses.Field, path: tuple, label: str) -> None:
    """``value`` of the field's type, range and choices (as the run or the method would check it)."""
    wrong = settings.problem(value, f, default_max(f, path))
    if wrong and not (wrong == "type" and isinstance(value, list) and list in settings.types_of(f)[0]):
        raise ConfigError(f"{label}: {show(value)} is outside what it takes: {settings.describe(f, default_max(f, path))}")


def _frozen(value):
    return tuple(value) if isinstance(value, list) else value


def _distinct(values: list) -> list:
    out = []
    for v in values:
        if not any(v == w and type(v) is type(w) for w in out):
            out.append(v)
    return out


# ----------------------------------------------------------------------------- the space

@dataclass(frozen=True)
class Space:
    """What every trial shares (``base``: TrainConfig keyword arguments, the method's fixed options under
    ``options``) and what varies (``dims``, in the order given)."""

    base: dict
    dims: tuple

    @property
    def method(self) -> str:
        return self.base.get("method", train_fields()["method"].default)

    def config(self, params: dict) -> dict:
        """TrainConfig keyword arguments of one point (``params``: dimension key -> value)."""
        out = json.loads(json.dumps(self.base))
        out.setdefault("options", {})
        for dim in self.dims:
            value = params[dim.key]
            value = list(value) if isinstance(value, tuple) else value
            if dim.path[0] == "options":
                out["options"][dim.path[1]] = value
            else:
                out[dim.path[0]] = value
        return out

    def default_config(self) -> dict:
        """The configuration the searched fields leave to their defaults (the method's and TrainConfig's)."""
        out = json.loads(json.dumps(self.base))
        out.setdefault("options", {})
        for dim in self.dims:
            (out["options"] if dim.path[0] == "options" else out).pop(dim.path[-1], None)
        return out

    def size(self) -> float:
        return math.prod(d.size() for d in self.dims) if self.dims else 1

    def to_json(self) -> dict:
        return {"base": self.base, "dims": [d.to_json() for d in self.dims]}

    @classmethod
    def from_json(cls, data: dict) -> Space:
        return cls(data["base"], tuple(Dimension.from_json(d) for d in data["dims"]))

    def check(self, grid_points: int | None = None, limit: int = 4096) -> None:
        """Every point a trial may take is a valid run: each dimension's values and range ends with the rest
        of the base, the grid's points together (up to ``limit`` of them)."""
        from ..registry import build_method
        from ..training.config import TrainConfig, check_settings

        def valid(params: dict, what: str) -> None:
            config = self.config(params)
            try:
                build_method(self.method, config.get("options", {}))
                check_settings(TrainConfig(**config))
            except ConfigError as err:
                raise ConfigError(f"{what}: {err}") from None
            except TypeError as err:  # an unexpected keyword: a name that is no TrainConfig field
                raise ConfigError(f"{what}: {err}") from None

        corners = [d.grid(2) if d.kind == "range" else list(d.values) for d in self.dims]
        first = {d.key: c[0] for d, c in zip(self.dims, corners)}
        valid(first, "the sweep's first point")
        for dim, values in zip(self.dims, corners):
            for value in values:
                valid({**first, dim.key: value}, f"{dim.key}={show(value)}")
        grid = [d.grid(grid_points) for d in self.dims]
        for i, point in enumerate(itertools.product(*grid)):
            if i >= limit:
                break
            valid({d.key: v for d, v in zip(self.dims, point)},
                  ", ".join(f"{d.key}={show(v)}" for d, v in zip(self.dims, point)))


def build_space(base: dict, space: dict, labels: dict | None = None) -> Space:
    """The space of a sweep from the API's form: ``base`` (TrainConfig keyword arguments every trial shares) and
    ``space`` (the searched fields in the same shape: ``{"lr": "log:1e-5..1e-2", "options": {"r": [4, 8, 16]}}``;
    text, a list of values, or a :class:`Dimension`). ``labels`` names a key as the user wrote it (``--lr``)."""
    labels = labels or {}
    if not isinstance(base, dict) or not isinstance(space, dict):
        raise ConfigError("a sweep's base and space are mappings of TrainConfig fields (method options under 'options')")
    base = json.loads(json.dumps(base))
    for name in base:
        if name in RESERVED and name not in ("model", "task", "method"):
            raise ConfigError(f"{name} cannot be set for a sweep's trials: {RESERVED[name]}")
        if name not in train_fields():
            field_of((name,), base.get("method", "lora"))  # raises: no such setting
    method = base.get("method", train_fields()["method"].default)
    base.setdefault("options", {})
    if not isinstance(base["options"], dict):
        raise ConfigError("base['options'] must be a mapping of the method's options")
    for name, value in base["options"].items():
        f = field_of(("options", name), method)
        check_value(value, f, ("options", name), labels.get(f"options.{name}", f"option {name}"))
    dims = []
    entries = [((k,), v) for k, v in space.items() if k != "options"]
    entries += [(("options", k), v) for k, v in (space.get("options") or {}).items()]
    for path, text in entries:
        key = ".".join(path)
        found = parse(text, path, method, labels.get(key))
        if isinstance(found, tuple):  # one value: fixed, not searched
            (base["options"] if path[0] == "options" else base)[path[-1]] = found[1]
        else:
            dims.append(found)
    return Space(base, tuple(dims))
