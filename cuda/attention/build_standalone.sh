#!/usr/bin/env bash
# Builds libattention_kernels.so (the attention kernels + the C ABI in attention_capi.cu) for the
# standalone tests and benchmarks: bash cuda/attention/build_standalone.sh OUT_DIR [JOBS].
# Needs nvcc and the CUTLASS headers (pip package nvidia-cutlass, or $CUTLASS_INCLUDE).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:?usage: build_standalone.sh OUT_DIR [JOBS]}"
jobs="${2:-2}"
mkdir -p "$out"
cutlass="${CUTLASS_INCLUDE:-$(python3 -c "import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), 'source', 'include'))")}"
flags=(-std=c++17 -O3 -Xcompiler -fPIC -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr
       -I"$cutlass" -I"$here" ${NVCC_EXTRA_FLAGS:-})
sources=(attention_kernels.cu attention_capi.cu instantiations/prefill_sm80_bf16.cu instantiations/prefill_sm80_fp16.cu instantiations/prefill_sm90_bf16.cu instantiations/prefill_sm90_fp16.cu instantiations/decode_bf16.cu instantiations/decode_fp16.cu)
printf '%s\n' "${sources[@]}" | xargs -P "$jobs" -I{} sh -c \
  'nvcc "$@" -c "'"$here"'/{}" -o "'"$out"'/$(basename {} .cu).o"' _ "${flags[@]}"
nvcc -shared -gencode=arch=compute_90a,code=sm_90a -o "$out/libattention_kernels.so" "$out"/*.o
echo "$out/libattention_kernels.so"
