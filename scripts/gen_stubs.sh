#!/usr/bin/env bash
# Regenerates python/lserve/_C.pyi (type stubs of the C++ module) from the built module.
# Usage, from the repository root after building: bash scripts/gen_stubs.sh   (needs pybind11-stubgen)
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
PYTHONPATH=python${PYTHONPATH:+:$PYTHONPATH} python3 -m pybind11_stubgen lserve._C -o "$out"
# Build-dependent values become plain annotations.
sed -E 's/^has_cuda_backend: bool = (True|False)$/has_cuda_backend: bool/' "$out/lserve/_C.pyi" > python/lserve/_C.pyi
rm -r "$out"
echo "wrote python/lserve/_C.pyi"
