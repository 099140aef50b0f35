"""Suite-wide settings: tests start from nothing cached between them."""
import pytest


@pytest.fixture(autouse=True)
def _no_zero_shot_cache(monkeypatch):
    """Every test scores zero-shot itself (tests of the cache turn it on with their own cache folder)."""
    monkeypatch.setenv("DELTATUNE_ZERO_SHOT_CACHE", "0")


BROWSER_TESTS = "tests/test_serve_browser.py"
_BROWSER_NOTE: list = []


def pytest_terminal_summary(terminalreporter):
    """Notes the browser tests skipped (no Chromium or Playwright here); the run's last line says so, with how
    to run them (``pytest_unconfigure``): a green run then does not pass for one that tested the web page."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if r.nodeid.startswith(BROWSER_TESTS)]
    if not skipped:
        return
    longrepr = skipped[0].longrepr
    why = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else "skipped"
    _BROWSER_NOTE.append(
        f"browser tests skipped ({len(skipped)}, {why.removeprefix('Skipped: ')}): the web page was not tested; "
        f"install Chromium with `bash scripts/install_browser.sh` (apt-get: root or sudo), then run "
        f"`.venv/bin/python -m pytest {BROWSER_TESTS}`")


def pytest_unconfigure(config):
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        for line in _BROWSER_NOTE:  # after pytest's own last line (its counts)
            reporter.write_line(line, yellow=True)
    _BROWSER_NOTE.clear()
