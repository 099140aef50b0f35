"""The whole job's engine-side savings keep results: length-sorted groups in training and scoring, phase times."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

import deltatune as dt
from deltatune.lengths import forward_by_length, groups
from deltatune.tasks.kinds import Retrieval, build_task_model
from deltatune.training import TrainConfig, train

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


def _rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)  # lengths from 2 to 30 words: a batch padded to its longest wastes most of its tokens
    return [{"query": " ".join(rng.choices(WORDS, k=rng.randint(2, 6))),
             "code": "def f(): return " + " + ".join(rng.choices(WORDS, k=rng.randint(1, 30)))} for _ in range(n)]


@pytest.fixture(scope="module")
def encoder():
    model, tokenizer = build_task_model("tiny-bert", "retrieval")
    torch.manual_seed(0)
    dt.attach(model, "lora")
    with torch.no_grad():  # B = 0 at init would hide a LoRA path that the grouping broke
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    objective = Retrieval(tokenizer, TrainConfig(max_len=48))
    return model, objective, objective.encode(_rows(21), train=True)


def test_groups_sort_by_length_and_cover_every_row():
    lengths = [5, 1, 9, 1, 3, 7, 2]
    cut = groups(lengths, 3)
    assert [len(g) for g in cut] == [3, 3, 1]
    assert sorted(i for g in cut for i in g) == list(range(7))
    flat = [lengths[i] for g in cut for i in g]
    assert flat == sorted(lengths)
    assert cut[0] == [1, 3, 6]  # stable among equal lengths


def test_forward_by_length_gives_each_row_its_full_batch_output(encoder):
    model, objective, examples = encoder
    batch = objective.pad([c for _, c in examples])
    assert batch["input_ids"].shape[1] > min(len(c["input_ids"]) for _, c in examples) + 10  # real padding to skip
    model.eval()
    with torch.no_grad():
        whole = model(**batch)
        for size in (1, 4, 8, 21, 64):
            torch.testing.assert_close(forward_by_length(model, batch, size), whole, atol=1e-5, rtol=1e-5)


def test_training_loss_and_gradients_match_plain_padding(encoder):
    """The in-batch-negatives loss over groups: the same loss and gradients as the padded batch
    (dropout off: with dropout on, only the masks' draws differ)."""
    model, objective, examples = encoder
    batch = objective.collate(examples)
    model.eval()
    results = {}
    for size in (len(examples), 4):
        objective.group = size
        loss = objective.loss(model, batch)
        loss.backward()
        results[size] = loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
    objective.group = Retrieval.group
    (loss_a, grads_a), (loss_b, grads_b) = results.values()
    torch.testing.assert_close(loss_b, loss_a, atol=1e-5, rtol=1e-5)
    assert grads_a and grads_a.keys() == grads_b.keys()
    assert any(g.abs().max() > 0 for g in grads_a.values())
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-5, rtol=1e-4)


def test_scoring_in_length_sorted_batches_keeps_order_and_values(encoder):
    model, objective, examples = encoder
    model.eval()
    with torch.no_grad():
        q, c = objective.predict(model, examples, 4, "cpu")
        plain_q = model(**objective.pad([x for x, _ in examples])).numpy()
        plain_c = model(**objective.pad([x for _, x in examples])).numpy()
    np.testing.assert_allclose(q, plain_q, atol=1e-5)
    np.testing.assert_allclose(c, plain_c, atol=1e-5)


def test_summary_says_where_the_job_went(tmp_path):
    folder = tmp_path / "task"
    folder.mkdir()
    for split, n in (("train", 32), ("valid", 8), ("test", 8)):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(n, seed=len(split))))
    summary = train(TrainConfig(model="tiny-bert", task=str(folder), method="lora", max_steps=4, batch_size=8,
                                eval_every=2, max_len=64, out_dir=str(tmp_path / "run"), progress=False))
    phases = summary["phase_seconds"]
    assert set(phases) == {"setup", "zero_shot", "batch_check", "train", "validate", "checkpoint", "test"}
    assert all(v >= 0 for v in phases.values())
    assert phases["train"] <= summary["train_seconds"] + sum(phases.values())


@pytest.mark.parametrize("flags, native", [("fpu sse2 avx2 avx512f avx512bw", False), ("fpu avx512f avx512_bf16", True),
                                           ("fpu avx2 amx_bf16 amx_tile", True), ("fp asimd sve bf16", True),
                                           ("fp asimd sve", False), ("", False)])
def test_native_bf16_reads_the_cpu_flags(flags, native):
    from deltatune.training import native_bf16

    assert native_bf16("cpu", flags) is native


def test_bf16_auto_resolves_per_machine_and_keeps_fp32_without_native_bf16(monkeypatch):
    import deltatune.training.config as T

    assert T.resolved(TrainConfig(bf16="auto", device="cpu"), None).bf16 is T.native_bf16("cpu")
    monkeypatch.setattr(T, "native_bf16", lambda device, cpu_flags=None: False)  # a CPU without bf16
    assert T.resolved(TrainConfig(bf16="auto", device="cpu"), None).bf16 is False
    assert T.resolved(TrainConfig(bf16=True, device="cpu"), None).bf16 is True
    with pytest.raises(Exception, match="bf16"):
        T.resolved(TrainConfig(bf16="yes", device="cpu"), None)


def test_bf16_loss_within_tolerance_of_fp32(encoder):
    """bf16 autocast (8 bits of mantissa) moves the in-batch-negatives loss by well under 2 %."""
    model, objective, examples = encoder
    batch = objective.collate(examples)
    model.eval()
    with torch.no_grad():
        fp32 = objective.loss(model, batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = objective.loss(model, batch)
    assert bf16.dtype == torch.float32 or bf16.dtype == torch.bfloat16
    assert abs(bf16.float().item() - fp32.item()) <= 0.02 * abs(fp32.item()), (bf16, fp32)
