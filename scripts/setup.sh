#!/usr/bin/env bash
# Creates .venv and installs trainwarden into it: torch pinned first (a CPU build on these
# machines; the CUDA build on a GPU machine), then the package with its extras, editable.
# Idempotent: a second run with an unchanged pyproject.toml does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_PIN=${TRAINWARDEN_TORCH:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PY --version)" >&2
  "$PY" -m venv .venv
fi
stamp=.venv/.trainwarden-setup
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $TORCH_PIN"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "setup: installing $TORCH_PIN, then trainwarden[all,test] (editable)" >&2
.venv/bin/python -m pip install --quiet --disable-pip-version-check "$TORCH_PIN"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[all,test]'
echo "$want" > "$stamp"
