#!/usr/bin/env bash
# Creates the peer-library environments that bench/run.py compares deltatune against:
#   .venv-peers/peft      Hugging Face peft, on the SAME transformers as deltatune's .venv,
#                         so the peft rows differ from deltatune's only by the PEFT library.
#   .venv-peers/adapters  AdapterHub adapters, which pins transformers ~=4.57 (it ships its own
#                         patched model code), so it needs its own environment.
# torch is pinned through constraints.txt (CPU wheel; an unpinned torch pulls a CUDA build).
# Re-running is cheap: each venv keeps a stamp of what it was built from.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${PEERS_DIR:-.venv-peers}
PEFT_VERSION=${PEFT_VERSION:-0.21.2}
ADAPTERS_VERSION=${ADAPTERS_VERSION:-1.3.0}
# peft follows deltatune's transformers (read from the main venv when it exists).
MAIN_TF=$(.venv/bin/python -c 'import transformers; print(transformers.__version__)' 2>/dev/null || echo 5.23.0)

pip_q() {  # pip, quiet, without the harmless notes about this machine's extra local indexes
  "$@" 2> >(grep -v "^WARNING: Location 'file:" >&2)
}

make_venv() {  # make_venv NAME PACKAGE...
  local dir="$ROOT/$1"; shift
  local want
  want=$(printf '%s\n' "$@" | cat - constraints.txt bench/setup_peers.sh | sha256sum | cut -c1-16)
  if [ -f "$dir/.stamp" ] && [ "$(cat "$dir/.stamp")" = "$want" ]; then
    echo "$dir: up to date"; return
  fi
  [ -x "$dir/bin/python" ] || python3 -m venv "$dir"
  pip_q "$dir/bin/pip" install -q -c constraints.txt torch==2.13.0
  pip_q "$dir/bin/pip" install -q -c constraints.txt "$@"
  echo "$want" > "$dir/.stamp"
  echo "$dir: $("$dir/bin/pip" list 2>/dev/null | grep -iE '^(torch|transformers|peft|adapters) ' | tr -s ' ' | paste -sd, -)"
}

make_venv peft "peft==$PEFT_VERSION" "transformers==$MAIN_TF"
make_venv adapters "adapters==$ADAPTERS_VERSION"
