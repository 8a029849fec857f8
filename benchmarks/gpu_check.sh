#!/usr/bin/env bash
# The device check on a machine with one NVIDIA GPU and no network (benchmarks/gpu_check.py says
# what it measures): installs stagewise and its dependencies into a fresh venv from the wheels
# carried beside this script, then runs the check within 8 minutes and writes one JSON.
#
#   benchmarks/gpu_check.sh [--dry-run] [--out FILE] [--text FILE] [--work DIR]   (gpu_check.py's options)
#
# Wheels: benchmarks/wheels/ (or $GPU_CHECK_WHEELS), made on a machine with network by
#   pip download -d benchmarks/wheels --index-url https://download.pytorch.org/whl/cu128 torch==2.13.0
#   pip download -d benchmarks/wheels -c constraints.txt ".[test,liger]" "setuptools>=77" wheel
# (a few GB: carry them with the checkout). Where the machine's python already has a CUDA torch,
# GPU_CHECK_SYSTEM_TORCH=1 makes the venv see it and installs only the rest from the wheels.
# nanoGPT's train.py, model.py and configurator.py are carried in benchmarks/nanogpt/.
#
# --dry-run: everything but CUDA, on the CPU at toy sizes, in the project's own .venv (no install):
# what CI runs (tests/test_gpu_check.py).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
dry=""
for arg in "$@"; do
  if [ "$arg" = --dry-run ]; then dry=1; fi
done

if [ -n "$dry" ]; then
  python="${PYTHON:-$root/.venv/bin/python}"
else
  wheels="${GPU_CHECK_WHEELS:-$here/wheels}"
  if [ ! -d "$wheels" ]; then
    echo "gpu_check.sh: no wheels at $wheels (see the top of this script for how to make them)" >&2
    exit 2
  fi
  venv="$(mktemp -d)/venv"
  if [ "${GPU_CHECK_SYSTEM_TORCH:-0}" = 1 ]; then
    python3 -m venv --system-site-packages "$venv"
  else
    python3 -m venv "$venv"
  fi
  "$venv/bin/python" -m pip install -q --no-index --find-links "$wheels" -c "$root/constraints.txt" -e "$root[test]"
  python="$venv/bin/python"
fi
cd "$root"
export PATH="$(dirname "$python"):$PATH"  # its torchrun
if [ -n "$dry" ]; then
  exec "$python" "$here/gpu_check.py" "$@"
fi
exec timeout 480 "$python" "$here/gpu_check.py" "$@"
