"""What "the same result" of `--nproc 2` means, with and without dropout (docs/performance.md).

Both sides train LoRA on tiny-llama (which has no dropout of its own) in float64, 4 steps; the only
dropout is LoRA's own (``dropout`` option). Without it, 2 processes give one process's adapter to
float64 rounding (the sums run in another order; tests/test_distributed.py explains the 1e-8 bound).
With it, every rank draws its own masks (a stream seeded from seed, step, micro-batch and rank), so
the adapter is not one process's, by far more than rounding; but the same run with the same seed and
the same number of processes gives the same adapter bit for bit.
"""
from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from deltatune.training import distributed, train
from tests.test_distributed import ATOL, _cfg, _final, _ranks, float64
from tests.test_train import write_task


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dropout")
    tasks = {"classification": write_task(root / "tasks" / "classification", "classification")}
    plain = _cfg(root, tasks, "2p-plain")
    masked = _cfg(root, tasks, "2p-masked", options={"dropout": 0.3})
    again = dataclasses.replace(masked, out_dir=str(root / "runs" / "2p-masked-again"))
    ranks = distributed.launch(_ranks, ([plain, masked, again], str(root / "runs")), 2)
    one = {key: dataclasses.replace(cfg, out_dir=str(root / "runs" / f"1p-{key}"))
           for key, cfg in (("plain", plain), ("masked", masked))}
    with float64():
        for cfg in one.values():
            train(cfg)
    assert ranks[0]["errors"] == [None, None, None]
    return {"plain": _final(plain), "masked": _final(masked), "again": _final(again),
            "1p-plain": _final(one["plain"]), "1p-masked": _final(one["masked"])}


def _largest_difference(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_without_dropout_two_processes_give_one_process_adapter_to_rounding(runs):
    assert _largest_difference(runs["plain"], runs["1p-plain"]) <= ATOL


def test_with_dropout_each_rank_draws_its_own_masks(runs):
    # not one process's adapter: the masks differ (lr 1e-2 x 4 steps moves the adapter by ~1e-2)
    assert _largest_difference(runs["masked"], runs["1p-masked"]) > 1e3 * ATOL
    # and not the dropout-free one either: the masks do act
    assert _largest_difference(runs["masked"], runs["plain"]) > 1e3 * ATOL
    # reproducible: the same seed and the same number of processes draw the same masks
    for key in runs["masked"]:
        assert torch.equal(runs["masked"][key], runs["again"][key]), key


def _warns() -> int:
    warnings.warn("inputs were truncated (a probe)")
    return 0


def test_processes_it_starts_print_warnings_as_one_process_does(capfd, monkeypatch):
    """`deltatune train --nproc 2`: the CLI prints warnings on one line; the spawned processes do too (they
    start with Python's own format, which printed `UserWarning` with a file and line of distributed.py)."""
    monkeypatch.setattr(warnings, "formatwarning", lambda message, *_, **__: f"deltatune train: warning: {message}\n")
    assert distributed.launch(_warns, (), 2) == [0, 0]
    err = capfd.readouterr().err
    assert err.count("deltatune train: warning: inputs were truncated (a probe)\n") == 2, err
    assert "UserWarning" not in err and "distributed.py" not in err
