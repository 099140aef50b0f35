"""The update seam (deltatune.updates) and what plugs into it: DPS, SIFT and private training."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch
import transformers as T
from safetensors.torch import load_file
from torch.nn import functional as F

import deltatune as dt
from deltatune.training import privacy
from deltatune.errors import ConfigError
from deltatune.methods.dps import DPSRule
from deltatune.methods.sift import SiftRule
from deltatune.training import TrainConfig, train

from . import tiny

WORDS = ("red green blue cat dog fish sun moon".split(), "star tree rock river cloud apple pear plum".split())


def _task(folder, kind="classification", n_train=64, n_eval=16):
    rng = random.Random(7)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("valid", n_eval), ("test", n_eval)):
        rows = []
        for _ in range(n):
            y = rng.randrange(2)
            words = rng.sample(WORDS[y], 3)
            rows.append({"text": " ".join(words), "label": y} if kind == "classification" else
                        {"query": words[0], "code": f"def {words[1]}(): pass"})
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return _task(tmp_path_factory.mktemp("task"))


def _config(out, task, **over):
    base = dict(model="tiny-bert", task=task, method="lora", max_steps=12, batch_size=8, eval_every=6, lr=1e-2,
                max_len=32, out_dir=str(out), progress=False)
    return TrainConfig(**{**base, **over})


def _resume_matches(tmp_path, task, stop, **over):
    straight = train(_config(tmp_path / "a", task, **over))
    cut = _config(tmp_path / "b", task, stop_after=stop, **over)
    assert train(cut)["stopped_at"] == stop
    resumed = train(TrainConfig(**{**cut.__dict__, "stop_after": None, "resume": True}))
    for sub in ("checkpoints/step-000012/adapter", "best"):
        left = load_file(tmp_path / "a" / sub / "adapter.safetensors")
        right = load_file(tmp_path / "b" / sub / "adapter.safetensors")
        assert left.keys() == right.keys()
        assert all(torch.equal(left[k], right[k]) for k in left), sub
    assert resumed["value"] == straight["value"]
    return straight, resumed


# ------------------------------------------------------------------------------------ resume


@pytest.mark.parametrize("variant, stage_fraction, stop", [
    ("dense", 0.25, 7),  # stages of 3 steps: stop inside Stage I, the scores must survive
    ("dense", 0.2, 7),  # stages of 2 steps: stop inside Stage II, the masks must survive
    ("mix", 0.25, 7),
])
def test_dps_resume_is_bitwise(tmp_path, task, variant, stage_fraction, stop):
    _resume_matches(tmp_path, task, stop, method="dps", lr=1e-3,
                    options={"variant": variant, "stage_fraction": stage_fraction})


def test_sift_resume_is_bitwise(tmp_path, task):
    _resume_matches(tmp_path, task, 1, method="sift", options={"rate": 0.05})  # stopped right after selecting
    adapter = load_file(tmp_path / "a" / "best" / "adapter.safetensors")
    indices = [v for k, v in adapter.items() if k.endswith(".indices")]
    assert indices and all(v.dtype == torch.int64 for v in indices)
    placeholder = torch.arange(len(indices[0])) * (32 * 32 // len(indices[0]))
    assert not all(torch.equal(v, placeholder) for v in indices), "the indices were never chosen"


def test_private_resume_goes_on_with_fresh_noise_and_the_same_accounting(tmp_path, task):
    """The noise is not reproducible (issue 21: a secure source, not the run's seed), so a resumed private run
    is not bitwise the uninterrupted one; its privacy accounting goes on from the checkpoint's step count."""
    over = dict(method="lora", dp_epsilon=8.0, dp_clip=0.5)
    straight = train(_config(tmp_path / "a", task, **over))
    cut = _config(tmp_path / "b", task, stop_after=5, **over)
    assert train(cut)["stopped_at"] == 5
    resumed = train(TrainConfig(**{**cut.__dict__, "stop_after": None, "resume": True}))
    assert resumed["dp_epsilon"] == straight["dp_epsilon"] and resumed["dp_steps"] == straight["dp_steps"] == 12


def test_private_runs_with_the_same_seed_draw_different_noise_and_batches(tmp_path, task):
    """Two private runs with the same seed end with different adapters (the noise and the Poisson sample come from
    the operating system's secure source); a non-private run with the same seed stays bitwise reproducible."""
    def adapter(name, **over):
        train(_config(tmp_path / name, task, max_steps=3, eval_every=3, **over))
        return load_file(tmp_path / name / "checkpoints" / "step-000003" / "adapter" / "adapter.safetensors")

    first, second = adapter("p1", dp_epsilon=8.0), adapter("p2", dp_epsilon=8.0)
    assert first.keys() == second.keys()
    assert any(not torch.equal(first[k], second[k]) for k in first if "lora" in k or "delta" in k)
    plain_a, plain_b = adapter("n1"), adapter("n2")
    assert all(torch.equal(plain_a[k], plain_b[k]) for k in plain_a)
    samples = [privacy.poisson_sample(1000, 0.5) for _ in range(2)]
    assert samples[0] != samples[1]  # 1000 coin flips: equal with probability 2**-1000


# ------------------------------------------------------------------------------------ DPS


def _linear_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def test_dps_dense_stages_and_masks():
    model = _linear_model()
    linears = {"0.weight": model[0], "2.weight": model[2]}
    rule = DPSRule(linears, "dense", update_fraction=0.7, stage_fraction=0.25)
    rule.bind(8)  # stages of 2 steps: 1-2 I, 3-4 II, 5-6 I, 7-8 II
    x = torch.randn(4, 6)
    scores = {n: torch.zeros_like(m.weight) for n, m in linears.items()}
    for step in range(1, 5):
        rule.before_step(step)
        model.zero_grad()
        model(x * step).square().sum().backward()
        raw = {n: m.weight.grad.clone() for n, m in linears.items()}
        rule.after_backward(step)
        for n, m in linears.items():
            if step <= 2:
                scores[n] += raw[n].square() / 1e3
                assert torch.equal(m.weight.grad, raw[n])  # Stage I: full fine-tuning
            else:  # Stage II: exactly the top ceil(0.7 N) entries by the Stage I score get a gradient
                k = math.ceil(0.7 * m.weight.numel())
                kept = m.weight.grad != 0
                assert int(kept.sum()) == k
                threshold = scores[n].flatten().topk(k).values.min()
                assert (scores[n][kept] >= threshold).all()
                assert torch.equal(m.weight.grad[kept], raw[n][kept])
    rule.before_step(5)  # a new Stage I resets the scores
    assert all(s["score"].abs().sum() == 0 for s in rule.state.values())


def test_dps_mix_forward_and_gradient():
    model = _linear_model()
    w0 = model[0].weight.detach().clone()
    rule = DPSRule({"0.weight": model[0]}, "mix", update_fraction=0.6, stage_fraction=0.25)
    rule.bind(8)
    with torch.no_grad():
        model[0].weight.add_(0.1)  # W now differs from T = W(0)
    rule.before_step(1)
    m = rule.state["0.weight"]["mask"]
    assert all(torch.equal(m[0], row) for row in m)  # one Bernoulli draw per input column
    x = torch.randn(4, 6)
    model.train()
    out = model[0](x)
    p, w = 0.4, model[0].weight
    want = F.linear(x, ((1 - m.float()) * w0 + m * w - p * w0) / (1 - p), model[0].bias)
    torch.testing.assert_close(out, want)
    out.sum().backward()
    plain = torch.ones(4, 5).T @ x  # d(sum)/dW of a plain linear layer
    torch.testing.assert_close(w.grad, plain * m)  # grad * m, without the 1/(1 - p)
    model.eval()
    torch.testing.assert_close(model[0](x), F.linear(x, w, model[0].bias))


def test_dps_option_is_named_for_what_is_updated():
    info = dt.method_info("dps")
    assert info["options"]["update_fraction"] == 0.7 and info["kind"] == "selection"
    with pytest.raises(ConfigError, match="update_fraction"):
        dt.attach(tiny.model("bert"), "dps", update_fraction=1.5)
    with pytest.raises(ConfigError, match="does not support gpt2"):
        dt.attach(tiny.model("gpt2"), "dps")


# ------------------------------------------------------------------------------------ SIFT


def test_sift_selects_the_top_gradient_entries_and_keeps_them():
    batch = tiny.inputs("bert")
    labels = torch.tensor([0, 2])
    reference = tiny.model("bert")  # the dense gradient dL/dW of the same base, by plain autograd
    reference.train()
    F.cross_entropy(reference(**batch).logits, labels).backward()

    model = dt.attach(tiny.model("bert"), "sift", rate=0.1)
    model.train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    rule = model.deltatune.records["default"].method.update_rule(model, params)
    assert isinstance(rule, SiftRule)
    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    for step in (1, 2):
        rule.before_step(step)
        F.cross_entropy(model(**batch).logits, labels).backward()
        rule.after_backward(step)
        if step == 1:
            chosen = {e.key: e.delta.indices.clone() for e in model.deltatune.records["default"].entries}
            assert all(e.delta.values.grad is None for e in model.deltatune.records["default"].entries)
        opt.step()
        opt.zero_grad()
    for e in model.deltatune.records["default"].entries:
        name = e.key.replace(":", ".")
        grad = reference.get_parameter(name + ".weight").grad.abs().flatten()
        k = e.delta.indices.numel()
        assert k == int(0.1 * 32 * 32) + 1
        assert torch.equal(e.delta.indices, chosen[e.key])  # fixed after the first step
        assert grad[e.delta.indices].min() >= grad.topk(k).values.min() - 1e-12
        state = opt.state[e.delta.values]
        assert state["exp_avg"].shape == (k,)  # optimizer state only for the chosen entries
    with torch.no_grad():  # (W + scatter(values)) x vs W x + scatter(values) x: rounding only, logits ~0.02 here
        before = tiny.outputs(model, batch)
        dt.merge(model)
        torch.testing.assert_close(tiny.outputs(model, batch), before, atol=1e-6, rtol=1e-6)


def test_sift_optimizer_memory_on_minilm_shapes():
    """AdamW keeps two floats per trained value: SIFT's state against full fine-tuning, MiniLM-L6 shapes."""
    cfg = T.BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                       intermediate_size=1536, max_position_embeddings=512)
    model = dt.attach(T.BertModel(cfg), "sift")
    sift = sum(p.numel() for n, p in model.named_parameters() if n.startswith("deltatune."))
    full = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("deltatune."))
    per_matrix = int(0.008 * 384 * 384) + 1
    assert sift == 6 * 4 * (per_matrix + int(0.008 * 384) + 1)  # 28,416 values: each matrix and its bias
    assert full == 22_713_216
    # 2 x 4 bytes per trained value: 0.23 MB against 181.7 MB, 0.125% of full fine-tuning's optimizer state
    assert 2 * 4 * sift / (2 * 4 * full) < 0.00126


def test_sift_refuses_private_training(tmp_path, task):
    with pytest.raises(ConfigError, match="sift chooses its entries"):
        train(_config(tmp_path / "r", task, method="sift", dp_epsilon=8.0))


# ------------------------------------------------------------------------------------ privacy


class _Classify:
    def loss(self, model, batch):
        inputs, labels = batch
        return F.cross_entropy(model(**inputs).logits.float(), labels)


@pytest.mark.parametrize("use_vmap", [True, False])
def test_per_example_gradients_and_clipping_match_a_loop(use_vmap):
    model = dt.attach(tiny.model("bert"), "lora")
    model.train()
    inputs = tiny.inputs("bert", batch=4)
    if use_vmap:  # HF's padding-mask shortcut branches on data; without a mask the forward is vmappable
        inputs = {k: v for k, v in inputs.items() if k != "attention_mask"}
    labels = torch.tensor([0, 1, 2, 1])
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():  # LoRA's B starts at zero, which would give A no gradient
        for p in params.values():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    grads, losses = privacy.per_example_grads(model, _Classify(), (inputs, labels), params, use_vmap=use_vmap)
    clip = 0.05
    sums, norms = privacy.clip_and_sum(grads, clip)
    want_sum = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(4):
        model.zero_grad()
        one = {k: v[i:i + 1] for k, v in inputs.items()}
        if "attention_mask" in one:  # the example alone, without its padding
            keep = one["attention_mask"][0].bool()
            one = {k: v[:, keep] for k, v in one.items()}
        loss = F.cross_entropy(model(**one).logits, labels[i:i + 1])
        loss.backward()
        torch.testing.assert_close(losses[i], loss.detach(), atol=1e-5, rtol=1e-5)
        norm = torch.sqrt(sum(p.grad.square().sum() for p in params.values()))
        torch.testing.assert_close(norms[i], norm, atol=1e-5, rtol=1e-4)
        for n, p in params.items():
            torch.testing.assert_close(grads[n][i], p.grad, atol=1e-5, rtol=1e-4)
            want_sum[n] += p.grad * min(1.0, clip / (float(norm) + 1e-6))
    assert (norms > clip).any()  # the clip binds for some example
    for n in params:
        torch.testing.assert_close(sums[n], want_sum[n], atol=1e-6, rtol=1e-4)


def test_noise_multiplier_and_epsilon_against_opacus(tmp_path, task):
    from opacus.accountants import RDPAccountant
    from opacus.accountants.utils import get_noise_multiplier

    summary = train(_config(tmp_path / "dp", task, method="lora", dp_epsilon=3.0, max_steps=10, eval_every=10))
    q = 8 / 64
    assert summary["dp_delta"] == 1e-3 and summary["dp_sample_rate"] == q  # 1/(10 x 64) rounded down to a power of ten
    sigma = get_noise_multiplier(target_epsilon=3.0, target_delta=1e-3, sample_rate=q, steps=10, accountant="rdp")
    assert summary["dp_noise_multiplier"] == sigma
    accountant = RDPAccountant()
    for _ in range(10):
        accountant.step(noise_multiplier=sigma, sample_rate=q)
    assert summary["dp_epsilon"] == pytest.approx(accountant.get_epsilon(1e-3), rel=1e-9)
    assert 3.0 - 0.011 <= summary["dp_epsilon"] <= 3.0  # Opacus's search tolerance is 0.01 in epsilon
    assert summary["dp_steps"] == 10


def test_noise_has_the_accounted_scale():
    model = dt.attach(tiny.model("bert"), "lora", r=16)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    rule = privacy.PrivateTraining(params, n=100, batch=10, chunk=10, epsilon=2.0, delta=1e-3, clip=0.5,
                                   to_device=lambda b: b)
    rule.bind(50)

    class Flat:  # a zero loss: the gradients are the noise alone
        def collate(self, examples):
            return torch.zeros(len(examples), 1)

        def loss(self, model, batch):
            return sum(p.sum() for p in model.deltatune.parameters()) * 0.0 + batch.sum()

    class Order:
        consumed = 0

    rule.backward(model, Flat(), list(range(100)), Order(), step=1)
    noise = torch.cat([p.grad.flatten() for p in params.values()])
    assert noise.numel() > 4000  # the std of 4000 draws is within 5% of sigma C / B with ~4.5 sigma margin
    assert float(noise.std()) == pytest.approx(rule.sigma * 0.5 / 10, rel=0.05)


def test_private_training_refusals(tmp_path, task):
    retrieval = _task(tmp_path / "ret", "retrieval")
    with pytest.raises(ConfigError, match="in-batch contrastive loss"):
        train(_config(tmp_path / "r", retrieval, dp_epsilon=8.0))
    with pytest.raises(ConfigError, match="set dp_epsilon"):
        train(_config(tmp_path / "r2", task, dp_clip=1.0))
    with pytest.raises(ConfigError, match="fewer than all"):
        train(_config(tmp_path / "r3", task, dp_epsilon=8.0, batch_size=64))
    assert privacy.default_delta(1000) == 1e-4 and privacy.default_delta(1001) == 1e-5  # at most 1/(10 n)
    assert privacy.default_delta(64) == 1e-3
