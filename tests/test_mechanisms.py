"""The sequence mechanisms (prefix keys/values, prompt tokens) under padding and generation, named
adapters side by side, gradient checkpointing, and shapes drawn by hypothesis."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import deltatune as dt

from . import tiny


def _perturbed(family, method, **opts):
    model = dt.attach(tiny.model(family), method, **opts)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("method", ["prefix", "prompt"])
@pytest.mark.parametrize("family,pad", [("bert", "right"), ("gpt2", "left"), ("llama", "left"), ("llama", "right"),
                                        ("t5", "right"), ("bart", "right")])
def test_padding_does_not_change_real_positions(method, family, pad):
    """A padded row gives the same outputs at its real tokens as the same row alone, unpadded."""
    model = _perturbed(family, method)
    batch = tiny.inputs(family, pad=pad)
    if family in ("gpt2", "llama"):  # positions counted from the first real token, as generate() does
        batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    mask = batch["attention_mask"][-1].bool()
    alone = {k: (v[-1:, mask] if k in ("input_ids", "attention_mask", "position_ids") else v[-1:]) for k, v in batch.items()}
    with torch.no_grad():
        padded = model(**batch).logits[-1]
        single = model(**alone).logits[0]
    if padded.shape[0] == mask.shape[0]:  # decoder-only: per input position
        padded = padded[mask]
    torch.testing.assert_close(padded, single, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["prefix", "prompt", "lora"])
@pytest.mark.parametrize("family", ["gpt2", "llama", "t5", "bart"])
def test_generate_with_cache_matches_full_recompute(method, family):
    model = _perturbed(family, method)
    batch = tiny.inputs(family, pad="left" if family in ("gpt2", "llama") else "right")
    batch.pop("decoder_input_ids", None)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(**batch, use_cache=True, **kwargs)
        uncached = model.generate(**batch, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_prefix_changes_generation_and_detach_undoes_it():
    base = tiny.model("llama")
    batch = tiny.inputs("llama", pad="left")
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        plain = base.generate(**batch, **kwargs)
        dt.attach(base, "prefix", hidden=0)
        with torch.no_grad():
            for p in base.deltatune.parameters():
                p.mul_(200.0)
        tuned = base.generate(**batch, **kwargs)
        dt.detach(base)
        back = base.generate(**batch, **kwargs)
    assert not torch.equal(plain, tuned)
    assert torch.equal(plain, back)
    assert base.config._attn_implementation != "deltatune"


def test_named_adapters_switch_save_and_load(tmp_path):
    model = tiny.model("bert")
    batch = tiny.inputs("bert")
    with torch.no_grad():
        base_out = tiny.outputs(model, batch)
    dt.attach(model, "lora", adapter="a")
    dt.attach(model, "ia3", adapter="b")
    assert dt.adapters(model) == ["a", "b"] and dt.active_adapters(model) == ["b"]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.deltatune.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    # only the active adapter's deltas (and the head) train
    trainable = {n.split(".")[2] for n, p in model.named_parameters() if p.requires_grad and n.startswith("deltatune.")}
    assert trainable == {"b"}
    with torch.no_grad():
        out_b = tiny.outputs(model, batch)
        dt.set_active(model, "a")
        out_a = tiny.outputs(model, batch)
        dt.set_active(model, "a", "b")
        out_ab = tiny.outputs(model, batch)
    assert not torch.allclose(out_a, out_b) and not torch.allclose(out_ab, out_a)
    dt.save_adapter(model, tmp_path / "a", adapter="a")
    with pytest.raises(dt.ConfigError, match="adapter=NAME"):
        dt.save_adapter(model, tmp_path / "x")
    fresh = dt.load_adapter(tiny.model("bert"), tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(tiny.outputs(fresh, batch), out_a, atol=1e-5, rtol=1e-5)
    dt.detach(model, "a")
    dt.detach(model, "b")
    with torch.no_grad():
        torch.testing.assert_close(tiny.outputs(model, batch), base_out, atol=0, rtol=0)  # exact: hooks off, base untouched


@pytest.mark.parametrize("method", ["lora", "prefix", "prompt", "houlsby", "parallel", "ia3"])
def test_gradient_checkpointing_gives_the_same_gradients(method):
    grads = []
    for checkpointing in (False, True):
        model = _perturbed("llama", method)
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        tiny.loss(model, tiny.inputs("llama")).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-5, rtol=1e-4)


def test_frozen_lower_layers_build_no_graph():
    """Below the lowest trainable site nothing requires grad, so autograd records nothing there."""
    model = dt.attach(tiny.model("bert", layers=4), "lora", layers=[3])
    seen = []
    layer0 = model.bert.encoder.layer[0]
    layer0.register_forward_hook(lambda m, a, out: seen.append(out[0].requires_grad if isinstance(out, tuple) else out.requires_grad))
    model.train()
    model(**tiny.inputs("bert"))
    assert seen == [False]


@settings(max_examples=15, deadline=None)
@given(
    family=st.sampled_from(["bert", "gpt2", "llama"]),
    heads=st.sampled_from([1, 2, 4]),
    head_dim=st.sampled_from([4, 8]),
    r=st.integers(1, 6),
    alpha=st.floats(0.5, 64),
    sites=st.lists(st.sampled_from(["attn.q", "attn.k", "attn.v", "attn.o", "ffn.in", "ffn.out"]), min_size=1, max_size=3, unique=True),
)
def test_lora_any_shape(family, heads, head_dim, r, alpha, sites):
    hidden = heads * head_dim
    model = tiny.model(family, hidden=hidden, heads=heads, ffn=2 * hidden)
    batch = tiny.inputs(family)
    with torch.no_grad():
        before = tiny.outputs(model, batch)
        dt.attach(model, "lora", r=r, alpha=alpha, sites=sites)
        torch.testing.assert_close(tiny.outputs(model, batch), before, atol=0, rtol=0)  # exact: B = 0 adds +0.0
        for p in model.deltatune.parameters():
            p.add_(0.05)
        unmerged = tiny.outputs(model, batch)
        dt.merge(model)
        torch.testing.assert_close(tiny.outputs(model, batch), unmerged, atol=1e-4, rtol=1e-4)
    n_delta = sum(p.numel() for p in model.deltatune.parameters())
    from deltatune.sites import resolve, target_features

    expected = sum(r * sum(target_features(t)) for s in sites for t in resolve(model, s))
    assert n_delta == expected


@settings(max_examples=150, deadline=None)
@given(
    method=st.sampled_from(["lora", "ia3", "houlsby", "pfeiffer", "parallel", "prefix", "prompt", "telly", "lightweight"]),
    key=st.sampled_from(["r", "alpha", "bottleneck", "reduction", "scale", "length", "hidden", "k", "mode", "sites",
                         "input_sites", "layers", "dropout", "init", "activation"]),
    value=st.one_of(st.integers(-5, 100), st.floats(allow_nan=True), st.text(max_size=5), st.none(),
                    st.lists(st.integers(-2, 5), max_size=3), st.booleans()),
)
def test_any_options_raise_only_deltatune_errors(method, key, value):
    """Property: whatever the option values, the only exceptions that escape are DeltatuneErrors."""
    model = tiny.model("bert")
    try:
        dt.attach(model, method, **{key: value})
    except dt.DeltatuneError:
        assert not hasattr(model, "deltatune")


def test_a_single_layer_index_is_a_list():
    model = dt.attach(tiny.model("bert"), "lora", layers=1)
    keys = list(model.deltatune.adapters["default"].keys())
    assert keys and all(":layer:1:" in k for k in keys)


def _dropout_bert(layers=4):
    """A tiny BERT with dropout on, to tell train-mode from eval-mode layers."""
    import transformers as T
    cfg = tiny.config("bert", layers=layers)
    cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = 0.5
    torch.manual_seed(0)
    return T.BertForSequenceClassification(cfg)


@pytest.mark.parametrize("method,opts,lowest", [
    ("telly", dict(k=3), 3), ("lora", dict(layers=[2, 3]), 2), ("ln", dict(layers=[1]), 1),
    ("lora", {}, 0), ("prompt", {}, 0), ("bitfit", {}, 0), ("telly", dict(k=3, keep_dropout=True), 0),
])
def test_frozen_lower_part_runs_in_eval_mode(method, opts, lowest):
    """Blocks below the lowest trained one (and the embeddings) run without dropout while training;
    the trained part keeps it; so the frozen part's output is the same at every step."""
    keep = opts.pop("keep_dropout", False)
    model = dt.attach(_dropout_bert(), method, **opts)
    dt.set_frozen_dropout(model, keep)
    model.train()
    seen = {}
    for i, layer in enumerate(model.bert.encoder.layer):
        layer.register_forward_hook(lambda m, a, out, i=i: seen.setdefault(i, []).append(out[0] if isinstance(out, tuple) else out))
    batch = tiny.inputs("bert")
    model(**batch)
    model(**batch)
    modes = [layer.training for layer in model.bert.encoder.layer]
    assert modes == [i >= lowest for i in range(4)]
    assert model.bert.embeddings.training == (lowest == 0)
    assert model.dropout.training  # the head is never touched
    for i in range(4):
        same = torch.equal(seen[i][0], seen[i][1])
        assert same == (i < lowest), f"layer {i}"


def test_frozen_lower_part_follows_the_active_adapters_and_detach():
    model = dt.attach(_dropout_bert(), "telly", k=3)
    dt.attach(model, "lora", adapter="all")  # every layer
    model.train()
    batch = tiny.inputs("bert")
    model(**batch)
    assert all(layer.training for layer in model.bert.encoder.layer)  # lora trains layer 0
    dt.set_active(model, "default")
    model(**batch)
    assert [layer.training for layer in model.bert.encoder.layer] == [False, False, False, True]
    dt.set_active(model, "default", "all")
    assert all(layer.training for layer in model.bert.encoder.layer)
    dt.set_active(model, "default")
    model(**batch)
    dt.detach(model)
    assert all(m.training for m in model.modules())
    assert not model.bert._forward_pre_hooks


def test_frozen_lower_part_keeps_gradients_exact():
    """With dropout off, the eval-mode frozen part changes nothing: same loss and gradients as the
    same selection trained with frozen_dropout=True."""
    grads = []
    for keep in (False, True):
        model = dt.attach(tiny.model("bert", layers=4), "telly", k=2)
        dt.set_frozen_dropout(model, keep)
        model.train()
        tiny.loss(model, tiny.inputs("bert")).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=0, atol=0)


def test_prefix_mlp_runs_once_per_pass_and_never_serves_stale_values():
    model = dt.attach(tiny.model("llama", layers=3), "prefix", length=4)
    reparam = model.deltatune.adapters["default"]["shared~prefix"]
    calls = []
    reparam.mlp.register_forward_hook(lambda *a: calls.append(1))
    model.train()
    batch = tiny.inputs("llama")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    tiny.loss(model, batch).backward()
    assert len(calls) == 1  # one MLP evaluation serves the three layers
    tiny.loss(model, batch).backward()  # gradient accumulation: a second graph, no error
    opt.step()
    with torch.no_grad():
        after_step = tiny.outputs(model, batch)
        table = reparam(memo=False)
    torch.testing.assert_close(reparam(), table)  # no forward since the step: recomputed, not stale
    dt.fold(model)  # folding uses the updated MLP
    with torch.no_grad():
        torch.testing.assert_close(tiny.outputs(model, batch), after_step)


@pytest.mark.parametrize("grad", [True, False])
def test_lora_fused_add_equals_the_plain_formula(grad):
    from deltatune.deltas import LowRank
    delta = LowRank(6, 5, r=3, scale=1.5)
    torch.nn.init.normal_(delta.B)
    out, x = torch.randn(2, 4, 5), torch.randn(2, 4, 6)
    want = out + (x @ delta.A.T @ delta.B.T) * 1.5
    with torch.set_grad_enabled(grad):
        got = delta.add_to(out.clone(), x)
    torch.testing.assert_close(got, want)
    assert got.requires_grad == grad


def test_lora_fused_add_under_bf16_autocast_matches_the_plain_formula():
    from deltatune.deltas import LowRank
    delta = LowRank(6, 5, r=3, scale=1.5)
    torch.nn.init.normal_(delta.B)
    x = torch.randn(2, 4, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = torch.nn.functional.linear(x, torch.randn(5, 6))
        got = delta.add_to(out, x)
        want = out + (delta(x)).to(out.dtype)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want)


def test_a_new_mechanism_is_one_class_that_the_combine_names():
    """The store makes a mechanism from the class its combine names (``Mechanism.create``), one per model,
    and drives it through the protocol alone: a new kind of injection needs no branch in the store."""
    from deltatune import combine, mechanisms, registry
    from deltatune.deltas import Scale
    from deltatune.sites import target_features

    calls = []

    class Recording(mechanisms.Mechanism):
        @classmethod
        def create(cls, store, backbone):
            calls.append(("create", type(backbone).__name__))
            return cls(store)

        def add(self, entry):
            calls.append(("add", entry.key))
            super().add(entry)

        def drop(self, adapter):
            calls.append(("drop", adapter))
            super().drop(adapter)

        def remove(self):
            calls.append(("remove",))

    class Recorded(combine.Combine):
        name = "recorded"
        mechanism = Recording

    recorded = Recorded()

    class Probe(registry.Method):
        name = "test-recording-mechanism"
        combines = (recorded,)

        def placements(self, model):
            return [registry.Placement(t, Scale(target_features(t, self.name)[1]), recorded)
                    for t in self.targets(model, ["attn.q"])]

    registry.register(Probe)
    try:
        model = tiny.model("bert")
        batch = tiny.inputs("bert")
        with torch.no_grad():
            before = tiny.outputs(model, batch)
        dt.attach(model, Probe.name)
        dt.attach(model, Probe.name, adapter="second")
        store = model.deltatune
        assert [type(m) for m in store.mechanisms.values()] == [Recording]  # nothing else was made
        keys = [e.key for rec in store.records.values() for e in rec.entries]
        assert calls == [("create", "BertModel"), *[("add", k) for k in keys]] and len(keys) == 4
        with torch.no_grad():  # only Recording holds the entries, and it applies nothing
            torch.testing.assert_close(tiny.outputs(model, batch), before)
        dt.detach(model)
        assert calls[-3:] == [("drop", "default"), ("drop", "second"), ("remove",)]
    finally:
        registry.REGISTRY.pop(Probe.name, None)
