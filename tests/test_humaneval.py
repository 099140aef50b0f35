"""HumanEval (problems, stop sequences, pass@k, execution, the eval command) and the code-generation task."""
import ast
import json
import math
from pathlib import Path

import pytest

from deltatune.cli import main
from deltatune.errors import ConfigError
from deltatune.sandbox import run_programs
from deltatune.tasks import humaneval, load_task
from deltatune.tasks import code


# ----------------------------------------------------------------------------- pass@k

@pytest.mark.parametrize("n, c, k, expected", [
    (1, 1, 1, 1.0), (1, 0, 1, 0.0),
    (10, 3, 1, 0.3),  # pass@1 is the fraction correct
    (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2)/C(5,2)
    (3, 1, 2, 1 - 1 / 3),  # 1 - C(2,2)/C(3,2)
    (10, 3, 10, 1.0), (10, 8, 3, 1.0),  # fewer than k wrong samples: some k-subset always passes
    (20, 5, 10, 1 - math.comb(15, 10) / math.comb(20, 10)),
    (200, 1, 100, 0.5),  # 1 - C(199,100)/C(200,100) = 1 - 100/200
])
def test_pass_at_k_matches_hand_computed_values(n, c, k, expected):
    assert humaneval.pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_pass_at_k_refuses_impossible_counts():
    for n, c, k in [(5, 6, 1), (5, 1, 6), (5, 1, 0), (3, -1, 1)]:
        with pytest.raises(ValueError):
            humaneval.pass_at_k(n, c, k)


# ----------------------------------------------------------------------------- problems and programs

def test_problems_come_from_the_package_file():
    problems = humaneval.load_problems()
    assert [p["task_id"] for p in problems] == [f"HumanEval/{i}" for i in range(164)]
    assert all(p["prompt"].endswith("\n") and f"def {p['entry_point']}" in p["prompt"] for p in problems)
    assert [p["task_id"] for p in humaneval.load_problems(limit=3)] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    with pytest.raises(ConfigError):
        humaneval.load_problems(limit=0)


def test_truncate_stops_at_a_new_top_level_statement():
    body = "    return x + 1\n"
    for tail in ("\ndef other():\n    pass\n", "\nclass A:\n    pass", "\n# a comment\n", "\nif __name__ == '__main__':\n",
                 "\nprint(f(1))\n", "\n```\nThis function adds one."):
        assert humaneval.truncate(body + tail) == body
    assert humaneval.truncate(body + "    # indented comments stay\n    if x:\n        pass\n") == \
        body + "    # indented comments stay\n    if x:\n        pass\n"
    assert humaneval.truncate("def again(x):\n    return 1\n") == ""  # the prompt's newline precedes it
    assert humaneval.truncate("```\nprose") == ""


def test_canonical_solutions_pass_and_wrong_ones_fail():
    problems = humaneval.load_problems(limit=4)
    programs = [humaneval.program(p, p["canonical_solution"]) for p in problems]
    programs += [humaneval.program(problems[0], "    return None\n"),
                 humaneval.program(problems[1], "    while True:\n        pass\n"),
                 humaneval.program(problems[2], "    return undefined_name\n")]
    results = run_programs(programs, workers=2, timeout=3)
    assert [r.status for r in results] == ["passed"] * 4 + ["failed", "timed out", "failed"]
    assert results[4].error == "AssertionError" and results[6].error.startswith("NameError")


@pytest.mark.slow
def test_all_canonical_solutions_pass():
    problems = humaneval.load_problems()
    results = run_programs([humaneval.program(p, p["canonical_solution"]) for p in problems], timeout=20)
    assert [p["task_id"] for p, r in zip(problems, results) if not r.passed] == []


# ----------------------------------------------------------------------------- evaluate and the command

def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_evaluate_writes_metrics_and_one_record_per_sample_and_resumes(tmp_path):
    out = tmp_path / "he"
    m = humaneval.evaluate(model="tiny-llama", limit=2, max_new_tokens=3, out_dir=out, progress=False, workers=2)
    assert m["problems"] == 2 and m["n"] == 1 and m["decoding"] == "greedy" and m["max_new_tokens"] == 3
    assert set(m) >= {"pass@1", "temperature", "sandbox", "passed", "failed", "timed_out"} and "pass@10" not in m
    assert json.loads((out / "metrics-test.json").read_text())["pass@1"] == m["pass@1"]
    records = _records(out / "predictions-test.jsonl")
    assert [r["task_id"] for r in records] == ["HumanEval/0", "HumanEval/1"]
    assert all(r["result"] in ("passed", "failed", "timed out") and r["prompt"] and "completion" in r for r in records)
    assert m["pass@1"] == sum(r["result"] == "passed" for r in records) / 2
    generated = (out / "generations.jsonl").read_text()
    again = humaneval.evaluate(model="tiny-llama", limit=2, max_new_tokens=3, out_dir=out, progress=False)
    assert (out / "generations.jsonl").read_text() == generated  # nothing generated again
    assert again["pass@1"] == m["pass@1"]

    sampled = humaneval.evaluate(model="tiny-llama", limit=2, n=2, ks=(1, 2, 10), temperature=0.8,
                                 max_new_tokens=2, out_dir=tmp_path / "s", progress=False)
    assert sampled["decoding"] == "sampling" and sampled["top_p"] == 0.95
    assert {"pass@1", "pass@2"} <= set(sampled) and "pass@10" not in sampled
    records = _records(tmp_path / "s" / "predictions-test.jsonl")
    assert [(r["index"], r["sample"]) for r in records] == [(i, j) for i in range(2) for j in range(2)]


def test_evaluate_refuses_bad_settings():
    with pytest.raises(ConfigError, match="temperature"):
        humaneval.evaluate(model="tiny-llama", n=2, temperature=0.0)
    with pytest.raises(ConfigError, match="k <= n"):
        humaneval.evaluate(model="tiny-llama", n=1, ks=(5,))
    with pytest.raises(ConfigError, match="model"):
        humaneval.evaluate(model=None)


def test_eval_command(tmp_path, capsys):
    assert main(["eval", "--task", "humaneval", "--model", "tiny-llama", "--limit", "2", "--max-new-tokens", "2",
                 "--out", str(tmp_path / "cli")]) == 0
    printed = capsys.readouterr().out
    assert "humaneval pass@1 = " in printed and "2 problems, completion prompts, n=1, greedy, max 2 new tokens" in printed
    assert (tmp_path / "cli" / "predictions-test.jsonl").exists()
    assert main(["eval", "--task", "humaneval", "--model", "tiny-llama", "--n", "2"]) == 2
    assert "temperature" in capsys.readouterr().err
    assert main(["eval", "--task", "code-search"]) == 2
    assert "without an adapter the bare model is scored (zero-shot): --model must say" in capsys.readouterr().err


def test_adapter_trained_on_code_generation_evaluates_on_humaneval(tmp_path):
    from deltatune.training import TrainConfig, evaluate, train
    from deltatune.training.runs import adapter_and_model

    run = tmp_path / "run"
    train(TrainConfig(model="tiny-llama", task="code-generation", method="lora", max_steps=1, batch_size=2,
                      max_len=48, max_train=4, max_eval=2, eval_every=1, max_new_tokens=2, out_dir=str(run),
                      progress=False))
    m = evaluate(run, task="humaneval", max_eval=2, out_dir=tmp_path / "eval")
    assert m["problems"] == 2 and m["adapter"] == str(run / "best") and m["model"] == "tiny-llama"
    with pytest.raises(ConfigError, match="trained on"):  # how evaluate and deltatune eval find a run's adapter
        adapter_and_model(run, "tiny-gpt2")


# ----------------------------------------------------------------------------- the code-generation task

@pytest.fixture(scope="module")
def codegen():
    return load_task("code-generation")


def test_code_generation_rows_are_signature_and_docstring_then_body(codegen):
    assert codegen.kind == "generation" and codegen.metric == "bleu4"
    assert len(codegen.train) > 1000 and len(codegen.valid) > 100 and len(codegen.test) > 100
    for split in ("train", "valid", "test"):
        for row in codegen.split(split):
            assert row["prompt_format"] == "completion" and row["target"].endswith("\n")
            fn = ast.parse(row["prompt"] + row["target"]).body[0]
            assert fn.name == row["name"] and ast.get_docstring(fn) is not None
            head = ast.parse(row["prompt"] + "    pass\n").body[0]  # the prompt is the signature and the docstring
            assert len(head.body) == 2 and ast.get_docstring(head) == ast.get_docstring(fn)
            assert row["target"].startswith((" ", "\t"))


def test_code_generation_splits_by_module_without_humaneval(codegen):
    modules = {s: {r["path"] for r in codegen.split(s)} for s in ("train", "valid", "test")}
    assert not modules["train"] & modules["valid"] and not modules["train"] & modules["test"]
    assert not modules["valid"] & modules["test"]
    assert all(code.split_of(r["path"]) == s for s in modules for r in codegen.split(s))
    entry_points = {p["entry_point"] for p in humaneval.load_problems()}
    names = {r["name"] for s in ("train", "valid", "test") for r in codegen.split(s)}
    assert not names & entry_points
    assert any("like a HumanEval problem" in note for note in codegen.notes)


def test_completion_rows_skip_the_chat_template():
    from deltatune.models import load_backbone
    from deltatune.tasks.kinds import Generation
    from deltatune.training import TrainConfig

    _, tokenizer = load_backbone("tiny-llama")
    tokenizer.chat_template = "{% for m in messages %}<user>{{ m['content'] }}</user>{% endfor %}<assistant>"
    objective = Generation(tokenizer, TrainConfig(max_len=64))
    assert objective.prompt_text({"prompt": "def f():\n", "prompt_format": "completion"}) == "def f():\n"
    assert objective.prompt_text({"prompt": "hello"}) == "<user>hello</user><assistant>"


def test_chat_answers_run_their_code_block():
    problem = humaneval.load_problems(limit=1)[0]
    whole = ("Sure!\n```python\nfrom typing import List\n\ndef has_close_elements(numbers, threshold):\n"
             "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])\n"
             "```\nIt compares every pair.")
    assert humaneval.cut_chat(whole[:40]) is None  # the block is still open: generation goes on
    assert humaneval.cut_chat(whole).endswith("numbers[i + 1:])\n```")
    body_only = "```python\nreturn any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])\n```"
    wrong = "```python\ndef has_close_elements(numbers, threshold):\n    return False\n```"
    results = run_programs([humaneval.program(problem, humaneval.cut_chat(whole), "chat"),
                            humaneval.program(problem, body_only, "chat"),
                            humaneval.program(problem, wrong, "chat"),
                            humaneval.program(problem, "no code at all", "chat")], workers=2, timeout=5)
    assert [r.status for r in results] == ["passed", "passed", "failed", "failed"]


@pytest.mark.parametrize("flag, value", [("--timeout", "nan"), ("--timeout", "-1"), ("--timeout", "0"),
                                         ("--workers", "0"), ("--n", "100000000"), ("--max-new-tokens", "100000000"),
                                         ("--batch-size", "0"), ("--seed", "-1"), ("--seed", "9" * 25),
                                         ("--temperature", "1e-300"), ("--n", "2")])
def test_eval_humaneval_refuses_limits_that_are_no_limits(tmp_path, capsys, flag, value):
    code = main(["eval", "--task", "humaneval", "--model", "tiny-llama", "--limit", "1", "--out", str(tmp_path / "o"),
                 flag, value])
    err = capsys.readouterr().err
    assert code == 2 and flag.lstrip("-") in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o" / "predictions-test.jsonl").exists()


def test_an_encoder_is_refused_before_its_out_folder_is_made(tmp_path, capsys):
    code = main(["eval", "--task", "humaneval", "--model", "tiny-bert", "--limit", "1", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "encoder and cannot generate" in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()
