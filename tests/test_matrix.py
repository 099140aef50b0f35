"""One matrix over the registry x architecture families, on tiny random models.

For every method on every family it supports: identity at init (where the method starts there),
only delta/head/selected parameters train and each gets a gradient (also after a no_grad eval pass),
trainable counts match the method's formula, save -> load onto a fresh model reproduces outputs,
merged equals unmerged, detach restores the original model.
"""
from __future__ import annotations

import atexit
import math
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

import deltatune as dt
from deltatune.sites import find_backbone

from . import tiny

CASES = [
    (m, f) for m in dt.methods() for f in tiny.FAMILIES if f in dt.method_info(m)["families"]
]
IDS = [f"{m}-{f}" for m, f in CASES]


_SOURCES: dict = {}


def options(method, family):
    """Options a method cannot do without (attempt: source prompts saved by 'prompt' on this family;
    fourierft: fewer coefficients than the 1000 default, which the tiny Llama's 16 x 32 v_proj cannot hold,
    starting at zero: N(0, 1) coefficients at scale 150 change a 32-wide weight by ~1.5 per entry)."""
    if method == "fourierft":
        return {"n_frequency": 100, "init": "zero"}
    if method == "trainable-tokens":  # ids of the batch's first row, so that every row trained gets a gradient
        return {"tokens": sorted(set(tiny.inputs(family)["input_ids"][0].tolist()))[:3]}
    if method != "attempt":
        return {}
    if family not in _SOURCES:
        root = Path(tempfile.mkdtemp(prefix="deltatune-attempt-"))
        atexit.register(shutil.rmtree, root, True)
        for seed in (1, 2):
            model = dt.attach(tiny.model(family), "prompt", init="random", seed=seed)
            dt.save_adapter(model, root / f"{family}-{seed}")
        _SOURCES[family] = [str(root / f"{family}-{seed}") for seed in (1, 2)]
    return {"sources": _SOURCES[family]}


def _perturb(model, scale=0.05, seed=3):
    """Stand-in for training: move every trainable parameter away from its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def _dims(family):
    cfg = tiny.config(family)
    d, ffn, layers = 32, 64, 2
    kvd = (cfg.num_key_value_heads * (d // cfg.num_attention_heads)) if family == "llama" else d
    n_attn = 3 * layers if family in ("t5", "bart") else layers
    n_ffn = 2 * layers if family in ("t5", "bart") else layers
    return d, ffn, kvd, n_attn, n_ffn, layers


def _ln_count(family):
    d, _, _, _, _, L = _dims(family)
    return {
        "bert": (1 + 2 * L) * 2 * d, "gpt2": (2 * L + 1) * 2 * d, "llama": (2 * L + 1) * d,
        "t5": (2 * L + 1 + 3 * L + 1) * d, "bart": (2 * L + 1 + 3 * L + 1) * 2 * d, "vit": (2 * L + 1) * 2 * d,
    }[family]


def formula(method, family):
    """Trainable parameters expected from the paper's shapes, by hand (None: checked structurally)."""
    d, ffn, kvd, n_attn, n_ffn, _ = _dims(family)
    head = 3 * d + 3 if family in ("bert", "vit") else 0
    opts = dt.method_info(method)["options"]
    if method == "lora":
        r = opts["r"]
        return head + n_attn * (r * (d + d) + r * (d + kvd))
    if method == "ia3":
        return head + n_attn * 2 * kvd + n_ffn * ffn
    if method == "houlsby":
        m = opts["bottleneck"]
        return head + (n_attn + n_ffn) * (2 * d * m + m + d) + _ln_count(family)
    if method == "pfeiffer":
        m = d // opts["reduction"]
        return head + n_ffn * (2 * d * m + m + d)
    if method == "parallel":
        m = opts["bottleneck"]
        return head + n_ffn * (2 * d * m + m + d)
    if method == "prefix":
        length, h = opts["length"], opts["hidden"]
        # one embedding and one MLP whose output holds every attention's keys and values (Li & Liang)
        return head + length * d + d * h + h + h * n_attn * 2 * kvd + n_attn * 2 * kvd
    if method == "prompt":
        return head + opts["length"] * d
    if method == "ln":
        return head + _ln_count(family)
    if method == "sift":  # k = int(rate * out * in) + 1 values per q, k, v, o matrix (Song et al.'s sift.py)
        def k(n):
            return int(opts["rate"] * n) + 1
        # and int(rate * out) + 1 of each q, k, v, o bias where the family has biases (the released code trains them)
        return head + n_attn * (2 * k(d * d) + 2 * k(kvd * d)) + (
            n_attn * (2 * k(d) + 2 * k(kvd)) if family in ("bert", "gpt2", "bart", "vit") else 0)
    if method in ("compacter", "compacter++"):
        n, m = opts["n"], max(opts["n"], round(max(1, d // opts["reduction"]) / opts["n"]) * opts["n"])
        phm = n * (d // n + m // n) + m + n * (m // n + d // n) + d  # rank-1 fast factors + biases, down and up
        return head + (n_attn + n_ffn if method == "compacter" else n_ffn) * phm + n ** 3 + _ln_count(family)
    if method == "kadaptation":
        bias = family in ("bert", "gpt2", "bart", "vit")  # projections that have a bias get their own b
        nq, nv = math.gcd(32, d), math.gcd(32, d, kvd)
        fast = (d + d + bias * d) + (d + kvd + bias * kvd)  # n (in/n + out/n) = in + out per projection
        return head + 2 * nq * nq + 2 * nv * nv + n_attn * fast
    if method == "unipelt":
        r, length, h, m = opts["r"], opts["prefix_length"], opts["prefix_hidden"], d // opts["reduction"]
        lora = n_attn * (r * (d + d) + r * (d + kvd)) + n_attn * 2 * (d + 1)
        prefix = length * d + d * h + h + h * n_attn * 2 * kvd + n_attn * 2 * kvd + n_attn * (d + 1)
        return head + lora + prefix + n_ffn * (2 * d * m + m + d) + n_ffn * (d + 1)
    if method == "mam":
        length, h, m = opts["prefix_length"], opts["prefix_hidden"], opts["bottleneck"]
        return head + length * d + d * h + h + h * n_attn * 2 * kvd + n_attn * 2 * kvd + n_ffn * (2 * d * m + m + d)
    if method == "dsee":
        r = opts["r"]
        return head + n_attn * (r * (d + d) + r * (d + kvd)) + n_attn * 2 * opts["num_sparse"]
    if method == "tarp":
        r = opts["r"]
        return head + n_attn * ((d * r + 2 * r * d + r) + (kvd * r + 2 * r * d + r))
    if method == "vera":  # d (r) and b (out) per site; the shared random A and B are frozen
        r = opts["r"]
        return head + n_attn * ((r + d) + (r + kvd))
    if method == "adalora":  # P (out, r), lambda (r), Q (r, in) per site at the initial rank
        r = opts["init_r"]
        return head + n_attn * (r * (d + 1 + d) + r * (d + 1 + kvd))
    if method == "attempt":
        return head + 20 * d + 2 * d * opts["hidden"]  # a target prompt as long as the sources ('prompt' default 20)
    if method == "loha":  # two rank-r pairs per projection: 2 r (out + in)
        r = opts["r"]
        return head + n_attn * (2 * r * (d + d) + 2 * r * (kvd + d))
    if method == "lokr":  # widths split as LyCORIS does (32 = 4 x 8, 16 = 4 x 4); W1 (a, c) and W2 (b, d) full at r = 8
        split = {32: (4, 8), 16: (4, 4)}
        def kron(d_out, d_in):
            (a, b), (c, e) = split[d_out], split[d_in]
            return a * c + b * e
        return head + n_attn * (kron(d, d) + kron(kvd, d))
    if method == "oft":  # one skew block's upper triangle per block_size inputs: 32 -> one block, 32 * 31 / 2
        b = opts["block_size"]
        return head + n_attn * 2 * (d // b) * b * (b - 1) // 2
    if method == "boft":  # m factors of (in / b) full b x b blocks (peft's layout), and a scale per output
        b, m = opts["block_size"], opts["n_butterfly_factor"]
        return head + n_attn * (2 * m * (d // b) * b * b + d + kvd)
    if method == "hra":  # r reflection vectors of the input width
        return head + n_attn * 2 * d * opts["r"]
    if method == "fourierft":  # n coefficients per projection (options(): 100)
        return head + n_attn * 2 * 100
    if method == "ptuning":  # inputs, a 2-layer bidirectional LSTM of width h = d/2 per direction, a 2-layer MLP
        h = d // 2
        lstm = 2 * ((4 * h * d + 4 * h * h + 8 * h) + (4 * h * 2 * h + 4 * h * h + 8 * h))
        return head + opts["length"] * d + lstm + (2 * h * 2 * h + 2 * h) + (2 * h * d + d)
    if method == "llama-adapter":  # a prompt and a gate at each layer's self-attention
        return head + _dims(family)[5] * (opts["length"] * d + 1)
    if method == "trainable-tokens":  # the chosen rows (options(): 3 ids)
        return head + 3 * d
    if method == "loreft":  # R and W (r, d) and b (r,) at every block (tied: one per block)
        return head + _dims(family)[5] * (2 * opts["r"] * d + opts["r"])
    return None


@pytest.fixture(params=CASES, ids=IDS)
def case(request):
    return request.param


def test_identity_at_init(case):
    method, family = case
    base, batch = tiny.model(family), tiny.inputs(family)
    with torch.no_grad():
        before = tiny.outputs(base, batch)
        dt.attach(base, method, **options(method, family))
        after = tiny.outputs(base, batch)
    if dt.method_info(method)["identity_at_init"]:  # exact: a zero delta adds +0.0 (or scales by 1.0) to the same ops
        torch.testing.assert_close(after, before, atol=0, rtol=0)
    else:
        assert torch.isfinite(after).all()
        assert after.shape == before.shape


def test_trainable_parameters_and_counts(case):
    method, family = case
    model = dt.attach(tiny.model(family), method, **options(method, family))
    prefix, backbone = find_backbone(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    deltas = {n for n in trainable if n.startswith("deltatune.")}
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith("deltatune."))
    backbone_names = {f"{prefix}.{n}" if prefix else n for n, _ in backbone.named_parameters()} - deltas
    base_trained = trainable & backbone_names
    info = dt.method_info(method)
    if info["kind"] == "delta" and not info["options"].get("train_ln"):
        assert not base_trained, f"{method} trains base parameters {sorted(base_trained)[:3]}"
        assert deltas
    n_trainable, n_total = dt.count_parameters(model)
    assert n_trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    expected = formula(method, family)
    if expected is not None:
        assert n_trainable == expected
    if method == "bitfit":
        assert base_trained == {n for n in backbone_names if n.endswith("bias")}
    if method == "full":
        assert base_trained == backbone_names
    if method == "telly":  # k defaults to half of the 2 layers: block 0 and the embeddings stay frozen
        assert base_trained and not any("embed" in n or "wte" in n for n in base_trained)
        bottom = (".block.0.",) if family == "t5" else (".layer.0.", ".h.0.", ".layers.0.")
        assert not any(s in n for n in base_trained for s in bottom)
    assert 0 < n_trainable <= n_total


def test_every_trainable_parameter_gets_a_gradient(case):
    method, family = case
    model = dt.attach(tiny.model(family), method, **options(method, family))
    model.train()
    # Four rows: with two, a 2-unit bottleneck (UniPELT's adapter on the tiny BERT) can have every
    # ReLU off at the only position the classification loss reads, and get no gradient by chance.
    batch = tiny.inputs(family, batch=4)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05)
    # One step first: zero-initialised factors (LoRA's B, adapters' W_up) block their partners' gradient at init.
    tiny.loss(model, batch).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():  # an evaluation pass must not leave stale state behind (litgpt #1287)
        model(**batch)
    model.train()
    tiny.loss(model, batch).backward()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    # Position/type rows never indexed by the batch legitimately get no gradient under full training.
    missing = [n for n in missing if not any(s in n for s in ("position", "token_type", "wpe", "relative_attention_bias"))]
    assert not missing, f"{len(missing)}/{len(names)} trainable parameters got no gradient: {missing[:5]}"


def test_save_then_load_onto_fresh_model(case, tmp_path):
    method, family = case
    model = dt.attach(tiny.model(family), method, **options(method, family))
    _perturb(model)
    batch = tiny.inputs(family)
    with torch.no_grad():
        want = tiny.outputs(model, batch)
    dt.save_adapter(model, tmp_path / "a")
    fresh = dt.load_adapter(tiny.model(family), tmp_path / "a")
    with torch.no_grad():
        got = tiny.outputs(fresh, batch)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not any(f.suffix in (".bin", ".pt", ".pkl") for f in (tmp_path / "a").iterdir())


def test_merge_equals_unmerged_and_unmerge_restores(case):
    method, family = case
    model = dt.attach(tiny.model(family), method, **options(method, family))
    _perturb(model)
    batch = tiny.inputs(family)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("deltatune.")}
    with torch.no_grad():
        unmerged = tiny.outputs(model, batch)
        merged_keys = dt.merge(model)
        merged = tiny.outputs(model, batch)
        dt.unmerge(model)
        again = tiny.outputs(model, batch)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)  # (W + BA)x vs Wx + BAx: rounding, ~1e-7 x |logit|
    torch.testing.assert_close(again, unmerged, atol=0, rtol=0)  # exact: unmerge copies the saved base weights back
    if dt.method_info(method)["mergeable"] and dt.method_info(method)["kind"] == "delta":
        assert merged_keys
    for n, p in model.named_parameters():
        if n in weights:
            torch.testing.assert_close(p.detach(), weights[n], atol=0, rtol=0)  # a copy back (store.unmerge): exact


def test_detach_restores_the_original_model(case):
    method, family = case
    model, batch = tiny.model(family), tiny.inputs(family)
    keys = list(model.state_dict())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with torch.no_grad():
        before = tiny.outputs(model, batch)
    dt.attach(model, method, **options(method, family))
    _perturb(model)
    if dt.method_info(method)["mergeable"]:
        dt.merge(model)  # detach must also undo a merge
    dt.detach(model)
    assert list(model.state_dict()) == keys
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not hasattr(model, "deltatune")
    with torch.no_grad():
        after = tiny.outputs(model, batch)
    torch.testing.assert_close(after, before, atol=0, rtol=0)  # exact: detach copies the base weights back


@pytest.mark.parametrize("method", dt.methods())
def test_bad_options_are_named(method):
    model = tiny.model("bert")
    with pytest.raises(dt.DeltatuneError, match="no option 'bogus'.*valid options"):
        dt.attach(model, method, bogus=1)
    opts = dt.method_info(method)["options"]
    if "sites" in opts:
        with pytest.raises(dt.SiteError, match="known sites"):
            dt.attach(model, method, sites=["attn.nowhere"])
    for key, value in opts.items():
        if isinstance(value, int) and not isinstance(value, bool):
            with pytest.raises(dt.ConfigError, match=key):
                dt.attach(model, method, **{key: "many"})
    assert not hasattr(model, "deltatune"), "a rejected attach must leave the model untouched"
