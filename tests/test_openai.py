"""The OpenAI-compatible API with the real ``openai`` client against running servers (127.0.0.1, tiny random
models), continuous batching (rows joining mid-generation equal each request alone, greedy and seeded
sampling, across LoRA, (IA)^3, prefix and prompt adapters and the base), and adapters loaded on demand."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

import deltatune as dt
from deltatune.models import load_backbone, mean_pool
from deltatune.serve.adapters_on_demand import AdapterDir
from deltatune.serve.engine import Engine, Job, ServeError
from deltatune.serve.openai_api import openai_error
from deltatune.serve.scheduler import GenerateOptions

from . import serving as S

openai = pytest.importorskip("openai")

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    d = tmp_path_factory.mktemp("generators")
    return {"l": S.save_generator(d / "l", "lora", 1), "i": S.save_generator(d / "i", "ia3", 2),
            "x": S.save_generator(d / "x", "prefix", 3, length=3),
            "p": S.save_generator(d / "p", "prompt", 4, length=3, init="random")}


def _engine(paths, **options) -> Engine:
    engine = Engine("tiny-llama", **{"max_wait": 0.01, "max_batch": 16, **options})
    for name, path in paths.items():
        engine.load(name, path)
    return engine


def _slow(engine, seconds: float = 0.02) -> None:
    """Each decode pass takes at least ``seconds`` more (a bigger model): a stream outlives the steps of a test."""
    decode = engine.scheduler._decode

    def slower():
        time.sleep(seconds)
        decode()

    engine.scheduler._decode = slower


def _client(url: str):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _alone_hf(path, prompt: str, n: int) -> list[int]:
    """Greedy tokens of ``model.generate`` alone on a fresh model with this adapter (or none)."""
    lm, tok = load_backbone("tiny-llama", "lm")
    if path is not None:
        dt.load_adapter(lm, path)
    enc = tok(prompt, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = lm.eval().generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
    return [t for t in out[0, enc["input_ids"].shape[1]:].tolist() if t != tok.eos_token_id]


# ---------------------------------------------------------------------------------- the OpenAI client


def test_the_openai_client_lists_models_completes_streams_and_chats(gen):
    engine = _engine({"l": gen["l"], "p": gen["p"]})
    engine.tokenizer.chat_template = TEMPLATE
    prompt = "def add(a, b):"
    try:
        with S.running(engine) as url:
            client = _client(url)
            models = client.models.list().data
            one = client.models.retrieve("p")
            whole = client.completions.create(model="l", prompt=prompt, max_tokens=6, temperature=0)
            chunks = list(client.completions.create(model="l", prompt=prompt, max_tokens=6, temperature=0,
                                                    stream=True, stream_options={"include_usage": True}))
            base = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=5, temperature=0)
            with httpx.stream("POST", url + "/v1/completions", timeout=60,
                              json={"model": "l", "prompt": prompt, "max_tokens": 3, "stream": True}) as raw:
                events = [line for line in raw.iter_lines() if line]
            messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": prompt}]
            chat = client.chat.completions.create(model="p", messages=messages, max_tokens=7, temperature=0)
            rendered = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            same = client.completions.create(model="p", prompt=rendered, max_tokens=7, temperature=0)
            streamed_chat = list(client.chat.completions.create(model="p", messages=messages, max_tokens=7,
                                                                temperature=0, stream=True))
    finally:
        engine.close()
    assert [m.id for m in models] == ["tiny-llama", "l", "p"]
    assert models[0].parent is None and models[1].parent == "tiny-llama" and models[1].kind == "generation"
    assert one.id == "p" and one.method == "prompt" and not hasattr(one, "path")
    tok = engine.tokenizer
    assert whole.object == "text_completion" and whole.choices[0].finish_reason == "length"
    assert whole.choices[0].text == tok.decode(_alone_hf(gen["l"], prompt, 6), skip_special_tokens=True)
    assert whole.usage.prompt_tokens == len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert whole.usage.completion_tokens == 6 and whole.usage.total_tokens == whole.usage.prompt_tokens + 6
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6  # include_usage: a last chunk
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    assert json.loads(events[0][6:])["object"] == "text_completion"
    assert base.choices[0].text == tok.decode(_alone_hf(None, prompt, 5), skip_special_tokens=True)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == same.choices[0].text  # the model's chat template, then the same tokens
    assert chat.usage.prompt_tokens == same.usage.prompt_tokens
    assert streamed_chat[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in streamed_chat) == chat.choices[0].message.content
    assert streamed_chat[-1].choices[0].finish_reason == chat.choices[0].finish_reason


def test_sampling_seeds_stops_and_logprobs(gen):
    engine = _engine({"l": gen["l"]})
    prompt = "the quick brown fox"
    try:
        with S.running(engine) as url:
            client = _client(url)
            sampled = dict(model="l", prompt=prompt, max_tokens=12, temperature=0.9, top_p=0.8)
            two = client.completions.create(**sampled, n=2, seed=41)
            again = client.completions.create(**sampled, n=2, seed=41)
            second = client.completions.create(**sampled, seed=42)
            unseeded = {client.completions.create(**sampled).choices[0].text for _ in range(3)}
            greedy = client.completions.create(model="l", prompt=prompt, max_tokens=12, temperature=0).choices[0].text
            stop = greedy[len(greedy) // 2:len(greedy) // 2 + 3]  # a piece of what greedy decoding writes
            stopped = client.completions.create(model="l", prompt=prompt, max_tokens=12, temperature=0, stop=[stop, "zzz"])
            streamed = "".join(c.choices[0].text for c in client.completions.create(
                model="l", prompt=prompt, max_tokens=12, temperature=0, stop=stop, stream=True))
            scored = client.completions.create(model="l", prompt=prompt, max_tokens=5, temperature=0, logprobs=3)
            chat = client.chat.completions.create(model="l", messages=[{"role": "user", "content": prompt}],
                                                  max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    finally:
        engine.close()
    assert [c.text for c in two.choices] == [c.text for c in again.choices]  # the same seed, the same tokens
    assert two.choices[1].text == second.choices[0].text  # choice j samples with seed + j
    assert two.choices[0].text != two.choices[1].text
    assert len(unseeded) > 1  # without a seed every request draws afresh
    assert stopped.choices[0].text == greedy[:greedy.index(stop)] and stopped.choices[0].finish_reason == "stop"
    assert streamed == stopped.choices[0].text  # the start of a stop string is held back, never streamed
    lp = scored.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 5 and all(x <= 0 for x in lp.token_logprobs)
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) <= 3 and max(top.values()) == pytest.approx(logprob)  # greedy: the chosen token is the top one
    assert lp.text_offset == sorted(lp.text_offset)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)


def test_embeddings_through_the_openai_client(tmp_path):
    paths = {"search": S.save_retrieval(tmp_path / "r", "lora", 1), "bugs": S.save_classifier(tmp_path / "c", "lora", 2)}
    engine = Engine("tiny-bert", max_wait=0.01)
    for name, path in paths.items():
        engine.load(name, path)
    texts = ["read a file", "x"]
    try:
        with S.running(engine) as url:
            client = _client(url)
            packed = client.embeddings.create(model="search", input=texts)  # the client asks for base64
            floats = client.embeddings.create(model="search", input=texts[0], encoding_format="float")
            bare = client.embeddings.create(model="tiny-bert", input=texts[1])
            with pytest.raises(openai.BadRequestError) as wrong:
                client.embeddings.create(model="bugs", input="x")
            with pytest.raises(openai.BadRequestError) as width:
                client.embeddings.create(model="search", input="x", dimensions=7)
            with pytest.raises(openai.BadRequestError) as ids:
                client.embeddings.create(model="search", input=[[1, 2, 3]])
            with pytest.raises(openai.NotFoundError):
                client.completions.create(model="gpt-4", prompt="x")
    finally:
        engine.close()
    for text, item in zip(texts, packed.data):
        torch.testing.assert_close(torch.tensor(item.embedding), S.alone_embedding("tiny-bert", paths["search"], text),
                                   atol=1e-5, rtol=1e-4)
    assert floats.data[0].embedding == pytest.approx(packed.data[0].embedding, abs=1e-6)
    assert packed.usage.prompt_tokens > 2 and packed.model == "search"
    base, tok = S.fresh("tiny-bert", "base")
    enc = tok([texts[1]], return_tensors="pt")
    with torch.no_grad():  # the base model as a model: the bare encoder, pooled as retrieval adapters pool
        want = torch.nn.functional.normalize(mean_pool(base.eval()(**enc).last_hidden_state, enc["attention_mask"]), dim=-1)
    torch.testing.assert_close(torch.tensor(bare.data[0].embedding), want[0], atol=1e-5, rtol=1e-4)
    assert "classification adapter" in wrong.value.body["message"] and wrong.value.body["param"] is None
    assert width.value.body["param"] == "dimensions" and ids.value.body["param"] == "input"


def test_errors_come_in_openais_shape_with_its_statuses(gen):
    engine = _engine({"l": gen["l"]}, max_len=16)
    try:
        with S.running(engine) as url:
            client = _client(url)
            cases = [
                (dict(model="nope", prompt="x"), openai.NotFoundError, "model", "model_not_found"),
                (dict(model="l", prompt="x", temperature=5), openai.BadRequestError, "temperature", None),
                (dict(model="l", prompt="x", top_p=0), openai.BadRequestError, "top_p", None),
                (dict(model="l", prompt="x", n=0), openai.BadRequestError, "n", None),
                (dict(model="l", prompt="x", max_tokens=0), openai.BadRequestError, "max_tokens", None),
                (dict(model="l", prompt="x", stop=["a"] * 5), openai.BadRequestError, "stop", None),
                (dict(model="l", prompt="x", presence_penalty=0.5), openai.BadRequestError, "presence_penalty", None),
                (dict(model="l", prompt="x", extra_body={"temprature": 1}), openai.BadRequestError, "temprature", None),
                (dict(model="l", prompt="x", extra_body={"max_tokens": "many"}), openai.BadRequestError, "max_tokens", None),
                (dict(model="l", prompt="word " * 40), openai.BadRequestError, None, None),  # over --max-len tokens
                (dict(model="l", prompt=[]), openai.BadRequestError, "prompt", None),
            ]
            for kwargs, error, param, code in cases:
                with pytest.raises(error) as caught:
                    client.completions.create(**kwargs)
                body = caught.value.body
                assert set(body) == {"message", "type", "param", "code"} and body["param"] == param, (kwargs, body)
                assert body["code"] == code and body["type"] == "invalid_request_error"
            with pytest.raises(openai.BadRequestError) as two_turns:  # no chat template: one user message only
                client.chat.completions.create(model="l", messages=[{"role": "system", "content": "a"},
                                                                    {"role": "user", "content": "b"}])
            with pytest.raises(openai.BadRequestError) as kind:
                client.embeddings.create(model="l", input="x")
            bad_json = httpx.post(url + "/v1/chat/completions", content=b"{", headers={"content-type": "application/json"})
            ok = client.completions.create(model="l", prompt="still here", max_tokens=2, temperature=0)
    finally:
        engine.close()
    assert "no chat template" in two_turns.value.body["message"] and two_turns.value.body["param"] == "messages"
    assert "generation adapter" in kind.value.body["message"]
    assert bad_json.status_code == 400 and "malformed JSON" in bad_json.json()["error"]["message"]
    assert ok.choices[0].finish_reason in ("length", "stop")
    assert openai_error(429, "busy")["error"] == {"message": "busy", "type": "rate_limit_error", "param": None,
                                                  "code": "rate_limit_exceeded"}


# ---------------------------------------------------------------------------------- continuous batching

ARRIVALS = [("l", "def add(a, b):", 40), ("i", "x", 6), ("x", "hello world", 12), ("p", "the quick brown fox", 9),
            (None, "def f(x): return", 7), ("p", "x", 20), ("l", "import os", 3)]


def _run_with_arrivals(engine, jobs: list[Job], after: int = 2) -> dict:
    """Submit jobs[0], then each next job once the one before it has streamed ``after`` pieces: every later
    row joins a running batch mid-generation. Returns per job the order its first piece and its end came."""
    events, lock = [], threading.Lock()

    def sink_for(i):
        seen = [0]

        def sink(piece):
            with lock:
                events.append((i, piece is None))
                seen[0] += piece is not None
                if piece is not None and seen[0] == after and i + 1 < len(jobs):
                    engine.submit([jobs[i + 1]])
            if piece is None and seen[0] < after and i + 1 < len(jobs):  # ended early: let the next one in
                engine.submit([jobs[i + 1]])
        return sink

    for i, job in enumerate(jobs):
        job.sink = sink_for(i)
    engine.submit([jobs[0]])
    results = [job.future.result(120) for job in jobs]
    return {"results": results, "events": events}


def _jobs(options=None):
    return [Job("generate", name, text, time.monotonic() + 120, max_new_tokens=n,
                options=options and GenerateOptions(**{**options, "seed": options.get("seed", 0) + i}))
            for i, (name, text, n) in enumerate(ARRIVALS)]


@pytest.mark.parametrize("options", [None, {"temperature": 0.8, "top_p": 0.9, "seed": 11}], ids=["greedy", "seeded"])
def test_rows_joining_mid_generation_equal_each_request_alone(gen, options):
    engine = _engine(gen)
    try:
        burst = _run_with_arrivals(engine, _jobs(options))
        alone = [f.result(120) for job in _jobs(options) for f in engine.submit([job])]  # one at a time
    finally:
        engine.close()
    for (name, text, n), got, want in zip(ARRIVALS, burst["results"], alone):
        assert got["token_ids"] == want["token_ids"] and got["text"] == want["text"], (name, text)
        assert got["finish_reason"] == want["finish_reason"] and len(got["token_ids"]) <= n
    events = burst["events"]
    first_end = events.index((0, True))
    joined = {i for i, end in events[:first_end] if not end}
    assert joined >= {1, 2, 3}, events  # later requests streamed while the first still ran
    ended_before = {i for i, end in events[:first_end] if end}
    assert {1, 2} <= ended_before  # and finished rows left at once, before the longest one ended
    if options is None:  # greedy also equals transformers' generate alone
        assert burst["results"][0]["token_ids"] == _alone_hf(gen["l"], ARRIVALS[0][1], ARRIVALS[0][2])


def test_the_token_budget_keeps_rows_waiting_and_the_batch_shares_passes(gen):
    def first_piece_order(max_tokens):
        engine = _engine({"l": gen["l"]}, max_tokens=max_tokens)
        try:
            jobs = [Job("generate", "l", "def add(a, b):", time.monotonic() + 120, max_new_tokens=30),
                    Job("generate", "l", "x", time.monotonic() + 120, max_new_tokens=5)]
            run = _run_with_arrivals(engine, jobs)
            return run["events"], engine.metrics
        finally:
            engine.close()

    tight, _ = first_piece_order(40)  # 8 prompt + 30 new tokens in flight: the second (1 + 5) must wait
    roomy, _ = first_piece_order(8192)
    assert tight.index((0, True)) < next(k for k, (i, end) in enumerate(tight) if i == 1)
    assert roomy.index((0, True)) > roomy.index((1, True))


def test_a_streaming_client_that_leaves_frees_its_row_at_the_next_step(gen):
    engine = _engine({"l": gen["l"]}, max_len=64)
    _slow(engine)
    try:
        with S.running(engine) as url:
            with httpx.stream("POST", url + "/v1/completions", timeout=60,
                              json={"model": "l", "prompt": "x", "max_tokens": 400, "temperature": 0,
                                    "stream": True}) as r:
                for i, line in enumerate(r.iter_lines()):
                    if i >= 4:
                        running = engine.scheduler.busy
                        break  # the client leaves (the connection closes) after two tokens
            for _ in range(200):
                if not engine.scheduler.busy:
                    break
                time.sleep(0.02)
            freed = not engine.scheduler.busy
            made = engine.adapters["l"].rows
            after = _client(url).completions.create(model="l", prompt="x", max_tokens=2, temperature=0)
    finally:
        engine.close()
    assert running and freed and made == 0  # the row left without finishing its 400 tokens
    assert after.choices[0].text


def test_an_adapter_unloaded_during_generation_fails_only_its_rows(gen):
    engine = _engine({"l": gen["l"], "i": gen["i"]}, max_len=64)
    try:
        started = threading.Event()
        doomed = Job("generate", "l", "x", time.monotonic() + 120, max_new_tokens=400,
                     sink=lambda piece: piece is not None and started.set())
        other = Job("generate", "i", "x", time.monotonic() + 120, max_new_tokens=6)
        engine.submit([doomed])
        assert started.wait(60)
        engine.submit([other])
        engine.unload("l")
        with pytest.raises(ServeError) as gone:
            doomed.future.result(60)
        result = other.future.result(60)
        alone = engine.submit([Job("generate", "i", "x", time.monotonic() + 60, max_new_tokens=6)])[0].result(60)
    finally:
        engine.close()
    assert gone.value.status == 410 and "unloaded" in gone.value.message
    assert result["token_ids"] == alone["token_ids"]


# ---------------------------------------------------------------------------------- adapters on demand


@pytest.fixture()
def adapter_dir(gen, tmp_path):
    root = tmp_path / "adapters"
    root.mkdir()
    for name in ("a", "b", "c"):
        S.save_generator(root / name, "lora", {"a": 5, "b": 6, "c": 7}[name])
    outside = S.save_generator(tmp_path / "outside", "lora", 8)
    (root / "escape").symlink_to(outside, target_is_directory=True)  # a link out of the directory
    (root / "sneaky").mkdir()  # a folder whose weights are a link out of it
    for f in Path(outside).iterdir():
        (root / "sneaky" / f.name).symlink_to(f)
    (root / "notes.txt").write_text("not an adapter")
    return root


def test_adapters_load_on_first_use_and_the_least_recently_used_is_evicted(gen, adapter_dir):
    engine = _engine({"l": gen["l"]})
    engine.adapter_dir = AdapterDir(adapter_dir, max_adapters=3)  # l (pinned) and two from the directory
    try:
        with S.running(engine) as url:
            client = _client(url)
            listed = {m.id: m.loaded for m in client.models.list().data}

            def ask(model):
                return client.completions.create(model=model, prompt="def add(a, b):", max_tokens=4, temperature=0)

            got = {m: ask(m).choices[0].text for m in ("a", "b")}
            held = sorted(engine.adapters)
            ask("a")  # a is now the most recently used: loading c evicts b
            got["c"] = ask("c").choices[0].text
            after = sorted(engine.adapters)
            got["b"] = ask("b").choices[0].text  # loaded again (evicting a)
            last = sorted(engine.adapters)
            reloaded = {m.id: m.loaded for m in client.models.list().data}
    finally:
        engine.close()
    assert listed == {"tiny-llama": True, "l": True, "a": False, "b": False, "c": False}  # no links out, no files
    assert held == ["a", "b", "l"] and after == ["a", "c", "l"] and last == ["b", "c", "l"]
    assert reloaded["b"] and reloaded["c"] and not reloaded["a"]
    tok = engine.tokenizer
    for name, text in got.items():
        assert text == tok.decode(_alone_hf(adapter_dir / name, "def add(a, b):", 4), skip_special_tokens=True), name


def test_a_model_id_that_is_a_path_or_a_link_out_of_the_adapter_dir_is_refused(gen, adapter_dir):
    engine = _engine({})
    engine.adapter_dir = AdapterDir(adapter_dir, max_adapters=4)
    try:
        with S.running(engine) as url:
            client = _client(url)
            refused = {}
            for model in ("escape", "sneaky", "../outside", str(adapter_dir.parent / "outside"), "a/../../outside"):
                with pytest.raises(openai.BadRequestError) as caught:
                    client.completions.create(model=model, prompt="x", max_tokens=2)
                refused[model] = caught.value.body["message"]
            with pytest.raises(openai.NotFoundError):
                client.completions.create(model="notes", prompt="x", max_tokens=2)
    finally:
        engine.close()
    assert "link" in refused["escape"] and "link" in refused["sneaky"]
    assert all("never by a path" in refused[m] for m in list(refused)[2:])
    assert str(adapter_dir.parent) not in refused["escape"] + refused["sneaky"]  # no server paths
    assert engine.adapters == {}


def test_loading_an_adapter_does_not_block_requests_for_the_others(gen, adapter_dir, monkeypatch):
    engine = _engine({"l": gen["l"]})
    engine.adapter_dir = AdapterDir(adapter_dir, max_adapters=4)
    real_read = dt.read_adapter

    def slow_read(path):  # a slow disk: reading and validating the file takes 2 s
        time.sleep(2.0)
        return real_read(path)

    monkeypatch.setattr(dt, "read_adapter", slow_read)
    try:
        with S.running(engine) as url:
            client = _client(url)
            loading = {}

            def load_b():
                start = time.monotonic()
                loading["text"] = client.completions.create(model="b", prompt="x", max_tokens=3, temperature=0)
                loading["span"] = (start, time.monotonic())

            thread = threading.Thread(target=load_b)
            thread.start()
            time.sleep(0.3)
            others = []
            while thread.is_alive() and len(others) < 50:
                start = time.monotonic()
                client.completions.create(model="l", prompt="x", max_tokens=3, temperature=0)
                others.append((start, time.monotonic()))
            thread.join(60)
    finally:
        engine.close()
    begin, end = loading["span"]
    assert end - begin >= 2.0
    during = [(s, e) for s, e in others if begin < s and e < end]
    assert len(during) >= 3 and max(e - s for s, e in during) < 1.5, others  # answered while b was loading
    assert loading["text"].choices[0].finish_reason in ("length", "stop")


def test_an_adapter_a_request_holds_is_never_evicted(gen, adapter_dir):
    engine = _engine({}, max_len=64)
    engine.adapter_dir = AdapterDir(adapter_dir, max_adapters=1)
    _slow(engine)
    try:
        with S.running(engine) as url:
            client = _client(url)
            with httpx.stream("POST", url + "/v1/completions", timeout=60,
                              json={"model": "a", "prompt": "x", "max_tokens": 300, "temperature": 0,
                                    "stream": True}) as r:
                lines = r.iter_lines()  # kept: dropping the iterator closes the stream
                next(lines)
                with pytest.raises(openai.RateLimitError) as full:
                    client.completions.create(model="b", prompt="x", max_tokens=2)
                during = sorted(engine.adapters)
            for _ in range(200):  # the stream's hold ends with it
                if not engine.adapter_dir.holds:
                    break
                time.sleep(0.02)
            then = client.completions.create(model="b", prompt="x", max_tokens=2, temperature=0)
            after = sorted(engine.adapters)
    finally:
        engine.close()
    assert during == ["a"] and full.value.response.headers["retry-after"] == "1"
    assert "--max-adapters" in full.value.body["message"]
    assert then.choices[0].text is not None and after == ["b"]


@pytest.mark.parametrize("flags, words", [
    (["--batching", "eager"], "--batching must be one of 'continuous', 'static'"),
    (["--max-tokens-in-flight", "0"], "--max-tokens-in-flight must be a whole number in [1,"),
    (["--adapter-dir", "/nonexistent/adapters"], "--adapter-dir /nonexistent/adapters: not a directory"),
    (["--adapter-dir", ".", "--max-adapters", "1", "--adapter", "a=x"], "--max-adapters 1 counts the 1 --adapter"),
])
def test_the_serve_command_refuses_nonsense_generation_flags_in_one_line(flags, words, capsys):
    from deltatune import cli

    assert cli.main(["serve", "--model", "tiny-llama", "--port", "0", *flags]) != 0
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("temperature,top_p", [(1e-40, 1.0), (5e-324, 1.0), (1.0, 1e-46), (1e-30, 1e-300)])
def test_extreme_temperatures_and_top_p_draw_the_top_token(temperature, top_p):
    """OpenAI's ranges admit a temperature of 1e-40 and a top_p below float32's least value: the draw is then
    the limit (the top token), never a 500 from a distribution of NaN."""
    import torch

    from deltatune.serve.scheduler import GenerateOptions, _choose

    logits = torch.randn(500, generator=torch.Generator().manual_seed(0)) * 5
    options = GenerateOptions(temperature=temperature, top_p=top_p)
    draws = {_choose(logits, options, torch.Generator().manual_seed(s)) for s in range(5)}
    assert draws == {int(logits.argmax())}
