"""The engine: one training loop for every method and task kind, and what it needs around it.

    from deltatune.training import TrainConfig, train, evaluate
    summary = train(TrainConfig(model="minilm", task="code-search", method="lora", out_dir="runs/x"))
    evaluate("runs/x/best")                    # scores the best adapter on the test split again

One module per job: ``config`` (TrainConfig and its one validator), ``run`` (``train``: a run from its
configuration to its summary), ``loop`` (the optimizer steps, validation, the data order), ``evaluate``
(scoring, zero-shot, ``evaluate``), ``memory`` (batch fit, checkpointing, positions), ``outdir`` (the out
folder's guards and log), ``runs`` (run folders as their readers see them), ``checkpoints``,
``objectives``, ``distributed``, ``privacy``, ``recycle`` (embedding recycling) and ``freeze`` (telly's
``k=auto``: a freeze depth from a short fine-tune through the same loop).
"""
from .config import TrainConfig, native_bf16
from .scoring import evaluate
from .run import train
from .runs import PREDICTIONS, default_eval_dir, resolve_adapter

__all__ = ["TrainConfig", "train", "evaluate", "resolve_adapter", "default_eval_dir", "PREDICTIONS", "native_bf16"]
