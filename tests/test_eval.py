"""`deltatune eval` scores a run, an adapter folder (deltatune or PEFT format) or the bare model the same way,
at a length it says where it came from; the evaluation subset is the same for every seed; what the engine does
slowly shows a progress line; emulated bf16 is named."""
from __future__ import annotations

import dataclasses
import json
import shutil
import warnings

import pytest
import torch

import deltatune as dt
from deltatune.models import load_backbone
from deltatune.training import TrainConfig, evaluate, train
from deltatune.training import config as config_module
from deltatune.training import scoring
from tests.test_cli import run
from tests.test_train import write_task


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    task = write_task(root / "task", "retrieval", n_eval=24)
    cfg = TrainConfig(model="tiny-bert", task=task, method="lora", max_steps=2, eval_every=2, batch_size=4, lr=0.05,
                      max_len=16, max_eval=8, out_dir=str(root / "run"), progress=False)
    summary = train(cfg)
    return {"root": root, "task": task, "run": root / "run", "summary": summary}


def test_a_run_a_bare_adapter_a_peft_folder_and_the_bare_model_are_scored_alike(trained, tmp_path):
    run_dir, task, summary = trained["run"], trained["task"], trained["summary"]
    same = dict(max_eval=8, max_len=16)
    from_run = evaluate(run_dir, max_eval=8)  # the run's own length by default: its own test score
    assert (from_run["max_len"], from_run["max_len_source"]) == (16, "the run's training length")
    assert from_run["mrr"] == summary["mrr"] and from_run["model"] == "tiny-bert"
    shutil.copytree(run_dir / "best", tmp_path / "bare")
    with pytest.raises(dt.ConfigError, match="outside a run .*--model and --task must say which model and task"):
        evaluate(tmp_path / "bare")
    bare = evaluate(tmp_path / "bare", task=task, model="tiny-bert", **same)
    assert bare["mrr"] == summary["mrr"] and bare["run_max_len"] is None
    plain, _ = load_backbone("tiny-bert")
    dt.save_adapter(dt.load_adapter(plain, tmp_path / "bare"), tmp_path / "peft", format="peft")
    in_peft = evaluate(tmp_path / "peft", task=task, model="tiny-bert", **same)
    assert in_peft["mrr"] == pytest.approx(summary["mrr"], abs=1e-9)
    zero = evaluate(None, task=task, model="tiny-bert", **same)
    assert zero["adapter"] is None and zero["mrr"] == summary["zero_shot_value"]
    with pytest.raises(dt.ConfigError, match="trained on tiny-bert"):
        evaluate(run_dir, model="tiny-llama")


def test_eval_asks_for_model_and_task_by_name_and_says_what_it_scored(trained, tmp_path, capsys):
    shutil.copytree(trained["run"] / "best", tmp_path / "bare")
    code, _, err = run(capsys, "eval", "--adapter", str(tmp_path / "bare"), "--model", "tiny-bert")
    assert code == 2 and "--task must say which task to score it on" in err and err.count("\n") == 1
    code, _, err = run(capsys, "eval", "--task", trained["task"])
    assert code == 2 and "without an adapter the bare model is scored (zero-shot): --model must say" in err
    code, out, err = run(capsys, "eval", "--model", "tiny-bert", "--task", trained["task"], "--max-eval", "8",
                         "--out", str(tmp_path / "zero"))
    assert code == 0, err
    assert "max_len 512 (the model's maximum: 512 positions;" in out and "adapter none (zero-shot)" in out
    assert len((tmp_path / "zero" / "predictions-test.jsonl").read_text().splitlines()) == 8
    code, out, err = run(capsys, "eval", "--adapter", str(trained["run"]), "--max-len", "24", "--max-eval", "8",
                         "--out", str(tmp_path / "longer"))
    assert code == 0, err
    assert "max_len 24 (--max-len;" in out and "--max-len 16 (the default) reproduces its own scoring" in out


def test_outside_a_run_max_len_defaults_to_the_models_configured_maximum(trained, tmp_path):
    """A model folder with a sentence-transformers config (MiniLM's says 256): its max_seq_length applies."""
    from deltatune.models import configured_max_len

    model, tokenizer = load_backbone("tiny-bert")
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 12}))
    with pytest.warns(UserWarning, match="longer than max_len=12 tokens"):
        zero = evaluate(None, task=trained["task"], model=str(tmp_path / "model"), max_eval=8)
    assert zero["max_len"] == 12 and "configured maximum (max_seq_length in its sentence_bert_config.json)" in \
        zero["max_len_source"]
    assert configured_max_len("minilm") == 256  # MiniLM's own sentence_bert_config.json


def test_every_seed_is_scored_on_the_same_evaluation_subset(trained):
    base = TrainConfig(model="tiny-bert", task=trained["task"], max_train=8, max_eval=5)
    first, second = scoring.load_task(base), scoring.load_task(dataclasses.replace(base, seed=1))
    assert first.test == second.test and first.valid == second.valid and len(first.test) == 5
    assert first.train != second.train  # the training subset is each run's own


def test_bench_zero_shot_row_has_no_spread_over_seeds(tmp_path, capsys):
    from deltatune import report

    task = write_task(tmp_path / "task", "retrieval", n_eval=24)
    code, _, err = run(capsys, "bench", "--model", "tiny-bert", "--task", task, "--methods", "bitfit", "--seeds", "2",
                       "--max-steps", "1", "--batch-size", "4", "--max-eval", "6", "--max-len", "16",
                       "--out", str(tmp_path / "bench"))
    assert code == 0, err
    rows = report.read_csv(tmp_path / "bench" / "results.csv")
    assert [r["seed"] for r in rows] == [0, 1]
    assert rows[0]["zero_shot_value"] == rows[1]["zero_shot_value"]
    tested = [[json.loads(line)["input"] for line in open(r[name])] for r in rows
              for name in ("zero_shot_predictions_file", "predictions_file")]
    assert len(tested[0]) == 6 and all(inputs == tested[0] for inputs in tested)  # 6 of the 24: the same 6


def test_emulated_bf16_is_named_once_with_the_fix(monkeypatch):
    monkeypatch.setattr(config_module, "native_bf16", lambda device, cpu_flags=None: False)
    monkeypatch.setattr(config_module, "_WARNED_BF16", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            config_module.resolved(TrainConfig(bf16=True, device="cpu"), None)
        config_module.resolved(TrainConfig(bf16="auto", device="cpu"), None)  # auto: off here, no warning
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "no native bfloat16" in messages[0] and "drop --bf16, or use --bf16 auto" in messages[0]


def test_compile_on_a_cpu_is_refused_with_the_measurement_and_writes_nothing(tmp_path, capsys):
    task = write_task(tmp_path / "task", "retrieval", n_eval=6)
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "--model", "tiny-bert", "--task", str(task), "--method", "lora", "--compile",
                       "--max-steps", "1", "--out", str(out))
    assert code == 2 and "--compile on cpu" in err and "0.87-0.91x the eager speed" in err and "drop --compile" in err
    assert "Traceback" not in err and not out.exists()
    assert not TrainConfig().compile  # off unless asked for


def test_the_batch_fit_check_and_every_scoring_pass_show_progress(tmp_path, capsys):
    task = write_task(tmp_path / "task", "retrieval", n_eval=6)
    train(TrainConfig(model="tiny-bert", task=task, method="lora", max_steps=1, eval_every=1, batch_size=4,
                      max_len=16, out_dir=str(tmp_path / "run"), progress=True))
    err = capsys.readouterr().err  # each bar's first state (its later ones are drawn at most every 0.1 s)
    assert "batch-fit check: a batch of 4 examples of up to 18 tokens:   0%|          | 0/3" in err
    assert err.count("scoring task test:   0%|          | 0/12") == 2  # 6 queries and 6 codes: zero-shot, best
    assert "scoring task valid:   0%|          | 0/12" in err


def test_a_generation_pass_counts_inputs_not_generated_tokens():
    model, tokenizer = load_backbone("tiny-llama")
    batch = tokenizer(["a b c", "d e"], padding=True, return_tensors="pt")
    with scoring.progress(model, [{"input_ids": [1]}] * 5, "scoring", enabled=True) as bar:
        with torch.no_grad():
            model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            model(**tokenizer(["x"] * 3, return_tensors="pt"))
        assert (bar.n, bar.total) == (5, 5)
    assert "generate" not in vars(model)  # the model is as it was
