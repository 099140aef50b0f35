"""The benchmark driver's grouping and paired ratios (bench/run.py), without running a model."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import run as bench  # noqa: E402


def _job(config, lib="torch", env="main", size="minilm"):
    return dict(size=size, config=config, lib=lib, env=env, batch=8, seq=128, steps=3, warmup=2, threads=2, seed=0)


def _keys(group):
    return {(j["config"], j["lib"], j["env"]) for j in group}


def test_a_group_holds_the_rows_its_ratios_need():
    jobs = [_job("full"), _job("full", env="peft"), _job("floor"), _job("lora-qv", "deltatune"),
            _job("lora-qv", "peft", "peft"), _job("prompt", "deltatune"), _job("lora-qv+compile", "deltatune")]
    groups = {g[0]["config"]: _keys(g) for g in bench.groups_of(jobs)}
    assert set(groups) == {"lora-qv", "prompt", "lora-qv+compile"}  # baselines live inside the groups
    assert groups["lora-qv"] == {("lora-qv", "deltatune", "main"), ("lora-qv", "peft", "peft"),
                                 ("full", "torch", "main"), ("full", "torch", "peft"), ("floor", "torch", "main")}
    assert ("floor+20tok", "torch", "main") in groups["prompt"]  # added although not asked for
    assert ("lora-qv", "deltatune", "main") in groups["lora-qv+compile"]  # the eager twin


def test_baselines_alone_form_their_own_group():
    groups = bench.groups_of([_job("full"), _job("floor")])
    assert [_keys(g) for g in groups] == [{("full", "torch", "main")},
                                          {("floor", "torch", "main"), ("full", "torch", "main")}]


def test_paired_ratio_pairs_steps_taken_together():
    a, b = ("minilm", "x", "deltatune", "main"), ("minilm", "full", "torch", "main")

    def result(k, times, group="g", rnd=0):
        return dict(size=k[0], config=k[1], lib=k[2], env=k[3], times=times, step_s=sorted(times)[1],
                    group=group, round=rnd)

    # The machine halves its speed at step 2 for both rows: the paired ratio stays 0.5, while the
    # ratio of the medians would not.
    results = [result(a, [1.0, 2.0, 2.0]), result(b, [2.0, 4.0, 4.0]),
               result(a, [1.0, 1.0, 1.0], group="h"), result(b, [3.0, 3.0, 3.0], group="other-b-missing")]
    assert bench.paired(results, a, b) == 0.5
    assert bench.paired(results, b, ("minilm", "floor", "torch", "main")) is None
