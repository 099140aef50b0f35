# The two Quickstart commands: `make demo` and `make test`. Both set up .venv first.
PY := .venv/bin/python

.PHONY: setup demo test test-fast bench browser
setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m deltatune demo

test: setup browser
	$(PY) -m pytest

test-fast: setup browser
	$(PY) -m pytest -m "not slow"

# Chromium for the web page's browser test (tests/test_serve_browser.py), as CI installs it (.ci/run), where this
# machine allows it (apt-get as root or with passwordless sudo). Elsewhere the suite skips that test and says so
# on its last line (tests/conftest.py), with how to run it.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  echo "make: installing Chromium for the browser test (scripts/install_browser.sh)"; \
	  bash scripts/install_browser.sh >/dev/null 2>&1 || echo "make: Chromium cannot be installed here; the browser test will be skipped"; }

bench: setup
	bash bench/setup_peers.sh
	$(PY) bench/run.py
