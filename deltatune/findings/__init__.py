"""`deltatune findings`: the seed papers' claims, measured on our tasks (docs/findings.md).

    deltatune findings --claims 1,3,4,5,7 [--seeds 0,1,2] [--out docs/findings] [--part 1/2] [--plan] [--render-only]
    from deltatune.findings import run_suite, render; run_suite(claims=[4, 5]); render()

Each claim declares *groups* of runs: one method (with options) at one *setting* (model, task and
budget: steps, batch, max_len, training subset, evaluation subset). A group tunes its learning rate
on the VALIDATION split (seed 0, the method's default lr times each factor of :data:`GRID`, chosen by
the best validation score) and then trains every seed with the chosen lr; its test scores are the
result. A group may instead take the lr chosen by another group (``lr_from``: telly-K takes full
fine-tuning's) or use a fixed one.

Every finished run is one small JSON file, ``<out>/runs/<key>.json``, the key a hash of the run's
whole configuration: a suite resumes by skipping runs whose file exists, and parts run on other
machines merge by copying their files (``--part I/N`` takes every N-th lr group, so that a group's
seeds run where its grid ran). A failed run writes nothing there (its message goes to
``<out>/failures.jsonl``) and the others go on. Runs train in this process, one after another,
through :func:`deltatune.train.train`; the data subsample is the same for every seed (data seed 0),
so seeds differ in initialisation, dropout and data order only, and every method of a setting is
scored on the same validation and test examples.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError

DEFAULT_OUT = "docs/findings"
PAGE = "docs/findings.md"
GRID = (1 / 3, 1.0, 3.0)  # factors of the method's default lr tried on seed 0 (validation split only)
GRID_SEED = 0
DATA_SEED = 0  # picks the training/evaluation subsample, the same for every run seed
SCHEMA = 1  # bump when what a run computes changes, so old run files no longer match


# ----------------------------------------------------------------------------- declarations

@dataclass(frozen=True)
class Setting:
    """A model, a task and a budget, shared by every method compared on it."""
    name: str
    model: str
    task: str
    steps: int
    batch: int
    max_len: int
    max_train: int | None = None  # None: the whole training split (steps x batch examples are seen)
    max_eval: int | None = None  # None: the whole valid/test split
    eval_every: int | None = None  # None: validate at the middle and at the end
    max_new_tokens: int | None = None  # generation tasks
    grad_accum: int = 1  # batches per optimizer step (a private run's expected sample: batch x grad_accum)

    @property
    def per_step(self) -> int:
        """Examples per optimizer step (a private run's expected Poisson sample)."""
        return self.batch * self.grad_accum

    def budget(self) -> dict:  # grad_accum only where it is not 1: the run keys of earlier settings stay the same
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k != "name" and not (k == "grad_accum" and v == 1)}


@dataclass(frozen=True)
class Group:
    """One method (with options) at one setting; its runs share a learning rate chosen on validation."""
    setting: str
    method: str
    options: tuple = ()  # sorted (key, value) pairs
    extra: tuple = ()  # sorted TrainConfig fields beyond the budget, e.g. (("dp_epsilon", 8.0),)
    label: str = ""
    lr_from: str | None = None  # a group id: take the lr that group chose
    fixed_lr: float | None = None  # no tuning: this lr (or the method's default when tune=False)
    tune: bool = True

    @property
    def id(self) -> str:
        parts = [self.setting, self.method] + [f"{k}={_short(v)}" for k, v in self.options + self.extra]
        return ":".join(parts)

    @property
    def name(self) -> str:
        return self.label or self.method


def group(setting: str, method: str, label: str = "", options: dict | None = None, extra: dict | None = None,
          **kw) -> Group:
    return Group(setting, method, tuple(sorted((options or {}).items())), tuple(sorted((extra or {}).items())),
                 label, **kw)


@dataclass
class Claim:
    id: str
    title: str
    paper: str  # the claim as the paper states it
    groups: list = field(default_factory=list)
    extra_runs: list = field(default_factory=list)  # analysis runs: configuration dicts
    note: str = ""


def _short(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


# Budgets: sized for a shared 2-core CPU (see docs/findings.md for what they mean for each claim).
SETTINGS = {s.name: s for s in [
    Setting("cs", "minilm", "code-search", steps=30, batch=16, max_len=64, max_eval=200, eval_every=30),
    Setting("bd", "minilm", "bug-detect", steps=30, batch=16, max_len=96, eval_every=30),
    Setting("bd500", "minilm", "bug-detect", steps=30, batch=16, max_len=96, max_train=500, eval_every=30),
    Setting("dm", "minilm", "docstring-match", steps=30, batch=16, max_len=128, eval_every=30),
    Setting("dm500", "minilm", "docstring-match", steps=30, batch=16, max_len=128, max_train=500, eval_every=30),
    # private training's own budget: DP-SGD's noise per coordinate is sigma x clip / expected batch, so at batch 16
    # it drowns the signal (sigma 0.37 at 30 steps: 0.023 per coordinate); 128 per step (16 x 8) for 40 steps (about
    # 1.1 epochs) gives 0.0041, and the non-private run gets the same budget
    Setting("dm-dp", "minilm", "docstring-match", steps=40, batch=16, max_len=128, eval_every=40, grad_accum=8),
    Setting("cs-telly", "minilm", "code-search", steps=30, batch=16, max_len=64, max_eval=200, eval_every=10),
    Setting("sum", "smollm2", "code-summarization", steps=12, batch=8, max_len=96, max_train=400, max_eval=40,
            eval_every=12, max_new_tokens=20),
    Setting("sum-telly", "smollm2", "code-summarization", steps=12, batch=8, max_len=96, max_train=400, max_eval=40,
            eval_every=12, max_new_tokens=20),
]}


BUG_DETECT_NOTE = (
    "Bug-detect is not learned by MiniLM at these budgets: at 30 steps no method beats the untrained classifier, "
    "and a probe at ten times the budget did not either (300 steps x 16 at max_len 128, seed 0, 2026-11-30: full "
    "fine-tuning lr 1e-4 ended at validation accuracy 0.524 and test 0.503, LoRA lr 2e-3 at validation 0.51, the "
    "loss flat at 0.69; the untrained head scores 0.542 on test). So docstring-match (is this summary this "
    "function's?) is measured beside it as the learnable code-understanding classification task.")


def _claims() -> dict[str, Claim]:
    full_cs = group("cs", "full")
    claims = [
        Claim("1", "PEFT matches full fine-tuning on code understanding, falls behind on generation",
              "LoRA and adapters match full fine-tuning on code understanding (code search, bug detection) but "
              "fall behind it on code generation (code summarization).",
              [full_cs, group("cs", "lora"), group("cs", "houlsby"), group("bd", "full"), group("bd", "lora"),
               group("dm", "full"), group("dm", "lora"), group("sum", "full"), group("sum", "lora")],
              note=BUG_DETECT_NOTE),
        Claim("3", "DPS is more stable than full fine-tuning and better with little data",
              "Dynamic Parameter Selection is more stable than vanilla full fine-tuning across seeds (lower std) "
              "and better in a low-resource setting (500 training examples).",
              [group("dm", "full"), group("dm", "dps", lr_from="dm:full"),
               group("dm500", "full", lr_from="dm:full"), group("dm500", "dps", lr_from="dm:full"),
               group("bd", "full"), group("bd", "dps", lr_from="bd:full"),
               group("bd500", "full", lr_from="bd:full"), group("bd500", "dps", lr_from="bd:full")],
              note="DPS is a regulariser of full fine-tuning: it trains with the learning rate chosen for full "
                   "fine-tuning on the same task (validation split), so the two differ only in DPS's update rule; "
                   "the 500-example runs take the lr chosen at the whole training split. " + BUG_DETECT_NOTE),
        Claim("4", "LN-tuning beats the other methods under 0.1% of the parameters",
              "LN-tuning, with about 0.03% of the parameters, beats the other parameter-efficient methods that "
              "train under 0.1% of them.",
              [group("cs", "ln"), group("cs", "ia3"), group("cs", "compacter++"),
               group("cs", "prompt"), group("cs", "lora", "lora r=1", {"r": 1, "alpha": 2.0}), full_cs]),
        Claim("5", "Compacter++ comes near full fine-tuning with under 0.1% of the parameters",
              "Compacter++ comes near full fine-tuning while training under 0.1% of the parameters.",
              [group("cs", "compacter++"), full_cs]),
        Claim("7", "Private PEFT at epsilon 8 stays within a few points of non-private PEFT",
              "Parameter-efficient fine-tuning with differential privacy at epsilon = 8 stays within a few points "
              "of the non-private parameter-efficient model.",
              [group("dm", "lora"), group("dm", "lora", "lora, DP eps=8", extra={"dp_epsilon": 8.0}),
               group("dm-dp", "lora"), group("dm-dp", "lora", "lora, DP eps=8", extra={"dp_epsilon": 8.0})],
              note="Private retrieval is refused by design (its in-batch contrastive loss makes each example's "
                   "gradient depend on the others, so per-example clipping bounds nothing): a classification task "
                   "is used, docstring-match (bug-detect, the first choice, is not learned at these budgets; one "
                   "private bug-detect run of that first choice stays in the run files, outside this claim). Two "
                   "budgets: the claim-1 budget (30 steps x 16), where DP-SGD's noise (sigma x clip / batch = 0.023 per "
                   "coordinate) drowns the clipped gradient, and a private budget (dm-dp: 40 steps of an expected 128 "
                   "examples, 16 x 8 accumulated, about 1.1 epochs; 0.0041 per coordinate), large batches being what "
                   "DP-SGD needs (Yu et al. use thousands); the non-private LoRA gets the same budget each time."),
        Claim("2", "Which layers hold what, and which a fine-tune changes (probing, RSA, Telly-K)",
              "Lexical properties of code peak in the lower layers, syntactic in the middle, structural in the "
              "higher, semantic across all; fine-tuning barely changes the lower layers and changes the top two "
              "most; freezing the bottom K layers (Telly-K) costs little or nothing in quality.",
              # K = 0..L-1 on MiniLM's 6 blocks; K = L leaves a bi-encoder nothing to train: the page shows the
              # pretrained model's score for it
              [group("cs-telly", "telly", f"telly K={k}", {"k": k}, lr_from=full_cs.id) for k in range(0, 6)]
              + [group("sum-telly", "telly", f"telly K={k}", {"k": k}, lr_from=group("sum", "full").id)
                 for k in (15, 28)],
              extra_runs=[{"kind": "analyze", "model": "minilm", "task": "code-search", "probing": True, "adapters_of": []},
                          # which layers full fine-tuning, LoRA, an adapter and telly (K = half) change most
                          {"kind": "analyze", "model": "minilm", "task": "code-search", "probing": False,
                           "adapters_of": [full_cs.id, group("cs", "lora").id, group("cs", "houlsby").id,
                                           group("cs-telly", "telly", "telly K=3", {"k": 3}, lr_from=full_cs.id).id]},
                          {"kind": "analyze", "model": "smollm2", "task": "code-summarization", "probing": True,
                           "adapters_of": []},
                          {"kind": "analyze", "model": "smollm2", "task": "code-summarization", "probing": False,
                           "adapters_of": [group("sum", "full").id, group("sum", "lora").id]}]),
        Claim("6", "Embedding recycling: about twice the training speed at no cost in quality",
              "Caching the output of a frozen intermediate layer once and training only what is above it gives "
              "roughly twice the training speed at about the same quality.",
              [group("cs-telly", "telly", f"telly K={k}" + (" recycled" if r else ""), {"k": k},
                     extra={"recycle": True} if r else None, lr_from=full_cs.id)
               for k in (3, 4) for r in (False, True)]
              + [group("cs-telly", "telly", "telly K=3 recycled fp16", {"k": 3},
                       extra={"recycle": True, "recycle_dtype": "float16"}, lr_from=full_cs.id)],
              note="The fp16 group measures what a half-size cache costs in quality (the cache in float32 gives the "
                   "uncached run's numbers exactly; float16 rounds the cached hidden states)."),
    ]
    return {c.id: c for c in claims}


CLAIMS = _claims()
# The order the suite runs in when several claims are asked for: cheap MiniLM claims first, SmolLM2 last.
ORDER = ["4", "5", "1", "3", "7", "2", "6"]


# ----------------------------------------------------------------------------- runs and keys

def run_config(setting: Setting, g: Group, lr: float, seed: int) -> dict:
    """The whole configuration of one run: what its key hashes."""
    return {"schema": SCHEMA, "kind": "train", **setting.budget(), "method": g.method, "options": dict(g.options),
            **dict(g.extra), "lr": float(f"{lr:.6g}"), "seed": seed, "data_seed": DATA_SEED}


def run_key(config: dict) -> str:
    """A stable file name for a configuration: readable prefix + hash of its canonical JSON."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    from ..names import slug

    parts = [config.get("kind", "train"), config.get("model"), config.get("task"), config.get("method"),
             f"s{config['seed']}" if "seed" in config else None]
    return "-".join(slug(str(p)) for p in parts if p) + f"-{digest}"


def default_lr(method: str) -> float:
    from .. import method_info

    return float(method_info(method)["lr"])


def grid_lrs(g: Group) -> list[float]:
    base = default_lr(g.method)
    return [float(f"{base * f:.6g}") for f in GRID]


class Store:
    """The run files of one output folder."""

    def __init__(self, out):
        self.out = Path(out)
        self.runs = self.out / "runs"

    def path(self, config: dict) -> Path:
        return self.runs / f"{run_key(config)}.json"

    def get(self, config: dict) -> dict | None:
        path = self.path(config)
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return record if record.get("config") == json.loads(json.dumps(config)) else None

    def put(self, config: dict, record: dict) -> Path:
        self.runs.mkdir(parents=True, exist_ok=True)
        path = self.path(config)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"key": run_key(config), "config": config, **record}, indent=1, sort_keys=True))
        os.replace(tmp, path)  # a crash leaves the old file or none, never half of one
        return path


def choose_lr(store: Store, setting: Setting, g: Group) -> tuple[float | None, list[dict]]:
    """The grid's lr with the best VALIDATION score (None until every grid run is done), and the grid rows."""
    rows = []
    for lr in grid_lrs(g):
        record = store.get(run_config(setting, g, lr, GRID_SEED))
        rows.append({"lr": lr, "valid": None if record is None else record["result"].get("valid_value"),
                     "test": None if record is None else record["result"].get("value"), "done": record is not None})
    if not all(r["done"] for r in rows):
        return None, rows
    scored = [r for r in rows if isinstance(r["valid"], (int, float)) and math.isfinite(r["valid"])]
    if not scored:
        return None, rows
    best = max(scored, key=lambda r: (r["valid"], -abs(math.log(r["lr"] / default_lr(g.method)))))  # ties: nearer the default
    return best["lr"], rows


def group_lr(store: Store, g: Group, groups: dict) -> float | None:
    """The lr every seed of ``g`` trains with, or None while it depends on grid runs not done yet."""
    if g.fixed_lr is not None:
        return g.fixed_lr
    if g.lr_from is not None:
        source = groups.get(g.lr_from)
        if source is None:
            raise ConfigError(f"group {g.id} takes its lr from {g.lr_from}, which no claim declares")
        return group_lr(store, source, groups)
    if not g.tune:
        return default_lr(g.method)
    return choose_lr(store, SETTINGS[g.setting], g)[0]


def _claim_rank(cid: str) -> int:
    return ORDER.index(cid) if cid in ORDER else len(ORDER)


def _model_rank(model: str) -> int:
    """MiniLM runs first, then the larger models (SmolLM2's runs cost several times as much)."""
    return 0 if model in ("minilm",) or model.startswith("tiny-") else 1


def all_groups(claim_ids) -> dict[str, Group]:
    """Every group of the claims, deduplicated, plus the groups they take an lr from, in run order:
    MiniLM's before the larger models', then by claim (ORDER), then as declared."""
    out = {}
    for cid in sorted(claim_ids, key=_claim_rank):
        for g in CLAIMS[cid].groups:
            if g.lr_from is not None:
                source = next((h for c in CLAIMS.values() for h in c.groups if h.id == g.lr_from), None)
                if source is not None:
                    out.setdefault(source.id, source)
            out.setdefault(g.id, g)
    ranked = sorted(out.values(), key=lambda g: _model_rank(SETTINGS[g.setting].model))  # stable
    return {g.id: g for g in ranked}


def lr_root(g: Group) -> str:
    """The group whose grid decides ``g``'s lr (itself when it tunes its own)."""
    return g.lr_from or g.id


def parts(groups: dict, n: int, seeds) -> dict[str, int]:
    """Which of n parts (1..n) runs each group. A group goes with the group its lr comes from (its
    grid, its seeds and the groups borrowing that lr run in one part); these blocks are dealt out
    largest first to the part with the least estimated work (runs, a SmolLM2 run counting 5), so the
    assignment depends only on the claims asked for: run every part with the same --claims."""
    blocks: dict[str, float] = {}
    for g in groups.values():
        runs = (len(GRID) + len([s for s in seeds if s != GRID_SEED])) if g.lr_from is None and g.tune and g.fixed_lr is None \
            else len(seeds)
        blocks[lr_root(g)] = blocks.get(lr_root(g), 0) + runs * (1 if _model_rank(SETTINGS[g.setting].model) == 0 else 5)
    load, owner = [0.0] * n, {}
    for root in sorted(blocks, key=lambda r: (-blocks[r], r)):
        i = min(range(n), key=lambda k: (load[k], k))
        owner[root] = i + 1
        load[i] += blocks[root]
    return {gid: owner[lr_root(g)] for gid, g in groups.items()}


def part_of(g: Group, n: int, groups: dict | None = None, seeds=(0, 1, 2)) -> int:
    """The part (1..n) that runs group g among ``groups`` (default: every claim's)."""
    return parts(groups or all_groups(list(CLAIMS)), n, seeds)[g.id]


def planned_runs(store: Store, claim_ids, seeds, part: tuple[int, int] | None = None) -> list[dict]:
    """Every run of the claims, in run order: {"group", "config" (None: lr not chosen yet), "phase", "done"}."""
    groups = all_groups(claim_ids)
    owner = parts(groups, part[1], seeds) if part is not None else {}
    out, block = [], []  # block: consecutive groups that borrow their lr, run seed-major (interleaved)

    def flush():
        for seed in seeds:
            for g in block:
                lr = group_lr(store, g, groups)
                config = None if lr is None else run_config(SETTINGS[g.setting], g, lr, seed)
                out.append({"group": g, "config": config, "phase": "seed", "seed": seed,
                            "done": config is not None and store.get(config) is not None})
        block.clear()

    for g in groups.values():
        if part is not None and owner[g.id] != part[0]:
            continue
        if g.lr_from is not None:
            # e.g. Telly-K and its recycled runs: alternating configurations, so that a drift of the
            # shared machine's speed spreads over all of them instead of landing on the last ones
            block.append(g)
            continue
        flush()
        setting = SETTINGS[g.setting]
        tuned = g.fixed_lr is None and g.tune
        if tuned:
            for lr in grid_lrs(g):
                config = run_config(setting, g, lr, GRID_SEED)
                out.append({"group": g, "config": config, "phase": "grid", "done": store.get(config) is not None})
        lr = group_lr(store, g, groups)
        for seed in seeds:
            if tuned and seed == GRID_SEED:
                continue  # the grid run at the chosen lr is this seed's run
            config = None if lr is None else run_config(setting, g, lr, seed)
            out.append({"group": g, "config": config, "phase": "seed", "seed": seed,
                        "done": config is not None and store.get(config) is not None})
    flush()
    for cid in sorted(claim_ids, key=_claim_rank):
        for extra in CLAIMS[cid].extra_runs:
            config = {"schema": SCHEMA, **extra}
            if part is not None and int(hashlib.sha256(run_key(config).encode()).hexdigest(), 16) % part[1] + 1 != part[0]:
                continue
            item = {"group": None, "config": config, "phase": "analysis", "done": store.get(config) is not None}
            # after the groups of its model: the analysis reads their seed-0 adapters
            last = max((i for i, r in enumerate(out) if r["group"] is not None
                        and _model_rank(SETTINGS[r["group"].setting].model) <= _model_rank(config["model"])), default=-1)
            out.insert(last + 1, item)
    return out


# ----------------------------------------------------------------------------- running

# Seconds per run on an idle 2-core AMD EPYC, a first guess replaced by finished runs' own times.
_GUESS = {"minilm": 120.0, "smollm2": 600.0}
_GUESS_ANALYSIS = {"minilm": 600.0, "smollm2": 1500.0}


def estimate_seconds(store: Store, run: dict) -> float:
    config = run["config"] or run_config(SETTINGS[run["group"].setting], run["group"], 0.0, 0)
    if config.get("kind") == "analyze":
        return _GUESS_ANALYSIS.get(config["model"], 900.0)
    same, similar = [], []  # finished runs of this budget: of the same method, of any method
    for path in store.runs.glob("*.json") if store.runs.is_dir() else ():
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        c = record.get("config", {})
        if all(c.get(k) == config.get(k) for k in ("kind", "model", "task", "steps", "batch", "max_len", "grad_accum",
                                                    "dp_epsilon")):
            similar.append(record.get("wall_seconds") or 0)
            if c.get("method") == config.get("method"):
                same.append(record.get("wall_seconds") or 0)
    found = same or similar
    work = config.get("grad_accum", 1) * (1.5 if config.get("dp_epsilon") else 1.0)  # per-example gradients cost more
    return statistics.median(found) if found else _GUESS.get(config["model"], 300.0) * work


def run_suite(claims=("1", "3", "4", "5", "7", "2", "6"), seeds=(0, 1, 2), out=DEFAULT_OUT, part=None,
              plan_only: bool = False, work_dir: str = "runs/findings", log=print, trainer=None) -> dict:
    """Run every run of ``claims`` that has no file yet; returns {"ran", "skipped", "failed", "waiting"}.

    Runs of a group whose lr is not chosen yet wait for its grid; the loop goes round again until
    nothing more can run. ``trainer(config, work_dir, store) -> record`` stands in for :func:`_train_one`.
    """
    claims = [str(c) for c in claims]
    unknown = [c for c in claims if c not in CLAIMS]
    if unknown:
        raise ConfigError(f"unknown claim {', '.join(unknown)}; the claims are {', '.join(sorted(CLAIMS))}")
    store = Store(out)
    result = {"ran": [], "skipped": [], "failed": [], "waiting": []}
    if plan_only:
        runs = planned_runs(store, claims, seeds, part)
        todo = [r for r in runs if not r["done"]]
        total = sum(estimate_seconds(store, r) for r in todo)
        for r in runs:
            c = r["config"]
            what = (f"{c['kind']} {c['model']} {c['task']}" if c and c.get("kind") == "analyze" else
                    f"[{r['group'].setting}] {r['group'].name} " + (f"lr {c['lr']:g} seed {c['seed']}" if c else
                                                                     f"seed {r['seed']} (lr: chosen by the grid)"))
            log(f"{'done ' if r['done'] else 'todo '} {r['phase']:8s} {what}")
        log(f"{len(runs)} runs, {len(todo)} to do, about {total / 60:.0f} min on this machine "
            "(estimated from finished runs of the same budget, else a first guess)")
        result["waiting"] = todo
        return result
    trainer = trainer or _train_one
    attempted = set()
    failed_keys = set()
    while True:
        runs = planned_runs(store, claims, seeds, part)
        todo = [r for r in runs if not r["done"] and r["config"] is not None
                and run_key(r["config"]) not in attempted]
        if not todo:
            break
        r = todo[0]
        key = run_key(r["config"])
        attempted.add(key)
        label = (f"analyze {r['config']['model']}" if r["group"] is None else
                 f"[{r['group'].setting}] {r['group'].name} lr {r['config']['lr']:g} seed {r['config']['seed']} ({r['phase']})")
        log(f"run {label}: {key}")
        started = time.monotonic()
        try:
            record = trainer(r["config"], Path(work_dir) / key, store)
        except Exception as err:  # one run's failure must not stop the others
            message = " ".join(str(err).split())[:500] or type(err).__name__
            log(f"FAILED {label}: {type(err).__name__}: {message}")
            failed_keys.add(key)
            result["failed"].append({"key": key, "error": f"{type(err).__name__}: {message}"})
            _append(Path(out) / "failures.jsonl", {"key": key, "config": r["config"], "error": message,
                                                     "when": time.strftime("%Y-%m-%d %H:%M:%S")})
            continue
        record.setdefault("wall_seconds", round(time.monotonic() - started, 1))
        store.put(r["config"], record)
        result["ran"].append(key)
        value = record.get("result", {}).get("value")
        log(f"done {label}: {record.get('result', {}).get('metric', '')} {value} in {record['wall_seconds']:.0f} s")
    runs = planned_runs(store, claims, seeds, part)
    result["skipped"] = [run_key(r["config"]) for r in runs if r["done"] and run_key(r["config"]) not in result["ran"]]
    result["waiting"] = [r for r in runs if not r["done"] and (r["config"] is None or run_key(r["config"]) not in failed_keys)]
    return result


def _append(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


_TASKS: dict = {}
KEEP_ADAPTERS = ("full", "lora")  # seed-0 runs whose adapters the analysis runs compare
_RESULT_KEYS = ("metric", "value", "valid_value", "zero_shot_value", "trainable_params", "total_params",
                "train_seconds", "step_seconds_median", "steps", "best_step", "peak_rss_mb", "pool", "pool_protocol",
                "recall@1", "dp_epsilon", "dp_delta", "dp_noise_multiplier", "dp_clip", "exact_match", "f1")


def _cpu_busy():
    from ..cli import _machine_cpu

    return _machine_cpu()


def _train_one(config: dict, work: Path, store: Store, keep: bool | None = None) -> dict:
    """One run of the suite; ``keep``: whether its best/ adapter stays in ``work`` (default: seed-0 runs of
    KEEP_ADAPTERS, which the analysis runs compare)."""
    if config.get("kind") == "analyze":
        return _analyze_one(config, work, store)
    from ..tasks import load_task
    from ..train import TrainConfig, train
    from ..report import machine_info
    from ..cli import _other_load
    import resource

    task_key = (config["task"], config["max_train"], config["max_eval"])
    if task_key not in _TASKS:  # loading a built-in task parses the standard library: once per process
        _TASKS[task_key] = load_task(config["task"], seed=config["data_seed"], max_train=config["max_train"],
                                     max_eval=config["max_eval"])
    steps = config["steps"]
    fields = dict(model=config["model"], task=config["task"], method=config["method"], options=dict(config["options"]),
                  max_steps=steps, batch_size=config["batch"], max_len=config["max_len"], lr=config["lr"],
                  seed=config["seed"], eval_every=config["eval_every"] or max(1, steps // 2),
                  grad_accum=config.get("grad_accum", 1),
                  max_train=config["max_train"], max_eval=config["max_eval"], progress=False, overwrite=True,
                  out_dir=str(work))
    if config.get("max_new_tokens"):
        fields["max_new_tokens"] = config["max_new_tokens"]
    for name in ("dp_epsilon", "recycle", "recycle_dtype"):
        if name in config:
            fields[name] = config[name]
    before, cpu0 = _cpu_busy(), resource.getrusage(resource.RUSAGE_SELF)
    started = time.monotonic()
    summary = train(TrainConfig(**fields), task=_TASKS[task_key])
    wall = time.monotonic() - started
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    own = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    if keep is None:
        keep = config["method"] in KEEP_ADAPTERS and config["seed"] == GRID_SEED and not config.get("dp_epsilon")
    if keep:
        shutil.rmtree(work / "checkpoints", ignore_errors=True)  # the best/ adapter stays for the analysis
    else:
        shutil.rmtree(work, ignore_errors=True)
    info = machine_info()
    return {"result": {k: summary[k] for k in _RESULT_KEYS if k in summary}, "wall_seconds": round(wall, 1),
            "other_load": _other_load(before, _cpu_busy(), own, wall),
            "machine": info["machine"], "versions": info["versions"], "finished": info["date"],
            "adapter_dir": str(work / "best") if keep else None, "n_train": len(_TASKS[task_key].train)}


def _analyze_one(config: dict, work: Path, store: Store) -> dict:
    """Probing (``probing``) and RSA/CKA of a model against the seed-0 adapters of the groups in ``adapters_of``
    (each at the lr its grid chose on validation); either part may be left out."""
    from ..analysis import analyze
    from ..report import machine_info

    groups = {g.id: g for c in CLAIMS.values() for g in c.groups}
    adapters, used = [], []
    for gid in config.get("adapters_of", []):
        g = groups[gid]
        lr = group_lr(store, g, groups)
        run = None if lr is None else run_config(SETTINGS[g.setting], g, lr, GRID_SEED)
        record = None if run is None else store.get(run)
        path, again = record and record.get("adapter_dir"), False
        if record is not None and not (path and Path(path, "adapter.safetensors").is_file()):
            # finished on another machine, or before its adapter was kept: the same configuration trains
            # again for its adapter (its record, and so the page's scores, stay those of the first run)
            path, again = _train_one(run, work.parent / run_key(run), store, keep=True)["adapter_dir"], True
        if path and Path(path, "adapter.safetensors").is_file():
            adapters.append(path)
            used.append({"group": gid, "lr": lr, "adapter_dir": path, **({"retrained": True} if again else {})})
    if len(adapters) < len(config.get("adapters_of", [])):
        missing = [g for g in config.get("adapters_of", []) if g not in {u["group"] for u in used}]
        raise ConfigError(f"the analysis of {config['model']} needs the seed-0 adapters of {', '.join(missing)}: "
                          "run their claim first on this machine (their adapters stay in runs/findings)")
    small = config["model"] != "minilm"
    started = time.monotonic()
    result = analyze(config["model"], config["task"], adapters=adapters, out_dir=work, finetune=(),
                     probing=config.get("probing", True),
                     n_train=300 if small else 600, n_valid=100 if small else 150, n_test=200 if small else 300,
                     search_samples=200 if small else 500, samples=200 if small else 500, max_len=128,
                     progress=False)
    wall = time.monotonic() - started
    info = machine_info()
    keep = {k: result[k] for k in ("model", "task", "settings", "blocks", "probing", "similarity", "freeze") if k in result}
    return {"result": keep, "adapters": used, "wall_seconds": round(wall, 1), "machine": info["machine"],
            "versions": info["versions"], "finished": info["date"]}


# ----------------------------------------------------------------------------- command line

def _parse_part(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    i, sep, n = text.partition("/")
    try:
        part = (int(i), int(n))
    except ValueError:
        part = None
    if not sep or part is None or not 1 <= part[0] <= part[1]:
        raise ConfigError(f"--part {text!r}: expected I/N with 1 <= I <= N, e.g. --part 1/2")
    return part


def _parse_claims(text: str) -> list[str]:
    claims = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in claims if c not in CLAIMS]
    if not claims or unknown:
        raise ConfigError(f"--claims {text!r}: the claims are {','.join(sorted(CLAIMS))} (issues 12 and 13)")
    return claims


def add_arguments(p) -> None:
    p.add_argument("--claims", default=",".join(ORDER), help=f"comma list of claims (default all: {','.join(ORDER)})")
    p.add_argument("--seeds", default="0,1,2", help="comma list of seeds (default 0,1,2); lr is tuned on seed 0")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help=f"run files and plots (default {DEFAULT_OUT})")
    p.add_argument("--page", default=PAGE, metavar="FILE", help=f"the page written (default {PAGE})")
    p.add_argument("--part", metavar="I/N", help="run only part I of N (every N-th lr group); merge parts by copying "
                   "their run files into one --out")
    p.add_argument("--plan", action="store_true", help="print the runs and an estimated time; run nothing")
    p.add_argument("--render-only", action="store_true", help="write the page from the run files; run nothing")
    p.add_argument("--work", default="runs/findings", metavar="DIR",
                   help="scratch run folders (adapters kept for the analysis; default runs/findings)")


def main(args) -> int:
    claims = _parse_claims(args.claims)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds:
        raise ConfigError(f"--seeds {args.seeds!r}: give a comma list of seeds, e.g. --seeds 0,1,2")
    part = _parse_part(args.part)
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    if args.plan:
        run_suite(claims, seeds, args.out, part, plan_only=True, log=lambda t: print(t, flush=True))
        return 0
    if not args.render_only:
        started = time.monotonic()
        result = run_suite(claims, seeds, args.out, part, work_dir=args.work, log=log)
        log(f"{len(result['ran'])} runs done, {len(result['skipped'])} already there, {len(result['failed'])} failed, "
            f"{len(result['waiting'])} waiting, in {(time.monotonic() - started) / 60:.1f} min")
    from .page import render

    path = render(claims=claims, seeds=seeds, out=args.out, page=args.page, command=getattr(args, "command_line", ""))
    print(f"wrote {path}")
    return 0


def render(*args, **kwargs) -> str:
    """Write docs/findings.md from the run files: :func:`deltatune.findings.page.render`."""
    from .page import render as write_page

    return write_page(*args, **kwargs)
