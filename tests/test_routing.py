"""Per-row routing (dt.routing), dt.use, and the merge/detach guarantees, over the registry x families."""
from __future__ import annotations

import pytest
import torch

import deltatune as dt

from . import tiny
from .test_matrix import _perturb, options

DELTA_CASES = [(m, f) for m in dt.methods() for f in tiny.FAMILIES
               if f in dt.method_info(m)["families"] and dt.method_info(m)["kind"] == "delta"]
ROUTE_OPTIONS = {m: dict(train_ln=False) for m in dt.methods()  # LayerNorms are base weights shared by every row
                 if dt.method_info(m)["options"].get("train_ln")}


def _two_adapters(method, family, **extra):
    model = tiny.model(family)
    opts = {**ROUTE_OPTIONS.get(method, {}), **options(method, family), **extra}
    dt.attach(model, method, adapter="a", **opts)
    _perturb(model, seed=3)
    dt.attach(model, method, adapter="b", **({"length": 3} if method in ("prompt", "prefix") else {}), **opts)
    _perturb(model, seed=4)
    return model


def _row(batch, i):
    return {k: v[i:i + 1] for k, v in batch.items()}


def _alone(model, batch, names):
    outs = []
    for i, name in enumerate(names):
        with dt.use(model, *([name] if name else [])):
            outs.append(model(**_row(batch, i)).logits)
    return outs


@pytest.mark.parametrize("method,family", DELTA_CASES, ids=[f"{m}-{f}" for m, f in DELTA_CASES])
def test_a_mixed_batch_gives_each_row_what_its_adapter_gives_alone(method, family):
    """Two adapters (prompts and prefixes of different lengths) and the bare base in one batch."""
    model = _two_adapters(method, family)
    names = ["a", "b", None, "a"]
    batch = tiny.inputs(family, batch=4)
    with torch.no_grad():
        want = _alone(model, batch, names)
        with dt.routing(model, names):
            got = model(**batch).logits
    mask = batch.get("attention_mask")
    for i, w in enumerate(want):
        g = got[i:i + 1]
        if mask is not None and g.dim() == 3 and g.shape[1] == mask.shape[1]:  # compare real positions
            g, w = g[mask[i:i + 1].bool()], w[mask[i:i + 1].bool()]
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, msg=lambda m: f"row {i} ({names[i]}): {m}")


def test_many_lora_adapters_share_a_gathered_matmul_and_each_row_gets_what_its_adapter_gives_alone(monkeypatch):
    """Serving's gathered path (mechanisms._gathered): LoRA adapters of one rank share one pair of batched matmuls
    per module; a different rank, rsLoRA's scale, DoRA, (IA)^3 and the bare base sit in the same batch."""
    from deltatune import mechanisms

    model = tiny.model("llama")
    for seed, (name, opts) in enumerate([("a0", {}), ("a1", {"r": 4}), ("a2", {"use_rslora": True}), ("a3", {}),
                                         ("a4", {"r": 4}), ("dora", {"use_dora": True})], start=20):
        dt.attach(model, "lora", adapter=name, **opts)
        _perturb(model, seed=seed)
    dt.attach(model, "ia3", adapter="s")
    _perturb(model, seed=12)
    gathered = []
    real = mechanisms._gathered

    def spy(out, x, live):
        out, rest = real(out, x, live)
        gathered.append(len(live) - len(rest))
        return out, rest

    monkeypatch.setattr(mechanisms, "_gathered", spy)
    names = ["a0", "a1", "s", "a2", None, "dora", "a3", "a4", "a0"]
    batch = {k: v[:, :1] for k, v in tiny.inputs("llama", batch=len(names)).items()}  # a decode-sized pass: one token
    with torch.no_grad():
        want = _alone(model, batch, names)
        with dt.routing(model, names):
            got = model(**batch).logits
    assert gathered and max(gathered) == 5  # a0, a2, a3 (rank 8) and a1, a4 (rank 4); DoRA and (IA)^3 run alone
    with dt.routing(model, names):  # with a graph recorded nothing is gathered, and the result is the same
        graph = model(**batch).logits
    assert gathered[-1] == 0
    with torch.no_grad(), dt.routing(model, names):  # a prefill (several tokens a row) is not gathered
        model(**tiny.inputs("llama", batch=len(names)))
    assert gathered[-1] == 0
    mask = batch["attention_mask"].bool()
    for i, w in enumerate(want):
        torch.testing.assert_close(got[i][mask[i]], w[0][mask[i]], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(graph[i][mask[i]], w[0][mask[i]], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["lora", "prefix", "prompt", "ia3"])
def test_routing_every_row_to_one_adapter_equals_that_adapter_active(method):
    model = _two_adapters(method, "bert")
    batch = tiny.inputs("bert", batch=3)
    with torch.no_grad():
        dt.set_active(model, "b")
        want = tiny.outputs(model, batch)
        dt.set_active(model, "a")
        with dt.routing(model, ["b"] * 3):
            got = tiny.outputs(model, batch)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert dt.active_adapters(model) == ["a"]  # routing never touches the active set


def test_routed_generation_with_prompts_of_different_lengths():
    model = _two_adapters("prompt", "llama")
    batch = tiny.inputs("llama", batch=3, pad="left")
    names = ["a", "b", None]
    with torch.no_grad():
        want = []
        for i, name in enumerate(names):
            with dt.use(model, *([name] if name else [])):
                want.append(model.generate(**_row(batch, i), max_new_tokens=4, do_sample=False)[0, -4:])
        with dt.routing(model, names):
            got = model.generate(**batch, max_new_tokens=4, do_sample=False)[:, -4:]
    for i in range(3):
        assert got[i].tolist() == want[i].tolist(), f"row {i} ({names[i]})"


def test_routing_errors_name_the_fix():
    model = _two_adapters("lora", "bert")
    with pytest.raises(dt.ConfigError, match="no adapter named 'zzz'"):
        with dt.routing(model, ["a", "zzz"]):
            pass
    with pytest.raises(dt.ConfigError, match="one adapter name .* per row"):
        with dt.routing(model, ["a", "b"]):
            model(**tiny.inputs("bert", batch=3))
    dt.merge(model, "a")
    with pytest.raises(dt.ConfigError, match="unmerge"):
        with dt.routing(model, ["a", "b"]):
            pass
    dt.unmerge(model)
    dt.attach(model, "bitfit", adapter="sel")
    with pytest.raises(dt.ConfigError, match="trains base weights"):
        with dt.routing(model, ["sel", None]):
            pass


def test_use_restores_the_active_set_and_merged_state():
    model = _two_adapters("lora", "bert")
    dt.set_active(model, "a")
    with dt.use(model, "b"):
        assert dt.active_adapters(model) == ["b"]
    assert dt.active_adapters(model) == ["a"]
    with pytest.raises(RuntimeError):
        with dt.use(model, "b", "a"):
            raise RuntimeError("inside")
    assert dt.active_adapters(model) == ["a"]


# ---------------------------------------------------------------- merge / unmerge / detach


def _base_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("deltatune.")}


def _assert_bitwise(model, weights, backbone_only=False):
    inside = {n for n, _ in dt.sites.backbone_parameters(model)}
    for n, p in model.named_parameters():
        if n in weights and (n in inside or not backbone_only):
            assert torch.equal(p.detach(), weights[n]), n


@pytest.mark.parametrize("family", ["bert", "t5", "llama"])
@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_merge_unmerge_and_detach_restore_the_base_bitwise(method, family):
    model = tiny.model(family)
    weights = _base_weights(model)
    dt.attach(model, method)
    _perturb(model, scale=0.3)
    dt.merge(model)
    assert dt.merged_bytes(model) > 0
    dt.unmerge(model)
    _assert_bitwise(model, weights, backbone_only=True)  # the head is trained: not the base
    assert dt.merged_bytes(model) == 0
    dt.merge(model)
    dt.detach(model)
    _assert_bitwise(model, weights)


def test_ia3_zero_scale_merges_and_unmerges_without_nan():
    model = tiny.model("bert")
    weights = _base_weights(model)
    dt.attach(model, "ia3")
    with torch.no_grad():
        for p in model.deltatune.parameters():
            p[0] = 0.0
    batch = tiny.inputs("bert")
    with torch.no_grad():
        want = tiny.outputs(model, batch)
        dt.merge(model)
        torch.testing.assert_close(tiny.outputs(model, batch), want, atol=1e-5, rtol=1e-5)
        dt.unmerge(model)
    _assert_bitwise(model, weights, backbone_only=True)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_merge_refuses_a_non_finite_delta_and_leaves_the_base_as_it_was():
    model = tiny.model("bert")
    weights = _base_weights(model)
    dt.attach(model, "lora")
    with torch.no_grad():
        for p in model.deltatune.parameters():
            p.fill_(float("inf"))
    with pytest.raises(dt.ConfigError, match="non-finite"):
        dt.merge(model)
    _assert_bitwise(model, weights)


def test_an_idle_adapter_is_never_left_merged():
    model = _two_adapters("lora", "bert")
    batch = tiny.inputs("bert")
    with torch.no_grad():
        dt.set_active(model, "b")
        want = tiny.outputs(model, batch)
        dt.set_active(model, "a")
        dt.merge(model)
        dt.set_active(model, "b")
        torch.testing.assert_close(tiny.outputs(model, batch), want, atol=0, rtol=0)


def test_detach_after_the_adapter_changed_while_merged_restores_the_base():
    model = tiny.model("bert")
    weights = _base_weights(model)
    dt.attach(model, "lora")
    _perturb(model)
    dt.merge(model)
    _perturb(model, seed=9)  # a training step or load_state_dict while merged
    dt.detach(model)
    _assert_bitwise(model, weights)


def test_two_adapters_merged_into_one_weight_unmerge_one_at_a_time():
    model = _two_adapters("lora", "bert")
    weights = _base_weights(model)
    batch = tiny.inputs("bert")
    dt.set_active(model, "a", "b")
    with torch.no_grad():
        want = tiny.outputs(model, batch)
        dt.merge(model)
        torch.testing.assert_close(tiny.outputs(model, batch), want, atol=1e-5, rtol=1e-5)
        dt.unmerge(model, "a")
        torch.testing.assert_close(tiny.outputs(model, batch), want, atol=1e-5, rtol=1e-5)
        dt.unmerge(model, "b")
    _assert_bitwise(model, weights, backbone_only=True)


# ---------------------------------------------------------------- attach is all or nothing


def test_attach_rejects_what_is_not_a_model_and_changes_nothing():
    with pytest.raises(dt.ConfigError, match="torch.nn.Module"):
        dt.attach(None, "lora")
    model = tiny.model("bert")
    with pytest.raises(dt.ConfigError, match="method must be"):
        dt.attach(model, ["lora"])
    with torch.device("meta"):
        meta = tiny.CLASSES["bert"](tiny.config("bert"))
    with pytest.raises(dt.ConfigError, match="meta device"):
        dt.attach(meta, "lora")
    assert not hasattr(meta, "deltatune")
    compiled = torch.compile(model)
    with pytest.raises(dt.ConfigError, match="compile"):
        dt.attach(compiled, "lora")
    assert not hasattr(model, "deltatune") and all(p.requires_grad for p in model.parameters())


def test_a_failure_part_way_through_attach_leaves_the_model_as_it_was(monkeypatch):
    model = dt.attach(tiny.model("bert"), "lora", adapter="first")
    keys, active = list(model.state_dict()), dt.active_adapters(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    from deltatune import store

    def boom(*a, **k):
        raise RuntimeError("disk on fire")
    monkeypatch.setattr(store, "_lowest_block", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        dt.attach(model, "prefix", adapter="second")
    assert list(model.state_dict()) == keys and dt.active_adapters(model) == active
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    fresh = tiny.model("bert")
    with pytest.raises(RuntimeError, match="disk on fire"):
        dt.attach(fresh, "lora")
    assert not hasattr(fresh, "deltatune") and all(p.requires_grad for p in fresh.parameters())
    assert not fresh.bert.encoder.layer[0].attention.self.query._forward_hooks


# ---------------------------------------------------------------- honest options


def test_layers_is_honoured_or_rejected():
    model = tiny.model("bert")
    dt.attach(model, "bitfit", layers=[0])
    trained = {n for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n}
    assert trained and all(".layer.0." in n for n in trained)
    dt.detach(model)
    for method in ("prompt", "telly", "lightweight"):
        with pytest.raises(dt.ConfigError, match="cannot be restricted to layers"):
            dt.attach(model, method, layers=[0])
    with pytest.raises(dt.ConfigError, match="training setting"):
        dt.attach(model, "lora", frozen_dropout=True)
    assert not hasattr(model, "deltatune")


def test_mergeable_follows_from_the_combines():
    for name in dt.methods():
        info, cls = dt.method_info(name), dt.REGISTRY[name]
        if info["kind"] == "delta":
            assert cls.combines, f"{name} declares no combines"
            assert info["mergeable"] == all(c.mergeable for c in cls.combines)
            family = "bert" if "bert" in info["families"] else info["families"][0]
            model = tiny.model(family)
            used = {type(pl.combine) for pl in dt.registry.build_method(name, options(name, family)).placements(model)}
            assert used <= {type(c) for c in cls.combines}, name


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_generation_with_the_cache_equals_generation_without_it(method, family):
    """Decode steps that reuse the key/value cache must not prepend the prompt (or prefix) again:
    greedy tokens with the cache equal those recomputed from scratch at every step."""
    model = dt.attach(tiny.model(family), method, length=3, **({"init": "random"} if method == "prompt" else {}))
    _perturb(model, scale=0.5)
    batch = tiny.inputs(family, batch=2, pad="left")
    kw = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        cached = model.generate(**batch, use_cache=True, **kw)
        fresh = model.generate(**batch, use_cache=False, **kw)
    start = batch["input_ids"].shape[1]
    for i, (a, b) in enumerate(zip(cached.scores, fresh.scores)):  # every step's logits, not only the argmax
        if not torch.equal(cached.sequences[:, start:start + i], fresh.sequences[:, start:start + i]):
            break  # the two took different tokens at a near-tie (another CPU's rounding): inputs differ from here
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m: f"decode step {i}: {m}")
    assert i >= 1 or len(cached.scores) == 1


# ---------------------------------------------------------------- gates and composites


def test_unipelt_gates_scale_each_example_by_what_it_reads():
    """UniPELT (Mao et al. 2022, §3): G = mean over tokens of sigmoid(W x + b), one scalar per
    example; the LoRA gate replaces alpha/r, the prefix gate scales P_K and P_V."""
    from deltatune.deltas import Gated, PrefixGated

    model = dt.attach(tiny.model("bert"), "unipelt")
    _perturb(model, scale=0.3)
    modules = dict(model.deltatune.adapters["default"].items())
    lora = next(m for k, m in modules.items() if isinstance(m, Gated) and hasattr(m.delta, "A"))
    assert lora.delta.scale == 1.0
    x = torch.randn(3, 5, 32)
    g = torch.sigmoid(x @ lora.gate.proj.weight.t() + lora.gate.proj.bias).mean(dim=1, keepdim=True)  # (3, 1, 1)
    # atol: entries near 0 cancel; their rounding scales with sum |x_i A_ji| (~10 here), ~1e-6 in another order
    torch.testing.assert_close(lora(x), g * (x @ lora.delta.A.t() @ lora.delta.B.t()), atol=1e-5, rtol=1e-5)
    prefix = next(m for m in modules.values() if isinstance(m, PrefixGated))
    keys, values = prefix(x)
    base_k, base_v = prefix.table()
    assert keys.shape == (3, *base_k.shape)
    g = torch.sigmoid(x @ prefix.gate.proj.weight.t() + prefix.gate.proj.bias).mean(dim=1)[:, :, None, None]
    torch.testing.assert_close(keys, g * base_k, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(values, g * base_v, atol=1e-6, rtol=1e-5)


def test_a_composite_is_the_union_of_its_parts():
    """MAM = prefix + scaled parallel adapter: the same deltas, under one adapter, as the two methods."""
    mam = dt.attach(tiny.model("bert"), "mam", prefix_length=4, prefix_hidden=8, bottleneck=6, scale=2.0)
    keys = list(mam.deltatune.adapters["default"].keys())
    assert {k.split("~")[-1] for k in keys} == {"prefix", "adapter"}
    parts = dt.attach(tiny.model("bert"), "prefix", adapter="p", length=4, hidden=8)
    dt.attach(parts, "parallel", adapter="a", bottleneck=6, scale=2.0)
    trained = lambda m: sum(p.numel() for n, p in m.named_parameters() if n.startswith("deltatune."))  # noqa: E731
    assert trained(mam) == trained(parts)
