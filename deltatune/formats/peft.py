"""The Hugging Face PEFT adapter format, both ways: ``adapter_config.json`` + ``adapter_model.safetensors``.

``dt.save_adapter(model, dir, format="peft")`` writes an adapter that ``peft.PeftModel.from_pretrained``
loads, and ``dt.load_adapter(model, dir)`` reads a PEFT directory as well as a deltatune one. Only
exact conversions are made: the converted adapter computes the same function (to float rounding);
where the two libraries compute different things, the conversion is refused and the error says why.
Nothing here imports peft: the format is plain safetensors and JSON.

What maps to what (peft 0.21):

* lora: ``<module>.lora_A.weight`` (r, in) and ``lora_B.weight`` (out, r), scaled by lora_alpha / r
  (lora_alpha / sqrt(r) with use_rslora; per-module rank_pattern / alpha_pattern). GPT-2's q, k and v
  are slices of one Conv1D, c_attn, which peft can only adapt whole: deltatune LoRAs on the slices
  become one LoRA on c_attn whose A stacks theirs and whose B is block-diagonal (zeros elsewhere),
  an exact rewrite with a larger rank; all modules then share the largest rank (smaller ones are
  padded with zeros) and lora_alpha keeps deltatune's alpha / r scale.
* ia3: ``<module>.ia3_l``, (out, 1) scales the output, (1, in) the input of the
  ``feedforward_modules``. A slice scale on c_attn becomes a full-width vector with ones elsewhere.
* prompt: ``prompt_embeddings`` (num_virtual_tokens, hidden). Both libraries prepend the vectors to
  the input embeddings, with position ids 0..n-1 for them and n.. for the tokens; deltatune then
  removes the prompt positions from the outputs, peft returns them, so the outputs agree at the
  real positions (and the pooler of a sequence classifier reads the first prompt vector in both).
  Refused on encoder-decoders (see ``_PROMPT_SEQ2SEQ``).
* prefix: ``prompt_embeddings`` (num_virtual_tokens, num_layers * 2 * kv_heads * head_dim): per
  token, layer after layer, the keys then the values, each (kv_heads, head_dim). peft passes the
  prefix as ``past_key_values``, so the real tokens sit at positions n..n+T-1; deltatune prepends
  keys and values inside attention and leaves the tokens at 0..T-1. Under rotary embeddings (the
  llama family) that is the same function once the prefix keys are rotated by n positions, which
  the conversion does; with learned absolute positions (GPT-2, BERT, BART) or T5's relative bias
  it is not, and the conversion is refused (see ``_PREFIX_REFUSED``).
"""
from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from .. import sites
from . import native as io
from ..errors import AdapterFileError, ConfigError

CONFIG, WEIGHTS, PICKLE = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
PEFT_TYPE = {"lora": "LORA", "ia3": "IA3", "prompt": "PROMPT_TUNING", "prefix": "PREFIX_TUNING"}
METHOD_OF = {v: k for k, v in PEFT_TYPE.items()}
_MAX_CONFIG_BYTES = 1 << 20
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Task types whose peft forward prepends prompts and prefixes as described above.
_PROMPT_TASKS = ("SEQ_CLS", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
# peft wraps these heads by itself for the task types (PeftModelFor*): they are never LoRA targets.
_AUTO_SAVED = {"SEQ_CLS": ["classifier", "score"], "TOKEN_CLS": ["classifier", "score"], "QUESTION_ANS": ["qa_outputs"]}

_PROMPT_SEQ2SEQ = (
    "prompt tuning on encoder-decoder models differs between the libraries: deltatune removes the prompt "
    "positions from the encoder output, so the decoder cross-attends to the real tokens only, while peft "
    "keeps them (and peft saves a second, unused block of decoder prompt vectors); the outputs would differ"
)
_PROMPT_CLS = (
    "a sequence classifier reads one position of the sequence, and under prompt tuning the libraries read "
    "different ones: peft's head sees the soft prompt vectors as part of the sequence (BERT's pooler and "
    "RoBERTa's classifier read the first soft vector; a decoder's classifier, given inputs_embeds, cannot find "
    "the padding and reads the last position), deltatune's head sees the real tokens only ([CLS], the last "
    "real token); the outputs differ (the hidden states at the real positions agree)"
)
_PROMPT_POOLER = (
    "this model's head reads the backbone's pooler, which deltatune recomputes from the first real token "
    "([CLS]) and peft's reads from the first soft prompt vector; the outputs would differ"
)
_PREFIX_REFUSED = {
    "gpt2": "with learned absolute positions peft's prefix (past_key_values) moves the real tokens to positions "
            "n..n+T-1 while deltatune keeps them at 0..T-1, so the same tables give different outputs; no "
            "rewrite of the tables makes them agree (only rotary positions, the llama family, can be converted)",
    "bert": "peft's prefix tuning needs past_key_values, which this transformers version's encoder-only models "
            "do not accept (peft raises 'Model does not support past key values')",
    "bart": "peft 0.21's prefix on encoder-decoders reaches only the decoder self-attention, gives every decoder "
            "layer the first layer's slice of its table and moves the decoder tokens' learned positions by n, "
            "while deltatune's prefix is at every attention (encoder, decoder, cross); the outputs differ",
    "t5": "peft 0.21's prefix on encoder-decoders reaches only the decoder self-attention, gives every decoder "
          "layer the first layer's slice of its table and gives the prefix keys a relative position bias, while "
          "deltatune's prefix is at every attention (encoder, decoder, cross) with no bias; the outputs differ",
    "vit": "peft's prefix tuning needs a language model that takes past_key_values",
}


# ------------------------------------------------------------------ shared helpers

def hf_root(model):
    """(dotted path, module) of the outermost Hugging Face PreTrainedModel in ``model``: what a peft
    user passes to ``PeftModel``, and what peft's module names are relative to."""
    from transformers import PreTrainedModel

    for name, module in model.named_modules():
        if isinstance(module, PreTrainedModel):
            return name, module
    raise ConfigError(f"{type(model).__name__} holds no Hugging Face PreTrainedModel; the PEFT format needs one")


def task_type(root) -> str | None:
    """peft's task type for a transformers model class (None: peft's plain PeftModel)."""
    name = type(root).__name__
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if name.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    if name.endswith("ForQuestionAnswering"):
        return "QUESTION_ANS"
    if getattr(root.config, "is_encoder_decoder", False) and name.endswith("ForConditionalGeneration"):
        return "SEQ_2_SEQ_LM"
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "CAUSAL_LM"
    if root.base_model is root:
        return "FEATURE_EXTRACTION"
    return None


def _rel(prefix: str, name: str) -> str:
    if not prefix:
        return name
    if not name.startswith(prefix + "."):
        raise ConfigError(f"'{name}' lies outside the Hugging Face model '{prefix}'; the PEFT format cannot hold it")
    return name[len(prefix) + 1:]


def _full(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _linear(module):
    """(in, out) of a Linear or GPT-2 Conv1D, else None."""
    return sites._linear_features(module)


def _is_conv1d(module) -> bool:
    return type(module).__name__ == "Conv1D"


def _peft_list_match(name: str, targets) -> bool:
    """peft's rule for a list of target_modules: the name itself, or a name ending in '.target'."""
    return name in targets or any(name.endswith("." + t) for t in targets)


def _saved_match(name: str, saved) -> bool:
    """peft's rule for excluding modules_to_save from the targets."""
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in saved)


def _suffixes(names, depth: int) -> list[str]:
    return sorted({".".join(n.split(".")[-depth:]) for n in names})


def _target_lists(root, chosen: set[str], saved, subset: set[str] | None = None):
    """Short target_modules names (and for (IA)^3 the feedforward subset's) that select exactly
    ``chosen`` (and ``subset``) under peft's matching rules: the shortest suffixes that do."""
    names = [n for n, _ in root.named_modules() if n]
    for depth in range(1, max(n.count(".") + 1 for n in chosen) + 1):
        targets = _suffixes(chosen, depth)
        found = {n for n in names if _peft_list_match(n, targets) and not _saved_match(n, saved)}
        if found != chosen:
            continue
        if subset is None:
            return targets, None
        ff = _suffixes(subset, depth) if subset else []
        if {n for n in chosen if any(n.endswith(t) for t in ff)} == subset:  # peft's feedforward rule
            return targets, ff
    raise ConfigError("cannot name the adapted modules in a way peft selects exactly; "
                      f"modules: {sorted(chosen)[:4]}...")


def _deltas(tensors: dict) -> list[tuple[str, tuple, dict]]:
    """(module name, key marks, {param: tensor}) per deltatune delta: key 'a:b:c~q~in' -> 'a.b.c', ('q', 'in')."""
    grouped: dict[str, dict] = defaultdict(dict)
    for k, t in tensors.items():
        if k.startswith("delta."):
            key, pname = k[len("delta."):].split(".", 1)
            grouped[key][pname] = t
    out = []
    for key, params in sorted(grouped.items()):
        module, *marks = key.split("~")
        out.append((module.replace(":", "."), tuple(marks), params))
    return out


def _dt_key(module: str, *marks: str) -> str:
    """deltatune's key of a delta at ``module`` (the inverse of ``_deltas``)."""
    return "~".join([module.replace(".", ":"), *marks])


def _head_modules(root, prefix: str, head: dict) -> tuple[list[str], dict]:
    """The smallest modules whose parameters are exactly the head's: peft's modules_to_save."""
    rel = {_rel(prefix, n): t for n, t in head.items()}
    chosen: list[str] = []
    for name, module in root.named_modules():
        if not name or any(name.startswith(c + ".") for c in chosen):
            continue
        params = [f"{name}.{p}" for p, _ in module.named_parameters()]
        if params and all(p in rel for p in params):
            chosen.append(name)
    covered = {f"{c}.{p}" for c in chosen for p, _ in root.get_submodule(c).named_parameters()}
    if covered != set(rel):
        raise ConfigError(f"the trained head parameters {sorted(set(rel) - covered)[:4]} are part of modules "
                          "whose other parameters are frozen; peft's modules_to_save trains whole modules")
    return chosen, rel


def _rope_rotate(model, keys: torch.Tensor, shift: int) -> torch.Tensor:
    """Rotate keys (..., head_dim) by ``shift`` positions (negative: back) with the model's own rotary embedding."""
    _, backbone = sites.find_backbone(model)
    rope = getattr(backbone, "rotary_emb", None)
    if rope is None:
        raise ConfigError(f"{type(backbone).__name__} has no rotary_emb; cannot convert prefix keys exactly")
    head_dim = keys.shape[-1]
    p = next(backbone.parameters())
    probe = torch.zeros(1, 1, head_dim, device=p.device, dtype=torch.float64)  # cos, sin come back in its dtype
    with torch.no_grad():
        cos, sin = rope(probe, torch.tensor([[abs(shift)]], device=p.device))
    if cos.shape[-1] != head_dim:
        raise ConfigError(f"partial rotary embeddings ({cos.shape[-1]} of {head_dim} dims) are not supported here")
    scale = float(getattr(rope, "attention_scaling", 1.0) or 1.0)
    cos, sin = (cos[0, 0].double() / scale), (sin[0, 0].double() / scale)
    k = keys.double()
    half = head_dim // 2
    rotated = torch.cat([-k[..., half:], k[..., :half]], dim=-1)  # transformers' rotate_half
    sign = 1.0 if shift >= 0 else -1.0
    return (k * cos.to(k.device) + sign * rotated * sin.to(k.device)).to(keys.dtype)


# ------------------------------------------------------------------ deltatune -> PEFT

def peft_state(model, adapter: str | None = None) -> tuple[dict, dict]:
    """(tensors, config) of one deltatune adapter in the PEFT format, as :func:`save` writes them."""
    tensors, config = io.adapter_tensors(model, adapter, fold=True)
    method, options = config["method"], config["options"]
    if method not in PEFT_TYPE:
        raise ConfigError(f"method '{method}' has no PEFT counterpart; the PEFT format holds lora, ia3, prompt "
                          "and prefix adapters (save this one with format='deltatune')")
    if any(k.startswith("base.") for k in tensors):
        raise ConfigError(f"this {method} adapter also trains base parameters, which the PEFT format cannot hold")
    prefix, root = hf_root(model)
    task = task_type(root)
    head = {k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")}
    saved, head_rel = _head_modules(root, prefix, head) if head else ([], {})
    out_cfg = {
        "peft_type": PEFT_TYPE[method],
        "task_type": task,
        "base_model_name_or_path": getattr(root.config, "_name_or_path", None) or None,
        "inference_mode": True,
        "modules_to_save": saved or None,
    }
    deltas = _deltas(tensors)
    excluded = saved + _AUTO_SAVED.get(task, [])
    if method == "lora":
        out_t, extra = _lora_out(model, prefix, root, deltas, options, excluded)
    elif method == "ia3":
        out_t, extra = _ia3_out(model, prefix, root, deltas, excluded)
    elif method == "prompt":
        out_t, extra = _prompt_out(model, root, task, deltas)
    else:
        out_t, extra = _prefix_out(model, root, task, deltas, options)
    out_cfg.update(extra)
    where = "base_model." if method in ("prompt", "prefix") else "base_model.model."
    out_t.update({where + n: t for n, t in head_rel.items()})
    return {k: v.detach().to("cpu").contiguous() for k, v in out_t.items()}, out_cfg


def _lora_out(model, prefix, root, deltas, options, excluded):
    r, alpha = options["r"], float(options["alpha"])
    per_module: dict[str, list] = defaultdict(list)  # module -> [(A, B padded to the module's full output)]
    for module_name, marks, params in deltas:
        module = model.get_submodule(module_name)
        d_in, d_out = _linear(module)
        A, B = params["A"], params["B"]
        if marks:  # a slice of a fused projection (GPT-2 c_attn holds q, k, v)
            width = d_out // 3
            i = "qkv".index(marks[0])
            full = torch.zeros(d_out, B.shape[1], dtype=B.dtype)
            full[i * width:(i + 1) * width] = B
            B = full
        per_module[_rel(prefix, module_name)].append((A, B))
    rank = max(sum(A.shape[0] for A, _ in parts) for parts in per_module.values())
    tensors = {}
    for name, parts in per_module.items():
        A = torch.cat([a for a, _ in parts], dim=0)
        B = torch.zeros(parts[0][1].shape[0], A.shape[0], dtype=parts[0][1].dtype)
        at = 0
        for a, b in parts:  # block-diagonal: each A row block feeds only its own B columns
            B[:, at:at + a.shape[0]] = b
            at += a.shape[0]
        pad = rank - A.shape[0]  # zero rows / columns add nothing: one rank for every module
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.cat([A, A.new_zeros(pad, A.shape[1])])
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.cat([B, B.new_zeros(B.shape[0], pad)], dim=1)
    targets, _ = _target_lists(root, set(per_module), excluded)
    lora_alpha = alpha * rank / r  # peft scales by lora_alpha / r: keep deltatune's alpha / r
    if float(lora_alpha).is_integer():
        lora_alpha = int(lora_alpha)
    fused = any(_is_conv1d(root.get_submodule(n)) for n in per_module)
    return tensors, {
        "r": rank, "lora_alpha": lora_alpha, "lora_dropout": float(options.get("dropout", 0.0)),
        "target_modules": targets, "fan_in_fan_out": fused, "bias": "none", "use_rslora": False,
        "use_dora": False, "init_lora_weights": True, "rank_pattern": {}, "alpha_pattern": {},
    }


def _ia3_out(model, prefix, root, deltas, excluded):
    outputs: dict[str, torch.Tensor] = {}
    inputs: dict[str, torch.Tensor] = {}
    for module_name, marks, params in deltas:
        module = model.get_submodule(module_name)
        d_in, d_out = _linear(module)
        name, l = _rel(prefix, module_name), params["l"]
        if "in" in marks:
            inputs[name] = l
            continue
        vec = outputs.setdefault(name, torch.ones(d_out, dtype=l.dtype))  # scales at one module multiply
        if marks:  # a slice of GPT-2's c_attn: ones on the other slices leave them as they are
            width = d_out // 3
            i = "qkv".index(marks[0])
            vec[i * width:(i + 1) * width] *= l
        else:
            vec *= l
    both = sorted(set(inputs) & set(outputs))
    if both:
        raise ConfigError(f"peft's (IA)^3 scales either the input or the output of a module, not both; this adapter "
                          f"scales both at {both[:3]}")
    tensors = {f"base_model.model.{n}.ia3_l": v.reshape(-1, 1) for n, v in outputs.items()}
    tensors.update({f"base_model.model.{n}.ia3_l": v.reshape(1, -1) for n, v in inputs.items()})
    targets, ff = _target_lists(root, set(outputs) | set(inputs), excluded, subset=set(inputs))
    fused = any(_is_conv1d(root.get_submodule(n)) for n in (*outputs, *inputs))
    return tensors, {"target_modules": targets, "feedforward_modules": ff, "fan_in_fan_out": fused,
                     "init_ia3_weights": True}


def _prompt_fields(model, root, task, length: int) -> dict:
    d_model, heads, _, _ = sites.attention_shape(model)
    return {"task_type": task, "num_virtual_tokens": length, "token_dim": d_model, "num_transformer_submodules": 1,
            "num_attention_heads": heads, "num_layers": sites.num_layers(model)}


def _check_prompt_model(model, root, task):
    if getattr(root.config, "is_encoder_decoder", False):
        return _PROMPT_SEQ2SEQ
    if task == "SEQ_CLS":
        return _PROMPT_CLS
    _, backbone = sites.find_backbone(model)
    if backbone is not root and getattr(backbone, "pooler", None) is not None:
        return _PROMPT_POOLER
    return None


def _check_prompt_task(task, what: str):
    if task not in _PROMPT_TASKS:
        raise ConfigError(f"peft applies {what} only through a task-specific PeftModel ({', '.join(_PROMPT_TASKS)}); "
                          f"this model's class maps to task type {task}, where peft would ignore the {what}")


def _prompt_out(model, root, task, deltas):
    why = _check_prompt_model(model, root, task)
    if why:
        raise ConfigError(f"cannot export this prompt adapter to PEFT: {why}")
    _check_prompt_task(task, "prompt")
    (_, _, params), = deltas
    prompt = params["prompt"]
    return {"prompt_embeddings": prompt}, {
        **_prompt_fields(model, root, task, prompt.shape[0]), "prompt_tuning_init": "RANDOM"}


def _prefix_check(model, root, what: str):
    family = sites.family_of(model)
    if family in _PREFIX_REFUSED:
        raise ConfigError(f"cannot {what} a prefix adapter on a {family} model: {_PREFIX_REFUSED[family]}")
    task = task_type(root)
    if task not in ("CAUSAL_LM", "FEATURE_EXTRACTION"):  # e.g. LlamaForSequenceClassification
        raise ConfigError(f"cannot {what} a prefix adapter on {type(root).__name__}: peft's prefix goes in as "
                          "past_key_values, which only a causal LM or the bare model takes here")


def _prefix_out(model, root, task, deltas, options):
    _prefix_check(model, root, "export to PEFT")
    if options.get("sites") != ["attn.kv"] or options.get("layers") is not None:
        raise ConfigError("peft's prefix covers the attention of every layer; this prefix adapter is at "
                          f"sites={options.get('sites')}, layers={options.get('layers')}")
    _, _, kv_heads, head_dim = sites.attention_shape(model)
    layer_of = {t.name: t.layer for t in sites.resolve(model, "attn.kv")}
    tables = sorted((layer_of[m], params["table"]) for m, _, params in deltas)
    if [i for i, _ in tables] != sorted(set(layer_of.values())):
        raise ConfigError("peft's prefix needs one table per layer")
    length = options["length"]
    parts = []
    for _, table in tables:
        kv = table.reshape(length, 2, kv_heads, head_dim).clone()
        kv[:, 0] = _rope_rotate(model, kv[:, 0], length)  # peft's tokens sit n positions later
        parts.append(kv.reshape(length, -1))
    return {"prompt_embeddings": torch.cat(parts, dim=1)}, {
        **_prompt_fields(model, root, task, length), "num_attention_heads": kv_heads,
        "token_dim": kv_heads * head_dim, "encoder_hidden_size": sites.attention_shape(model)[0],
        "prefix_projection": False}


def save(model, path, adapter: str | None = None, fold: bool = True) -> Path:
    """Write ``adapter`` of ``model`` to directory ``path`` in the PEFT format (atomically, file by file).
    PEFT files hold folded adapters only (``fold`` is accepted for the common signature)."""
    path = Path(path)
    if (path / io.WEIGHTS).exists():
        raise ConfigError(f"{path} holds a deltatune adapter ({io.WEIGHTS}); write the PEFT export to another "
                          "directory (both formats name their config adapter_config.json)")
    tensors, config = peft_state(model, adapter)
    io.atomic_write_bytes(path / WEIGHTS, st_save(tensors, metadata={"format": "pt"}))
    io.atomic_write_json(path / CONFIG, config)
    return path


# ------------------------------------------------------------------ PEFT -> deltatune

def recognises(path) -> bool:
    """A directory written by peft (or by :func:`save`) rather than by deltatune's own format."""
    path = Path(path)
    return path.is_dir() and not (path / io.WEIGHTS).exists() and (
        (path / WEIGHTS).is_file() or (path / PICKLE).is_file())


def read(path) -> tuple[dict, dict]:
    """(config, tensors) of a PEFT adapter directory, validated as data; tensor names as peft saved them."""
    path = Path(path)
    if not (path / WEIGHTS).is_file():
        if (path / PICKLE).is_file():
            raise AdapterFileError(f"{path} holds {PICKLE}, a pickle, which deltatune never loads; re-save the "
                                   "adapter with peft's save_pretrained(..., safe_serialization=True)")
        raise AdapterFileError(f"no PEFT adapter at {path}: expected {WEIGHTS} and {CONFIG}")
    cfg_file = path / CONFIG
    if not cfg_file.is_file():
        raise AdapterFileError(f"{path} has {WEIGHTS} but no {CONFIG}")
    if cfg_file.stat().st_size > _MAX_CONFIG_BYTES:
        raise AdapterFileError(f"{cfg_file} is larger than {_MAX_CONFIG_BYTES} bytes; not a PEFT adapter config")
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (ValueError, RecursionError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{cfg_file} is not valid JSON ({type(err).__name__})") from None
    if not isinstance(config, dict):
        raise AdapterFileError(f"{cfg_file} must hold a JSON object")
    peft_type = config.get("peft_type")
    if peft_type not in METHOD_OF:
        raise AdapterFileError(f"{cfg_file}: peft_type {peft_type!r} has no deltatune counterpart; deltatune reads "
                               f"{', '.join(sorted(METHOD_OF))}")
    try:
        with safe_open(str(path / WEIGHTS), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as err:
        raise AdapterFileError(f"{path / WEIGHTS} is not a readable safetensors file: {str(err)[:200]}") from None
    for k, t in tensors.items():
        if t.dtype not in _FLOATS:
            raise AdapterFileError(f"{path / WEIGHTS}: tensor '{k}' is {t.dtype}, not a floating-point weight")
        if not torch.isfinite(t).all():
            raise AdapterFileError(f"{path / WEIGHTS}: tensor '{k}' holds NaN or Inf values; the adapter is damaged")
    return config, tensors


def _get(cfg, key, types, default, file):
    value = cfg.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, types):
        raise AdapterFileError(f"{file}: field '{key}' has an unexpected value {value!r}")
    return value


def to_deltatune(model, path) -> tuple[dict, dict]:
    """(config, tensors) in deltatune's format (what ``io.read_adapter`` returns) for the PEFT adapter at
    ``path`` on ``model``; ``io.load_adapter`` then attaches and fills it like any deltatune adapter."""
    path = Path(path)
    config, raw = read(path)
    file = str(path / CONFIG)
    method = METHOD_OF[config["peft_type"]]
    prefix, root = hf_root(model)
    where = "base_model." if method in ("prompt", "prefix") else "base_model.model."
    tensors = {}
    for k, t in raw.items():
        if not k.startswith(where):
            if k in ("prompt_embeddings",):
                tensors[k] = t
                continue
            raise AdapterFileError(f"{file}: unexpected tensor '{k}' in a {config['peft_type']} adapter")
        tensors[k[len(where):]] = t
    saved = _get(config, "modules_to_save", list, [], file) or []
    head, rest = {}, {}
    for k, t in tensors.items():
        parts = k.split(".")
        owners = [".".join(parts[:i]) for i in range(1, len(parts))]  # peft's rule: a module name ending in m
        if any(isinstance(m, str) and o.endswith(m) for o in owners for m in saved):
            head[k] = t
        else:
            rest[k] = t
    try:
        if method == "lora":
            options, deltas = _lora_in(model, prefix, root, config, rest, file)
        elif method == "ia3":
            options, deltas = _ia3_in(model, prefix, root, config, rest, file)
        elif method == "prompt":
            options, deltas = _prompt_in(model, root, config, rest, file)
        else:
            options, deltas = _prefix_in(model, root, config, rest, file)
    except ConfigError as err:
        raise AdapterFileError(f"{path}: {err}") from None
    out = {f"delta.{k}": v for k, v in deltas.items()}
    out.update(_head_in(model, prefix, head, file))
    dt_config = {
        "format": io.FORMAT, "format_version": io.VERSION, "adapter": "default", "method": method,
        "options": options, "folded": True, "base": {**io.base_identity(model), "fingerprint": None},
        "tensors": {k: list(v.shape) for k, v in out.items()}, "source": "peft",
    }
    return dt_config, out


def _head_in(model, prefix, head: dict, file: str) -> dict:
    """head.<param> for every trainable head parameter of ``model``: peft's modules_to_save where it saved
    them, else the model's own values (peft left those modules as they were)."""
    _, backbone = sites.find_backbone(model)
    inside = {id(p) for _, p in sites.backbone_parameters(model)}
    out_emb = None
    get = getattr(model, "get_output_embeddings", None)
    try:
        out_emb = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        out_emb = None
    skip = inside | ({id(p) for p in out_emb.parameters()} if out_emb is not None else set())
    names = [n for n, p in model.named_parameters() if not n.startswith("deltatune.") and id(p) not in skip]
    given = {_full(prefix, k): t for k, t in head.items()}
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise AdapterFileError(f"{file}: modules_to_save holds {unknown[:3]}, which are not this model's head "
                               "(deltatune trains the head outside the backbone, the adapter's deltas, nothing else)")
    params = dict(model.named_parameters())
    return {f"head.{n}": (given[n] if n in given else params[n].detach().to("cpu")) for n in names}


def _layer_of(model, name: str) -> int | None:
    """The block index of a module (full name), from the family's block pattern."""
    prefix, _ = sites.find_backbone(model)
    table = sites.SITE_MAP.get(sites.family_of(model), {})
    rel = name[len(prefix) + 1:] if prefix else name
    m = re.match(table.get("block", r"$^") + r"\.", rel)
    return int(m.group("layer")) if m else None


def _choose_sites(model, groups: list[set[str]]) -> tuple[list[list[str]], list[int] | None]:
    """deltatune sites (one list per group of full module names) and a shared ``layers`` option that
    resolve to exactly those modules: named sites where they fit, else patterns over module names."""
    prefix, _ = sites.find_backbone(model)
    family = sites.family_of(model)
    all_layers = sorted({t.layer for t in sites.resolve(model, "block")})
    used = sorted({_layer_of(model, n) for g in groups for n in g}, key=lambda x: -1 if x is None else x)
    layers = None if (None in used or used == all_layers) else used

    def resolved(site):
        try:
            targets = sites.resolve(model, site, layers)
        except Exception:  # SiteError: matches nothing
            return None
        if any(t.out_slice is not None for t in targets):
            return None
        return {t.name for t in targets}

    def named(group):
        chosen, covered = [], set()
        for site in sites.SITE_MAP[family]:
            if site in ("block", "attn.kv", "ln", "embed"):
                continue
            found = resolved(site)
            if found and found <= group and not found & covered:
                chosen.append(site)
                covered |= found
        return chosen if covered == group else None

    def patterns(group):
        chosen = set()
        for n in group:
            rel = n[len(prefix) + 1:] if prefix else n
            m = re.match(sites.SITE_MAP[family]["block"] + r"\.", rel)
            if m:
                a, b = m.span("layer")
                chosen.add("re:" + re.escape(rel[:a]) + r"(?P<layer>\d+)" + re.escape(rel[b:]))
            else:
                chosen.add("re:" + re.escape(rel))
        found = [resolved(s) for s in sorted(chosen)]
        if any(f is None for f in found) or sum(len(f) for f in found) != len(group) or set().union(*found) != group:
            return None
        return sorted(chosen)

    result = []
    for group in groups:
        if not group:
            result.append([])
            continue
        choice = named(group) or patterns(group)
        if choice is None:
            break
        result.append(choice)
    else:
        return result, layers
    exact = []
    for group in groups:
        rels = sorted(n[len(prefix) + 1:] if prefix else n for n in group)
        exact.append(["re:(?:" + "|".join(re.escape(r) for r in rels) + ")"] if rels else [])
    return exact, None


def _pattern_value(patterns: dict, key: str, default):
    """peft's get_pattern_key: the first pattern that matches the end of the module name."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def _lora_in(model, prefix, root, config, tensors, file):
    for flag in ("use_dora", "lora_bias"):
        if config.get(flag):
            raise ConfigError(f"{flag}=true: deltatune's LoRA has no counterpart for it")
    if config.get("trainable_token_indices"):
        raise ConfigError("trainable_token_indices: deltatune's LoRA has no counterpart for it")
    pairs: dict[str, dict] = defaultdict(dict)
    for k, t in tensors.items():
        m = re.fullmatch(r"(.+)\.lora_([AB])\.weight", k)
        if m is None:
            what = "a bias (bias='all' or 'lora_only')" if k.endswith(".bias") else "not a LoRA A/B weight"
            raise ConfigError(f"tensor '{k}' is {what}; deltatune's LoRA holds only lora_A and lora_B weights")
        pairs[m.group(1)][m.group(2)] = t
    if not pairs:
        raise ConfigError("the adapter holds no LoRA weights")
    r_cfg = _get(config, "r", int, 8, file)
    alpha_cfg = _get(config, "lora_alpha", (int, float), 8, file)
    rslora = bool(config.get("use_rslora", False))
    rank_pattern = _get(config, "rank_pattern", dict, {}, file) or {}
    alpha_pattern = _get(config, "alpha_pattern", dict, {}, file) or {}
    scales, alphas, parts = {}, {}, {}
    for name, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ConfigError(f"module '{name}' has lora_{'A' if 'A' in ab else 'B'} but not its partner")
        full = _full(prefix, name)
        try:
            module = model.get_submodule(full)
        except AttributeError:
            raise ConfigError(f"the adapter targets '{name}', which this model does not have; load it onto "
                              "the model it was trained on") from None
        feats = _linear(module)
        if feats is None:
            raise ConfigError(f"the adapter targets '{name}' ({type(module).__name__}); deltatune's LoRA adapts "
                              "linear projections only")
        A, B = ab["A"], ab["B"]
        r = A.shape[0]
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != feats[0] or B.shape != (feats[1], r):
            raise ConfigError(f"'{name}': lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} do not fit a "
                              f"{feats[0]} -> {feats[1]} projection")
        if r != _pattern_value(rank_pattern, name, r_cfg):
            raise ConfigError(f"'{name}': rank {r} disagrees with the config's r / rank_pattern")
        alpha = _pattern_value(alpha_pattern, name, alpha_cfg)
        scales[full] = alpha / (math.sqrt(r) if rslora else r)
        alphas[full] = alpha
        parts[full] = (A, B)
    rank = max(A.shape[0] for A, _ in parts.values())
    same = len(set(alphas.values())) == 1 and len({A.shape[0] for A, _ in parts.values()}) == 1
    # One rank and one alpha: taken as they are. Otherwise every module is rewritten to the largest rank
    # (zero rows and columns) and the first module's scale, its own scale folded into its B.
    alpha = float(next(iter(alphas.values()))) if same and not rslora else scales[min(scales)] * rank
    dt_scale = alpha / rank
    (site_list,), layers = _choose_sites(model, [set(parts)])
    deltas = {}
    for full, (A, B) in parts.items():
        pad = rank - A.shape[0]
        factor = scales[full] / dt_scale  # 1.0 unless ranks or alphas differ across modules
        B = B if factor == 1.0 else (B.double() * factor).to(B.dtype)
        deltas[_dt_key(full) + ".A"] = torch.cat([A, A.new_zeros(pad, A.shape[1])])
        deltas[_dt_key(full) + ".B"] = torch.cat([B, B.new_zeros(B.shape[0], pad)], dim=1)
    dropout = float(_get(config, "lora_dropout", (int, float), 0.0, file) or 0.0)
    return {"r": rank, "alpha": alpha, "dropout": dropout, "sites": site_list, "layers": layers}, deltas


def _is_feedforward(config, name: str) -> bool | None:
    ff = config.get("feedforward_modules")
    if isinstance(ff, str):
        return bool(re.fullmatch(ff, name))
    if isinstance(ff, list):
        return any(isinstance(t, str) and name.endswith(t) for t in ff)
    return None


def _ia3_in(model, prefix, root, config, tensors, file):
    outputs, inputs = {}, {}
    for k, t in tensors.items():
        m = re.fullmatch(r"(.+)\.ia3_l", k)
        if m is None:
            raise ConfigError(f"tensor '{k}' is not an (IA)^3 vector")
        name = m.group(1)
        full = _full(prefix, name)
        try:
            module = model.get_submodule(full)
        except AttributeError:
            raise ConfigError(f"the adapter targets '{name}', which this model does not have") from None
        feats = _linear(module)
        if feats is None:
            raise ConfigError(f"the adapter targets '{name}' ({type(module).__name__}); deltatune's (IA)^3 scales "
                              "linear projections only")
        ff = _is_feedforward(config, name)
        if ff is None:
            ff = t.dim() == 2 and t.shape[0] == 1 and t.shape[1] != 1
        want = (1, feats[0]) if ff else (feats[1], 1)
        if tuple(t.shape) != want:
            kind = "feedforward (input)" if ff else "output"
            raise ConfigError(f"'{name}': ia3_l has shape {tuple(t.shape)}, a {kind} scale of this module needs {want}")
        (inputs if ff else outputs)[full] = t.reshape(-1)
    (out_sites, in_sites), layers = _choose_sites(model, [set(outputs), set(inputs)])
    deltas = {_dt_key(n) + ".l": v for n, v in outputs.items()}
    deltas.update({_dt_key(n, "in") + ".l": v for n, v in inputs.items()})
    return {"sites": out_sites, "input_sites": in_sites, "layers": layers}, deltas


def _prompt_in(model, root, config, tensors, file):
    why = _check_prompt_model(model, root, task_type(root))
    if why:
        raise ConfigError(f"cannot load this prompt adapter: {why}")
    if set(tensors) != {"prompt_embeddings"}:
        other = sorted(set(tensors) - {"prompt_embeddings"})[:3]
        raise ConfigError(f"a prompt adapter holds prompt_embeddings only, not {other}")
    n = _get(config, "num_virtual_tokens", int, None, file)
    table = tensors["prompt_embeddings"]
    embed = sites.resolve(model, "embed")[0]
    dim = embed.module.weight.shape[1]
    if not n or n < 1 or table.dim() != 2 or table.shape[0] < n or table.shape[1] != dim:
        raise ConfigError(f"prompt_embeddings {tuple(table.shape)} do not fit num_virtual_tokens={n} and this "
                          f"model's embedding width {dim}")
    return {"length": n, "init": "random"}, {_dt_key(embed.name) + ".prompt": table[:n]}


def _prefix_in(model, root, config, tensors, file):
    _prefix_check(model, root, "load")
    if config.get("num_transformer_submodules") not in (None, 1):
        raise ConfigError("num_transformer_submodules must be 1 for a decoder-only model's prefix")
    if set(tensors) != {"prompt_embeddings"}:
        raise ConfigError("a prefix adapter holds prompt_embeddings only")
    n = _get(config, "num_virtual_tokens", int, None, file)
    _, _, kv_heads, head_dim = sites.attention_shape(model)
    targets = sorted(sites.resolve(model, "attn.kv"), key=lambda t: t.layer)
    width = 2 * kv_heads * head_dim
    table = tensors["prompt_embeddings"]
    if not n or n < 1 or tuple(table.shape) != (n, len(targets) * width):
        raise ConfigError(f"prompt_embeddings {tuple(table.shape)} do not fit {n} virtual tokens x {len(targets)} "
                          f"layers x 2 x {kv_heads} kv heads x {head_dim} dims")
    deltas = {}
    for i, t in enumerate(targets):
        kv = table[:, i * width:(i + 1) * width].reshape(n, 2, kv_heads, head_dim).clone()
        kv[:, 0] = _rope_rotate(model, kv[:, 0], -n)  # back from peft's positions n.. to deltatune's 0..
        deltas[_dt_key(t.name) + ".table"] = kv.reshape(n, width)
    return {"length": n, "hidden": 0, "sites": ["attn.kv"]}, deltas
