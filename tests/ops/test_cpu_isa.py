"""CPU kernel levels (lserve/cpu_isa.h): LSERVE_CPU_ISA forces generic | avx2 | avx512 | avx512vnni,
a level the CPU lacks or an unknown value raises ValueError, and the block-format GEMM gives the
same bits at every level the CPU runs, checked against the dequantised fp32 product on awkward shapes.

Levels this CPU lacks skip, naming the missing /proc/cpuinfo flags. On an AVX-512 machine (with
AVX512-VNNI for the vpdpbusd kernels), from the repository root after building _C:
    PYTHONPATH=python python3 -m pytest -q tests/ops/test_cpu_isa.py -rs
"""
import os
import pathlib

import numpy as np
import pytest
from conftest import CPU_ISAS, make_cpu_backend
from lserve_testing import assert_exact
from test_gemm_quant import FORMATS, assert_matches_dequantised, quantized_weight

from lserve import _C

ALL_ISAS = ("generic", "avx2", "avx512", "avx512vnni")
# The /proc/cpuinfo flags each level needs (cumulative; GCC spells avx512_vnni "avx512vnni").
CPUINFO_FLAGS = {
    "generic": (),
    "avx2": ("avx2", "fma", "f16c"),
    "avx512": ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl"),
    "avx512vnni": ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"),
}
SHAPES = [  # (num_tokens, in_features, out_features): M 1/3/17, N primes and 16 +- 1, K 1, 3 and 128 blocks
    (1, 32, 1),
    (1, 96, 17),
    (1, 4096, 113),
    (3, 32, 13),
    (3, 96, 16),
    (3, 4096, 31),
    (17, 32, 7),
    (17, 96, 113),
    (17, 4096, 37),
]


def cpuinfo_flags():
    """The first processor's flags, or None where /proc/cpuinfo is unreadable (not Linux)."""
    path = pathlib.Path("/proc/cpuinfo")
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None


def missing_flags(isa):
    flags = cpuinfo_flags()
    return None if flags is None else [flag for flag in CPUINFO_FLAGS[isa] if flag not in flags]


def require(isa):
    if isa not in CPU_ISAS:
        missing = missing_flags(isa)
        lacks = ", ".join(missing) if missing else "what this level needs"
        pytest.skip(f"this CPU lacks {lacks}: the {isa} kernels run only on a CPU that has it")


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("LSERVE_CPU_ISA", raising=False)
    return monkeypatch


def test_levels_match_cpuinfo():
    """_C.cpu_isas() (GCC's __builtin_cpu_supports) agrees with the kernel's /proc/cpuinfo flags."""
    if cpuinfo_flags() is None:
        pytest.skip("no /proc/cpuinfo")
    expected = tuple(isa for isa in ALL_ISAS if not missing_flags(isa))
    assert CPU_ISAS == expected, f"_C.cpu_isas() {CPU_ISAS} != {expected} from /proc/cpuinfo"


def test_default_is_the_best_level(clean_env):
    assert _C.cpu_isa() == CPU_ISAS[-1]
    assert _C.Backend("cpu", 1).name.endswith(f", {CPU_ISAS[-1]})")
    clean_env.setenv("LSERVE_CPU_ISA", "")  # empty: as unset
    assert _C.cpu_isa() == CPU_ISAS[-1]


@pytest.mark.parametrize("isa", ALL_ISAS)
def test_forcing_a_level_runs_it_or_raises(clean_env, isa):
    """A level the CPU has runs (and the backend names it); one it lacks raises ValueError naming the
    variable, the value and the missing features, never SIGILL later. Adapts to the CPU."""
    clean_env.setenv("LSERVE_CPU_ISA", isa)
    if isa in CPU_ISAS:
        assert _C.cpu_isa() == isa
        backend = _C.Backend("cpu", 1)
        assert backend.name.endswith(f", {isa})"), backend.name
        x = np.ones((1, 32), np.float32)
        output = np.empty((1, 3), np.float32)
        backend.gemm(x, np.ones((3, 32), np.float32), None, output)  # fp32 GEMM (AVX2 kernels at avx512)
        assert_exact(output, np.full((1, 3), 32, np.float32), f"fp32 gemm at {isa}")
        return
    missing = missing_flags(isa)
    first = missing[0].replace("avx512_vnni", "avx512vnni") if missing else ""
    for make in (_C.cpu_isa, lambda: _C.Backend("cpu", 1)):
        with pytest.raises(ValueError, match=f"LSERVE_CPU_ISA={isa} asks for kernels this CPU cannot run: "
                                             f"it lacks {first}"):
            make()


@pytest.mark.parametrize("value", ["avx3", "AVX2", "avx512_vnni", "native"])
def test_unknown_level_raises(clean_env, value):
    clean_env.setenv("LSERVE_CPU_ISA", value)
    for make in (_C.cpu_isa, lambda: _C.Backend("cpu", 1)):
        with pytest.raises(ValueError, match=f"LSERVE_CPU_ISA='{value}' is not a CPU kernel level: expected one of "
                                             "generic, avx2, avx512, avx512vnni"):
            make()


def test_make_cpu_backend_restores_the_environment(clean_env):
    clean_env.setenv("LSERVE_CPU_ISA", "generic")
    assert make_cpu_backend(CPU_ISAS[-1], 1).name.endswith(f", {CPU_ISAS[-1]})")
    assert os.environ["LSERVE_CPU_ISA"] == "generic"
    assert make_cpu_backend("auto", 1).name.endswith(", generic)")


@pytest.fixture(scope="module")
def backends():
    """One backend per level this CPU runs."""
    return {isa: make_cpu_backend(isa, 2) for isa in CPU_ISAS}


@pytest.mark.parametrize("isa", ALL_ISAS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("num_tokens,in_features,out_features", SHAPES)
def test_gemm_quant_at_each_level(backends, isa, fmt, num_tokens, in_features, out_features):
    """Against the dequantised weight (test_gemm_quant's two bounds), and bit for bit against the
    portable kernel and the AVX2 one (each lane runs the same integer sums and fp32 steps), with the
    weight as stored and packed (Backend::pack_gemm_weight's interleaved groups of 8 rows)."""
    require(isa)
    seed = num_tokens * 10007 + in_features * 101 + out_features
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num_tokens, in_features)).astype(np.float32)
    blocks, weight = quantized_weight(rng, out_features, in_features, fmt)
    bias = rng.standard_normal(out_features).astype(np.float32)
    for pack in (False, True):
        what = f"{isa} {fmt} {num_tokens}x{in_features}x{out_features} pack={pack}"
        output = np.full((num_tokens, out_features), np.nan, np.float32)
        backends[isa].gemm(x, blocks, bias, output, weight_dtype=fmt, pack=pack)
        assert_matches_dequantised(output, x, weight, bias.astype(np.float64), what, seed)
        for other in ("generic", "avx2", isa):
            if other in CPU_ISAS and (other, False) != (isa, pack):
                expected = np.full((num_tokens, out_features), np.nan, np.float32)
                backends[other].gemm(x, blocks, bias, expected, weight_dtype=fmt)
                assert_exact(output, expected, f"{what} vs {other} as stored", seed)


@pytest.mark.parametrize("isa", ALL_ISAS)
def test_gemm_quant_extreme_blocks_at_each_level(backends, isa):
    """Item bytes the quantiser never writes (q8_0 -128, every nibble), an all-zero and a huge
    activation block, 70 tokens (more than one 64-token block and a tile remainder), at every level."""
    require(isa)
    seed = 23
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((70, 96)).astype(np.float32)
    x[0, :32] = 0.0
    x[1, 40] = 1e4
    for fmt, block_bytes in (("q8_0", 34), ("q4_0", 18), ("q4_1", 20)):
        raw = rng.integers(0, 256, (45, 3, block_bytes), dtype=np.uint8)
        num_halves = 2 if fmt == "q4_1" else 1
        halves = (rng.standard_normal((45, 3, num_halves)) * 0.1).astype(np.float16)
        raw[:, :, :2 * num_halves] = halves.view(np.uint8).reshape(45, 3, 2 * num_halves)
        if fmt == "q8_0":
            raw[0, :, 2:] = 0x80  # every item -128
        blocks = raw.reshape(45, 3 * block_bytes)
        expected = np.full((70, 45), np.nan, np.float32)
        backends["generic"].gemm(x, blocks, None, expected, weight_dtype=fmt)
        for pack in (False, True):
            output = np.full((70, 45), np.nan, np.float32)
            backends[isa].gemm(x, blocks, None, output, weight_dtype=fmt, pack=pack)
            assert np.isfinite(output).all(), f"{isa} {fmt} pack={pack}: non-finite output (seed={seed})"
            assert_exact(output, expected, f"{isa} {fmt} pack={pack} extreme blocks vs generic as stored", seed)
