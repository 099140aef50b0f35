#!/usr/bin/env python
"""A quantized frozen base (issue 24): memory and speed of LoRA on a float32, int8 and nf4 base, int8 serving
throughput, and the two quantization libraries side by side. The tables and the commands that made them are in
docs/performance.md, "A quantized base".

    .venv/bin/python bench/quantize.py memory --shape smollm2-360m --batch 8 --seq 256 --steps 1
    .venv/bin/python bench/quantize.py speed --shape smollm2-135m --batch 4 --seq 128 --rounds 5
    .venv/bin/python bench/quantize.py serve --rounds 5                     # MiniLM embeddings, int8 vs float32
    .venv/bin/python bench/quantize.py serve-gen --rounds 3 --batch 8       # SmolLM2 generation, int8 vs float32
    .venv/bin/python bench/quantize.py gen-quality --adapter RUN/best --max-new-tokens 64   # a trained adapter's BLEU
    .venv/bin/python bench/quantize.py error --batch 8 --max-len 128        # SmolLM2 and MiniLM: quantized vs float32
    PYTHONPATH=/path/to/torchao .venv/bin/python bench/quantize.py libs      # bitsandbytes vs torchao (pip install torchao==0.18.0)

memory: one child process per configuration (float32, int8, nf4 with deltatune's LoRA; nf4 with peft's LoRA
on the same bitsandbytes layers, the QLoRA peer), in a rotated order per round. A child builds a Llama of the
named SmolLM2 shape with random weights (speed and memory do not depend on the values) on the meta device and
materializes it module by module, quantizing each linear layer of the blocks as soon as its float weights exist
(deltatune.quantize.quantize_linear), so the float32 copy of the whole model never exists; then LoRA (r 8 on q,
v), activation checkpointing (default on, as the engine turns it on for batches this big; --no-checkpointing)
and --steps AdamW steps on random tokens, the loss as deltatune's engine computes it (the LM head in chunks where
labels count) and, for the peer, as transformers does (the whole (batch, seq, vocab) logits, as Trainer + peft). Reported: the child's peak RSS (ru_maxrss, everything included), its RSS
after the build, and its step times, with how busy the machine was meanwhile.

speed: ONE process holds the float32, int8 and nf4 models (the same random weights) and alternates their
training steps A B C A B C ..., so load changes hit them alike; medians and the ratios to float32.

serve: MiniLM (the real all-MiniLM-L6-v2) as deltatune serve runs it, with a LoRA adapter unmerged, float32 and
int8 bases in one process, alternating batches of --batch code-search queries: texts per second, and how far the
int8 embeddings are from the float32 ones (cosine).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = {  # the SmolLM2 configurations (HuggingFaceTB/SmolLM2-*), vocabulary 49152, tied embeddings
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3),
    "smollm2-360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                         num_key_value_heads=5),
    "smollm2-1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                         num_key_value_heads=32),
}
MEMORY_CONFIGS = ["float32", "int8", "nf4", "peft+bnb nf4"]


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_llama(shape: str, scheme: str | None, seed: int = 0, lib: str = "deltatune"):
    """A LlamaForCausalLM of ``shape`` with random weights (normal, std 0.02, as its own init), built module by
    module from the meta device; each linear layer of the blocks quantized (``scheme``) as soon as it exists."""
    import torch
    import transformers as T

    cfg = T.LlamaConfig(vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True, rope_theta=100000.0,
                        rms_norm_eps=1e-5, **SHAPES[shape])
    with torch.device("meta"):
        model = T.LlamaForCausalLM(cfg)
    gen = torch.Generator().manual_seed(seed)
    quantize = None
    if scheme is not None and lib == "deltatune":
        from deltatune.quantize import quantize_linear as quantize
    elif scheme is not None:
        quantize = _other_library(lib, scheme)
    # parents by name and children fetched one at a time: nothing else refers to a float layer, so it is freed as
    # soon as its quantized layer replaces it
    parents = [name for name, m in model.model.named_modules() if any(True for _ in m.children())]
    for parent_name in parents:
        parent = model.model.get_submodule(parent_name)
        for name in [n for n, _ in parent.named_children()]:
            child = getattr(parent, name)
            if not any(True for _ in child.parameters(recurse=False)):
                continue
            child.to_empty(device="cpu", recurse=False)
            with torch.no_grad():
                for p in child.parameters(recurse=False):
                    p.normal_(0, 0.02, generator=gen) if p.dim() > 1 else p.fill_(1.0)
            if quantize is not None and type(child) is torch.nn.Linear:
                setattr(parent, name, quantize(child, scheme))
            del child
    model.model.rotary_emb = type(model.model.rotary_emb)(cfg)  # its inv_freq buffer, computed on the CPU
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as SmolLM2's
    return model.eval()


def _other_library(lib: str, scheme: str):
    """A ``quantize(linear, scheme)`` of torchao (for ``libs``): the same layer, its weight a torchao tensor."""
    import torch

    def quantize(linear, scheme):
        from torchao.quantization import quantize_
        import torchao.quantization as tq

        w = linear.weight.detach()
        if scheme == "nf4":
            from torchao.quantization import to_nf4
            blocks = w.numel() // 64
            scaler = max(d for d in range(1, 257) if blocks % d == 0)  # its scaler blocks must divide the blocks
            linear.weight = torch.nn.Parameter(to_nf4(w, 64, scaler), requires_grad=False)
            return linear
        config = tq.Int8WeightOnlyConfig()
        holder = torch.nn.Sequential(linear)
        quantize_(holder, config)
        return holder[0]
    return quantize


def lora_hooks(model, r: int = 8, alpha: float = 16.0):
    """LoRA on q and v as forward hooks, for libraries whose tensors deltatune's fingerprint cannot read (libs)."""
    import torch

    params = []
    for layer in model.model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.v_proj):
            A = torch.nn.Linear(proj.in_features, r, bias=False)
            B = torch.nn.Linear(r, proj.out_features, bias=False)
            torch.nn.init.zeros_(B.weight)
            params += [A.weight, B.weight]
            proj.register_forward_hook(lambda m, a, out, A=A, B=B: out + (alpha / r) * B(A(a[0])))
    return params


def train_steps(model, params, batch: int, seq: int, steps: int, checkpointing: bool, chunked: bool = True) -> list[float]:
    """AdamW steps on random tokens; the loss as the engine computes it (``chunked``: the LM head in chunks where
    labels count, deltatune.tasks.kinds.lm_loss) or as transformers does (the (batch, seq, vocab) logits)."""
    import torch

    from deltatune.tasks.kinds.lm_loss import causal_lm_loss

    if checkpointing:
        from deltatune.training.memory import enable_checkpointing
        enable_checkpointing(model)
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(3, 49152, (batch, seq), generator=torch.Generator().manual_seed(1))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = causal_lm_loss(model, {"input_ids": ids, "labels": ids}) if chunked else model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times


def memory_child(config: str, args) -> None:
    import torch

    import deltatune as dt

    torch.manual_seed(0)
    scheme = None if config == "float32" else config.split()[-1]
    model = build_llama(args.shape, scheme)
    built = rss_mb()
    if config.startswith("peft"):
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    else:
        dt.attach(model, "lora")
    params = [p for p in model.parameters() if p.requires_grad]
    # the peer's loss as transformers computes it (Trainer + peft), deltatune's as its engine does
    times = train_steps(model, params, args.batch, args.seq, args.steps, args.checkpointing,
                        chunked=not config.startswith("peft"))
    print(json.dumps({"config": config, "peak_rss_mb": peak_mb(), "rss_after_build_mb": built,
                      "step_seconds": times}), flush=True)


def memory(args) -> list[dict]:
    from deltatune.machine import machine_cpu, other_load

    configs = [c for c in MEMORY_CONFIGS if c in args.configs]
    rows = []
    for rnd in range(args.rounds):
        order = configs[rnd % len(configs):] + configs[:rnd % len(configs)]
        for config in order:
            cmd = [sys.executable, __file__, "memory-child", config, "--shape", args.shape, "--batch", str(args.batch),
                   "--seq", str(args.seq), "--steps", str(args.steps)] + ([] if args.checkpointing else ["--no-checkpointing"])
            before, t0 = machine_cpu(), time.perf_counter()
            start = os.times()
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **MALLOC_ENV})
            end, wall = os.times(), time.perf_counter() - t0
            own = (end.children_user - start.children_user) + (end.children_system - start.children_system)
            if proc.returncode != 0:
                raise SystemExit(f"{config}: {proc.stderr[-2000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row.update({"round": rnd, "other_load": other_load(before, machine_cpu(), own, wall),
                        "loadavg": os.getloadavg()[0]})
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


# glibc's malloc raises its mmap threshold (up to 32 MiB) each time it frees a mapped block, so freed float weights
# and activations stay in its heaps and in the RSS; a fixed threshold maps every block of 1 MiB or more and returns
# it on free (as bench/memory.py runs its children), so the RSS follows what the process holds.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1048576", "MALLOC_TRIM_THRESHOLD_": "1048576"}


def speed(args) -> dict:
    import torch

    import deltatune as dt
    from deltatune.tasks.kinds.lm_loss import causal_lm_loss

    models = {}
    for scheme in ("float32", "int8", "nf4"):
        model = build_llama(args.shape, None if scheme == "float32" else scheme)
        dt.attach(model, "lora")
        if args.checkpointing:
            from deltatune.training.memory import enable_checkpointing
            enable_checkpointing(model)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        models[scheme] = (model, torch.optim.AdamW(params, lr=1e-4))
    ids = torch.randint(3, 49152, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    times = {k: [] for k in models}
    for rnd in range(args.rounds + 1):  # round 0 warms up
        for scheme, (model, opt) in models.items():
            t0 = time.perf_counter()
            causal_lm_loss(model, {"input_ids": ids, "labels": ids}).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if rnd:
                times[scheme].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    # the ratio within each round (its steps ran back to back, under the same load), then the median over rounds
    ratios = {k: statistics.median(a / b for a, b in zip(v, times["float32"])) for k, v in times.items()}
    out = {"shape": args.shape, "batch": args.batch, "seq": args.seq, "rounds": args.rounds, "median_seconds": med,
           "ratio_to_float32": ratios, "times": times, "loadavg": os.getloadavg()[0]}
    print(json.dumps(out), flush=True)
    return out


def _lora_on(model):
    """``model`` with a trained-looking LoRA adapter (B non-zero), the same on every base (seed 0), in eval mode."""
    import torch

    import deltatune as dt

    torch.manual_seed(0)
    dt.attach(model, "lora")
    with torch.no_grad():
        for p in model.deltatune.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def serve(args) -> dict:
    """MiniLM embeddings through the server's path (a BiEncoder with a LoRA adapter unmerged), float32 vs int8."""
    import torch

    from deltatune.models import BiEncoder, load_backbone
    from deltatune.tasks import load_task

    task = load_task("code-search", seed=0)
    texts = [row["query"] if isinstance(row, dict) and "query" in row else str(row) for row in task.split("test")]
    encoders = {}
    for scheme in ("float32", "int8"):
        base, tok = load_backbone("minilm", quantize=None if scheme == "float32" else scheme)
        encoders[scheme] = _lora_on(BiEncoder(base))
    batches = [texts[i:i + args.batch] for i in range(0, args.batch * args.batches, args.batch)]
    tokenized = [tok(b, padding=True, truncation=True, max_length=args.max_len, return_tensors="pt") for b in batches]
    times, outs = {k: [] for k in encoders}, {k: [] for k in encoders}
    with torch.no_grad():
        for rnd in range(args.rounds + 1):
            for scheme, enc in encoders.items():
                t0 = time.perf_counter()
                emb = [enc(**b) for b in tokenized]
                if rnd:
                    times[scheme].append(time.perf_counter() - t0)
                else:
                    outs[scheme] = torch.cat(emb)
    n = sum(len(b) for b in batches)
    per_s = {k: n / statistics.median(v) for k, v in times.items()}
    cos = torch.nn.functional.cosine_similarity(outs["int8"], outs["float32"], dim=-1)
    out = {"model": "minilm", "texts_per_round": n, "batch": args.batch, "max_len": args.max_len, "rounds": args.rounds,
           "texts_per_second": per_s, "int8_speedup": per_s["int8"] / per_s["float32"],
           "cosine_int8_vs_float32": {"min": float(cos.min()), "median": float(cos.median())},
           "loadavg": os.getloadavg()[0]}
    print(json.dumps(out), flush=True)
    return out


def serve_gen(args) -> dict:
    """SmolLM2 (the real SmolLM2-135M-Instruct) generating with a LoRA adapter unmerged, float32 and int8 bases in
    one process, alternating rounds: every round decodes the same code-summarization prompts greedily through
    the server's decoding core (deltatune.tasks.decoding: rows join and leave one key/value cache, --batch rows
    in flight, --max-new-tokens each). Reported: new tokens per second, and how far int8's tokens are from
    float32's (prompts whose tokens are all the same; tokens equal up to the first difference)."""
    from deltatune.models import format_prompt, load_backbone
    from deltatune.tasks import load_task
    from deltatune.tasks.decoding import greedy

    task = load_task("code-summarization", seed=0)
    models, tok = {}, None
    for scheme in ("float32", "int8"):
        model, tok = load_backbone("smollm2", quantize=None if scheme == "float32" else scheme)
        models[scheme] = _lora_on(model)
    rows = task.split("test")[: args.batch * args.batches]
    prompts = [tok(format_prompt(tok, row["prompt"]), add_special_tokens=False)["input_ids"][-args.max_len:]
               for row in rows]  # chat-formatted, the end kept, as the generation task kind prompts
    eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    times, outs = {k: [] for k in models}, {}
    for rnd in range(args.rounds + 1):
        for scheme, model in models.items():
            t0 = time.perf_counter()
            made = greedy(model, prompts, max_new_tokens=args.max_new_tokens, eos=eos, rows=args.batch, device="cpu")
            if rnd:
                times[scheme].append((time.perf_counter() - t0, sum(len(m) for m in made)))
            else:
                outs[scheme] = made
    per_s = {k: statistics.median(n / t for t, n in v) for k, v in times.items()}
    same = sum(a == b for a, b in zip(outs["int8"], outs["float32"]))
    prefix = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
              for a, b in zip(outs["int8"], outs["float32"])]
    out = {"model": "smollm2", "prompts": len(prompts), "rows": args.batch, "max_len": args.max_len,
           "max_new_tokens": args.max_new_tokens, "rounds": args.rounds, "tokens_per_second": per_s,
           "int8_speedup": per_s["int8"] / per_s["float32"],
           "round_speedups": [round((n8 / t8) / (n32 / t32), 3) for (t32, n32), (t8, n8) in zip(times["float32"], times["int8"])],
           "same_tokens_prompts": same,
           "equal_prefix_tokens_median": statistics.median(prefix),
           "float32_tokens_median": statistics.median(len(m) for m in outs["float32"]), "loadavg": os.getloadavg()[0]}
    print(json.dumps(out), flush=True)
    return out


def gen_quality(args) -> dict:
    """Does int8 serving change what a trained adapter writes, as the task scores it? The adapter (--adapter: a
    `deltatune train` run's adapter folder, trained on SmolLM2 code-summarization) on the float32 and the int8
    base scores the task's test subset (--max-eval: the examples `train --max-eval` scores)
    the way the engine scores it (the generation task kind's greedy decoding, --max-new-tokens): smoothed
    BLEU-4 on each base, and the int8 - float32 difference with a 95% paired bootstrap interval over the test
    examples (each example's sentence BLEU-4 x 100, whose mean is the task's score; 2000 resamples, seed 0)."""
    import numpy as np

    import deltatune as dt
    from deltatune.metrics import sentence_bleu4, smoothed_bleu4
    from deltatune.models import load_backbone
    from deltatune.tasks.kinds import Generation
    from deltatune.training import TrainConfig
    from deltatune.training.scoring import load_task as run_task

    if not args.adapter:
        raise SystemExit("gen-quality needs --adapter DIR (a trained adapter: deltatune train --model smollm2 "
                         "--task code-summarization ... --out RUN, then --adapter RUN/best)")
    task = run_task(TrainConfig(model="smollm2", task="code-summarization", max_eval=args.max_eval))  # as train takes it
    rows = task.split("test")
    refs = [r["target"] for r in rows]
    out, per_example, made = {}, {}, {}
    for scheme in ("float32", "int8"):
        model, tok = load_backbone("smollm2", "lm", quantize=None if scheme == "float32" else scheme)
        dt.load_adapter(model, args.adapter)
        objective = Generation(tok, TrainConfig(model="smollm2", task=task.name, max_len=args.max_len,
                                                max_new_tokens=args.max_new_tokens, progress=False))
        t0 = time.perf_counter()
        preds = objective.predict(model.eval(), objective.encode(rows, train=False), args.batch, "cpu")
        out[scheme] = {"bleu4": smoothed_bleu4(refs, preds), "seconds": round(time.perf_counter() - t0, 1)}
        per_example[scheme] = 100 * np.array([sentence_bleu4(r, p) for r, p in zip(refs, preds)])
        made[scheme] = preds
    diff = per_example["int8"] - per_example["float32"]
    rng = np.random.default_rng(0)
    boot = [diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(2000)]
    same = sum(a == b for a, b in zip(made["int8"], made["float32"]))
    result = {"model": "smollm2", "task": task.name, "adapter": args.adapter, "test_examples": len(rows),
              "max_new_tokens": args.max_new_tokens, "bleu4": {k: v["bleu4"] for k, v in out.items()},
              "seconds": {k: v["seconds"] for k, v in out.items()},
              "int8_minus_float32": float(diff.mean()),
              "interval95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
              "same_predictions": same}
    print(json.dumps(result), flush=True)
    return result


def error(args) -> list[dict]:
    """How far a quantized base is from its float32 base, on the real models: the relative Frobenius error of
    the linear layers' weights (dequantized) and of the outputs (SmolLM2's logits on code-summarization prompts,
    MiniLM's embeddings of code-search queries), with and without a LoRA adapter (random non-zero weights) on top."""
    import torch

    import deltatune as dt
    from deltatune.models import BiEncoder, format_prompt, load_backbone
    from deltatune.quantize import dequantized_weight
    from deltatune.tasks import load_task
    from deltatune import sites

    rows = []
    for name, task, form in (("smollm2", "code-summarization", "lm"), ("minilm", "code-search", "base")):
        examples = load_task(task, seed=0).split("test")[:args.batch]
        outs, weights = {}, {}
        for scheme in ("float32", "nf4", "fp4", "int8"):
            base, tok = load_backbone(name, form, quantize=None if scheme == "float32" else scheme)
            texts = [format_prompt(tok, r["prompt"]) if form == "lm" else r["query"] for r in examples]
            model = base if form == "lm" else BiEncoder(base)
            batch = tok(texts, padding=True, truncation=True, max_length=args.max_len, return_tensors="pt")
            with torch.no_grad():
                bare = model.eval()(**batch)
                torch.manual_seed(0)
                dt.attach(model, "lora")
                for p in model.deltatune.parameters():
                    p.add_(torch.randn_like(p) * 0.02)
                adapted = model.eval()(**batch)
            pick = (lambda o: o.logits[batch["attention_mask"].bool()]) if form == "lm" else (lambda o: o)
            outs[scheme] = (pick(bare), pick(adapted))
            layers = {n: m for n, m in model.named_modules() if sites.quantized(m) is not None}
            weights[scheme] = layers
            if scheme == "float32":
                floats = {n: m.weight.detach() for n, m in model.named_modules() if type(m) is torch.nn.Linear}
        for scheme in ("nf4", "fp4", "int8"):
            num = sum(float((dequantized_weight(m) - floats[n]).norm() ** 2) for n, m in weights[scheme].items())
            den = sum(float(floats[n].norm() ** 2) for n in weights[scheme])
            rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
            row = {"model": name, "scheme": scheme, "layers": len(weights[scheme]), "weight_rel_error": (num / den) ** 0.5,
                   "output_rel_error": rel(outs[scheme][0], outs["float32"][0]),
                   "output_rel_error_with_lora": rel(outs[scheme][1], outs["float32"][1]), "texts": len(texts),
                   "max_len": args.max_len}
            if form == "base":
                cos = torch.nn.functional.cosine_similarity(outs[scheme][1], outs["float32"][1], dim=-1)
                row["cosine_with_lora_min"] = float(cos.min())
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def libs(args) -> None:
    """bitsandbytes and torchao on the same model: RSS after the build (one child each) and, in one process,
    alternating steps; LoRA as plain hooks (torchao's tensors break reshape and strided slices, which deltatune's
    base fingerprint takes)."""
    for lib, scheme in (("float", "float32"), ("bnb", "nf4"), ("torchao", "nf4"), ("bnb", "int8"), ("torchao", "int8")):
        cmd = [sys.executable, __file__, "libs-child", lib, scheme, "--shape", args.shape, "--batch", str(args.batch),
               "--seq", str(args.seq), "--steps", str(args.steps)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **MALLOC_ENV})
        print(proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 else
              json.dumps({"lib": lib, "scheme": scheme, "error": proc.stderr.strip().splitlines()[-1][:300]}), flush=True)


def libs_child(lib: str, scheme: str, args) -> None:
    if lib == "float":
        model = build_llama(args.shape, None)
    elif lib == "bnb":
        model = build_llama(args.shape, scheme)
    else:
        model = build_llama(args.shape, scheme, lib="torchao")
    built = rss_mb()
    for p in model.parameters():
        p.requires_grad_(False)
    params = lora_hooks(model)
    times = train_steps(model, params, args.batch, args.seq, args.steps, False)
    print(json.dumps({"lib": lib, "scheme": scheme, "rss_after_build_mb": built, "peak_rss_mb": peak_mb(),
                      "step_seconds": times, "step_median": statistics.median(times[1:] or times)}), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__)
    ap.add_argument("mode", choices=["memory", "speed", "serve", "serve-gen", "gen-quality", "error", "libs", "memory-child",
                                     "libs-child"])
    ap.add_argument("extra", nargs="*", help=argparse.SUPPRESS)
    ap.add_argument("--shape", default="smollm2-360m", choices=list(SHAPES))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--batches", type=int, default=4, help="serve: batches per round")
    ap.add_argument("--max-len", type=int, default=128, help="serve: tokens per text (serve-gen: per prompt)")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="serve-gen: tokens generated per prompt, at most")
    ap.add_argument("--adapter", help="gen-quality: a trained SmolLM2 code-summarization adapter folder")
    ap.add_argument("--max-eval", type=int, default=40, help="gen-quality: test examples (the task's seeded subset)")
    ap.add_argument("--configs", default=",".join(MEMORY_CONFIGS), help="memory: which configurations")
    ap.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    ap.add_argument("--json", help="append the results to this file (JSON lines)")
    args = ap.parse_args(argv)
    if args.mode == "memory-child":
        return memory_child(" ".join(args.extra), args)
    if args.mode == "libs-child":
        return libs_child(args.extra[0], args.extra[1], args)
    out = {"memory": memory, "speed": speed, "serve": serve, "serve-gen": serve_gen, "gen-quality": gen_quality,
           "error": error,
           "libs": libs}[args.mode](args)
    if args.json and out is not None:
        with open(args.json, "a") as f:
            for row in out if isinstance(out, list) else [out]:
                f.write(json.dumps({"mode": args.mode, **row}) + "\n")


if __name__ == "__main__":
    main()
