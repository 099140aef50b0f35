"""The functional evaluation (HumanEval, Chen et al. 2021): a completion counts when its program passes the tests.

Nothing is trained on this kind: an adapter trained on a generation task (``code-generation``) is
scored by its evaluation runner, registered with its task (``deltatune.tasks.humaneval``), which
loads the problems, generates with the causal LM this kind builds, runs each program in the sandbox
and reports pass@k. The server serves such adapters as the generation adapters they are.
"""
from __future__ import annotations

from deltatune.errors import DataError

from .base import register_kind
from .generation import Generation


@register_kind
class HumanEval(Generation):
    name = "humaneval"
    columns = None  # no data files: the problems come with their tests
    metric, metrics = "pass@1", ("pass@1", "pass@10")
    endpoints = ()
    trains = False
    functional = True
    private_refusal = "HumanEval is an evaluation: nothing is trained on it, privately or not"

    @classmethod
    def score(cls, task, predictions, split):
        raise DataError(f"{task.name} is scored by running its programs against their tests, not by comparing "
                        "predictions: use deltatune eval --task humaneval")

    @classmethod
    def evaluate(cls, run, adapter, *, model: str | None = None, max_eval: int | None = None,
                 batch_size: int | None = None, out_dir=None) -> dict:
        """pass@1 of greedy completions of ``adapter`` (on ``model``, by default the one its run.json names;
        None: the bare ``model``) on the first ``max_eval`` problems (all without), through the task's runner
        ``run`` (``tasks.humaneval.evaluate``)."""
        return run(model=model, adapter=adapter, limit=max_eval, batch_size=batch_size or 8, out_dir=out_dir)
