"""From timings to the page: aggregation, paired per-step ratios, tables, goals and the report."""
from __future__ import annotations

import os
import platform
import statistics
from pathlib import Path

from configs import BN_REDUCTION, CONFIGS, LORA_ALPHA, LORA_R, N_VIRTUAL, PREFIX_MLP, ROOT, SIZES

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


def fill_section(doc: Path, tag: str, text: str) -> None:
    """Replace what stands between ``<!-- TAG:start -->`` and ``<!-- TAG:end -->`` in ``doc``."""
    start, end = f"<!-- {tag}:start -->", f"<!-- {tag}:end -->"
    current = doc.read_text()
    if start not in current or end not in current:
        raise SystemExit(f"{doc} has no {start} ... {end} section to fill")
    head, rest = current.split(start, 1)
    _, tail = rest.split(end, 1)
    doc.write_text(f"{head}{start}\n{text}\n{end}{tail}")
