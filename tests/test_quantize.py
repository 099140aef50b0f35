"""A quantized frozen base (deltatune.quantize, bitsandbytes on CPU): additive methods train on it in float32,
their adapters are ordinary adapters (they load onto the float base and the other way round), methods that
would train quantized weights are refused, merging into it is refused, and the server and evaluation run on it."""
from __future__ import annotations

import json
from importlib.metadata import version

import httpx
import pytest
import torch

pytest.importorskip("bitsandbytes", reason="the quantized base needs bitsandbytes: pip install 'deltatune[quantize]'")

import deltatune as dt  # noqa: E402
from deltatune import sites, store  # noqa: E402
from deltatune.errors import AdapterFileError, ConfigError  # noqa: E402
from deltatune.models import BiEncoder  # noqa: E402
from deltatune.quantize import dequantized_weight, quantize_base, quantized_bytes  # noqa: E402

from . import serving as S  # noqa: E402
from . import tiny  # noqa: E402
from .test_train import write_task  # noqa: E402

# The output difference of tiny-llama (hidden 32, uniform random weights: a hard case for NF4, whose levels are
# a normal distribution's quantiles) between a quantized and the float base, as the relative Frobenius norm of the
# logits. Measured here when the bounds were set: the bare base nf4 0.057, fp4 0.092, int8 0.0044 (the real models'
# errors: docs/performance.md, "A quantized base").
# The bounds leave room for a trained adapter on top and for other CPUs' rounding.
DIFF_BOUND = {"nf4": 0.15, "fp4": 0.2, "int8": 0.02}


LORA = {"r": 4, "sites": ["attn.q", "attn.v", "attn.o", "ffn.out"]}


def _lm_batch():
    batch = tiny.inputs("llama", batch=4, length=12)
    return {**batch, "labels": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)}


def _rel(a, b) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def _train(model, batch, steps: int = 25, lr: float = 2e-2) -> list[float]:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_lora_on_a_quantized_base_trains_saves_and_loads_on_the_float_base(scheme, tmp_path):
    batch = _lm_batch()
    model = quantize_base(tiny.model("llama"), scheme)
    assert sites.quantization(model) == {"scheme": scheme, "library": f"bitsandbytes {version('bitsandbytes')}",
                                         "layers": 14}
    dt.attach(model, "lora", **LORA)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("deltatune.") for n in trainable)
    losses = _train(model, batch)
    reference = _train(dt.attach(tiny.model("llama"), "lora", **LORA), batch)  # the same LoRA on the float base
    # the loss falls as on the float base: the gradient flows through the quantized layers to the lower LoRAs
    assert losses[-1] < losses[0] - 0.15 and losses[0] - losses[-1] > 0.8 * (reference[0] - reference[-1]), \
        (losses, reference)
    path = dt.save_adapter(model, tmp_path / "a")
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["base"]["quantized"]["scheme"] == scheme
    float_base = tiny.model("llama")
    assert config["base"]["fingerprint"] == sites.base_digest(float_base, set())  # the float base's identity
    model.eval()
    with torch.no_grad():
        quantized_out = model(**batch).logits
        bare_gap = _rel(quantize_base(tiny.model("llama"), scheme)(**batch).logits, float_base(**batch).logits)
    dt.load_adapter(float_base, path)  # no refusal for the quantization alone
    float_base.eval()
    with torch.no_grad():
        float_out = float_base(**batch).logits
    # The adapter means on the float base what it meant on the quantized one: the outputs differ by the base's
    # quantization error (measured: docs/performance.md), not more.
    gap = _rel(quantized_out, float_out)
    assert gap < DIFF_BOUND[scheme] and gap < 2 * bare_gap + 0.01, (gap, bare_gap)
    # and the other way round: a float base's adapter onto the quantized base
    back = quantize_base(tiny.model("llama"), scheme)
    dt.load_adapter(back, path)
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(**batch).logits, quantized_out, atol=1e-5, rtol=1e-5)
    # the fingerprint still means something: another float base is refused
    with pytest.raises(AdapterFileError, match="base weights differ"):
        dt.load_adapter(tiny.model("llama", seed=1), path)


def test_a_float_base_adapter_runs_on_every_quantized_scheme_within_the_stated_difference(tmp_path):
    batch = _lm_batch()
    trained = tiny.model("llama")
    dt.attach(trained, "lora", r=4, sites=["attn.q", "attn.v", "ffn.out"])
    _train(trained, batch, steps=10)
    path = dt.save_adapter(trained, tmp_path / "a")
    with torch.no_grad():
        want = trained.eval()(**batch).logits
    for scheme in ("nf4", "fp4", "int8"):
        model = quantize_base(tiny.model("llama"), scheme)
        dt.load_adapter(model, path)
        with torch.no_grad():
            gap = _rel(model.eval()(**batch).logits, want)
        assert 0 < gap < DIFF_BOUND[scheme], (scheme, gap)


def test_additive_methods_train_on_a_quantized_base_and_the_layers_stay_frozen():
    batch = _lm_batch()
    for method, options in (("ia3", {}), ("houlsby", {}), ("prefix", {"length": 3}), ("prompt", {"length": 3, "init": "random"}),
                            ("ln", {})):
        model = quantize_base(tiny.model("llama"), "nf4")
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(("proj.weight"))}
        dt.attach(model, method, **options)
        losses = _train(model, batch, steps=6)
        assert losses[-1] < losses[0], (method, losses)
        for n, p in model.named_parameters():
            if n in frozen:
                assert not p.requires_grad and torch.equal(p, frozen[n]), (method, n)


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_a_quantized_base_counts_the_parameters_of_its_float_base(scheme):
    """The count (and a run's "% of model") is of the weights the base holds, not of their packed storage."""
    want = dt.count_parameters(dt.attach(tiny.model("llama"), "lora"))
    assert dt.count_parameters(dt.attach(quantize_base(tiny.model("llama"), scheme), "lora")) == want


def test_gradients_are_the_same_after_an_evaluation_pass():
    """bitsandbytes' CPU kernel for 4-bit inference repacks the weight at the first evaluation-mode call on
    AVX512-BF16 machines and keeps using it in training mode; deltatune keeps every layer on its float32 path."""
    batch = _lm_batch()
    model = quantize_base(tiny.model("llama"), "nf4")
    dt.attach(model, "lora", r=4, layers=[0])

    def grads():
        model.train()
        model(**batch).loss.backward()
        out = [p.grad.clone() for p in model.parameters() if p.requires_grad and p.grad is not None]
        model.zero_grad(set_to_none=True)
        return out

    before = grads()
    with torch.no_grad():
        model.eval()(input_ids=batch["input_ids"][:1, :1])  # one row, one token: the inference kernel's case
    after = grads()
    assert len(before) == len(after) > 0
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("method,family", [("full", "llama"), ("telly", "llama"), ("dps", "llama"),
                                           ("lightweight", "llama"), ("bitfit", "bert")])
def test_methods_that_train_quantized_weights_are_refused_with_the_reason(method, family):
    model = quantize_base(tiny.model(family), "nf4")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ConfigError, match=r"nf4-quantized.*no gradient step.*without --quantize"):
        dt.attach(model, method)
    assert store.store_of(model) is None  # all or nothing: the model is as it was
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_every_method_that_selects_a_quantized_parameter_is_refused():
    """Over the registry: the refusal asks each method what it trains (``selected``), so a new method that
    trains base weights is refused without naming it anywhere."""
    from deltatune.registry import REGISTRY

    for name in sorted(REGISTRY):
        model = quantize_base(tiny.model("llama"), "nf4")
        config = REGISTRY[name]()
        try:
            selected = set(config.selected(model))
        except ConfigError:
            continue
        if not selected & {n for n, _ in model.named_parameters() if n.endswith("proj.weight")}:
            continue
        with pytest.raises(ConfigError, match="quantized"):
            dt.attach(model, name)


def test_merging_into_a_quantized_base_is_refused_and_changes_nothing():
    batch = _lm_batch()
    model = quantize_base(tiny.model("llama"), "int8")
    dt.attach(model, "lora", r=4)
    _train(model, batch, steps=3)
    model.eval()
    with torch.no_grad():
        before = model(**batch).logits
    with pytest.raises(ConfigError, match="int8-quantized weight.*load the adapter onto the float base to merge"):
        dt.merge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, before, atol=0, rtol=0)
    for method in ("dsee",):  # reads W0 to start from: refused with the same reason
        with pytest.raises(ConfigError, match="reads as a float matrix|neither folds"):
            dt.attach(quantize_base(tiny.model("llama"), "nf4"), method)
    with pytest.raises(ConfigError, match="neither folds"):
        dt.attach(quantize_base(tiny.model("llama"), "nf4"), "lora", use_dora=True)


def test_quantize_base_refusals_and_what_it_keeps():
    with pytest.raises(ConfigError, match="no integer 4-bit type"):
        quantize_base(tiny.model("llama"), "int4")
    with pytest.raises(ConfigError, match="Conv1D"):
        quantize_base(tiny.model("gpt2"), "nf4")
    attached = dt.attach(tiny.model("llama"), "lora")
    with pytest.raises(ConfigError, match="quantize the base first"):
        quantize_base(attached, "nf4")
    model = quantize_base(tiny.model("llama"), "nf4")
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_base(model, "int8")
    # the embeddings, norms and the (tied) LM head stay float32; every linear layer of the blocks is quantized
    float_model = tiny.model("llama")
    assert model.lm_head.weight.dtype == torch.float32 and model.lm_head.weight is model.model.embed_tokens.weight
    q = model.model.layers[0].self_attn.q_proj
    err = _rel(dequantized_weight(q), float_model.model.layers[0].self_attn.q_proj.weight)
    assert 0.05 < err < 0.12  # NF4 of normal weights: about 0.09 (rows of 32: blocks of 32, see the next test)
    wide = tiny.model("llama", hidden=256, ffn=512)  # wide enough for the per-layer code tables not to count
    floats = sum(p.numel() * 4 for n, p in wide.named_parameters() if n.endswith("proj.weight"))
    assert quantized_bytes(quantize_base(wide, "nf4")) < 0.15 * floats  # about 0.53 bytes a weight, 4 in float32
    # the base fingerprint reads a quantized layer as the float weight it was made from
    assert sites.base_digest(model, set()) == sites.base_digest(float_model, set())


def test_rows_that_do_not_divide_into_blocks_stay_float_with_a_warning():
    """bitsandbytes 0.50.2's CPU kernel dequantizes 4-bit blocks that span two rows wrongly (0.37 relative error
    on a 32x32 weight with blocks of 64): rows of 32 take blocks of 32, rows of 48 stay float32."""
    model = tiny.model("llama", hidden=48, heads=4, ffn=64)
    with pytest.warns(UserWarning, match="12 of 14 linear layers stay float32"):
        quantize_base(model, "nf4")
    layer = model.model.layers[0]
    assert sites.quantized(layer.self_attn.q_proj) is None and sites.quantized(layer.mlp.down_proj) is not None
    float_down = tiny.model("llama", hidden=48, heads=4, ffn=64).model.layers[0].mlp.down_proj.weight
    assert _rel(dequantized_weight(layer.mlp.down_proj), float_down) < 0.12
    assert sites.quantization(quantize_base(tiny.model("llama", hidden=48, heads=4, ffn=64), "int8"))["layers"] == 14


def test_training_and_evaluation_through_the_engine(tmp_path):
    from deltatune.training import TrainConfig, evaluate, train

    task = write_task(tmp_path / "task", "classification")
    common = dict(model="tiny-bert", task=task, method="lora", max_steps=8, batch_size=8, eval_every=4, lr=1e-2,
                  max_len=32, progress=False)
    summary = train(TrainConfig(**common, quantize="int8", out_dir=str(tmp_path / "run")))
    assert summary["value"] is not None and summary["steps"] == 8
    config = json.loads((tmp_path / "run" / "best" / "adapter_config.json").read_text())
    assert config["base"]["quantized"]["scheme"] == "int8"
    # evaluated as trained (int8), and on the float base: the run's adapter loads on both
    as_trained = evaluate(tmp_path / "run")
    assert as_trained["quantize"] == "int8" and as_trained["value"] == pytest.approx(summary["value"])
    on_float = evaluate(tmp_path / "run", quantize="none")
    assert on_float["quantize"] is None and 0 <= on_float["value"] <= 1
    with pytest.raises(ConfigError, match="quantize must be one of"):
        train(TrainConfig(**common, quantize="int4", out_dir=str(tmp_path / "bad")))
    with pytest.raises(ConfigError, match="trains the base's own weights"):
        train(TrainConfig(**{**common, "method": "full"}, quantize="nf4", out_dir=str(tmp_path / "full")))
    assert not (tmp_path / "full").exists()  # refused before the run folder was touched


def test_a_quantized_base_server_answers_with_the_adapters_unmerged(tmp_path):
    from deltatune.serve.engine import Engine

    lora = S.save_retrieval(tmp_path / "lora", "lora", 1)
    ia3 = S.save_retrieval(tmp_path / "ia3", "ia3", 2)
    engine = Engine("tiny-bert", max_wait=0.05, quantize="int8")
    try:
        engine.load("lora", lora)
        engine.load("ia3", ia3)
        assert sites.quantization(engine.model)["scheme"] == "int8"
        with S.running(engine) as url:
            answers = {name: httpx.post(f"{url}/v1/adapters/{name}/embed", json={"text": "read a file"}, timeout=30)
                       for name in ("lora", "ia3")}
    finally:
        engine.close()
    for name, path in (("lora", lora), ("ia3", ia3)):
        assert answers[name].status_code == 200, answers[name].text
        got = torch.tensor(answers[name].json()["embeddings"][0])
        # what the adapter gives alone on an int8 base, unmerged (rows quantized one by one in both cases)
        enc = BiEncoder(quantize_base(S.fresh("tiny-bert", "base")[0], "int8"))
        dt.load_adapter(enc, path)
        tok = S.fresh("tiny-bert", "base")[1]
        with torch.no_grad():
            want = enc.eval()(**tok(["read a file"], truncation=True, max_length=256, return_tensors="pt"))[0]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        # and near what it gives on the float base
        assert _rel(got, S.alone_embedding("tiny-bert", path, "read a file")) < 0.05


def test_the_int8_inference_matmul_agrees_with_bitsandbytes_and_the_float_layer(monkeypatch):
    """deltatune's int8 product (torch._int_mm, float32 around it) computes bitsandbytes' LLM.int8() without
    outliers: the same codes and row scales, activations quantized per row."""
    import deltatune.quantize as Q

    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 64).requires_grad_(False)
    float_weight = linear.weight.clone()
    layer = Q.quantize_linear(linear, "int8").eval()
    assert torch.equal(linear.weight, float_weight)  # the float layer is left as it was
    for x in (torch.randn(3, 5, 96), torch.randn(1, 1, 96), torch.zeros(2, 96)):
        with torch.no_grad():
            ours = Q.int8_matmul(x, layer.state.CB, layer.state.SCB, layer.bias)
            monkeypatch.setattr(Q, "FAST_INT8", False)
            theirs = layer(x)
            monkeypatch.setattr(Q, "FAST_INT8", True)
            want = torch.nn.functional.linear(x, linear.weight, linear.bias)
        assert ours.shape == want.shape and ours.dtype == x.dtype
        torch.testing.assert_close(ours, theirs, atol=5e-3 * float(want.abs().max()) + 1e-6, rtol=0)
        assert _rel(ours, want) < 0.02 if want.norm() > 0 else torch.equal(ours, want)
    layer.train()  # training: bitsandbytes' weight-only product, differentiable in its input
    x = torch.randn(4, 96, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and _rel(x.grad, linear.weight.sum(0).expand(4, -1)) < 0.02
