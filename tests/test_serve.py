"""deltatune serve end to end over loopback (127.0.0.1): mixed-adapter batches, overload, faults, search."""
from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

import deltatune as dt
from deltatune.models import load_backbone
from deltatune.serve.engine import Engine, Job

from . import serving as S

TEXTS = ["read a file", "sort a list of numbers in place", "x", "open a socket and send bytes to the server",
         "parse json", "compute the mean of the values in a column of a csv file"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("adapters")
    return {
        "lora": S.save_retrieval(d / "lora", "lora", 1),
        "ia3": S.save_retrieval(d / "ia3", "ia3", 2),
        "prefix": S.save_retrieval(d / "prefix", "prefix", 3, length=3),
        "prompt": S.save_retrieval(d / "prompt", "prompt", 4, length=2, init="random"),
        "bugs": S.save_classifier(d / "bugs", "lora", 5),
    }


def _engine(saved, names=None, **options):
    engine = Engine("tiny-bert", **{"max_wait": 0.05, "max_batch": 64, **options})
    for name in names or saved:
        engine.load(name, saved[name])
    return engine


def _metric(text: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


async def _burst(url, requests):
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        return await asyncio.gather(*(client.post(path, json=body) for path, body in requests))


def test_a_mixed_burst_returns_row_by_row_what_each_adapter_gives_alone(saved):
    engine = _engine(saved, max_wait=0.2)
    requests = []
    for i in range(30):
        name = ["lora", "ia3", "prefix", "prompt", "bugs"][i % 5]
        task = "classify" if name == "bugs" else "embed"
        requests.append((f"/v1/adapters/{name}/{task}", {"text": TEXTS[i % len(TEXTS)]}))
    try:
        with S.running(engine) as url:
            responses = asyncio.run(_burst(url, requests))
            metrics = httpx.get(url + "/metrics").text
    finally:
        engine.close()
    assert [r.status_code for r in responses] == [200] * len(requests)
    for (path, body), r in zip(requests, responses):
        name = path.split("/")[3]
        if name == "bugs":
            want = S.alone_logits("tiny-bert", saved[name], body["text"]).softmax(-1)
            got = torch.tensor(r.json()["results"][0]["probabilities"])
            torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
        else:
            want = S.alone_embedding("tiny-bert", saved[name], body["text"])
            got = torch.tensor(r.json()["embeddings"][0])
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name} {body}: {m}")
    batches, rows = _metric(metrics, "deltatune_batch_size_count"), _metric(metrics, "deltatune_batch_size_sum")
    assert rows == len(requests) and batches < len(requests) / 2, (batches, rows)  # rows of different adapters shared passes


def test_several_texts_in_one_request_and_the_adapter_list(saved):
    engine = _engine(saved, ["lora", "bugs"])
    try:
        with S.running(engine) as url:
            r = httpx.post(url + "/v1/adapters/lora/embed", json={"texts": TEXTS[:3]})
            listed = httpx.get(url + "/v1/adapters").json()
    finally:
        engine.close()
    assert r.status_code == 200 and len(r.json()["embeddings"]) == 3
    for text, got in zip(TEXTS[:3], r.json()["embeddings"]):
        torch.testing.assert_close(torch.tensor(got), S.alone_embedding("tiny-bert", saved["lora"], text), atol=1e-5, rtol=1e-4)
    by_name = {a["name"]: a for a in listed["adapters"]}
    assert by_name["lora"]["kind"] == "retrieval" and by_name["lora"]["method"] == "lora"
    assert by_name["lora"]["requests"] == 1 and by_name["lora"]["rows"] == 3 and by_name["lora"]["size_bytes"] > 0
    assert by_name["bugs"]["kind"] == "classification" and by_name["bugs"]["labels"] == 3


def test_bad_requests_get_clear_4xx_and_the_server_keeps_serving(saved):
    engine = _engine(saved, ["lora", "bugs"])
    try:
        with S.running(engine, max_chars=100, max_items=4) as url, httpx.Client(base_url=url) as c:
            cases = [
                (c.post("/v1/adapters/nope/embed", json={"text": "x"}), 404, "no adapter named 'nope'"),
                (c.post("/v1/adapters/bugs/embed", json={"text": "x"}), 400, "classification adapter"),
                (c.post("/v1/adapters/lora/classify", json={"text": "x"}), 400, "answers embed, search"),
                (c.post("/v1/adapters/lora/embed", content=b'{"text": "x"', headers={"content-type": "application/json"}),
                 400, "malformed JSON"),
                (c.post("/v1/adapters/lora/embed", json={"text": "  "}), 400, "empty"),
                (c.post("/v1/adapters/lora/embed", json={}), 400, "exactly one of"),
                (c.post("/v1/adapters/lora/embed", json={"text": "x" * 101}), 413, "limit is 100"),
                (c.post("/v1/adapters/lora/embed", json={"texts": ["a"] * 5}), 413, "limit is 4"),
                (c.post("/v1/adapters/lora/embed", json={"text": 3}), 422, "text"),
                (c.post("/v1/adapters/lora/search", json={"query": "x", "k": "many"}), 422, "k"),
                (c.post("/v1/adapters/lora/search", json={"query": "x"}), 409, "no search index"),
                (c.post("/v1/adapters/lora/generate", json={"prompt": "x"}), 400, "answers embed, search"),
            ]
            for r, status, words in cases:
                assert r.status_code == status and words in r.json()["detail"], (status, r.status_code, r.text)
            assert c.post("/v1/adapters/lora/embed", json={"text": "still here"}).status_code == 200
            assert c.get("/health").json()["status"] == "ok"
            spec = c.get("/openapi.json").json()
            assert "/v1/adapters/{name}/embed" in spec["paths"] and "/v1/adapters/{name}/generate" in spec["paths"]
    finally:
        engine.close()


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the resident size from /proc")
def test_overload_answers_429_with_retry_after_and_memory_stays_flat(saved):
    # The first row waits up to 1 s for others: a burst fills the 4-row queue before any batch runs.
    engine = _engine(saved, ["lora"], max_wait=1.0, queue_size=4)
    try:
        with S.running(engine) as url:
            sizes = []
            for _ in range(4):
                responses = asyncio.run(_burst(url, [("/v1/adapters/lora/embed", {"text": f"q{i}"}) for i in range(60)]))
                codes = [r.status_code for r in responses]
                assert codes.count(200) >= 4 and codes.count(429) >= 40 and set(codes) <= {200, 429}, codes
                busy = next(r for r in responses if r.status_code == 429)
                assert int(busy.headers["retry-after"]) >= 1 and "busy" in busy.json()["detail"]
                assert engine.queue_depth() <= 4
                sizes.append(_rss_mb())
            metrics = httpx.get(url + "/metrics").text
    finally:
        engine.close()
    assert sizes[-1] - sizes[0] < 40, sizes  # rejected requests leave nothing behind
    assert 'status="429"' in metrics


def test_a_client_that_disconnects_mid_request_does_not_disturb_the_others(saved):
    engine = _engine(saved, ["lora", "ia3"], max_wait=2.0)  # the left row is still queued when it is noticed
    try:
        with S.running(engine) as url:
            port = int(url.rsplit(":", 1)[1])
            body = json.dumps({"text": "left early"}).encode()
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"POST /v1/adapters/lora/embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body)
            time.sleep(0.1)
            sock.close()  # gone while its row waits in the queue
            responses = asyncio.run(_burst(url, [("/v1/adapters/ia3/embed", {"text": t}) for t in TEXTS]))
            assert [r.status_code for r in responses] == [200] * len(TEXTS)
            for t, r in zip(TEXTS, responses):
                torch.testing.assert_close(torch.tensor(r.json()["embeddings"][0]),
                                           S.alone_embedding("tiny-bert", saved["ia3"], t), atol=1e-5, rtol=1e-4)
            for _ in range(40):
                metrics = httpx.get(url + "/metrics").text
                if 'status="499"' in metrics:
                    break
                time.sleep(0.05)
            assert 'endpoint="embed",status="499"' in metrics  # noticed, counted, and its row skipped
            assert httpx.get(url + "/health").json()["status"] == "ok"
    finally:
        engine.close()


def test_an_adapter_unloaded_while_its_rows_are_queued(saved):
    engine = _engine(saved, ["lora", "ia3"], max_wait=4.0)  # rows wait for company: the unload comes first

    async def scenario(url):
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            rows = [client.post(f"/v1/adapters/{n}/embed", json={"text": t}) for n in ("lora", "ia3") for t in TEXTS[:3]]
            tasks = [asyncio.ensure_future(r) for r in rows]
            for _ in range(350):
                if engine.queue_depth() == 6:
                    break
                await asyncio.sleep(0.01)
            assert engine.queue_depth() == 6
            gone = await client.delete("/v1/adapters/lora")
            return gone, await asyncio.gather(*tasks)

    try:
        with S.running(engine) as url:
            gone, responses = asyncio.run(scenario(url))
            again = httpx.post(url + "/v1/adapters/lora/embed", json={"text": "x"})
    finally:
        engine.close()
    assert gone.status_code == 200
    for r in responses[:3]:
        assert r.status_code == 410 and "unloaded while this request was queued" in r.json()["detail"]
    for t, r in zip(TEXTS[:3], responses[3:]):
        assert r.status_code == 200
        torch.testing.assert_close(torch.tensor(r.json()["embeddings"][0]),
                                   S.alone_embedding("tiny-bert", saved["ia3"], t), atol=1e-5, rtol=1e-4)
    assert again.status_code == 404


def test_load_and_unload_at_run_time_guarded_by_the_token(saved, tmp_path):
    engine = _engine(saved, ["lora"])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    try:
        with S.running(engine, token="s3cret") as url, httpx.Client(base_url=url) as c:
            auth = {"Authorization": "Bearer s3cret"}
            assert c.post("/v1/adapters", json={"name": "p", "path": str(saved["prefix"])}).status_code == 401
            assert c.post("/v1/adapters", json={"name": "p", "path": str(saved["prefix"])},
                          headers={"Authorization": "Bearer wrong"}).status_code == 401
            r = c.post("/v1/adapters", json={"name": "p", "path": str(saved["prefix"])}, headers=auth)
            assert r.status_code == 201 and r.json()["method"] == "prefix"
            r = c.post("/v1/adapters/p/embed", json={"text": "read a file"})
            torch.testing.assert_close(torch.tensor(r.json()["embeddings"][0]),
                                       S.alone_embedding("tiny-bert", saved["prefix"], "read a file"), atol=1e-5, rtol=1e-4)
            dup = c.post("/v1/adapters", json={"name": "p", "path": str(saved["ia3"])}, headers=auth)
            assert dup.status_code == 409 and "already loaded" in dup.json()["detail"]
            broken = c.post("/v1/adapters", json={"name": "q", "path": str(bad)}, headers=auth)
            assert broken.status_code == 400 and "safetensors" in broken.json()["detail"]
            missing = c.post("/v1/adapters", json={"name": "q", "path": str(tmp_path / "none")}, headers=auth)
            assert missing.status_code == 400 and "no adapter at" in missing.json()["detail"]
            named = c.post("/v1/adapters", json={"name": "../x", "path": str(saved["ia3"])}, headers=auth)
            assert named.status_code == 400 and "adapter name" in named.json()["detail"]
            other = c.post("/v1/adapters", json={"name": "llama", "path": str(_llama_adapter(tmp_path))}, headers=auth)
            assert other.status_code == 400 and "trained on" in other.json()["detail"]
            assert c.delete("/v1/adapters/p").status_code == 401
            assert c.delete("/v1/adapters/p", headers=auth).status_code == 200
            assert c.delete("/v1/adapters/p", headers=auth).status_code == 404
            assert c.post("/v1/adapters/lora/embed", json={"text": "x"}).status_code == 200  # reads need no token
            assert [a["name"] for a in c.get("/v1/adapters").json()["adapters"]] == ["lora"]
    finally:
        engine.close()
    assert dt.adapters(engine.model) == ["lora"]


def _llama_adapter(tmp_path):
    return S.save_generator(tmp_path / "gen", "lora", 9)


CODE = {
    "pkg/io_utils.py": 'import json\n\n\ndef read_json(path):\n    """Read a JSON file."""\n    with open(path) as f:\n'
                       '        return json.load(f)\n\n\nclass Store:\n    def put(self, key, value):\n'
                       '        self.data[key] = value\n\n    async def fetch(self, key):\n        return self.data[key]\n',
    "pkg/broken.py": "def oops(:\n",
    "math_utils.py": "def mean(xs):\n    return sum(xs) / len(xs)\n",
}


def test_search_indexes_functions_with_file_and_line_and_saves_the_index(saved, tmp_path):
    root = tmp_path / "code"
    for rel, text in CODE.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "outside.py").symlink_to(tmp_path / "elsewhere.py")  # never followed
    (tmp_path / "elsewhere.py").write_text("def secret():\n    pass\n")
    index_dir = tmp_path / "index"
    engine = _engine(saved, ["lora"], index_dir=str(index_dir))
    try:
        with S.running(engine, token="t") as url, httpx.Client(base_url=url) as c:
            auth = {"Authorization": "Bearer t"}
            assert c.post("/v1/adapters/lora/index", json={"path": str(root)}).status_code == 401
            r = c.post("/v1/adapters/lora/index", json={"path": str(root)}, headers=auth)
            report = r.json()
            assert r.status_code == 200 and report["functions"] == 4 and not report["cached"]
            assert report["unparsable"] == 1 and report["skipped"]["links"] == 1
            hits = c.post("/v1/adapters/lora/search", json={"query": "read a json file", "k": 10}).json()["results"]
            where = {h["name"]: (h["file"], h["line"]) for h in hits}
            assert where == {"read_json": ("pkg/io_utils.py", 4), "Store.put": ("pkg/io_utils.py", 11),
                             "Store.fetch": ("pkg/io_utils.py", 14), "mean": ("math_utils.py", 1)}
            # ranked by the cosine similarity of the adapter's own embeddings
            q = S.alone_embedding("tiny-bert", saved["lora"], "read a json file")
            code = next(h for h in hits if h["name"] == "mean")["code"]
            want = float(q @ S.alone_embedding("tiny-bert", saved["lora"], "mean\n" + code))
            assert abs(next(h for h in hits if h["name"] == "mean")["score"] - want) < 1e-4
            assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
            assert c.post("/v1/adapters/lora/index", json={"path": str(root)}, headers=auth).json()["cached"]
            bad = c.post("/v1/adapters/lora/index", json={"path": str(tmp_path / "nowhere")}, headers=auth)
            assert bad.status_code == 400 and "not a directory" in bad.json()["detail"]
    finally:
        engine.close()
    again = _engine(saved, ["lora"], index_dir=str(index_dir))  # a restart reloads the saved index
    try:
        from deltatune.serve.app import build_index
        assert build_index(again, "lora", str(root))["cached"]
        (root / "math_utils.py").write_text("def mean(xs):\n    return sum(xs) / max(1, len(xs))\n")
        assert not build_index(again, "lora", str(root))["cached"]  # a changed file: embedded again
    finally:
        again.close()


def _alone_generation(path, prompt: str, n: int) -> str:
    lm, tok = load_backbone("tiny-llama", "lm")
    dt.load_adapter(lm, path)
    enc = tok(prompt, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = lm.eval().generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def test_generation_streams_tokens_and_mixed_rows_match_each_adapter_alone(tmp_path):
    paths = {"g-lora": S.save_generator(tmp_path / "a", "lora", 1), "g-prefix": S.save_generator(tmp_path / "b", "prefix", 2, length=3)}
    engine = Engine("tiny-llama", max_wait=0.5, max_batch=8)
    for name, path in paths.items():
        engine.load(name, path)
    prompts = [("g-lora", "def add(a, b):", 6), ("g-prefix", "the quick brown fox", 9), ("g-lora", "x", 4)]

    async def stream(client, name, prompt, n):
        lines = []
        async with client.stream("POST", f"/v1/adapters/{name}/generate",
                                 json={"prompt": prompt, "max_new_tokens": n}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line:
                    lines.append(json.loads(line))
        return lines

    async def burst(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return await asyncio.gather(*(stream(client, *p) for p in prompts))

    try:
        with S.running(engine) as url:
            results = asyncio.run(burst(url))
            whole = httpx.post(url + "/v1/adapters/g-lora/generate",
                               json={"prompt": "def add(a, b):", "max_new_tokens": 6, "stream": False}, timeout=60)
            wrong = httpx.post(url + "/v1/adapters/g-lora/embed", json={"text": "x"})
            metrics = httpx.get(url + "/metrics").text
    finally:
        engine.close()
    for (name, prompt, n), lines in zip(prompts, results):
        assert lines[-1]["done"] and lines[-1]["tokens"] <= n
        streamed = "".join(line.get("token", "") for line in lines[:-1])
        assert streamed == lines[-1]["text"]
        assert lines[-1]["text"] == _alone_generation(paths[name], prompt, n), (name, prompt)
        assert len(lines) >= 2  # tokens arrived as they were made, then the summary
    assert whole.json()["text"] == results[0][-1]["text"]
    assert wrong.status_code == 400 and "generation adapter" in wrong.json()["detail"]
    assert _metric(metrics, "deltatune_batch_size_count") <= 3  # 3 streams + 1 whole: the streams shared batches


def test_the_serve_command_starts_a_server_on_loopback(saved, tmp_path):
    port = S.free_port()
    number = port.getsockname()[1]
    port.close()
    env = {**os.environ, "DELTATUNE_SERVE_TOKEN": "from-env"}
    proc = subprocess.Popen([sys.executable, "-m", "deltatune", "serve", "--model", "tiny-bert", "--port", str(number),
                             "--adapter", f"search={saved['lora']}", "--adapter", f"bugs={saved['bugs']}"],
                            env=env, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(300):
            try:
                health = httpx.get(f"http://127.0.0.1:{number}/health", timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stderr.read()
                time.sleep(0.1)
        assert health.json()["adapters"] == 2
        base = f"http://127.0.0.1:{number}"
        assert httpx.post(base + "/v1/adapters/bugs/classify", json={"text": "x"}).status_code == 200
        assert httpx.delete(base + "/v1/adapters/bugs").status_code == 401  # the token came from the environment
        assert httpx.delete(base + "/v1/adapters/bugs", headers={"Authorization": "Bearer from-env"}).status_code == 200
        assert "<title>deltatune serve</title>" in httpx.get(base + "/").text
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_the_serve_command_names_a_malformed_flag(capsys):
    from deltatune import cli

    assert cli.main(["serve", "--model", "tiny-bert", "--adapter", "nodir"]) != 0
    assert "--adapter expects NAME=DIR, got 'nodir'" in capsys.readouterr().err


def test_generation_mixing_prompt_and_lora_rows(tmp_path):
    paths = {"l": S.save_generator(tmp_path / "l", "lora", 1), "p": S.save_generator(tmp_path / "p", "prompt", 2, length=3,
                                                                                      init="random")}
    engine = Engine("tiny-llama", max_wait=0.5, max_batch=8)
    try:
        for name, path in paths.items():
            engine.load(name, path)
        jobs = [Job("generate", n, t, time.monotonic() + 60, max_new_tokens=6)
                for n, t in (("l", "def add(a, b):"), ("p", "the quick brown fox"))]
        got = [f.result(60)["text"] for f in engine.submit(jobs)]
    finally:
        engine.close()
    assert got == [_alone_generation(paths[j.adapter], j.text, 6) for j in jobs]


def test_minilm_mixed_burst_matches_each_adapter_alone(tmp_path):
    """The same guarantee on the real MiniLM (22.7M parameters, real token lengths); about 6 s."""
    paths = {"q": S.save_retrieval(tmp_path / "q", "lora", 1, model="minilm"),
             "p": S.save_retrieval(tmp_path / "p", "prefix", 2, model="minilm", length=5),
             "c": S.save_classifier(tmp_path / "c", "lora", 3, model="minilm", labels=2)}
    engine = Engine("minilm", max_wait=0.05)
    for name, path in paths.items():
        engine.load(name, path)
    requests = [(f"/v1/adapters/{n}/{'classify' if n == 'c' else 'embed'}", {"text": t})
                for t in TEXTS for n in paths]
    try:
        with S.running(engine) as url:
            responses = asyncio.run(_burst(url, requests))
    finally:
        engine.close()
    for (path, body), r in zip(requests, responses):
        name = path.split("/")[3]
        assert r.status_code == 200
        if name == "c":
            want = S.alone_logits("minilm", paths[name], body["text"], labels=2).softmax(-1)
            torch.testing.assert_close(torch.tensor(r.json()["results"][0]["probabilities"]), want, atol=1e-4, rtol=0)
        else:
            torch.testing.assert_close(torch.tensor(r.json()["embeddings"][0]),
                                       S.alone_embedding("minilm", paths[name], body["text"]), atol=1e-4, rtol=1e-3)


# ------------------------------------------------------------------------- label names, device, OpenAPI


def test_classify_answers_the_label_names_saved_with_the_adapter(saved, tmp_path):
    from deltatune.models import Classifier

    clf = Classifier(S.fresh("tiny-bert", "base")[0], 3)
    clf.label_names = ["ok", "bug", "style"]
    dt.attach(clf, "lora")
    S.perturb(clf, 6)
    named = dt.save_adapter(clf, tmp_path / "named")
    engine = _engine({"named": named, "bugs": saved["bugs"]})
    try:
        with S.running(engine) as url, httpx.Client(base_url=url) as c:
            r = c.post("/v1/adapters/named/classify", json={"texts": TEXTS[:3]}).json()
            plain = c.post("/v1/adapters/bugs/classify", json={"text": TEXTS[0]}).json()
            listed = {a["name"]: a for a in c.get("/v1/adapters").json()["adapters"]}
    finally:
        engine.close()
    assert r["labels"] == ["ok", "bug", "style"] and "note" not in r
    for text, got in zip(TEXTS[:3], r["results"]):
        want = int(S.alone_logits("tiny-bert", named, text).argmax())
        assert got["index"] == want and got["label"] == ["ok", "bug", "style"][want]
    # an adapter saved without names: indices, and the answer says so
    assert plain["labels"] is None and "no label names" in plain["note"]
    assert plain["results"][0]["label"] == plain["results"][0]["index"]
    assert listed["named"]["label_names"] == ["ok", "bug", "style"] and listed["bugs"]["label_names"] is None


def test_train_saves_the_task_label_names_with_a_classifier(tmp_path):
    from deltatune.training import TrainConfig, train

    folder = tmp_path / "task"
    folder.mkdir()
    for split, n in (("train", 16), ("valid", 8), ("test", 8)):
        rows = [{"text": f"{'cold ice snow' if i % 2 else 'warm sun fire'} {i}", "label": "cold" if i % 2 else "warm"}
                for i in range(n)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train(TrainConfig(model="tiny-bert", task=str(folder), method="lora", max_steps=2, batch_size=8, eval_every=2,
                      max_len=16, out_dir=str(tmp_path / "run"), progress=False))
    config, _ = dt.read_adapter(tmp_path / "run" / "best")
    assert config["labels"] == ["cold", "warm"]  # string labels map to classes in sorted order
    engine = Engine("tiny-bert", max_wait=0.01)
    try:
        engine.load("t", tmp_path / "run")
        (future,) = engine.submit([Job("classify", "t", "cold ice", time.monotonic() + 60)])
        result = future.result(60)
    finally:
        engine.close()
    assert result["label"] == ["cold", "warm"][result["index"]]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_serve_device_option_refuses_a_device_this_machine_lacks(capsys):
    from deltatune import cli

    assert cli.main(["serve", "--model", "tiny-bert", "--device", "cuda"]) != 0
    err = capsys.readouterr().err
    assert "--device cuda" in err and "--device cpu" in err and len(err.strip().splitlines()) == 1
    assert cli.main(["serve", "--model", "tiny-bert", "--device", "banana"]) != 0
    assert "not a device" in capsys.readouterr().err


def test_engine_runs_on_the_device_it_is_given(saved):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    engine = _engine(saved, ["lora", "bugs"], device=device)
    try:
        assert {p.device.type for p in engine.model.parameters()} == {device}
        assert engine.adapters["bugs"].head.weight.device.type == device
        jobs = [Job("embed", "lora", TEXTS[0], time.monotonic() + 60), Job("classify", "bugs", TEXTS[1], time.monotonic() + 60)]
        emb, cls = [f.result(60) for f in engine.submit(jobs)]
    finally:
        engine.close()
    torch.testing.assert_close(torch.tensor(emb["embedding"]), S.alone_embedding("tiny-bert", saved["lora"], TEXTS[0]),
                               atol=1e-4, rtol=1e-3)
    want = S.alone_logits("tiny-bert", saved["bugs"], TEXTS[1]).softmax(-1)
    torch.testing.assert_close(torch.tensor(cls["probabilities"]), want, atol=1e-4, rtol=0)


def test_the_openapi_description_documents_answers_errors_and_the_token(saved):
    engine = _engine(saved, ["lora"])
    try:
        with S.running(engine, token="t") as url:
            spec = httpx.get(url + "/openapi.json").json()
    finally:
        engine.close()
    paths, schemas = spec["paths"], spec["components"]["schemas"]
    embed = paths["/v1/adapters/{name}/embed"]["post"]["responses"]
    assert {"200", "404", "413", "429", "504"} <= set(embed) and "Retry-After" in embed["429"]["description"]
    assert embed["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/Embeddings")
    classify = paths["/v1/adapters/{name}/classify"]["post"]["responses"]["200"]["content"]["application/json"]
    assert classify["schema"]["$ref"].endswith("/Classes") and "label_names" in schemas["AdapterOut"]["properties"]
    assert "application/x-ndjson" in paths["/v1/adapters/{name}/generate"]["post"]["responses"]["200"]["content"]
    assert any(s.get("scheme") == "bearer" for s in spec["components"]["securitySchemes"].values())
    assert paths["/v1/adapters"]["post"].get("security") and not paths["/v1/adapters/{name}/embed"]["post"].get("security")
    assert "429" in spec["info"]["description"] and "token" in spec["info"]["description"]


def test_a_request_that_runs_out_of_time_gets_504_and_the_server_goes_on(saved):
    engine = _engine(saved, ["lora"], max_wait=8.0)  # the row waits for company longer than the timeout
    try:
        with S.running(engine, timeout=3.0) as url, httpx.Client(base_url=url, timeout=30) as c:
            slow = c.post("/v1/adapters/lora/embed", json={"text": "x"})
            assert slow.status_code == 504 and "timeout" in slow.json()["detail"]
            engine.max_wait = 0.0  # the next row runs at once (3 s is room enough on a loaded machine)
            assert c.post("/v1/adapters/lora/embed", json={"text": "x"}).status_code == 200
    finally:
        engine.close()


def test_loading_an_adapter_while_rows_are_queued_serves_them_all(saved):
    engine = _engine(saved, ["lora"], max_wait=3.0)  # the rows wait for company: the load comes between batches

    async def scenario(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            tasks = [asyncio.ensure_future(client.post("/v1/adapters/lora/embed", json={"text": t})) for t in TEXTS[:4]]
            for _ in range(250):
                if engine.queue_depth() == 4:
                    break
                await asyncio.sleep(0.01)
            assert engine.queue_depth() == 4
            loaded = await client.post("/v1/adapters", json={"name": "late", "path": str(saved["ia3"])})
            late = await client.post("/v1/adapters/late/embed", json={"text": TEXTS[0]})
            return loaded, late, await asyncio.gather(*tasks)

    try:
        with S.running(engine) as url:
            loaded, late, responses = asyncio.run(scenario(url))
    finally:
        engine.close()
    assert loaded.status_code == 201 and late.status_code == 200
    torch.testing.assert_close(torch.tensor(late.json()["embeddings"][0]),
                               S.alone_embedding("tiny-bert", saved["ia3"], TEXTS[0]), atol=1e-5, rtol=1e-4)
    for t, r in zip(TEXTS[:4], responses):
        assert r.status_code == 200
        torch.testing.assert_close(torch.tensor(r.json()["embeddings"][0]),
                                   S.alone_embedding("tiny-bert", saved["lora"], t), atol=1e-5, rtol=1e-4)


def test_the_serving_benchmark_times_the_per_request_baseline(capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import serving as bench_serving

    assert bench_serving.main(["--quick", "--model", "tiny-bert", "--skip-server", "--per-request", "--no-write"]) == 0
    table = capsys.readouterr().out
    assert "| vs per-request |" in table
    row = next(line for line in table.splitlines() if line.startswith("| 8 LoRA | mixed |"))
    assert row.rstrip(" |").endswith("x")  # mixed batches against one forward per request
    assert "| 8 LoRA | per-request |" in table and "| 8 mixed methods | per-request |" in table
