"""The LM head in chunks (objectives.causal_lm_loss): the same loss and gradients as the plain path
(logits at every position), without the (batch, seq, vocab) logits.

Exact comparisons run in float64, where the two paths differ only by the order of sums (about
1e-15 relative); the float32 comparison against transformers' own loss allows 1e-5 relative: the
same float32 operations summed in another order (chunks, selected rows) differ by a few ulps
times the square root of the number of terms (tens to hundreds here), far below that on any CPU.
"""
from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import deltatune as dt
from deltatune.tasks.kinds import (IGNORE, Generation, build_task_model, causal_lm_loss, head_in_chunks,
                                   linear_cross_entropy)
from deltatune.training import TrainConfig
from tests import tiny


def _batch(family: str, seed: int = 1) -> dict:
    """Rows of different lengths (padding on the last), labels on each row's last tokens only."""
    batch = tiny.inputs(family, batch=3, length=11, seed=seed)
    labels = batch["input_ids"].clone()
    labels[:, :5] = IGNORE  # the prompt
    labels[0, :8] = IGNORE  # a shorter target
    labels[batch["attention_mask"] == 0] = IGNORE
    return {**batch, "labels": labels}


def _model(family: str, method: str, dtype=torch.float64):
    """A tiny causal LM with ``method`` attached and every trainable tensor moved off its init
    (LoRA's B = 0 would leave A without a gradient)."""
    model = tiny.model(family).to(dtype)
    dt.attach(model, method, **({"init": "random"} if method == "prompt" else {}))
    model.train()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _reference(model, batch):
    """Cross-entropy of every position's logits against the next label, in the model's dtype."""
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                           ignore_index=IGNORE)


def _grads(loss, model):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["lora", "prefix", "prompt", "ia3", "full"])
def test_same_loss_and_gradients_float64(family, method):
    model, batch = _model(family, method), _batch(family)
    assert head_in_chunks(model)
    plain = _reference(model, batch)
    want = _grads(plain, model)
    # 3 rows per chunk: several chunks, the last one partial (the batch counts 13 labels)
    chunked = causal_lm_loss(model, batch, chunk_logits=3 * tiny.VOCAB)
    got = _grads(chunked, model)
    assert torch.allclose(chunked, plain, rtol=1e-12, atol=0)
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        assert w.abs().max() > 0  # every trainable tensor gets a gradient: the comparison means something
        assert torch.allclose(g, w, rtol=1e-9, atol=1e-12 * w.abs().max().item())


def test_linear_cross_entropy_with_bias_and_scaled_gradient():
    g = torch.Generator().manual_seed(0)
    h, w, b = (torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True) for s in ((10, 6), (23, 6), (23,)))
    t = torch.randint(0, 23, (10,), generator=g)
    want = torch.autograd.grad(3.0 * F.cross_entropy(F.linear(h, w, b), t), (h, w, b))
    for rows in (1, 4, 10, 50):  # one row per chunk, a partial last chunk, exactly one chunk, more than all
        loss = linear_cross_entropy(h, w, b, t, chunk_logits=rows * 23)
        assert torch.allclose(loss, F.cross_entropy(F.linear(h, w, b), t), rtol=1e-12, atol=0)
        for got, ref in zip(torch.autograd.grad(3.0 * loss, (h, w, b)), want):
            assert torch.allclose(got, ref, rtol=1e-10, atol=1e-14)
    frozen = linear_cross_entropy(h.detach(), w.detach(), None, t)  # nothing to differentiate: the loss alone
    assert not frozen.requires_grad and torch.allclose(frozen, F.cross_entropy(F.linear(h, w), t), rtol=1e-12)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_engine_default_is_chunked_and_matches_full_logits(name):
    """The Generation objective, as train() builds it: float32, the engine's tokenisation; the
    default (chunked) and full_logits=True (transformers' own loss) agree, and only the latter
    makes a tensor as large as (batch, seq - 1, vocab)."""
    model, tok = build_task_model(name, "generation")
    dt.attach(model, "lora")
    model.eval()  # tiny-gpt2 has dropout, which would draw different masks in the two runs
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    words = ("red", "green blue", "sun", "moon", "cat dog", "fish", "tree", "rock river")  # (B, T - 1) > (V, d): rows > d
    rows = [{"prompt": f"say the word {w} twice", "target": f"{w} {w}"} for w in words]
    chunked, full = (Generation(tok, TrainConfig(full_logits=f)) for f in (False, True))
    batch = chunked.collate(chunked.encode(rows, train=True))
    vocab, (b, t) = model.config.vocab_size, batch["input_ids"].shape

    def run(objective):
        with _Largest() as seen:
            loss = objective.loss(model, batch)
            grads = _grads(loss, model)
        return loss, grads, seen.numel

    loss_c, grads_c, largest_c = run(chunked)
    loss_f, grads_f, largest_f = run(full)
    assert largest_f >= b * (t - 1) * vocab > largest_c
    assert torch.allclose(loss_c, loss_f, rtol=1e-5, atol=0)
    for g, w in zip(grads_c, grads_f):
        assert w.abs().max() > 0
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-5 * w.abs().max().item())


class _Largest(TorchDispatchMode):
    """The most elements of any tensor an operator returned while active."""

    numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(x, torch.Tensor):
                self.numel = max(self.numel, x.numel())
        return out


def test_bf16_autocast_close_to_plain():
    """Under bfloat16 autocast both paths round the head's product to bfloat16; the losses agree to
    bfloat16's precision (8 bits of mantissa), and the gradients point the same way."""
    model, batch = _model("llama", "lora", torch.float32), _batch("llama")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, chunked = model(**batch).loss, causal_lm_loss(model, batch, chunk_logits=3 * tiny.VOCAB)
    assert torch.allclose(chunked, plain, rtol=2e-2)
    got, want = torch.cat([g.flatten() for g in _grads(chunked, model)]), torch.cat([g.flatten() for g in _grads(plain, model)])
    assert F.cosine_similarity(got, want, dim=0) > 0.99


def test_falls_back_where_it_does_not_apply():
    """Encoder-decoders, a hooked head, and per-example gradients under vmap (private training)
    take the plain path; the objective's loss is then transformers' own."""
    assert not head_in_chunks(tiny.model("t5"))
    model = _model("llama", "lora", torch.float32)
    handle = model.lm_head.register_forward_hook(lambda m, i, o: o * 2)
    assert not head_in_chunks(model)
    handle.remove()
    assert head_in_chunks(model)
    inside = torch.func.vmap(lambda x: x * head_in_chunks(model))(torch.ones(2))
    assert inside.tolist() == [0.0, 0.0]


def test_private_training_per_example_gradients_still_work():
    """privacy.per_example_grads calls the objective's loss under torch.func.grad (and vmap where
    the model allows; transformers' Llama masks do not): the plain path there, each example's
    loss its own."""
    from deltatune.training.privacy import per_example_grads

    model, tok = build_task_model("tiny-llama", "generation")
    dt.attach(model, "lora")
    objective = Generation(tok, TrainConfig())
    rows = [{"prompt": "repeat red", "target": "red"}, {"prompt": "repeat blue sky", "target": "blue sky"}]
    batch = objective.collate(objective.encode(rows, train=True))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads, losses = per_example_grads(model, objective, batch, params, use_vmap=False)
    one = objective.collate(objective.encode(rows[1:], train=True))
    assert torch.allclose(losses[1], objective.loss(model, one), rtol=1e-5)
