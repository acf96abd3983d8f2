#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls this with CI=true). Extra arguments go
# to pytest. Fails when pytest fails, and when it ran no test at all (pytest's exit 5).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
.venv/bin/ruff check . || exit 1
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "test.sh: pytest collected no tests; that is a failure, not a pass" >&2
  exit 1
fi
exit "$rc"
