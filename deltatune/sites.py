"""Sites: where a delta meets the model, named the same way on every architecture.

One map per architecture family, shared by every method. Each entry is a regular expression over
module names *relative to the backbone* (so a classification wrapper or a causal-LM head does not
change them); the named group ``layer`` gives the block index, used by ``layers=`` filters.
A site that is not in the map can be given as ``re:<regex>`` over the same relative names.

Sites: ``embed`` (input token embeddings), ``attn.q/k/v/o`` (attention projections), ``ffn.in`` /
``ffn.out`` (first / last FFN projection), ``ln`` (every LayerNorm/RMSNorm), ``ffn.ln`` (post-LN
families only: the LayerNorm applied to FFN output + residual), ``block`` (a whole transformer layer) and ``attn.kv`` (the attention module, where prefix keys/values are prepended).
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass

import regex

import torch
from torch import nn

from .errors import ConfigError, SiteError

SITES = ("embed", "attn.q", "attn.k", "attn.v", "attn.o", "ffn.in", "ffn.out", "ln", "block", "attn.kv")

_BERT_L = r"encoder\.layer\.(?P<layer>\d+)"
_GPT2_L = r"h\.(?P<layer>\d+)"
_LLAMA_L = r"layers\.(?P<layer>\d+)"
_T5_L = r"(?:encoder|decoder)\.block\.(?P<layer>\d+)"
_BART_L = r"(?:encoder|decoder)\.layers\.(?P<layer>\d+)"
_VIT_L = r"layers\.(?P<layer>\d+)"

# family -> site -> regex (full match on the module name relative to the backbone)
SITE_MAP: dict[str, dict[str, str]] = {
    "bert": {
        "embed": r"embeddings\.word_embeddings",
        "attn.q": _BERT_L + r"\.attention\.self\.query",
        "attn.k": _BERT_L + r"\.attention\.self\.key",
        "attn.v": _BERT_L + r"\.attention\.self\.value",
        "attn.o": _BERT_L + r"\.attention\.output\.dense",
        "ffn.in": _BERT_L + r"\.intermediate\.dense",
        "ffn.out": _BERT_L + r"\.output\.dense",
        "ln": r"embeddings\.LayerNorm|" + _BERT_L + r"\.(?:attention\.)?output\.LayerNorm",
        "ffn.ln": _BERT_L + r"\.output\.LayerNorm",  # post-LN: the norm of FFN output + residual
        "block": _BERT_L,
        "attn.kv": _BERT_L + r"\.attention\.self",
    },
    "gpt2": {
        # q, k and v share the fused c_attn projection: each site is a slice of its output.
        "embed": r"wte",
        "attn.q": _GPT2_L + r"\.attn\.c_attn",
        "attn.k": _GPT2_L + r"\.attn\.c_attn",
        "attn.v": _GPT2_L + r"\.attn\.c_attn",
        "attn.o": _GPT2_L + r"\.attn\.c_proj",
        "ffn.in": _GPT2_L + r"\.mlp\.c_fc",
        "ffn.out": _GPT2_L + r"\.mlp\.c_proj",
        "ln": _GPT2_L + r"\.ln_[12]|ln_f",
        "block": _GPT2_L,
        "attn.kv": _GPT2_L + r"\.attn",
    },
    "llama": {
        "embed": r"embed_tokens",
        "attn.q": _LLAMA_L + r"\.self_attn\.q_proj",
        "attn.k": _LLAMA_L + r"\.self_attn\.k_proj",
        "attn.v": _LLAMA_L + r"\.self_attn\.v_proj",
        "attn.o": _LLAMA_L + r"\.self_attn\.o_proj",
        "ffn.in": _LLAMA_L + r"\.mlp\.up_proj",
        "ffn.gate": _LLAMA_L + r"\.mlp\.gate_proj",
        "ffn.out": _LLAMA_L + r"\.mlp\.down_proj",
        "ln": _LLAMA_L + r"\.(?:input|post_attention)_layernorm|norm",
        "block": _LLAMA_L,
        "attn.kv": _LLAMA_L + r"\.self_attn",
    },
    "t5": {
        # Self- and cross-attention both count as attention sites (as in the T-Few (IA)^3 regex).
        "embed": r"encoder\.embed_tokens",
        "attn.q": _T5_L + r"\.layer\.[01]\.(?:SelfAttention|EncDecAttention)\.q",
        "attn.k": _T5_L + r"\.layer\.[01]\.(?:SelfAttention|EncDecAttention)\.k",
        "attn.v": _T5_L + r"\.layer\.[01]\.(?:SelfAttention|EncDecAttention)\.v",
        "attn.o": _T5_L + r"\.layer\.[01]\.(?:SelfAttention|EncDecAttention)\.o",
        "ffn.in": _T5_L + r"\.layer\.[12]\.DenseReluDense\.wi(?:_1)?",
        "ffn.out": _T5_L + r"\.layer\.[12]\.DenseReluDense\.wo",
        "ln": _T5_L + r"\.layer\.\d\.layer_norm|(?:encoder|decoder)\.final_layer_norm",
        "block": _T5_L,
        "attn.kv": _T5_L + r"\.layer\.[01]\.(?:SelfAttention|EncDecAttention)",
    },
    "bart": {
        "embed": r"encoder\.embed_tokens",
        "attn.q": _BART_L + r"\.(?:self_attn|encoder_attn)\.q_proj",
        "attn.k": _BART_L + r"\.(?:self_attn|encoder_attn)\.k_proj",
        "attn.v": _BART_L + r"\.(?:self_attn|encoder_attn)\.v_proj",
        "attn.o": _BART_L + r"\.(?:self_attn|encoder_attn)\.out_proj",
        "ffn.in": _BART_L + r"\.fc1",
        "ffn.out": _BART_L + r"\.fc2",
        "ln": _BART_L + r"\.(?:self_attn|encoder_attn|final)_layer_norm|(?:encoder|decoder)\.layernorm_embedding",
        "ffn.ln": _BART_L + r"\.final_layer_norm",
        "block": _BART_L,
        "attn.kv": _BART_L + r"\.(?:self_attn|encoder_attn)",
    },
    "vit": {
        "embed": r"embeddings\.patch_embeddings\.projection",
        "attn.q": _VIT_L + r"\.attention\.q_proj",
        "attn.k": _VIT_L + r"\.attention\.k_proj",
        "attn.v": _VIT_L + r"\.attention\.v_proj",
        "attn.o": _VIT_L + r"\.attention\.o_proj",
        "ffn.in": _VIT_L + r"\.mlp\.fc1",
        "ffn.out": _VIT_L + r"\.mlp\.fc2",
        "ln": _VIT_L + r"\.layernorm_(?:before|after)|layernorm",
        "block": _VIT_L,
        "attn.kv": _VIT_L + r"\.attention",
    },
}

# Hugging Face model_type -> family. Models with the same module names share a family.
FAMILY_OF = {
    "bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "camembert": "bert", "electra": "bert",
    "gpt2": "gpt2",
    "llama": "llama", "mistral": "llama", "qwen2": "llama",
    "t5": "t5", "mt5": "t5",
    "bart": "bart", "mbart": "bart",
    "vit": "vit",
}

_COMPILED: dict[str, "regex.Pattern"] = {}
# Site patterns may come from files, so none may hang the process. Python's re backtracks without
# end on patterns like (.|.)*X; the `regex` engine (a dependency of transformers) takes a timeout, so
# the module names of one model get MATCH_SECONDS in all. Its compile expands counted repeats, so
# their product is bounded too (module names are short: no sane pattern comes near either limit).
MATCH_SECONDS, MAX_PATTERN_CHARS, MAX_REPEAT_PRODUCT = 1.0, 1000, 10_000
_COUNTED = re.compile(r"\{\s*(\d*)\s*(?:,\s*(\d*)\s*)?\}")


def _regex(pattern: str, site: str | None = None) -> "regex.Pattern":
    if pattern not in _COMPILED:
        site = site or pattern
        if len(pattern) > MAX_PATTERN_CHARS:
            raise SiteError(f"site '{site[:40]}...' is {len(pattern)} characters long; a site pattern may have at "
                            f"most {MAX_PATTERN_CHARS}")
        try:
            re.compile(pattern)  # the syntax is Python's re (regex would also take its own extensions)
        except (re.error, RecursionError, OverflowError) as err:
            raise SiteError(f"site '{site}' is not a valid regular expression: {err}") from None
        product = 1
        for low, high in _COUNTED.findall(pattern):
            product *= max(int(high or 0), int(low or 0), 1)
            if product > MAX_REPEAT_PRODUCT:
                raise SiteError(f"site '{site}': its counted repeats ({{m,n}}) allow over {MAX_REPEAT_PRODUCT} "
                                f"repetitions together; module names are short, use * or + instead")
        _COMPILED[pattern] = regex.compile(pattern)
    return _COMPILED[pattern]


def _fullmatch(compiled, name: str, site: str, deadline: float):
    try:
        return compiled.fullmatch(name, timeout=max(deadline - time.monotonic(), 1e-3))
    except TimeoutError:
        raise SiteError(f"site '{site}' took over {MATCH_SECONDS:g} s to match the module names (a pattern that "
                        f"backtracks without end, like (.|.)*x); write a simpler pattern") from None


def find_backbone(model: nn.Module) -> tuple[str, nn.Module]:
    """The pretrained transformer inside ``model``: (its dotted path, the module).

    A Hugging Face ``*For...`` model's backbone is its ``base_model``; a user's wrapper holds one
    ``PreTrainedModel`` as a submodule. Everything outside the backbone is the task head.
    """
    from transformers import PreTrainedModel

    for name, module in model.named_modules():
        if isinstance(module, PreTrainedModel):
            base = module.base_model
            if base is not module:
                for sub_name, sub in module.named_modules():
                    if sub is base:
                        return (f"{name}.{sub_name}" if name else sub_name), base
            return name, module
    raise ConfigError(
        f"{type(model).__name__} holds no Hugging Face PreTrainedModel; deltatune attaches to a "
        "transformers model or to a module that contains one."
    )


def backbone_parameters(model: nn.Module):
    """(name from the root, parameter) for every backbone parameter, deltatune's own excluded.

    (For T5ForConditionalGeneration the backbone is the whole model, deltas included.)
    """
    prefix, backbone = find_backbone(model)
    for n, p in backbone.named_parameters():
        if not n.startswith("deltatune."):
            yield (f"{prefix}.{n}" if prefix else n), p


def family_of(model: nn.Module) -> str:
    """The architecture family of the model's backbone, e.g. 'bert' for MiniLM, 'llama' for SmolLM2."""
    _, backbone = find_backbone(model)
    model_type = getattr(backbone.config, "model_type", None)
    if model_type not in FAMILY_OF:
        known = ", ".join(sorted(FAMILY_OF))
        raise ConfigError(
            f"architecture '{model_type}' has no site map; supported model types: {known}. "
            "Use 're:<regex>' sites to target modules by name on other architectures."
        )
    return FAMILY_OF[model_type]


@dataclass(frozen=True)
class Target:
    """One module a site resolved to."""

    site: str  # the semantic site name (or 're:...')
    name: str  # dotted path from the root model
    module: nn.Module
    layer: int | None  # block index, if the site is inside a block
    out_slice: tuple[int, int] | None = None  # for fused projections (GPT-2 c_attn)


def _linear_features(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a Linear or GPT-2 Conv1D, else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.weight.shape[0], module.weight.shape[1]
    return None


def target_features(target: Target, method: str = "this method") -> tuple[int, int]:
    """(in, out) features a delta at ``target`` sees: the slice's width for fused projections."""
    feats = _linear_features(target.module)
    if feats is None:
        raise SiteError(
            f"{method}: site '{target.site}' resolves to {target.name} ({type(target.module).__name__}), "
            "not a linear projection; choose among attn.q, attn.k, attn.v, attn.o, ffn.in, ffn.out"
        )
    if target.out_slice is not None:
        return feats[0], target.out_slice[1] - target.out_slice[0]
    return feats


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight as an (out, in) matrix sharing storage with the module (Conv1D stores (in, out)).

    A quantized layer (:func:`quantized`) holds 4- or 8-bit codes, not such a matrix: what would read or
    write it (a merge, DoRA's row norms, an initialisation from W0) is refused with the way out."""
    q = quantized(module)
    if q is not None:
        raise ConfigError(
            f"this {type(module).__name__} holds a {q['scheme']}-quantized weight ({q['library']}), which deltatune "
            "neither folds deltas into nor reads as a float matrix (merge, DoRA, an initialisation from the weight); "
            "keep the adapter unmerged on the quantized base, or load the adapter onto the float base to merge it")
    if isinstance(module, nn.Linear):
        return module.weight
    return module.weight.t()


# ---------------------------------------------------------------- quantized bases

# deltatune.quantize puts this attribute on every linear layer it quantizes: {"scheme", "library", "shape",
# "sample"}, the last two the float weight's shape and the strided sample the base fingerprint reads. The core
# asks the module, never the quantization library (which sits above it, beside the models).
QUANTIZED = "deltatune_quantized"
SAMPLE = 256  # values of each base tensor the fingerprint reads (a strided sample)


def quantized(module: nn.Module) -> dict | None:
    """The quantization record of a layer deltatune quantized, else None."""
    q = getattr(module, QUANTIZED, None)
    return q if isinstance(q, dict) else None


def quantization(model: nn.Module) -> dict | None:
    """``{"scheme", "library", "layers"}`` when the model's backbone holds quantized linear layers, else None."""
    _, backbone = find_backbone(model)
    found = [q for m in backbone.modules() if (q := quantized(m)) is not None]
    if not found:
        return None
    schemes = sorted({q["scheme"] for q in found})
    return {"scheme": ",".join(schemes), "library": found[0]["library"], "layers": len(found)}


def weight_sample(tensor: torch.Tensor) -> torch.Tensor:
    """The strided sample of a tensor that identifies it in the base fingerprint (at most SAMPLE values)."""
    flat = tensor.detach().reshape(-1)
    return flat[::max(1, flat.numel() // SAMPLE)][:SAMPLE]


def float_identities(root: nn.Module) -> dict[str, tuple[tuple, torch.Tensor]]:
    """Parameter name under ``root`` -> (shape, sample) of the float weight each quantized layer was made from."""
    out = {}
    for name, module in root.named_modules():
        q = quantized(module)
        if q is not None:
            out[f"{name}.weight" if name else "weight"] = (tuple(q["shape"]), q["sample"])
    return out


def base_digest(model: nn.Module, skip: set[str], dtype: torch.dtype | None = None) -> str:
    """A cheap fingerprint of the frozen base weights: names, shapes and a strided sample of each tensor, taken
    at ``dtype`` (default: each tensor's own), so that a copy in another precision can be compared. A quantized
    layer reads as the float weight it was made from, so a quantized base has the fingerprint of its float base."""
    import hashlib

    digest = hashlib.sha256()
    stand_in = float_identities(model)
    for name, p in sorted(backbone_parameters(model), key=lambda kv: kv[0]):
        if name in skip:
            continue
        shape, sample = stand_in.get(name) or (tuple(p.shape), weight_sample(p))
        if dtype is not None and sample.dtype.is_floating_point:
            sample = sample.to(dtype)
        digest.update(name.encode() + str(shape).encode())
        digest.update(sample.float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def num_layers(model: nn.Module) -> int:
    """Number of transformer blocks of the backbone (the encoder's, for encoder-decoders)."""
    _, backbone = find_backbone(model)
    cfg = backbone.config
    for key in ("num_hidden_layers", "n_layer", "num_layers", "encoder_layers"):
        if getattr(cfg, key, None):
            return int(getattr(cfg, key))
    raise ConfigError(f"cannot tell the number of layers of {type(backbone).__name__}")


def known_sites(model: nn.Module) -> list[str]:
    return sorted(SITE_MAP[family_of(model)])


def resolve(model: nn.Module, site: str, layers=None) -> list[Target]:
    """All modules that ``site`` names in ``model``, optionally only in blocks ``layers``.

    Raises SiteError naming the known sites when nothing matches.
    """
    prefix, backbone = find_backbone(model)
    if site.startswith("re:"):
        pattern = _regex(site[3:], site)
    else:
        family = family_of(model)
        table = SITE_MAP[family]
        if site not in table:
            raise SiteError(
                f"unknown site '{site}' for {family} models ({type(backbone).__name__}); "
                f"known sites: {', '.join(sorted(table))}; or use 're:<regex>' over module names"
            )
        pattern = _regex(table[site])
    wanted = None if layers is None else set(layers)
    if wanted:
        _check_layers(model, backbone, wanted)
    targets = []
    deadline = time.monotonic() + MATCH_SECONDS
    for name, module in backbone.named_modules():
        if not name:
            continue
        match = _fullmatch(pattern, name, site, deadline)
        if match is None:
            continue
        layer = match.groupdict().get("layer")
        if layer is not None and not layer.isdecimal():
            raise SiteError(f"site '{site}': its group 'layer' matched {layer!r} in {name}; it must match a block index")
        layer = int(layer) if layer is not None else None
        if wanted is not None and layer not in wanted:
            continue
        full = f"{prefix}.{name}" if prefix else name
        targets.append(Target(site, full, module, layer, _fused_slice(backbone, site, module)))
    if not targets:
        where = f" in layers {sorted(wanted)}" if wanted is not None else ""
        known = ", ".join(sorted(SITE_MAP.get(FAMILY_OF.get(getattr(backbone.config, "model_type", ""), ""), {})))
        raise SiteError(
            f"site '{site}' matches no module{where} in {type(backbone).__name__}; "
            f"known sites: {known or '(none: use re:<regex>)'}"
        )
    return targets


def _check_layers(model: nn.Module, backbone: nn.Module, wanted: set) -> None:
    """Every requested block index exists (a typo like layers=0,999 is an error, not silently ignored)."""
    try:
        block = _regex(SITE_MAP[family_of(model)]["block"])
        have = {int(m["layer"]) for name, _ in backbone.named_modules() if (m := block.fullmatch(name))}
    except ConfigError:  # an architecture without a site map: its configured depth
        have = set(range(num_layers(model)))
    bad = sorted(i for i in wanted if i not in have)
    if bad and have:
        raise SiteError(f"layers {bad} do not exist: {type(backbone).__name__} has {len(have)} blocks, numbered "
                        f"{min(have)}..{max(have)}")


def _fused_slice(backbone: nn.Module, site: str, module: nn.Module) -> tuple[int, int] | None:
    """GPT-2 packs q, k, v into one Conv1D of width 3d: the site owns a third of its output."""
    if type(module).__name__ != "Conv1D" or site not in ("attn.q", "attn.k", "attn.v"):
        return None
    width = module.weight.shape[1] // 3
    start = ("attn.q", "attn.k", "attn.v").index(site) * width
    return (start, start + width)


def attention_shape(model: nn.Module) -> tuple[int, int, int, int]:
    """(d_model, heads, kv_heads, head_dim) of the backbone's attention, read from its config."""
    _, backbone = find_backbone(model)
    cfg = backbone.config
    d_model = next(getattr(cfg, k) for k in ("hidden_size", "n_embd", "d_model") if getattr(cfg, k, None))
    heads = next(getattr(cfg, k) for k in ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads")
                 if getattr(cfg, k, None))
    head_dim = getattr(cfg, "head_dim", None) or getattr(cfg, "d_kv", None) or d_model // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    return d_model, heads, kv_heads, head_dim
