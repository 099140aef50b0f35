"""Helpers for the server tests: tiny adapters saved to folders, and a real server on 127.0.0.1."""
from __future__ import annotations

import copy
import functools
import socket
import threading
import time
from contextlib import contextmanager

import torch

import deltatune as dt
from deltatune.models import BiEncoder, Classifier, load_backbone


@functools.lru_cache(maxsize=None)
def _base(model: str, kind: str):
    return load_backbone(model, kind)


def fresh(model: str, kind: str):
    """(a fresh copy of the model, its tokenizer): loading the tokenizer from disk is the slow part."""
    backbone, tok = _base(model, kind)
    return copy.deepcopy(backbone), tok


def perturb(model, seed: int, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def save_retrieval(path, method: str, seed: int, model: str = "tiny-bert", **options):
    enc = BiEncoder(fresh(model, "base")[0])
    dt.attach(enc, method, **options)
    perturb(enc, seed)
    return dt.save_adapter(enc, path)


def save_classifier(path, method: str, seed: int, labels: int = 3, model: str = "tiny-bert", **options):
    clf = Classifier(fresh(model, "base")[0], labels)
    dt.attach(clf, method, **options)
    perturb(clf, seed)
    return dt.save_adapter(clf, path)


def save_generator(path, method: str, seed: int, model: str = "tiny-llama", **options):
    lm, _ = fresh(model, "lm")
    dt.attach(lm, method, **options)
    perturb(lm, seed, scale=0.5)
    return dt.save_adapter(lm, path)


@functools.lru_cache(maxsize=None)
def _alone(model: str, path, labels: int | None = None):
    backbone, tok = fresh(model, "base")
    task = BiEncoder(backbone) if labels is None else Classifier(backbone, labels)
    dt.load_adapter(task, path)
    return task.eval(), tok


def alone_embedding(model: str, path, text: str, max_len: int = 256) -> torch.Tensor:
    """What one adapter gives for one text on its own: a fresh model, this adapter only, batch of 1."""
    enc, tok = _alone(model, str(path))
    with torch.no_grad():
        return enc.eval()(**tok([text], truncation=True, max_length=max_len, return_tensors="pt"))[0]


def alone_logits(model: str, path, text: str, labels: int = 3) -> torch.Tensor:
    clf, tok = _alone(model, str(path), labels)
    with torch.no_grad():
        return clf.eval()(**tok([text], return_tensors="pt"))[0]


def free_port() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextmanager
def running(engine, **app_options):
    """A uvicorn server for ``engine`` on 127.0.0.1 (a free port), in a thread; yields its base URL."""
    import uvicorn

    from deltatune.serve.app import create_app

    app = create_app(engine, **app_options)
    sock = free_port()
    server = uvicorn.Server(uvicorn.Config(app, log_level="error", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(400):
        if server.started:
            break
        time.sleep(0.025)
    assert server.started, "the test server did not start"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
