#!/usr/bin/env bash
# The AVX-512 block-GEMM kernels (cpp/src/cpu/gemm_quant.cpp) on a CPU without AVX-512, through SIMDe's
# portable AVX-512 (Debian: libsimde-dev): a checking aid where no AVX-512 host is at hand, not a
# replacement for one (it checks lane order, tails and packing, not the hardware's instructions; the
# kernel's inline vpdpbusd becomes SIMDe's dpbusd, and three intrinsics SIMDe 0.7.4 lacks are written
# out below). A copy of gemm_quant.cpp gets its AVX-512 section renamed to SIMDe, a copy of
# cpu_backend.cpp reports AVX-512 and VNNI as present, and both replace their objects in a copy of the
# dev build's core library; the result is a separate _C under $EMU/python. Then the ISA and block-GEMM
# tests run against it at every level (test_levels_match_cpuinfo is left out: the levels are faked),
# and optionally a mutation (EMU_MUTATE=1 swaps the two packed groups' halves) to see them fail.
# Usage, after the dev build (README): bash scripts/emulate_avx512.sh [BUILD_DIR (default build/dev)]
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD build=${1:-build/dev} emu=${EMU:-/tmp/lserve_emulate_avx512}
[ -f /usr/include/simde/x86/avx512.h ] || { echo "needs SIMDe: apt-get install libsimde-dev" >&2; exit 2; }
[ -f "$build/liblserve_core.a" ] || { echo "no $build/liblserve_core.a: build the dev tree first" >&2; exit 2; }
rm -rf "$emu" && mkdir -p "$emu"
python3 - "$root" "$emu" "${EMU_MUTATE:-0}" <<'PY'
import re, sys
root, emu, mutate = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
lines = open(f"{root}/cpp/src/cpu/gemm_quant.cpp").read().split("\n")
start = next(i for i, l in enumerate(lines) if "AVX-512 kernels ---" in l)
end = next(i for i, l in enumerate(lines) if i > start and l.startswith("#endif  // LSERVE_CPU_X86"))
section = "\n".join(lines[start:end])
section = re.sub(r'#define LSERVE_AVX512 __attribute__\(\(target\("[^"]*"\)\)\)', "#define LSERVE_AVX512", section)
section = re.sub(r'__asm__\("vpdpbusd[^;]*;\s*return acc;', "return simde_mm512_dpbusd_epi32(acc, u, s);", section)
for name in ("cvtepi32_ps", "cvtepi32_epi16", "cvtph_ps"):
    section = section.replace(f"_mm512_{name}(", f"emu_mm512_{name}(")
section = re.sub(r"\b_mm512_", "simde_mm512_", section)
for vector in ("__m512i", "__m512", "__mmask64", "__mmask16"):
    section = re.sub(rf"\b{vector}\b", f"simde{vector}", section)
if mutate:
    swapped = section.replace("simde_mm512_castsi256_si512(low_items), high_items", "simde_mm512_castsi256_si512(high_items), low_items")
    assert swapped != section, "the mutation's target line moved"
    section = swapped
assert "__asm__" not in section, "inline assembly left in the AVX-512 section"
shims = """
// SIMDe 0.7.4 has no _mm512_cvtepi32_ps, _mm512_cvtepi32_epi16 or _mm512_cvtph_ps.
static inline simde__m512 emu_mm512_cvtepi32_ps(simde__m512i a) {
  simde__m512i_private in = simde__m512i_to_private(a);
  simde__m512_private out;
  for (int i = 0; i < 16; ++i) out.f32[i] = static_cast<float>(in.i32[i]);
  return simde__m512_from_private(out);
}
static inline __m256i emu_mm512_cvtepi32_epi16(simde__m512i a) {
  simde__m512i_private in = simde__m512i_to_private(a);
  alignas(32) int16_t out[16];
  for (int i = 0; i < 16; ++i) out[i] = static_cast<int16_t>(in.i32[i]);
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(out));
}
static inline simde__m512 emu_mm512_cvtph_ps(__m256i a) {
  simde__m512_private out;
  out.m256[0] = _mm256_cvtph_ps(_mm256_castsi256_si128(a));
  out.m256[1] = _mm256_cvtph_ps(_mm256_extracti128_si256(a, 1));
  return simde__m512_from_private(out);
}
"""
lines[start:end] = [shims + section]
text = "\n".join(lines).replace("#include <immintrin.h>", "#include <immintrin.h>\n#include <simde/x86/avx512.h>", 1)
open(f"{emu}/gemm_quant.cpp", "w").write(text)
backend = open(f"{root}/cpp/src/cpu/cpu_backend.cpp").read()
faked = re.sub(r'LSERVE_CPU_FEATURE\("(avx512[a-z]*)"\)', r'CpuFeature{"\1", true}', backend)
assert faked.count("true}") >= 4, "the AVX-512 feature checks moved"
open(f"{emu}/cpu_backend.cpp", "w").write(faked)
PY
flags=(-I"$root/cpp/include" -I"$root/cpp/src" -I"$root/cpp/src/cpu" -O3 -DNDEBUG -std=gnu++17 -fPIC
       -Wno-unused-parameter -Wno-psabi -ffp-contract=off)
c++ "${flags[@]}" -mavx2 -mfma -mf16c -c "$emu/gemm_quant.cpp" -o "$emu/gemm_quant.cpp.o"
c++ "${flags[@]}" -c "$emu/cpu_backend.cpp" -o "$emu/cpu_backend.cpp.o"
if objdump -d "$emu/gemm_quant.cpp.o" | grep -q zmm; then echo "zmm instructions in the emulated object" >&2; exit 1; fi
cp "$build/liblserve_core.a" "$emu/" && (cd "$emu" && ar r liblserve_core.a gemm_quant.cpp.o cpu_backend.cpp.o)
cp -r python "$emu/python" && rm -f "$emu"/python/lserve/_C*.so
suffix=$(python3 -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
c++ -fPIC -O3 -shared -flto=auto -o "$emu/python/lserve/_C$suffix" "$build"/CMakeFiles/_C.dir/cpp/bindings/*.o "$emu/liblserve_core.a"
PYTHONPATH=$emu/python python3 -c "from lserve import _C; print('emulated levels:', _C.cpu_isas())"
PYTHONPATH=$emu/python python3 -m pytest -q -p no:cacheprovider tests/ops/test_cpu_isa.py tests/ops/test_gemm_quant.py \
  tests/engine/test_native_weights.py -m "not slow" --deselect tests/ops/test_cpu_isa.py::test_levels_match_cpuinfo
