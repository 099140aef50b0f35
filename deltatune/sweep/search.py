"""How a sweep picks its trials: a grid that extends itself past an edge, random search, and Optuna's TPE; and
when it stops one early: Optuna's median pruner on the validation curve.

Every decision is a function of the trial's number and of the records of the trials before it, never of
the clock or of which worker finished first: ``propose(n, history)`` gives trial ``n``'s point (or WAIT while
trials it depends on still run, or DONE), and a sweep killed and resumed, or run on a cluster, takes the
same trials. Where a decision reads results (TPE, pruning, a grid's extension), trial ``n`` reads only the
trials of the rounds before its own, a round being ``concurrency`` consecutive trials; so ``concurrency``
trials can run at once and the trials are still the same wherever they run.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import random

from ..errors import ConfigError
from .space import Dimension, Space, show

WAIT, DONE = "wait", "done"


def normal(params: dict) -> dict:
    """Params as JSON gives them back (tuples as lists), to compare a proposal with a record."""
    return json.loads(json.dumps(params))


def best_of(records) -> dict | None:
    """The finished trial with the best validation score (complete, not pruned or failed); ties go to the
    earlier trial."""
    done = [r for r in records if r is not None and r.get("status") == "complete" and _finite(r.get("value"))]
    return max(done, key=lambda r: (r["value"], -r["number"])) if done else None


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _seed(*parts) -> int:
    """A 32-bit seed from the sweep's search seed and a trial number, the same on every machine."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:4], "little")


class Search:
    """``propose(number, history)``: ``history`` maps the numbers of finished trials to their records."""

    def __init__(self, space: Space, seed: int = 0, concurrency: int = 1):
        self.space, self.seed, self.concurrency = space, seed, concurrency

    def round_start(self, number: int) -> int:
        return number - number % self.concurrency

    def waits(self, number: int, history: dict) -> bool:
        """Trials of earlier rounds still running: a decision that reads results must wait for them."""
        return any(i not in history for i in range(self.round_start(number)))

    def propose(self, number: int, history: dict):
        raise NotImplementedError

    def notes(self, history: dict) -> list[str]:
        return []


class Grid(Search):
    """Every point of the grid (each dimension's values, a range's ``points``), in order; then, while the best
    trial sits at the edge of a numeric dimension, one more point beyond that edge, the other dimensions at
    the best trial's values, up to ``extend`` points each way per dimension. The step beyond an edge is the
    one between the two outermost values there: a ratio on a log range and for positive choices (4,8,16 ->
    32), a difference otherwise; a point outside the field's declared range is not tried (the edge is then
    the declared bound, and the notes say so)."""

    def __init__(self, space: Space, seed: int = 0, concurrency: int = 1, extend: int = 2, points: int | None = None,
                 valid=None):
        super().__init__(space, seed, concurrency)
        self.extend = extend
        self.values = [d.grid(points) for d in space.dims]
        self.points = [dict(zip([d.key for d in space.dims], p)) for p in itertools.product(*self.values)]
        self.valid = valid or (lambda params: True)

    def propose(self, number: int, history: dict):
        if number < len(self.points):
            return self.points[number]
        if any(i not in history for i in range(number)):  # an extension reads every result before it
            return WAIT
        return self._extensions(history, number)[0]

    def _extensions(self, history: dict, number: int):
        """Replays the extensions from the first one to trial ``number``: (its point or DONE, the notes)."""
        values = {d.key: sorted(v) for d, v in zip(self.space.dims, self.values) if d.numeric and len(v) > 1}
        used = {(k, side): 0 for k in values for side in (-1, 1)}
        bounded = set()
        for k in range(len(self.points), number + 1):
            best = best_of(history.get(i) for i in range(k))
            point = self._beyond(best, values, used, bounded) if best is not None else None
            if point is None:
                return DONE, self._describe(best, values, used, bounded)
            if k == number:
                return point, []
        return DONE, []

    def _beyond(self, best: dict, values: dict, used: dict, bounded: set):
        for dim in self.space.dims:
            if dim.key not in values:
                continue
            here, ordered = best["params"][dim.key], values[dim.key]
            for side, edge, inner in ((-1, ordered[0], ordered[1]), (1, ordered[-1], ordered[-2])):
                if here != edge or used[(dim.key, side)] >= self.extend or (dim.key, side) in bounded:
                    continue
                new = step_beyond(dim, edge, inner, all(v > 0 for v in ordered))
                point = {**best["params"], dim.key: new}
                if new is None or new in ordered or not self.valid(point):
                    bounded.add((dim.key, side))
                    continue
                used[(dim.key, side)] += 1
                ordered.insert(0 if side < 0 else len(ordered), new)
                return point
        return None

    def _describe(self, best, values, used, bounded) -> list[str]:
        if best is None:
            return []
        out = []
        for key, ordered in values.items():
            here = best["params"][key]
            for side, edge in ((-1, ordered[0]), (1, ordered[-1])):
                if here != edge:
                    continue
                where = "lowest" if side < 0 else "highest"
                why = ("the declared range ends there" if (key, side) in bounded else
                       f"the grid was extended {used[(key, side)]} times that way, the most --extend allows")
                out.append(f"the best trial sits at the {where} {key} tried ({show(here)}): {why}; a wider grid "
                           "might find a better one")
        return out

    def notes(self, history: dict) -> list[str]:
        number = max(history, default=-1) + 1
        if number < len(self.points) or any(i not in history for i in range(number)):
            return []
        found, notes = self._extensions(history, number)
        return notes if found == DONE else []


def step_beyond(dim: Dimension, edge, inner, positive: bool):
    """The next value past ``edge`` (away from ``inner``): by their ratio on a log scale, else their difference."""
    geometric = dim.log if dim.kind == "range" else positive
    if geometric:
        if inner <= 0 or edge <= 0:
            return None
        new = edge * (edge / inner)
    else:
        new = edge + (edge - inner)
    if dim.integer or (dim.kind == "choice" and all(isinstance(v, int) for v in dim.values)):
        new = int(round(new))
        if new == edge:
            new = edge + (1 if edge > inner else -1)
        return new
    return float(f"{new:.6g}") if math.isfinite(new) else None


class RandomSearch(Search):
    """Each trial's point drawn with its own generator, seeded by the search seed and the trial's number
    (log-uniform on a log range); a point drawn before is drawn again (a finite space ends when exhausted)."""

    def __init__(self, space: Space, seed: int = 0, concurrency: int = 1):
        super().__init__(space, seed, concurrency)
        self._drawn: list[dict] = []

    def propose(self, number: int, history: dict):
        while len(self._drawn) <= number:
            k = len(self._drawn)
            if k >= self.space.size():
                return DONE
            rng = random.Random(_seed("random", self.seed, k))
            seen = {json.dumps(p, sort_keys=True) for p in self._drawn}
            for _ in range(1000):
                point = normal({d.key: d.sample(rng) for d in self.space.dims})
                if json.dumps(point, sort_keys=True) not in seen:
                    break
            else:
                return DONE
            self._drawn.append(point)
        return self._drawn[number]


def _optuna():
    try:
        import optuna
    except ImportError:
        raise ConfigError("--algorithm tpe and --prune median need Optuna: pip install 'deltatune[sweep]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


class OptunaStudy:
    """An Optuna study rebuilt from a sweep's records (the trials of earlier rounds), for one decision."""

    def __init__(self, space: Space):
        self.space = space

    def distributions(self) -> dict:
        optuna = _optuna()
        out = {}
        for d in self.space.dims:
            if d.kind == "choice":  # by index: Optuna's categories cannot be lists
                out[d.key] = optuna.distributions.CategoricalDistribution(tuple(range(len(d.values))))
            elif d.integer:
                out[d.key] = optuna.distributions.IntDistribution(int(d.low), int(d.high), log=d.log)
            else:
                out[d.key] = optuna.distributions.FloatDistribution(float(d.low), float(d.high), log=d.log)
        return out

    def to_optuna(self, params: dict) -> dict | None:
        """A record's params as the study's (choices by index); None for a point outside the space (the baseline)."""
        out = {}
        for d in self.space.dims:
            value = params.get(d.key)
            if d.kind == "choice":
                index = next((i for i, v in enumerate(normal({"v": list(d.values)})["v"]) if v == value), None)
                if index is None:
                    return None
                out[d.key] = index
            else:
                if not isinstance(value, (int, float)) or not d.low <= value <= d.high:
                    return None
                out[d.key] = int(value) if d.integer else float(value)
        return out

    def from_optuna(self, params: dict) -> dict:
        return normal({d.key: d.values[params[d.key]] if d.kind == "choice" else params[d.key] for d in self.space.dims})

    def study(self, records, sampler=None, pruner=None):
        optuna = _optuna()
        study = optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner)
        dists = self.distributions()
        states = {"complete": optuna.trial.TrialState.COMPLETE, "pruned": optuna.trial.TrialState.PRUNED,
                  "failed": optuna.trial.TrialState.FAIL}
        trials = []
        for r in records:
            params = self.to_optuna(r["params"]) if not r.get("baseline") else None
            if params is None or r.get("status") not in states:
                continue
            complete = r["status"] == "complete" and _finite(r.get("value"))
            trials.append(optuna.trial.create_trial(
                params=params, distributions=dists, value=r["value"] if complete else None,
                state=states[r["status"]] if complete or r["status"] != "complete" else states["failed"],
                intermediate_values={int(s): v for s, v in r.get("curve", []) if _finite(v)}))
        study.add_trials(trials)
        return study


class TPE(Search):
    """Optuna's TPE sampler (Bergstra et al. 2011): trial ``n`` is asked of a study holding the trials of the
    rounds before its own, with a sampler seeded by the search seed and ``n``; the first ``startup`` trials
    are Optuna's random start."""

    def __init__(self, space: Space, seed: int = 0, concurrency: int = 1, startup: int = 10):
        super().__init__(space, seed, concurrency)
        self.startup = startup
        self.optuna = OptunaStudy(space)

    def propose(self, number: int, history: dict):
        if not self.space.dims:
            return {} if number == 0 else DONE
        if self.waits(number, history):
            return WAIT
        optuna = _optuna()
        sampler = optuna.samplers.TPESampler(seed=_seed("tpe", self.seed, number), n_startup_trials=self.startup)
        study = self.optuna.study([history[i] for i in range(self.round_start(number))], sampler=sampler)
        trial = study.ask(self.optuna.distributions())
        return self.optuna.from_optuna(trial.params)


class MedianPruner:
    """Optuna's median pruner on the validation curve: a trial stops at a validation where its best score so far
    is below the median of the finished trials' scores at that step (Golovin et al. 2017, Google Vizier's median
    stopping rule); only once ``startup`` trials have finished, and reading only the trials of earlier rounds."""

    def __init__(self, space: Space, concurrency: int = 1, startup: int = 5):
        self.optuna, self.concurrency, self.startup = OptunaStudy(space), concurrency, startup

    def should_prune(self, number: int, curve: list, history: dict) -> bool:
        earlier = [history[i] for i in range(number - number % self.concurrency) if i in history]
        if sum(r.get("status") == "complete" for r in earlier) < max(1, self.startup):
            return False
        optuna = _optuna()
        study = self.optuna.study(earlier, pruner=optuna.pruners.MedianPruner(n_startup_trials=self.startup,
                                                                               n_warmup_steps=0))
        trial = study.ask()
        for step, value in curve:
            if _finite(value):
                trial.report(value, int(step))
        return trial.should_prune()


def build_search(algorithm: str, space: Space, *, seed: int, concurrency: int, extend: int, points: int | None,
                 tpe_startup: int, valid=None) -> Search:
    if algorithm == "grid":
        return Grid(space, seed, concurrency, extend, points, valid)
    if algorithm == "random":
        return RandomSearch(space, seed, concurrency)
    if algorithm == "tpe":
        return TPE(space, seed, concurrency, tpe_startup)
    raise ConfigError(f"unknown search algorithm {algorithm!r}; use grid, random or tpe")
