"""Several named adapters in one model, and composition: stack, weighted average (LoRA by SVD), fold."""
from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune import compose

from . import tiny
from .test_matrix import _perturb


def _with(model, method, name, seed, **options):
    dt.attach(model, method, adapter=name, **options)
    _perturb(model, scale=0.2, seed=seed)
    return model


def _out(model, batch, *active):
    with torch.no_grad(), dt.use(model, *active):
        return tiny.outputs(model, batch)


def _saved(tmp_path, model, names):
    dirs = {}
    for n in names:
        dirs[n] = dt.save_adapter(model, tmp_path / n, adapter=n)
    return dirs


def test_several_saved_adapters_load_under_names_and_one_unloads(tmp_path):
    src = tiny.model("bert")
    _with(src, "lora", "a", 1)
    _with(src, "ia3", "b", 2)
    _with(src, "prefix", "c", 3, length=3)
    batch = tiny.inputs("bert", batch=3)
    want = {n: _out(src, batch, n) for n in "abc"}
    dirs = _saved(tmp_path, src, "abc")
    model = tiny.model("bert")
    for n in "abc":
        dt.load_adapter(model, dirs[n], adapter=f"task-{n}")
    assert dt.adapters(model) == ["task-a", "task-b", "task-c"]
    dt.detach(model, "task-b")
    assert dt.adapters(model) == ["task-a", "task-c"]
    for n in "ac":  # the shared head is the last loaded adapter's: compare the backbone's outputs
        with torch.no_grad(), dt.use(model, f"task-{n}"):
            got = model.bert(**batch).last_hidden_state
        with torch.no_grad(), dt.use(src, n):
            ref = src.bert(**batch).last_hidden_state
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(dt.ConfigError, match="no adapter named 'task-b'"):
        dt.detach(model, "task-b")
    assert set(want)  # the adapters' own outputs differ from each other
    assert not torch.allclose(want["a"], want["c"])


def test_heads_travel_with_their_adapter(tmp_path):
    from deltatune.models import Classifier, load_backbone

    backbone, _ = load_backbone("tiny-bert", "base")
    clf = Classifier(backbone, 3)
    dt.attach(clf, "lora", adapter="bugs")
    _perturb(clf, scale=0.2, seed=5)
    path = dt.save_adapter(clf, tmp_path / "bugs")
    heads = {}
    fresh = Classifier(load_backbone("tiny-bert", "base")[0], 3)
    dt.load_adapter(fresh, path, adapter="bugs", heads=heads)
    assert sorted(heads) == ["head.head.bias", "head.head.weight"]
    torch.testing.assert_close(heads["head.head.weight"], clf.head.weight.detach())
    assert not torch.equal(fresh.head.weight, clf.head.weight)  # the model's own head was left alone


@pytest.mark.parametrize("methods", [("lora", "lora"), ("lora", "ia3"), ("ia3", "pfeiffer"), ("lora", "prefix")])
def test_a_stack_gives_what_its_parts_give_together_and_saves_like_any_adapter(methods, tmp_path):
    model = tiny.model("bert")
    _with(model, methods[0], "a", 1)
    _with(model, methods[1], "b", 2, **({"r": 4} if methods[1] == "lora" else {}))
    batch = tiny.inputs("bert", batch=3)
    want = _out(model, batch, "a", "b")
    compose.stack(model, ["a", "b"], adapter="ab")
    assert dt.active_adapters(model) == ["b"]  # the active set is left as it was
    torch.testing.assert_close(_out(model, batch, "ab"), want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(_out(model, batch, "a"), want, atol=1e-4)
    path = dt.save_adapter(model, tmp_path / "ab", adapter="ab")
    fresh = tiny.model("bert")
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("deltatune.")})
    dt.load_adapter(fresh, path)
    torch.testing.assert_close(_out(fresh, batch, "ab"), want, atol=1e-5, rtol=1e-5)
    with torch.no_grad(), dt.routing(model, ["ab", None, "a"]):  # a stack routes per row like any adapter
        routed = tiny.outputs(model, batch)
    assert routed.shape == want.shape


def test_stack_of_a_stack_flattens_and_bad_parts_are_named():
    model = tiny.model("bert")
    _with(model, "lora", "a", 1)
    _with(model, "ia3", "b", 2)
    _with(model, "lora", "c", 3, r=2)
    batch = tiny.inputs("bert")
    compose.stack(model, ["a", "b"], adapter="ab")
    compose.stack(model, ["ab", "c"], adapter="abc")
    assert len(model.deltatune.records["abc"].method.parts) == 3
    torch.testing.assert_close(_out(model, batch, "abc"), _out(model, batch, "a", "b", "c"), atol=1e-5, rtol=1e-5)
    with pytest.raises(dt.ConfigError, match="already attached"):
        compose.stack(model, ["a", "b"], adapter="ab")
    with pytest.raises(dt.ConfigError, match="no adapter named 'zz'"):
        compose.stack(model, ["a", "zz"], adapter="x")
    with pytest.raises(dt.ConfigError, match="cannot itself be a stack"):
        dt.attach(tiny.model("bert"), "stack", parts=[{"method": "stack", "options": {}}])
    with pytest.raises(dt.ConfigError, match="only delta methods stack"):
        dt.attach(tiny.model("bert"), "stack", parts=[{"method": "bitfit"}])
    with pytest.raises(dt.ConfigError, match="part 0 must be"):
        dt.attach(tiny.model("bert"), "stack", parts=["lora"])


def test_lora_average_is_exact_at_full_rank_and_reports_the_svd_error():
    model = tiny.model("bert")
    _with(model, "lora", "a", 1, r=4)
    _with(model, "lora", "b", 2, r=2, alpha=4.0)
    weights = [0.75, 0.25]
    report = compose.average(model, ["a", "b"], weights, adapter="avg")
    assert report["rank"] == 6 and report["error"] < 1e-6
    store = model.deltatune
    for key, delta in store.adapters["avg"].items():
        want = 0.75 * store.adapters["a"][key].delta_weight() + 0.25 * store.adapters["b"][key].delta_weight()
        torch.testing.assert_close(delta.delta_weight(), want, atol=1e-5, rtol=1e-4)
    low = compose.average(model, ["a", "b"], weights, adapter="avg1", rank=1)
    assert 0 < low["error"] < 1 and set(low["site_errors"]) == set(store.adapters["a"])
    # the reported error is the true relative Frobenius error of the rank-1 factorisation
    num = den = 0.0
    for key, delta in store.adapters["avg1"].items():
        exact = store.adapters["avg"][key].delta_weight().double()
        num += float((exact - delta.delta_weight().double()).norm() ** 2)
        den += float(exact.norm() ** 2)
    assert abs((num / den) ** 0.5 - low["error"]) < 1e-4
    assert model.deltatune.records["avg1"].method.r == 1


def test_average_of_ia3_is_the_average_of_the_scales_and_mismatches_are_refused():
    model = tiny.model("bert")
    _with(model, "ia3", "a", 1)
    _with(model, "ia3", "b", 2)
    compose.average(model, ["a", "b"], [1.0, 3.0], adapter="avg")  # normalised: 0.25 / 0.75
    s = model.deltatune.adapters
    for key in s["avg"]:
        torch.testing.assert_close(s["avg"][key].l, 0.25 * s["a"][key].l + 0.75 * s["b"][key].l)
    _with(model, "lora", "c", 3)
    with pytest.raises(dt.ConfigError, match="one method"):
        compose.average(model, ["a", "c"], adapter="x")
    with pytest.raises(dt.ConfigError, match="rank applies to LoRA only"):
        compose.average(model, ["a", "b"], adapter="x", rank=2)
    with pytest.raises(dt.ConfigError, match="sum to 0"):
        compose.average(model, ["a", "b"], [1, -1], adapter="x")
    _with(model, "lora", "d", 4, sites=["attn.k"])
    with pytest.raises(dt.ConfigError, match="different sites"):
        compose.average(model, ["c", "d"], adapter="x")


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_fold_into_base_gives_a_plain_model_with_the_adapters_outputs(method, tmp_path):
    model = tiny.model("bert")
    _with(model, method, "a", 1)
    batch = tiny.inputs("bert", batch=3)
    want = _out(model, batch, "a")
    compose.fold_into_base(model, "a")
    assert not hasattr(model, "deltatune")
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(tiny.outputs(model, batch), want, atol=1e-5, rtol=1e-5)
    path = compose.save_folded(model, tmp_path / "merged")
    again = type(model).from_pretrained(path)
    with torch.no_grad():
        torch.testing.assert_close(tiny.outputs(again.eval(), batch), want, atol=1e-5, rtol=1e-5)


def test_fold_into_base_refuses_what_would_change_other_adapters_or_cannot_merge():
    model = tiny.model("bert")
    _with(model, "lora", "a", 1)
    _with(model, "prefix", "p", 2)
    with pytest.raises(dt.ConfigError, match="trained on; detach them first"):
        compose.fold_into_base(model, "a")
    dt.detach(model, "a")
    with pytest.raises(dt.ConfigError, match="cannot be folded"):
        compose.fold_into_base(model, "p")
    assert dt.adapters(model) == ["p"]


def test_fold_keeps_a_classifier_head_and_saves_it(tmp_path):
    from safetensors.torch import load_file

    from deltatune.models import Classifier, load_backbone

    clf = Classifier(load_backbone("tiny-bert", "base")[0], 3)
    dt.attach(clf, "lora")
    _perturb(clf, scale=0.2, seed=5)
    head = clf.head.weight.detach().clone()
    compose.fold_into_base(clf)
    torch.testing.assert_close(clf.head.weight.detach(), head, atol=0, rtol=0)
    path = compose.save_folded(clf, tmp_path / "m")
    assert torch.equal(load_file(str(path / "head.safetensors"))["head.weight"], head)
    assert (path / "config.json").exists()


def test_average_of_sparse_deltas_needs_the_same_indices():
    """SIFT's values sit at indices chosen per adapter: values at different weights must not be added up."""
    from deltatune.deltas import Sparse

    model = tiny.model("bert")
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        _with(model, "sift", name, seed)
    s = model.deltatune.adapters
    parts = {n: [(k, m) for k, d in s[n].items() for m in d.modules() if isinstance(m, Sparse)] for n in "abc"}
    assert parts["a"]
    for (_, pa), (_, pb), (_, pc) in zip(parts["a"], parts["b"], parts["c"]):
        pb.indices.copy_(pa.indices)  # b holds the same weights as a; c others
        pc.indices.copy_(torch.flip(pa.indices, [0]) if pa.indices.numel() > 1 else pa.indices + 1)
    compose.average(model, ["a", "b"], adapter="ab")
    for (_, pa), (_, pb), (_, avg) in zip(parts["a"], parts["b"],
                                          [(k, m) for k, d in s["ab"].items() for m in d.modules()
                                           if isinstance(m, Sparse)]):
        assert torch.equal(avg.indices, pa.indices)
        torch.testing.assert_close(avg.values, 0.5 * (pa.values + pb.values))
    with pytest.raises(dt.ConfigError, match="not trained"):
        compose.average(model, ["a", "c"], adapter="ac")
    assert "ac" not in model.deltatune.records  # nothing attached
