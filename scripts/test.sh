#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls this with CI=true). Extra arguments go
# to pytest. Fails when pytest fails, and when it ran no test at all (pytest's exit 5).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
# DeepSpeed JIT-builds its CPU ops (about 2 minutes, once); keep them where the next run finds them.
# One folder per virtual environment: torch's build hash includes the sources' paths (inside the
# venv), so two checkouts sharing one folder would rebuild each other's ops in turn.
venv_key=$(printf '%s' "$PWD/.venv" | sha256sum | cut -c1-12)
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/trainwarden/torch_extensions/$venv_key}
# The dashboard and deploy tests run a real Prometheus (and promtool): Debian's package.
if ! command -v prometheus >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "test.sh: installing Debian's prometheus package (the dashboard test scrapes a real one)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq prometheus >/dev/null 2>&1 ||
      { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq prometheus >/dev/null 2>&1; }
  fi
  if ! command -v prometheus >/dev/null 2>&1; then
    if [ "${CI:-}" = "true" ]; then
      echo "test.sh: cannot install prometheus (apt-get install prometheus, as root); CI needs it" >&2
      exit 1
    fi
    echo "test.sh: no prometheus binary (apt-get install prometheus, as root): its tests will skip" >&2
  fi
fi
# The multi-worker tuning tests run a real PostgreSQL (tests/pg_helpers.py): Debian's package.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "test.sh: installing Debian's postgresql package (the tuning tests share a study on one)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq postgresql >/dev/null 2>&1 ||
      { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq postgresql >/dev/null 2>&1; }
  fi
  if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
    if [ "${CI:-}" = "true" ]; then
      echo "test.sh: cannot install postgresql (apt-get install postgresql, as root); CI needs it" >&2
      exit 1
    fi
    echo "test.sh: no PostgreSQL (apt-get install postgresql, as root): the tuning-on-PostgreSQL tests will skip" >&2
  fi
fi
.venv/bin/ruff check . || exit 1
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "test.sh: pytest collected no tests; that is a failure, not a pass" >&2
  exit 1
fi
exit "$rc"
