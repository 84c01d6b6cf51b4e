#!/usr/bin/env bash
# On the GPU machine (no network): install the carried wheels, build lserve with the CUDA backend
# forced on, run the device suite (pytest -m cuda: ops, engine, attention kernels), then the
# benchmarks (lserve bench kernels / latency; LSERVE_BENCH=0 skips them, LSERVE_BENCH_EAGER=1 adds a latency run
# without CUDA graphs), and print short tables last.
# Usage, from the repository root: bash scripts/gpu_check.sh [WHEEL_DIR] [PYTEST ARGS...]
#   WHEEL_DIR (default .whl): the wheels the machine lacks (nvidia-cutlass; see shared/device/README.md).
#   The build directory (default build/gpu, ignored by git) survives between calls on a warm machine.
#   Logs go to $OUT (the device tool's folder) or /tmp/lserve_gpu_check: build.log, pytest.log, junit.xml.
# LSERVE_CUDA_ARCHITECTURES (default 90a) limits the build to the GPU at hand; CI builds 90a and 80.
set -uo pipefail
cd "$(dirname "$0")/.."
wheels=${1:-.whl}
shift || true
out=${OUT:-/tmp/lserve_gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

if compgen -G "$wheels/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$wheels"/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"

# The device image's default g++ (/opt/gcc/bin/g++, a wrapper script) links libstdc++ into the module
# statically; with a second libstdc++ in the process (numpy's), the first std::ostringstream << long in
# Engine::finalize jumps through the wrong locale facet and segfaults (seen 2026-12-05). Build with the
# distribution's compiler, which links libstdc++.so like every other extension in the process.
# The image may export CXX=/opt/gcc/bin/g++ itself, so the override does not wait for CXX to be unset;
# LSERVE_GPU_CXX names another compiler on purpose.
if [ -n "${LSERVE_GPU_CXX:-}" ]; then
  export CXX=$LSERVE_GPU_CXX CUDAHOSTCXX=$LSERVE_GPU_CXX
elif [ -x /usr/bin/g++ ]; then
  export CC=/usr/bin/gcc CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++
fi
echo "host compiler: ${CXX:-$(command -v g++)}" | tee -a "$out/gpu.txt"
start=$(date +%s)
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16} python3 -m pip install -v --no-build-isolation --no-deps \
  -Ccmake.define.LSERVE_CUDA=ON -Ccmake.define.LSERVE_CUDA_ARCHITECTURES="${LSERVE_CUDA_ARCHITECTURES:-90a}" \
  -Cbuild-dir="${LSERVE_BUILD_DIR:-build/gpu}" . >"$out/build.log" 2>&1
build_rc=$?
build_s=$(( $(date +%s) - start ))
if [ $build_rc -ne 0 ]; then
  grep -E "error|Error|FAILED" "$out/build.log" | head -40
  echo "| build | FAILED (rc $build_rc, ${build_s}s) |"
  exit 1
fi
grep -E "lserve: CUDA backend" "$out/build.log" | head -2

start=$(date +%s)
# Ops first: their results stand even if an end-to-end test brings the process down.
# LSERVE_GPU_TESTS (space-separated paths) runs those instead, in that order.
tests=${LSERVE_GPU_TESTS:-tests/cuda/test_ops.py tests/cuda/test_sample_cuda.py tests/cuda/test_logprobs_cuda.py tests/cuda/test_page_select_cuda.py tests/cuda/test_sparse_ops_cuda.py tests/cuda/test_engine_cuda.py tests/cuda/test_sparse_engine_cuda.py tests/cuda/test_attention_kernels.py}
# shellcheck disable=SC2086  # one word per path
timeout "${LSERVE_TEST_TIMEOUT:-900}" python3 -X faulthandler -m pytest $tests -m cuda -q -rfEs \
  -p no:cacheprovider --junitxml="$out/junit.xml" "$@" 2>&1 | tee "$out/pytest.log"
test_rc=${PIPESTATUS[0]}
test_s=$(( $(date +%s) - start ))

python3 - "$out/junit.xml" "$build_s" "$test_s" <<'PY'
import collections, os, sys, xml.etree.ElementTree as ET
path, build_s, test_s = sys.argv[1:]
if not os.path.exists(path):
    sys.exit(f"| pytest | crashed before writing {path}: see pytest.log | (build {build_s}s, tests {test_s}s)")
counts = collections.defaultdict(lambda: collections.Counter())
for case in ET.parse(path).iter("testcase"):
    group = case.get("classname", "?").split(".")[-1]
    outcome = "passed"
    for child in case:
        if child.tag in ("failure", "error"):
            outcome = "failed"
        elif child.tag == "skipped":
            outcome = "skipped"
    counts[group][outcome] += 1
print(f"\n| group | passed | failed | skipped |   (build {build_s}s, tests {test_s}s)")
print("|---|---|---|---|")
for group, c in sorted(counts.items()):
    print(f"| {group} | {c['passed']} | {c['failed']} | {c['skipped']} |")
PY
if [ "${LSERVE_BENCH:-1}" != "0" ]; then
  (cd /tmp && timeout "${LSERVE_BENCH_KERNELS_TIMEOUT:-240}" python3 -m lserve.cli bench kernels \
     --out "$out/kernels.json" --plot "$out/kernels.png" > "$out/kernels.log" 2>&1) || echo "bench kernels failed: $out/kernels.log"
  (cd /tmp && timeout "${LSERVE_BENCH_LATENCY_TIMEOUT:-420}" python3 -m lserve.cli bench latency \
     --lengths "${LSERVE_BENCH_LENGTHS:-8192,32768,131072}" --out "$out/latency.json" --plot "$out/latency.png" \
     > "$out/latency.log" 2>&1) || echo "bench latency failed: $out/latency.log"
  if [ "${LSERVE_BENCH_EAGER:-0}" != "0" ]; then  # the same without CUDA graphs, lserve only
    (cd /tmp && timeout "${LSERVE_BENCH_LATENCY_TIMEOUT:-420}" python3 -m lserve.cli bench latency --enforce-eager \
       --skip-transformers --lengths "${LSERVE_BENCH_LENGTHS:-8192,32768,131072}" --out "$out/latency_eager.json" \
       > "$out/latency_eager.log" 2>&1) || echo "bench latency (eager) failed: $out/latency_eager.log"
  fi
  echo
  grep -E "^(prefill|decode|gemm)" "$out/kernels.log" 2>/dev/null
  grep -E "TTFT" "$out/latency.log" 2>/dev/null
  grep -E "TTFT" "$out/latency_eager.log" 2>/dev/null | sed 's/^lserve /eager  /'
fi
exit $test_rc
