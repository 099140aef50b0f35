"""Layer analysis and embedding recycling (issue 13).

- :func:`analyze`: linear probes per layer (lexical, syntactic, structural, semantic properties of
  standard-library code), RSA and linear CKA between the pretrained model and fine-tuned ones, and a
  recommended freeze depth K (``deltatune analyze``; ``telly k=auto`` in ``deltatune train``).
- :mod:`deltatune.analysis.recycle`: the frozen lower part's output cached once on disk, training and
  evaluation starting from it (``deltatune train --recycle``).
"""
from .api import analyze
from .freeze import freeze_depth, recommend_k, rule_text
from .similarity import linear_cka, per_layer, rsa

__all__ = ["analyze", "freeze_depth", "recommend_k", "rule_text", "rsa", "linear_cka", "per_layer"]
