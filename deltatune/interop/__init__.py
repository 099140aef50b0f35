"""deltatune and the Hugging Face ecosystem.

* :mod:`deltatune.interop.peft`: the PEFT adapter format (``adapter_config.json`` +
  ``adapter_model.safetensors``) both ways, for lora, ia3, prompt and prefix;
  ``dt.save_adapter(model, dir, format="peft")`` writes it and ``dt.load_adapter`` reads it.
* :mod:`deltatune.interop.trainer`: :class:`DeltatuneCallback`, which saves deltatune adapters at
  ``transformers.Trainer`` checkpoints.
* :mod:`deltatune.interop.sbert`: :func:`export_sentence_transformer`, a bi-encoder as a
  sentence-transformers folder.

None of these imports peft, transformers' Trainer or sentence-transformers until it is used.
"""
