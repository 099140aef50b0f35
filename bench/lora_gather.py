#!/usr/bin/env python
"""The gathered LoRA matmul (deltatune.mechanisms._gathered) against one pair of matmuls per adapter, in process.

    .venv/bin/python bench/lora_gather.py --rounds 20            # SmolLM2, 8 LoRA adapters, 8 rows
    .venv/bin/python bench/lora_gather.py --model tiny-llama --rounds 3

A batch of --rows rows, each routed to one of --adapters LoRA adapters (r 8 on q, v; random non-zero weights),
runs a decode pass (one new token per row, after a --prompt-tokens prefill kept in a key/value cache) and a
prefill pass, with the gathered path on and off (off: _gathered returns every entry untouched), alternating
A B A B within each round; medians and the median per-round ratio. Outputs of the two paths are compared too.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import deltatune as dt  # noqa: E402
from deltatune import mechanisms  # noqa: E402
from deltatune.models import load_backbone  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, _ = load_backbone(args.model, "lm")
    names = [f"a{i}" for i in range(args.adapters)]
    g = torch.Generator().manual_seed(0)
    for name in names:
        dt.attach(model, "lora", adapter=name)
        with torch.no_grad():
            for p in model.deltatune.adapters[name].parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    model.eval()
    routed = [names[i % len(names)] for i in range(args.rows)]
    vocab = model.config.vocab_size
    prompt = torch.randint(3, vocab, (args.rows, args.prompt_tokens), generator=g)
    step = torch.randint(3, vocab, (args.rows, 1), generator=g)
    real = mechanisms._gathered
    paths = {"gathered": real, "per adapter": lambda out, x, live: (out, live)}
    with torch.inference_mode(), dt.routing(model, routed):
        cache = model(input_ids=prompt, use_cache=True).past_key_values
        outs = {}
        times = {(k, what): [] for k in paths for what in ("decode", "prefill")}
        for rnd in range(args.rounds + 1):
            for k in (paths if rnd % 2 else dict(reversed(paths.items()))):
                mechanisms._gathered = paths[k]
                for what in ("decode", "prefill"):
                    t0 = time.perf_counter()
                    if what == "decode":
                        for layer in range(len(cache.layers)):  # the same cache length every time
                            cache.layers[layer].keys = cache.layers[layer].keys[:, :, :args.prompt_tokens]
                            cache.layers[layer].values = cache.layers[layer].values[:, :, :args.prompt_tokens]
                        out = model(input_ids=step, past_key_values=cache, use_cache=True).logits
                    else:
                        out = model(input_ids=prompt).logits[:, -1]
                    if rnd:
                        times[(k, what)].append(time.perf_counter() - t0)
                    outs[(k, what)] = out
        mechanisms._gathered = real
    print(f"{args.model}, {args.adapters} LoRA adapters (r 8 on q, v), {args.rows} rows, prompts of {args.prompt_tokens} "
          f"tokens, {args.threads} threads, {args.rounds} alternating rounds, load {os.getloadavg()[0]:.1f}")
    for what in ("decode", "prefill"):
        a, b = times[("gathered", what)], times[("per adapter", what)]
        ratio = statistics.median(x / y for x, y in zip(a, b))
        diff = float((outs[("gathered", what)] - outs[("per adapter", what)]).abs().max())
        print(f"  {what:8s} gathered {1e3 * statistics.median(a):8.1f} ms  per adapter {1e3 * statistics.median(b):8.1f} ms  "
              f"ratio {ratio:.3f}  (max |logit difference| {diff:.2e})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
