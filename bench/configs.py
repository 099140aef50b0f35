"""What the benchmark compares: model shapes, configurations, and each library's attach (torch
baselines, deltatune, peft, adapters), plus the process measurements every row takes."""
from __future__ import annotations

import platform
import resource
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULT_TAG, READY_TAG, STEP_TAG = "BENCH_RESULT ", "BENCH_READY", "BENCH_STEP "

# ---------------------------------------------------------------------------------------------
# Model shapes: fresh random-init models from a config, nothing downloaded.
# ---------------------------------------------------------------------------------------------
SIZES = {
    "minilm": dict(family="bert", config=dict(
        num_hidden_layers=6, hidden_size=384, num_attention_heads=12, intermediate_size=1536)),
    "bert-base": dict(family="bert", config=dict(
        num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072)),
    "smollm2": dict(family="llama", config=dict(
        num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
        intermediate_size=1536, vocab_size=49152, max_position_embeddings=2048,
        tie_word_embeddings=True, pad_token_id=0)),
}

# Module names per family, written so each peer targets the same matrices as deltatune's sites.
# peft takes a string target_modules as a full-match regex over module names.
BERT_LAYER = r".*\.encoder\.layer\.\d+"
TARGETS = {
    "bert": dict(
        qv=["query", "value"],
        all_linear=BERT_LAYER + r"\.(attention\.self\.(query|key|value)|attention\.output\.dense"
                   r"|intermediate\.dense|output\.dense)",
        ia3=BERT_LAYER + r"\.(attention\.self\.(key|value)|output\.dense)",
        ia3_ff=BERT_LAYER + r"\.output\.dense",  # scales the FFN activation, i.e. its input
        ln=["LayerNorm"],
        embed="word_embeddings",
    ),
    "llama": dict(
        qv=["q_proj", "v_proj"],
        all_linear=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ia3=["k_proj", "v_proj", "down_proj"],
        ia3_ff=["down_proj"],
        ln=["input_layernorm", "post_attention_layernorm", "norm"],
        embed="embed_tokens",
    ),
}

LORA_R, LORA_ALPHA = 8, 16
N_VIRTUAL = 20          # prefix length and prompt length
PREFIX_MLP = 512        # hidden size of the prefix reparametrization MLP (Li & Liang 2021, sec. 4.3)
BN_REDUCTION = 16       # bottleneck adapters: hidden / 16

# ---------------------------------------------------------------------------------------------
# Configurations. kind: train (forward+backward+AdamW step) or infer (forward, inference_mode).
# libs: which libraries implement it; "torch" runs plain transformers in every environment
# listed in `envs` (the full-FT and base-forward baselines), others run in their own env.
# ---------------------------------------------------------------------------------------------
CONFIGS = {
    "full":          dict(kind="train", libs=["torch"], envs=["main", "peft", "adapters"],
                          about="full fine-tuning, all parameters (ratio baseline)"),
    "floor":         dict(kind="train", libs=["torch"], about="base frozen, head trainable, "
                          "activation gradients through every layer (cost floor)"),
    "floor+20tok":   dict(kind="train", libs=["torch"], extra_tokens=N_VIRTUAL,
                          about="floor at seq+20 tokens: what prompt tuning's extra tokens cost"),
    "lora-qv":       dict(kind="train", libs=["deltatune", "peft", "adapters"],
                          about="LoRA r=8 on query, value"),
    "lora-all":      dict(kind="train", libs=["deltatune", "peft", "adapters"],
                          about="LoRA r=8 on every linear layer of every block"),
    "dora-qv":       dict(kind="train", libs=["deltatune", "peft"],
                          about="DoRA (LoRA r=8 with a magnitude vector) on query, value"),
    "ia3":           dict(kind="train", libs=["deltatune", "peft", "adapters"],
                          about="(IA)^3: scale keys, values, FFN activations"),
    "prefix":        dict(kind="train", libs=["deltatune", "peft", "adapters"],
                          about="prefix tuning, 20 key/value prefixes, MLP reparametrization"),
    "prompt":        dict(kind="train", libs=["deltatune", "peft", "adapters"],
                          skip=[("adapters", "llama")], about="prompt tuning, 20 soft tokens"),
    "pfeiffer":      dict(kind="train", libs=["deltatune", "adapters"],
                          about="Pfeiffer bottleneck adapter after the FFN (adapters: seq_bn)"),
    "houlsby":       dict(kind="train", libs=["deltatune", "adapters"],
                          about="Houlsby adapters after attention and FFN (adapters: double_seq_bn)"),
    "parallel":      dict(kind="train", libs=["deltatune", "adapters"], default=False,
                          about="scaled parallel adapter at the FFN (adapters: par_bn)"),
    "bitfit":        dict(kind="train", libs=["deltatune"], skip=[("deltatune", "llama")],
                          about="BitFit: biases only (Llama has none)"),
    "ln":            dict(kind="train", libs=["deltatune", "peft"], about="LayerNorm tuning"),
    "telly":         dict(kind="train", libs=["deltatune"],
                          about="top 2 blocks trainable (k = n_layers - 2 frozen)"),
    "lora-qv+compile":  dict(kind="train", libs=["deltatune"], compile=True, eager="lora-qv",
                             about="lora-qv under torch.compile"),
    "ia3+compile":      dict(kind="train", libs=["deltatune"], compile=True, eager="ia3",
                             about="ia3 under torch.compile"),
    "pfeiffer+compile": dict(kind="train", libs=["deltatune"], compile=True, eager="pfeiffer",
                             about="pfeiffer under torch.compile"),
    "houlsby+compile":  dict(kind="train", libs=["deltatune"], compile=True, eager="houlsby",
                             about="houlsby under torch.compile"),
    # LoRA's relatives (LyCORIS and the orthogonal family), each as peft runs it on query, value
    "loha-qv":       dict(kind="train", libs=["deltatune", "peft"], default=False,
                          about="LoHa r=8, alpha 8 on query, value"),
    "lokr-qv":       dict(kind="train", libs=["deltatune", "peft"], default=False,
                          about="LoKr r=8, alpha 8 on query, value"),
    "oft-qv":        dict(kind="train", libs=["deltatune", "peft"], default=False,
                          about="OFT, 32-wide blocks, Cayley-Neumann 5 terms, on query, value"),
    "boft-qv":       dict(kind="train", libs=["deltatune", "peft"], default=False,
                          about="BOFT, one butterfly factor of 8-wide blocks (peft's CPU limit), on query, value"),
    "boft-m2-qv":    dict(kind="train", libs=["deltatune"], default=False,
                          about="BOFT, two butterfly factors of 8-wide blocks (peft needs its CUDA extension)"),
    "hra-qv":        dict(kind="train", libs=["deltatune", "peft"], default=False,
                          about="HRA, 8 Householder reflections, on query, value"),
    "fourierft-qv":  dict(kind="train", libs=["deltatune", "peft"], default=False,
                          about="FourierFT, 1000 coefficients, scale 150, on query, value"),
    "vera-qv":       dict(kind="train", libs=["deltatune", "peft"], default=False,
                          about="VeRA r=256 (shared frozen A, B; trained d, b), on query, value"),
    "pissa-qv":      dict(kind="train", libs=["deltatune", "peft"], default=False,
                          about="LoRA r=8 on query, value, PiSSA's initialisation (peft: the residual written into "
                                "the base weight; deltatune: the base untouched, the initial product subtracted)"),
    "ptuning":       dict(kind="train", libs=["deltatune", "peft"], default=False,
                          about="P-tuning, 20 virtual tokens through an MLP prompt encoder (peft's default)"),
    "trainable-tokens": dict(kind="train", libs=["deltatune", "peft"], default=False,
                             about="trainable tokens: 16 rows of the input embedding matrix train"),
    "llama-adapter": dict(kind="train", libs=["deltatune", "peft"], default=False,
                          about="LLaMA-Adapter, 10 adaption prompts with zero-initialised gates in every layer "
                                "(Llama shapes only in peft)"),
    "adalora-qv":    dict(kind="train", libs=["deltatune", "peft"], default=False,
                          about="AdaLoRA rank 12 -> 8, alpha 8, on query, value; the orthogonality regulariser and "
                                "the rank allocation every step (deltaT 1) in the step, as both libraries run them"),
    "infer-base":    dict(kind="infer", libs=["torch"], envs=["main", "peft", "adapters"],
                          about="forward only, no adapter (inference baseline)"),
    "infer-lora":    dict(kind="infer", libs=["deltatune", "peft", "adapters"], method="lora-qv",
                          about="forward only, LoRA (q, v) unmerged"),
    "infer-lora-merged": dict(kind="infer", libs=["deltatune", "peft", "adapters"],
                              method="lora-qv", merge=True,
                              about="forward only, LoRA (q, v) merged into the weights"),
}
ADALORA_STEPS = 1000  # AdaLoRA's schedule length: a benchmark's steps sit early in it, pruning every step
LIB_ENV = {"deltatune": "main", "peft": "peft", "adapters": "adapters"}

# ---------------------------------------------------------------------------------------------
# deltatune side: config -> (method, options), option names as dt.method_info(method)["options"]
# spells them (checked before attaching). A callable option is computed from the model config.
# Where deltatune's default differs from what the peers run, the option is set to match them.
# ---------------------------------------------------------------------------------------------
ALL_LINEAR_SITES = {
    "bert": ["attn.q", "attn.k", "attn.v", "attn.o", "ffn.in", "ffn.out"],
    "llama": ["attn.q", "attn.k", "attn.v", "attn.o", "ffn.gate", "ffn.in", "ffn.out"],
}
DELTATUNE = {
    "lora-qv":  ("lora", dict(r=LORA_R, alpha=LORA_ALPHA, dropout=0.0, sites=["attn.q", "attn.v"])),
    "lora-all": ("lora", dict(r=LORA_R, alpha=LORA_ALPHA, dropout=0.0,
                              sites=lambda cfg: ALL_LINEAR_SITES[cfg.model_type])),
    "dora-qv":  ("lora", dict(r=LORA_R, alpha=LORA_ALPHA, dropout=0.0, sites=["attn.q", "attn.v"], use_dora=True)),
    "ia3":      ("ia3", dict()),  # keys, values, and the FFN activation (input of ffn.out)
    "prefix":   ("prefix", dict(length=N_VIRTUAL, hidden=PREFIX_MLP)),
    "prompt":   ("prompt", dict(length=N_VIRTUAL)),
    "pfeiffer": ("pfeiffer", dict(reduction=BN_REDUCTION)),
    # adapters' double_seq_bn sizes the bottleneck by reduction factor and leaves LayerNorms frozen
    "houlsby":  ("houlsby", dict(bottleneck=lambda cfg: cfg.hidden_size // BN_REDUCTION, train_ln=False)),
    "parallel": ("parallel", dict(bottleneck=lambda cfg: cfg.hidden_size // BN_REDUCTION)),
    "bitfit":   ("bitfit", dict()),
    "ln":       ("ln", dict()),
    "telly":    ("telly", dict(k=lambda cfg: cfg.num_hidden_layers - 2)),  # top 2 blocks train
    "loha-qv":  ("loha", dict(r=8, alpha=8.0, sites=["attn.q", "attn.v"])),
    "lokr-qv":  ("lokr", dict(r=8, alpha=8.0, sites=["attn.q", "attn.v"])),
    "oft-qv":   ("oft", dict(block_size=32, sites=["attn.q", "attn.v"])),
    "boft-qv":  ("boft", dict(block_size=8, n_butterfly_factor=1, sites=["attn.q", "attn.v"])),
    "boft-m2-qv": ("boft", dict(block_size=8, n_butterfly_factor=2, sites=["attn.q", "attn.v"])),
    "hra-qv":   ("hra", dict(r=8, sites=["attn.q", "attn.v"])),
    "fourierft-qv": ("fourierft", dict(n_frequency=1000, scaling=150.0, sites=["attn.q", "attn.v"])),
    "vera-qv":  ("vera", dict(r=256, sites=["attn.q", "attn.v"])),
    "pissa-qv": ("lora", dict(r=LORA_R, alpha=LORA_ALPHA, dropout=0.0, sites=["attn.q", "attn.v"], init="pissa")),
    "ptuning":  ("ptuning", dict(length=N_VIRTUAL, encoder="mlp")),
    "trainable-tokens": ("trainable-tokens", dict(tokens=list(range(1000, 1016)))),
    "llama-adapter": ("llama-adapter", dict(length=10)),
    "adalora-qv": ("adalora", dict(init_r=12, target_r=8, alpha=8.0, total_step=ADALORA_STEPS, sites=["attn.q", "attn.v"])),
}


# =============================================================================================
# Worker: one cell, one process.
# =============================================================================================
def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def cpu_ticks() -> tuple[int, int] | None:
    """(steal, total) jiffies of all CPUs from /proc/stat: time the hypervisor gave to other guests."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def build_model(size: str, seed: int):
    import torch
    import transformers
    spec = SIZES[size]
    torch.manual_seed(seed)
    if spec["family"] == "bert":
        cfg = transformers.BertConfig(**spec["config"], num_labels=2, attn_implementation="sdpa")
        model = transformers.BertForSequenceClassification(cfg)
    else:
        cfg = transformers.LlamaConfig(**spec["config"], num_labels=2, attn_implementation="sdpa")
        model = transformers.LlamaForSequenceClassification(cfg)
    return model, cfg


def attach_torch(model, config: str):
    """Plain-torch baselines: full FT, or the frozen-base floor."""
    if config == "full":
        return model
    backbone = model.base_model  # .bert / .model
    for p in backbone.parameters():
        p.requires_grad_(False)
    if config.startswith("floor"):
        # Make the embedding output require grad so backward runs through every block
        # (activation gradients only, no weight gradients): the cheapest any adapter can be.
        def needs_grad(_module, _inp, out):
            return out.requires_grad_(True)
        model.get_input_embeddings().register_forward_hook(needs_grad)
    return model


RELATIVES = {  # config -> (peft's config class, the options of DELTATUNE[config]), on query and value
    "loha-qv": ("LoHaConfig", dict(r=8, alpha=8)),
    "lokr-qv": ("LoKrConfig", dict(r=8, alpha=8)),
    "oft-qv": ("OFTConfig", dict(oft_block_size=32)),
    "boft-qv": ("BOFTConfig", dict(boft_block_size=8, boft_n_butterfly_factor=1)),
    "hra-qv": ("HRAConfig", dict(r=8)),
    "fourierft-qv": ("FourierFTConfig", dict(n_frequency=1000, scaling=150.0)),
    "vera-qv": ("VeraConfig", dict(r=256)),
    "adalora-qv": ("AdaLoraConfig", dict(init_r=12, target_r=8, lora_alpha=8, total_step=ADALORA_STEPS)),
}


def attach_peft(model, config: str, family: str):
    import peft
    t = TARGETS[family]
    task = "SEQ_CLS"
    if config in ("lora-qv", "lora-all", "dora-qv"):
        cfg = peft.LoraConfig(task_type=task, r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                              target_modules=t["all_linear"] if config == "lora-all" else t["qv"],
                              use_dora=config == "dora-qv")
    elif config == "ia3":
        cfg = peft.IA3Config(task_type=task, target_modules=t["ia3"], feedforward_modules=t["ia3_ff"])
    elif config == "prefix":
        cfg = peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=N_VIRTUAL,
                                      prefix_projection=True, encoder_hidden_size=PREFIX_MLP)
    elif config == "prompt":
        cfg = peft.PromptTuningConfig(task_type=task, num_virtual_tokens=N_VIRTUAL)
    elif config == "ln":
        cfg = peft.LNTuningConfig(task_type=task, target_modules=t["ln"])
    elif config == "pissa-qv":
        cfg = peft.LoraConfig(task_type=task, r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=t["qv"],
                              init_lora_weights="pissa")
    elif config == "ptuning":
        cfg = peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=N_VIRTUAL, encoder_reparameterization_type="MLP")
    elif config == "trainable-tokens":
        cfg = peft.TrainableTokensConfig(token_indices=list(range(1000, 1016)), target_modules=[t["embed"]])
    elif config == "llama-adapter":
        cfg = peft.AdaptionPromptConfig(adapter_len=10, adapter_layers=model.config.num_hidden_layers)
    elif config in RELATIVES:
        name, options = RELATIVES[config]
        cfg = getattr(peft, name)(task_type=task, target_modules=t["qv"], **options)
    else:
        raise SystemExit(f"bench: no peft configuration for {config!r}")
    return peft.get_peft_model(model, cfg)


def attach_adapters(model, config: str, family: str):
    import adapters
    a = adapters
    if config == "lora-qv":
        cfg = a.LoRAConfig(r=LORA_R, alpha=LORA_ALPHA, dropout=0.0, attn_matrices=["q", "v"])
    elif config == "lora-all":
        # adapters cannot put LoRA on the attention output projection (nor on Llama's gate_proj).
        cfg = a.LoRAConfig(r=LORA_R, alpha=LORA_ALPHA, dropout=0.0, attn_matrices=["q", "k", "v"],
                           intermediate_lora=True, output_lora=True)
    elif config == "ia3":
        cfg = a.IA3Config()
    elif config == "prefix":
        cfg = a.PrefixTuningConfig(prefix_length=N_VIRTUAL, bottleneck_size=PREFIX_MLP)
    elif config == "prompt":
        cfg = a.PromptTuningConfig(prompt_length=N_VIRTUAL)
    elif config == "pfeiffer":
        cfg = a.SeqBnConfig(reduction_factor=BN_REDUCTION)
    elif config == "houlsby":
        cfg = a.DoubleSeqBnConfig(reduction_factor=BN_REDUCTION, non_linearity="relu")  # default swish
    elif config == "parallel":
        cfg = a.ParBnConfig(reduction_factor=BN_REDUCTION)
    else:
        raise SystemExit(f"bench: no adapters configuration for {config!r}")
    adapters.init(model)
    model.add_adapter("bench", config=cfg)
    model.train_adapter("bench")  # freezes the backbone; the classifier head stays trainable
    return model


def attach_deltatune(model, config: str, cfg, **overrides):
    import deltatune as dt
    method, options = DELTATUNE[config]
    options = {**options, **overrides}
    keep_dropout = options.pop("frozen_dropout", None)  # a training setting, not a method option
    known = dt.method_info(method)["options"]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise SystemExit(f"bench: deltatune method {method!r} has no option(s) {unknown} "
                         f"(known: {sorted(known)}); update DELTATUNE in bench/run.py")
    options = {k: v(cfg) if callable(v) else v for k, v in options.items()}
    model = dt.attach(model, method, **options)
    if keep_dropout is not None:
        dt.set_frozen_dropout(model, bool(keep_dropout))
    return model


def attach(model, cfg, lib: str, config: str, family: str, **overrides):
    """One library's version of ``config`` on ``model`` (torch: the plain baselines)."""
    if lib == "torch":
        return attach_torch(model, config)
    if lib == "peft":
        return attach_peft(model, config, family)
    if lib == "adapters":
        return attach_adapters(model, config, family)
    return attach_deltatune(model, config, cfg, **overrides)


def merge_lora(model, lib: str):
    if lib == "deltatune":
        import deltatune as dt
        dt.merge(model)
    elif lib == "peft":
        model.merge_adapter()  # merged in place, LoRA layers kept (like dt.merge; can unmerge)
    elif lib == "adapters":
        model.merge_adapter("bench")
    return model


class TrainStep:
    """One library's training step on a fixed batch: the loss, backward, AdamW, and the work a method does in
    the training loop around them (AdaLoRA's regulariser and rank allocation: deltatune's update rule, peft's
    loss term and ``update_and_allocate``), so that a step costs what it costs in a real run of either library."""

    def __init__(self, model, lib: str, params: list, inputs: dict, labels):
        import torch
        self.model, self.params, self.inputs, self.labels = model, params, inputs, labels
        self.opt = torch.optim.AdamW(params, lr=1e-4)
        self.rule, self.allocate, self.n = None, None, 0
        if lib == "deltatune":
            from deltatune import updates
            named = {n: p for n, p in model.named_parameters() if p.requires_grad}
            self.rule = updates.build(model, named, max_steps=ADALORA_STEPS)
        elif lib == "peft" and hasattr(model.base_model, "update_and_allocate"):
            self.allocate = model.base_model.update_and_allocate  # its regulariser joins the loss the model returns

    def __call__(self, on_grads=None):
        """One step; ``on_grads()`` runs with the step's gradients in place (before they are cleared)."""
        import torch.nn.functional as F
        step, self.n = self.n, self.n + 1
        if self.rule is not None:
            self.rule.before_step(step)
        if self.allocate is not None:
            loss = self.model(**self.inputs, labels=self.labels).loss
        else:
            loss = F.cross_entropy(self.model(**self.inputs).logits, self.labels)
        loss.backward()
        if self.rule is not None:
            self.rule.after_backward(step)
        if on_grads is not None:
            on_grads()
        self.opt.step()
        if self.rule is not None:
            self.rule.after_step(step)
        if self.allocate is not None:
            self.allocate(step)
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()


def versions() -> dict:
    import importlib.metadata as md
    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "adapters", "deltatune"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
