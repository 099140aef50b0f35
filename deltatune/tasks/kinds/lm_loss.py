"""The causal-LM loss with the LM head in chunks: the generation objective's loss without the (B, T, vocab) logits."""
from __future__ import annotations

import torch
from torch.nn import functional as F

IGNORE = -100  # a label that does not count (the prompt, padding), as in transformers
CHUNK_LOGITS = 2**23  # logits per chunk (rows x vocab): 32 MiB in float32, 170 rows of SmolLM2's 49152


def head_in_chunks(model) -> bool:
    """Whether ``model``'s training loss may be computed by :func:`causal_lm_loss`: a decoder-only
    causal LM (GPT-2 or Llama family) whose logits are a plain Linear head over its backbone's
    last hidden state, with no hook on the head or around the whole model that could change them."""
    from transformers import PreTrainedModel

    from deltatune.sites import FAMILY_OF

    config = getattr(model, "config", None)
    if not isinstance(model, PreTrainedModel) or getattr(config, "is_encoder_decoder", False):
        return False
    if FAMILY_OF.get(getattr(config, "model_type", None)) not in ("gpt2", "llama") or model.base_model is model:
        return False
    if any(getattr(config, k, None) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling")):
        return False  # logits post-processed after the head
    head = model.get_output_embeddings()
    hooked = lambda m: m._forward_hooks or m._forward_pre_hooks  # noqa: E731
    return type(head) is torch.nn.Linear and not hooked(head) and not hooked(model) and not _functorch_transform()


def _functorch_transform() -> bool:
    """Inside vmap or grad (private training's per-example gradients): selecting positions by the
    labels' values has a data-dependent shape, which these transforms cannot batch."""
    peek = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", None)
    return peek is not None and peek() is not None


def causal_lm_loss(model, batch: dict, chunk_logits: int = CHUNK_LOGITS) -> torch.Tensor:
    """The causal-LM loss of ``model(**batch).loss`` (mean cross-entropy of each position's logits
    against the next position's label, labels of IGNORE left out) without the (B, T, vocab) logits:
    the backbone's last hidden states are taken only at the positions whose next label counts, and
    the head and the loss run over them ``chunk_logits`` logits at a time (see linear_cross_entropy).
    A batch with no label that counts gives 0 (the plain path: NaN)."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = model.base_model(**inputs, use_cache=False)[0]  # (B, T, d): last_hidden_state
    counted = labels[:, 1:] != IGNORE  # position t predicts the label at t + 1
    head = model.get_output_embeddings()
    return linear_cross_entropy(hidden[:, :-1][counted], head.weight, head.bias, labels[:, 1:][counted], chunk_logits)


def linear_cross_entropy(hidden, weight, bias, targets, chunk_logits: int = CHUNK_LOGITS) -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias).float(), targets)`` for hidden (N, d), weight
    (V, d), bias (V,) or None, targets (N,), holding at most ``chunk_logits`` logits at a time."""
    rows = max(1, chunk_logits // weight.shape[0])
    grad = torch.is_grad_enabled()
    needs = tuple(grad and t is not None and t.requires_grad for t in (hidden, weight, bias))
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, rows, needs)


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of a linear layer's logits, chunk by chunk of rows. The gradients with
    respect to hidden, weight and bias are computed in the forward pass, chunk by chunk (d loss /
    d logits = (softmax - one_hot) / N), so no chunk's logits outlive its turn; backward only scales
    them by the incoming gradient. Logits and softmax are float32, as transformers' loss upcasts
    them (float64 for a float64 model); the matrix products run in whatever dtype autocast gives them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows, needs):
        need_h, need_w, need_b = needs
        n = hidden.shape[0]
        dtype = torch.promote_types(weight.dtype, torch.float32)  # float32, or float64 for a float64 model
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=dtype) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=dtype) if need_b else None
        total = hidden.new_zeros((), dtype=dtype)
        for start in range(0, n, rows):
            h, t = hidden[start:start + rows], targets[start:start + rows]
            logits = F.linear(h, weight, bias).to(dtype)  # (rows, V)
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if not any(needs):
                continue
            g = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            g[torch.arange(len(t), device=t.device), t] -= 1.0
            g /= n
            if need_b:
                grad_b += g.sum(0)
            g = g if torch.is_autocast_enabled(g.device.type) else g.to(weight.dtype)  # autocast casts for itself
            if need_h:
                grad_h[start:start + rows] = g @ weight
            if need_w:
                grad_w += g.T @ h
        ctx.save_for_backward(*(x for x in (grad_h, grad_w, grad_b) if x is not None))
        ctx.needs, ctx.dtypes = needs, (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return total / max(n, 1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        saved = iter(ctx.saved_tensors)
        grads = [(next(saved) * grad_out).to(dtype) if need else None for need, dtype in zip(ctx.needs, ctx.dtypes)]
        return (*grads, None, None, None)
