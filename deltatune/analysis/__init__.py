"""Layer analysis and embedding recycling (issue 13).

- :func:`analyze`: linear probes per layer (lexical, syntactic, structural, semantic properties of
  standard-library code), RSA and linear CKA between the pretrained model and fine-tuned ones, and a
  recommended freeze depth K (``deltatune analyze``; ``telly k=auto`` in ``deltatune train``).
- :mod:`.features`, :mod:`.similarity`, :mod:`.probing`: the measuring tools (hidden states, RSA/CKA, probes),
  which the engine uses too (``telly k=auto``: :mod:`deltatune.training.freeze`, the freeze depth from a short
  fine-tune through the one training loop). Embedding recycling is the engine's: :mod:`deltatune.training.recycle`.
"""
import importlib

# Imported on first use: `deltatune --help` and a bad flag must not pay for transformers.
_LAZY = {"analyze": "api", "rsa": "similarity", "linear_cka": "similarity", "per_layer": "similarity"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["analyze", "rsa", "linear_cka", "per_layer"]
