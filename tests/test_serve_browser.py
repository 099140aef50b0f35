"""The web page at / in a real headless Chromium (the system's package, driven by Playwright).

Chromium comes from scripts/install_browser.sh (apt: chromium); Playwright only drives it
(executable_path), no browser is downloaded. Without Chromium the test is skipped, except under
CI=true, where it fails: CI must run the install script.
"""
from __future__ import annotations

import os
import shutil

import httpx
import pytest

from deltatune.serve.app import build_index
from deltatune.serve.engine import Engine

from . import serving as S

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _browser(p):
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail("no chromium on PATH: run scripts/install_browser.sh (CI installs it)")
        pytest.skip("no chromium on PATH: run scripts/install_browser.sh")
    return p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])


@pytest.fixture(scope="module")
def sync_playwright():
    playwright = pytest.importorskip("playwright.sync_api") if os.environ.get("CI") != "true" else \
        __import__("playwright.sync_api", fromlist=["sync_playwright"])
    with playwright.sync_playwright() as p:
        yield p


def test_the_page_lists_adapters_classifies_and_searches(sync_playwright, tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    (code / "files.py").write_text("def read_text(path):\n    return open(path).read()\n\n\n"
                                   "def write_text(path, text):\n    open(path, 'w').write(text)\n")
    search = S.save_retrieval(tmp_path / "search", "lora", 1)
    bugs = S.save_classifier(tmp_path / "bugs", "ia3", 2)
    engine = Engine("tiny-bert", max_wait=0.01, index_dir=str(tmp_path / "index"))
    engine.load("search", search)
    engine.load("bugs", bugs)
    try:
        with S.running(engine) as url:
            build_index(engine, "search", str(code))
            want_class = httpx.post(url + "/v1/adapters/bugs/classify", json={"text": "if x = 1:"}).json()["results"][0]
            want_hits = httpx.post(url + "/v1/adapters/search/search", json={"query": "read a file", "k": 5}).json()
            browser = _browser(sync_playwright)
            try:
                page = browser.new_page()
                errors = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.goto(url + "/")
                page.wait_for_selector("#adapters tbody tr")
                rows = page.inner_text("#adapters tbody")
                assert "search" in rows and "retrieval" in rows and "lora" in rows and "2 functions" in rows
                assert "bugs" in rows and "classification" in rows and "ia3" in rows

                page.select_option("#adapter", "bugs")
                page.fill("#input", "if x = 1:")
                page.click("#go")
                page.wait_for_selector("#output .result")
                assert page.inner_text("#output .result").startswith(f"class {want_class['label']} ")

                page.select_option("#adapter", "search")
                assert "search the indexed code" in page.inner_text("#hint")
                page.fill("#input", "read a file")
                page.click("#go")
                page.wait_for_selector("#output .hit")
                hits = page.locator("#output .hit").all_inner_texts()
                assert len(hits) == 2
                first = want_hits["results"][0]
                assert hits[0].startswith(f"{first['name']} \u2014 {first['file']}:{first['line']}")
                assert first["code"].splitlines()[0] in hits[0]

                page.fill("#input", "   ")  # the server's 400 is shown, and the page keeps working
                page.click("#go")
                page.wait_for_function("document.getElementById('error').textContent.length > 0")
                assert "400" in page.inner_text("#error") and "empty" in page.inner_text("#error")
                page.wait_for_function("document.querySelector('#adapters tbody').innerText.includes('search')")
                assert not errors, errors
            finally:
                browser.close()
    finally:
        engine.close()


def test_the_page_streams_generated_text(sync_playwright, tmp_path):
    gen = S.save_generator(tmp_path / "gen", "lora", 3)
    engine = Engine("tiny-llama", max_wait=0.01)
    engine.load("writer", gen)
    try:
        with S.running(engine) as url:
            want = httpx.post(url + "/v1/adapters/writer/generate",
                              json={"prompt": "def add(a, b):", "max_new_tokens": 64, "stream": False}, timeout=60).json()
            browser = _browser(sync_playwright)
            try:
                page = browser.new_page()
                page.goto(url + "/")
                page.wait_for_selector("#adapters tbody tr")
                assert "generate" in page.inner_text("#hint")
                page.fill("#input", "def add(a, b):")
                page.click("#go")
                page.wait_for_function(f"document.querySelector('#output .result') && "
                                       f"document.querySelector('#output .result').textContent.length >= {len(want['text'])}")
                assert page.inner_text("#output .result").strip() == want["text"].strip()
            finally:
                browser.close()
    finally:
        engine.close()
