"""Adapter formats: where an adapter's files come from and go to, chosen in one place.

* :mod:`.native`: deltatune's own format (``adapter.safetensors`` with the config in its metadata, plus
  ``adapter_config.json``), validated as untrusted data; it also attaches what any format read.
* :mod:`.peft`: the Hugging Face PEFT format (``adapter_model.safetensors`` + ``adapter_config.json``),
  converted to and from deltatune's (config, tensors).

A format is a module with ``save(model, path, adapter, fold)``; a readable one also has
``recognises(path)`` and ``to_deltatune(model, path) -> (config, tensors)``. ``FORMATS`` lists them;
the native format reads whatever no other format recognises.
"""
from __future__ import annotations

from pathlib import Path

from .. import registry
from ..errors import ConfigError
from . import native, peft
from .native import read_adapter

FORMATS = {"deltatune": native, "peft": peft}
registry.set_adapter_reader(read_adapter)  # for methods whose options name saved adapters (ATTEMPT)


def save_adapter(model, path, adapter: str | None = None, fold: bool = True, format: str = "deltatune") -> Path:
    """Save one adapter of ``model`` to directory ``path`` (atomically). ``fold=False`` keeps training-only
    parts (deltatune's format only); ``format="peft"`` writes the Hugging Face PEFT format."""
    if format not in FORMATS:
        raise ConfigError(f"unknown adapter format {format!r}; formats: {', '.join(FORMATS)}")
    return FORMATS[format].save(model, path, adapter, fold)


def format_of(path) -> str:
    """The name of the format the adapter directory ``path`` is written in."""
    return next((name for name, fmt in FORMATS.items() if fmt is not native and fmt.recognises(path)), "deltatune")


def load_adapter(model, path, adapter: str | None = None, check_base: bool = True, heads: dict | None = None):
    """Attach the adapter saved at ``path`` (any format in ``FORMATS``) to ``model`` and load its weights.

    Everything is validated first (format, method, options, base architecture, shapes, finite
    values, and a fingerprint of the base weights unless ``check_base=False``); on any error the
    model is left as it was. With a dict ``heads``, the file's task-head tensors (``head.*``) are put
    there instead of into the model.
    """
    fmt = FORMATS[format_of(path)]
    config, tensors = read_adapter(path) if fmt is native else fmt.to_deltatune(model, path)
    return native.attach_loaded(model, path, config, tensors, adapter, check_base, heads)


__all__ = ["FORMATS", "save_adapter", "load_adapter", "read_adapter", "format_of", "native", "peft"]
