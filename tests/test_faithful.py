"""Methods against hand-written references of their papers' (or reference code's) computation."""
from __future__ import annotations

import warnings

import torch
from torch.nn import functional as F

import deltatune as dt
from deltatune.methods.prompt import word_ids

from . import tiny
from .test_matrix import _perturb


def test_pfeiffer_is_adapterhub_seq_bn_on_bert():
    """LN(s + up(relu(down(LN(s))))) with s = FFN output + residual, the block's own LayerNorm twice."""
    model = dt.attach(tiny.model("bert"), "pfeiffer")
    _perturb(model, scale=0.2)
    ref = tiny.model("bert")  # same weights, no hooks: the computation written out by hand
    adapters = model.deltatune.adapters["default"]
    for i, layer in enumerate(ref.bert.encoder.layer):
        out = layer.output
        ad = adapters[f"bert:encoder:layer:{i}:output:LayerNorm"]

        def forward(hidden_states, input_tensor, out=out, ad=ad):
            s = out.dropout(out.dense(hidden_states)) + input_tensor
            n = out.LayerNorm(s)
            h = F.linear(F.relu(F.linear(n, ad.down.weight, ad.down.bias)), ad.up.weight, ad.up.bias)
            return out.LayerNorm(s + h)
        out.forward = forward
    ref.classifier.load_state_dict(model.classifier.state_dict())
    batch = tiny.inputs("bert")
    with torch.no_grad():
        torch.testing.assert_close(tiny.outputs(model, batch), tiny.outputs(ref, batch), atol=1e-5, rtol=1e-5)


def test_pfeiffer_on_a_pre_ln_model_adds_to_the_block_output():
    model = dt.attach(tiny.model("gpt2"), "pfeiffer")
    keys = list(model.deltatune.adapters["default"].keys())
    assert keys == ["transformer:h:0", "transformer:h:1"]


def test_prompt_keeps_the_pooler_on_cls():
    model = dt.attach(tiny.model("bert"), "prompt", init="random", length=4)
    batch = tiny.inputs("bert")
    with torch.no_grad():
        out = model.bert(**batch)
        torch.testing.assert_close(out.pooler_output, model.bert.pooler(out.last_hidden_state), atol=0, rtol=0)
        assert out.last_hidden_state.shape[1] == batch["input_ids"].shape[1]


def test_prompt_vocab_init_draws_real_words():
    from deltatune.models import load_backbone

    model, tok = load_backbone("minilm")  # the real pretrained model and its WordPiece vocabulary
    ids = word_ids(model, model.get_input_embeddings().num_embeddings)[:5000]
    tokens = tok.convert_ids_to_tokens(ids)
    assert len(ids) == 5000 and tokens[:3] == ["the", "of", "and"]
    assert not any(t.startswith(("[", "##")) or len(t) < 2 for t in tokens)


def test_prompt_vocab_init_without_a_tokenizer_warns():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        dt.attach(tiny.model("bert"), "prompt")
    assert any("no tokenizer" in str(w.message) for w in seen)


def test_deviations_are_stated():
    for name in ("telly", "houlsby", "pfeiffer"):
        assert dt.method_info(name)["deviations"], name
    assert dt.method_info("houlsby")["options"]["activation"] == "gelu"
