"""``analyze()``: probing, representational similarity and a freeze depth, written to one folder.

    from deltatune.analysis import analyze
    result = analyze("minilm", "code-search", adapters=["runs/lora", "runs/telly"], out_dir="runs/analysis")

writes ``analysis.json``, ``probing.png``, ``similarity.png`` and ``analysis.html`` to ``out_dir`` (an
analysis folder: new, empty, or one an earlier analysis wrote; anything else is refused before any work).
The same is ``deltatune analyze --model minilm --task code-search --adapter runs/lora ...``.
"""
from __future__ import annotations

import datetime
from pathlib import Path

import torch

from ..errors import ConfigError
from ..training import freeze as FZ
from .features import extract
from .probing import PROPERTIES, probe, probe_functions
from .similarity import SCORES, per_layer, top_dimension_share


def _load_adapter_model(path, model_name: str, task):
    """The task model a ``train`` run (or its adapter folder) was trained as, with the adapter loaded."""
    from ..training import runs as R, scoring as E

    adapter_dir = R.resolve_adapter(path)
    run_json = R.run_json_of(adapter_dir)
    cfg = R.config_from(R.read_run_json(run_json), run_json)
    if cfg.model != model_name:
        raise ConfigError(f"adapter {path} was trained on model {cfg.model!r}, not {model_name!r}; compare adapters "
                          f"of the model being analysed (--model {cfg.model})")
    model, _ = E.restore(cfg, task if task is not None and cfg.task == task.name else E.load_task(cfg), adapter_dir)
    return model, cfg


def analyze(model: str = "minilm", task: str = "code-search", adapters=(), out_dir=None, *, probing: bool = True,
            properties=PROPERTIES, n_train: int = 600, n_valid: int = 150, n_test: int = 300, tokens_per_function: int = 24,
            search_samples: int = 500, samples: int = 500, finetune: tuple | None = None, finetune_steps: int = 50,
            threshold: float = FZ.THRESHOLD, score: str = FZ.SCORE, max_len: int = 256, batch_size: int = 16,
            device: str | None = None, seed: int = 0, progress: bool = True) -> dict:
    """Probe ``model`` layer by layer and compare it with fine-tuned versions; returns the analysis dict.

    ``adapters``: ``train`` output folders (or adapter folders) of the same model, compared with the
    pretrained model on ``samples`` texts of ``task``'s valid split. ``finetune``: methods to
    fine-tune briefly (``finetune_steps`` steps, train split) for the same comparison when no
    trained adapter is at hand (default: ``("full",)`` without ``adapters``, none with them);
    ``finetune_steps=0`` skips it. The recommended freeze depth K
    follows :func:`deltatune.training.freeze.recommend_k` and its rule is written beside it.
    """
    import deltatune as dt
    from ..models import load_backbone
    from ..sites import num_layers
    from ..tasks import load_task
    from ..training.config import TrainConfig
    from ..tasks.kinds import get_kind

    if score not in SCORES:
        raise ConfigError(f"unknown similarity score {score!r} for the freeze rule (--score); choose one of "
                          f"{', '.join(SCORES)}")
    folder = None
    if out_dir is not None:  # before any work: a folder deltatune may write (a user's files are never replaced)
        from .report import folder as analysis_folder
        folder = analysis_folder(out_dir)
        folder.check()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    finetune = tuple(finetune) if finetune is not None else (() if adapters else ("full",))
    task_data = load_task(task, seed=seed)
    result = {"model": model, "task": task, "created": datetime.datetime.now().isoformat(timespec="seconds"),
              "settings": dict(n_train=n_train, n_valid=n_valid, n_test=n_test, tokens_per_function=tokens_per_function,
                               search_samples=search_samples, samples=samples, finetune=list(finetune),
                               finetune_steps=finetune_steps, threshold=threshold, score=score, max_len=max_len, seed=seed)}
    backbone, tokenizer = load_backbone(model, "base")
    result["blocks"] = num_layers(backbone)  # hidden states: blocks + 1 (index 0: the embeddings)
    if probing:
        search_rows = None
        if "semantic" in properties:
            search = load_task("code-search", seed=seed, max_eval=search_samples)
            search_rows = search.test
        functions = probe_functions(n_train, n_valid, n_test, seed=seed)
        result["probing"] = probe(backbone, tokenizer, model_name=model, functions=functions, search_rows=search_rows,
                                  tokens_per_function=tokens_per_function, max_len=max_len, batch_size=batch_size,
                                  device=device, progress=progress, properties=properties, seed=seed)
    # representational similarity: the pretrained task model against each fine-tuned one
    kind = get_kind(task_data.kind)
    field = kind.text_field
    rows = task_data.split("valid") if len(task_data.split("valid")) >= 10 else task_data.split("train")
    texts = [str(r[field]) for r in rows[:samples]]
    compared = {}
    if adapters or (finetune and finetune_steps):
        base_model, tok = kind.build_model(model, len(task_data.labels or []))
        before = extract(base_model, tok, texts, model_name=model, max_len=max_len, batch_size=batch_size, device=device,
                         progress=progress, desc="similarity: pretrained")["pooled"]
        for path in adapters:
            tuned, cfg = _load_adapter_model(path, model, task_data)
            after = extract(tuned, tok, texts, model_name=model, max_len=max_len, batch_size=batch_size, device=device,
                            progress=progress, desc=f"similarity: {Path(path).name}")["pooled"]
            name = f"{cfg.method} ({Path(path).name})"
            compared[name] = {"source": str(path), "method": cfg.method, "options": cfg.options, **per_layer(before, after)}
        for method in (finetune if finetune_steps else ()):
            tuned, tok2 = kind.build_model(model, len(task_data.labels or []))
            cfg = TrainConfig(model=model, task=task, method=method, max_len=max_len, batch_size=batch_size)
            objective = kind(tok2, cfg)
            examples = objective.encode(task_data.split("train"), train=True)
            dt.attach(tuned, method)
            FZ.short_finetune(tuned, objective, examples, steps=finetune_steps, batch_size=batch_size,
                              lr=dt.method_info(method)["lr"], seed=seed, device=device, progress=progress)
            after = extract(tuned, tok, texts, model_name=model, max_len=max_len, batch_size=batch_size, device=device,
                            progress=progress, desc=f"similarity: {method}", cache=False)["pooled"]
            compared[f"{method} ({finetune_steps} steps)"] = {"source": f"short fine-tune, {finetune_steps} steps",
                                                              "method": method, **per_layer(before, after)}
    if compared:
        result["similarity"] = {"samples": len(texts), "split": "valid" if rows is task_data.valid else "train",
                                "models": compared,
                                "pretrained_top_dimension_share": [top_dimension_share(x) for x in before]}
        ks = {name: FZ.recommend_k(c[score], threshold) for name, c in compared.items()}
        result["freeze"] = {"k": min(ks.values()), "per_model": ks,
                            "rule": FZ.rule_text(threshold, score, finetune_steps if not adapters else None)}
    if folder is not None:
        from .report import write
        with folder:
            result["files"] = {k: str(v) for k, v in write(result, folder).items()}
    return result
