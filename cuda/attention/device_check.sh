#!/usr/bin/env bash
# One device run: build the standalone library, check the SASS, run the CUDA tests and the benchmark.
# Usage (repository root): bash cuda/attention/device_check.sh OUT_DIR [pytest args...]
set -uo pipefail
out="${1:?usage: device_check.sh OUT_DIR [pytest args...]}"; shift
root="$(cd "$(dirname "$0")/../.." && pwd)"
build="$root/build/attention_standalone"
start=$(date +%s)
bash "$root/cuda/attention/build_standalone.sh" "$build" 8 > "$out/build.log" 2>&1 || { tail -50 "$out/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
for o in "$build"/prefill_sm90_bf16.o "$build"/decode_bf16.o "$build"/prefill_sm80_bf16.o; do
  cuobjdump -sass "$o" > "$o.sass" 2>/dev/null
  echo "$(basename "$o"): HGMMA $(grep -c HGMMA "$o.sass") HMMA $(grep -c HMMA "$o.sass") UTMALDG $(grep -c UTMALDG "$o.sass") LDL/STL $(grep -cE 'LDL|STL' "$o.sass")"
done
export LSERVE_ATTN_LIB="$build/libattention_kernels.so" PYTHONUNBUFFERED=1
# A hung kernel must not eat the whole run: each phase has its own time limit, sm90 tests last.
tests="$root/tests/cuda/test_attention_kernels.py"
timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -rs -p no:cacheprovider "$tests" -k "not sm90 and not auto" "$@" 2>&1 \
  | tee "$out/tests.log" | tail -40
timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -rs -p no:cacheprovider "$tests" -k "sm90 or auto" "$@" 2>&1 \
  | tee "$out/tests_sm90.log" | tail -40
echo "tests done: $(( $(date +%s) - start )) s"
timeout "${BENCH_TIMEOUT:-150}" python3 "$root/benchmarks/bench_attention_kernels.py" --out "$out/bench_attention.json" \
  ${BENCH_ARGS:-} 2>&1 | tee "$out/bench.log" | tail -30
echo "total: $(( $(date +%s) - start )) s"
