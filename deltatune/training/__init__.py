"""The engine: one training loop for every method and task kind, and what it needs around it.

    from deltatune.training import TrainConfig, train, evaluate
    summary = train(TrainConfig(model="minilm", task="code-search", method="lora", out_dir="runs/x"))
    evaluate("runs/x/best")                    # scores the best adapter on the test split again

One module per job: ``config`` (TrainConfig and its one validator), ``run`` (``train``: a run from its
configuration to its summary), ``loop`` (the optimizer steps, validation, the data order), ``evaluate``
(scoring, zero-shot, ``evaluate``), ``memory`` (batch fit, checkpointing, positions), ``outdir`` (the out
folder's guards and log), ``runs`` (run folders as their readers see them), ``checkpoints``,
``distributed``, ``privacy``, ``recycle`` (embedding recycling) and ``freeze`` (telly's ``k=auto``: a freeze
depth from a short fine-tune through the same loop). What differs between task kinds (the objectives, the
model and head, the scoring) is the kinds' own: ``deltatune.tasks.kinds``, which the engine asks.
"""
import importlib

# Imported on first use, so that `deltatune train --help` (which reads TrainConfig's declarations) loads no
# more of the engine than its configuration.
_LAZY = {"TrainConfig": "config", "native_bf16": "config", "evaluate": "scoring", "train": "run",
         "resolve_adapter": "runs", "default_eval_dir": "runs", "PREDICTIONS": "runs"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["TrainConfig", "train", "evaluate", "resolve_adapter", "default_eval_dir", "PREDICTIONS", "native_bf16"]
