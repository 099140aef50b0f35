"""A sweep's settings, declared once (``deltatune.settings``): the `sweep` command's flags are generated from
them, and :func:`settings.check` checks them before anything runs."""
from __future__ import annotations

from dataclasses import dataclass

from ..settings import setting

ALGORITHMS = ("grid", "random", "tpe")
DEFAULT_TRIALS = 20  # random and tpe, when neither --trials nor --time-budget says how long


@dataclass
class SweepConfig:
    """A search over run settings and method options.

    ``base``: the TrainConfig keyword arguments every trial shares (model, task, method, max_steps, ...; the
    method's fixed options under ``options``); ``space``: the searched ones in the same shape, as text
    (``"log:1e-5..1e-2"``, ``"4,8,16"``), a list of values or a :class:`~deltatune.sweep.space.Dimension`::

        SweepConfig(base={"model": "minilm", "task": "code-search", "method": "lora", "max_steps": 15},
                    space={"lr": "log:1e-4..1e-2", "options": {"r": [4, 8, 16]}}, algorithm="grid",
                    out="runs/sweep-lora")
    """

    base: dict = setting({}, flag=False, help="TrainConfig keyword arguments every trial shares")
    space: dict = setting({}, flag=False, help="the searched TrainConfig fields (method options under 'options')")
    labels: dict = setting({}, flag=False, help="how the command line named each searched field, for errors")
    seeds: list = setting([0], flag=False, help="every trial trains once per seed; its score is their mean")
    algorithm: str = setting("tpe", choices=ALGORITHMS,
                             help="grid (every point, then past an edge where the best sits), random, or tpe "
                                  "(Optuna's Tree-structured Parzen Estimator)")
    trials: int | None = setting(None, min=1, max=100_000, metavar="N",
                                 default_text=f"the whole grid and its extensions; {DEFAULT_TRIALS} for random and "
                                              "tpe unless --time-budget is given",
                                 help="the most trials (a finished sweep goes on when given more)")
    time_budget: float | None = setting(None, min=1.0, max=1e9, metavar="SECONDS", default_text="none",
                                        help="start no trial after this many seconds of this call (running ones end)")
    prune: str | None = setting(None, choices=("median", "none"), metavar="median|none",
                                default_text="median for tpe where runs validate before their end, else none",
                                help="median: stop a trial whose validation score is below the median of the "
                                     "finished trials' at the same step (Optuna's median pruner; a trial needs "
                                     "several validations: --eval-every below --max-steps)")
    prune_startup: int = setting(5, min=0, max=100_000, metavar="N",
                                 help="finished trials before any trial is pruned")
    tpe_startup: int | None = setting(None, min=1, max=100_000, metavar="N",
                                      default_text="a third of --trials, between 3 and 10",
                                      help="tpe: random trials before the model of the results guides the search")
    concurrency: int | None = setting(None, min=1, max=4096, metavar="N",
                                      default_text="1 here; with --ray, the trials the cluster holds at once",
                                      help="trials that run at once, in rounds: what reads results (tpe, pruning) "
                                           "reads only earlier rounds, so the trials are the same wherever they run")
    extend: int = setting(2, min=0, max=1000, metavar="N",
                          help="grid: points added past an edge where the best trial sits, at most, each way per "
                               "setting")
    grid_points: int = setting(4, min=2, max=10_000, metavar="N",
                               help="grid: points of a range that does not give its own (:N)")
    search_seed: int = setting(0, min=0, max=2**32 - 1, metavar="N",
                               help="seeds random and tpe's draws (the runs' seeds are --seeds)")
    baseline: bool = setting(False, help="also train the default configuration (the searched settings left to "
                                         "their defaults) and compare the chosen one with it on test")
    keep_checkpoints: bool = setting(False, help="keep a finished run's checkpoints/ (by default it keeps its best/ "
                                                 "adapter, log and metrics; the resumable state, which for full "
                                                 "fine-tuning is the size of the model twice, goes)")
    score_test: bool = setting(True, flag=False, help="score the chosen configuration (and the baseline) on the "
                                                      "test split at the end")
    trial_test: bool = setting(False, flag=False, help="also score every trial's runs on the test split (and the "
                                                       "untrained model, zero-shot), for a harness that records each "
                                                       "run's test score (experiments/findings); the choice still "
                                                       "reads validation only")
    out: str | None = setting(None, flag=False, help="the sweep's folder")
    storage: str | None = setting(None, metavar="DIR", default_text="the sweep's folder",
                                  help="where the trials' run folders go (with --ray: a path every node sees)")
    ray: str | None = setting(None, flag=False, help="a Ray cluster's address, or auto")
    cpus_per_trial: float | None = setting(None, min=0.0, max=4096.0, metavar="N",
                                           default_text="with --ray, the CPUs of the smallest worker; here, torch's "
                                                        "own thread count",
                                           help="CPUs (torch threads) per trial")
    gpus_per_trial: float = setting(0.0, min=0.0, max=64.0, metavar="N", help="with --ray: GPUs per trial")
    max_failures: int = setting(2, min=0, max=1000, metavar="N",
                                help="with --ray: times a trial whose worker died is tried again (from its "
                                     "checkpoint)")
