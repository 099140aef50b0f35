"""Serving benchmark (issue 14): mixed-adapter batches vs a merged single adapter vs swapping adapters,
and the HTTP server's requests per second and latency under concurrent clients.

    .venv/bin/python bench/serving.py                 # MiniLM, writes the Measured section of docs/serving.md
    .venv/bin/python bench/serving.py --quick --model tiny-bert --no-write   # a smoke run

Part 1 (in process, no HTTP). A stream of R requests (short code-search queries and code lines,
from deltatune's own source) whose adapters are drawn uniformly from N LoRA adapters (r=8 on q, v;
random non-zero weights: speed does not depend on training). Rows are taken in arrival order in
windows of B (the server's max batch):

- mixed: each window is ONE forward pass with per-row routing (dt.routing);
- merged: one adapter merged into the base weights (dt.merge), windows of B: the zero-overhead
  single-task model, the ceiling;
- swap: within each window, rows grouped by adapter, one forward per adapter with it active
  (dt.use), i.e. swapping adapters between batches with the same latency budget;
- per-request: one forward per request with its adapter active (batch 1).

Configurations alternate round by round (--rounds) so a load change on a shared machine hits all of
them alike; the medians are reported, with the machine's load average.

Part 2 (HTTP). ``deltatune serve`` in a subprocess with 8 LoRA adapters (saved to a temporary
folder); C asyncio clients (httpx) each send embed requests for random adapters back to back for
--seconds; requests per second and p50/p99 latency, for each C in --clients.

Part 3 (``--generation``: generation over HTTP, issue 25; writes its own section). A causal LM
(``--gen-model``, SmolLM2 by default) with --gen-adapters LoRA adapters (random non-zero weights,
saved to a temporary folder), served by ``deltatune serve`` in subprocesses with ``--batching
continuous`` and with ``--batching static``, and, with ``--reference``, by ``transformers serve
--continuous-batching`` on adapter 0 merged into the base (``dt.compose.fold_into_base``): the
single model a user would otherwise pick. Requests arrive as a Poisson process at each --rates
(requests per second, the same arrival times and requests for every server), each for a random
adapter (deltatune) and streamed: the prompt is "Summarize this Python function in one line." and a
function of the code-summarization test split (its first --gen-prompt-tokens tokens), the token
limit twice its docstring summary's tokens (clamped to 16..96); generation is greedy and stops at
the model's end token or that limit. Per server and rate: output tokens per second (all tokens over
the span from the first arrival to the last answer), time to first token and time per output token
after the first (p50, p99 over requests). The servers alternate within each round.

``--gen-mixed`` adds a deltatune continuous-batching server whose --gen-adapters adapters are of mixed
methods (LoRA, prefix tuning and prompt tuning in turn; random non-zero weights), so rows of different
mechanisms share every decode pass. ``--peft`` adds peft's mixed-adapter batching as a user without a
server writes it: the same LoRA adapters written in the PEFT format, loaded into one ``PeftModel`` (a
fresh copy of the base, in this process, with the servers' thread count), and the requests taken in
arrival order: whenever generate is idle, every request that has arrived (up to --window) becomes one
``generate(..., adapter_names=[...])`` call, left-padded, greedy, each row stopping at its own token limit
or the end token. Its rows are timed as if streamed: a row's first token at the first decode step of its
call (a logits processor stamps every step), its last at the step that made it.
"""
from __future__ import annotations

import argparse
import asyncio
import inspect
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import deltatune as dt  # noqa: E402
from deltatune.models import BiEncoder, load_backbone  # noqa: E402

LOADS: list[float] = []  # the 1-minute load average after every round and server row


def _load_now() -> float:
    LOADS.append(os.getloadavg()[0])
    return LOADS[-1]


MIXED_METHODS = [("lora", {}), ("ia3", {}), ("prefix", {"length": 10}), ("prompt", {"length": 10, "init": "random"}),
                 ("pfeiffer", {}), ("parallel", {}), ("houlsby", {"train_ln": False}), ("mam", {})]


GEN_MIXED = [("lora", {}), ("prefix", {"length": 10}), ("prompt", {"length": 10, "init": "random"})]


def texts(n: int, seed: int = 0) -> list[str]:
    """Realistic inputs: docstring first lines and source lines of deltatune itself, 4 to 40 words."""
    pool = []
    for path in sorted((ROOT / "deltatune").rglob("*.py")):
        for line in path.read_text().splitlines():
            words = line.strip().split()
            if 4 <= len(words) <= 40:
                pool.append(" ".join(words))
    rng = random.Random(seed)
    return [rng.choice(pool) for _ in range(n)]


def randomize(module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)


def build(model_name: str, methods: list[tuple[str, dict]]):
    backbone, tok = load_backbone(model_name, "base")
    enc = BiEncoder(backbone).eval()
    names = []
    for i, (method, options) in enumerate(methods):
        name = f"a{i}"
        dt.attach(enc, method, adapter=name, **options)
        randomize(enc.deltatune.adapters[name], seed=i)
        names.append(name)
    dt.fold(enc)  # what a saved adapter loads as: training-only parts (the prefix MLP) folded away
    dt.set_active(enc)
    return enc, tok, names


def forward(enc, tok, rows: list[str]) -> torch.Tensor:
    batch = tok(rows, padding=True, truncation=True, max_length=128, return_tensors="pt")
    return enc.backbone(**batch).last_hidden_state


def run_mixed(enc, tok, requests, window):
    for start in range(0, len(requests), window):
        chunk = requests[start:start + window]
        with dt.routing(enc, [a for a, _ in chunk]):
            forward(enc, tok, [t for _, t in chunk])


def run_swap(enc, tok, requests, window):
    for start in range(0, len(requests), window):
        groups: dict[str, list[str]] = {}
        for a, t in requests[start:start + window]:
            groups.setdefault(a, []).append(t)
        for a, rows in groups.items():
            with dt.use(enc, a):
                forward(enc, tok, rows)


def run_per_request(enc, tok, requests, window):
    for a, t in requests:
        with dt.use(enc, a):
            forward(enc, tok, [t])


def run_plain(enc, tok, requests, window):
    for start in range(0, len(requests), window):
        forward(enc, tok, [t for _, t in requests[start:start + window]])


def part1(args) -> list[dict]:
    inputs = texts(args.requests)
    setups = {f"{n} LoRA": [("lora", {})] * n for n in args.adapters}
    setups["8 mixed methods"] = MIXED_METHODS
    models = {}
    for label, methods in setups.items():
        enc, tok, names = build(args.model, methods)
        rng = random.Random(1)
        models[label] = (enc, tok, [(rng.choice(names), t) for t in inputs])
    merged, tok, _ = build(args.model, [("lora", {})])
    dt.set_active(merged, "a0")
    dt.merge(merged)
    plans = [("merged", "1 LoRA", None)]
    for label in setups:
        plans += [("mixed", label, run_mixed), ("swap", label, run_swap)]
        if args.per_request:
            plans.append(("per-request", label, run_per_request))
    times: dict[tuple[str, str], list[float]] = {(k, label): [] for k, label, _ in plans}
    with torch.inference_mode():
        for round_ in range(args.rounds + 1):  # round 0 warms up
            order = plans if round_ % 2 else list(reversed(plans))
            for kind, label, fn in order:
                if kind == "merged":
                    enc, tok2, reqs = merged, tok, next(iter(models.values()))[2]  # the same texts, one adapter
                    fn = run_plain
                else:
                    enc, tok2, reqs = models[label]
                start = time.perf_counter()
                fn(enc, tok2, reqs, args.window)
                if round_:
                    times[(kind, label)].append(time.perf_counter() - start)
            print(f"round {round_}/{args.rounds} done, load {_load_now():.1f}", file=sys.stderr)
    rows = []
    for (kind, label), ts in times.items():
        med = statistics.median(ts)
        rows.append({"setup": label if kind != "merged" else "1 LoRA merged", "strategy": kind,
                     "seconds": med, "rps": args.requests / med, "runs": len(ts)})
    return rows


async def _client(base: str, names: list[str], inputs: list[str], until: float, latencies: list, codes: dict, seed: int):
    import httpx

    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        while time.monotonic() < until:
            body = {"text": rng.choice(inputs)}
            start = time.monotonic()
            r = await client.post(f"/v1/adapters/{rng.choice(names)}/embed", json=body)
            codes[r.status_code] = codes.get(r.status_code, 0) + 1
            if r.status_code == 200:
                latencies.append(time.monotonic() - start)
            elif r.status_code == 429:
                await asyncio.sleep(float(r.headers.get("retry-after", "1")))


def part2(args) -> list[dict]:
    import httpx

    from tests.serving import free_port

    inputs = texts(512, seed=2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        enc, _, names = build(args.model, [("lora", {})] * 8)
        flags = []
        for name in names:
            dt.save_adapter(enc, Path(tmp) / name, adapter=name)
            flags += ["--adapter", f"{name}={Path(tmp) / name}"]
        del enc
        for max_batch in args.server_batches:
            sock = free_port()
            port = sock.getsockname()[1]
            sock.close()
            cmd = [sys.executable, "-m", "deltatune", "serve", "--model", args.model, "--port", str(port),
                   "--max-batch", str(max_batch), "--max-wait-ms", str(args.max_wait_ms), "--queue", "1024", *flags]
            proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.DEVNULL)
            base = f"http://127.0.0.1:{port}"
            try:
                for _ in range(1200):
                    try:
                        httpx.get(base + "/health", timeout=1)
                        break
                    except httpx.TransportError:
                        time.sleep(0.1)
                for clients in args.clients:
                    latencies, codes = [], {}
                    asyncio.run(_load(base, names, inputs, 2.0, clients, [], {}))  # warm up
                    start = time.monotonic()
                    asyncio.run(_load(base, names, inputs, args.seconds, clients, latencies, codes))
                    wall = time.monotonic() - start
                    latencies.sort()
                    q = lambda f: latencies[min(len(latencies) - 1, int(f * len(latencies)))] * 1000  # noqa: E731
                    rows.append({"max_batch": max_batch, "clients": clients, "rps": len(latencies) / wall, "load": _load_now(),
                                 "p50_ms": q(0.50), "p99_ms": q(0.99), "ok": len(latencies),
                                 "other": {k: v for k, v in codes.items() if k != 200}})
                    print(f"server max_batch={max_batch} clients={clients}: {rows[-1]}", file=sys.stderr)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    return rows


async def _load(base, names, inputs, seconds, clients, latencies, codes):
    until = time.monotonic() + seconds
    await asyncio.gather(*(_client(base, names, inputs, until, latencies, codes, seed) for seed in range(clients)))


# ------------------------------------------------------------------------------------------- part 3: generation

def gen_workload(args, tokenizer) -> list[dict]:
    """The requests of one run: prompt, token limit and adapter index, from the code-summarization test split."""
    from deltatune.tasks import load_task

    rows = load_task("code-summarization").test
    rng = random.Random(7)
    picked = [rows[i] for i in rng.sample(range(len(rows)), args.gen_requests)]
    out = []
    for i, row in enumerate(picked):
        code = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"][:args.gen_prompt_tokens]
        limit = len(tokenizer(row["target"], add_special_tokens=False)["input_ids"])
        out.append({"prompt": "Summarize this Python function in one line.\n\n" + tokenizer.decode(code),
                    "max_new_tokens": max(16, min(96, 2 * limit)), "adapter": rng.randrange(args.gen_adapters)})
    return out


def gen_arrivals(n: int, rate: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    at, out = 0.0, []
    for _ in range(n):
        out.append(at)
        at += rng.expovariate(rate)
    return out


async def _gen_one(client, server: dict, request: dict, start: float, at: float, names: list[str]) -> dict:
    """One streamed request at its arrival time: (sent, first token, end, tokens), seconds from ``start``."""
    import json as _json

    await asyncio.sleep(max(0.0, start + at - time.monotonic()))
    sent, first, tokens, status = time.monotonic(), None, 0, 200
    if server["kind"] == "deltatune":
        url = f"{server['base']}/v1/adapters/{names[request['adapter']]}/generate"
        body = {"prompt": request["prompt"], "max_new_tokens": request["max_new_tokens"], "stream": True}
    else:  # transformers serve: OpenAI chat, one user turn (the same chat template our generate applies)
        url = f"{server['base']}/v1/chat/completions"
        body = {"model": server["model"], "messages": [{"role": "user", "content": request["prompt"]}], "stream": True,
                "max_tokens": request["max_new_tokens"], "temperature": 0}
    async with client.stream("POST", url, json=body) as r:
        status = r.status_code
        async for line in r.aiter_lines():
            line = line.strip()
            if not line:
                continue
            if server["kind"] == "deltatune":
                msg = _json.loads(line)
                if "token" in msg and first is None:
                    first = time.monotonic()
                if msg.get("done"):
                    tokens = msg["tokens"]
            elif line.startswith("data: ") and line != "data: [DONE]":
                msg = _json.loads(line[6:])
                choices = msg.get("choices") or []
                if choices and choices[0].get("delta", {}).get("content"):
                    first = first or time.monotonic()
                    tokens += 1
                if msg.get("usage"):
                    tokens = msg["usage"].get("completion_tokens", tokens)
    end = time.monotonic()
    return {"sent": sent - start, "first": (first or end) - start, "end": end - start, "tokens": tokens, "status": status}


async def _gen_run(server: dict, requests: list[dict], arrivals: list[float], names: list[str]) -> list[dict]:
    import httpx

    async with httpx.AsyncClient(timeout=3600) as client:
        start = time.monotonic()
        return await asyncio.gather(*(_gen_one(client, server, r, start, at, names) for r, at in zip(requests, arrivals)))


class _Steps:
    """A logits processor that stamps the time of every generation step (step k: token k+1 is chosen)."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.monotonic())
        return scores


class _OwnLimits:
    """Stop each row at its own token limit (peft's generate takes one max_new_tokens for the batch)."""

    def __init__(self, start: int, limits: list[int]):
        self.start, self.limits = start, torch.tensor(limits)

    def __call__(self, input_ids, scores, **kwargs):
        return (input_ids.shape[1] - self.start) >= self.limits


def peft_model(args, folders: dict[str, Path]):
    """A fresh base with every adapter loaded through peft (PEFT-format files), and its tokenizer."""
    from peft import PeftModel

    base, tok = load_backbone(args.gen_model, "lm")
    names = list(folders)
    model = PeftModel.from_pretrained(base, str(folders[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(folders[name]), adapter_name=name)
    return model.eval(), tok


def peft_run(model, tok, requests: list[dict], arrivals: list[float], names: list[str], window: int) -> list[dict]:
    """Static batching with peft's generate(adapter_names=...): whatever has arrived when generate is idle."""
    from transformers import LogitsProcessorList, StoppingCriteriaList

    from deltatune.models import format_prompt

    tok.padding_side = "left"
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    start, results, i = time.monotonic(), [None] * len(requests), 0
    with torch.inference_mode():
        while i < len(requests):
            now = time.monotonic() - start
            if arrivals[i] > now:
                time.sleep(arrivals[i] - now)
                now = time.monotonic() - start
            take = [j for j in range(i, min(len(requests), i + window)) if arrivals[j] <= now]
            i = take[-1] + 1
            batch = tok([format_prompt(tok, requests[j]["prompt"]) for j in take], return_tensors="pt", padding=True,
                        add_special_tokens=False)
            limits = [requests[j]["max_new_tokens"] for j in take]
            steps = _Steps()
            width = batch["input_ids"].shape[1]
            out = model.generate(**batch, adapter_names=[names[requests[j]["adapter"]] for j in take],
                                 max_new_tokens=max(limits), do_sample=False, pad_token_id=pad,
                                 eos_token_id=tok.eos_token_id, logits_processor=LogitsProcessorList([steps]),
                                 stopping_criteria=StoppingCriteriaList([_OwnLimits(width, limits)]))
            for row, j in enumerate(take):
                made = out[row, width:].tolist()[:limits[row]]
                n = made.index(tok.eos_token_id) if tok.eos_token_id in made else len(made)
                last = steps.times[min(max(n, 1), len(steps.times)) - 1]
                results[j] = {"sent": arrivals[j], "first": steps.times[0] - start, "end": last - start, "tokens": n,
                              "status": 200}
    return results


def _quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def gen_summary(results: list[dict]) -> dict:
    ok = [r for r in results if r["status"] == 200 and r["tokens"] > 0]
    if not ok:
        raise SystemExit(f"every request failed: {results[:3]}")
    span = max(r["end"] for r in ok) - min(r["sent"] for r in ok)
    ttft = [r["first"] - r["sent"] for r in ok]
    tpot = [(r["end"] - r["first"]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1]
    return {"tokens_per_s": sum(r["tokens"] for r in ok) / span, "tokens": sum(r["tokens"] for r in ok),
            "ttft_p50": _quantile(ttft, 0.5), "ttft_p99": _quantile(ttft, 0.99), "tpot_p50": _quantile(tpot, 0.5),
            "tpot_p99": _quantile(tpot, 0.99), "ok": len(ok), "failed": len(results) - len(ok)}


def _start(cmd: list[str], base: str, env=None):
    import httpx

    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    for _ in range(6000):
        if proc.poll() is not None:
            raise SystemExit(f"server {cmd[:4]} exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            httpx.get(base + ("/health" if "deltatune" in cmd else "/v1/models"), timeout=2)
            return proc
        except httpx.TransportError:
            time.sleep(0.1)
    raise SystemExit(f"server {cmd[:4]} did not start")


def part3(args) -> list[dict]:
    from tests.serving import free_port

    lm, tok = load_backbone(args.gen_model, "lm")
    requests = gen_workload(args, tok)
    servers, procs, threads = [], [], torch.get_num_threads()
    # every server gets the same threads; on a machine whose cores other jobs keep busy, 2 OpenMP threads
    # wait for each other at every parallel region (tens of ms per attention call), so 1 is the default
    env = {**os.environ, "OMP_NUM_THREADS": str(args.gen_threads), "MKL_NUM_THREADS": str(args.gen_threads),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        names = [f"lora{i}" for i in range(args.gen_adapters)]
        flags = []
        for i, name in enumerate(names):
            dt.attach(lm, "lora", adapter=name)
            randomize(lm.deltatune.adapters[name], seed=100 + i)
            dt.save_adapter(lm, Path(tmp) / name, adapter=name)
            flags += ["--adapter", f"{name}={Path(tmp) / name}"]
        peft_folders = {}
        if args.peft:
            for name in names:
                peft_folders[name] = Path(tmp) / "peft" / name
                dt.save_adapter(lm, peft_folders[name], adapter=name, format="peft")
        mixed_flags = []
        if args.gen_mixed:
            for i, (method, options) in enumerate(GEN_MIXED[i % len(GEN_MIXED)] for i in range(args.gen_adapters)):
                name = f"mixed{i}"
                dt.attach(lm, method, adapter=name, **options)
                randomize(lm.deltatune.adapters[name], seed=200 + i)
                dt.save_adapter(lm, Path(tmp) / name, adapter=name)
                dt.detach(lm, name)
                mixed_flags += ["--adapter", f"{name}={Path(tmp) / name}"]
        try:
            for batching, adapter_flags, label in [*[(b, flags, "LoRA") for b in args.gen_batching],
                                                   *([("continuous", mixed_flags, "mixed-method")] if args.gen_mixed else [])]:
                sock = free_port()
                port = sock.getsockname()[1]
                sock.close()
                base = f"http://127.0.0.1:{port}"
                procs.append(_start([sys.executable, "-m", "deltatune", "serve", "--model", args.gen_model, "--port",
                                     str(port), "--batching", batching, "--max-batch", str(args.window), "--queue", "4096",
                                     "--timeout", "3600", "--max-len", str(args.gen_prompt_tokens + 64), *adapter_flags],
                                    base, env))
                servers.append({"name": f"deltatune {batching}, {args.gen_adapters} {label} adapters mixed",
                                "kind": "deltatune", "base": base,
                                "names": names if adapter_flags is flags else [f"mixed{i}" for i in range(len(names))]})
            if args.reference:
                for name in names[1:]:
                    dt.detach(lm, name)
                dt.compose.fold_into_base(lm, names[0])
                folder = dt.compose.save_folded(lm, Path(tmp) / "merged", tok)
                sock = free_port()
                port = sock.getsockname()[1]
                sock.close()
                base = f"http://127.0.0.1:{port}"
                cli = Path(sys.executable).with_name("transformers")
                procs.append(_start([str(cli), "serve", str(folder), "--continuous-batching", "--device", "cpu",
                                     "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"], base, env))
                servers.append({"name": "transformers serve --continuous-batching, 1 LoRA merged", "kind": "transformers",
                                "base": base, "model": str(folder)})
            del lm
            if args.peft:
                torch.set_num_threads(args.gen_threads)
                pm, ptok = peft_model(args, peft_folders)
                servers.append({"name": f"peft generate(adapter_names=...), {args.gen_adapters} LoRA mixed, static "
                                        "batches", "kind": "peft", "model": pm, "tok": ptok})
            warm = requests[:1]
            for server in servers:  # first requests pay for lazy loading; not timed
                if server["kind"] == "peft":
                    peft_run(server["model"], server["tok"], warm, [0.0], names, args.window)
                else:
                    asyncio.run(_gen_run(server, warm, [0.0], server.get("names", names)))
            rows = []
            for rate in args.rates:
                arrivals = gen_arrivals(len(requests), rate, seed=int(rate * 1000))
                for rnd in range(args.gen_rounds):
                    order = servers if rnd % 2 == 0 else servers[::-1]
                    for server in order:
                        load = _load_now()
                        if server["kind"] == "peft":
                            got = peft_run(server["model"], server["tok"], requests, arrivals, names, args.window)
                        else:
                            got = asyncio.run(_gen_run(server, requests, arrivals, server.get("names", names)))
                        result = gen_summary(got)
                        rows.append({"server": server["name"], "rate": rate, "round": rnd, "load": load,
                                     "load_after": _load_now(), **result})
                        print(f"generation {server['name']} rate={rate} round={rnd}: {rows[-1]}", file=sys.stderr)
        finally:
            torch.set_num_threads(threads)
            for proc in procs:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    return rows


def gen_markdown(args, rows: list[dict], load_before: float, load_after: float) -> str:
    keys = ["tokens_per_s", "ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99"]
    table = {}
    for r in rows:
        table.setdefault((r["rate"], r["server"]), []).append(r)
    loads = [x for r in rows for x in (r["load"], r["load_after"])]
    out = [f"Measured by `bench/serving.py` ({' '.join(sys.argv[1:])}) on {args.gen_model}, torch {torch.__version__}, "
           f"{args.gen_threads} thread(s) per server, {os.cpu_count()} CPUs, {args.gen_requests} requests per rate and server "
           f"(prompts of up to {args.gen_prompt_tokens} code tokens, token limits 16..96), greedy. 1-minute load average "
           f"{load_before:.1f} before, {load_after:.1f} after, {min(loads, default=0):.1f} to {max(loads, default=0):.1f} "
           f"around the runs (all processes, the benchmark's own included), on {os.cpu_count()} CPUs"
           + ("; the machine was shared with other jobs, so absolute numbers are low and noisy"
              if max([load_before, load_after, *loads]) > os.cpu_count() + 1 else "")
           + ". The servers ran one after another in each round (the order reversed every other round), on the "
           f"same requests and arrival times; each number is the median of {args.gen_rounds} round(s).", "",
           "| rate (req/s) | server | output tokens/s | TTFT p50 s | TTFT p99 s | TPOT p50 s | TPOT p99 s | load |",
           "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for (rate, server), rs in table.items():
        med = {k: statistics.median(r[k] for r in rs) for k in keys}
        failed = sum(r["failed"] for r in rs)
        out.append(f"| {rate:g} | {server}{f' ({failed} failed)' if failed else ''} | {med['tokens_per_s']:.2f} | "
                   f"{med['ttft_p50']:.2f} | {med['ttft_p99']:.2f} | {med['tpot_p50']:.3f} | {med['tpot_p99']:.3f} | "
                   f"{statistics.median(r['load'] for r in rs):.1f} |")
    return "\n".join(out) + "\n"


def markdown(args, part1_rows, part2_rows, load_before, load_after) -> str:
    out = [f"Measured by `bench/serving.py` ({' '.join(sys.argv[1:]) or 'defaults'}) on {args.model}, "
           f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs. "
           + (f"The machine was busy (load average {load_before:.1f} before, {load_after:.1f} after, "
              f"{min(LOADS, default=load_after):.1f} to {max(LOADS, default=load_after):.1f} during the run, "
              "1-minute, all processes), so absolute numbers are low and noisy; the ratios between configurations "
              "that alternated are what this run measures" if max([load_before, load_after, *LOADS]) > os.cpu_count()
              else f"Load average {load_before:.1f} before and {load_after:.1f} after (1-minute, all processes; the "
              "benchmark itself adds up to its thread count)")
           + f"; the configurations alternated round by round and each number is the median of {args.rounds} rounds.", ""]
    if part1_rows:
        ceiling = next(r for r in part1_rows if r["strategy"] == "merged")["rps"]
        out += [f"### Throughput: {args.requests} requests, windows of {args.window} rows (in process)", "",
                "| adapters | strategy | requests/s | vs merged single adapter | vs swap | vs per-request |",
                "| --- | --- | ---: | ---: | ---: | ---: |"]
        swap = {r["setup"]: r["rps"] for r in part1_rows if r["strategy"] == "swap"}
        single = {r["setup"]: r["rps"] for r in part1_rows if r["strategy"] == "per-request"}
        for r in part1_rows:
            vs_swap = f"{r['rps'] / swap[r['setup']]:.2f}x" if r["setup"] in swap else ""
            vs_one = f"{r['rps'] / single[r['setup']]:.2f}x" if r["setup"] in single else ""
            out.append(f"| {r['setup']} | {r['strategy']} | {r['rps']:.1f} | {r['rps'] / ceiling:.0%} | {vs_swap} | "
                       f"{vs_one} |")
        out.append("")
    if part2_rows:
        out += [f"### Server: embed requests over HTTP on 127.0.0.1, 8 LoRA adapters, {args.seconds:g} s per row", "",
                f"Clients are asyncio tasks (httpx) in one process, each sending its next request when the last "
                f"returns, to a random adapter; `--max-wait-ms {args.max_wait_ms:g}`.", "",
                "| max batch | clients | requests/s | p50 ms | p99 ms | non-200 |", "| ---: | ---: | ---: | ---: | ---: | --- |"]
        for r in part2_rows:
            out.append(f"| {r['max_batch']} | {r['clients']} | {r['rps']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
                       f"{r['other'] or '-'} |")
        out.append("")
    return "\n".join(out)


def write(doc: Path, text: str, tag: str = "bench") -> None:
    from results import fill_section
    fill_section(doc, tag, text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=inspect.cleandoc(__doc__).splitlines()[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--adapters", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--window", type=int, default=32, help="rows per batch (the server's max batch)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--per-request", action="store_true", help="also time one forward per request, the adapter "
                   "swapped in for each (the baseline of the 3x goal)")
    p.add_argument("--clients", type=int, nargs="+", default=[8, 32])
    p.add_argument("--server-batches", type=int, nargs="+", default=[32, 1])
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--skip-server", action="store_true")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    p.add_argument("--no-write", action="store_true", help="print the section instead of writing docs/serving.md")
    g = p.add_argument_group("part 3: generation (--generation)")
    g.add_argument("--generation", action="store_true", help="run part 3 only and write its section")
    g.add_argument("--gen-model", default="smollm2")
    g.add_argument("--gen-adapters", type=int, default=8)
    g.add_argument("--gen-requests", type=int, default=16)
    g.add_argument("--gen-prompt-tokens", type=int, default=128, help="code tokens per prompt, at most")
    g.add_argument("--gen-rounds", type=int, default=1)
    g.add_argument("--gen-batching", nargs="+", default=["continuous", "static"], choices=["continuous", "static"])
    g.add_argument("--rates", type=float, nargs="+", default=[0.2, 0.5], help="Poisson arrival rates, requests/s")
    g.add_argument("--reference", action="store_true", help="also transformers serve --continuous-batching")
    g.add_argument("--gen-mixed", action="store_true", help="also a continuous server of mixed methods (LoRA, prefix, "
                                                            "prompt)")
    g.add_argument("--peft", action="store_true", help="also peft's generate(adapter_names=...) in static batches")
    g.add_argument("--gen-threads", type=int, default=1, help="torch threads of every server (OMP_NUM_THREADS)")
    p.add_argument("--raw", default=str(ROOT / "docs" / "bench" / "serving.json"),
                   help="where the raw results go (JSON; default docs/bench/serving.json; '' for nowhere)")
    args = p.parse_args(argv)
    if args.quick:
        args.adapters, args.requests, args.rounds, args.clients, args.seconds = [1, 8], 64, 1, [4], 2.0
        args.server_batches = [8]
    load_before = os.getloadavg()[0]
    if args.generation:
        rows = part3(args)
        text = gen_markdown(args, rows, load_before, os.getloadavg()[0])
        print(text)
        if not args.no_write:
            import json

            if args.raw:
                raw = Path(args.raw).with_name("serving-generation.json")
                raw.write_text(json.dumps({"argv": sys.argv[1:], "model": args.gen_model, "torch": torch.__version__,
                                           "cpus": os.cpu_count(), "load_before": load_before, "rows": rows}, indent=2) + "\n")
            write(ROOT / "docs" / "serving.md", text, "generation")
        return 0
    rows1 = [] if args.skip_throughput else part1(args)
    rows2 = [] if args.skip_server else part2(args)
    text = markdown(args, rows1, rows2, load_before, os.getloadavg()[0])
    print(text)
    if args.raw and not args.no_write:
        import json

        Path(args.raw).write_text(json.dumps({"argv": sys.argv[1:], "model": args.model, "torch": torch.__version__,
                                              "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                                              "load_before": load_before, "loads": LOADS, "throughput": rows1,
                                              "server": rows2}, indent=2) + "\n")
    if not args.no_write:
        write(ROOT / "docs" / "serving.md", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
