"""P-tuning, LLaMA-Adapter and trainable tokens against peft 0.21 (the oracle), and LoReFT against its equation.

Every peft comparison gives both libraries the same random non-zero weights and compares their outputs at the real
positions: max |difference| <= 1e-5 x max |output| (tests/test_interop.py's rule); the PEFT format converts both
ways (deltatune -> PeftModel.from_pretrained, get_peft_model(...).save_pretrained -> dt.load_adapter). Where peft
computes another function the conversion is refused, and a test shows the difference is real.

LoReFT has no peft type; pyreft 0.1.0, its reference, pins transformers 4.45.1 and cannot be installed beside this
transformers, so eq. 2 of Wu et al. 2024 is written out here by hand, position by position.
"""
from __future__ import annotations

import json

import peft
import pytest
import torch

import deltatune as dt
from deltatune.errors import AdapterFileError, ConfigError
from deltatune.sites import resolve
from tests import tiny
from tests.test_interop import TASK, assert_same, batch, make, perturb, real_outputs

pytestmark = pytest.mark.filterwarnings("ignore")

PEFT_CONFIGS = {
    "ptuning": lambda task, n, **kw: peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=n, **kw),
    "llama-adapter": lambda task, n, **kw: peft.AdaptionPromptConfig(task_type=task, adapter_len=n, **kw),
    "trainable-tokens": lambda task, n, **kw: peft.TrainableTokensConfig(task_type=task, **kw),
}
TOKENS = [5, 9, 20, 40]


def prompt_length(theirs) -> int:
    """The positions peft puts before the real tokens (prompt learning returns them first)."""
    config = theirs.peft_config["default"]
    return config.num_virtual_tokens if config.is_prompt_learning else 0


# ---------------------------------------------------------------- deltatune -> peft -> deltatune

EXPORTS = [
    *[(f, "ptuning", {"length": 3}) for f in ("gpt2", "llama", "bert-base")],
    ("llama", "ptuning", {"length": 2, "encoder": "mlp", "hidden": 8}),
    ("llama", "llama-adapter", {"length": 4}),
    ("llama", "llama-adapter", {"length": 3, "layers": [1]}),  # peft's adapter_layers=1: the top layer
    *[(f, "trainable-tokens", {"tokens": TOKENS}) for f in ("bert", "bert-base", "gpt2", "llama", "t5", "bart")],
]


@pytest.mark.parametrize("family,method,options", EXPORTS, ids=[f"{f}-{m}-{i}" for i, (f, m, _) in enumerate(EXPORTS)])
def test_deltatune_adapter_runs_in_peft_and_back(tmp_path, family, method, options):
    model = dt.attach(make(family), method, **options)
    perturb(model)
    model.eval()
    dt.save_adapter(model, tmp_path, format="peft")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == type(model.deltatune.records["default"].method).peft_type
    theirs = peft.PeftModel.from_pretrained(make(family), str(tmp_path)).eval()
    b = batch(family)
    assert_same(real_outputs(theirs, b, prompt=prompt_length(theirs)), real_outputs(model, b))
    again = dt.load_adapter(make(family), tmp_path).eval()
    assert_same(real_outputs(again, b), real_outputs(model, b))


IMPORTS = [
    *[(f, "ptuning", 3, dict(encoder_hidden_size=8)) for f in ("gpt2", "llama", "bert-base")],
    ("llama", "ptuning", 2, dict(encoder_reparameterization_type="LSTM", encoder_hidden_size=6)),
    ("llama", "llama-adapter", 4, dict(adapter_layers=2)),
    ("llama", "llama-adapter", 2, dict(adapter_layers=1)),
    *[(f, "trainable-tokens", 0, dict(token_indices=TOKENS))
      for f in ("bert", "bert-base", "gpt2", "llama", "t5", "bart")],
]


def peft_adapter(tmp_path, family, method, n, options):
    """A peft model with random non-zero adapter weights, saved by peft itself."""
    torch.manual_seed(3)
    model = peft.get_peft_model(make(family), PEFT_CONFIGS[method](TASK[family], n, **options))
    perturb(model)
    model.eval()
    model.save_pretrained(str(tmp_path))
    return model


@pytest.mark.parametrize("family,method,n,options", IMPORTS,
                         ids=[f"{f}-{m}-{i}" for i, (f, m, _, _) in enumerate(IMPORTS)])
def test_peft_adapter_runs_in_deltatune(tmp_path, family, method, n, options):
    theirs = peft_adapter(tmp_path, family, method, n, options)
    ours = dt.load_adapter(make(family), tmp_path).eval()
    assert dt.adapters(ours) == ["default"]
    b = batch(family)
    assert_same(real_outputs(ours, b), real_outputs(theirs, b, prompt=prompt_length(theirs)))


def test_imported_options(tmp_path):
    """What a peft file becomes: the folded P-tuning prompt, the top layers of an adaption prompt, the token ids."""
    from deltatune.formats import peft as dtpeft

    root = tmp_path
    peft_adapter(root / "p", "llama", "ptuning", 3, dict(encoder_hidden_size=8))
    peft_adapter(root / "a", "llama", "llama-adapter", 4, dict(adapter_layers=1))
    peft_adapter(root / "t", "gpt2", "trainable-tokens", 0, dict(token_indices=TOKENS))
    options = {k: dtpeft.to_deltatune(tiny.model(f), root / k)[0]["options"]
               for k, f in (("p", "llama"), ("a", "llama"), ("t", "gpt2"))}
    assert options["p"] == {"length": 3, "encoder": "none", "hidden": 0, "dropout": 0.0}
    assert options["a"] == {"length": 4, "layers": [1]}
    assert options["t"] == {"tokens": TOKENS}


def test_llama_adapter_generates_as_peft_does():
    """Greedy generation with the key/value cache: the adaption prompt also serves every new token's query."""
    model = dt.attach(tiny.model("llama"), "llama-adapter", length=4)
    perturb(model, std=1.0)
    model.eval()
    theirs = peft.get_peft_model(tiny.model("llama"), peft.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=4,
                                                                                  adapter_layers=2)).eval()
    tensors, _ = dt.formats.native.adapter_tensors(model)
    with torch.no_grad():
        for i in range(2):
            attention = theirs.base_model.model.model.layers[i].self_attn
            attention.adaption_prompt.copy_(tensors[f"delta.model:layers:{i}:self_attn.prompt"][None])
            attention.adaption_gate.copy_(tensors[f"delta.model:layers:{i}:self_attn.gate"])
    b = tiny.inputs("llama", pad="left")
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    ours, peft_out = model.generate(**b, **kw), theirs.generate(**b, **kw)
    assert torch.equal(ours.sequences, peft_out.sequences)
    for mine, their in zip(ours.scores, peft_out.scores):  # the logits of every generated step
        assert_same(mine, their)
    base = tiny.model("llama").generate(**b, **kw)
    assert (ours.scores[-1] - base.scores[-1]).abs().max() > 1e-2  # the adapter does act on the cached steps


# ---------------------------------------------------------------- refused, and why

@pytest.mark.parametrize("family,method,options,reason", [
    ("gpt2", "llama-adapter", {}, "after the output projection c_proj"),
    ("bert", "llama-adapter", {}, "supports llama, mistral"),
    ("llama", "llama-adapter", {"layers": [0]}, "topmost adapter_layers"),
    ("t5", "ptuning", {}, "decoder cross-attends to the real tokens only"),
    ("bert", "ptuning", {}, "sequence classifier"),
    ("bert", "loreft", {}, "method 'loreft' has no PEFT counterpart"),
])
def test_export_refused_where_outputs_would_differ(tmp_path, family, method, options, reason):
    model = dt.attach(tiny.model(family), method, **options)
    with pytest.raises(ConfigError, match=reason):
        dt.save_adapter(model, tmp_path, format="peft")
    assert not any(tmp_path.iterdir())


def test_llama_adapter_gpt2_refusal_reason_is_the_output_projection():
    """peft's GPT-2 adaption prompt skips c_proj: with the same prompts and gates the outputs differ by a sizeable
    share of their scale, and agree once every c_proj is the identity (so where the sum enters is the only change)."""
    def pair(identity: bool):
        ours = dt.attach(tiny.model("gpt2"), "llama-adapter", length=4)
        perturb(ours)
        ours.eval()
        theirs = peft.get_peft_model(tiny.model("gpt2"), peft.AdaptionPromptConfig(
            task_type="CAUSAL_LM", adapter_len=4, adapter_layers=2)).eval()
        tensors, _ = dt.formats.native.adapter_tensors(ours)
        with torch.no_grad():
            for i in range(2):
                attention = theirs.base_model.model.transformer.h[i].attn
                attention.adaption_prompt.copy_(tensors[f"delta.transformer:h:{i}:attn.prompt"][None])
                attention.adaption_gate.copy_(tensors[f"delta.transformer:h:{i}:attn.gate"])
                if identity:
                    for m in (ours.transformer.h[i].attn.c_proj, attention.model.c_proj):
                        m.weight.copy_(torch.eye(32))
                        m.bias.zero_()
        b = tiny.inputs("gpt2")
        return real_outputs(ours, b), real_outputs(theirs, b)

    ours, theirs = pair(identity=False)
    assert (ours - theirs).abs().max() > 0.1 * theirs.abs().max()  # measured: 0.27 to 0.54 of the scale
    assert_same(*pair(identity=True))


@pytest.mark.parametrize("method", ["llama-adapter", "loreft"])
@pytest.mark.parametrize("family", ["t5", "bart", "vit"])
def test_unsupported_families_are_refused_clearly(method, family):
    model = tiny.model(family)
    with pytest.raises(ConfigError, match=f"method '{method}' does not support {family} models; it supports: bert"):
        dt.attach(model, method)
    assert not hasattr(model, "deltatune")


def test_peft_files_deltatune_cannot_hold_are_refused(tmp_path):
    """Rows of another embedding than the input one, and tied copies that disagree."""
    torch.manual_seed(0)
    other = peft.get_peft_model(tiny.model("bert"), peft.TrainableTokensConfig(
        task_type="SEQ_CLS", token_indices=[1, 2], target_modules=["position_embeddings"]))
    other.save_pretrained(str(tmp_path / "position"))
    peft_adapter(tmp_path / "tied", "gpt2", "trainable-tokens", 0, dict(token_indices=TOKENS))
    from safetensors.torch import load_file, save_file

    file = tmp_path / "tied" / "adapter_model.safetensors"
    tensors = load_file(str(file))
    tensors["base_model.model.lm_head.trainable_tokens_delta"] += 1.0
    save_file(tensors, str(file))
    for folder, family, reason in (("position", "bert", "not this model's input embedding"),
                                   ("tied", "gpt2", "differ")):
        model = tiny.model(family)
        with pytest.raises(AdapterFileError, match=reason):
            dt.load_adapter(model, tmp_path / folder)
        assert dt.adapters(model) == []


@pytest.mark.parametrize("tokens,reason", [([], "needs the token ids"), ([5, 5], "repeat"), ([97], "0..96"),
                                           (["cat"], "must be ids")])
def test_trainable_tokens_options_are_checked(tokens, reason):
    model = tiny.model("gpt2")
    with pytest.raises(ConfigError, match=reason):
        dt.attach(model, "trainable-tokens", tokens=tokens)
    assert not hasattr(model, "deltatune")


def test_trainable_tokens_merge_writes_the_rows_and_unmerge_restores_them():
    model = dt.attach(tiny.model("gpt2"), "trainable-tokens", tokens=TOKENS)
    perturb(model)
    rows = next(p for n, p in model.named_parameters() if n.endswith("shared~tokens.rows")).detach().clone()
    weight = model.transformer.wte.weight
    before = weight.detach().clone()
    b = tiny.inputs("gpt2")
    with torch.no_grad():
        unmerged = tiny.outputs(model, b)
        dt.merge(model)
        assert torch.equal(weight[TOKENS], rows) and torch.equal(model.lm_head.weight[TOKENS], rows)  # tied: one matrix
        others = [i for i in range(tiny.VOCAB) if i not in TOKENS]
        assert torch.equal(weight[others], before[others])
        torch.testing.assert_close(tiny.outputs(model, b), unmerged, atol=1e-5, rtol=1e-5)
        dt.unmerge(model)
    assert torch.equal(weight, before)


# ---------------------------------------------------------------- per-row routing

ROUTED = [("ptuning", "llama", {"length": 3}), ("ptuning", "bert", {"length": 2, "encoder": "mlp"}),
          ("llama-adapter", "llama", {"length": 3}), ("llama-adapter", "gpt2", {"length": 3}),
          ("llama-adapter", "bert", {"length": 3}), ("trainable-tokens", "gpt2", {"tokens": TOKENS}),
          ("trainable-tokens", "bart", {"tokens": TOKENS}), ("loreft", "llama", {"r": 2, "first": 2, "last": 1}),
          ("loreft", "bert", {"r": 2, "tied": False})]


@pytest.mark.parametrize("method,family,options", ROUTED, ids=[f"{m}-{f}" for m, f, _ in ROUTED])
def test_routing_each_row_as_if_alone(method, family, options):
    """dt.routing with [a, b, None] gives each row what it gets alone with its adapter (or with none)."""
    if method == "trainable-tokens":  # ids that the batch holds, so that every row's tokens are changed
        options = {"tokens": sorted(set(tiny.inputs(family, batch=3)["input_ids"].flatten().tolist()) - {0})[:6]}
    model = tiny.model(family)
    dt.attach(model, method, adapter="a", **options)
    dt.attach(model, method, adapter="b", **options)
    dt.set_active(model, "a", "b")
    perturb(model, seed=11)  # both adapters away from their init, differently
    model.eval()
    b = tiny.inputs(family, batch=3)
    names = ["a", "b", None]
    with torch.no_grad():
        with dt.routing(model, names):
            routed = model(**b).logits
        for i, name in enumerate(names):
            row = {k: v[i:i + 1] for k, v in b.items()}
            n = int(row["attention_mask"].sum()) if family in ("llama", "gpt2") else None
            if name is None:
                with dt.use(model):
                    alone = model(**row).logits
            else:
                with dt.use(model, name):
                    alone = model(**row).logits
            got = routed[i:i + 1]
            if n is not None:  # causal models: compare the real positions (right padding in the last row)
                got, alone = got[:, :n], alone[:, :n]
            torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5)
        with dt.use(model, "a"):
            base_like = model(**b).logits
    assert not torch.allclose(routed[1], base_like[1], atol=1e-4)  # b and a differ on row 1: routing did route


# ---------------------------------------------------------------- LoReFT: eq. 2 by hand

def positions(mask: torch.Tensor, first: int, last: int) -> list[tuple[list[int], list[int]]]:
    """Per row: (first positions, last positions) among its real tokens, each side at most half of them (pyreft's
    get_intervention_locations), written as loops."""
    out = []
    for row in mask.tolist():
        real = [i for i, m in enumerate(row) if m]
        n = len(real)
        f, l = min(n // 2, first), min(n // 2, last)
        out.append((real[:f], real[n - l:] if l else []))
    return out


def loreft_reference(base, tensors, b, r, first, last, tied, prompt_mask=None):
    """``base`` run with forward hooks that apply h + R^T (W h + b - R h) at each block's chosen positions, one
    position at a time, with the (R, W, b) of ``tensors`` (a saved adapter: R with orthonormal rows)."""
    mask = b["attention_mask"] if prompt_mask is None else prompt_mask
    chosen = positions(mask, first, last)
    handles = []
    for t in resolve(base, "block"):
        key = t.name.replace(".", ":")
        sides = {"both": key} if tied or not (first and last) else {"first": key + "~first", "last": key + "~last"}
        if any(f"delta.{k}.R" not in tensors for k in sides.values()):
            continue  # a block the adapter leaves alone (layers=...)
        params = {side: [tensors[f"delta.{k}.{p}"].double() for p in ("R", "W", "b")] for side, k in sides.items()}

        def hook(module, args, out, params=params):
            h = out[0] if isinstance(out, tuple) else out
            edited = h.detach().double().clone()
            for row, (f, l) in enumerate(chosen):
                for side, where in (("first", f), ("last", l)):
                    R, W, bias = params.get(side) or params["both"]
                    for pos in where:
                        if pos >= h.shape[1]:
                            continue
                        v = edited[row, pos]
                        edited[row, pos] = v + R.t() @ (W @ v + bias - R @ v)
            edited = edited.to(h.dtype)
            return (edited, *out[1:]) if isinstance(out, tuple) else edited

        handles.append(t.module.register_forward_hook(hook))
    return handles


LOREFT = [("bert", {}, "right"), ("gpt2", {}, "right"), ("llama", {}, "left"), ("llama", {"r": 3, "first": 1,
          "last": 2, "tied": False}, "right"), ("bert", {"r": 1, "first": 1, "last": 0}, "left"),
          ("gpt2", {"r": 4, "first": 0, "last": 3, "tied": False}, "left"), ("llama", {"layers": [1]}, "right")]


@pytest.mark.parametrize("family,options,pad", LOREFT, ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(LOREFT)])
def test_loreft_is_equation_2_at_the_chosen_positions(family, options, pad):
    model = dt.attach(tiny.model(family), "loreft", **options)
    perturb(model, std=0.3)
    model.eval()
    cfg = model.deltatune.records["default"].method
    tensors, _ = dt.formats.native.adapter_tensors(model)
    for key in [k for k in tensors if k.endswith(".R")]:  # R as used: orthonormal rows
        R = tensors[key].double()
        torch.testing.assert_close(R @ R.t(), torch.eye(R.shape[0], dtype=torch.float64), atol=1e-6, rtol=0)
    b = tiny.inputs(family, batch=3, length=9, pad=pad)
    b["attention_mask"][0, :] = 1
    b["attention_mask"][1, (0 if pad == "left" else 6):(3 if pad == "left" else 9)] = 0  # a row with 6 tokens
    base = tiny.model(family)
    base.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("deltatune.")})  # the head
    handles = loreft_reference(base, tensors, b, cfg.r, cfg.first, cfg.last, cfg.tied)
    assert len(handles) == (len(cfg.layers) if cfg.layers else 2)
    try:
        want = real_outputs(base, b)
    finally:
        for h in handles:
            h.remove()
    got = real_outputs(model, b)
    assert_same(got, want)
    with dt.use(model):
        assert (got - real_outputs(model, b)).abs().max() > 1e-3  # the edit does change the outputs


def test_loreft_positions_follow_pyreft():
    from deltatune.deltas import LowRankIntervention

    mask = torch.tensor([[1] * 9, [0, 0, 0, 1, 1, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0, 0, 0, 0],
                         [1, 1, 1, 0, 0, 0, 0, 0, 0]])
    for first, last in ((7, 7), (1, 0), (0, 2), (2, 3)):
        for part in ("both", "first", "last"):
            edit = LowRankIntervention(8, 2, first, last, part)
            got = edit.chosen(mask, mask.shape)
            for row, (f, l) in enumerate(positions(mask, first, last)):
                want = {"both": f + l, "first": f, "last": l}[part]
                assert got[row].nonzero().flatten().tolist() == sorted(want)
    # 5 tokens: at most 2 per side (n // 2), as pyreft; one token: none
    edit = LowRankIntervention(8, 2, 7, 7)
    assert edit.chosen(torch.tensor([[1, 1, 1, 1, 1]]), (1, 5))[0].tolist() == [True, True, False, True, True]
    assert not edit.chosen(torch.tensor([[0, 1, 0]]), (1, 3)).any()


def test_loreft_continuation_edits_only_the_prompt():
    """With a key/value cache, the new tokens are not edited (the chosen positions are the prompt's): the cached
    step's logits equal one full pass in which only the prompt's chosen positions are edited."""
    model = dt.attach(tiny.model("llama"), "loreft", r=2, first=2, last=2)
    perturb(model)
    model.eval()
    b = tiny.inputs("llama", batch=2, length=7, pad="left")
    with torch.no_grad():
        out = model(**b, use_cache=True)
        step = torch.tensor([[11], [12]])
        mask = torch.cat([b["attention_mask"], torch.ones(2, 1, dtype=torch.long)], dim=1)
        cached = model(input_ids=step, attention_mask=mask, past_key_values=out.past_key_values).logits[:, -1]
    tensors, _ = dt.formats.native.adapter_tensors(model)
    base = tiny.model("llama")
    full = {"input_ids": torch.cat([b["input_ids"], step], dim=1), "attention_mask": mask}
    handles = loreft_reference(base, tensors, full, 2, 2, 2, True, prompt_mask=torch.cat(
        [b["attention_mask"], torch.zeros(2, 1, dtype=torch.long)], dim=1))
    try:
        with torch.no_grad():
            want = base(**full).logits[:, -1]
    finally:
        for h in handles:
            h.remove()
    assert_same(cached, want)
    assert model.generate(**b, max_new_tokens=3, do_sample=False, pad_token_id=0).shape == (2, 10)


def test_loreft_r_stays_orthonormal_through_training_and_saving(tmp_path):
    """R moves off the orthonormal set under a plain optimizer; what runs and what is saved is its orthonormal
    form, and a saved adapter loads to the same outputs."""
    model = dt.attach(tiny.model("bert"), "loreft", r=4)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    b = tiny.inputs("bert", batch=4)
    for _ in range(5):
        tiny.loss(model, b).backward()
        opt.step()
        opt.zero_grad()
    raw = next(p for n, p in model.named_parameters() if n.endswith(".R")).detach()
    assert not torch.allclose(raw @ raw.t(), torch.eye(4), atol=1e-3)  # the free matrix left the set
    model.eval()
    dt.save_adapter(model, tmp_path)
    fresh = dt.load_adapter(tiny.model("bert"), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(tiny.outputs(fresh, b), tiny.outputs(model, b), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- the real MiniLM

def _minilm():
    from deltatune.models import load_backbone

    return load_backbone("minilm", "base")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ptuning", "trainable-tokens"])
def test_minilm_both_ways(tmp_path, method):
    from tests.test_interop import minilm_batch

    _, tokenizer = _minilm()
    b, _ = minilm_batch(tokenizer)
    ids = sorted(set(b["input_ids"].flatten().tolist()) - set(tokenizer.all_special_ids))[:6]  # rows the batch reads
    options, n, peft_options = {
        "ptuning": ({"length": 5}, 5, dict(encoder_hidden_size=64)),
        "trainable-tokens": ({"tokens": ids}, 0, dict(token_indices=ids))}[method]
    model = dt.attach(_minilm()[0].eval(), method, **options)
    perturb(model, std=0.05)
    model.eval()
    dt.save_adapter(model, tmp_path / "out", format="peft")
    theirs = peft.PeftModel.from_pretrained(_minilm()[0].eval(), str(tmp_path / "out")).eval()
    assert_same(real_outputs(theirs, b, prompt=n), real_outputs(model, b))
    torch.manual_seed(3)
    theirs = peft.get_peft_model(_minilm()[0].eval(), PEFT_CONFIGS[method]("FEATURE_EXTRACTION", n, **peft_options))
    perturb(theirs, std=0.05)
    theirs.eval().save_pretrained(str(tmp_path / "in"))
    ours = dt.load_adapter(_minilm()[0].eval(), tmp_path / "in").eval()
    assert_same(real_outputs(ours, b), real_outputs(theirs, b, prompt=n))


@pytest.mark.slow
def test_minilm_loreft_is_equation_2():
    from tests.test_interop import minilm_batch

    base, tokenizer = _minilm()
    b, _ = minilm_batch(tokenizer)
    model = dt.attach(_minilm()[0].eval(), "loreft")
    perturb(model, std=0.05)
    model.eval()
    tensors, _ = dt.formats.native.adapter_tensors(model)
    handles = loreft_reference(base.eval(), tensors, b, 8, 7, 7, True)
    try:
        want = real_outputs(base, b)
    finally:
        for h in handles:
            h.remove()
    assert_same(real_outputs(model, b), want)
