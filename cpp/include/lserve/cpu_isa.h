// The CPU backend's instruction-set levels. One build holds every kernel (per-function target
// attributes, never -march=native: the baseline binary stays plain x86-64); each CpuBackend picks
// one level when it is made: the best this CPU and OS run, or the one the environment variable
// LSERVE_CPU_ISA names (tests and benchmarks force each path with it). An op without a kernel of
// that level runs its best one below it. Detection: cpp/src/cpu/cpu_backend.cpp; tests:
// tests/ops/test_cpu_isa.py.
#pragma once

#include <string>
#include <vector>

namespace lserve {

enum class CpuIsa {  // ordered: each level has every feature of the ones below it
  kGeneric,          // portable C++
  kAvx2,             // AVX2 + FMA + F16C
  kAvx512,           // + AVX512F, AVX512BW, AVX512VL
  kAvx512Vnni,       // + AVX512-VNNI (vpdpbusd)
};

// "generic" | "avx2" | "avx512" | "avx512vnni": LSERVE_CPU_ISA's values.
const char* cpu_isa_name(CpuIsa isa);

// The levels this CPU and OS run, lowest first ("generic" always).
std::vector<CpuIsa> supported_cpu_isas();

// The CPU features (as GCC's __builtin_cpu_supports spells them, e.g. "avx512bw", "avx512vnni")
// that `isa` needs and this CPU lacks; empty when it runs `isa`.
std::vector<std::string> missing_cpu_features(CpuIsa isa);

// The level a CpuBackend made now runs: LSERVE_CPU_ISA's value, or the best supported one when the
// variable is unset or empty. Raises lserve::Error naming the variable and the value when the value
// is not a level, or names the features this CPU lacks for it (never a SIGILL later).
CpuIsa select_cpu_isa();

}  // namespace lserve
