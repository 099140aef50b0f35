"""A deltatune model outside deltatune: a bi-encoder as a sentence-transformers model folder, any model
with its adapters merged as a plain transformers folder (:func:`export_merged`).

:func:`export_sentence_transformer` merges the active adapters into a copy of the encoder's weights
and writes a folder that ``sentence_transformers.SentenceTransformer(folder)`` loads: the merged
transformers model and its tokenizer, then mean pooling over the attention mask and L2
normalisation, which is what :class:`deltatune.models.BiEncoder` computes (MiniLM's own pipeline).
Only adapters that merge into the weights can be exported this way: prompts, prefixes and
sequential adapters change the computation itself, which a plain transformers model cannot hold.
"""
from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..formats import native as io
from ..errors import ConfigError, StorageError
from ..storage import user_path


def _encoder(model):
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        return model
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, PreTrainedModel):
        return backbone
    raise ConfigError(f"{type(model).__name__} is neither a deltatune BiEncoder nor a transformers encoder; "
                      "export_sentence_transformer takes one of those")


def _check_mergeable(model) -> list[str]:
    import deltatune as dt

    if not dt.adapters(model):
        return []
    names = dt.active_adapters(model)
    for name in names:
        method = io.adapter_tensors(model, name)[1]["method"]
        if not dt.method_info(method)["mergeable"]:
            raise ConfigError(f"adapter '{name}' ({method}) does not merge into the weights, so a plain "
                              "sentence-transformers model cannot compute it; export adapters of a mergeable "
                              "method (lora, ia3, bitfit, ln, full, ...) or keep the model in deltatune")
    return names


@torch.no_grad()
def merged_state(model) -> dict:
    """The encoder's state dict with the active adapters folded into its weights; ``model`` is left as it was."""
    import deltatune as dt

    encoder = _encoder(model)
    names = _check_mergeable(model)
    if names:
        dt.merge(model)
    try:
        return {k: v.detach().clone() for k, v in encoder.state_dict().items() if not k.startswith("deltatune.")}
    finally:
        if names:
            dt.unmerge(model)


def plain_copy(model):
    """A plain transformers model (the class of the one inside ``model``) holding its weights with the active
    adapters folded in: what loads with ``from_pretrained`` and knows nothing of deltatune."""
    encoder = _encoder(model)
    state = merged_state(model)
    with torch.device("meta"):
        plain = type(encoder)(copy.deepcopy(encoder.config))
    plain.load_state_dict(state, assign=True, strict=True)
    if getattr(plain.config, "tie_word_embeddings", False):  # the copy holds two tensors where the model ties one
        plain.tie_weights()
    return plain.eval()


def check_new(path, what: str = "the export folder") -> Path:
    """``path`` is a new folder to write, or an empty one (not a link); a one-line error otherwise."""
    if path is None or not str(path).strip():
        raise ConfigError(f"{what} is empty; name a new folder to export to")
    path = user_path(path, what)  # no NUL, not too long, no loop of links
    if os.path.islink(path):
        raise ConfigError(f"{what} {path} is a symbolic link (to {os.readlink(path)}); export to a new folder")
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConfigError(f"{what} {path} exists and is not an empty folder; export to a new folder")
    return path


def _new_folder(path, write) -> Path:
    """``write(tmp)`` into a temporary sibling of the new folder ``path``, then rename it into place."""
    path = check_new(path)
    try:  # a folder of its own at an unpredictable name (never one that was there: a planted link or a user's)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        os.chmod(tmp, 0o755)
    except OSError as err:
        raise StorageError(f"cannot write {path}: {err.strerror or err}") from None
    try:
        write(tmp)
        if path.exists():
            path.rmdir()  # empty, checked above
        os.replace(tmp, path)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StorageError(f"cannot write {path}: {err}") from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    io.fsync_dir(path.parent)
    return path


def export_merged(model, tokenizer, path) -> Path:
    """Write ``model``'s transformers model with its active (mergeable) adapters folded into the weights to the
    new folder ``path``, with the tokenizer: ``AutoModel.from_pretrained(path)`` (or the model's own class) loads
    it without deltatune."""
    check_new(path)
    plain = plain_copy(model)

    def write(tmp):
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return _new_folder(path, write)


def export_sentence_transformer(model, tokenizer, path, max_seq_length: int | None = None) -> Path:
    """Write ``model`` (a BiEncoder, or a bare encoder, with mergeable adapters) to the new folder ``path``
    as a sentence-transformers model: Transformer -> mean Pooling -> Normalize.

    ``max_seq_length``: longer inputs are truncated by sentence-transformers (default: the tokenizer's
    ``model_max_length``, capped at the model's position embeddings).
    """
    try:
        from sentence_transformers import SentenceTransformer
        try:
            from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
        except ImportError:  # sentence-transformers < 6
            from sentence_transformers.models import Normalize, Pooling, Transformer
    except ImportError:
        raise ConfigError("sentence-transformers is not installed: pip install sentence-transformers") from None
    check_new(path)
    plain = plain_copy(model)
    config = plain.config
    limit = getattr(config, "max_position_embeddings", None) or 512
    if max_seq_length is None:
        max_seq_length = min(int(getattr(tokenizer, "model_max_length", limit) or limit), limit)

    def write(tmp):
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        st = SentenceTransformer(modules=[Transformer(str(tmp), max_seq_length=max_seq_length),
                                          Pooling(config.hidden_size, "mean"), Normalize()], device="cpu")
        st.save(str(tmp))
    return _new_folder(path, write)
