"""Interop: the PEFT adapter format both ways against the real peft package, transformers.Trainer with
DeltatuneCallback, and the sentence-transformers export of a bi-encoder.

Every parity check runs both libraries on the same inputs and compares the outputs at the real token
positions: max |difference| <= 1e-5 x max |output| (a tolerance that float rounding meets on any CPU;
the conversions themselves are exact rewrites).
"""
from __future__ import annotations

import inspect
import json
import warnings

import peft
import pytest
import torch
import transformers as T

import deltatune as dt
from deltatune.errors import AdapterFileError, ConfigError
from deltatune.formats import peft as dtpeft
from tests import tiny

pytestmark = pytest.mark.filterwarnings("ignore")

TASK = {"bert": "SEQ_CLS", "gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM",
        "bart": "SEQ_2_SEQ_LM", "vit": None, "bert-base": "FEATURE_EXTRACTION"}


def make(family: str, seed: int = 0):
    """tiny.model, plus 'bert-base': a bare BertModel (what a bi-encoder holds)."""
    if family == "bert-base":
        torch.manual_seed(seed)
        return T.BertModel(tiny.config("bert")).eval()
    return tiny.model(family, seed)


def batch(family: str):
    return tiny.inputs("bert" if family == "bert-base" else family)


def real_outputs(model, b, prompt: int = 0):
    """The outputs that must agree, at the real positions (peft returns prompt positions first: dropped)."""
    with torch.no_grad():
        out = model(**b)
    y = out.logits if hasattr(out, "logits") else out.last_hidden_state
    if prompt and y.dim() == 3 and y.shape[1] == b["attention_mask"].shape[1] + prompt:
        y = y[:, prompt:]
    mask = b.get("attention_mask")
    if mask is not None and y.dim() == 3 and y.shape[1] == mask.shape[1]:
        return y[mask.bool()]
    return y


def assert_same(a, b, tol: float = 1e-5):
    scale = b.abs().max().item()
    err = (a - b).abs().max().item()
    assert err <= tol * scale, f"max |diff| {err:.3g} > {tol:g} x output scale {scale:.3g}"


def perturb(model, std: float = 0.3, seed: int = 7):
    """Random non-zero values in every trainable tensor (LoRA's B starts at zero, (IA)^3 at ones)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


# ---------------------------------------------------------------- deltatune -> peft

EXPORTS = [
    *[(f, "lora", {}) for f in ("bert", "gpt2", "llama", "t5", "bart", "vit", "bert-base")],
    ("gpt2", "lora", {"sites": ["attn.q", "attn.v", "attn.o", "ffn.in"]}),  # slices of c_attn beside whole modules
    ("llama", "lora", {"sites": ["attn.q", "attn.k", "attn.v", "ffn.gate", "ffn.out"], "r": 3, "alpha": 5.0}),
    ("bert", "lora", {"layers": [1], "dropout": 0.1}),
    ("t5", "lora", {"layers": [0]}),
    *[(f, "ia3", {}) for f in ("bert", "gpt2", "llama", "t5", "bart", "vit", "bert-base")],
    ("gpt2", "ia3", {"sites": ["attn.q", "attn.v"], "input_sites": ["ffn.out", "attn.o"]}),
    *[(f, "prompt", {"length": 3}) for f in ("gpt2", "llama", "bert-base")],
    ("llama", "prefix", {"length": 4, "hidden": 0}),
    ("llama", "prefix", {"length": 3}),  # trained through the MLP, folded away on save
]


@pytest.mark.parametrize("family,method,options", EXPORTS,
                         ids=[f"{f}-{m}-{i}" for i, (f, m, _) in enumerate(EXPORTS)])
def test_deltatune_adapter_runs_in_peft(tmp_path, family, method, options):
    model = dt.attach(make(family), method, **options)
    perturb(model)
    model.eval()
    dt.save_adapter(model, tmp_path, format="peft")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == dtpeft.peft_types()[method] and config["task_type"] == TASK[family]
    loaded = peft.PeftModel.from_pretrained(make(family), str(tmp_path)).eval()
    n = options.get("length", 0) if method == "prompt" else 0
    b = batch(family)
    assert_same(real_outputs(loaded, b, prompt=n), real_outputs(model, b))
    # and back: the PEFT directory loads into deltatune with the same outputs
    again = dt.load_adapter(make(family), tmp_path).eval()  # new delta modules start in training mode
    assert_same(real_outputs(again, b), real_outputs(model, b))


def test_gpt2_slices_become_one_exact_lora_on_c_attn(tmp_path):
    model = dt.attach(tiny.model("gpt2"), "lora", r=4, alpha=8.0, sites=["attn.q", "attn.v", "attn.o"])
    perturb(model)
    tensors, config = dtpeft.peft_state(model)
    # q and v: rank 4 each, stacked into rank 8 on c_attn; c_proj padded to the same rank; scale kept at 8/4
    assert config["target_modules"] == ["attn.c_attn", "attn.c_proj"] and config["fan_in_fan_out"] is True
    assert (config["r"], config["lora_alpha"]) == (8, 16)
    B = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    assert B.shape == (96, 8)
    assert not B[32:64].any()  # the k third of c_attn is untouched
    assert not B[:32, 4:].any() and not B[64:, :4].any()  # q reads only its A rows, v only its own
    P = tensors["base_model.model.transformer.h.0.attn.c_proj.lora_B.weight"]
    assert not P[:, 4:].any()


def test_ia3_slices_and_input_scales_in_peft_layout(tmp_path):
    model = dt.attach(tiny.model("gpt2"), "ia3")  # attn.k, attn.v (slices of c_attn), input of ffn.out
    perturb(model)
    tensors, config = dtpeft.peft_state(model)
    # 'c_proj' alone would also name attn.c_proj: the shortest exact suffixes are two components long
    assert (config["target_modules"], config["feedforward_modules"]) == (["attn.c_attn", "mlp.c_proj"], ["mlp.c_proj"])
    l = tensors["base_model.model.transformer.h.0.attn.c_attn.ia3_l"]
    assert l.shape == (96, 1) and torch.equal(l[:32], torch.ones(32, 1))  # q is left as it is
    assert tensors["base_model.model.transformer.h.0.mlp.c_proj.ia3_l"].shape == (1, 64)  # input scale


# ---------------------------------------------------------------- peft -> deltatune

IMPORTS = [
    *[(f, "lora", dict(r=4, lora_alpha=8)) for f in ("bert", "gpt2", "llama", "t5", "bart", "bert-base")],
    ("vit", "lora", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"])),
    ("llama", "lora", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "gate_proj"],
                           rank_pattern={"o_proj": 2}, alpha_pattern={"v_proj": 3})),
    ("llama", "lora", dict(r=4, lora_alpha=8, use_rslora=True)),
    ("llama", "lora", dict(r=4, lora_alpha=8, layers_to_transform=[1])),
    ("t5", "lora", dict(r=2, lora_alpha=4, target_modules=r".*decoder.*\.(q|v)")),
    ("bert", "lora", dict(r=2, lora_alpha=16, target_modules=["query", "dense"])),  # attention and FFN denses
    *[(f, "ia3", {}) for f in ("bert", "gpt2", "llama", "t5", "bart", "bert-base")],
    ("vit", "ia3", dict(target_modules=["k_proj", "v_proj", "fc2"], feedforward_modules=["fc2"])),
    *[(f, "prompt", dict(num_virtual_tokens=3)) for f in ("gpt2", "llama", "bert-base")],
    ("llama", "prefix", dict(num_virtual_tokens=3)),
    ("llama", "prefix", dict(num_virtual_tokens=2, prefix_projection=True, encoder_hidden_size=8)),
]
PEFT_CONFIGS = {"lora": peft.LoraConfig, "ia3": peft.IA3Config, "prompt": peft.PromptTuningConfig,
                "prefix": peft.PrefixTuningConfig}


def peft_adapter(tmp_path, family, method, options):
    """A peft model with random non-zero adapter weights, saved by peft itself."""
    torch.manual_seed(3)
    config = PEFT_CONFIGS[method](task_type=TASK[family], **options)
    model = peft.get_peft_model(make(family), config)
    perturb(model)
    model.eval()
    model.save_pretrained(str(tmp_path))
    return model


@pytest.mark.parametrize("family,method,options", IMPORTS,
                         ids=[f"{f}-{m}-{i}" for i, (f, m, _) in enumerate(IMPORTS)])
def test_peft_adapter_runs_in_deltatune(tmp_path, family, method, options):
    theirs = peft_adapter(tmp_path, family, method, options)
    ours = dt.load_adapter(make(family), tmp_path).eval()
    assert dt.adapters(ours) == ["default"]
    n = options.get("num_virtual_tokens", 0) if method == "prompt" else 0
    b = batch(family)
    assert_same(real_outputs(ours, b), real_outputs(theirs, b, prompt=n))


def test_imported_options_name_the_sites(tmp_path):
    peft_adapter(tmp_path / "a", "llama", "lora", dict(r=4, lora_alpha=8, layers_to_transform=[1]))
    config, _ = dtpeft.to_deltatune(tiny.model("llama"), tmp_path / "a")
    assert config["method"] == "lora"
    assert config["options"] == {"r": 4, "alpha": 8.0, "dropout": 0.0, "sites": ["attn.q", "attn.v"], "layers": [1]}
    peft_adapter(tmp_path / "b", "gpt2", "lora", dict(r=4, lora_alpha=8))  # peft's gpt2 default: all of c_attn
    config, _ = dtpeft.to_deltatune(tiny.model("gpt2"), tmp_path / "b")
    assert config["options"]["sites"] == [r"re:h\.(?P<layer>\d+)\.attn\.c_attn"]
    peft_adapter(tmp_path / "c", "t5", "ia3", {})
    config, _ = dtpeft.to_deltatune(tiny.model("t5"), tmp_path / "c")
    assert config["options"] == {"sites": ["attn.k", "attn.v"], "input_sites": ["ffn.out"], "layers": None}


# ---------------------------------------------------------------- what has no exact counterpart

@pytest.mark.parametrize("method", ["houlsby", "pfeiffer", "parallel", "bitfit", "full", "telly", "lightweight"])
def test_methods_without_peft_counterpart_say_so(tmp_path, method):
    model = dt.attach(tiny.model("bert"), method)
    with pytest.raises(ConfigError, match=f"method '{method}' has no PEFT counterpart"):
        dt.save_adapter(model, tmp_path, format="peft")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("family,method,options,reason", [
    ("gpt2", "prefix", {}, "learned absolute positions"),
    ("bert", "prefix", {}, "do not accept"),
    ("t5", "prefix", {}, "first layer's slice"),
    ("bart", "prefix", {}, "first layer's slice"),
    ("t5", "prompt", {}, "decoder cross-attends to the real tokens only"),
    ("bart", "prompt", {}, "decoder cross-attends to the real tokens only"),
    ("bert", "prompt", {}, "pooler"),
    ("vit", "ia3", {"sites": ["ffn.in"], "input_sites": ["ffn.in"]}, "not both"),
    ("llama", "prefix", {"layers": [1]}, "every layer"),
    ("gpt2", "ia3", {"sites": ["ffn.out"], "input_sites": ["ffn.out"]}, "not both"),
])
def test_export_refused_where_outputs_would_differ(tmp_path, family, method, options, reason):
    model = dt.attach(tiny.model(family), method, **options)
    with pytest.raises(ConfigError, match=reason):
        dt.save_adapter(model, tmp_path, format="peft")


def test_prefix_refusal_reason_is_the_position_shift():
    """The refusal for GPT-2 prefixes is what it says: the same table gives different outputs in the two
    libraries, and the same ones once deltatune's tokens are moved to positions n.. as peft's are."""
    n = 3
    model = dt.attach(tiny.model("gpt2"), "prefix", length=n, hidden=0)
    perturb(model)
    model.eval()
    tensors, _ = dt.formats.native.adapter_tensors(model)
    tables = [tensors[f"delta.transformer:h:{i}:attn.table"] for i in range(2)]
    theirs = peft.get_peft_model(tiny.model("gpt2"), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n))
    theirs.prompt_encoder["default"].embedding.weight.data.copy_(torch.cat(tables, dim=1))
    theirs.eval()
    b = tiny.inputs("gpt2")
    shifted = dict(b, position_ids=torch.arange(n, n + b["input_ids"].shape[1]).expand(b["input_ids"].shape[0], -1))
    assert_same(real_outputs(model, shifted), real_outputs(theirs, b))
    diff = (real_outputs(model, b) - real_outputs(theirs, b)).abs().max().item()
    assert diff > 1e-2


def llama_classifier():
    torch.manual_seed(0)
    return T.LlamaForSequenceClassification(tiny.config("llama")).eval()


@pytest.mark.parametrize("family", ["t5", "bart", "bert", "llama-cls"])
def test_prompt_refusal_reason_is_real(tmp_path, family):
    """Where prompt conversion is refused, the same prompt vectors do give different outputs in peft."""
    make_model = llama_classifier if family == "llama-cls" else (lambda: tiny.model(family))
    model = dt.attach(make_model(), "prompt", length=3)
    model.eval()
    with pytest.raises(ConfigError, match="cannot export this prompt adapter to PEFT"):
        dt.save_adapter(model, tmp_path, format="peft")
    prompt = next(p for n, p in model.named_parameters() if n.endswith(".prompt"))
    task = "SEQ_CLS" if family == "llama-cls" else TASK[family]
    config = peft.PromptTuningConfig(task_type=task, num_virtual_tokens=3, num_transformer_submodules=1)
    theirs = peft.get_peft_model(make_model(), config).eval()
    theirs.prompt_encoder["default"].embedding.weight.data.copy_(prompt.data)
    head = {"bert": "classifier", "llama-cls": "score"}.get(family)
    if head:
        getattr(theirs.base_model, head).modules_to_save["default"].load_state_dict(getattr(model, head).state_dict())
    b = tiny.inputs("llama" if family == "llama-cls" else family)  # its last row is padded
    assert (real_outputs(model, b) - real_outputs(theirs, b)).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_peft_prefix_on_encoder_decoders_uses_only_the_first_layer_slice(family):
    """What the refusal says of peft 0.21: its seq2seq prefix reads only layer 0's keys and values."""
    theirs = peft.get_peft_model(tiny.model(family), peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3))
    theirs.eval()
    table = theirs.prompt_encoder["default"].embedding.weight
    b = tiny.inputs(family)
    with torch.no_grad():
        table.normal_()
        reference = real_outputs(theirs, b)
        half = table.shape[1] // 2  # layer 0's keys and values, then layer 1's
        table[:, half:] = 0
        assert torch.equal(real_outputs(theirs, b), reference)
        table[:, :half] = 0
        assert not torch.equal(real_outputs(theirs, b), reference)


def test_peft_files_deltatune_cannot_hold_are_refused(tmp_path):
    peft_adapter(tmp_path / "bias", "bert", "lora", dict(r=4, bias="lora_only"))
    peft_adapter(tmp_path / "gpt2-prefix", "gpt2", "prefix", dict(num_virtual_tokens=2))
    peft_adapter(tmp_path / "t5-prompt", "t5", "prompt", dict(num_virtual_tokens=2))
    cases = {"bias": ("bert", "is a bias"),
             "gpt2-prefix": ("gpt2", "learned absolute positions"), "t5-prompt": ("t5", "cross-attends")}
    for folder, (family, reason) in cases.items():
        model = tiny.model(family)
        with pytest.raises(AdapterFileError, match=reason):
            dt.load_adapter(model, tmp_path / folder)
        assert dt.adapters(model) == []  # left as it was


def test_peft_files_for_another_model_or_damaged_are_refused(tmp_path):
    peft_adapter(tmp_path / "bert", "bert", "lora", dict(r=4))
    with pytest.raises(AdapterFileError, match="does not have"):
        dt.load_adapter(tiny.model("llama"), tmp_path / "bert")
    bigger = tmp_path / "bigger"
    peft.get_peft_model(tiny.model("bert"), peft.LoraConfig(r=4, task_type="SEQ_CLS")).save_pretrained(str(bigger))
    model = T.BertForSequenceClassification(tiny.config("bert", hidden=64))
    with pytest.raises(AdapterFileError, match="do not fit"):
        dt.load_adapter(model, bigger)
    (tmp_path / "bert" / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterFileError, match="not valid JSON"):
        dt.load_adapter(tiny.model("bert"), tmp_path / "bert")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(AdapterFileError, match="pickle"):
        dt.load_adapter(tiny.model("bert"), pickled)
    other = tmp_path / "other"
    peft.get_peft_model(tiny.model("bert"), peft.VBLoRAConfig(r=2, num_vectors=16, vector_length=8,
                                                                       target_modules=["query"])).save_pretrained(str(other))
    with pytest.raises(AdapterFileError, match="peft_type 'VBLORA' has no deltatune counterpart"):
        dt.load_adapter(tiny.model("bert"), other)


def test_formats_do_not_overwrite_each_other(tmp_path):
    model = dt.attach(tiny.model("bert"), "lora")
    dt.save_adapter(model, tmp_path)
    with pytest.raises(ConfigError, match="holds a deltatune adapter"):
        dt.save_adapter(model, tmp_path, format="peft")
    with pytest.raises(ConfigError, match="unknown adapter format 'onnx'"):
        dt.save_adapter(model, tmp_path / "x", format="onnx")
    assert dt.load_adapter(tiny.model("bert"), tmp_path)  # still deltatune's own


# ---------------------------------------------------------------- hostile PEFT folders

def _edit_config(folder, **fields):
    file = folder / "adapter_config.json"
    config = json.loads(file.read_text())
    config.update(fields)
    file.write_text(json.dumps(config))


def _load_in_thread(model, folder) -> tuple[BaseException | None, float, float]:
    """(the error, seconds taken, the longest pause of another Python thread meanwhile): the load runs in
    a thread, as a server's request does, while this thread ticks every few milliseconds."""
    import threading
    import time

    outcome = {}

    def load():
        start = time.monotonic()
        try:
            dt.load_adapter(model, folder)
        except BaseException as err:  # noqa: BLE001 - handed to the test
            outcome["error"] = err
        outcome["seconds"] = time.monotonic() - start

    thread = threading.Thread(target=load)
    ticks = [time.monotonic()]
    thread.start()
    while thread.is_alive():
        time.sleep(0.005)
        ticks.append(time.monotonic())
    thread.join()
    return outcome.get("error"), outcome["seconds"], max(b - a for a, b in zip(ticks, ticks[1:]))


BACKTRACKING = "(.|.)*\\d"  # catastrophic for a backtracking matcher on names like encoder.layer.0.attention...


@pytest.mark.parametrize("method,field,value", [
    ("lora", "rank_pattern", {BACKTRACKING: 4}),
    ("lora", "alpha_pattern", {BACKTRACKING: 8}),
    ("ia3", "feedforward_modules", BACKTRACKING),
    ("lora", "target_modules", BACKTRACKING),
    ("lora", "exclude_modules", BACKTRACKING),
])
def test_a_backtracking_pattern_in_a_peft_config_fails_fast_and_holds_no_lock(tmp_path, method, field, value):
    """A pattern that backtracks without end is matched under the time limit of re: sites (1 s for all
    patterns of the file), and the match lets other threads run meanwhile (a server keeps answering)."""
    from deltatune import sites

    peft_adapter(tmp_path, "bert", method, dict(r=4) if method == "lora" else {})
    _edit_config(tmp_path, **{field: value})
    model = tiny.model("bert")
    error, seconds, pause = _load_in_thread(model, tmp_path)
    assert isinstance(error, AdapterFileError), error
    assert field in str(error) and "took over" in str(error) and "\n" not in str(error)
    assert seconds < 20 * sites.MATCH_SECONDS  # gave up (the match alone would take years)
    assert pause < 0.5 * sites.MATCH_SECONDS, f"another thread waited {pause:.2f} s while the pattern was matched"
    assert dt.adapters(model) == []


@pytest.mark.parametrize("fields,message", [
    ({"rank_pattern": {"(": 4}}, "rank_pattern: the pattern '\\(' cannot be used"),
    ({"alpha_pattern": {"query": "8"}}, "must be a finite number"),
    ({"lora_alpha": float("nan")}, "must be a finite number"),
    ({"feedforward_modules": "x" * 5000}, "feedforward_modules"),
])
def test_damaged_peft_config_fields_are_one_line_errors(tmp_path, fields, message):
    method = "ia3" if "feedforward_modules" in fields else "lora"
    peft_adapter(tmp_path, "bert", method, dict(r=4) if method == "lora" else {})
    _edit_config(tmp_path, **fields)
    model = tiny.model("bert")
    with pytest.raises(AdapterFileError, match=message):
        dt.load_adapter(model, tmp_path)
    assert dt.adapters(model) == []


@pytest.mark.parametrize("fields,loads", [
    ({}, True),
    ({"layers_to_transform": [0, 1]}, True),
    ({"target_modules": ".*\\.(query|value)"}, True),
    ({"target_modules": "all-linear"}, True),
    ({"layers_to_transform": [1]}, False),
    ({"layers_to_transform": 99}, False),
    ({"target_modules": ["query"]}, False),
    ({"target_modules": "nothing"}, False),
    ({"exclude_modules": ["value"]}, False),
    ({"layers_to_transform": [0, 1], "layers_pattern": "nowhere"}, False),
])
def test_a_peft_config_selects_every_module_its_tensors_sit_on(tmp_path, fields, loads):
    """peft loads a tensor only onto a module its config selects (target_modules, exclude_modules,
    layers_to_transform, layers_pattern): where the config leaves one out, peft computes without it, so
    deltatune refuses the file instead of computing something else; where every tensor is selected, both agree."""
    peft_adapter(tmp_path, "bert", "lora", dict(r=4, target_modules=["query", "value"]))
    _edit_config(tmp_path, **fields)
    model = tiny.model("bert")
    if not loads:
        with pytest.raises(AdapterFileError, match="which the config .* does not select: peft would leave it out"):
            dt.load_adapter(model, tmp_path)
        assert dt.adapters(model) == []
        return
    theirs = peft.PeftModel.from_pretrained(make("bert"), str(tmp_path)).eval()
    ours = dt.load_adapter(make("bert"), tmp_path).eval()
    b = batch("bert")
    assert_same(real_outputs(ours, b), real_outputs(theirs, b))


def test_a_peft_lora_of_rank_0_is_a_clear_error(tmp_path):
    from safetensors.torch import load_file, save_file

    peft_adapter(tmp_path, "bert", "lora", dict(r=4))
    file = tmp_path / "adapter_model.safetensors"
    tensors = {k: t[:0] if ".lora_A." in k else t[:, :0] if ".lora_B." in k else t for k, t in load_file(str(file)).items()}
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(file))
    _edit_config(tmp_path, r=0)
    model = tiny.model("bert")
    with pytest.raises(AdapterFileError, match="rank 0"):
        dt.load_adapter(model, tmp_path)
    assert dt.adapters(model) == []


@pytest.mark.parametrize("options", [dict(r=4, lora_alpha=0),  # one scale, zero
                                     dict(r=4, lora_alpha=8, alpha_pattern={"query": 0}, target_modules=["query", "value"])])
def test_a_peft_lora_with_a_zero_alpha_loads_exactly(tmp_path, options):
    """A zero scale (everywhere, or at the module whose scale the others are folded against) is no division by zero."""
    theirs = peft_adapter(tmp_path, "bert", "lora", options)
    ours = dt.load_adapter(make("bert"), tmp_path).eval()
    b = batch("bert")
    assert_same(real_outputs(ours, b), real_outputs(theirs, b))


def test_the_adapter_size_limit_applies_to_peft_files_before_they_are_read(tmp_path, monkeypatch):
    from deltatune.formats.native import MAX_MB_ENV

    peft_adapter(tmp_path, "bert", "lora", dict(r=4))
    monkeypatch.setenv(MAX_MB_ENV, "0.001")

    def never(*args, **kwargs):
        raise AssertionError("the file was opened before its size was checked")

    with monkeypatch.context() as m:
        m.setattr(dtpeft, "safe_open", never)
        with pytest.raises(AdapterFileError, match=f"more than the 0.001 MB limit.*set {MAX_MB_ENV}"):
            dt.load_adapter(tiny.model("bert"), tmp_path)
    monkeypatch.setenv(MAX_MB_ENV, "10")
    assert dt.adapters(dt.load_adapter(tiny.model("bert"), tmp_path)) == ["default"]


# ---------------------------------------------------------------- transformers.Trainer

def test_trainer_trains_deltatune_model_and_callback_saves_checkpoints(tmp_path):
    from transformers import Trainer, TrainingArguments

    from deltatune.interop.trainer import DeltatuneCallback

    model = dt.attach(tiny.model("bert"), "lora", r=4)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(3, tiny.VOCAB, (8,), generator=g), "attention_mask": torch.ones(8, dtype=torch.long),
             "labels": i % 3} for i in range(24)]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=4, save_steps=2,
                             learning_rate=5e-2, report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    callback = DeltatuneCallback(formats=("deltatune", "peft"))
    result = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
    assert result.global_step == 4
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("deltatune.") or n.startswith("classifier.") for n in changed)
    assert any(".B" in n for n in changed)  # LoRA's B left zero: the adapter did train
    assert [p.relative_to(tmp_path).as_posix() for p in callback.saved] == [
        "checkpoint-2/deltatune/default", "checkpoint-2/deltatune/default-peft",
        "checkpoint-4/deltatune/default", "checkpoint-4/deltatune/default-peft",
        "deltatune/default", "deltatune/default-peft"]
    b = tiny.inputs("bert")
    model.eval()
    final = real_outputs(model, b)
    for folder in ("checkpoint-4/deltatune/default", "checkpoint-4/deltatune/default-peft", "deltatune/default"):
        assert_same(real_outputs(dt.load_adapter(tiny.model("bert"), tmp_path / folder), b), final)
    theirs = peft.PeftModel.from_pretrained(tiny.model("bert"), str(tmp_path / "checkpoint-4/deltatune/default-peft"))
    assert_same(real_outputs(theirs.eval(), b), final)
    step2 = real_outputs(dt.load_adapter(tiny.model("bert"), tmp_path / "checkpoint-2/deltatune/default"), b)
    assert (step2 - final).abs().max() > 1e-4  # a snapshot of step 2, not the final weights


# ---------------------------------------------------------------- sentence-transformers

def code_texts():
    """Real text: docstrings and first lines of standard-library functions (code-search pairs)."""
    import json as m1
    import textwrap as m2
    pairs = []
    for module in (m1, m2):
        for name, fn in inspect.getmembers(module, inspect.isfunction):
            doc = inspect.getdoc(fn)
            if doc and not name.startswith("_"):
                pairs.append((doc.splitlines()[0], inspect.getsource(fn)[:300]))
    return pairs


def test_bi_encoder_exports_to_sentence_transformers(tmp_path):
    from sentence_transformers import SentenceTransformer

    from deltatune.interop.sbert import export_sentence_transformer
    from deltatune.tasks.kinds import build_task_model

    model, tokenizer = build_task_model("tiny-bert", "retrieval")
    dt.attach(model, "lora", r=4, sites=["attn.q", "attn.v", "ffn.out"])
    perturb(model)
    model.eval()
    texts = [t for pair in code_texts()[:6] for t in pair]
    b = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        ours = model(**b)
        base = build_task_model("tiny-bert", "retrieval")[0](**b)
    export_sentence_transformer(model, tokenizer, tmp_path / "st", max_seq_length=64)
    with torch.no_grad():
        after = model(**b)
    assert torch.equal(after, ours)  # the merge for the export left the model as it was
    theirs = SentenceTransformer(str(tmp_path / "st"), device="cpu").encode(texts, convert_to_tensor=True)
    assert_same(theirs, ours)
    assert (base - ours).abs().max() > 1e-2  # the adapter is in the exported weights


def test_sentence_transformers_export_refuses_unmergeable(tmp_path):
    from deltatune.interop.sbert import export_sentence_transformer
    from deltatune.tasks.kinds import build_task_model

    model, tokenizer = build_task_model("tiny-bert", "retrieval")
    dt.attach(model, "houlsby")
    with pytest.raises(ConfigError, match=r"'default' \(houlsby\) does not merge into the weights"):
        export_sentence_transformer(model, tokenizer, tmp_path / "st")
    assert not (tmp_path / "st").exists()


# ---------------------------------------------------------------- the real MiniLM

@pytest.fixture(scope="module")
def minilm():
    from deltatune.models import load_backbone

    return load_backbone("minilm", "base")


def minilm_batch(tokenizer):
    texts = [t for pair in code_texts()[:4] for t in pair]
    return tokenizer(texts, padding=True, truncation=True, max_length=96, return_tensors="pt"), texts


def fresh_minilm():
    from deltatune.models import load_backbone

    return load_backbone("minilm", "base")[0].eval()


@pytest.mark.slow
@pytest.mark.parametrize("method,options", [("lora", {"r": 8, "sites": ["attn.q", "attn.v", "ffn.in"]}),
                                            ("ia3", {}), ("prompt", {"length": 5})])
def test_minilm_both_ways(tmp_path, minilm, method, options):
    _, tokenizer = minilm
    b, _ = minilm_batch(tokenizer)
    model = dt.attach(fresh_minilm(), method, **options)
    perturb(model, std=0.05)
    model.eval()
    dt.save_adapter(model, tmp_path / "out", format="peft")
    theirs = peft.PeftModel.from_pretrained(fresh_minilm(), str(tmp_path / "out")).eval()
    n = options.get("length", 0) if method == "prompt" else 0
    assert_same(real_outputs(theirs, b, prompt=n), real_outputs(model, b))
    peft_options = {"lora": dict(r=8, lora_alpha=16, target_modules=["query", "value"]), "ia3": {},
                    "prompt": dict(num_virtual_tokens=5)}[method]
    theirs = peft.get_peft_model(fresh_minilm(), PEFT_CONFIGS[method](task_type="FEATURE_EXTRACTION", **peft_options))
    perturb(theirs, std=0.05)
    theirs.eval().save_pretrained(str(tmp_path / "in"))
    ours = dt.load_adapter(fresh_minilm(), tmp_path / "in").eval()
    assert_same(real_outputs(ours, b), real_outputs(theirs, b, prompt=n))


@pytest.mark.slow
def test_minilm_code_search_bi_encoder_to_sentence_transformers(tmp_path):
    """Fine-tune a LoRA bi-encoder on MiniLM (in-batch contrastive loss on docstring/code pairs), export it
    merged, and encode with sentence-transformers: the same embeddings."""
    from sentence_transformers import SentenceTransformer

    from deltatune.interop.sbert import export_sentence_transformer
    from deltatune.tasks.kinds import build_task_model

    model, tokenizer = build_task_model("minilm", "retrieval")
    dt.attach(model, "lora", r=8)
    pairs = code_texts()
    queries = tokenizer([q for q, _ in pairs], padding=True, truncation=True, max_length=64, return_tensors="pt")
    codes = tokenizer([c for _, c in pairs], padding=True, truncation=True, max_length=64, return_tensors="pt")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    losses = []
    for _ in range(3):
        scores = model(**queries) @ model(**codes).T / 0.05
        loss = torch.nn.functional.cross_entropy(scores, torch.arange(len(pairs)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    texts = [t for pair in pairs[:8] for t in pair]
    b = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        ours = model(**b)
    export_sentence_transformer(model, tokenizer, tmp_path / "st", max_seq_length=128)
    theirs = SentenceTransformer(str(tmp_path / "st"), device="cpu").encode(texts, convert_to_tensor=True)
    assert_same(theirs, ours)
    config = json.loads((tmp_path / "st" / "1_Pooling" / "config.json").read_text())
    assert config.get("pooling_mode_mean_tokens") is True or config.get("pooling_mode") == "mean"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = SentenceTransformer(str(tmp_path / "st"), device="cpu")
    assert base.max_seq_length == 128


@pytest.mark.slow
def test_smollm2_prefix_both_ways(tmp_path):
    """Rotary positions of a real model (SmolLM2, rope_theta 1e5): the prefix keys are rotated exactly.

    The two libraries take different float paths here: peft's tokens sit n positions later (transformers
    computes rotary angles in float32) and peft keeps its prefix table in float32. Measured over 8 runs,
    the logits differ by 4e-6 to 2.6e-5 of their scale in float32 (SmolLM2 alone moves 1.2e-6 when its
    tokens shift by 4 positions) and by 5e-7 to 4.7e-6 in float64, which this test uses, with a 5e-5
    tolerance; leaving the keys unrotated gives 1.1.
    """
    import copy

    from deltatune.models import load_backbone

    base, tokenizer = load_backbone("smollm2", "lm")
    base = base.to(torch.float64).eval()
    b = tokenizer(["def add(a, b):\n    return a + b", "Sort a list"], padding=True, return_tensors="pt")
    model = dt.attach(copy.deepcopy(base), "prefix", length=4, hidden=0)
    perturb(model, std=0.5)
    model.eval()
    dt.save_adapter(model, tmp_path / "out", format="peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "out")).eval()
    assert_same(real_outputs(theirs, b), real_outputs(model, b), tol=5e-5)
    del theirs
    ours = dt.load_adapter(copy.deepcopy(base), tmp_path / "out").eval()
    assert_same(real_outputs(ours, b), real_outputs(model, b), tol=5e-5)


def test_prefix_on_a_classifier_is_refused_as_peft_cannot_run_it(tmp_path):
    model = dt.attach(llama_classifier(), "prefix", length=2, hidden=0)
    with pytest.raises(ConfigError, match="only a causal LM or the bare model"):
        dt.save_adapter(model, tmp_path, format="peft")
    theirs = peft.get_peft_model(llama_classifier(), peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=2))
    with pytest.raises(ValueError, match="does not support past key values"):  # peft itself cannot run it
        theirs(**tiny.inputs("llama"))


# ---------------------------------------------------------------- LN tuning: a selection's base tensors, both ways

def test_every_peft_type_is_claimed_by_one_method():
    """A file's peft_type picks the method that reads it: two claimants would make the choice arbitrary."""
    types = list(dtpeft.peft_types().values())
    assert len(types) == len(set(types))
    assert dtpeft._method_of("LN_TUNING").name == "ln"


LN_EXPORTS = [(f, {}) for f in ("bert", "gpt2", "llama", "t5", "bart", "bert-base")] + [("gpt2", {"layers": [1]})]


@pytest.mark.parametrize("family,options", LN_EXPORTS, ids=[f"{f}-{i}" for i, (f, _) in enumerate(LN_EXPORTS)])
def test_ln_adapter_runs_in_peft_and_back(tmp_path, family, options):
    model = dt.attach(make(family), "ln", **options)
    perturb(model)  # every trained norm parameter (and a classifier's head) moves off the base's value
    model.eval()
    dt.save_adapter(model, tmp_path, format="peft")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LN_TUNING" and config["task_type"] == TASK[family]
    tensors, _ = dtpeft.peft_state(model)
    saved = [k for k in tensors if not k.startswith("base_model.model.classifier.")]
    assert saved and all(".ln_tuning_layers." in k for k in saved)
    assert len(saved) == len(dt.formats.native.adapter_tensors(model)[1]["tensors"]) - (
        2 if family == "bert" else 0)  # one copy per trained norm parameter (bert's classifier: weight and bias)
    loaded = peft.PeftModel.from_pretrained(make(family), str(tmp_path)).eval()
    b = batch(family)
    assert_same(real_outputs(loaded, b), real_outputs(model, b))
    again = dt.load_adapter(make(family), tmp_path).eval()
    assert_same(real_outputs(again, b), real_outputs(model, b))
    assert dtpeft.to_deltatune(make(family), tmp_path)[0]["options"] == {"layers": options.get("layers")}


def test_ln_adapter_of_some_layers_names_exactly_their_norms(tmp_path):
    model = dt.attach(tiny.model("gpt2"), "ln", layers=[1])
    _, config = dtpeft.peft_state(model)
    assert config["target_modules"] == ["1.ln_1", "1.ln_2"]  # not h.0's norms, not ln_f


LN_IMPORTS = [
    ("bert", dict(target_modules=["LayerNorm"])),  # peft has no default LN targets for BERT
    ("gpt2", {}), ("llama", {}), ("t5", {}), ("bart", {}),  # peft's defaults (BART's leave layernorm_embedding)
    ("bert-base", dict(target_modules=["LayerNorm"])),
    ("gpt2", dict(target_modules=["ln_1"])),  # a part of the norms: the others keep the model's values
    ("llama", dict(target_modules=["norm"])),  # the final norm alone
    ("llama", dict(target_modules=r".*layers\.1\..*layernorm")),  # a pattern: one block's norms
]


@pytest.mark.parametrize("family,options", LN_IMPORTS, ids=[f"{f}-{i}" for i, (f, _) in enumerate(LN_IMPORTS)])
def test_peft_ln_tuning_runs_in_deltatune(tmp_path, family, options):
    torch.manual_seed(3)
    theirs = peft.get_peft_model(make(family), peft.LNTuningConfig(task_type=TASK[family], **options))
    perturb(theirs)
    theirs.eval()
    theirs.save_pretrained(str(tmp_path))
    ours = dt.load_adapter(make(family), tmp_path).eval()
    assert dt.adapters(ours) == ["default"]
    b = batch(family)
    assert_same(real_outputs(ours, b), real_outputs(theirs, b))
    assert (real_outputs(ours, b) - real_outputs(make(family), b)).abs().max() > 1e-3  # the copies were read


def test_peft_ln_tuning_options_are_the_layers_of_its_norms(tmp_path):
    cases = {"all": ("gpt2", None, None), "ln_1": ("gpt2", ["ln_1"], [0, 1]),
             "block1": ("llama", r".*layers\.1\..*layernorm", [1]), "final": ("llama", ["norm"], None)}
    for folder, (family, targets, layers) in cases.items():
        peft.get_peft_model(make(family), peft.LNTuningConfig(task_type=TASK[family], target_modules=targets)
                            ).save_pretrained(str(tmp_path / folder))
        config, _ = dtpeft.to_deltatune(make(family), tmp_path / folder)
        assert (config["method"], config["options"]) == ("ln", {"layers": layers}), folder


def _rewrite_tensors(folder, change):
    """Edit a saved adapter's tensors in place (a damaged or hand-made file)."""
    from safetensors.torch import load_file, save_file

    file = folder / "adapter_model.safetensors"
    tensors = load_file(str(file))
    change(tensors)
    save_file(tensors, str(file))


def test_peft_ln_tuning_deltatune_cannot_hold_is_refused(tmp_path):
    """Copies of modules that are not the norms ln tunes, and copies that do not fit this model's norms."""
    import re

    for family, targets, named in [("bert", ["query"], "attention.self.query' (Linear)"),
                                   ("gpt2", ["c_attn", "ln_f"], "attn.c_attn' (Conv1D)"),
                                   ("llama", ["q_proj"], "self_attn.q_proj' (Linear)")]:
        folder = tmp_path / family
        peft.get_peft_model(make(family), peft.LNTuningConfig(task_type=TASK[family], target_modules=targets)
                            ).save_pretrained(str(folder))
        model = make(family)
        reason = f"{named}, which is not one of the norms deltatune's ln tunes"
        with pytest.raises(AdapterFileError, match=re.escape(reason)):
            dt.load_adapter(model, folder)
        assert dt.adapters(model) == []  # left as it was
    key = "base_model.model.transformer.h.0.ln_1.ln_tuning_layers."
    damage = {"short": (lambda t: t.update({key + "weight": torch.ones(16)}),
                        re.escape("weight is (16,), where this model's LayerNorm has (32,)")),
              "no-bias": (lambda t: t.pop(key + "bias"),
                          re.escape("holds ['weight'], where this model's LayerNorm has ['bias', 'weight']")),
              "not-a-copy": (lambda t: t.update({"base_model.model.transformer.h.0.ln_1.weight": torch.ones(32)}),
                             "not an LN tuning copy"),
              "no-such-block": (lambda t: t.update({key.replace("h.0", "h.7") + "bias": torch.ones(32)}),
                                "'transformer.h.7.ln_1', which this model does not have")}
    for name, (change, reason) in damage.items():
        folder = tmp_path / name
        peft.get_peft_model(make("gpt2"), peft.LNTuningConfig(task_type="CAUSAL_LM")).save_pretrained(str(folder))
        _rewrite_tensors(folder, change)
        model = make("gpt2")
        with pytest.raises(AdapterFileError, match=reason):
            dt.load_adapter(model, folder)
        assert dt.adapters(model) == []
    peft.get_peft_model(make("gpt2"), peft.LNTuningConfig(task_type="CAUSAL_LM")).save_pretrained(str(tmp_path / "g"))
    with pytest.raises(AdapterFileError, match=r"weight is \(32,\), where this model's LayerNorm has \(16,\)"):
        dt.load_adapter(tiny.model("gpt2", hidden=16), tmp_path / "g")  # another model's width


def test_an_adapter_whose_base_parameters_the_conversion_leaves_out_is_refused(tmp_path, monkeypatch):
    """The PEFT writer refuses an adapter with trained base parameters unless the method's conversion took them."""
    from deltatune.methods.ln import LNTuning

    monkeypatch.setattr(LNTuning, "to_peft", lambda self, bridge, deltas: ({}, {"target_modules": ["ln_f"]}))
    model = dt.attach(tiny.model("gpt2"), "ln")
    with pytest.raises(ConfigError, match="also trains base parameters, which the PEFT format cannot hold"):
        dt.save_adapter(model, tmp_path, format="peft")
    assert not any(tmp_path.iterdir())
