"""deltatune and the Hugging Face ecosystem.

* The PEFT adapter format lives with deltatune's own in :mod:`deltatune.formats` (``formats.peft``);
  ``dt.save_adapter(model, dir, format="peft")`` writes it and ``dt.load_adapter`` reads it.
* :mod:`deltatune.interop.trainer`: :class:`DeltatuneCallback`, which saves deltatune adapters at
  ``transformers.Trainer`` checkpoints.
* :mod:`deltatune.interop.sbert`: :func:`export_sentence_transformer`, a bi-encoder as a
  sentence-transformers folder.

Neither imports peft, transformers' Trainer or sentence-transformers until it is used.
"""
