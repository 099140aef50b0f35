"""One trial: a configuration trained once per seed, each an ordinary run folder (``train(TrainConfig(...))``)
with the test split left out (``score_test=False``, unless the sweep's caller records every run's test score:
``SweepConfig.trial_test``); the same code on this machine and on a Ray worker.

A trial whose folders hold a checkpoint goes on from it (``resume``), so a trial cut short by a kill, on this
machine or on a worker that died, ends with the result it would have had; a run counts only once its
``metrics.json`` is written, which is the last thing a run writes. With pruning, each run trains to its
next validation (``stop_after``) and the mean validation score of the seeds is reported, and the trial stops
where ``report`` says so; checkpoints make the chunks add up to the very run trained in one go.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import time
from pathlib import Path

from .. import storage
from ..errors import ConfigError, StorageError, TrainingError

TRIAL_FIELDS = {"progress": False, "json_log": True}
BASELINE = -1  # the default configuration's record number (not a trial of the search)


def run_name(number, seed: int) -> str:
    """A trial's run folder: ``t0007-s0``; the baseline's ``default-s0``."""
    return f"{'default' if number is None or number < 0 else f't{number:04d}'}-s{seed}"


def validation_steps(config: dict) -> list[int]:
    """The steps at which a run of ``config`` validates (the loop's rule: every eval_every and at the end)."""
    from ..training.config import TrainConfig

    cfg = TrainConfig(**config)
    return sorted(set(range(cfg.eval_every, cfg.max_steps + 1, cfg.eval_every)) | {cfg.max_steps})


def run_trial(spec: dict, report=None, task=None, threads: int | None = None) -> dict:
    """Train ``spec`` (number, params, config, seeds, root, metric, prune) for each seed; returns its record.

    ``report(step, value) -> bool``: called after each validation with the seeds' mean score when pruning;
    True stops the trial there (status "pruned"). A configuration that cannot train (a NaN loss, a combination
    of options the method refuses) is a result too: status "failed", with the error.
    """
    started = time.time()
    runs = [_Run(spec, seed, task) for seed in spec["seeds"]]
    record = {"number": spec["number"], "params": spec["params"], "baseline": spec.get("baseline", False),
              "metric": spec["metric"], "started": started}
    previous = None
    if threads:
        import torch

        previous = torch.get_num_threads()
        torch.set_num_threads(max(1, int(threads)))
    try:
        status = "complete"
        if spec.get("prune") and report is not None:
            for stop in validation_steps(spec["config"]):
                for run in runs:
                    run.train(until=stop)
                point = _mean([run.valid_at(stop) for run in runs])
                if point is not None and report(stop, point):
                    status = "pruned"
                    break
        for run in runs if status == "complete" else ():
            run.train()
    except (TrainingError, ConfigError) as err:  # the configuration's own failure: a result, not a crash
        status = "failed"
        record["error"] = " ".join(str(err).split())
    finally:
        if previous is not None:
            import torch

            torch.set_num_threads(previous)
    curves = [run.curve() for run in runs]
    steps = sorted(set.intersection(*[set(c) for c in curves])) if curves else []
    record["curve"] = [[s, _mean([c[s] for c in curves])] for s in steps]
    if status == "complete":
        record["value"] = _mean([run.summary.get("valid_value") for run in runs])
    else:  # the best mean validation score it reached (not a result: never chosen)
        record["value"] = max((v for _, v in record["curve"] if v is not None), default=None)
    record["status"] = status
    record["runs"] = [run.describe() for run in runs]
    record["ended"] = time.time()
    record["seconds"] = round(record["ended"] - started, 3)
    return record


def _mean(values):
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return statistics.fmean(values) if values else None


class _Run:
    """One seed of a trial: its folder, and training it (on from its checkpoint) to a step or to the end."""

    def __init__(self, spec: dict, seed: int, task):
        self.seed, self.task, self.metric = seed, task, spec["metric"]
        self.keep_checkpoints = spec.get("keep_checkpoints", False)
        self.out = Path(spec["root"]) / run_name(spec["number"], seed)
        # score_test: only where the sweep's caller records every run's test score (SweepConfig.trial_test)
        self.config = {**spec["config"], **TRIAL_FIELDS, "score_test": bool(spec.get("score_test")), "seed": seed,
                       "out_dir": str(self.out)}
        self.summary = None
        self.resumed_from = self.step()
        if self.finished():
            self.summary = self._read_metrics()

    def step(self) -> int:
        from ..training.checkpoints import latest_checkpoint, step_of

        return step_of(latest_checkpoint(self.out)) if storage.is_dir(self.out) else 0

    def finished(self) -> bool:
        return os.path.lexists(self.out / "metrics.json")

    def _read_metrics(self) -> dict:
        """A finished run's summary, if its run.json is this trial's configuration (else a ConfigError)."""
        from ..training.runs import read_run_json

        saved = read_run_json(self.out / "run.json") if os.path.lexists(self.out / "run.json") else {}
        ours = json.loads(json.dumps(self.config))
        # what train() resolves (an lr of None, bf16 "auto", a TaskData's name) is not compared
        resolved = {"resume", "overwrite", "stop_after"} | ({"task"} if self.task is not None else set())
        differs = sorted(k for k, v in ours.items() if v is not None and v != "auto" and k not in resolved
                         and saved.get(k) != v)
        if differs:
            raise StorageError(f"{self.out} holds a run of other settings ({', '.join(differs[:4])} differ) "
                                       "than this trial's; it was not written by this sweep: move it away")
        return json.loads(storage.read_text(self.out / "metrics.json"))

    def train(self, until: int | None = None) -> None:
        """Train to step ``until`` (a validation step) or to the end, going on from the latest checkpoint."""
        if self.summary is not None:
            return
        from ..training import TrainConfig, train

        current = self.step()
        if until is not None and current >= until:
            return
        extra = {"resume": current > 0,
                 # a run of this trial killed before its first checkpoint: its own start, begun again
                 "overwrite": current == 0 and storage.RunFolder(self.out).is_run()}
        if until is not None:
            extra["stop_after"] = until - current
        out = train(TrainConfig(**{**self.config, **extra}), task=self.task)
        if "stopped_at" not in out:
            self.summary = out
            if not self.keep_checkpoints:  # finished: nothing resumes it, its best/ adapter is what stays
                with storage.RunFolder(self.out) as folder:
                    folder.check()  # locks it: no other process is writing there
                    storage.remove(self.out / "checkpoints")

    def curve(self) -> dict[int, float]:
        """{step: validation score} from the run's log (the lines of the steps it has checkpointed or finished)."""
        path = self.out / "log.jsonl"
        if not os.path.lexists(path):
            return {}
        out = {}
        for line in storage.read_text(path).splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line a kill cut short
            if isinstance(row, dict) and row.get("split") == "valid" and isinstance(row.get(self.metric), (int, float)):
                out[int(row["step"])] = float(row[self.metric])
        return out

    def valid_at(self, step: int):
        return self.curve().get(step)

    def describe(self) -> dict:
        s = self.summary or {}
        return {"seed": self.seed, "out_dir": str(self.out), "valid_value": s.get("valid_value"),
                "best_step": s.get("best_step"), "steps": s.get("steps", self.step()),
                "train_seconds": s.get("train_seconds"), "step_seconds_median": s.get("step_seconds_median"),
                "resumed_from": self.resumed_from, "finished": self.summary is not None}
