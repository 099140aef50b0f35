"""LoRA's relatives from LyCORIS and the orthogonal family (LoHa, LoKr, OFT, BOFT, HRA, FourierFT) against
peft 0.21.2, their reference implementation, and the parts of their math that peft does not check.

The oracle: with the same random non-zero weights, deltatune's model and peft's model give the same outputs
(max |difference| <= 1e-5 x max |output|, at the real token positions), both ways through the PEFT format:
an adapter peft saved loads in deltatune, and one deltatune saved loads with PeftModel.from_pretrained.
On tiny BERT (a bare encoder, every hidden state compared, and a classifier, its head saved beside) and Llama;
on GPT-2 only FourierFT, the one of the six that peft runs on GPT-2's Conv1D (the others' refusal is checked
against peft's own). Each case also checks that the adapter moves the outputs (by over 1e-3 of their scale, a hundred
times the tolerance: rotations of a tiny random BERT's attention inputs move its outputs by ~1%), so that
agreement is not the base model agreeing with itself. The slow test repeats it on MiniLM.
"""
from __future__ import annotations

import json

import peft
import pytest
import torch
from peft.tuners.boft import layer as peft_boft

import deltatune as dt
from deltatune.errors import AdapterFileError, ConfigError
from deltatune.methods.boft import butterfly_permutation
from deltatune.methods.lokr import factorization
from deltatune.registry import REGISTRY

from . import tiny
from .test_interop import TASK, assert_same, batch, fresh_minilm, make, minilm, minilm_batch, perturb, real_outputs  # noqa: F401

pytestmark = pytest.mark.filterwarnings("ignore")

CONFIGS = {"loha": peft.LoHaConfig, "lokr": peft.LoKrConfig, "oft": peft.OFTConfig, "boft": peft.BOFTConfig,
           "hra": peft.HRAConfig, "fourierft": peft.FourierFTConfig}
QV = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"], "minilm": ["query", "value"]}
FFN = {"bert": ["query", "value", "dense"], "llama": ["q_proj", "v_proj", "down_proj"]}
QV["bert-base"], FFN["bert-base"] = QV["bert"], FFN["bert"]


class BlockDiagStandIn:
    """What peft's fbd_cuda extension computes (a batch of blocks -> block-diagonal matrices), in torch: with it,
    peft's BOFT runs more than one butterfly factor on a CPU, through its own permutations and products."""

    @staticmethod
    def forward(blocks):  # (N, D, H, H) -> [(N, D H, D H)]
        return [torch.stack([torch.block_diag(*b) for b in blocks])]

    @staticmethod
    def backward(grad, blocks):
        N, D, H, _ = blocks.shape
        return [torch.stack([torch.stack([grad[n, d * H:(d + 1) * H, d * H:(d + 1) * H] for d in range(D)])
                             for n in range(N)])]


@pytest.fixture
def butterflies(monkeypatch):
    monkeypatch.setattr(peft_boft, "_FBD_CUDA", BlockDiagStandIn())


def peft_model(family, method, options, seed=3, std=0.3):
    """peft's model with random non-zero adapter weights."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(make(family), CONFIGS[method](task_type=TASK[family], **options))
    perturb(model, std=std)
    return model.eval()


def assert_moved(adapted, base):
    scale = adapted.abs().max().item()
    assert (adapted - base).abs().max().item() > 1e-3 * scale, "the adapter barely changes the outputs"


# ---------------------------------------------------------------- peft -> deltatune

IMPORTS = [
    ("bert-base", "loha", dict(r=4, alpha=8, target_modules=QV["bert"])),
    ("bert", "loha", dict(r=2, alpha=8, target_modules=QV["bert"])),  # a classifier: peft saves its head
    ("llama", "loha", dict(r=3, alpha=5, target_modules=FFN["llama"])),
    ("bert-base", "lokr", dict(r=4, alpha=8, target_modules=FFN["bert"])),  # 32 = 4 x 8, 64 = 8 x 8; W2 full
    ("llama", "lokr", dict(r=1, alpha=2, decompose_both=True, target_modules=QV["llama"])),  # both factors low-rank
    ("llama", "lokr", dict(r=2, alpha=2, decompose_factor=2, init_weights="lycoris", target_modules=FFN["llama"])),
    ("bert-base", "oft", dict(oft_block_size=8, target_modules=QV["bert"])),  # Cayley–Neumann, 5 terms
    ("llama", "oft", dict(oft_block_size=16, use_cayley_neumann=False, target_modules=FFN["llama"])),  # exact Cayley
    ("bert-base", "oft", dict(oft_block_size=4, block_share=True, num_cayley_neumann_terms=3,
                              target_modules=QV["bert"])),
    ("llama", "oft", dict(oft_block_size=8, coft=True, eps=0.5, target_modules=QV["llama"])),  # projected in forward
    ("bert-base", "boft", dict(boft_block_size=4, target_modules=FFN["bert"])),  # peft's CPU fallback: one factor
    ("llama", "hra", dict(r=4, target_modules=QV["llama"])),
    ("bert-base", "hra", dict(r=3, target_modules=FFN["bert"])),  # odd r: every vector drawn apart
    ("bert-base", "hra", dict(r=4, apply_GS=True, init_weights=False, target_modules=QV["bert"])),
    ("bert-base", "fourierft", dict(n_frequency=50, scaling=10.0, target_modules=FFN["bert"])),
    ("llama", "fourierft", dict(n_frequency=80, scaling=20.0, random_loc_seed=5, target_modules=QV["llama"])),
    ("gpt2", "fourierft", dict(n_frequency=60, scaling=10.0, target_modules=["c_attn", "mlp.c_proj"])),
]


@pytest.mark.parametrize("family,method,options", IMPORTS, ids=[f"{f}-{m}-{i}" for i, (f, m, _) in enumerate(IMPORTS)])
def test_peft_adapter_runs_in_deltatune(tmp_path, family, method, options):
    theirs = peft_model(family, method, options)
    theirs.save_pretrained(str(tmp_path))
    ours = dt.load_adapter(make(family), tmp_path).eval()
    b = batch(family)
    adapted = real_outputs(ours, b)
    assert_same(adapted, real_outputs(theirs, b))
    with dt.use(ours):  # no adapter active (a classifier keeps the loaded head)
        assert_moved(adapted, real_outputs(ours, b))
    assert dt.adapters(ours) == ["default"]


def test_boft_butterflies_run_as_in_peft_with_its_extension(tmp_path, butterflies):
    """m = 2 and 3 butterfly factors through peft's own permutation matrices (the extension's block-diagonal
    done in torch), on inputs of 32 and 64 features."""
    for m, size in ((2, 8), (3, 4)):
        theirs = peft_model("bert", "boft", dict(boft_block_size=size, boft_n_butterfly_factor=m,
                                                  target_modules=FFN["bert"]))
        assert theirs.base_model.model.bert.encoder.layer[0].output.dense.boft_R["default"].shape[0] == m
        theirs.save_pretrained(str(tmp_path / str(m)))
        ours = dt.load_adapter(tiny.model("bert"), tmp_path / str(m)).eval()
        b = tiny.inputs("bert")
        assert_same(real_outputs(ours, b), real_outputs(theirs, b))


def test_peft_boft_without_its_extension_runs_one_factor_whatever_the_config_says(tmp_path):
    """What docs/interop.md says: peft's CPU fallback builds one butterfly factor for boft_n_butterfly_factor=2,
    so a two-factor adapter (deltatune's default) fails to load there, loudly, rather than run another function."""
    assert peft_boft.get_fbd_cuda() is None  # no CUDA extension on this machine
    model = peft.get_peft_model(tiny.model("bert"), peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2,
                                                                   target_modules=["query"]))
    assert model.base_model.model.bert.encoder.layer[0].attention.self.query.boft_R["default"].shape[0] == 1
    dt.save_adapter(dt.attach(make("bert-base"), "boft"), tmp_path, format="peft")  # m = 2
    with pytest.raises(RuntimeError, match="size mismatch for .*boft_R"):
        peft.PeftModel.from_pretrained(make("bert-base"), str(tmp_path))


# ---------------------------------------------------------------- deltatune -> peft

EXPORTS = [
    ("bert-base", "loha", dict(r=4, alpha=6.0)),
    ("bert", "loha", dict(r=2)),  # a classifier: its head becomes modules_to_save
    ("llama", "loha", dict(sites=["attn.q", "attn.v", "ffn.out"])),
    ("bert-base", "lokr", dict(r=2, sites=["attn.q", "ffn.in", "ffn.out"])),
    ("llama", "lokr", dict(r=1, decompose_both=True, init="lycoris", alpha=3.0)),
    ("bert-base", "oft", dict(block_size=8)),
    ("llama", "oft", dict(block_size=16, use_cayley_neumann=False, sites=["attn.q", "attn.v", "ffn.out"])),
    ("bert-base", "oft", dict(block_size=4, block_share=True, coft=True, eps=0.5)),
    ("bert-base", "boft", dict(block_size=4, n_butterfly_factor=1, sites=["attn.q", "ffn.out"])),
    ("llama", "hra", dict(r=4)),
    ("bert-base", "hra", dict(r=2, apply_gs=True, sites=["attn.q", "ffn.in"])),
    ("bert-base", "fourierft", dict(n_frequency=40, scaling=10.0)),
    ("llama", "fourierft", dict(n_frequency=90, scaling=3.0, random_loc_seed=11, sites=["attn.v", "ffn.in"])),
    ("gpt2", "fourierft", dict(n_frequency=60, scaling=10.0,
                               sites=[r"re:h\.(?P<layer>\d+)\.attn\.c_attn", "attn.o", "ffn.in"])),
]


def export_and_compare(tmp_path, family, method, options):
    model = dt.attach(make(family), method, **options)
    perturb(model)
    model.eval()
    dt.save_adapter(model, tmp_path, format="peft")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == REGISTRY[method].peft_type
    theirs = peft.PeftModel.from_pretrained(make(family), str(tmp_path)).eval()
    b = batch(family)
    adapted = real_outputs(model, b)
    assert_same(real_outputs(theirs, b), adapted)
    with dt.use(model):
        assert_moved(adapted, real_outputs(model, b))
    again = dt.load_adapter(make(family), tmp_path).eval()  # and back
    assert_same(real_outputs(again, b), adapted)
    return config


@pytest.mark.parametrize("family,method,options", EXPORTS, ids=[f"{f}-{m}-{i}" for i, (f, m, _) in enumerate(EXPORTS)])
def test_deltatune_adapter_runs_in_peft(tmp_path, family, method, options):
    export_and_compare(tmp_path, family, method, options)


def test_boft_butterflies_load_in_peft_with_its_extension(tmp_path, butterflies):
    config = export_and_compare(tmp_path, "llama", "boft", dict(sites=["attn.q", "attn.v", "ffn.out"]))  # m = 2, b = 8
    assert (config["boft_n_butterfly_factor"], config["boft_block_size"]) == (2, 8)


@pytest.mark.parametrize("method", ["loha", "lokr", "oft", "boft", "hra"])
def test_gpt2_conv1d_is_refused_as_peft_refuses_it(tmp_path, method):
    """peft's LoHa, LoKr, OFT, BOFT and HRA adapt torch's Linear (and convolutions), not GPT-2's Conv1D: the
    export says so instead of writing a file peft cannot load. deltatune itself runs them on GPT-2."""
    with pytest.raises((TypeError, ValueError)):
        peft.get_peft_model(tiny.model("gpt2"), CONFIGS[method](target_modules=["c_proj"]))
    model = dt.attach(tiny.model("gpt2"), method, sites=["attn.o"])
    with pytest.raises(ConfigError, match="Conv1D"):
        dt.save_adapter(model, tmp_path, format="peft")
    assert not (tmp_path / "adapter_model.safetensors").exists()


def test_fourierft_on_a_slice_of_c_attn_is_refused_with_the_way_out(tmp_path):
    model = dt.attach(tiny.model("gpt2"), "fourierft", n_frequency=50)  # attn.q, attn.v: slices of c_attn
    with pytest.raises(ConfigError, match=r"slice of GPT-2's fused .*c_attn.*re:h"):
        dt.save_adapter(model, tmp_path, format="peft")


# ---------------------------------------------------------------- what peft files deltatune refuses

def _saved(tmp_path, family, method, options, **fields):
    peft_model(family, method, options).save_pretrained(str(tmp_path))
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    return tmp_path


@pytest.mark.parametrize("method,options,fields,message", [
    ("loha", dict(r=2, target_modules=QV["bert"]), dict(rank_pattern={"query": 4}), "rank_pattern"),
    ("lokr", dict(r=2, target_modules=QV["bert"]), dict(alpha_pattern={"value": 4}), "alpha_pattern"),
    ("lokr", dict(r=2, target_modules=QV["bert"]), dict(r=9), "LoKr"),  # shapes no longer fit
    ("oft", dict(oft_block_size=8, target_modules=QV["bert"]), dict(peft_version="0.17.1"), "0.17.1"),
    ("oft", dict(oft_block_size=8, target_modules=QV["bert"]), dict(block_share=True), "block_share=True"),
    ("hra", dict(r=2, target_modules=QV["bert"]), dict(r=3), "reflections"),
    ("fourierft", dict(n_frequency=20, target_modules=QV["bert"]), dict(n_frequency_pattern={"query": 5}),
     "n_frequency_pattern"),
    ("fourierft", dict(n_frequency=20, target_modules=QV["bert"]), dict(n_frequency=21), "n_frequency=21"),
])
def test_peft_files_that_do_not_fit_are_one_line_errors(tmp_path, method, options, fields, message):
    folder = _saved(tmp_path, "bert", method, options, **fields)
    model = tiny.model("bert")
    with pytest.raises(AdapterFileError, match=message):
        dt.load_adapter(model, folder)
    assert not hasattr(model, "deltatune")


def test_peft_bias_training_is_refused(tmp_path):
    peft_model("bert", "hra", dict(r=2, bias="hra_only", target_modules=QV["bert"])).save_pretrained(str(tmp_path))
    with pytest.raises(AdapterFileError, match="bias"):
        dt.load_adapter(tiny.model("bert"), tmp_path)


# ---------------------------------------------------------------- the math peft does not check for us

def test_lokr_factorization_is_peft_s():
    from peft.tuners.lokr.layer import factorization as theirs

    for n in range(1, 1600):
        for f in (-1, 1, 2, 3, 4, 8, 16, 24):
            assert factorization(n, f) == theirs(n, f), (n, f)


def test_butterfly_permutations_are_peft_s():
    layer = peft.get_peft_model(tiny.model("bert"), peft.BOFTConfig(boft_block_size=4, target_modules=["query"]))
    boft = layer.base_model.model.bert.encoder.layer[0].attention.self.query
    for n, b, m in ((32, 4, 3), (64, 8, 2), (384, 8, 2), (48, 4, 2)):
        for level in range(m):
            want = boft.block_butterfly_perm(n, n // b // 2 ** level, b // 2, m - 1)
            assert torch.equal(butterfly_permutation(n, b, level), want), (n, b, level)


@pytest.mark.parametrize("method,options", [("oft", dict(block_size=8, use_cayley_neumann=False)),
                                            ("boft", dict(block_size=4, n_butterfly_factor=3)), ("hra", dict(r=5)),
                                            ("hra", dict(r=4, apply_gs=True))])
def test_the_rotations_are_orthogonal_and_their_matrix_is_what_they_apply(method, options):
    model = dt.attach(tiny.model("bert"), method, **options)
    perturb(model)
    for delta in model.deltatune.adapters["default"].values():
        if not hasattr(delta, "input_matrix"):
            continue  # BOFT's scale
        R = delta.input_matrix().double()
        torch.testing.assert_close(R @ R.t(), torch.eye(R.shape[0], dtype=R.dtype), atol=1e-5, rtol=0)
        x = torch.randn(3, 5, R.shape[0])
        torch.testing.assert_close(delta(x), x @ R.t().float(), atol=1e-5, rtol=1e-5)


def test_hra_starts_at_the_base_model_to_rounding():
    base, b = tiny.model("llama"), tiny.inputs("llama")
    with torch.no_grad():
        before = real_outputs(base, b)
        after = real_outputs(dt.attach(base, "hra", r=8, sites=["attn.q", "attn.v", "ffn.out"]), b)
    assert_same(after, before, tol=1e-6)


def test_coft_keeps_the_blocks_on_its_ball_through_training():
    """peft projects the weight before each forward pass; here the forward pass uses the projection and the
    update rule projects the parameters after each step: the same trajectory."""
    from deltatune.methods.oft import constrain
    from deltatune.updates import build

    model = dt.attach(tiny.model("bert"), "oft", block_size=8, coft=True, eps=1e-3)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    rule = build(model, params, max_steps=3)
    opt = torch.optim.SGD(list(params.values()), lr=1.0)
    b = tiny.inputs("bert")
    for step in (1, 2, 3):
        tiny.loss(model, b).backward()
        opt.step()
        rule.after_step(step)
        opt.zero_grad()
    deltas = [d for d in model.deltatune.adapters["default"].values()]
    assert any(d.weight.abs().sum() > 0 for d in deltas)
    for d in deltas:
        torch.testing.assert_close(constrain(d.weight.detach(), d.eps), d.weight.detach(), atol=0, rtol=0)
        radius = d.eps / d.weight.shape[0] ** 0.5
        assert float((2 ** 0.5 * d.weight.norm(dim=1)).max()) <= radius * (1 + 1e-5)


@pytest.mark.parametrize("method,options", [("loha", dict(rank_dropout=0.5)), ("lokr", dict(rank_dropout=0.5)),
                                            ("loha", dict(module_dropout=1.0)), ("boft", dict(dropout=1.0))])
def test_training_only_dropouts_change_training_passes_only(method, options):
    model = dt.attach(tiny.model("bert"), method, **options)
    perturb(model)
    b = tiny.inputs("bert")
    with torch.no_grad():
        model.eval()
        evaluated = real_outputs(model, b)
        model.train()
        torch.manual_seed(0)
        trained = real_outputs(model, b)
        with dt.use(model):  # no adapter active: the base model with the same (perturbed) head
            base = real_outputs(model, b)
    assert not torch.allclose(trained, evaluated)
    if options.get("module_dropout") == 1.0:
        torch.testing.assert_close(trained, base)  # every update skipped: the base model


def test_loha_factored_and_dense_products_agree():
    from deltatune.methods.loha import HadamardLowRank

    delta = HadamardLowRank(40, 24, 3, 0.7)
    torch.nn.init.normal_(delta.w2_b)
    assert delta.factored
    x = torch.randn(2, 6, 40)
    torch.testing.assert_close(delta.apply(x), torch.nn.functional.linear(x, delta.delta_weight()), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- MiniLM, both ways

MINILM = [
    ("loha", {}, dict(r=8, alpha=8, target_modules=QV["minilm"])),
    ("lokr", {}, dict(r=8, alpha=8, target_modules=QV["minilm"])),
    ("oft", {}, dict(oft_block_size=32, target_modules=QV["minilm"])),
    ("boft", {}, dict(boft_block_size=8, boft_n_butterfly_factor=2, target_modules=QV["minilm"])),  # stand-in
    ("hra", {}, dict(r=8, target_modules=QV["minilm"])),
    ("fourierft", {}, dict(n_frequency=1000, scaling=150.0, target_modules=QV["minilm"])),
]


@pytest.mark.slow
@pytest.mark.parametrize("method,options,peft_options", MINILM, ids=[m for m, _, _ in MINILM])
def test_minilm_both_ways(tmp_path, request, minilm, method, options, peft_options):  # noqa: F811
    if method == "boft":  # two butterfly factors: peft runs them with its extension (here its torch stand-in)
        request.getfixturevalue("butterflies")
    _, tokenizer = minilm
    b, _ = minilm_batch(tokenizer)
    model = dt.attach(fresh_minilm(), method, **options)
    perturb(model, std=0.05)
    model.eval()
    dt.save_adapter(model, tmp_path / "out", format="peft")
    theirs = peft.PeftModel.from_pretrained(fresh_minilm(), str(tmp_path / "out")).eval()
    assert_same(real_outputs(theirs, b), real_outputs(model, b))
    torch.manual_seed(3)
    theirs = peft.get_peft_model(fresh_minilm(), CONFIGS[method](task_type="FEATURE_EXTRACTION", **peft_options))
    perturb(theirs, std=0.05)
    theirs.eval().save_pretrained(str(tmp_path / "in"))
    ours = dt.load_adapter(fresh_minilm(), tmp_path / "in").eval()
    assert_same(real_outputs(ours, b), real_outputs(theirs, b))
