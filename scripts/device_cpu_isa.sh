#!/usr/bin/env bash
# On the device tool's host (its CPU has AVX-512 and VNNI, this VM's does not): a CPU-only build of
# _C, the ISA-level tests at every level the CPU runs, and the block GEMM timing per level.
# The host has no network: carry .whl with gguf, pyyaml and tqdm wheels for its Python, e.g.
#   pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl gguf==0.19.0 pyyaml tqdm
# Usage, from the repository root: bash scripts/device_cpu_isa.sh   (logs and JSON under $OUT)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/lserve_cpu_isa}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/gguf*.whl .whl/pyyaml*.whl .whl/tqdm*.whl \
  >"$out/pip.log" 2>&1
export PYTHONPATH=/tmp/site:$PWD/python
grep -m1 "model name" /proc/cpuinfo
start=$(date +%s)
cmake -S . -B build/cpu -G Ninja -DLSERVE_CUDA=OFF -DLSERVE_BUILD_PYTHON=ON -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_C_COMPILER=/usr/bin/gcc -DCMAKE_CXX_COMPILER=/usr/bin/g++ \
  -Dpybind11_DIR="$(python3 -c "import pybind11; print(pybind11.get_cmake_dir())")" \
  -DPython_EXECUTABLE="$(command -v python3)" >"$out/cmake.log" 2>&1 &&
  ninja -C build/cpu -j"$(nproc)" _C >"$out/build.log" 2>&1 || { echo "build failed: $out/build.log"; exit 1; }
echo "build $(( $(date +%s) - start ))s"
python3 -c "from lserve import _C; print('levels:', _C.cpu_isa(), _C.cpu_isas())"
python3 -m pytest -q -rs -p no:cacheprovider tests/ops/test_cpu_isa.py tests/ops/test_gemm_quant.py >"$out/pytest.log" 2>&1
echo "pytest rc $?"; tail -5 "$out/pytest.log"
for format in q4_1 q8_0; do
  python3 benchmarks/bench_gemm_quant_isa.py --format "$format" --threads 8 --rows 1,64 --repeat 64 \
    --json "$out/bench_isa_$format.json"
done
