#!/usr/bin/env bash
# Download the wheels that the GPU check needs and the GPU machine lacks (it has Python 3.12, torch,
# transformers, safetensors, pytest, no network). Each is pinned to the version this checkout's
# .venv has, so the device runs what the tests here ran. Prints the `carry` list for the device run.
#
#   bash scripts/gpu-wheels.sh [--dest DIR] [--python-version X.Y | --local]
#
# --local fetches wheels for this machine's interpreter instead (what `gpu-check.sh --dry-run` uses).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.gpu-wheels
PYVER=3.12
# What travels to the device is the tracked tree plus the carried folders: 64 MiB in all.
CARRY_LIMIT_MB=64
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
while [ $# -gt 0 ]; do
  case "$1" in
    --dest) DEST=$2; shift 2 ;;
    --python-version) PYVER=$2; shift 2 ;;
    --local) PYVER=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")'); shift ;;
    -h|--help) sed -n 2,9p "$0"; exit 0 ;;
    *) echo "gpu-wheels.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
# The library's imports that the device image does not have, and what they import in turn
# (soundfile → cffi → pycparser; diffusers → importlib_metadata; PyWavelets for DCW; torchao for quantization). peft is there, but at an
# unknown version: ours travels.
PACKAGES=(diffusers peft soundfile cffi pycparser importlib-metadata PyWavelets torchao)
rm -rf "$DEST"
mkdir -p "$DEST"
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
for name in "${PACKAGES[@]}"; do
  version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name") || {
    echo "gpu-wheels.sh: $name is not installed in $PY; run scripts/install.sh first" >&2; exit 1; }
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    "${PLATFORMS[@]}" -d "$DEST" "$name==$version"
done
wheels_mb=$(du -sm "$DEST" | cut -f1)
tree_mb=$(( $(git ls-files -z | xargs -0 cat 2>/dev/null | wc -c) / 1048576 ))
echo "wheels: $(ls "$DEST" | wc -l) files, ${wheels_mb} MiB in $DEST (tracked tree ${tree_mb} MiB; limit ${CARRY_LIMIT_MB} MiB together)"
if [ $(( wheels_mb + tree_mb )) -ge "$CARRY_LIMIT_MB" ]; then
  echo "gpu-wheels.sh: over the carry limit" >&2
  exit 1
fi
echo "carry: [\"$DEST\"]"
echo "device command: bash scripts/gpu-check.sh --wheels $DEST   (timeout_s 600)"
