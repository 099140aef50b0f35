"""A sweep from its settings to its chosen configuration: checked, planned, run (here or on Ray), resumed.

The sweep's folder holds ``sweep.json`` (what defines its trials: the space, seeds, algorithm and the choices
that change which trials run), ``trials.jsonl`` (one record per finished trial, rewritten atomically after
each), the trials' run folders under ``trials/`` (or under ``--storage``), the table and the plot, and the
chosen configuration's test scores under ``test/``. Running the same sweep again goes on where it stopped:
finished trials are read back, not run again; a trial cut short goes on from its checkpoint.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from .. import settings, storage
from ..errors import ConfigError, DataError, StorageError
from ..machine import machine_cpu, machine_info, other_load
from ..storage import SWEEP, OwnedFolder
from .config import DEFAULT_TRIALS, SweepConfig
from .files import FORMAT, VERSION, read_json, read_records
from .search import DONE, WAIT, MedianPruner, best_of, build_search, normal
from .space import Space, build_space, params_text
from .trial import BASELINE, run_trial


@dataclass
class Plan:
    """A sweep checked and resolved: nothing in it is left to a default that could change between calls."""

    cfg: SweepConfig
    space: Space
    metric: str
    out: Path
    root: Path
    identity: dict
    search: object
    pruner: MedianPruner | None
    task: object = None

    def spec(self, number: int, params: dict) -> dict:
        baseline = number == BASELINE
        return {"number": number, "params": params, "baseline": baseline,
                "config": self.space.default_config() if baseline else self.space.config(params),
                "seeds": list(self.cfg.seeds), "root": str(self.root), "metric": self.metric,
                "prune": self.pruner is not None and not baseline, "keep_checkpoints": self.cfg.keep_checkpoints,
                "score_test": self.cfg.trial_test}


def plan(cfg: SweepConfig, task=None, capacity: int | None = None) -> Plan:
    """Check everything a sweep is given, before any trial runs or any folder is written; resolve its defaults.

    ``capacity``: the trials a Ray cluster holds at once (the default concurrency there)."""
    settings.check(cfg)
    seeds = cfg.seeds
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**32 for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds must be distinct whole numbers in [0, 2**32), at least one; got {seeds!r}")
    base = dict(cfg.base)
    if task is None and isinstance(base.get("task"), str) and os.path.lexists(base["task"]):
        base["task"] = os.path.abspath(base["task"])  # trials run elsewhere (a Ray worker's own directory)
    space = build_space(base, cfg.space, cfg.labels)
    metric = _task_metric(space, task)
    algorithm = cfg.algorithm
    trials = cfg.trials if cfg.trials is not None else (None if algorithm == "grid" or cfg.time_budget else DEFAULT_TRIALS)
    # auto: median pruning for tpe where runs validate before their end (there is nothing to prune on otherwise)
    prune = cfg.prune or ("median" if algorithm == "tpe" and _validates_early(space) else "none")
    out = storage.chosen_folder(cfg.out, _default_out(space))
    stored = _stored_identity(out)  # a sweep going on keeps the defaults it started with, wherever it runs now
    tpe_startup = cfg.tpe_startup or stored.get("tpe_startup") or \
        max(3, min(10, math.ceil((trials or 3 * DEFAULT_TRIALS) / 3)))
    concurrency = cfg.concurrency or stored.get("concurrency") or capacity or 1
    if algorithm == "tpe" or prune == "median":
        from .search import _optuna

        _optuna()  # a missing Optuna is an error now, not after the first trial
    cfg = dataclasses.replace(cfg, base=base, trials=trials, prune=prune, tpe_startup=tpe_startup, concurrency=concurrency)
    space.check(cfg.grid_points)
    if prune == "median":
        _check_prunable(space)
    identity = {"space": space.to_json(), "seeds": list(seeds), "algorithm": algorithm, "prune": prune}
    if algorithm != "grid":
        identity["search_seed"] = cfg.search_seed
    if algorithm == "tpe":
        identity["tpe_startup"] = tpe_startup
    if algorithm == "grid":
        identity.update(extend=cfg.extend, grid_points=cfg.grid_points)
    if prune == "median":
        identity["prune_startup"] = cfg.prune_startup
    if cfg.trial_test:
        identity["trial_test"] = True  # the trials' runs hold test scores (a sweep without them is another sweep)
    if algorithm == "tpe" or prune == "median":
        identity["concurrency"] = concurrency  # decisions that read results read whole rounds
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    root = _storage(cfg.storage) / f"{out.name}-{digest}" if cfg.storage is not None else out / "trials"
    search = build_search(algorithm, space, seed=cfg.search_seed, concurrency=concurrency, extend=cfg.extend,
                          points=cfg.grid_points, tpe_startup=tpe_startup, valid=lambda params: _valid(space, params))
    pruner = MedianPruner(space, concurrency, cfg.prune_startup) if prune == "median" else None
    return Plan(cfg, space, metric, out.absolute(), root.absolute(), identity, search, pruner, task)


def _storage(value) -> Path:
    """--storage: a folder (made if missing) that is not a file, a FIFO or a link loop, refused naming --storage."""
    path = storage.user_path(storage.chosen_folder(value, None, "--storage"), "--storage")
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ConfigError(f"--storage {path} is not a folder; give a folder for the trials' run folders")
    return path


def _stored_identity(out: Path) -> dict:
    """What a sweep already in ``out`` was started with (empty if none; a damaged file is State's to report)."""
    try:
        saved = json.loads(storage.read_text(out / "sweep.json"))
        return saved["identity"] if isinstance(saved.get("identity"), dict) else {}
    except (OSError, ValueError, KeyError, AttributeError):
        return {}


def _default_out(space: Space) -> str:
    from ..names import slug

    b = space.base
    return f"runs/sweep-{slug(b.get('model', 'minilm'))}-{slug(b.get('task', 'code-search'))}-{slug(space.method)}"


def _task_metric(space: Space, task) -> str:
    """The task's main metric (what the sweep maximises on validation); an unknown task fails here."""
    if task is not None:
        return task.metric
    from ..tasks import REGISTRY, load_task
    from ..training.config import TrainConfig

    name = space.base.get("task", TrainConfig.task)
    if name in REGISTRY and REGISTRY[name].functional:
        raise ConfigError(f"{name} is an evaluation, not a task to train on; sweep a dataset task")
    if name not in REGISTRY and not name.startswith("hf:") and not os.path.lexists(name):
        from ..tasks import TASKS

        raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)} (or a .jsonl/.csv file, a "
                          "directory of train/valid/test files, or hf:<dataset>)")
    data = load_task(name, max_train=1, max_eval=1)
    if not data.valid:
        raise DataError(f"task {name} has no validation split, which a sweep scores its trials on")
    return data.metric


def _validates_early(space: Space) -> bool:
    from ..training.config import TrainConfig

    cfg = TrainConfig(**space.default_config())
    return cfg.eval_every < cfg.max_steps or any(d.key in ("eval_every", "max_steps") for d in space.dims)


def _check_prunable(space: Space) -> None:
    from ..training.config import TrainConfig

    cfg = TrainConfig(**space.default_config())
    if not _validates_early(space):
        raise ConfigError(f"--prune median stops trials between validations, but a run validates only at its end "
                          f"(eval_every {cfg.eval_every} >= max_steps {cfg.max_steps}): give --eval-every below "
                          "--max-steps, or --prune none")


def _valid(space: Space, params: dict) -> bool:
    from ..registry import build_method
    from ..training.config import TrainConfig, check_settings

    try:
        config = space.config(params)
        build_method(space.method, config.get("options", {}))
        check_settings(TrainConfig(**config))
    except (ConfigError, TypeError):
        return False
    return True


# ----------------------------------------------------------------------------- the folder and its records

class State:
    """The sweep's folder as the driver keeps it: its identity and the finished trials' records."""

    def __init__(self, folder: OwnedFolder, plan: Plan, log):
        self.folder, self.plan, self.log = folder, plan, log
        self.records: dict[int, dict] = {}
        path = folder.path / "sweep.json"
        if os.path.lexists(path):
            saved = read_json(path)
            if saved.get("format") != FORMAT:
                raise StorageError(f"{path} is not a deltatune sweep's file; choose another --out")
            _same_identity(saved.get("identity", {}), plan.identity, folder.path)
            self.records = read_records(folder.path)
            trials = len([n for n in self.records if n >= 0])
            log(f"continuing the sweep in {folder.path}: {trials} trial{'s' * (trials != 1)} finished "
                "(they are not run again)")
        folder.open()
        if not os.path.lexists(path):
            folder.write_json("sweep.json", {"format": FORMAT, "version": VERSION, "identity": plan.identity,
                                             "settings": _jsonable(dataclasses.asdict(plan.cfg)),
                                             "root": str(plan.root), "created": machine_info()["date"]})

    @property
    def history(self) -> dict[int, dict]:
        return {n: r for n, r in self.records.items() if n >= 0}

    def add(self, record: dict) -> None:
        self.records[record["number"]] = record
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for _, r in sorted(self.records.items()))
        self.folder.write_bytes("trials.jsonl", text.encode())

    def finished(self, record: dict) -> None:
        """Keep a finished trial's record (durably, before anything else) and say how it went."""
        self.add(record)
        metric, value = record["metric"], record.get("value")
        shown = f"{metric} {value:.4f} on valid" if isinstance(value, (int, float)) else "no score"
        what = {"complete": shown,
                "pruned": f"pruned at step {record['curve'][-1][0] if record['curve'] else '?'} (best so far {shown})",
                "failed": f"failed: {record.get('error', '')[:200]}"}[record["status"]]
        best = best_of(self.records.values())
        tail = f"; best so far: {_name(best)} ({best['value']:.4f})" if best is not None else ""
        self.log(f"{_name(record)} ({params_text(record['params'])}): {what} in {record['seconds']:.0f} s{tail}")


def _same_identity(saved: dict, now: dict, where: Path) -> None:
    """Resuming: the settings that decide which trials run must be the ones the sweep started with."""
    changed = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != json.loads(json.dumps(now.get(k)))]
    if changed:
        def show_key(k):
            return f"{k} was {json.dumps(saved.get(k))[:80]}, now {json.dumps(now.get(k))[:80]}"
        raise ConfigError(f"--out {where} holds a sweep with other settings ({'; '.join(show_key(k) for k in changed)}); "
                          "give the settings it started with to go on with it (--trials and --time-budget may "
                          "change), or choose another --out")


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


# ----------------------------------------------------------------------------- running

def run_sweep(cfg: SweepConfig, task=None, log=print) -> dict:
    """Run a sweep (resumed where its folder holds one) and return its outcome: every trial's record, the chosen
    configuration (best on validation) and its test scores, the baseline and the comparison, the files.

    ``task``: an already loaded TaskData every trial trains on (else each run loads ``base["task"]`` as
    ``deltatune train`` would). ``log``: where progress lines go. With ``cfg.ray`` the trials run on that Ray
    cluster (:mod:`deltatune.sweep.cluster`); the driver, its records and the final test scoring stay here.
    """
    the_plan, cluster = plan(cfg, task), None  # a bad space is an error before anything runs or is written
    if cfg.ray is not None:
        from .cluster import Cluster

        cluster = Cluster(cfg)
    try:
        if cluster is not None and cfg.concurrency is None:  # the trials the cluster holds at once
            the_plan = plan(cfg, task, capacity=cluster.capacity)
        folder = OwnedFolder(the_plan.out, SWEEP)
        folder.check()  # a sweep folder is locked from here: a second driver on it is refused
        with folder:
            state = State(folder, the_plan, log)
            started, cpu0, machine0 = time.time(), _own_cpu(), machine_cpu()
            if cluster is not None:
                cluster.run(state, log, baseline=lambda: baseline_due(state))
            else:
                run_here(state, log)
            wall = time.time() - started
            # the CPU other processes took meanwhile; on a cluster the workers' time is not this process's to count
            load = other_load(machine0, machine_cpu(), _own_cpu() - cpu0, wall) if cluster is None else None
            return finish(state, log, wall, load)
    finally:
        if cluster is not None:
            cluster.close()


def _own_cpu() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _defaults(plan: Plan) -> dict:
    """The values the searched fields take when left alone (the method's options, TrainConfig's defaults)."""
    from ..registry import REGISTRY, method_info
    from ..training.config import TrainConfig

    options = REGISTRY[plan.space.method]().options()
    run = TrainConfig()
    out = {}
    for d in plan.space.dims:
        if d.path[0] == "options":
            out[d.key] = options.get(d.name)
        elif d.name == "lr":
            out[d.key] = plan.space.base.get("lr") or method_info(plan.space.method)["lr"]
        else:
            out[d.key] = getattr(run, d.name)
    return normal(out)


def baseline_due(state: State) -> dict | None:
    """The baseline's params when it is asked for and not finished yet (it runs before the trials)."""
    if not state.plan.cfg.baseline or BASELINE in state.records:
        return None
    params = _defaults(state.plan)
    state.log(f"baseline: the searched settings at their defaults ({params_text(params)})")
    return params


def budget_left(state: State, started: float) -> bool:
    budget = state.plan.cfg.time_budget
    return budget is None or time.time() - started < budget


def numbers(state: State):
    """Trial numbers in order, up to --trials."""
    limit = state.plan.cfg.trials
    n = 0
    while limit is None or n < limit:
        yield n
        n += 1


def run_here(state: State, log) -> None:
    """The trials one after another in this process."""
    plan, started = state.plan, time.time()
    baseline = baseline_due(state)
    if baseline is not None:
        state.finished(run_trial(plan.spec(BASELINE, baseline), task=plan.task, threads=plan.cfg.cpus_per_trial))
    for n in numbers(state):
        if n in state.records:
            continue
        if not budget_left(state, started):
            log(f"time budget of {plan.cfg.time_budget:g} s spent: no more trials start")
            break
        params = plan.search.propose(n, state.history)
        if params == DONE:
            break
        if params == WAIT:  # every earlier trial is finished here; a wait cannot end
            raise RuntimeError(f"trial {n} waits for trials that are not running")
        log(f"trial {n}: {params_text(params)}")
        report = None
        if plan.pruner is not None:
            curve = []

            def report(step, value, n=n, curve=curve):
                curve.append([step, value])
                return plan.pruner.should_prune(n, curve, state.history)
        state.finished(run_trial(plan.spec(n, params), report=report, task=plan.task, threads=plan.cfg.cpus_per_trial))


def _name(record: dict) -> str:
    return "baseline" if record.get("baseline") else f"trial {record['number']}"


# ----------------------------------------------------------------------------- the outcome

def finish(state: State, log, wall: float, load) -> dict:
    """Choose on validation, score the chosen configuration (and the baseline) on test, write the table and plot."""
    from . import report

    plan, records = state.plan, state.records
    trials = [r for n, r in sorted(records.items()) if n >= 0]
    chosen = best_of(records.values())
    baseline = records.get(BASELINE)
    result = {"out": str(plan.out), "metric": plan.metric, "trials": trials, "baseline": baseline,
              "chosen": chosen, "wall_seconds": round(wall, 1), "other_load": load,
              "trial_seconds": round(sum(r.get("seconds") or 0 for r in records.values()), 1),
              "notes": plan.search.notes(state.history), "test": None, "baseline_test": None, "comparison": None}
    if chosen is None:
        log("no trial finished with a validation score: nothing is chosen")
    elif plan.cfg.score_test:
        log(f"chosen on the validation split: {_name(chosen)} ({params_text(chosen['params'])}), {plan.metric} "
            f"{chosen['value']:.4f}; the test split is scored for this configuration only"
            + (" and the baseline" if baseline is not None and baseline is not chosen else ""))
        result["test"] = test_scores(state, chosen)
        if baseline is not None and baseline is not chosen and baseline.get("status") == "complete":
            result["baseline_test"] = test_scores(state, baseline)
            result["comparison"] = report.compare(result["test"], result["baseline_test"], plan.metric)
    result["files"] = report.write(state.folder, plan, result)
    state.folder.write_json("chosen.json", {k: result[k] for k in ("metric", "chosen", "test", "baseline_test",
                                                                   "comparison", "notes", "wall_seconds", "trial_seconds",
                                                                   "other_load")})
    for line in report.summary_lines(plan, result):
        log(line)
    return result


def test_scores(state: State, record: dict) -> dict:
    """Each seed's best adapter scored on the test split (the max_eval examples a run of the same settings
    scores), written under test/ in the sweep folder; their mean."""
    from ..training import evaluate

    plan = state.plan
    per_seed = []
    for run in record["runs"]:
        out = state.folder.path / "test" / Path(run["out_dir"]).name
        saved = out / "metrics-test.json"
        if os.path.lexists(saved):  # scored by an earlier call of this sweep
            result = read_json(saved)
        else:
            result = evaluate(run["out_dir"], task=plan.task, split="test",
                              max_eval=None if plan.task is not None else plan.space.base.get("max_eval"), out_dir=out)
        per_seed.append({"seed": run["seed"], "value": result["value"], "examples": result.get("examples"),
                         "predictions_file": str(out / "predictions-test.jsonl")})
    values = [s["value"] for s in per_seed]
    return {"value": statistics.fmean(values), "seeds": per_seed, "metric": plan.metric}
