"""A quantized frozen base: the backbone's linear layers held in 4 or 8 bits, the deltas on top in float32.

QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", §3) stores the frozen base in
4-bit NormalFloat with double quantization (the blocks' absmax constants quantized again) and trains LoRA in
full precision on top: the forward pass dequantizes each weight block for its matmul, the gradient flows
through the frozen weight to the input, never into it. The schemes here are bitsandbytes' (the library QLoRA
introduced, whose releases since 0.45 run on CPU):

- ``nf4``: 4-bit NormalFloat, blocks of 64 with double quantization (QLoRA's data type; about 0.52 bytes a
  weight);
- ``fp4``: bitsandbytes' 4-bit float, the same blocks;
- ``int8``: LLM.int8() (Dettmers et al. 2022) row-wise absmax int8 weights without outlier columns
  (threshold 0): while training (and wherever a gradient is recorded) bitsandbytes dequantizes the weight for a
  float32 matmul; without a gradient (evaluation, serving) the activations are quantized per row too and the
  product is an int8 matmul. On CPUs with AVX-512 deltatune computes that product itself with PyTorch's
  ``torch._int_mm`` in float32 around it (:func:`int8_matmul`) instead of bitsandbytes' own CPU path, whose
  float16 conversions and rescaling cost more than the matmul in a profile (not yet timed side by side in
  docs/performance.md, which measures int8 serving against float32); elsewhere bitsandbytes' path runs
  (``_int_mm`` has no fast kernel there).

There is no integer 4-bit scheme: bitsandbytes has none (its 4-bit types are NF4 and FP4) and torchao's
int4 weights have no float32 CPU kernel. Why bitsandbytes and not torchao: ``bench/quantize.py libs`` runs both
(docs/performance.md, "bitsandbytes or torchao": torchao's nf4 training step was 1.46x slower on SmolLM2's shape).

Only the backbone's ``nn.Linear`` layers are quantized: embeddings, norms, biases, the task head and the LM
head stay as they were (the head trains, the LM head is tied to the embeddings on SmolLM2). GPT-2's
projections are ``Conv1D`` layers and are not quantized. Each quantized layer keeps its float weight's shape
and fingerprint sample (:data:`deltatune.sites.QUANTIZED`), so adapters trained on the quantized base record
the float base they were quantized from and load onto it (and the other way round).

    from deltatune.models import load_backbone
    model, tok = load_backbone("smollm2", quantize="nf4")        # or quantize_base(model, "nf4")
    dt.attach(model, "lora")                                       # LoRA in float32 on the nf4 base
"""
from __future__ import annotations

import importlib.metadata
import logging
import warnings

import torch
from torch import nn

from . import sites
from .errors import ConfigError

SCHEMES = ("nf4", "fp4", "int8")
LIBRARY = "bitsandbytes"
BLOCKSIZE = 64  # QLoRA's block size for the 4-bit types (its double quantization groups 256 blocks)
# bitsandbytes 0.50.2's CPU kernel dequantizes a 4-bit weight wrongly when its rows (in_features) are not a
# multiple of the block size (blocks that span two rows read the wrong constant: measured 0.37 relative error
# on a 32x32 weight instead of 0.09). Such a layer takes blocks of 32 where its rows divide by 32, and stays
# float32 otherwise (a warning says how many); real models' widths are multiples of 64.
SMALL_BLOCKSIZE = 32
INSTALL = "pip install 'deltatune[quantize]' (bitsandbytes)"


def library_version() -> str | None:
    """The installed bitsandbytes version, or None when it is not installed."""
    try:
        return importlib.metadata.version(LIBRARY)
    except importlib.metadata.PackageNotFoundError:
        return None


def _bnb():
    """bitsandbytes, imported quietly: on CPUs with AVX512-BF16 its import asks the `kernels` package for a
    hub kernel and logs a warning when there is none (this machine reaches no hub); deltatune does not use that
    kernel (see ``_float32_matmuls``), so the warning says nothing to the user."""
    if library_version() is None:
        raise ConfigError(f"a quantized base needs bitsandbytes, which is not installed: {INSTALL}")
    quiet = [logging.getLogger(n) for n in ("bitsandbytes", "bitsandbytes.backends.cpu.ops")]
    levels = [lg.level for lg in quiet]
    try:
        for lg in quiet:
            lg.setLevel(logging.ERROR)
        import bitsandbytes as bnb
    except Exception as err:  # a build that does not load on this machine
        raise ConfigError(f"bitsandbytes {library_version()} cannot be loaded here ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}); {INSTALL}") from None
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)
    notices = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _CastNotice) for f in notices.filters):
        notices.addFilter(_CastNotice())
    return bnb


class _CastNotice(logging.Filter):
    """Drops bitsandbytes' notice, logged at every int8 matmul in evaluation mode, that the activations pass
    through float16 to be quantized: that is the int8 scheme as documented here, not news at each call."""

    def filter(self, record) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def check_scheme(scheme) -> str:
    if scheme not in SCHEMES:
        extra = (" (bitsandbytes has no integer 4-bit type: nf4 is QLoRA's 4-bit type, fp4 the other)"
                 if scheme == "int4" else "")
        raise ConfigError(f"quantize must be one of {', '.join(SCHEMES)} (or none: a float32 base), got {scheme!r}{extra}")
    return scheme


def quantize_base(model: nn.Module, scheme: str) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model``'s backbone by a ``scheme``-quantized layer, in place; returns
    ``model``. Quantize before attaching adapters (the adapters are then trained or loaded on top).

    Each float weight is freed as soon as its quantized copy exists, so the peak is the float model plus one
    layer. Refused on a model that already has adapters, is already quantized, or has no linear layer in its
    backbone (GPT-2's projections are Conv1D)."""
    check_scheme(scheme)
    if getattr(model, "deltatune", None) is not None and isinstance(model.deltatune, nn.Module):
        raise ConfigError("quantize_base: this model already has deltatune adapters; quantize the base first, "
                          "then attach or load them")
    if sites.quantization(model) is not None:
        raise ConfigError(f"quantize_base: the base is already quantized ({sites.quantization(model)['scheme']})")
    _, backbone = sites.find_backbone(model)
    # (parent, child's name, its in_features): no reference to the float layers, so each one is freed as soon as
    # its quantized layer replaces it (the peak is the float model plus one layer, not two models)
    linears = [(parent, name, child.in_features) for parent in backbone.modules()
               for name, child in parent.named_children() if type(child) is nn.Linear]
    if not linears:
        raise ConfigError(f"quantize_base: {type(backbone).__name__} has no nn.Linear layer to quantize "
                          "(GPT-2's projections are Conv1D layers, which bitsandbytes does not quantize)")
    bnb = _bnb()
    kept = [width for _, _, width in linears if scheme != "int8" and _blocksize(width) is None]
    if len(kept) == len(linears):
        raise ConfigError(f"quantize_base: no linear layer of {type(backbone).__name__} has rows (in_features) that "
                          f"divide into blocks of {SMALL_BLOCKSIZE}, which {scheme} needs; use int8")
    if kept:
        warnings.warn(f"quantize {scheme}: {len(kept)} of {len(linears)} linear layers stay float32: their rows "
                      f"({sorted(set(kept))[:3]} inputs) do not divide into blocks of {SMALL_BLOCKSIZE} "
                      "(bitsandbytes' CPU kernel dequantizes such blocks wrongly)", stacklevel=2)
    for parent, name, width in linears:
        if scheme == "int8" or _blocksize(width) is not None:
            setattr(parent, name, quantize_linear(getattr(parent, name), scheme, bnb))
    return model


def _blocksize(in_features: int) -> int | None:
    """The 4-bit block size for rows of ``in_features`` weights (see SMALL_BLOCKSIZE), or None: none fits."""
    return next((b for b in (BLOCKSIZE, SMALL_BLOCKSIZE) if in_features % b == 0), None)


def quantize_linear(linear: nn.Linear, scheme: str, bnb=None) -> nn.Module:
    """A bitsandbytes layer computing ``linear`` with its weight quantized to ``scheme``; the bias stays float.
    The new layer is frozen and carries the float weight's identity (:data:`deltatune.sites.QUANTIZED`)."""
    check_scheme(scheme)
    bnb = bnb or _bnb()
    weight = linear.weight.detach()
    if not weight.dtype.is_floating_point or weight.is_meta:
        raise ConfigError(f"quantize: a {weight.dtype} weight{' on the meta device' if weight.is_meta else ''} "
                          "cannot be quantized; load real float weights first")
    if scheme == "int8" and weight.abs().max() > torch.finfo(torch.float16).max:
        raise ConfigError("quantize int8: a weight exceeds float16's range, which bitsandbytes' int8 "
                          "quantization passes through; use nf4 or keep this base in float32")
    identity = {"scheme": scheme, "library": f"{LIBRARY} {library_version()}", "shape": tuple(weight.shape),
                "sample": sites.weight_sample(weight).float().clone()}
    device, has_bias = weight.device, linear.bias is not None
    if scheme == "int8":
        layer = _int8_class(bnb)(linear.in_features, linear.out_features, bias=has_bias,
                                 has_fp16_weights=False, threshold=0.0, device="meta")
        layer.weight = bnb.nn.Int8Params(weight.to("cpu").contiguous(), requires_grad=False, has_fp16_weights=False)
        layer.weight = layer.weight.to(device)  # quantizes (row-wise absmax)
        layer.init_8bit_state()  # the codes and scales move to the layer's state, where every matmul reads them
    else:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias,
                                  compute_dtype=weight.dtype, compress_statistics=True, quant_type=scheme,
                                  device="meta")
        blocksize = _blocksize(linear.in_features)
        if blocksize is None:
            raise ConfigError(f"quantize {scheme}: a layer with {linear.in_features} inputs does not divide into blocks "
                              f"of {SMALL_BLOCKSIZE} (bitsandbytes' CPU kernel dequantizes such blocks wrongly); "
                              "keep it float32 or use int8")
        layer.weight = bnb.nn.Params4bit(weight.contiguous(), requires_grad=False, blocksize=blocksize,
                                         compress_statistics=True, quant_type=scheme, module=layer)
        layer.weight = layer.weight.to(device)  # quantizes (blocks of 64 or 32, double quantization)
        _float32_matmuls(layer)
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
    layer.requires_grad_(False)
    layer.train(linear.training)
    setattr(layer, sites.QUANTIZED, identity)
    return layer


# torch._int_mm has a fast (VNNI) kernel on AVX-512 CPUs only; elsewhere it is a scalar loop, slower than float32
# (bitsandbytes makes the same choice for its own CPU kernel).
FAST_INT8 = torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX")
_INT8_CLASS: list = []


def _int8_class(bnb):
    """bitsandbytes' ``Linear8bitLt`` with deltatune's int8 matmul where no gradient is recorded."""
    if not _INT8_CLASS:
        class Int8Linear(bnb.nn.Linear8bitLt):
            """LLM.int8() without outliers: bitsandbytes' layer, its inference matmul :func:`int8_matmul`."""

            def forward(self, x):
                if self.training or torch.is_grad_enabled() or not FAST_INT8 or self.state.CB is None:
                    return super().forward(x)
                return int8_matmul(x, self.state.CB, self.state.SCB, self.bias)

        _INT8_CLASS.append(Int8Linear)
    return _INT8_CLASS[0]


def int8_matmul(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W.T + bias`` with W = codes * scales / 127 (int8 (out, in), float (out,): bitsandbytes' row-wise
    absmax quantization) and x quantized the same way per row: LLM.int8()'s vector-wise product (Dettmers et al.
    2022, §3.1), y = (x_i8 @ W_i8^T) * s_x s_w / 127^2, accumulated exactly in int32 by ``torch._int_mm``."""
    shape = x.shape
    rows = x.reshape(-1, shape[-1]).float()  # (N, in)
    step = rows.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / 127.0  # (N, 1)
    q = torch.round(rows / step).to(torch.int8)
    out = torch._int_mm(q, codes.t()).float().mul_(step).mul_(scales.float() / 127.0)  # (N, out)
    if bias is not None:
        out += bias.float()
    return out.reshape(*shape[:-1], codes.shape[0]).to(x.dtype)


def _float32_matmuls(layer) -> None:
    """Keep the 4-bit layer on its dequantize-then-matmul path in every mode. On a CPU with AVX512-BF16,
    bitsandbytes repacks the weight at the first evaluation-mode call and from then on multiplies in bfloat16
    (other numbers on other CPUs), also in training mode; without it the layer computes the same float32
    product everywhere (the tolerances of the tests hold on any x86 CPU)."""
    if hasattr(layer, "support_avx512bf16_for_cpu"):
        layer.support_avx512bf16_for_cpu = False


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) float weight a quantized layer computes with (a new tensor), for measuring its error."""
    q = sites.quantized(module)
    if q is None:
        raise ConfigError(f"{type(module).__name__} is not a layer deltatune quantized")
    bnb = _bnb()
    if q["scheme"] == "int8":
        state = module.state
        return state.CB.float() * (state.SCB.float()[:, None] / 127.0)
    return bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()


def quantized_bytes(model: nn.Module) -> int:
    """Bytes the backbone's quantized layers hold (codes, block constants, biases)."""
    total = 0
    _, backbone = sites.find_backbone(model)
    for m in backbone.modules():
        if sites.quantized(m) is None:
            continue
        tensors = [p for p in m.parameters(recurse=False)]
        state = getattr(m, "state", None)
        for t in (getattr(state, "CB", None), getattr(state, "SCB", None)):
            if torch.is_tensor(t) and all(t is not u for u in tensors):
                tensors.append(t)
        qs = getattr(m.weight, "quant_state", None)
        if qs is not None:
            tensors += [v for v in qs.as_dict(packed=True).values() if torch.is_tensor(v)]
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total
