"""Task kinds: one class per kind, registered like methods, that knows everything the kind decides.

    from deltatune.tasks.kinds import get_kind
    kind = get_kind("retrieval")             # unknown names: a ConfigError listing the known kinds
    model, tokenizer = kind.build_model("minilm")
    objective = kind(tokenizer, cfg)         # encode, collate, loss, predict, records (training's verbs)
    kind.score(task, predictions, "test")    # the task's metrics
    kind.endpoints, kind.private_refusal     # what the server answers; why private training does not apply

One file per kind (:mod:`.retrieval`, :mod:`.classification`, :mod:`.generation`, and the functional
evaluation :mod:`.humaneval`); :mod:`.base` holds :class:`TaskKind`, the registry and the tokenising
every objective shares, :mod:`.lm_loss` the causal-LM loss with the head in chunks. A new kind is one
file here holding a ``@register_kind`` subclass of :class:`TaskKind`: importing this package imports
every module in it, which registers them all. Nothing outside a kind compares kind names: ask the
kind (``get_kind(task.kind)``).
"""
import importlib
import pkgutil

from .base import CHARS_PER_TOKEN, KINDS, TaskKind, build_task_model, get_kind, register_kind

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")

from .classification import Classification  # noqa: E402  (the built-in kinds and helpers, by name)
from .generation import Generation  # noqa: E402
from .humaneval import HumanEval  # noqa: E402
from .lm_loss import CHUNK_LOGITS, IGNORE, causal_lm_loss, head_in_chunks, linear_cross_entropy  # noqa: E402
from .retrieval import Retrieval  # noqa: E402

__all__ = ["TaskKind", "KINDS", "register_kind", "get_kind", "build_task_model", "Retrieval", "Classification",
           "Generation", "HumanEval", "CHARS_PER_TOKEN", "IGNORE", "CHUNK_LOGITS", "causal_lm_loss", "head_in_chunks",
           "linear_cross_entropy"]
