"""The training engine on tiny random models and toy tasks written as JSONL folders (no downloads)."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file

from deltatune.errors import ConfigError, TrainingError
from deltatune.tasks import TaskData, load_task
from deltatune.training import TrainConfig, evaluate, train
from deltatune.training.loop import DataOrder, lr_factor as _lr_factor

WARM = "red green blue cat dog fish sun moon".split()
COLD = "star tree rock river cloud apple pear plum".split()


def _rows(kind: str, n: int, rng: random.Random) -> list[dict]:
    if kind == "classification":  # the label is which word list the text comes from
        labels = [rng.randrange(2) for _ in range(n)]
        return [{"text": " ".join(rng.sample(COLD if y else WARM, 3)), "label": y} for y in labels]
    if kind == "retrieval":
        pairs = [(rng.choice(WARM), rng.choice(COLD)) for _ in range(n)]
        return [{"query": f"{a} and {b}", "code": f"def {a}_{b}(): return '{b}'"} for a, b in pairs]
    return [{"prompt": f"repeat {w}", "target": w} for w in (rng.choice(WARM + COLD) for _ in range(n))]


def write_task(folder, kind: str, n_train: int = 64, n_eval: int = 16) -> str:
    rng = random.Random(kind)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("valid", n_eval), ("test", n_eval)):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(kind, n, rng)))
    return str(folder)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    return {kind: write_task(root / kind, kind) for kind in ("classification", "retrieval", "generation")}


def config(tmp_path, task, **over) -> TrainConfig:
    base = dict(model="tiny-bert", task=task, method="lora", max_steps=12, batch_size=8, eval_every=6, lr=1e-2,
                max_len=32, max_new_tokens=4, out_dir=str(tmp_path / "run"), progress=False)
    return TrainConfig(**{**base, **over})


def losses(out_dir) -> list[float]:
    lines = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if "loss" in r]


def adapter(path) -> dict:
    return load_file(path / "adapter.safetensors")


# A random tiny decoder's output distribution needs its (frozen) embeddings to move: "full" for generation.
@pytest.mark.parametrize("kind, model, method", [("classification", "tiny-bert", "lora"),
                                                 ("retrieval", "tiny-bert", "lora"),
                                                 ("generation", "tiny-llama", "full")])
def test_loss_decreases(tmp_path, tasks, kind, model, method):
    cfg = config(tmp_path, tasks[kind], model=model, method=method, max_steps=30, eval_every=30)
    summary = train(cfg)
    seen = losses(tmp_path / "run")
    assert len(seen) == 30
    assert sum(seen[-5:]) / 5 < 0.8 * sum(seen[:5]) / 5, seen
    assert summary["steps"] == 30


def test_metrics_json_fields_and_evaluate_reproduces(tmp_path, tasks):
    summary = train(config(tmp_path, tasks["retrieval"]))
    out = tmp_path / "run"
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(summary))
    for key in ("method", "task", "model", "metric", "value", "zero_shot_value", "trainable_params", "total_params",
                "train_seconds", "step_seconds_median", "peak_rss_mb", "steps", "seed", "options", "mrr", "recall@1"):
        assert key in summary, key
    assert summary["metric"] == "mrr" and summary["value"] == summary["mrr"]
    assert 0 < summary["trainable_params"] < summary["total_params"]
    assert 0 <= summary["zero_shot_value"] <= 1 and summary["peak_rss_mb"] > 0
    assert summary["best_step"] in (6, 12)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert records[0]["zero_shot"] and records[0]["mrr"] == summary["zero_shot_value"]
    assert [r["step"] for r in records if r.get("split") == "valid"] == [6, 12]
    again = evaluate(out / "best", max_len=32)  # model and task come from run.json; the run's max_len reproduces it
    assert again["value"] == summary["value"] and again["mrr"] == summary["mrr"]
    assert evaluate(out, split="valid", max_len=32)["value"] == summary["valid_value"]  # out_dir means its best adapter


@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_resume_equals_uninterrupted(tmp_path, tasks, method):
    # tiny-bert has dropout, so this also checks that the RNG state is restored; prefix keeps its
    # training-only MLP in the checkpoint (fold=False).
    straight = train(config(tmp_path / "a", tasks["classification"], method=method))
    cut = config(tmp_path / "b", tasks["classification"], method=method, stop_after=7)
    stopped = train(cut)
    assert stopped["stopped_at"] == 7 and not (tmp_path / "b" / "run" / "metrics.json").exists()
    resumed = train(TrainConfig(**{**cut.__dict__, "stop_after": None, "resume": True}))
    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    for sub in ("checkpoints/step-000012/adapter", "best"):
        left, right = adapter(a / sub), adapter(b / sub)
        assert left.keys() == right.keys()
        assert all(torch.equal(left[k], right[k]) for k in left), sub
    assert losses(a) == losses(b)
    assert resumed["value"] == straight["value"] and resumed["steps"] == 12


def test_resume_refuses_changed_settings(tmp_path, tasks):
    train(config(tmp_path, tasks["classification"], stop_after=3))
    with pytest.raises(ConfigError, match="batch_size was 8, now 4"):
        train(config(tmp_path, tasks["classification"], batch_size=4, resume=True))
    resumed = train(config(tmp_path, tasks["classification"], lr=5e-3, resume=True))  # after a NaN, say
    assert resumed["steps"] == 12


def test_grad_accumulation_matches_a_bigger_batch(tmp_path, tasks):
    # tiny-llama has no dropout, and causal attention makes right padding invisible to real tokens.
    common = dict(model="tiny-llama", max_steps=3, eval_every=3)
    big = train(config(tmp_path / "a", tasks["classification"], batch_size=8, **common))
    accum = train(config(tmp_path / "b", tasks["classification"], batch_size=4, grad_accum=2, **common))
    left, right = adapter(tmp_path / "a" / "run" / "best"), adapter(tmp_path / "b" / "run" / "best")
    for k in left:
        torch.testing.assert_close(left[k], right[k], atol=1e-5, rtol=1e-4)
    assert losses(tmp_path / "a" / "run") == pytest.approx(losses(tmp_path / "b" / "run"), rel=1e-4)
    assert big["value"] == accum["value"]


@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_gradient_checkpointing_gives_the_same_training(tmp_path, tasks, monkeypatch, method):
    import transformers.modeling_utils as mu

    calls = []
    checkpoint = mu.checkpoint
    monkeypatch.setattr(mu, "checkpoint", lambda *a, **k: calls.append(k) or checkpoint(*a, **k))
    common = dict(model="tiny-llama", method=method, max_steps=4, eval_every=4)
    plain = train(config(tmp_path / "a", tasks["generation"], **common))
    assert not calls
    ckpt = train(config(tmp_path / "b", tasks["generation"], grad_checkpointing=True, **common))
    assert calls and all(k.get("use_reentrant") is False for k in calls)
    left, right = adapter(tmp_path / "a" / "run" / "best"), adapter(tmp_path / "b" / "run" / "best")
    assert all(torch.allclose(left[k], right[k], atol=1e-6) for k in left)
    assert plain["value"] == ckpt["value"]


def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(tmp_path, tasks, monkeypatch):
    from deltatune.tasks.kinds import Classification

    calls = {"n": 0}
    loss = Classification.loss

    def poisoned(self, model, batch):
        calls["n"] += 1
        value = loss(self, model, batch)
        return value * float("nan") if calls["n"] == 3 + 8 else value  # calls 1-3: the check that a batch fits

    monkeypatch.setattr(Classification, "loss", poisoned)
    with pytest.raises(TrainingError, match=r"at step 8 .*step-000006.*learning rate"):
        train(config(tmp_path, tasks["classification"], eval_every=6, max_steps=20))
    out = tmp_path / "run"
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000006"]
    assert len(losses(out)) == 7  # the good steps are logged, the bad one is named in the error


def test_early_stopping(tmp_path, tasks):
    summary = train(config(tmp_path, tasks["classification"], lr=0.0, max_steps=40, eval_every=2,
                           early_stop_patience=2, warmup_ratio=0.0))
    assert summary["stopped_early"] and summary["steps"] < 40
    assert summary["best_step"] == summary["steps"] - 4


def test_bf16_autocast_trains(tmp_path, tasks):
    summary = train(config(tmp_path, tasks["classification"], bf16=True, max_steps=3, eval_every=3))
    assert summary["steps"] == 3 and all(map(math.isfinite, losses(tmp_path / "run")))


def test_truncation_warns_once_with_a_count(tmp_path, tasks):
    with pytest.warns(UserWarning, match=r"\d+ of \d+ inputs were longer than max_len=4") as seen:
        train(config(tmp_path, tasks["retrieval"], max_len=4, max_steps=2, eval_every=2))
    assert sum("max_len" in str(w.message) for w in seen) == 1


def test_train_accepts_a_loaded_task_and_evaluate_takes_it_too(tmp_path, tasks):
    data = load_task(tasks["generation"])
    data = TaskData("toy", data.kind, "exact_match", None, data.train, data.valid, data.test)
    summary = train(config(tmp_path, "ignored", model="tiny-gpt2", max_steps=4, eval_every=4), task=data)
    assert summary["task"] == "toy"
    assert evaluate(tmp_path / "run" / "best", task=data, max_len=32)["value"] == summary["value"]


def test_generation_loss_counts_target_tokens_only(tmp_path, tasks):
    from deltatune.models import load_backbone
    from deltatune.tasks.kinds import Generation

    _, tokenizer = load_backbone("tiny-llama")
    objective = Generation(tokenizer, config(tmp_path, "x", max_len=6))
    short, long = objective.encode([{"prompt": "repeat red", "target": "red"},
                                    {"prompt": "one two three four five", "target": "six seven"}], train=True)
    assert short["labels"] == [-100, -100, short["input_ids"][2], tokenizer.eos_token_id]
    assert len(long["input_ids"]) == 6 and long["labels"][-3:] == long["input_ids"][-3:]  # the prompt's end is cut
    assert long["labels"][:3] == [-100] * 3
    prompts = objective.encode([{"prompt": "repeat red", "target": "red"}], train=False)
    assert prompts[0]["input_ids"] == short["input_ids"][:2]
    batch = objective.pad([prompts[0], long], left=True)  # generate() pads on the left
    assert batch["attention_mask"][0].tolist() == [0, 0, 0, 0, 1, 1]


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
def test_batched_generation_with_left_padding_equals_one_by_one(tmp_path, model):
    from deltatune.tasks.kinds import Generation, build_task_model

    lm, tokenizer = build_task_model(model, "generation")
    objective = Generation(tokenizer, config(tmp_path, "x", max_new_tokens=5))
    prompts = objective.encode([{"prompt": p, "target": ""} for p in ("repeat red", "a much longer prompt here", "x")],
                               train=False)
    with torch.no_grad():
        batched = objective.predict(lm.eval(), prompts, 3, "cpu")
        alone = [objective.predict(lm, [p], 1, "cpu")[0] for p in prompts]
    assert batched == alone and all(batched)


def test_data_order_is_seeded_and_resumable():
    straight = DataOrder(10, seed=3)
    batches = [straight.take(4) for _ in range(6)]  # runs across epoch boundaries
    assert sorted(sum(batches[:5], [])[:10]) == list(range(10))
    resumed = DataOrder(10, seed=3, consumed=12)
    assert [resumed.take(4) for _ in range(3)] == batches[3:]
    assert DataOrder(10, seed=4).take(10) != DataOrder(10, seed=3).take(10)


def test_lr_schedule_warms_up_then_decays_to_zero():
    factors = [_lr_factor(s, 10, 2) for s in range(10)]
    assert factors[:3] == [0.5, 1.0, 1.0] and factors[-1] == pytest.approx(1 / 8)
    assert all(a >= b for a, b in zip(factors[1:], factors[2:]))


# ----------------------------------------------------------------------------- predictions and zero-shot

def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("kind, model", [("classification", "tiny-bert"), ("retrieval", "tiny-bert"),
                                         ("generation", "tiny-llama")])
def test_every_scoring_writes_its_predictions_and_every_kind_has_a_zero_shot(tmp_path, tasks, kind, model):
    summary = train(config(tmp_path, tasks[kind], model=model, max_steps=2, eval_every=2))
    out, test = tmp_path / "run", load_task(tasks[kind]).test
    assert summary["zero_shot_value"] is not None  # was None for classification and generation
    for name in ("predictions-test.jsonl", "predictions-test-zero-shot.jsonl", "predictions-valid.jsonl"):
        records = _jsonl(out / name)
        assert len(records) == len(test) and [r["index"] for r in records] == list(range(len(test)))
        assert all({"input", "reference", "prediction"} <= set(r) for r in records)
    source = {"classification": "text", "retrieval": "query", "generation": "prompt"}[kind]
    test_records = _jsonl(out / "predictions-test.jsonl")
    assert [r["input"] for r in test_records] == [row[source] for row in test]
    assert summary["predictions_file"] == str(out / "predictions-test.jsonl")
    assert _jsonl(out / "predictions-valid.jsonl")[0]["step"] == 2
    if kind == "classification":  # the predictions are the ones scored
        hits = [r["prediction"] == r["reference"] for r in test_records]
        assert sum(hits) / len(hits) == pytest.approx(summary["accuracy"])
    if kind == "generation":
        assert sum(r["prediction"] == r["reference"] for r in test_records) / len(test) == summary["exact_match"]
        zero, logged = _jsonl(out / "predictions-test-zero-shot.jsonl"), _jsonl(out / "log.jsonl")[0]
        assert sum(r["prediction"] == r["reference"] for r in zero) / len(test) == logged["exact_match"]
    if kind == "retrieval":  # each query's rank among the split's codes gives back the MRR
        assert all(r["candidates"] == len(test) for r in test_records)
        assert sum(1 / r["rank"] for r in test_records) / len(test) == pytest.approx(summary["mrr"])
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert records[0]["zero_shot"] and records[0][summary["metric"]] == summary["zero_shot_value"]


def test_a_fresh_run_removes_the_previous_runs_predictions(tmp_path, tasks):
    out = tmp_path / "run"
    train(config(tmp_path, tasks["classification"], max_steps=2, eval_every=2))
    (out / "predictions-valid.jsonl").write_text("stale\n")
    again = {"overwrite": True} if "overwrite" in TrainConfig.__dataclass_fields__ else {}  # replacing a run is asked for
    train(config(tmp_path, tasks["classification"], max_steps=1, eval_every=5, **again))  # validates at step 1 only
    assert _jsonl(out / "predictions-valid.jsonl")[0]["step"] == 1


def test_evaluate_scores_the_whole_split_unless_told(tmp_path, tasks):
    from deltatune.training import resolve_adapter

    train(config(tmp_path, tasks["retrieval"], max_steps=2, eval_every=2, max_eval=6, max_len=8))
    out = tmp_path / "run"
    assert resolve_adapter(out) == out / "best" and resolve_adapter(out / "best") == out / "best"
    whole = evaluate(out)  # the run scored 6 test examples at max_len 8; evaluate does not inherit that
    assert whole["examples"] == 16 and whole["max_eval"] is None and whole["max_len"] == 8  # issue 27: the run's length
    assert whole["max_len_source"] == "the run's training length" and whole["run_max_len"] == 8
    again = evaluate(out, max_eval=6, max_len=8)  # the run's own subset (a fixed data seed picks it) and length
    assert again["examples"] == 6 and again["mrr"] == json.loads((out / "metrics.json").read_text())["mrr"]
    chosen = evaluate(out, max_eval=4, max_len=24, batch_size=3, out_dir=tmp_path / "elsewhere")
    assert (chosen["examples"], chosen["max_len"], chosen["batch_size"]) == (4, 24, 3)
    assert len(_jsonl(tmp_path / "elsewhere" / "predictions-test.jsonl")) == 4
    saved = json.loads((tmp_path / "elsewhere" / "metrics-test.json").read_text())
    assert saved["mrr"] == chosen["mrr"] and saved["max_len"] == 24
    with pytest.raises(ConfigError, match="max_eval"):
        evaluate(out, max_eval=0)


def test_evaluate_of_a_missing_directory_names_the_fix(tmp_path):
    from deltatune.errors import AdapterFileError

    with pytest.raises(AdapterFileError, match="no adapter directory .*deltatune train"):
        evaluate(tmp_path / "nowhere")


def test_one_slug_for_the_engine_and_the_cli():
    from deltatune import cli
    from deltatune.training import config as engine

    assert cli._slug is engine.slug
    assert engine.slug("Qwen/Qwen2.5-0.5B") == "Qwen2.5-0.5B"  # not cut at the dot as a file suffix
    assert engine.slug("data/my task.jsonl") == "my-task" and engine.slug("hf:glue/sst2") == "sst2"
    assert engine.slug("//") == "run"


def test_zero_shot_score_is_cached_across_runs_and_changes_nothing_else(tmp_path, tasks, monkeypatch):
    """A sweep scores the pretrained model once: the second run (another method) reads the same score and
    predictions from the cache and trains exactly as the first; anything the score depends on misses."""
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DELTATUNE_ZERO_SHOT_CACHE", "1")
    first = train(config(tmp_path, tasks["retrieval"], out_dir=str(tmp_path / "a")))
    again = train(config(tmp_path, tasks["retrieval"], out_dir=str(tmp_path / "b")))
    other = train(config(tmp_path, tasks["retrieval"], method="ia3", out_dir=str(tmp_path / "c")))
    assert (first["zero_shot_cached"], again["zero_shot_cached"], other["zero_shot_cached"]) == (False, True, True)
    assert first["zero_shot_value"] == again["zero_shot_value"] == other["zero_shot_value"]
    assert [json.loads(line) for line in (tmp_path / "a" / "predictions-test-zero-shot.jsonl").open()] == \
        [json.loads(line) for line in (tmp_path / "b" / "predictions-test-zero-shot.jsonl").open()]
    assert again["value"] == first["value"] and losses(tmp_path / "a") == losses(tmp_path / "b")
    a, b = adapter(tmp_path / "a" / "best"), adapter(tmp_path / "b" / "best")  # a hit leaves the random stream as it was
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    changed = train(config(tmp_path, tasks["retrieval"], max_len=24, out_dir=str(tmp_path / "d")))
    assert changed["zero_shot_cached"] is False
    for entry in (tmp_path / "cache" / "zero-shot").glob("*.json"):  # a damaged entry is scored again
        entry.write_text("{not json")
    damaged = train(config(tmp_path, tasks["retrieval"], out_dir=str(tmp_path / "e")))
    assert damaged["zero_shot_cached"] is False and damaged["zero_shot_value"] == first["zero_shot_value"]
    monkeypatch.setenv("DELTATUNE_ZERO_SHOT_CACHE", "0")
    assert train(config(tmp_path, tasks["retrieval"], out_dir=str(tmp_path / "f")))["zero_shot_cached"] is False


def test_zero_shot_cache_of_a_classifier_keys_on_its_seeded_head(tmp_path, tasks, monkeypatch):
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DELTATUNE_ZERO_SHOT_CACHE", "1")
    train(config(tmp_path, tasks["classification"], out_dir=str(tmp_path / "a")))
    assert train(config(tmp_path, tasks["classification"], out_dir=str(tmp_path / "b")))["zero_shot_cached"] is True
    assert train(config(tmp_path, tasks["classification"], seed=1, out_dir=str(tmp_path / "c")))["zero_shot_cached"] is False


def test_grad_checkpointing_auto_turns_on_over_its_threshold_only(tmp_path, tasks, monkeypatch, capsys):
    """"auto" (the default) checkpoints when the largest batch would keep more activations than
    AUTO_CHECKPOINT_BYTES, says so, and trains the same; off and small batches do not checkpoint."""
    import deltatune.training.memory as engine

    common = dict(model="tiny-llama", method="lora", max_steps=4, eval_every=4)
    small = train(config(tmp_path / "a", tasks["generation"], **common))
    assert small["grad_checkpointing"] is False
    monkeypatch.setattr(engine, "AUTO_CHECKPOINT_BYTES", 1)
    capsys.readouterr()
    big = train(config(tmp_path / "b", tasks["generation"], **common))
    assert big["grad_checkpointing"] is True and "grad_checkpointing='auto'" in capsys.readouterr().err
    assert train(config(tmp_path / "c", tasks["generation"], grad_checkpointing=False, **common))["grad_checkpointing"] is False
    left, right = adapter(tmp_path / "a" / "run" / "best"), adapter(tmp_path / "b" / "run" / "best")
    assert all(torch.allclose(left[k], right[k], atol=1e-6) for k in left) and small["value"] == big["value"]


def test_grad_checkpointing_flag_takes_on_off_auto():
    from deltatune import cli

    parse = cli.build_parser().parse_args
    base = ["train", "--model", "tiny-bert", "--task", "code-search", "--method", "lora"]
    assert parse(base).grad_checkpointing is None  # the engine's default ("auto")
    assert parse(base + ["--grad-checkpointing"]).grad_checkpointing is True
    assert parse(base + ["--grad-checkpointing", "off"]).grad_checkpointing is False
    assert parse(base + ["--grad-checkpointing", "auto"]).grad_checkpointing == "auto"
    with pytest.raises(SystemExit):
        parse(base + ["--grad-checkpointing", "sometimes"])
    with pytest.raises(ConfigError, match="grad_checkpointing"):
        train(TrainConfig(grad_checkpointing="sometimes"))


@pytest.mark.parametrize("dp", [None, 8.0])
def test_the_trained_model_is_freed_before_the_best_adapter_is_scored(tmp_path, tasks, monkeypatch, dp):
    """The test score loads the best adapter into a fresh model: the trained one (and, under full
    fine-tuning, its weights' gradients) must be gone by then, or the run holds two models at once."""
    import weakref

    import deltatune.training.scoring as T
    import deltatune.training.run as R

    built, alive = [], []
    real_build, real_restore = R.build_task_model, T.restore

    def build(*args, **kwargs):
        out = real_build(*args, **kwargs)
        built.append([weakref.ref(out[0])] + [weakref.ref(p) for p in out[0].parameters()])
        return out

    def restore(*args, **kwargs):
        alive.append(sum(ref() is not None for ref in built[0]))
        return real_restore(*args, **kwargs)

    monkeypatch.setattr(R, "build_task_model", build)
    monkeypatch.setattr(T, "restore", restore)
    summary = train(config(tmp_path, tasks["classification"], method="full", max_steps=2, eval_every=2, dp_epsilon=dp))
    assert alive == [0]
    assert (summary.get("dp_epsilon") is not None) == (dp is not None)
