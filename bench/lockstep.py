"""How rows are timed: one worker process per row, rows grouped with the baselines their ratios
need, and the driver asking each worker of a group for one step in turn (lockstep)."""
from __future__ import annotations

import fnmatch
import json
import math
import os
import statistics
import subprocess
import tempfile
import threading
import sys
import time
from pathlib import Path

from configs import (CONFIGS, LIB_ENV, READY_TAG, RESULT_TAG, ROOT, SIZES, STEP_TAG, attach, build_model,
                     TrainStep, cpu_ticks, merge_lora, rss_mb, versions)
from results import key

def worker(job: dict) -> dict:
    import torch

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
        train_step = TrainStep(model, lib, params, dict(input_ids=ids, attention_mask=mask), labels)
        if spec.get("compile"):
            train_step.model = torch.compile(model)

        def count_grads():  # every trainable tensor must receive a non-zero gradient
            result["grads_nonzero"] = sum(1 for p in params if p.grad is not None and bool(p.grad.abs().sum() > 0))
            result["grads_expected"] = len(params)

        def step(check=False):
            return train_step(count_grads if check else None)

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
        self.proc = subprocess.Popen([str(py), str(Path(__file__).resolve().parent / "run.py"), "--worker", json.dumps(job)],
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
