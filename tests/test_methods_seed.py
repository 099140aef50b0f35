"""Trainable-parameter counts of the seed methods on BERT-base shapes, against the papers' formulas.

A randomly initialised BertModel with bert-base-uncased's shapes (d = 768, 12 layers, FFN 3072; no
download, no task head), so every count below is the adapter's own. The expected numbers are
written from the papers' descriptions (METHODS.md), not from the implementation.
"""
from __future__ import annotations

import pytest
import torch
import transformers as T

import deltatune as dt

D, L = 768, 12
LN = 25 * 2 * D  # BERT-base's LayerNorms: embeddings + 2 per layer, gain and bias


@pytest.fixture(scope="module")
def bert_base():
    torch.manual_seed(0)
    return T.BertModel(T.BertConfig(), add_pooling_layer=False).eval()


def trainable(model, method, **options):
    dt.attach(model, method, adapter="count", **options)
    try:
        return dt.count_parameters(model)[0]
    finally:
        dt.detach(model)


def compacter_formula(d, adapters, layer_norms, n=4, reduction=32):
    """Karimi Mahabadi et al. §3: a PHM layer k -> m with rank-1 fast factors holds n (k/n + m/n)
    weights and m biases; the n^3 of the A_i are shared by all of them."""
    m = d // reduction
    per_adapter = n * (d // n + m // n) + m + n * (m // n + d // n) + d
    return adapters * per_adapter + n ** 3 + layer_norms


def test_compacter_counts(bert_base):
    assert trainable(bert_base, "compacter") == compacter_formula(D, 2 * L, LN) == 95_488
    assert trainable(bert_base, "compacter++") == compacter_formula(D, L, LN) == 66_976
    # The same formula gives the paper's T5-base figures (METHODS.md §6): 62 RMS norms of d gains,
    # adapters in 12 encoder + 12 decoder blocks.
    assert round(compacter_formula(768, 24, 62 * 768) / 1000) == 105  # Compacter++, "0.047%"
    assert round(compacter_formula(768, 48, 62 * 768) / 1000) == 162  # Compacter, "0.073%"


def test_kadaptation_count(bert_base):
    n = 32
    slow = 2 * (n * n + n * n)  # u_i, v_i for the q rule and for the v rule, shared by all layers
    fast = 2 * n * (D // n + D // n)  # rank-1 s_i, t_i of q and of v, per layer
    official = slow + L * (fast + D)  # one bias per layer in the official code: 50,176 (PEViT README)
    assert official == 50_176
    assert trainable(bert_base, "kadaptation") == official + L * D  # here q and v each have their own bias


def test_unipelt_count(bert_base):
    r, length, hidden, m = 8, 10, 512, D // 16
    gate = D + 1  # nn.Linear(d, 1) per layer and submodule
    lora = L * 2 * (r * D + D * r + gate)
    prefix = length * D + D * hidden + hidden + hidden * L * 2 * D + L * 2 * D + L * gate  # MLP reparameterisation
    adapter = L * (D * m + m + m * D + D + gate)
    assert trainable(bert_base, "unipelt") == lora + prefix + adapter


def test_mam_count(bert_base):
    length, hidden, m = 30, 800, 512
    prefix = length * D + D * hidden + hidden + hidden * L * 2 * D + L * 2 * D
    adapter = L * (D * m + m + m * D + D)
    assert trainable(bert_base, "mam") == prefix + adapter
    # With the prefix MLP folded away, the paper's "6.7%" of BART-large (its shapes, on the meta device).
    config = T.BartConfig()  # bart-large: d 1024, 12 + 12 layers
    with torch.device("meta"):
        total = sum(p.numel() for p in T.BartModel(config).parameters())
    d, attn, ffn = config.d_model, 3 * 12, 2 * 12  # encoder self, decoder self and cross attention
    assert round(100 * (length * 2 * d * attn + ffn * (2 * d * m + m + d)) / total, 1) == 6.7


def test_dsee_count(bert_base):
    r, n_sparse = 16, 16
    expected = L * 2 * (r * (D + D) + n_sparse)
    assert trainable(bert_base, "dsee", support="random") == expected == 590_208  # "about 590K" (METHODS.md §4)


def test_tarp_count(bert_base):
    r = 8  # U (d x r), V (r x d), gate G (r x d) and c (r) per adapted projection; the paper's are unverified
    assert trainable(bert_base, "tarp") == L * 2 * (3 * D * r + r)


def test_attempt_count(bert_base, tmp_path):
    sources = []
    for seed in (1, 2):
        dt.attach(bert_base, "prompt", length=100, init="random", seed=seed)
        sources.append(str(dt.save_adapter(bert_base, tmp_path / f"source{seed}")))
        dt.detach(bert_base)
    expected = 100 * D + D * 100 + 100 * D  # target prompt, W_down, W_up: "about 230K" (METHODS.md §3)
    assert trainable(bert_base, "attempt", sources=sources) == expected == 230_400
    dt.attach(bert_base, "attempt", sources=sources)
    (mixture,) = [m for m in bert_base.deltatune.modules() if hasattr(m, "temperature")]
    assert mixture.temperature == 2087  # T = d * e in the released configs
    dt.detach(bert_base)


# ---------------------------------------------------------------- behaviour beyond the matrix

def test_dsee_support_finds_the_sparse_part_of_a_low_rank_plus_sparse_weight():
    from deltatune.methods.dsee import support

    g = torch.Generator().manual_seed(0)
    W = torch.randn(128, 12, generator=g) @ torch.randn(12, 96, generator=g) * 0.1  # rank 12 = 96 // 8
    spikes = torch.randperm(W.numel(), generator=g)[:16].sort().values
    W.view(-1)[spikes] += 1.0
    assert support(W, 16, "grebsmo", 0).tolist() == spikes.tolist()
    assert support(W, 16, "magnitude", 0).tolist() != support(W, 16, "random", 0).tolist()


def test_dsee_prune_zeroes_the_smallest_update_entries_and_unmerge_restores():
    from deltatune.methods.dsee import prune

    from . import tiny
    from .test_matrix import _perturb

    model = dt.attach(tiny.model("bert"), "dsee")
    _perturb(model)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "deltatune" not in n}
    q = model.bert.encoder.layer[0].attention.self.query.weight
    zeroed = prune(model, ratio=0.25)
    assert zeroed == int(0.25 * 2 * 2 * 32 * 32)  # q and v of 2 layers, 32 x 32 each
    assert int((q == 0).sum()) > 0 and dt.merged_bytes(model) > 0
    dt.unmerge(model)
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)
    with pytest.raises(dt.ConfigError, match="ratio"):
        prune(model, ratio=1.5)
    dt.attach(model, "lora", adapter="other")
    with pytest.raises(dt.ConfigError, match="not all 'dsee'"):
        prune(model, adapter="other")


def test_attempt_needs_prompt_sources_and_its_saved_adapter_needs_none(tmp_path):
    from . import tiny

    model = tiny.model("bert")
    with pytest.raises(dt.ConfigError, match="attempt needs source prompts.*--set sources="):
        dt.attach(model, "attempt")
    dt.attach(model, "lora")
    lora = dt.save_adapter(model, tmp_path / "lora")
    dt.detach(model)
    with pytest.raises(dt.ConfigError, match="soft prompts saved by the 'prompt' method"):
        dt.attach(model, "attempt", sources=[str(lora)])
    sources = []
    for seed in (1, 2):
        dt.attach(model, "prompt", length=5, init="random", seed=seed)
        sources.append(dt.save_adapter(model, tmp_path / f"s{seed}"))
        dt.detach(model)
    dt.attach(model, "attempt", sources=[str(s) for s in sources])
    batch = tiny.inputs("bert")
    with torch.no_grad():
        want = tiny.outputs(model, batch)
    dt.save_adapter(model, tmp_path / "attempt")
    for s in sources:  # the saved adapter carries the source prompts
        for f in s.iterdir():
            f.unlink()
        s.rmdir()
    fresh = dt.load_adapter(tiny.model("bert"), tmp_path / "attempt")
    with torch.no_grad():
        torch.testing.assert_close(tiny.outputs(fresh, batch), want, atol=1e-5, rtol=1e-5)
    assert "sources" not in str(dt.read_adapter(tmp_path / "attempt")[0]["options"]["sources"])


def test_attempt_mixes_prompts_per_input():
    from . import tiny
    from .test_matrix import options

    model = dt.attach(tiny.model("bert"), "attempt", **options("attempt", "bert"))
    (mixture,) = [m for m in model.deltatune.modules() if hasattr(m, "temperature")]
    batch = tiny.inputs("bert", batch=3)
    embeds = model.bert.embeddings.word_embeddings(batch["input_ids"])
    mixture.temperature = 1.0  # sharpen, so two inputs visibly choose different mixtures
    with torch.no_grad():
        prompts = mixture(embeds, batch["attention_mask"])
        alone = mixture(embeds[2:], batch["attention_mask"][2:])
    assert prompts.shape == (3, 20, 32) and not torch.allclose(prompts[0], prompts[1])
    torch.testing.assert_close(prompts[2:], alone)  # a padded row gets what it gets alone


def test_cli_set_sources_gives_a_list_of_directories():
    from deltatune.cli import parse_sets

    for text, want in (("sources=a/x,b/y", ["a/x", "b/y"]), ("sources=runs/one", ["runs/one"])):
        config = dt.registry.build_method("attempt", parse_sets([text]))
        assert config.sources == want


def test_attempt_takes_a_train_out_dir_as_a_source(tmp_path):
    from . import tiny

    model = tiny.model("bert")
    dt.attach(model, "prompt", length=4, init="random")
    dt.save_adapter(model, tmp_path / "run" / "best")  # what `deltatune train --out run` leaves
    dt.detach(model)
    dt.attach(model, "attempt", sources=[str(tmp_path / "run")])
    (mixture,) = [m for m in model.deltatune.modules() if hasattr(m, "temperature")]
    assert tuple(mixture.sources.shape) == (1, 4, 32)
