#!/usr/bin/env bash
# The main job: a real small training run on this CPU under a budget policy, with the
# controller switching live. Extra arguments go to `trainwarden demo` (e.g. --quick).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/trainwarden demo "$@"
