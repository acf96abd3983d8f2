#!/usr/bin/env bash
# GPU check kit: one command, on any CUDA machine (docs/gpu.md). Sections write their JSON as they
# end (a timeout keeps what ran); a summary is printed last.
#
#   bash bench/gpu_check.sh                      # on a GPU: ~1B-parameter GPT, bf16; out: $OUT or bench/results/gpu_check
#   bash bench/gpu_check.sh --dry-run            # on the CPU: tiny model, every code path it can; out: a temp folder
#   bash bench/gpu_check.sh --out DIR --sections metrics oom   # any of bench/gpu_check.py's options
#
# What the machine lacks (DeepSpeed and its dependencies) comes as wheels in .gpu-wheels/
# (scripts/gpu_wheels.sh builds them): installed here into a temporary folder when DeepSpeed is
# not importable. trainwarden is always this checkout's (a link farm on PYTHONPATH), so the check
# runs the code it travels with.
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/trainwarden/torch_extensions}"

dry=0
has_out=0
for a in "$@"; do
    [[ "$a" == "--dry-run" ]] && dry=1
    [[ "$a" == "--out" ]] && has_out=1
done
extra=()
if [[ $has_out == 0 ]]; then
    if [[ $dry == 1 ]]; then
        extra=(--out "$(mktemp -d -t tw-gpu-check-dry.XXXXXX)")
    else
        extra=(--out "${OUT:-$REPO/bench/results/gpu_check}")
    fi
fi

site="$(mktemp -d -t tw-gpu-site.XXXXXX)"
if ! "$PY" -c "import deepspeed" >/dev/null 2>&1; then
    wheel_dir="${GPU_WHEELS:-$REPO/.gpu-wheels}"
    wheels=$(ls "$wheel_dir"/*.whl 2>/dev/null | grep -v '/trainwarden-' || true)
    if [[ -z "$wheels" ]]; then
        echo "gpu_check: DeepSpeed is not importable and $wheel_dir holds no wheels: run scripts/gpu_wheels.sh first (docs/gpu.md)" >&2
        exit 2
    fi
    t=$SECONDS
    # shellcheck disable=SC2086 # one path a word
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site/lib" $wheels || exit 2
    export PYTHONPATH="$site/lib${PYTHONPATH:+:$PYTHONPATH}"
    echo "gpu_check: installed $(echo "$wheels" | wc -l) wheels from $wheel_dir in $((SECONDS - t)) s" >&2
fi
# trainwarden's import names are folders of this checkout (pyproject's package-dir): link them.
mkdir -p "$site/src/trainwarden"
for d in controller adapters policies examples; do ln -sfn "$REPO/$d" "$site/src/trainwarden/$d"; done
export PYTHONPATH="$site/src${PYTHONPATH:+:$PYTHONPATH}"

"$PY" "$REPO/bench/gpu_check.py" "${extra[@]}" "$@"
rc=$?
rm -rf "$site"
exit $rc
