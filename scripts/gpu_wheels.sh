#!/usr/bin/env bash
# Builds, on this (CPU) machine, the wheels a GPU machine without a package registry lacks for
# bench/gpu_check.sh, into .gpu-wheels/ (ignored by git; the device tool carries it: docs/gpu.md).
#
#   bash scripts/gpu_wheels.sh                 # DeepSpeed + what it needs that the GPU image lacks + trainwarden
#   bash scripts/gpu_wheels.sh --with-optuna   # and Optuna with its dependencies (the check does not import it)
#
# The GPU machine (docs/gpu.md) has Python 3.12, torch 2.11 (CUDA 13.0), accelerate, nvidia-ml-py,
# prometheus-client, numpy, psutil, ninja, einops, msgpack, py-cpuinfo, tqdm, packaging, pyyaml, and
# no DeepSpeed, Optuna or pydantic. What this script brings:
# - DeepSpeed, built here from its sdist into a pure-Python wheel (DS_BUILD_OPS=0): no op is
#   compiled here. Its ops would be JIT-built there with nvcc on first use; the check needs none
#   (AdamW as torch's: `torch_adam`), and its `jit` section times the builds there. Pre-building
#   them here would need torch 2.11.0+cu130 itself (headers and libraries of the GPU machine's
#   build, for Python 3.12) to compile against: see docs/gpu.md.
# - DeepSpeed's dependencies missing there: hjson, pydantic, pydantic-core (binary: cp312
#   manylinux x86-64), annotated-types, typing-inspection, and typing-extensions (pydantic needs
#   a recent one; a newer one shadows the image's harmlessly).
# - trainwarden itself, as a wheel (bench/gpu_check.sh runs the checkout's own code instead; the
#   wheel is for using trainwarden there outside this checkout).
# Versions are this environment's (.venv), so the GPU run uses what the tests here ran with.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-$REPO/.venv/bin/python}"
DEST="${GPU_WHEELS:-$REPO/.gpu-wheels}"
with_optuna=0
[[ "${1:-}" == "--with-optuna" ]] && with_optuna=1

version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
# The GPU machine's interpreter and platform (KINDS.md: Python 3.12, x86-64 manylinux).
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

t0=$SECONDS
rm -rf "$DEST"
mkdir -p "$DEST"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

ds="$(version deepspeed)"
"$PY" -m pip download -q --no-deps --no-binary=:all: -d "$tmp" "deepspeed==$ds"
t=$SECONDS
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "$tmp"/deepspeed-*.tar.gz
echo "deepspeed $ds: wheel built from its sdist in $((SECONDS - t)) s (no op compiled)"

deps=()
for name in hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions; do
    deps+=("$name==$(version "$name")")
done
if [[ $with_optuna == 1 ]]; then
    # Optuna and what it needs beyond the image (MarkupSafe, numpy, PyYAML, tqdm, packaging are there).
    for name in optuna alembic sqlalchemy mako colorlog; do
        deps+=("$name==$(version "$name")")
    done
fi
"$PY" -m pip download -q --no-deps "${TARGET[@]}" -d "$DEST" "${deps[@]}"
echo "downloaded: ${deps[*]}"

"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "$REPO"
rm -rf "$REPO/build"  # setuptools' build folder

size=$(du -sm "$DEST" | cut -f1)
ls -l "$DEST"
echo "$DEST: $(ls "$DEST" | wc -l) wheels, ${size} MiB, in $((SECONDS - t0)) s"
if ((size >= 60)); then
    echo "too large for the device tool's 64 MiB (with the working tree): drop --with-optuna" >&2
    exit 1
fi
