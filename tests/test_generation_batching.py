"""Scoring a generation task through one key/value cache (deltatune.tasks.decoding): rows taken longest prompt
first, each leaving the batch as it ends; every row's prediction equals ``model.generate`` on that row alone."""
from __future__ import annotations

import copy

import pytest
import torch

import deltatune as dt
from deltatune.tasks.decoding import greedy, greedy_differs
from deltatune.tasks.kinds import Generation, build_task_model
from deltatune.training import TrainConfig
from tests.serving import perturb

NEW = 10
# One word to forty: rows of very different lengths, in no order of length.
PROMPTS = ["def add(a, b): return a + b", "x", " ".join(f"word{i}" for i in range(40)), "read the file and count",
           "the quick brown fox jumps over the lazy dog", "y z", "sort a list of numbers in place then return it"]
ADAPTERS = {None: {}, "lora": {}, "prefix": {"length": 4}, "prompt": {"length": 4, "init": "random"}}


def _setup(model: str, method: str | None, tmp_path):
    lm, tok = build_task_model(model, "generation")
    perturb(lm, 1, scale=0.5)  # the random base's weights: rows that do not repeat one token
    if method is not None:
        torch.manual_seed(0)  # the adapter's initialisation: the same rows in every run, whatever ran before
        dt.attach(lm, method, **ADAPTERS[method])
        perturb(lm, 2, scale=0.5)  # the adapter's weights: it changes what the rows write
    tok = copy.deepcopy(tok)  # the tests change its end token; the loaded one is shared
    objective = Generation(tok, TrainConfig(model=model, task="x", max_len=56, max_new_tokens=NEW, progress=False,
                                            out_dir=str(tmp_path / "run")))
    rows = [{"prompt": p, "target": "", "prompt_format": "completion"} for p in PROMPTS]
    return lm.eval(), tok, objective, objective.encode(rows, train=False)


def _alone(lm, tok, example, ends=None) -> list[int]:
    """``generate`` on this row alone (batch of one, no padding): its new tokens, the end token included.
    ``ends``: the end tokens (None: the tokenizer's; empty: none, where the generation config has none)."""
    ids = torch.tensor([example["input_ids"]])
    with torch.no_grad():
        out = lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                          pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id if ends is None else ends or None)
    return out[0, ids.shape[1]:].tolist()


def _cut(out: list[int], ends) -> list[int]:
    """The tokens before the first end token."""
    return next((out[:i] for i, t in enumerate(out) if t in ends), out)


def _end_partway(lm, tok, examples) -> int:
    """One token that the model writes in some rows and not in others: taken as the end token, it ends
    those rows early beside rows that run to max_new_tokens (most distinct end steps of the candidates)."""
    made = [_alone(lm, tok, e) for e in examples]
    candidates = sorted({t for out in made for t in out} - set(tok.all_special_ids))

    def steps(t):
        at = [out.index(t) if t in out else len(out) for out in made]
        return len(set(at)), sum(0 < s < len(out) for s, out in zip(at, made))
    return max(candidates, key=steps)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("method", list(ADAPTERS))
def test_scoring_predictions_equal_generate_row_by_row(tmp_path, model, method):
    lm, tok, objective, examples = _setup(model, method, tmp_path)
    tok.add_special_tokens({"eos_token": tok.convert_ids_to_tokens(_end_partway(lm, tok, examples))})  # skipped in text
    assert greedy_differs(lm) is None  # the batched path is the one under test
    made = [_alone(lm, tok, e) for e in examples]
    assert any(tok.eos_token_id in out for out in made) and not all(tok.eos_token_id in out for out in made)
    with torch.no_grad():
        got = objective.predict(lm, examples, 3, "cpu")
        alone = [objective.predict_in_batches(lm, [e], 1, "cpu")[0] for e in examples]
        left_padded = objective.predict_in_batches(lm, examples, 3, "cpu")  # the fixed batches scoring used before
    assert got == alone == left_padded
    assert got == [tok.decode(_cut(out, {tok.eos_token_id}), skip_special_tokens=True).strip() for out in made]
    assert sum(bool(p) for p in got) >= 3


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("method", list(ADAPTERS))
def test_rows_end_early_leave_the_batch_and_waiting_rows_take_their_place(tmp_path, model, method):
    lm, tok, _, examples = _setup(model, method, tmp_path)
    lm.generation_config.eos_token_id = None
    full = [_alone(lm, tok, e, []) for e in examples]  # max_new_tokens each
    # End tokens taken from every other row at its own step (or later), none that the other rows write:
    # those rows end partway, the others run to max_new_tokens.
    others = {t for i, out in enumerate(full) if i % 2 == 0 for t in out}
    ends = {next((t for t in out[1 + i % (len(out) - 1):] if t not in others), None) for i, out in enumerate(full) if i % 2}
    ends.discard(None)
    want = [_cut(_alone(lm, tok, e, sorted(ends)), ends) for e in examples]
    steps = [len(w) for w in want]
    assert len(set(steps)) > 2 and NEW in steps and any(0 < n < NEW for n in steps), steps
    passes = []  # the rows of each decode pass (one new token per row, over the cache)

    def seen(_module, _args, kwargs):
        cache = kwargs.get("cache")
        if cache is not None and cache.get_seq_length() > 0:
            passes.append(tuple(kwargs["input_ids"].shape))

    handle = lm.register_forward_pre_hook(seen, with_kwargs=True)
    try:
        got = greedy(lm, [e["input_ids"] for e in examples], max_new_tokens=NEW, eos=ends, rows=3, device="cpu")
    finally:
        handle.remove()
    assert got == want  # in the prompts' order, each as generate gives it alone
    # A row writes its first token at its prefill and each further one (its end token included) in one decode
    # pass: when rows leave as they end, the passes hold exactly that many rows, never more than 3 at once.
    made = [n + (n < NEW) for n in steps]
    assert sum(rows for rows, _ in passes) == sum(m - 1 for m in made)
    assert max(rows for rows, _ in passes) == 3 and {width for _, width in passes} == {1}
    assert len(passes) < sum(m - 1 for m in made) / 2  # rows shared the passes


def test_a_generation_config_that_changes_the_logits_is_decoded_by_generate(tmp_path):
    lm, tok, objective, examples = _setup("tiny-llama", "lora", tmp_path)
    lm.generation_config.repetition_penalty = 3.0
    assert "repetition_penalty" in greedy_differs(lm)
    with torch.no_grad():
        got = objective.predict(lm, examples, 3, "cpu")
        assert got == objective.predict_in_batches(lm, examples, 3, "cpu")
        lm.generation_config.repetition_penalty = 1.0
        plain = objective.predict(lm, examples, 3, "cpu")
    assert got != plain  # the penalty was applied, by generate


def test_greedy_refuses_an_empty_prompt():
    lm, _ = build_task_model("tiny-llama", "generation")
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        greedy(lm.eval(), [[5, 6], []], max_new_tokens=2, eos={2}, rows=2, device="cpu")


@pytest.mark.parametrize("score_rows,batch_size,most", [(None, 1, 4), (2, 1, 2), (None, 16, 7)])
def test_scoring_decodes_score_rows_together(tmp_path, score_rows, batch_size, most):
    """Scoring keeps ``score_rows`` rows in flight (default 4 x the batch size, at most 32; here at most the 7
    prompts), whatever the training batch: the predictions are the same at every width."""
    lm, tok, objective, examples = _setup("tiny-llama", "lora", tmp_path)
    lm.generation_config.eos_token_id = None
    objective.cfg = TrainConfig(**{**objective.cfg.__dict__, "score_rows": score_rows})
    widths = []

    def seen(_module, _args, kwargs):
        cache = kwargs.get("cache")
        if cache is not None and cache.get_seq_length() > 0:
            widths.append(kwargs["input_ids"].shape[0])

    handle = lm.register_forward_pre_hook(seen, with_kwargs=True)
    try:
        with torch.no_grad():
            got = objective.predict(lm, examples, batch_size, "cpu")
    finally:
        handle.remove()
    assert max(widths) == most
    with torch.no_grad():
        assert got == [objective.predict_in_batches(lm, [e], 1, "cpu")[0] for e in examples]


@pytest.mark.parametrize("method", list(ADAPTERS))
def test_prompts_of_one_length_share_a_prefill_and_long_rows_outgrow_the_cache_buffers(tmp_path, method):
    """Prompts of one length are prefilled in one pass (no padding); rows that write far more tokens than
    their prompts held outgrow the cache's first buffers (copied into bigger ones) and leave from any slot:
    every row still writes what generate gives it alone."""
    lm, tok, _, _ = _setup("tiny-llama", method, tmp_path)
    lm.generation_config.eos_token_id = None
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(10, 200, (n,), generator=g).tolist() for n in (6, 3, 6, 9, 6, 3, 2)]
    new = [70, 5, 40, 70, 12, 70, 3]  # rows end at different steps: slots in the middle leave
    want = []
    for p, n in zip(prompts, new):
        ids = torch.tensor([p])
        with torch.no_grad():
            out = lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=70, do_sample=False,
                              pad_token_id=tok.pad_token_id, eos_token_id=None)
        want.append(out[0, len(p):].tolist())
    # Each row's token at its step n ends rows (it, or any row writing that token earlier): a spread of ends.
    ends = set()
    for w, n in zip(want, new):
        if n < 70:
            ends.add(w[n])
    want = [_cut(w, ends) for w in want]
    assert len({len(w) for w in want}) > 2, [len(w) for w in want]
    prefills = []

    def seen(_module, _args, kwargs):
        cache = kwargs.get("cache")
        if cache is not None and cache.get_seq_length() == 0:
            prefills.append(kwargs["input_ids"].shape)

    handle = lm.register_forward_pre_hook(seen, with_kwargs=True)
    try:
        got = greedy(lm, prompts, max_new_tokens=70, eos=ends, rows=4, device="cpu")
    finally:
        handle.remove()
    assert got == want
    assert (3, 6) in [tuple(s) for s in prefills]  # the three prompts of 6 tokens, one pass
    assert sum(s[0] for s in prefills) == len(prompts)  # each prompt prefilled once
