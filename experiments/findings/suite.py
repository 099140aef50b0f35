"""The findings suite: the claims, their groups of runs, the run files and the runs themselves.

    python experiments/findings/run.py --claims 4,5 [--plan] [--render-only]     # the script (see run.py)
    from findings import suite; suite.run_suite(claims=["4", "5"])                # with experiments/ on sys.path

Each claim declares *groups* of runs: one method (with options) at one *setting* (model, task and
budget: steps, batch, max_len, training subset, evaluation subset). A group tunes its learning rate
on the VALIDATION split (seed 0, the method's default lr times each factor of :data:`GRID`, chosen by
the best validation score) and then trains every seed with the chosen lr; its test scores are the
result. A group may instead take the lr chosen by another group (``lr_from``: telly-K takes full
fine-tuning's) or use a fixed one.

Every finished run is one small JSON file, ``<out>/runs/<key>.json``, the key a hash of the run's
whole configuration: a suite resumes by skipping runs whose file exists. A failed run writes nothing there
(its message goes to ``<out>/failures.jsonl``) and the others go on. The runs train through
:func:`deltatune.sweep.run_sweep` (:func:`run_suite`): a group's lr grid is a grid sweep over lr on seed 0, its
seeds at the chosen lr one more sweep, each run the very TrainConfig :func:`_train_one` trains; with ``ray``
(``--ray auto|ADDRESS``) the sweeps run on a Ray cluster's workers (a grid's lrs at once; a configuration's
seeds one after another in its trial, as a sweep's trial runs them) and the run files are written here, so
the suite needs neither ``--part I/N`` (which still takes every N-th lr group, for machines outside one
cluster, their run files merged by copying) nor merging by hand. The data subsample is the same for every
seed (data seed 0), so seeds differ in initialisation, dropout and data order only, and every method of a
setting is scored on the same validation and test examples.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import deltatune
from deltatune import ConfigError

from .runfiles import _NUMBER, RunFileError, Store, check_record, run_key, slug  # noqa: F401  (the suite's API)

DEFAULT_OUT = "docs/findings"
PAGE = "docs/findings.md"
GRID = (1 / 3, 1.0, 3.0)  # factors of the method's default lr tried on seed 0 (validation split only)
GRID_SEED = 0
DATA_SEED = 0  # picks the training/evaluation subsample, the same for every run seed
GRID_STEP = 3.0  # an lr grid whose best point sits at its edge gets the next point beyond it, this factor further,
MAX_EXTEND = 2  # at most this many times each way (rule of 2026-12-06)
DP_DELTA = 1e-4  # every private run's delta: what the committed claim-7 runs spent their epsilon at
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
    # DPS as released (issue 21): a stage of int(steps x 0.05) steps must be as long as the released runs' (23-80
    # steps), so 460 steps give 23-step stages (ten Stage I / Stage II cycles); DPS's dropout='released' trains
    # without dropout below 2,000 steps, as the released scripts do
    Setting("dm-dps", "minilm", "docstring-match", steps=460, batch=16, max_len=128, eval_every=115),
    Setting("dm500-dps", "minilm", "docstring-match", steps=460, batch=16, max_len=128, max_train=500, eval_every=115),
]}


BUG_DETECT_NOTE = (
    "Bug-detect is not learned by MiniLM at these budgets: at 30 steps no method beats the untrained classifier, "
    "and a probe at ten times the budget did not either (300 steps x 16 at max_len 128, seed 0, 2026-11-30: full "
    "fine-tuning lr 1e-4 ended at validation accuracy 0.524 and test 0.503, LoRA lr 2e-3 at validation 0.51, the "
    "loss flat at 0.69; the untrained head scores 0.542 on test). So docstring-match (is this summary this "
    "function's?) is measured beside it as the learnable code-understanding classification task.")


DPS_AS_RELEASED = {"dropout": "released"}  # named in the run key: the option's default could change


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
              [group("dm-dps", "full"), group("dm-dps", "dps", options=DPS_AS_RELEASED, lr_from="dm-dps:full"),
               group("dm500-dps", "full", lr_from="dm-dps:full"),
               group("dm500-dps", "dps", options=DPS_AS_RELEASED, lr_from="dm-dps:full")],
              note="DPS is a regulariser of full fine-tuning: it trains with the learning rate chosen for full "
                   "fine-tuning on the same task (validation split), so the two differ in DPS's update rule (and its "
                   "dropout, below); the 500-example runs take the lr chosen at the whole training split. Budget as released "
                   "(2026-12-06, issue 21): 460 steps x 16, so that a stage (int(460 x 0.05) = 23 steps) is as long "
                   "as the released runs' 23-80, and DPS trains without dropout (its dropout='released', the released "
                   "scripts' setting below 2,000 steps) while full fine-tuning keeps MiniLM's 0.1, as the released "
                   "baseline does. The earlier runs at 30 steps stay in the run files but are not this "
                   "claim any more: their stage was int(30 x 0.05) = 1 step, the subnetwork re-chosen every step, "
                   "with dropout 0.1: they did not test DPS. Bug-detect is left out: no method learned it at 30 or "
                   "300 steps (claim 1)."),
        Claim("4", "LN-tuning beats the other methods under 0.1% of the parameters",
              "LN-tuning, with about 0.03% of the parameters, beats the other parameter-efficient methods that "
              "train under 0.1% of them.",
              [group("cs", "ln"), group("cs", "ia3"), group("cs", "compacter++"),
               group("cs", "prompt"), group("cs", "lora", "lora r=1", {"r": 1, "alpha": 2.0}), full_cs]),
        Claim("5", "Compacter++ comes near full fine-tuning with under 0.1% of the parameters",
              "Compacter++ comes near full fine-tuning while training under 0.1% of the parameters.",
              [group("cs", "compacter++"), full_cs]),
        Claim("8", "LoRA's relatives match LoRA (DoRA, VeRA, LoHa, LoReFT)",
              "DoRA outperforms LoRA at the same rank (Liu et al. 2024); VeRA matches LoRA with about ten times fewer "
              "trainable parameters (Kopiczko et al. 2024); LoHa matches LoRA's quality at a higher rank for the same "
              "parameters (Hyeon-Woo et al. 2022); LoReFT matches or beats LoRA with 15-65 times fewer parameters "
              "(Wu et al. 2024).",
              [group("cs", "lora"), group("cs", "lora", "dora", {"use_dora": True}), group("cs", "vera"),
               group("cs", "loha"), group("cs", "loreft"), full_cs],
              note="Issue 23's comparison: each relative at its own defaults (deltatune methods), its learning rate "
                   "chosen on the validation split as every group's, at the claim-4/5 budget, against LoRA (r 8 on query "
                   "and value) and full fine-tuning of the same runs as claims 4 and 5."),
        Claim("9", "QLoRA: LoRA on a 4-bit NormalFloat base matches LoRA on the full-precision base",
              "LoRA on a base quantized to 4-bit NormalFloat with double quantization matches the quality of "
              "16-bit LoRA and full fine-tuning (Dettmers et al. 2023, QLoRA).",
              [group("sum", "lora"),
               group("sum", "lora", "lora, nf4 base", extra={"quantize": "nf4"}, lr_from=group("sum", "lora").id),
               group("sum", "lora", "lora, int8 base", extra={"quantize": "int8"}, lr_from=group("sum", "lora").id)],
              note="Issue 24's quality comparison, on the claim-1 code-summarization budget (SmolLM2-135M, 12 steps "
                   "x 8): LoRA with the base's linear layers held in nf4 (bitsandbytes, blocks of 64, double "
                   "quantization) or int8 (per-row absmax) against LoRA on the float32 base (our reference is float32, "
                   "not the paper's 16-bit), each quantized run at the learning rate chosen for the float32 LoRA on "
                   "validation, as QLoRA keeps LoRA's hyperparameters. The quantized runs score their zero-shot, "
                   "validation and test splits on their own quantized base."),
        Claim("7", "Private PEFT at epsilon 8 (delta 1e-4) stays within a few points of non-private PEFT",
              "Parameter-efficient fine-tuning with differential privacy at epsilon = 8 stays within a few points "
              "of the non-private parameter-efficient model.",
              [group("dm", "lora"), group("dm", "lora", "lora, DP eps=8 delta=1e-4", extra={"dp_epsilon": 8.0}),
               group("dm-dp", "lora"), group("dm-dp", "lora", "lora, DP eps=8 delta=1e-4", extra={"dp_epsilon": 8.0})],
              note="Private retrieval is refused by design (its in-batch contrastive loss makes each example's "
                   "gradient depend on the others, so per-example clipping bounds nothing): a classification task "
                   "is used, docstring-match (bug-detect, the first choice, is not learned at these budgets; one "
                   "private bug-detect run of that first choice stays in the run files, outside this claim). Two "
                   "budgets: the claim-1 budget (30 steps x 16), where DP-SGD's noise (sigma x clip / batch = 0.023 per "
                   "coordinate) drowns the clipped gradient, and a private budget (dm-dp: 40 steps of an expected 128 "
                   "examples, 16 x 8 accumulated, about 1.1 epochs; 0.0041 per coordinate), large batches being what "
                   "DP-SGD needs (Yu et al. use thousands); the non-private LoRA gets the same budget each time. "
                   "Every private run spends its epsilon at delta = 1e-4 (recorded in its run file: the engine's "
                   "default then, 1/n rounded down to a power of ten for n = 4,671 training examples; the runner now "
                   "pins it, DP_DELTA, so that new runs of these groups stay comparable). At delta = 1e-5 the same "
                   "noise would spend epsilon 9.97 (30 steps) and 9.77 (dm-dp) (Opacus's RDP accountant, "
                   "2026-12-06)."),
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
                           "adapters_of": [group("sum", "full").id, group("sum", "lora").id]}]
              # the RSA again on other samples of texts (the same adapters): the spread over samples is the
              # interval of which hidden states a fine-tune changes most (rules of 2026-12-06)
              + [{"kind": "analyze", "model": model, "task": task, "probing": False, "adapters_of": ids, "seed": seed}
                 for model, task, ids in (("minilm", "code-search",
                                           [full_cs.id, group("cs", "lora").id, group("cs", "houlsby").id,
                                            group("cs-telly", "telly", "telly K=3", {"k": 3}, lr_from=full_cs.id).id]),
                                          ("smollm2", "code-summarization",
                                           [group("sum", "full").id, group("sum", "lora").id]))
                 for seed in (1, 2)]),
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
ORDER = ["4", "5", "8", "1", "3", "7", "2", "6", "9"]


# ----------------------------------------------------------------------------- runs and keys

def run_config(setting: Setting, g: Group, lr: float, seed: int) -> dict:
    """The whole configuration of one run: what its key hashes."""
    return {"schema": SCHEMA, "kind": "train", **setting.budget(), "method": g.method, "options": dict(g.options),
            **dict(g.extra), "lr": float(f"{lr:.6g}"), "seed": seed, "data_seed": DATA_SEED}


def default_lr(method: str) -> float:
    return float(deltatune.method_info(method)["lr"])


def grid_lrs(g: Group, factors=GRID) -> list[float]:
    base = default_lr(g.method)
    return [float(f"{base * f:.6g}") for f in factors]


def grid(store: Store, setting: Setting, g: Group) -> dict:
    """A tuned group's learning-rate grid on seed 0 (validation split only), extended where its best sits at an edge.

    Returns {"rows": [{"lr", "factor", "valid", "test", "done", "extension"}] in lr order, "lr": the chosen lr or
    None, "best": the best lr among the runs done (what the page shows while the grid waits), "waiting": None, or
    "grid" (a run of the grid is missing) or "extension" (the best sits at an edge: the next lr beyond it must run
    before any seed does), "edge": True when the chosen lr still sits at an edge (the extension limit reached)}.
    Rule (2026-12-06): a best point at the low edge adds the lr GRID_STEP times lower, at the high edge GRID_STEP
    times higher, up to MAX_EXTEND times each way; ties go to the lr nearer the method's default.
    """
    factors = sorted(GRID)
    base = default_lr(g.method)
    while True:
        rows = []
        for f in factors:
            lr = grid_lrs(g, (f,))[0]
            record = store.get(run_config(setting, g, lr, GRID_SEED))
            result = record["result"] if record is not None else {}
            rows.append({"lr": lr, "factor": f, "valid": result.get("valid_value"), "test": result.get("value"),
                         "done": record is not None, "extension": not any(math.isclose(f, x) for x in GRID)})
        scored = [r for r in rows if r["done"] and isinstance(r["valid"], _NUMBER) and math.isfinite(r["valid"])]
        best = max(scored, key=lambda r: (r["valid"], -abs(math.log(r["lr"] / base)))) if scored else None
        out = {"rows": rows, "lr": None, "best": best["lr"] if best else None, "waiting": None, "edge": False}
        if not all(r["done"] for r in rows):
            out["waiting"] = "extension" if all(r["done"] for r in rows if not r["extension"]) else "grid"
            return out
        if best is None:
            return out
        low, high = best is rows[0], best is rows[-1]
        below = sum(f < min(GRID) for f in factors)
        above = sum(f > max(GRID) for f in factors)
        if low and below < MAX_EXTEND:
            factors.insert(0, factors[0] / GRID_STEP)
        elif high and above < MAX_EXTEND:
            factors.append(factors[-1] * GRID_STEP)
        else:
            out.update(lr=best["lr"], edge=low or high)
            return out


def choose_lr(store: Store, setting: Setting, g: Group) -> tuple[float | None, list[dict]]:
    """The grid's lr with the best VALIDATION score (None until the grid, extensions included, is done), and its rows."""
    found = grid(store, setting, g)
    return found["lr"], found["rows"]


def group_lr(store: Store, g: Group, groups: dict, provisional: bool = False) -> float | None:
    """The lr every seed of ``g`` trains with, or None while it depends on grid runs not done yet.
    ``provisional``: while the grid waits for an extension, the best lr of the runs done (what the page shows)."""
    if g.fixed_lr is not None:
        return g.fixed_lr
    if g.lr_from is not None:
        source = groups.get(g.lr_from)
        if source is None:
            raise ConfigError(f"group {g.id} takes its lr from {g.lr_from}, which no claim declares")
        return group_lr(store, source, groups, provisional)
    if not g.tune:
        return default_lr(g.method)
    found = grid(store, SETTINGS[g.setting], g)
    return found["best"] if provisional and found["waiting"] == "extension" else found["lr"]


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
            for row in grid(store, setting, g)["rows"]:
                config = run_config(setting, g, row["lr"], GRID_SEED)
                out.append({"group": g, "config": config, "phase": "extension" if row["extension"] else "grid",
                            "done": row["done"]})
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
    if config.get("kind") == "analyze":  # the same analysis on another sample of texts takes as long
        alike = [r["wall_seconds"] for _, r in store.records() if r["config"].get("kind") == "analyze"
                 and all(r["config"].get(k) == config.get(k) for k in ("model", "task", "probing"))]
        return statistics.median(alike) if alike else _GUESS_ANALYSIS.get(config["model"], 900.0)
    same, similar = [], []  # finished runs of this budget: of the same method, of any method
    for _, record in store.records():
        c = record["config"]
        if all(c.get(k) == config.get(k) for k in ("kind", "model", "task", "steps", "batch", "max_len", "grad_accum",
                                                    "dp_epsilon")):
            similar.append(record.get("wall_seconds") or 0)
            if c.get("method") == config.get("method"):
                same.append(record.get("wall_seconds") or 0)
    found = same or similar
    work = config.get("grad_accum", 1) * (1.5 if config.get("dp_epsilon") else 1.0)  # per-example gradients cost more
    if found:
        return statistics.median(found)
    # no run of this budget yet: scale the nearest budget of the same model and task by its steps
    shorter = [(r["config"], r["wall_seconds"]) for _, r in store.records()
               if all(r["config"].get(k) == config.get(k) for k in ("kind", "model", "task", "batch", "max_len", "method"))
               and r["config"].get("steps") and not r["config"].get("dp_epsilon")]
    if shorter and config.get("steps"):
        return statistics.median(w * config["steps"] / c["steps"] for c, w in shorter) * work
    return _GUESS.get(config["model"], 300.0) * work


def run_suite(claims=("1", "3", "4", "5", "7", "2", "6"), seeds=(0, 1, 2), out=DEFAULT_OUT, part=None,
              plan_only: bool = False, work_dir: str = "runs/findings", log=print, ray=None) -> dict:
    """Run every run of ``claims`` that has no file yet; returns {"ran", "skipped", "failed", "waiting"}.

    The runs go through :func:`deltatune.sweep.run_sweep`, a batch at a time (:func:`batches`): a group's missing
    grid runs as one grid sweep over lr, its seeds at the chosen lr as one more; on the Ray cluster ``ray`` (an
    address or "auto"; ``work_dir`` then a path every node sees) a grid's runs train at once on the workers.
    Runs of a group whose lr is not chosen yet wait for its grid (an extension is the next batch); the loop
    goes round again until nothing more can run. Analysis runs train here, one at a time.
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
    from deltatune import storage

    attempted = set()
    failed_keys = set()

    def failed(r, key, kind, message):
        log(f"FAILED {_label(r)}: {kind}: {message}")
        failed_keys.add(key)
        result["failed"].append({"key": key, "error": f"{kind}: {message}"})
        _append(Path(out) / "failures.jsonl", {"key": key, "config": r["config"], "error": message,
                                                 "when": time.strftime("%Y-%m-%d %H:%M:%S")})

    def done(r, key, record):
        store.put(r["config"], record)
        result["ran"].append(key)
        value = record.get("result", {}).get("value")
        log(f"done {_label(r)}: {record.get('result', {}).get('metric', '')} {value} in {record['wall_seconds']:.0f} s")

    while True:
        runs = planned_runs(store, claims, seeds, part)
        todo = [r for r in runs if not r["done"] and r["config"] is not None
                and run_key(r["config"]) not in attempted]
        if not todo:
            break
        batch = batches(todo)[0]
        keys = {run_key(r["config"]): r for r in batch}
        attempted.update(keys)
        for key, r in keys.items():
            log(f"run {_label(r)}: {key}")
        started = time.monotonic()
        try:
            if batch[0]["group"] is None:
                records, errors, folders = {key: _analyze_one(batch[0]["config"], Path(work_dir) / key, store)
                                            for key in keys}, {}, {}
            else:
                records, errors, folders = sweep_batch(batch, work_dir, ray=ray, log=log)
        except Exception as err:  # one batch's failure must not stop the others
            message = " ".join(str(err).split())[:500] or type(err).__name__
            records, errors, folders = {}, {key: (type(err).__name__, message) for key in keys}, {}
        for key, r in keys.items():
            if key in records:
                records[key].setdefault("wall_seconds", round(time.monotonic() - started, 1))
                done(r, key, records[key])
                if key in folders and not records[key].get("adapter_dir"):  # its run file holds what it found
                    storage.remove_dir(folders[key])
            else:
                failed(r, key, *errors.get(key, ("RuntimeError", "no record of this run")))
    runs = planned_runs(store, claims, seeds, part)
    result["skipped"] = [run_key(r["config"]) for r in runs if r["done"] and run_key(r["config"]) not in result["ran"]]
    result["waiting"] = [r for r in runs if not r["done"] and (r["config"] is None or run_key(r["config"]) not in failed_keys)]
    return result


def _label(r: dict) -> str:
    return (f"analyze {r['config']['model']}" if r["group"] is None else
            f"[{r['group'].setting}] {r['group'].name} lr {r['config']['lr']:g} seed {r['config']['seed']} ({r['phase']})")


def rescore(claims, seeds=(0, 1, 2), out=DEFAULT_OUT, work_dir: str = "runs/findings", log=print, trainer=None,
            limit: int | None = None) -> dict:
    """Give finished runs their per-example test scores, which run files before 2026-12-06 do not hold.

    Each such run of ``claims`` trains again with its own configuration; where the new run reproduces the
    recorded test score exactly (to 1e-9), its per-example scores join the run file, whose numbers stay as
    they were; where it does not (the engine or a library changed since), the file is left alone and the
    page keeps the bound. Private runs are skipped: their noise is drawn afresh on purpose. Every attempt is
    a line of ``<out>/rescore.jsonl``. Returns {"attached", "differed", "skipped"}.
    """
    store = Store(out)
    trainer = trainer or _train_one
    done = {"attached": [], "differed": [], "skipped": []}
    for r in planned_runs(store, [str(c) for c in claims], seeds):
        config = r["config"]
        if not r["done"] or config is None or config.get("kind") != "train":
            continue
        record = store.get(config)
        if record.get("test_scores") is not None:
            continue
        key = run_key(config)
        if config.get("dp_epsilon"):
            done["skipped"].append(key)
            continue
        if limit is not None and len(done["attached"]) + len(done["differed"]) >= limit:
            break
        log(f"rescore {key}")
        again = trainer(config, Path(work_dir) / key, store)
        old, new = record["result"].get("value"), again["result"].get("value")
        same = isinstance(old, _NUMBER) and isinstance(new, _NUMBER) and abs(old - new) <= 1e-9
        scores = again.get("test_scores")
        line = {"key": key, "recorded": old, "rerun": new, "when": time.strftime("%Y-%m-%d %H:%M:%S"),
                "versions": again.get("versions")}
        if same and scores is not None:
            record = {k: v for k, v in record.items() if k not in ("key", "config")}
            record.update(test_scores=scores, n_test=again.get("n_test"),
                          rescored={"finished": again.get("finished"), "versions": again.get("versions")})
            store.put(config, record)
            done["attached"].append(key)
            log(f"  reproduced {old}: per-example scores attached")
        else:
            done["differed"].append(key)
            log(f"  not reproduced (recorded {old}, now {new}): file unchanged")
        _append(Path(out) / "rescore.jsonl", {**line, "attached": same and scores is not None})
    return done


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
    from deltatune.machine import machine_cpu

    return machine_cpu()


def example_scores(path, value) -> list | None:
    """Each test example's score from a run's predictions file, where the run's metric is their mean: the
    reciprocal of each query's rank (MRR), whether a prediction is its reference (accuracy) or its smoothed
    sentence BLEU-4 x 100 (bleu4, CodeXGLUE's mean of them). None where no such mean gives the run's score."""
    try:
        rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, TypeError, ValueError):
        return None
    if not rows or not isinstance(value, _NUMBER) or not all(isinstance(r, dict) for r in rows):
        return None
    candidates = []
    if all(isinstance(r.get("rank"), int) and r["rank"] >= 1 for r in rows):
        candidates.append([1.0 / r["rank"] for r in rows])
    if all("prediction" in r and "reference" in r for r in rows):
        candidates.append([1.0 if r["prediction"] == r["reference"] else 0.0 for r in rows])
        if all(isinstance(r["prediction"], str) and isinstance(r["reference"], str) for r in rows):
            from deltatune.metrics import sentence_bleu4  # bleu4: CodeXGLUE's sentence BLEU averaged, x100
            candidates.append([100.0 * sentence_bleu4(r["reference"], r["prediction"]) for r in rows])
    for scores in candidates:
        if abs(statistics.fmean(scores) - value) <= 1e-9:  # the metric is their mean: they are its examples
            return [float(f"{x:.6g}") for x in scores]
    return None


def task_data(config: dict):
    """The subsampled TaskData of a run (data seed 0: the same examples for every seed), loaded once per process."""
    from deltatune.tasks import load_task

    task_key = (config["task"], config["max_train"], config["max_eval"])
    if task_key not in _TASKS:  # loading a built-in task parses the standard library: once per process
        _TASKS[task_key] = load_task(config["task"], seed=config["data_seed"], max_train=config["max_train"],
                                     max_eval=config["max_eval"])
    return _TASKS[task_key]


def train_fields(config: dict) -> dict:
    """The TrainConfig fields of a run of the suite, but its lr, seed and folder (one definition for the runs
    trained here, through a sweep and again by --rescore, so that they are the same runs)."""
    steps = config["steps"]
    fields = dict(model=config["model"], task=config["task"], method=config["method"], options=dict(config["options"]),
                  max_steps=steps, batch_size=config["batch"], max_len=config["max_len"],
                  eval_every=config["eval_every"] or max(1, steps // 2), grad_accum=config.get("grad_accum", 1),
                  max_train=config["max_train"], max_eval=config["max_eval"])
    if config.get("max_new_tokens"):
        fields["max_new_tokens"] = config["max_new_tokens"]
    budget = {f.name for f in dataclasses.fields(Setting)} - {"name"}
    known = budget | {"schema", "kind", "method", "options", "lr", "seed", "data_seed"}
    fields.update({k: v for k, v in config.items() if k not in known})  # a group's extra TrainConfig fields, all of them
    if config.get("dp_epsilon"):
        fields["dp_delta"] = DP_DELTA  # not the engine's default, which may change: the claim's runs share one delta
    return fields


def keeps_adapter(config: dict) -> bool:
    """Seed-0 runs of KEEP_ADAPTERS keep their best/ adapter: the analysis runs compare them."""
    return config["method"] in KEEP_ADAPTERS and config["seed"] == GRID_SEED and not config.get("dp_epsilon")


def run_record(summary: dict, task, wall: float, load, adapter_dir, info: dict) -> dict:
    """A run file's record (without its key and config) from a finished run's summary."""
    scores = example_scores(summary.get("predictions_file"), summary.get("value"))
    zero = example_scores(summary.get("zero_shot_predictions_file"), summary.get("zero_shot_value"))
    return {"result": {k: summary[k] for k in _RESULT_KEYS if k in summary}, "wall_seconds": round(wall, 1),
            "other_load": load, "machine": info["machine"], "versions": info["versions"], "finished": info["date"],
            "adapter_dir": adapter_dir, "n_train": len(task.train), "n_test": len(task.test),
            **({"test_scores": {"values": scores, "zero_shot": zero if zero is not None and len(zero) == len(scores)
                                else None}} if scores is not None else {})}


def _train_one(config: dict, work: Path, store: Store, keep: bool | None = None) -> dict:
    """One run of the suite trained here, in ``work`` (--rescore, and an adapter the analysis needs again); ``keep``:
    whether its best/ adapter stays there (default: :func:`keeps_adapter`)."""
    if config.get("kind") == "analyze":
        return _analyze_one(config, work, store)
    import resource

    from deltatune.machine import machine_info, other_load
    from deltatune.training import TrainConfig, train

    task = task_data(config)
    fields = {**train_fields(config), "lr": config["lr"], "seed": config["seed"], "progress": False, "overwrite": True,
              "out_dir": str(work)}
    before, cpu0 = _cpu_busy(), resource.getrusage(resource.RUSAGE_SELF)
    started = time.monotonic()
    summary = train(TrainConfig(**fields), task=task)
    wall = time.monotonic() - started
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    own = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    keep = keeps_adapter(config) if keep is None else keep
    record = run_record(summary, task, wall, other_load(before, _cpu_busy(), own, wall),
                        str(work / "best") if keep else None, machine_info())
    if keep:
        shutil.rmtree(work / "checkpoints", ignore_errors=True)  # the best/ adapter stays for the analysis
    else:
        shutil.rmtree(work, ignore_errors=True)
    return record


# ----------------------------------------------------------------------------- runs through deltatune.sweep

def batches(todo: list[dict]) -> list[list[dict]]:
    """The runs to do, in plan order, as the sweeps that run them: a group's grid runs still missing (seed 0, one
    lr each: a grid sweep over lr), or its seed runs at one lr (one configuration, those seeds). An extension of
    a grid is its own batch: it runs once the grid before it has chosen to extend (:func:`grid`)."""
    out, placed = [], set()
    for i, r in enumerate(todo):
        if i in placed:
            continue
        if r["group"] is None:  # an analysis run: not a training run, trained here alone
            placed.add(i)
            out.append([r])
            continue
        grid_phase = r["phase"] in ("grid", "extension")
        batch = []
        for j, other in enumerate(todo):
            if j in placed or other["group"] is not r["group"] or (other["phase"] in ("grid", "extension")) != grid_phase:
                continue
            if grid_phase or other["config"]["lr"] == r["config"]["lr"]:
                placed.add(j)
                batch.append(other)
        out.append(batch)
    return out


def sweep_batch(batch: list[dict], work_dir, ray=None, log=print) -> tuple[dict, dict, dict]:
    """Train a batch of runs (:func:`batches`) through :func:`deltatune.sweep.run_sweep`: a grid sweep over their
    lrs at seed 0, or one configuration over their seeds; here, or on the Ray cluster ``ray`` (an address or
    "auto"). Each run is the run :func:`_train_one` trains (the same TrainConfig, the test split scored too:
    ``trial_test``), in a trial folder under ``<work_dir>/sweeps/``; a run whose adapter is not kept
    (:func:`keeps_adapter`) goes once its run file is written (the caller's). Returns ({run key: record},
    {run key: error}, {run key: its run folder})."""
    from deltatune import storage
    from deltatune.machine import machine_info
    from deltatune.sweep import SweepConfig, run_sweep

    configs = [r["config"] for r in batch]
    first = configs[0]
    lrs = sorted({c["lr"] for c in configs})
    seeds = sorted({c["seed"] for c in configs})
    if len(lrs) > 1 and len(seeds) > 1:
        raise ValueError("a batch varies the lr or the seeds, not both")
    keys = sorted(run_key(c) for c in configs)
    digest = hashlib.sha256(json.dumps(keys).encode()).hexdigest()[:10]
    name = f"{slug(batch[0]['group'].id)}-{'seeds' if batch[0]['phase'] == 'seed' else 'grid'}-{digest}"
    task = task_data(first)
    cfg = SweepConfig(base=train_fields(first), space={"lr": lrs}, seeds=seeds, algorithm="grid", extend=0,
                      prune="none", score_test=False, trial_test=True, out=str(Path(work_dir) / "sweeps" / name),
                      ray=ray)
    # the sweep's notes speak of its own extension (off here: the suite's rule, grid(), decides and extends)
    result = run_sweep(cfg, task=task, log=lambda line: None if line.startswith("note: ") else
                       log(f"  sweep {name}: {line}"))
    by_run = {(c["lr"], c["seed"]): c for c in configs}
    here = machine_info()
    records, errors, folders = {}, {}, {}
    for trial in result["trials"]:
        for run in trial["runs"]:
            config = by_run.get((trial["params"].get("lr", first["lr"]), run["seed"]))
            if config is None:
                continue
            key = run_key(config)
            if trial["status"] != "complete":
                errors[key] = ("TrainingError", (trial.get("error") or trial["status"])[:500])
                continue
            folder = folders[key] = Path(run["out_dir"])
            summary = json.loads(storage.read_text(folder / "metrics.json"))
            adapter = None
            if keeps_adapter(config):  # named as the runner always named it: relative to where it runs, if inside
                adapter = folder / "best"
                adapter = adapter.relative_to(Path.cwd()) if adapter.is_relative_to(Path.cwd()) else adapter
            info = {**here, **{k: trial[k] for k in ("machine", "versions") if k in trial}}  # a Ray worker's own
            records[key] = run_record(summary, task, sum(summary.get("phase_seconds", {}).values()),
                                      result["other_load"], None if adapter is None else str(adapter), info)
    for key in set(map(run_key, configs)) - set(records) - set(errors):
        errors[key] = ("RuntimeError", "the sweep ended without this run (see its messages above)")
    return records, errors, folders


def _analyze_one(config: dict, work: Path, store: Store) -> dict:
    """Probing (``probing``) and RSA/CKA of a model against the seed-0 adapters of the groups in ``adapters_of``
    (each at the lr its grid chose on validation); either part may be left out."""
    from deltatune.analysis import analyze
    from deltatune.machine import machine_info

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
                     seed=config.get("seed", 0),  # the seed draws the texts (and the probes' functions)
                     probing=config.get("probing", True),
                     n_train=300 if small else 600, n_valid=100 if small else 150, n_test=200 if small else 300,
                     search_samples=200 if small else 500, samples=200 if small else 500, max_len=128,
                     progress=False)
    wall = time.monotonic() - started
    info = machine_info()
    keep = {k: result[k] for k in ("model", "task", "settings", "blocks", "probing", "similarity", "freeze") if k in result}
    return {"result": keep, "adapters": used, "wall_seconds": round(wall, 1), "machine": info["machine"],
            "versions": info["versions"], "finished": info["date"]}
