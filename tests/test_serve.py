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
from fastapi import Request
from pydantic import BaseModel

import deltatune as dt
from deltatune.models import load_backbone
from deltatune.serve import api
from deltatune.serve.engine import Engine, Job, ServeError

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
            loop = tmp_path / "loop"
            loop.symlink_to(loop)
            for path, says in (("a\0b", "NUL character"), ("x" * 300, "File name too long"),
                               (f"{loop}/x", "Too many levels of symbolic links")):
                odd = c.post("/v1/adapters", json={"name": "q", "path": path}, headers=auth)
                assert odd.status_code == 400 and says in odd.json()["detail"], odd.text
                odd = c.post("/v1/adapters/lora/index", json={"path": path}, headers=auth)
                assert odd.status_code == 400 and says in odd.json()["detail"], odd.text
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
    passes, rows = _metric(metrics, "deltatune_batch_size_count"), _metric(metrics, "deltatune_batch_size_sum")
    assert rows > passes  # one decode pass per token, and the streams' rows shared passes


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


# ------------------------------------------------------------- hostile inputs, the endpoint table, what clients see


def _raw(url, path, body: bytes):
    """POST a body exactly as given (httpx's json= cannot send a lone surrogate: it encodes to UTF-8 first)."""
    return httpx.post(url + path, content=body, headers={"content-type": "application/json"}, timeout=30)


async def _raw_burst(url, requests):
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        return await asyncio.gather(*(client.post(path, content=body, headers={"content-type": "application/json"})
                                      for path, body in requests))


def test_a_row_with_a_lone_surrogate_fails_alone_among_30_concurrent_requests(saved):
    engine = _engine(saved, ["lora", "ia3", "bugs"], max_wait=0.3)  # the 30 rows wait for each other: shared batches
    requests, bad = [], 13
    for i in range(30):
        name = ["lora", "ia3", "bugs"][i % 3]
        text = "abc \ud800" if i == bad else TEXTS[i % len(TEXTS)]
        # json.dumps writes the lone surrogate as the escape \ud800, as a hostile client would
        requests.append((f"/v1/adapters/{name}/{'classify' if name == 'bugs' else 'embed'}",
                         json.dumps({"text": text}).encode()))
    try:
        with S.running(engine) as url:
            responses = asyncio.run(_raw_burst(url, requests))
            # the same text as raw bytes (UTF-8's form of a surrogate), in a list, in a query, in a prompt
            raw = _raw(url, "/v1/adapters/lora/embed", b'{"texts": ["fine", "abc \xed\xa0\x80"]}')
            query = _raw(url, "/v1/adapters/lora/search", b'{"query": "\\udfff"}')
            paired = _raw(url, "/v1/adapters/lora/embed", json.dumps({"text": "smile \U0001F600"}).encode())
            metrics = httpx.get(url + "/metrics").text
            alive = httpx.get(url + "/health").json()["status"]
    finally:
        engine.close()
    codes = [r.status_code for r in responses]
    assert codes[bad] == 400 and codes[:bad] + codes[bad + 1:] == [200] * 29, codes
    detail = responses[bad].json()["detail"]
    assert "field 'text'" in detail and "lone surrogate U+D800 at character 4" in detail
    for i, ((path, body), r) in enumerate(zip(requests, responses)):
        if i == bad:
            continue
        name, text = path.split("/")[3], json.loads(body)["text"]
        if name == "bugs":
            want = S.alone_logits("tiny-bert", saved[name], text).softmax(-1)
            torch.testing.assert_close(torch.tensor(r.json()["results"][0]["probabilities"]), want, atol=2e-5, rtol=0)
        else:
            torch.testing.assert_close(torch.tensor(r.json()["embeddings"][0]),
                                       S.alone_embedding("tiny-bert", saved[name], text), atol=1e-5, rtol=1e-4)
    assert _metric(metrics, "deltatune_batch_size_sum") == 29 + 1  # the 29 and the emoji: no bad row reached a batch
    assert _metric(metrics, "deltatune_batch_size_count") < 15  # the others shared forward passes
    assert raw.status_code == 400 and "field 'texts.1'" in raw.json()["detail"]
    assert query.status_code == 400 and "field 'query'" in query.json()["detail"] and "U+DFFF" in query.json()["detail"]
    assert paired.status_code == 200  # a valid pair (an emoji written as \ud83d\ude00) is one character, not a surrogate
    assert alive == "ok"


def test_a_row_that_breaks_a_batch_fails_alone_in_the_engine(saved):
    engine = _engine(saved, ["lora", "ia3"])
    try:
        bad = Job("embed", "lora", "abc \ud800", time.monotonic() + 60)
        with pytest.raises(ServeError) as refused:  # at the door: the row never joins a batch
            engine.submit([Job("embed", "ia3", "fine", time.monotonic() + 60), bad])
        assert refused.value.status == 400 and "lone surrogate at character 4" in refused.value.message
        # and should a row the door let through break a batch, the worker runs the rows alone: only it fails
        good = [Job("embed", n, t, time.monotonic() + 60) for n, t in (("lora", TEXTS[0]), ("ia3", TEXTS[1]))]
        engine._execute([good[0], bad, good[1]])
    finally:
        engine.close()
    with pytest.raises(ServeError) as failed:
        bad.future.result(0)
    assert failed.value.status == 500 and "this row failed" in failed.value.message
    for job in good:
        torch.testing.assert_close(torch.tensor(job.future.result(0)["embedding"]),
                                   S.alone_embedding("tiny-bert", saved[job.adapter], job.text), atol=1e-5, rtol=1e-4)


def _stream_chunked(port: int, total: int) -> tuple[int, bytes]:
    """Send a chunked body of up to ``total`` bytes, stopping as soon as the server answers; (bytes sent, answer)."""
    import select

    piece = b"x" * (1 << 16)
    frame = b"%x\r\n" % len(piece) + piece + b"\r\n"
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /v1/adapters/lora/embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n")
    sock.setblocking(False)
    sent, offset, deadline = 0, 0, time.monotonic() + 60
    try:
        while sent < total and time.monotonic() < deadline:
            readable, writable, _ = select.select([sock], [sock], [], 1.0)
            if readable:
                break
            if writable:
                try:
                    n = sock.send(frame[offset:])
                except BlockingIOError:
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    break
                sent, offset = sent + n, (offset + n) % len(frame)
        sock.setblocking(True)
        sock.settimeout(10)
        answer = b""
        while b"\r\n\r\n" not in answer:
            data = sock.recv(4096)
            if not data:
                break
            answer += data
        return sent, answer
    finally:
        sock.close()


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the resident size from /proc")
def test_a_body_over_the_limit_is_refused_before_it_is_read(saved):
    from deltatune.serve.app import body_limit

    engine = _engine(saved, ["lora"], max_wait=0.0)
    limit = body_limit(100, 4)
    try:
        with S.running(engine, max_chars=100, max_items=4) as url:
            port = int(url.rsplit(":", 1)[1])
            # 1. a declared 120 MB body: answered at once, not a byte of it sent
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(b"POST /v1/adapters/lora/embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 120000000\r\n\r\n")
            head = b""
            while data := sock.recv(4096):  # the answer, then the server closes: it will not read that body
                head += data
            head = head.decode()
            sock.close()
            assert head.startswith("HTTP/1.1 413") and f"reads at most {limit}" in head
            # 2. 120 MB streamed without a length: the server stops reading at the limit, the process stays flat
            before = _rss_mb()
            sent, answer = _stream_chunked(port, 120 << 20)
            grown = _rss_mb() - before
            assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
            assert sent < 40 << 20, sent  # it answered long before the 120 MB (what was sent sits in socket buffers)
            assert grown < 40, grown
            # 3. the largest request the limits allow still passes: 4 texts of 100 characters, each escaped to 12 bytes
            biggest = json.dumps({"texts": ["\U0001F600" * 100] * 4}).encode()
            assert len(biggest) <= limit and _raw(url, "/v1/adapters/lora/embed", biggest).status_code == 200
            assert httpx.post(url + "/v1/adapters/lora/embed", json={"text": "still here"}).status_code == 200
            metrics = httpx.get(url + "/metrics").text
    finally:
        engine.close()
    assert 'endpoint="embed",status="413"' in metrics


def test_a_body_that_never_arrives_is_answered_408_and_the_server_answers_others(saved, monkeypatch):
    from deltatune.serve import app

    monkeypatch.setattr(app, "BODY_SECONDS", 1.0)
    engine = _engine(saved, ["lora"], max_wait=0.0)
    try:
        with S.running(engine) as url:
            port = int(url.rsplit(":", 1)[1])
            slow = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
            for sock in slow:  # 10 of the 100 bytes promised, then nothing
                sock.sendall(b"POST /v1/adapters/lora/embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 100\r\n\r\n{\"text\": \"")
            assert httpx.get(url + "/health", timeout=5).status_code == 200
            for sock in slow:
                answer = sock.recv(4096).decode()
                assert answer.startswith("HTTP/1.1 408") and "took over 1.0 s to arrive" in answer, answer
                sock.close()
            assert httpx.post(url + "/v1/adapters/lora/embed", json={"text": "x"}).status_code == 200
    finally:
        engine.close()


@pytest.mark.parametrize("flags, words", [
    (["--port", "99999"], "--port must be a whole number in [0, 65535], got 99999"),
    (["--host", ""], "--host is empty"),
    (["--port", "-1"], "--port must be"),
    (["--max-batch", "0"], "--max-batch must be a whole number in [1, 4096], got 0"),
    (["--queue", "0"], "--queue must be a whole number in [1, 1000000], got 0"),
    (["--max-wait-ms", "nan"], "--max-wait-ms must be a finite number"),
    (["--max-wait-ms", "-5"], "--max-wait-ms must be"),
    (["--timeout", "0"], "--timeout must be"),
    (["--timeout", "inf"], "--timeout must be a finite number"),
    (["--max-len", "2"], "--max-len must be"),
    (["--max-chars", "0"], "--max-chars must be"),
    (["--port", "abc"], "argument --port: invalid int value: 'abc'"),
    (["--max-len", "100000"], "max_len=100000 is more than the 512 positions of tiny-bert; use --max-len 512 or less"),
])
def test_the_serve_command_refuses_nonsense_flags_in_one_line(flags, words, capsys):
    from deltatune import cli

    try:
        code = cli.main(["serve", "--model", "tiny-bert", "--port", "0", *flags])
    except SystemExit as stop:  # argparse's own type errors
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2 and words in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_the_serve_command_names_a_port_in_use(capsys):
    from deltatune import cli

    taken = S.free_port()
    taken.listen(1)
    try:
        code = cli.main(["serve", "--model", "tiny-bert", "--port", str(taken.getsockname()[1])])
    finally:
        taken.close()
    err = capsys.readouterr().err
    assert code == 2 and "the port is in use" in err and len(err.strip().splitlines()) == 1, err


def _damage(folder: Path, how: str, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    emb, meta = folder / "embeddings.safetensors", folder / "index.json"
    if how == "wider":  # unit rows, one column too many: an index written for another model width
        n = json.loads(meta.read_text())["functions"]
        wide = torch.nn.functional.normalize(torch.randn(len(n), 33), dim=-1)
        emb.unlink()
        save_file({"embeddings": wide}, str(emb))
    elif how == "truncated":
        emb.write_bytes(emb.read_bytes()[:50])
    elif how == "nan":
        from safetensors.torch import load_file
        values = load_file(str(emb))["embeddings"]
        values[0, 0] = float("nan")
        emb.unlink()
        save_file({"embeddings": values}, str(emb))
    elif how == "fifo":  # a reader that opened it blindly would wait for ever
        meta.unlink()
        os.mkfifo(meta)
    elif how == "link":  # a planted link to a well-formed index elsewhere
        elsewhere = tmp_path / f"planted-{how}"
        elsewhere.write_bytes(emb.read_bytes())
        emb.unlink()
        emb.symlink_to(elsewhere)
    elif how == "other key":  # well formed, but written for something else and copied here
        data = json.loads(meta.read_text())
        data["key"] = "0" * 24
        meta.write_text(json.dumps(data))
    elif how == "bad function":
        data = json.loads(meta.read_text())
        data["functions"][0]["file"] = "../../etc/passwd"
        meta.write_text(json.dumps(data))


def test_a_damaged_or_foreign_saved_search_index_is_rebuilt_with_a_warning(saved, tmp_path):
    from deltatune.serve.app import build_index

    root = tmp_path / "code"
    for rel, text in CODE.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    engine = _engine(saved, ["lora"], index_dir=str(tmp_path / "index"))
    q = S.alone_embedding("tiny-bert", saved["lora"], "read a json file")

    def search():
        (future,) = engine.submit([Job("search", "lora", "read a json file", time.monotonic() + 60, k=10)])
        return future.result(60)["results"]

    try:
        first = build_index(engine, "lora", str(root))
        assert not first["cached"] and first["functions"] == 4
        folder = Path(first["saved_to"])
        want = {h["name"]: h["score"] for h in search()}
        for how in ("wider", "truncated", "nan", "fifo", "link", "other key", "bad function"):
            _damage(folder, how, tmp_path)
            with pytest.warns(UserWarning, match="search index .* is not usable: .*; rebuilding it"):
                report = build_index(engine, "lora", str(root))
            assert not report["cached"] and report["functions"] == 4, how
            assert {h["name"]: h["score"] for h in search()} == want, how  # searches answer as before the damage
            assert build_index(engine, "lora", str(root))["cached"], how  # the rebuilt index was saved over it
        assert all(not p.is_symlink() for p in folder.iterdir())
        assert (tmp_path / "planted-link").exists()  # the planted file is left alone: only the link was replaced
        # the index folder itself a link out of the cache: never written through, the index stays in memory
        target = tmp_path / "elsewhere"
        target.mkdir()
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()
        folder.symlink_to(target)
        with pytest.warns(UserWarning) as caught:
            report = build_index(engine, "lora", str(root))
        words = " ".join(str(w.message) for w in caught)
        assert "not usable" in words and "kept in memory only" in words and not report["cached"]
        assert list(target.iterdir()) == []
        assert abs(search()[0]["score"] - max(want.values())) < 1e-6
        assert abs(want["mean"] - float(q @ S.alone_embedding(
            "tiny-bert", saved["lora"], "mean\n" + CODE["math_utils.py"].strip()))) < 1e-4
    finally:
        engine.close()


def test_a_search_after_a_wrong_width_index_answers_over_http(saved, tmp_path):
    from deltatune.serve.app import build_index

    root = tmp_path / "code"
    for rel, text in CODE.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    engine = _engine(saved, ["lora"], index_dir=str(tmp_path / "index"))
    try:
        folder = Path(build_index(engine, "lora", str(root))["saved_to"])
        _damage(folder, "wider", tmp_path)
        engine.adapters["lora"].index = None  # as after a restart: the next index request reads the saved one
        with S.running(engine, token="t") as url, httpx.Client(base_url=url, timeout=60) as c:
            with pytest.warns(UserWarning, match="not usable"):
                r = c.post("/v1/adapters/lora/index", json={"path": str(root)}, headers={"Authorization": "Bearer t"})
            assert r.status_code == 200 and not r.json()["cached"]
            hits = c.post("/v1/adapters/lora/search", json={"query": "read a json file", "k": 10})
            assert hits.status_code == 200 and len(hits.json()["results"]) == 4
    finally:
        engine.close()


def _texts_of(url: str, headers=None) -> str:
    return " ".join(httpx.get(url + path, headers=headers).text for path in ("/v1/adapters", "/health", "/openapi.json",
                                                                          "/metrics", "/"))


def test_clients_without_the_token_see_names_kinds_and_sizes_not_server_paths(saved, tmp_path):
    root = tmp_path / "code"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "io_utils.py").write_text(CODE["pkg/io_utils.py"])
    engine = _engine(saved, ["lora", "bugs"], index_dir=str(tmp_path / "index"))
    secret = str(saved["lora"]).split("/adapters")[0]  # the folders holding the adapters and the index
    try:
        with S.running(engine, token="t") as url, httpx.Client(base_url=url, timeout=60) as c:
            auth = {"Authorization": "Bearer t"}
            assert c.post("/v1/adapters/lora/index", json={"path": str(root)}, headers=auth).status_code == 200
            open_view = c.get("/v1/adapters").json()["adapters"]
            everything = _texts_of(url)
            owner_view = {a["name"]: a for a in c.get("/v1/adapters", headers=auth).json()["adapters"]}
            loaded = c.post("/v1/adapters", json={"name": "p", "path": str(saved["prefix"])}, headers=auth).json()
        with S.running(engine) as url, httpx.Client(base_url=url, timeout=60) as c:  # no token: nobody sees paths
            no_token_view = c.get("/v1/adapters").json()["adapters"]
            indexed = c.post("/v1/adapters/lora/index", json={"path": str(root)}).json()
            everything += _texts_of(url)
    finally:
        engine.close()
    by_name = {a["name"]: a for a in open_view}
    assert by_name["lora"]["kind"] == "retrieval" and by_name["bugs"]["kind"] == "classification"
    assert by_name["lora"]["size_bytes"] > 0 and by_name["lora"]["indexed"] == {"functions": 3}
    for view in (open_view, no_token_view):
        assert all("path" not in a for a in view) and all("root" not in (a["indexed"] or {}) for a in view)
    assert secret not in everything and str(tmp_path) not in everything
    assert indexed["functions"] == 3 and "root" not in indexed and "saved_to" not in indexed
    # the operator, holding the token, still sees where things are
    assert owner_view["lora"]["path"].startswith(str(saved["lora"])) and owner_view["lora"]["indexed"]["root"] == str(root)
    assert loaded["path"].startswith(str(saved["prefix"]))


def test_a_model_folder_is_shown_by_its_name_only(tmp_path):
    backbone, tok = S.fresh("tiny-bert", "base")
    folder = tmp_path / "private" / "my-encoder"
    backbone.save_pretrained(folder)
    tok.save_pretrained(folder)
    engine = Engine(str(folder), max_wait=0.0)
    try:
        with S.running(engine) as url:
            listed = httpx.get(url + "/v1/adapters").json()
            everything = _texts_of(url)
    finally:
        engine.close()
    assert listed["model"] == "my-encoder" and str(tmp_path) not in everything


class Echo(BaseModel):
    text: str


def _openai_error(status: int, message: str) -> dict:
    return {"error": {"message": message, "type": "invalid_request_error", "code": status}}


def test_adding_an_endpoint_is_one_registration(saved):
    """A new endpoint is one function and one @endpoint: routed, documented, guarded, counted, bounded and
    answering errors in its own shape (here OpenAI's), with nothing else edited."""

    @api.endpoint("POST", "/v1/scratch/{name}/tokens", label="scratch", errors=(400, 404, 413, 422),
                  error_body=_openai_error, summary="how many tokens the adapter reads")
    async def tokens(name: str, body: Echo, request: Request, server: api.ServerDep):
        (result,) = await server.run(request, server.jobs(name, "embed", [server.text(body.text)]))
        return {"tokens": result["tokens"]}

    engine = _engine(saved, ["lora"], max_wait=0.0)
    try:
        with pytest.raises(ValueError, match="registered twice"):
            api.endpoint("POST", "/v1/scratch/{name}/tokens", label="again")(tokens)
        with S.running(engine, max_chars=100, max_items=4) as url, httpx.Client(base_url=url) as c:
            ok = c.post("/v1/scratch/lora/tokens", json={"text": "read a file"})
            cases = [(c.post("/v1/scratch/nope/tokens", json={"text": "x"}), 404, "no adapter named 'nope'"),
                     (_raw(url, "/v1/scratch/lora/tokens", b'{"text": "\\ud800"}'), 400, "lone surrogate"),
                     (c.post("/v1/scratch/lora/tokens", json={"text": 3}), 422, "field 'text'"),
                     (c.post("/v1/scratch/lora/tokens", json={"text": "x" * 101}), 413, "limit is 100"),
                     (_raw(url, "/v1/scratch/lora/tokens", b"x" * 200_000), 413, "reads at most")]
            spec = c.get("/openapi.json").json()
            metrics = c.get("/metrics").text
            ours = c.post("/v1/adapters/nope/embed", json={"text": "x"}).json()
    finally:
        api.ENDPOINTS[:] = [e for e in api.ENDPOINTS if e.handler is not tokens]
        engine.close()
    assert ok.status_code == 200 and ok.json()["tokens"] == 5
    for r, status, words in cases:
        assert r.status_code == status and words in r.json()["error"]["message"], (status, r.text)
        assert r.json()["error"]["code"] == status and "detail" not in r.json()
    assert set(ours) == {"detail"}  # the other endpoints keep their own shape
    assert "404" in spec["paths"]["/v1/scratch/{name}/tokens"]["post"]["responses"]
    assert 'endpoint="scratch",status="200"' in metrics and 'endpoint="scratch",status="413"' in metrics
    assert {e.label for e in api.ENDPOINTS} == {"/", "/health", "/metrics", "adapters", "embed", "classify", "search",
                                                 "index", "generate", "openai.models", "openai.completions",
                                                 "openai.chat", "openai.embeddings"}


def test_every_registered_endpoint_is_routed_once(saved):
    from deltatune.serve.app import create_app

    engine = _engine(saved, ["lora"])
    try:
        app = create_app(engine, token="t")
    finally:
        engine.close()
    routed = {(m, r.path) for r in app.routes for m in getattr(r, "methods", ()) if m != "HEAD"}
    registered = {(e.method, e.path) for e in api.ENDPOINTS}
    assert len(registered) == len(api.ENDPOINTS) == 16 and registered <= routed
    assert {p for m, p in routed - registered} <= {"/docs", "/openapi.json", "/docs/oauth2-redirect", "/redoc"}
