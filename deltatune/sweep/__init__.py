"""Sweeps: a search over run settings and method options, chosen on the validation split.

    from deltatune.sweep import SweepConfig, run_sweep
    result = run_sweep(SweepConfig(
        base={"model": "minilm", "task": "code-search", "method": "lora", "max_steps": 15, "max_eval": 200},
        space={"lr": "log:1e-4..1e-2", "options": {"r": "4,8,16"}},   # TrainConfig's shape: options under "options"
        algorithm="grid", seeds=[0], out="runs/sweep-lora"))
    result["chosen"]["params"], result["test"]["value"]

Each trial is an ordinary run folder (``deltatune.training.train``) with the test split left out; the test
split is scored once, for the chosen configuration. The modules: ``space`` (dimensions typed by the fields'
declarations, checked before anything runs), ``search`` (grid with edge extension, random, Optuna's TPE, the
median pruner), ``trial`` (one trial's runs, here or on a worker), ``run`` (the driver: plan, resume, choose,
score test), ``cluster`` (the same trials on Ray Tune), ``files`` (the folder's sweep.json and records, read back)
and ``report`` (table, CSV, plot, the comparison; rebuilt from the folder alone by ``deltatune report``).
"""
from .config import SweepConfig
from .run import plan, run_sweep
from .space import Dimension, Space, build_space

__all__ = ["Dimension", "Space", "SweepConfig", "build_space", "plan", "run_sweep"]
