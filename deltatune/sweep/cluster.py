"""The same sweep on a Ray cluster: Ray Tune runs the trials on the workers, the driver here decides them.

Ray Tune asks a :class:`Searcher` for each trial and a scheduler whether to go on after each result; both are
the sweep's own ``propose`` and median pruner (``search.py``), so the trials are those the sweep takes on one
machine. Each trial runs :func:`~deltatune.sweep.trial.run_trial` on a worker with the CPUs (and GPUs) it was
given; its run folders go to the storage the user names (a path every node sees), each under its own name.
A worker that dies mid-trial makes Ray run the trial again (``--max-failures``), from the checkpoints in its
folders; what a dead worker left is never a result, since a run counts only once its ``metrics.json`` is
written and a trial only once the driver has its record. Records, the table and the test scoring stay with
the driver.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings

from ..errors import ConfigError, DeltatuneError, TrainingError
from .search import DONE, WAIT, normal
from .space import params_text
from .trial import BASELINE, run_name, run_trial


def _ray():
    try:
        import ray
        from ray import tune  # noqa: F401  (Ray Tune is a separate part of the ray package)
    except ImportError:
        raise ConfigError("deltatune sweep --ray needs Ray Tune: pip install 'deltatune[sweep]'") from None
    return ray


class Cluster:
    """A connection to a Ray cluster, its capacity, and a sweep run on it."""

    def __init__(self, cfg):
        # Tune's own result files and progress tables say nothing the sweep's records do not.
        os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        os.environ.setdefault("TUNE_RESULT_BUFFER_LENGTH", "1")  # a pruning decision after each validation
        # Ray's driver would replace builtins.print with its own for good: a later sweep in this process, whose
        # searcher Tune pickles, could then no longer pickle a log function that is (or holds) print
        os.environ.setdefault("RAY_TQDM_PATCH_PRINT", "0")
        ray = _ray()
        self.ray, self.cfg = ray, cfg
        try:
            ray.init(address=cfg.ray, logging_level="WARNING", log_to_driver=True,
                     runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise ConfigError(f"--ray {cfg.ray}: no Ray cluster answers there ({' '.join(str(err).split())[:200]}); "
                              "start one (`ray start --head` on the head, `ray start --address HEAD:6379` on each "
                              "worker) or give its address") from None
        # (CPUs, GPUs) of each worker: a node without CPUs (a head kept for the driver) runs no trial
        nodes = [(n["Resources"].get("CPU", 0.0), n["Resources"].get("GPU", 0.0)) for n in ray.nodes()
                 if n.get("Alive") and n["Resources"].get("CPU", 0.0) > 0]
        if not nodes:
            ray.shutdown()
            raise ConfigError(f"--ray {cfg.ray}: the cluster has no CPUs to run trials on; add workers")
        # one trial per worker by default, with all its CPUs: the smallest worker's count
        self.cpus = cfg.cpus_per_trial or min(c for c, _ in nodes)
        self.gpus = cfg.gpus_per_trial
        fit = [min(math.floor(c / self.cpus) if self.cpus else 1_000_000,
                   math.floor(g / self.gpus) if self.gpus else 1_000_000) for c, g in nodes]
        self.capacity = max(1, sum(fit))
        if sum(fit) < 1:
            ray.shutdown()
            raise ConfigError(f"--ray {cfg.ray}: no node has {self.cpus:g} CPUs and {self.gpus:g} GPUs for a trial; "
                              "lower --cpus-per-trial or --gpus-per-trial")

    def close(self) -> None:
        self.ray.shutdown()

    def run(self, state, log, baseline=None) -> None:
        """The sweep's trials on the cluster until the search ends (``baseline()``: the baseline's params while
        it is due). Should Ray Tune itself stop (its memory monitor killing a worker is an error it does not
        recover from), a fresh Tuner goes on from the sweep's records, up to --max-failures times: finished
        trials are not run again, unfinished ones go on from their checkpoints."""
        plan = state.plan
        log(f"on Ray ({self.ray.get_runtime_context().gcs_address}): {plan.cfg.concurrency} trial(s) at once, "
            f"{self.cpus:g} CPU(s){f' and {self.gpus:g} GPU(s)' if self.gpus else ''} each; run folders under {plan.root}")
        for attempt in range(plan.cfg.max_failures + 1):
            searcher = _make_searcher()(state, log, threads=max(1, int(self.cpus)),
                                        baseline=baseline() if baseline is not None else None)
            try:
                self._fit(plan, searcher, attempt)
            except DeltatuneError:
                raise
            except Exception as err:  # Ray's own: the trials' state is the sweep's records, so it can start again
                what = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
                if attempt == plan.cfg.max_failures:
                    raise TrainingError(f"Ray Tune stopped {attempt + 1} times (last: {what}); the finished trials "
                                        "are kept: run the sweep again to go on") from err
                log(f"Ray Tune stopped ({what}); starting it again from the sweep's records")
                continue
            if searcher.lost:
                log(f"trial(s) {', '.join(map(str, sorted(searcher.lost)))} failed on Ray after "
                    f"{plan.cfg.max_failures + 1} tries (see Ray's worker logs); run the sweep again to go on with them")
            return

    def _fit(self, plan, searcher, attempt: int) -> None:
        from ray import tune

        trainable = tune.with_parameters(_trainable, task=plan.task) if plan.task is not None else _trainable
        trainable = tune.with_resources(trainable, {"cpu": self.cpus, "gpu": self.gpus})
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=_scheduler(searcher), num_samples=-1,
                                        max_concurrent_trials=plan.cfg.concurrency, reuse_actors=True,
                                        trial_dirname_creator=lambda t: f"trial-{t.config['number']}-{t.trial_id}"),
            run_config=tune.RunConfig(name=f"{plan.out.name}-{time.strftime('%Y%m%d-%H%M%S')}-{attempt}",
                                      storage_path=str(plan.root.parent / "ray"), verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=plan.cfg.max_failures)))
        # the sweep keeps its own records: Ray's result files (which it is told not to write) are not missed
        logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
        tuner.fit()


def _trainable(config, task=None):
    """A trial on a Ray worker: run it (on from its folders' checkpoints) and report its record."""
    from ray import tune

    spec = json.loads(config["spec"])
    # a worker's warnings reach the driver's terminal: one line each, saying which trial, as the CLI words them
    warnings.formatwarning = lambda message, *_, **__: f"deltatune sweep: trial {spec['number']}: warning: {message}\n"

    def report(step, value):
        tune.report({"step": step, "valid": value})
        return False  # the driver's scheduler stops a pruned trial itself

    record = run_trial(spec, report=report if spec["prune"] else None, task=task, threads=config.get("threads"))
    record["host"] = os.uname().nodename
    from ..machine import machine_info

    info = machine_info()  # where the runs ran (the driver's machine is not the worker's)
    record["machine"], record["versions"] = info["machine"], info["versions"]
    tune.report({"record": json.dumps(record), "valid": record["value"] if record["value"] is not None else math.nan})


def _make_searcher():
    from ray.tune.search import Searcher

    class SweepSearcher(Searcher):
        """The sweep's own proposals, in trial order; None (wait) while the trials a decision reads still run."""

        def __init__(self, state, log, threads, baseline):
            super().__init__(metric="valid", mode="max")
            self.state, self.log, self.threads = state, log, threads
            self.plan = state.plan
            self.next, self.started = 0, time.time()
            self.ids: dict[str, int] = {}  # Ray's trial id -> the sweep's trial number
            self.params: dict[int, dict] = {}
            self.begun: dict[int, float] = {}
            self.curves: dict[int, dict] = {}
            self.pruned: set[int] = set()
            self.lost: set[int] = set()
            self.baseline = baseline

        def suggest(self, trial_id):
            plan, history = self.plan, self.state.history
            if self.baseline is not None:  # the defaults first, on a worker like every trial
                params, self.baseline = self.baseline, None
                return self._start(trial_id, BASELINE, params)
            if self.lost:  # a trial Ray gave up on: the trials after it may read it; end, a rerun goes on
                return Searcher.FINISHED
            while True:
                n = self.next
                if plan.cfg.trials is not None and n >= plan.cfg.trials:
                    return Searcher.FINISHED
                if n in history:
                    self.next += 1
                    continue
                if plan.cfg.time_budget is not None and time.time() - self.started >= plan.cfg.time_budget:
                    self.log(f"time budget of {plan.cfg.time_budget:g} s spent: no more trials start")
                    return Searcher.FINISHED
                params = plan.search.propose(n, history)
                if params == DONE:
                    return Searcher.FINISHED
                if params == WAIT or (plan.pruner is not None and plan.search.waits(n, history)):
                    return None
                self.next += 1
                self.log(f"trial {n}: {params_text(params)}")
                return self._start(trial_id, n, params)

        def _start(self, trial_id, n: int, params: dict) -> dict:
            self.ids[trial_id], self.params[n], self.begun[n] = n, params, time.time()
            return {"spec": json.dumps(self.plan.spec(n, params)), "number": n, "threads": self.threads}

        def save_to_dir(self, *args, **kwargs):  # the sweep's state is its folder's records, not Ray's
            pass

        def on_trial_complete(self, trial_id, result=None, error=False):

            n = self.ids.pop(trial_id, None)
            if n is None:
                return
            if n in self.pruned:
                self.state.finished(self._pruned_record(n, result))
            elif not error and result and isinstance(result.get("record"), str):
                self.state.finished(json.loads(result["record"]))
            else:
                self.lost.add(n)

        def _pruned_record(self, n: int, result) -> dict:
            curve = sorted(self.curves.get(n, {}).items())
            value = max((v for _, v in curve), default=None)
            runs = [{"seed": s, "out_dir": str(self.plan.root / run_name(n, s)), "valid_value": None,
                     "best_step": None, "finished": False} for s in self.plan.cfg.seeds]
            return {"number": n, "params": normal(self.params[n]), "baseline": False, "metric": self.plan.metric,
                    "status": "pruned", "value": value, "curve": [[s, v] for s, v in curve], "runs": runs,
                    "started": self.begun[n], "ended": time.time(), "seconds": round(time.time() - self.begun[n], 3)}

    return SweepSearcher


def _scheduler(searcher):
    from ray.tune.schedulers import FIFOScheduler, TrialScheduler

    class PruningScheduler(FIFOScheduler):
        """After each validation a trial reports, the sweep's median pruner decides whether it goes on."""

        def on_trial_result(self, tune_controller, trial, result):
            n = trial.config.get("number")
            if "record" in result or n is None or "step" not in result:
                return TrialScheduler.CONTINUE
            curve = searcher.curves.setdefault(n, {})
            curve[int(result["step"])] = float(result["valid"])
            pruner = searcher.plan.pruner
            if pruner is not None and pruner.should_prune(n, sorted(curve.items()), searcher.state.history):
                searcher.pruned.add(n)
                return TrialScheduler.STOP
            return TrialScheduler.CONTINUE

    return PruningScheduler()
