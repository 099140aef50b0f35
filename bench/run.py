#!/usr/bin/env python
"""Side-by-side speed and memory benchmark: deltatune vs Hugging Face peft vs AdapterHub adapters.

Every (size, config, library) cell runs in its own fresh subprocess, so its peak RSS
(`ru_maxrss`) is its own. Rounds are round-robin: each round runs every cell once, the order
rotated between rounds, and a cell's result is the median over rounds of its per-process median
step time, so drift of a shared machine hits all cells alike.

    .venv/bin/python bench/run.py --quick                 # smoke test, a few minutes
    .venv/bin/python bench/run.py                         # the full run (quiet machine!)
    .venv/bin/python bench/run.py --sizes bert-base --configs 'full,telly,lora*'

Environments (`bash bench/setup_peers.sh` makes the peer ones):
    main      .venv                  torch baselines and deltatune
    peft      .venv-peers/peft       peft, same transformers as main
    adapters  .venv-peers/adapters   adapters, which pins its own (older) transformers
The `full` and `infer-base` baselines run in every environment; each row's ratio is taken
against the baseline of its own environment, so a different transformers version under
`adapters` does not count for or against it.
"""
from __future__ import annotations

import argparse
import datetime
import fnmatch
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import tempfile
import threading
import sys
import time
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
    ),
    "llama": dict(
        qv=["q_proj", "v_proj"],
        all_linear=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ia3=["k_proj", "v_proj", "down_proj"],
        ia3_ff=["down_proj"],
        ln=["input_layernorm", "post_attention_layernorm", "norm"],
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
    "infer-base":    dict(kind="infer", libs=["torch"], envs=["main", "peft", "adapters"],
                          about="forward only, no adapter (inference baseline)"),
    "infer-lora":    dict(kind="infer", libs=["deltatune", "peft", "adapters"], method="lora-qv",
                          about="forward only, LoRA (q, v) unmerged"),
    "infer-lora-merged": dict(kind="infer", libs=["deltatune", "peft", "adapters"],
                              method="lora-qv", merge=True,
                              about="forward only, LoRA (q, v) merged into the weights"),
}
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


def attach_peft(model, config: str, family: str):
    import peft
    t = TARGETS[family]
    task = "SEQ_CLS"
    if config in ("lora-qv", "lora-all"):
        cfg = peft.LoraConfig(task_type=task, r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                              target_modules=t["qv"] if config == "lora-qv" else t["all_linear"])
    elif config == "ia3":
        cfg = peft.IA3Config(task_type=task, target_modules=t["ia3"], feedforward_modules=t["ia3_ff"])
    elif config == "prefix":
        cfg = peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=N_VIRTUAL,
                                      prefix_projection=True, encoder_hidden_size=PREFIX_MLP)
    elif config == "prompt":
        cfg = peft.PromptTuningConfig(task_type=task, num_virtual_tokens=N_VIRTUAL)
    elif config == "ln":
        cfg = peft.LNTuningConfig(task_type=task, target_modules=t["ln"])
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


def versions() -> dict:
    import importlib.metadata as md
    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "adapters", "deltatune"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def worker(job: dict) -> dict:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(job["threads"])
    lib, config, size = job["lib"], job["config"], job["size"]
    spec = CONFIGS[config]
    family = SIZES[size]["family"]
    if lib == "peft":
        import peft  # noqa: F401  (imported before the baseline RSS reading, like the others)
    elif lib == "adapters":
        import adapters  # noqa: F401
    elif lib == "deltatune":
        import deltatune  # noqa: F401
    import transformers  # noqa: F401
    rss_import = rss_mb()

    model, cfg = build_model(size, job["seed"])
    rss_model = rss_mb()  # base weights allocated, modeling code imported, in every environment
    method = spec.get("method", spec.get("eager", config))
    model = attach(model, cfg, lib, config if lib == "torch" else method, family)

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    seq = job["seq"] + spec.get("extra_tokens", 0)
    gen = torch.Generator().manual_seed(job["seed"])
    ids = torch.randint(1, cfg.vocab_size, (job["batch"], seq), generator=gen)
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 2, (job["batch"],), generator=gen)

    result = dict(job, trainable=trainable, total=total, rss_import_mb=rss_import,
                  rss_model_mb=rss_model, versions=versions())

    if spec["kind"] == "infer":
        model.eval()
        if spec.get("merge"):
            merge_lora(model, lib)

        def step():
            with torch.inference_mode():
                return model(input_ids=ids, attention_mask=mask).logits
    else:
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        if spec.get("compile"):
            model = torch.compile(model)

        def step(check=False):
            logits = model(input_ids=ids, attention_mask=mask).logits
            loss = F.cross_entropy(logits, labels)
            loss.backward()
            if check:  # every trainable tensor must receive a non-zero gradient
                result["grads_nonzero"] = sum(
                    1 for p in params if p.grad is not None and bool(p.grad.abs().sum() > 0))
                result["grads_expected"] = len(params)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

    losses = []
    t0 = time.perf_counter()
    out = step()
    result["first_step_s"] = time.perf_counter() - t0  # includes compilation under compile
    for i in range(job["warmup"]):
        last = i == job["warmup"] - 1
        # Check gradients after at least one update: LoRA's B and a bottleneck's up-projection
        # start at zero, so their partners get zero gradient on the very first step.
        out = step(check=True) if (last and spec["kind"] == "train") else step()
    if spec["kind"] == "train":
        losses.append(float(out))
    # Lockstep: the driver asks each process of a group for one step in turn, so whatever slows
    # the machine (other guests' CPU steal, above all) hits every row of the group alike.
    print(READY_TAG, flush=True)
    times = []
    for line in sys.stdin:
        if line.strip() != "step":
            break
        t0 = time.perf_counter()
        out = step()
        times.append(time.perf_counter() - t0)
        print(f"{STEP_TAG}{times[-1]}", flush=True)
    if spec["kind"] == "train":
        losses.append(float(out))
    result.update(step_s=statistics.median(times), times=times, losses=losses,
                  loss_finite=all(math.isfinite(x) for x in losses), peak_rss_mb=rss_mb())
    return result


# =============================================================================================
# Driver
# =============================================================================================
def env_python(env: str, peers_dir: Path) -> Path:
    if env == "main":
        main = ROOT / ".venv/bin/python"
        return main if main.exists() else Path(sys.executable)
    return peers_dir / env / "bin/python"


def plan(args) -> list[dict]:
    wanted = [c.strip() for c in args.configs.split(",")] if args.configs else None
    libs = set(args.libs.split(",")) if args.libs else None
    if libs and libs - {"torch", *LIB_ENV}:
        raise SystemExit(f"bench: unknown libraries {sorted(libs - {'torch', *LIB_ENV})}; "
                         f"known: torch, {', '.join(LIB_ENV)}")
    jobs = []
    for size in args.sizes.split(","):
        if size not in SIZES:
            raise SystemExit(f"bench: unknown size {size!r}; known: {', '.join(SIZES)}")
        for name, spec in CONFIGS.items():
            if wanted is None:
                if not spec.get("default", True):
                    continue
            elif not any(fnmatch.fnmatchcase(name, w) or w == "all" for w in wanted):
                continue
            for lib in spec["libs"]:
                if (lib, SIZES[size]["family"]) in spec.get("skip", []):
                    continue
                envs = spec.get("envs", ["main"]) if lib == "torch" else [LIB_ENV[lib]]
                for env in envs:
                    # a library brings the torch baselines of its own environment along
                    if libs and lib not in libs and not (
                            lib == "torch" and env in {LIB_ENV[l] for l in libs if l in LIB_ENV}):
                        continue
                    jobs.append(dict(size=size, config=name, lib=lib, env=env,
                                     batch=args.batch, seq=args.seq, steps=args.steps,
                                     warmup=args.warmup, threads=args.threads, seed=args.seed))
    if wanted:
        unknown = [w for w in wanted if w != "all" and not any(
            fnmatch.fnmatchcase(n, w) for n in CONFIGS)]
        if unknown:
            raise SystemExit(f"bench: unknown config(s) {unknown}; known: {', '.join(CONFIGS)}")
    return jobs


class Row:
    """One row's worker process: built and warmed up, then timed one step at a time on request."""

    def __init__(self, job: dict, args):
        self.job, self.result, self.proc = job, None, None
        py = env_python(job["env"], args.peers_dir)
        if not py.exists():
            self.result = dict(job, error=f"no python at {py}; run bash bench/setup_peers.sh")
            return
        env = dict(os.environ, OMP_NUM_THREADS=str(job["threads"]), MKL_NUM_THREADS=str(job["threads"]),
                   TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error",
                   PYTHONPATH=str(ROOT) if job["env"] == "main" else "")
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([str(py), str(Path(__file__).resolve()), "--worker", json.dumps(job)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True, env=env, cwd=ROOT)
        self.watchdog = threading.Timer(args.timeout, self.proc.kill)  # a hung row fails, the run goes on
        self.watchdog.start()
        self.expect(READY_TAG)  # built and warmed up before the next row starts: no overlap

    def expect(self, tag: str) -> str | None:
        """The next protocol line starting with ``tag`` (other output is skipped); None if the row died."""
        if self.result is not None:
            return None
        for line in self.proc.stdout:
            if line.startswith(tag):
                return line[len(tag):].strip()
        self.fail()
        return None

    def ask(self, command: str, tag: str) -> str | None:
        """Send a command; the answer's text, or None if the row has died (then it is failed)."""
        if self.result is not None:
            return None
        try:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            self.fail()
            return None
        return self.expect(tag)

    def step(self) -> None:
        self.ask("step", STEP_TAG)

    def finish(self) -> dict:
        if self.result is None:
            text = self.ask("done", RESULT_TAG)
            if text is not None:
                self.result = json.loads(text)
                self.proc.wait()
        if self.proc is not None:
            self.watchdog.cancel()
        return self.result

    def fail(self) -> None:
        self.watchdog.cancel()
        self.proc.kill()
        self.proc.wait()
        self.stderr.seek(0)
        err = self.stderr.read()
        tail = [l for l in err.strip().splitlines() if l.strip()][-1:] or ["(no output)"]
        self.result = dict(self.job, error=f"exit {self.proc.returncode}: {tail[0][:300]}", stderr=err[-4000:])


def groups_of(jobs: list[dict]) -> list[list[dict]]:
    """Each config with the rows its ratios need, to be timed together: the config in every
    library, the baseline of each environment involved (full FT / base forward), the frozen floor
    (and floor+20tok for prompt), and for a compiled config its eager twin."""
    by_key = {key(j): j for j in jobs}
    refs = {"full", "floor", "floor+20tok", "infer-base"}
    groups = []
    for (size, config) in dict.fromkeys((j["size"], j["config"]) for j in jobs):
        spec = CONFIGS[config]
        if config in refs and any(j["size"] == size and j["config"] not in refs for j in jobs):
            continue  # measured inside the other groups
        rows = [j for j in jobs if (j["size"], j["config"]) == (size, config)]
        base = "full" if spec["kind"] == "train" else "infer-base"
        wanted = [(size, base, "torch", env) for env in dict.fromkeys(j["env"] for j in rows)]
        if spec["kind"] == "train" and config not in refs:
            wanted.append((size, "floor", "torch", "main"))
        if config == "prompt":
            wanted.append((size, "floor+20tok", "torch", "main"))
        if spec.get("eager"):
            wanted.append((size, spec["eager"], "deltatune", "main"))
        extra = [by_key[k] if k in by_key else dict(rows[0], config=k[1], lib=k[2], env=k[3])
                 for k in dict.fromkeys(wanted) if k not in {key(r) for r in rows}]
        groups.append(rows + extra)
    return groups


def run_group(group: list[dict], args) -> list[dict]:
    """Start the group's rows one after another, then time them in lockstep, order rotated per step."""
    rows = [Row(job, args) for job in group]
    ticks0 = cpu_ticks()
    for s in range(group[0]["steps"]):
        for row in rows[s % len(rows):] + rows[:s % len(rows)]:
            row.step()
    ticks1 = cpu_ticks()
    results = [row.finish() for row in rows]
    for r in results:
        if ticks0 and ticks1 and ticks1[1] > ticks0[1]:
            r["steal"] = (ticks1[0] - ticks0[0]) / (ticks1[1] - ticks0[1])
    return results


def key(r: dict) -> tuple:
    return (r["size"], r["config"], r["lib"], r["env"])


def aggregate(results: list[dict]) -> dict:
    """(size, config, lib, env) -> summary with the median over rounds of per-process medians."""
    cells: dict = {}
    for r in results:
        cells.setdefault(key(r), []).append(r)
    out = {}
    for k, rs in cells.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            out[k] = dict(error=rs[-1]["error"])
            continue
        meds = [r["step_s"] for r in ok]
        med = statistics.median(meds)
        out[k] = dict(
            step_s=med, processes=len(ok), rounds=len({r.get("round") for r in ok}), spread=(max(meds) - min(meds)) / med if med else 0.0,
            peak_rss_mb=statistics.median(r["peak_rss_mb"] for r in ok),
            rss_import_mb=statistics.median(r["rss_import_mb"] for r in ok),
            # what attaching and training cost above the built base model
            net_mb=statistics.median(r["peak_rss_mb"] - r.get("rss_model_mb", r["rss_import_mb"]) for r in ok),
            trainable=ok[0]["trainable"], total=ok[0]["total"],
            first_step_s=statistics.median(r["first_step_s"] for r in ok),
            loss_finite=all(r.get("loss_finite", True) for r in ok),
            losses=ok[-1].get("losses"), grads=(ok[-1].get("grads_nonzero"),
                                                ok[-1].get("grads_expected")),
            versions=ok[0]["versions"], errors=len(rs) - len(ok),
            **{name: ok[0][name] for name in ("batch", "seq", "steps", "warmup", "threads", "seed")})
    return out


def lib_label(lib: str, env: str) -> str:
    return lib if lib != "torch" or env == "main" else f"torch ({env} env)"


def paired(results: list[dict], a: tuple, b: tuple) -> float | None:
    """a's step time over b's, from steps timed side by side: in a lockstep group the i-th steps of
    all rows ran within one rotation, so each pair of i-th steps saw the same machine. The median
    over all pairs of every group and round that timed both rows."""
    by_group: dict = {}
    for r in results:
        if "error" not in r and "group" in r:
            by_group.setdefault((r["group"], r["round"]), {})[key(r)] = r["times"]
    ratios = [x / y for g in by_group.values() if a in g and b in g for x, y in zip(g[a], g[b])]
    return statistics.median(ratios) if ratios else None


def build_rows(cells: dict, sizes: list[str], results: list[dict]) -> list[dict]:
    def ratio(a, b):  # paired when both were timed together, else the ratio of the cells' medians
        if b not in cells or "error" in cells[b]:
            return None
        return paired(results, a, b) or cells[a]["step_s"] / cells[b]["step_s"]

    rows = []
    for k, c in cells.items():
        size, config, lib, env = k
        spec = CONFIGS[config]
        base_name = "full" if spec["kind"] == "train" else "infer-base"
        base = next((b for b in ((size, base_name, "torch", env), (size, base_name, "torch", "main"))
                     if b in cells), None)
        row = dict(size=size, config=config, lib=lib, env=env, kind=spec["kind"], cell=c)
        if "error" not in c:
            found = {"x_base": ratio(k, base) if base else None}
            if lib == "deltatune" and spec.get("compile"):
                eager = ratio((size, spec["eager"], "deltatune", "main"), k)
                found["compile_speedup"] = eager
            elif lib == "deltatune":
                for peer in ("peft", "adapters"):
                    found["vs_" + peer] = ratio(k, (size, config, peer, peer))
            if spec["kind"] == "train" and config not in ("full", "floor"):
                found["x_floor"] = ratio(k, (size, "floor", "torch", "main"))
            if config == "prompt" and lib == "deltatune":
                found["x_floor_tok"] = ratio(k, (size, "floor+20tok", "torch", "main"))
            row.update({name: v for name, v in found.items() if v is not None})
        rows.append(row)
    order = {n: i for i, n in enumerate(CONFIGS)}
    libs = {"torch": 0, "deltatune": 1, "peft": 2, "adapters": 3}
    envs = {"main": 0, "peft": 1, "adapters": 2}
    rows.sort(key=lambda r: (sizes.index(r["size"]), r["kind"] != "train", order[r["config"]],
                             libs[r["lib"]], envs[r["env"]]))
    return rows


def fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e4 else str(n)


def table(rows: list[dict], kind: str) -> list[str]:
    ref = "× full FT" if kind == "train" else "× base"
    head = ["size", "config", "library", "step (s)", "spread", ref, "vs peft", "vs adapters",
            "peak RSS (MB)", "net (MB)", "trainable"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r["kind"] != kind:
            continue
        c = r["cell"]
        label = lib_label(r["lib"], r["env"])
        if "error" in c:
            lines.append(f"| {r['size']} | {r['config']} | {label} | failed: {c['error'][:120]} |"
                         + " |" * (len(head) - 4))
            continue
        ratio = lambda k: f"{r[k]:.2f}×" if k in r else ""  # noqa: E731
        extra = f" ({r['compile_speedup']:.2f}× eager speed)" if "compile_speedup" in r else ""
        spread = f"{100 * c['spread']:.0f}%" if c["processes"] > 1 else "–"
        ok = "" if c["loss_finite"] else " NaN!"
        lines.append(
            f"| {r['size']} | {r['config']} | {label} | {c['step_s']:.4f}{extra}{ok} | "
            f"{spread} | {ratio('x_base')} | {ratio('vs_peft')} | "
            f"{ratio('vs_adapters')} | {c['peak_rss_mb']:.0f} | {c['net_mb']:.0f} | "
            f"{fmt_params(c['trainable'])} |")
    return lines


def goals(rows: list[dict], cells: dict) -> list[str]:
    """The targets deltatune sets itself; each line says met / not met / not measured."""
    out = []
    yes = lambda b: "met" if b else "**not met**"  # noqa: E731
    shared = [r for r in rows if r["lib"] == "deltatune" and r["kind"] == "train"
              and ("vs_peft" in r or "vs_adapters" in r)]
    for r in shared:
        c = r["cell"]
        for peer in ("peft", "adapters"):
            if "vs_" + peer not in r:
                continue
            p = cells[(r["size"], r["config"], peer, peer)]
            speed = r["vs_" + peer] <= 0.95
            mem = c["peak_rss_mb"] <= p["peak_rss_mb"]
            mem_net = c["net_mb"] <= p["net_mb"]
            peer_row = next(x for x in rows if (x["size"], x["config"], x["lib"]) == (r["size"], r["config"], peer))
            floor = (f"; above the frozen floor: deltatune {r['x_floor']:.2f}×, {peer} {peer_row['x_floor']:.2f}×"
                     if "x_floor" in r and "x_floor" in peer_row else "")
            out.append(f"- {r['size']} {r['config']} vs {peer}: step {r['vs_' + peer]:.2f}× "
                       f"(≤ 0.95× {yes(speed)}); peak RSS {c['peak_rss_mb']:.0f} vs "
                       f"{p['peak_rss_mb']:.0f} MB ({yes(mem)}); net {c['net_mb']:.0f} vs "
                       f"{p['net_mb']:.0f} MB ({yes(mem_net)}){floor}")
    if not shared:
        out.append("- deltatune vs peers: not measured (no deltatune rows with a peer row)")
    for r in rows:
        if r["lib"] != "deltatune" or "error" in r["cell"]:
            continue
        if r["config"] == "telly" and "x_base" in r:
            n = SIZES[r["size"]]["config"]["num_hidden_layers"]
            speedup = 1 / r["x_base"]
            out.append(f"- {r['size']} telly (top 2 of {n} trainable): {speedup:.2f}× faster than "
                       f"full FT (≥ 2.5× {yes(speedup >= 2.5)}"
                       f"{'' if n == 12 else '; the goal is stated for 12 layers'})")
        if r["config"] == "infer-lora" and "x_base" in r:
            over = r["x_base"] - 1
            out.append(f"- {r['size']} unmerged LoRA inference: {100 * over:+.1f}% over base "
                       f"(≤ 5% {yes(over <= 0.05)})")
        if r["config"] == "infer-lora-merged" and "x_base" in r:
            over = r["x_base"] - 1
            out.append(f"- {r['size']} merged LoRA inference: {100 * over:+.1f}% over base "
                       f"(≤ 2% {yes(over <= 0.02)})")
        if r["config"] == "prompt" and "x_floor_tok" in r:
            x = r["x_floor_tok"]
            out.append(f"- {r['size']} prompt tuning: {x:.2f}× the frozen floor at seq+20 tokens "
                       f"(≤ 1.00× {yes(x <= 1.005)})")
    return out


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kb = int(next(l for l in Path("/proc/meminfo").read_text().splitlines()
                          if l.startswith("MemTotal")).split()[1])
        ram = f"{mem_kb / 1024 / 1024:.1f} GiB"
    except (OSError, StopIteration):
        ram = "?"
    return dict(cpu=cpu, cores=os.cpu_count(), ram=ram, os=platform.platform())


def settings(cells: dict) -> str:
    """The run settings, read from the results themselves (a merged report may mix runs)."""
    def values(name):
        return "/".join(str(v) for v in sorted({c[name] for c in cells.values() if name in c}))
    return (f"`torch.set_num_threads({values('threads')})`, batch {values('batch')}, sequence "
            f"{values('seq')}, {values('warmup')} warm-up + {values('steps')} timed steps per process, "
            f"{values('rounds')} round(s), seed {values('seed')}")


def report(rows, cells, results, started, elapsed, command) -> str:
    m = machine()
    env_versions = {}
    for (size, config, lib, env), c in cells.items():
        if "versions" in c:
            env_versions.setdefault(env, c["versions"])
    lines = [
        "# Performance: deltatune vs peft vs adapters",
        "",
        f"Generated by `bench/run.py` on {started:%Y-%m-%d %H:%M} "
        + (f"({elapsed / 60:.0f} min)." if elapsed else "from earlier raw results (`--merge`)."),
        "",
        "```",
        *sorted({r["command"] for r in results if "command" in r} | {command}),
        "```",
        "",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['ram']} RAM ({m['os']})",
        "- Settings: " + settings(cells),
    ]
    for env, v in sorted(env_versions.items()):
        lines.append(f"- `{env}` environment: " + ", ".join(f"{k} {v[k]}" for k in v))
    light = sorted({k[0] for k, c in cells.items() if c.get("steps", 0) < 10},
                   key=list(SIZES).index)
    if light:
        every = len(light) == len({k[0] for k in cells})
        lines += ["", f"> **{'Smoke run' if every else 'Lighter run for ' + ', '.join(light)}**: fewer than "
                  "10 timed steps per process" + ("" if every else " for these sizes")
                  + "; treat those ratios as indications. Run `bench/run.py` without `--quick` on a "
                  "quiet machine for numbers to quote."]
    steal = sorted(r["steal"] for r in results if "steal" in r)
    if steal:
        lines += ["", f"> **CPU steal** (time the hypervisor gave to other guests, from /proc/stat, during "
                  f"the timed steps): median {100 * statistics.median(steal):.0f}%, max {100 * steal[-1]:.0f}% "
                  f"over {len(steal)} processes. It comes and goes within seconds, as does the rest of this "
                  "machine's drift, so it moves rows measured at different moments; ratios of steps taken "
                  "side by side (the lockstep groups here, `bench/ab.py` below) are far less exposed."]
    noisy = [c["spread"] for c in cells.values() if c.get("processes", 0) > 1]
    if noisy and statistics.median(noisy) > 0.10:
        lines += ["", f"> **Noisy machine**: the median spread between processes timing the same row is "
                  f"{100 * statistics.median(noisy):.0f}%: step times of different groups within that margin "
                  "are not findings. The ratios pair steps taken side by side and are steadier, but on "
                  "this machine still resolve only about ±5 %."]
    lines += [
        "",
        "Step time: median of each process's timed steps, median over the processes that timed "
        "the row (forward + backward + AdamW step + zero_grad; inference: forward under "
        "`torch.inference_mode`). Rows run in lockstep groups: a config in every library with the "
        "baselines its ratios need, each row in its own process, one step each in turn "
        "(see bench/README.md). *spread*: (max − min) / median of the row's per-process medians "
        "(baselines are timed in several groups), a noise gauge. "
        "Ratios are medians of per-step ratios between rows of the same group: "
        "*× full FT* / *× base* against the plain-torch baseline of the same environment; "
        "*vs peft* / *vs adapters*: deltatune's time over the peer's for the same method "
        "(below 1 is faster). Peak RSS: `ru_maxrss` of the row's own process; *net*: peak RSS "
        "minus the RSS once the base model is built (what attaching and training cost).",
        "",
        "## Training",
        "",
        *table(rows, "train"),
        "",
        "## Inference",
        "",
        *table(rows, "infer"),
        "",
        "## Goals",
        "",
        *goals(rows, cells),
        "",
        "## Notes",
        "",
        "- Models are random-init from a config (`minilm`: BERT 6×384, 12 heads, FFN 1536; "
        "`bert-base`: 12×768, FFN 3072; `smollm2`: Llama 30×576, 9 heads / 3 KV heads, FFN 1536, "
        "vocab 49152), with a 2-way classification head (cross-entropy) that every method trains.",
        f"- LoRA: r={LORA_R}, alpha={LORA_ALPHA}, no dropout. Prefix: {N_VIRTUAL} tokens, MLP "
        f"reparametrization of width {PREFIX_MLP} (peft `prefix_projection=True`, adapters' default). "
        f"Prompt: {N_VIRTUAL} random-init soft tokens. Bottleneck adapters: reduction factor {BN_REDUCTION}.",
        "- Where the libraries differ in what they train (see *trainable* and the list below): "
        "adapters' LoRA has no attention-output LoRA (nor Llama `gate_proj`), so its `lora-all` "
        "adapts fewer matrices; adapters' (IA)^3 scales the output of the FFN's first projection "
        "on BERT (before the activation) and of `down_proj` on Llama, where peft, deltatune and the "
        "paper scale the FFN activation (the input of the last projection); adapters has "
        "no prompt tuning for Llama; peft has no bottleneck adapters.",
        "- deltatune runs the frozen blocks below the lowest trained one (telly's k lower layers) and the "
        "embeddings in eval mode while training (no dropout there: `frozen_dropout=False`, the default); "
        "plain training-mode behaviour is `frozen_dropout=True`. No other row is affected: their "
        "lowest trained site is in the first block.",
        "- Peak RSS includes the interpreter and imported libraries; the import baseline differs by "
        "environment (" + ", ".join(
            f"{env} ≈ {statistics.median(c['rss_import_mb'] for k, c in cells.items() if k[3] == env and 'rss_import_mb' in c):.0f} MB"
            for env in sorted({k[3] for k, c in cells.items() if "rss_import_mb" in c})) +
        "), so the memory goal is also checked on *net* memory (above the built base model).",
        "- Trainable parameters and gradient check per row (non-zero gradient tensors / trainable "
        "tensors, after one update) and loss (first timed / last):",
        "",
    ]
    for r in rows:
        c = r["cell"]
        if "error" in c or r["kind"] != "train":
            continue
        g = c["grads"]
        losses = "/".join(f"{x:.3f}" for x in (c["losses"] or []))
        lines.append(f"  - {r['size']} {r['config']} {lib_label(r['lib'], r['env'])}: "
                     f"{c['trainable']:,} of {c['total']:,}; grads {g[0]}/{g[1]}; loss {losses}")
    compiled = [r for r in rows if "compile_speedup" in r]
    if compiled:
        lines += ["", "- torch.compile (compile time excluded from step medians; first step includes it):"]
        for r in compiled:
            lines.append(f"  - {r['size']} {r['config']}: {r['compile_speedup']:.2f}× the eager speed; "
                         f"first step {r['cell']['first_step_s']:.1f} s")
    findings = ROOT / "bench" / "findings.md"  # hand-written, from bench/ab.py profiling runs
    if findings.exists():
        lines += ["", findings.read_text().rstrip()]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="configs: " + ", ".join(
                                     n + ("" if s.get("default", True) else " (not default)")
                                     for n, s in CONFIGS.items()))
    ap.add_argument("--sizes", default="minilm,bert-base,smollm2")
    ap.add_argument("--configs", default=None, help="comma-separated names or globs; 'all' "
                    "includes the non-default ones")
    ap.add_argument("--libs", default=None, help="restrict to these of torch,deltatune,peft,adapters")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per worker process")
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 round, 3 steps, minilm only")
    ap.add_argument("--out", default="docs/performance.md")
    ap.add_argument("--json", default=None, help="raw results (default runs/bench-<time>.json)")
    ap.add_argument("--merge", default=None, help="comma-separated raw JSON files of earlier runs "
                    "to report together with this one (--rounds 0: only rebuild the report)")
    ap.add_argument("--peers-dir", type=Path, default=ROOT / ".venv-peers")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        print(RESULT_TAG + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    if args.quick:
        args.rounds, args.steps, args.warmup, args.sizes = 1, 3, 2, "minilm"
    args.warmup = max(args.warmup, 2)  # the gradient check runs after one optimizer update

    jobs = plan(args) if args.rounds > 0 else []
    command = "python bench/run.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    started = datetime.datetime.now()
    results = []
    for path in filter(None, (args.merge or "").split(",")):
        results += [r for r in json.loads(Path(path).read_text())
                    if key(r) not in {key(j) for j in jobs}]  # this run's rows win
    groups = groups_of(jobs)
    print(f"bench: {len(jobs)} rows in {len(groups)} lockstep groups × {args.rounds} round(s); "
          f"{len(results)} results merged", flush=True)
    failed = set()
    t_start = time.perf_counter()
    for rnd in range(args.rounds):
        shift = (rnd * len(groups)) // args.rounds  # rotate the order so no group always runs first
        order = groups[shift:] + groups[:shift]
        for i, group in enumerate(order):
            group = [j for j in group if key(j) not in failed]
            if not group:
                continue
            name = f"{group[0]['size']}/{group[0]['config']}"
            for r in run_group(group, args):
                r["round"], r["command"], r["group"] = rnd, command, name
                results.append(r)
                status = f"error: {r['error']}" if "error" in r else (
                    f"{r['step_s']:.4f} s  rss {r['peak_rss_mb']:.0f} MB  trainable {r['trainable']:,}")
                print(f"  [{rnd + 1}/{args.rounds} {i + 1}/{len(order)}] {r['size']:9s} "
                      f"{r['config']:18s} {lib_label(r['lib'], r['env']):22s} {status}", flush=True)
                if "error" in r:
                    failed.add(key(r))  # an error is structural; don't repeat it every round
        done = time.perf_counter() - t_start
        print(f"bench: round {rnd + 1} done, {done / 60:.1f} min so far, "
              f"about {done / (rnd + 1) * (args.rounds - rnd - 1) / 60:.0f} min to go", flush=True)
    elapsed = time.perf_counter() - t_start if jobs else None
    if not results:
        raise SystemExit("bench: nothing ran and nothing merged")
    sizes = [s for s in SIZES if any(r["size"] == s for r in results)]

    cells = aggregate(results)
    rows = build_rows(cells, sizes, results)
    print("\n" + "\n".join(table(rows, "train")) + "\n\n" + "\n".join(table(rows, "infer")))
    print("\nGoals:\n" + "\n".join(goals(rows, cells)))
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report(rows, cells, results, started, elapsed, command))
    print(f"\nbench: wrote {out}")
    if jobs:  # the raw per-process results, to --merge later
        raw = Path(args.json) if args.json else ROOT / "runs" / f"bench-{started:%Y%m%d-%H%M%S}.json"
        raw.parent.mkdir(parents=True, exist_ok=True)
        raw.write_text(json.dumps(results, indent=1))
        print(f"bench: raw results in {raw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
