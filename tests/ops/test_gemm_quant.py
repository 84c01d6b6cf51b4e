"""gemm and embed with ggml block-format weights (q8_0, q4_0, q4_1) on the CPU.

References: gguf-py's quants.quantize / quants.dequantize for the block bytes and values, numpy for
the products. The kernel quantises each input row to 8-bit blocks (as ggml does for these formats)
and multiplies exactly in integers, so each GEMM has two bounds: against an emulation of its own
arithmetic (the activations quantised the same way, products in float64: only fp32 scaling and
accumulation error remains, bound 1e-10; measured <= 4e-14), and against the dequantised weight
times the fp32 input (the 8-bit activation error: NMSE 2e-5 to 1.3e-4 measured on these Gaussian rows,
bound 2e-4). Batch invariance: row i of an M-row call equals the 1-row call on row i bit for bit,
whatever the thread count, and every kernel level (portable, AVX2, AVX-512 with and without VNNI,
as the CPU has them) gives the same bits. tests/ops/test_cpu_isa.py forces each level on more shapes.
"""
import gguf
import numpy as np
import pytest
from conftest import CPU_ISAS, make_cpu_backend
from gguf import quants
from lserve_testing import assert_exact, assert_nmse

FORMATS = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0,
           "q4_1": gguf.GGMLQuantizationType.Q4_1}
SHAPES = [  # (num_tokens, in_features, out_features): M 1/3/17, primes for N, K a few blocks
    (1, 32, 1),
    (1, 576, 113),
    (3, 96, 7),
    (3, 1536, 37),
    (17, 64, 113),
    (17, 576, 19),
    (70, 160, 11),  # crosses the 64-token block
]


def quantized_weight(rng, out_features, in_features, fmt):
    weight = rng.standard_normal((out_features, in_features)).astype(np.float32)
    blocks = quants.quantize(weight, FORMATS[fmt])
    return blocks, quants.dequantize(blocks, FORMATS[fmt]).astype(np.float32)


def quantize_activations(x):
    """The kernel's activation blocks: d = max|x| / 127, q = round-half-even(x / d), in float32."""
    blocks = x.reshape(x.shape[0], -1, 32).astype(np.float32)
    d = (np.abs(blocks).max(axis=2, keepdims=True) / np.float32(127)).astype(np.float32)
    inverse = np.where(d != 0, np.float32(1) / np.where(d != 0, d, 1), 0).astype(np.float32)
    q = np.rint(blocks * inverse)
    return (q * d).reshape(x.shape)


def assert_matches_dequantised(output, x, weight, extra, what, seed):
    """Both bounds of the module docstring."""
    emulated = quantize_activations(x).astype(np.float64) @ weight.astype(np.float64).T + extra
    assert_nmse(output, emulated, 1e-10, what + " vs quantised activations", seed)
    dequantised = x.astype(np.float64) @ weight.astype(np.float64).T + extra
    assert_nmse(output, dequantised, 2e-4, what + " vs fp32 input", seed)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("num_tokens,in_features,out_features", SHAPES)
def test_gemm_quant_matches_reference(any_isa_backend, fmt, num_tokens, in_features, out_features):
    seed = num_tokens * 10007 + in_features * 101 + out_features
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num_tokens, in_features)).astype(np.float32)
    blocks, weight = quantized_weight(rng, out_features, in_features, fmt)
    bias = rng.standard_normal(out_features).astype(np.float32)
    for with_bias in (False, True):
        output = np.full((num_tokens, out_features), np.nan, np.float32)
        any_isa_backend.gemm(x, blocks, bias if with_bias else None, output, weight_dtype=fmt)
        extra = bias.astype(np.float64) if with_bias else 0.0
        what = f"gemm {fmt} {num_tokens}x{in_features}x{out_features} bias={with_bias}"
        assert_matches_dequantised(output, x, weight, extra, what, seed)


@pytest.mark.parametrize("fmt", FORMATS)
def test_gemm_quant_is_batch_and_thread_invariant(fmt):
    """Row i of a 17-row call equals the 1-row call on row i bit for bit, for 1, 2 and 3 threads,
    and every kernel level the CPU runs gives the portable kernel's bits."""
    seed = 41
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((17, 576)).astype(np.float32)
    blocks, _ = quantized_weight(rng, 131, 576, fmt)
    by_isa = {}
    for isa in CPU_ISAS:
        reference = None
        for num_threads in (1, 2, 3):
            backend = make_cpu_backend(isa, num_threads)
            batch = np.empty((17, 131), np.float32)
            backend.gemm(x, blocks, None, batch, weight_dtype=fmt)
            for row in range(17):
                single = np.empty((1, 131), np.float32)
                backend.gemm(x[row:row + 1], blocks, None, single, weight_dtype=fmt)
                assert_exact(batch[row:row + 1], single, f"{fmt} {isa} {num_threads} threads: row {row} of 17 vs alone",
                             seed)
            if reference is None:
                reference = batch
            assert_exact(batch, reference, f"{fmt} {isa}: {num_threads} threads vs 1", seed)
        by_isa[isa] = reference
        packed = np.empty((17, 131), np.float32)
        make_cpu_backend(isa, 3).gemm(x, blocks, None, packed, weight_dtype=fmt, pack=True)
        assert_exact(packed, reference, f"{fmt} {isa}: packed weight vs as stored", seed)
    for isa in CPU_ISAS:
        assert_exact(by_isa[isa], by_isa["generic"], f"{fmt}: {isa} kernel vs portable", seed)


PACK_SHAPES = [  # (num_tokens, in_features, out_features): out_features around groups of 8 (and of 16, AVX-512)
    (1, 32, 1), (1, 64, 7), (1, 96, 8), (1, 32, 9), (1, 160, 24), (1, 576, 113),
    (3, 64, 15), (3, 96, 16), (3, 32, 17), (3, 1536, 41),
    (17, 96, 23), (17, 64, 31), (17, 576, 33),
    (70, 160, 11),  # crosses the 64-token block
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("num_tokens,in_features,out_features", PACK_SHAPES)
def test_gemm_quant_packed_weight_gives_the_same_bits(any_isa_backend, fmt, num_tokens, in_features, out_features):
    """A weight packed by the backend (Backend::pack_gemm_weight: interleaved groups of 8 rows, the last
    one padded) gives the bits of the weight as stored, at every kernel level and against the portable
    kernel on the stored weight, for any block bytes; the padding rows never reach the output."""
    seed = num_tokens * 7919 + in_features * 31 + out_features
    rng = np.random.default_rng(seed)
    blocks = random_block_bytes(rng, fmt, out_features, in_features // 32)
    x = rng.standard_normal((num_tokens, in_features)).astype(np.float32)
    bias = rng.standard_normal(out_features).astype(np.float32)
    expected = np.full((num_tokens, out_features), np.nan, np.float32)
    make_cpu_backend("generic", 1).gemm(x, blocks, bias, expected, weight_dtype=fmt)
    what = f"{fmt} {num_tokens}x{in_features}x{out_features}"
    for pack in (False, True):
        output = np.full((num_tokens, out_features), np.nan, np.float32)
        any_isa_backend.gemm(x, blocks, bias, output, weight_dtype=fmt, pack=pack)
        assert_exact(output, expected, f"{what} pack={pack} vs portable as stored", seed)
    assert np.isfinite(expected).all(), f"{what}: non-finite reference (seed={seed})"


def test_pack_leaves_float_weights_as_stored(backend):
    """Float weights have no packed layout on the CPU: pack=True runs the weight as given."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    weight = rng.standard_normal((9, 64)).astype(np.float32)
    outputs = []
    for pack in (False, True):
        outputs.append(np.full((3, 9), np.nan, np.float32))
        backend.gemm(x, weight, None, outputs[-1], pack=pack)
    assert_exact(outputs[1], outputs[0], "float32 gemm pack=True vs as given", 3)


def test_gemm_quant_zero_and_huge_rows(any_isa_backend):
    """An all-zero activation block, a block with one huge value and an all-zero row."""
    seed = 5
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, 128)).astype(np.float32)
    x[0, :32] = 0.0
    x[1, 40] = 1e4
    x[2] = 0.0
    for fmt in FORMATS:
        blocks, weight = quantized_weight(rng, 9, 128, fmt)
        output = np.full((3, 9), np.nan, np.float32)
        any_isa_backend.gemm(x, blocks, None, output, weight_dtype=fmt)
        assert_matches_dequantised(output, x, weight, 0.0, f"{fmt} zero/huge rows", seed)
        assert_exact(output[2], np.zeros(9, np.float32), f"{fmt} zero row", seed)


def test_gemm_quant_bad_shapes_raise(backend):
    blocks = np.zeros((4, 40), np.uint8)  # 4 rows of two q4_1 blocks: in_features 64
    with pytest.raises(ValueError, match="in_features a multiple of its block size 32, got input \\(2, 60\\)"):
        backend.gemm(np.zeros((2, 60), np.float32), blocks, None, np.zeros((2, 4), np.float32), weight_dtype="q4_1")
    with pytest.raises(ValueError, match="'weight' dim 1 must be 96"):
        backend.gemm(np.zeros((2, 96), np.float32), blocks, None, np.zeros((2, 4), np.float32), weight_dtype="q4_1")
    with pytest.raises(ValueError, match="not whole q4_1 blocks"):
        backend.gemm(np.zeros((2, 64), np.float32), np.zeros((4, 30), np.uint8), None, np.zeros((2, 4), np.float32),
                     weight_dtype="q4_1")
    with pytest.raises(ValueError, match="weight_dtype must be q8_0, q4_0 or q4_1"):
        backend.gemm(np.zeros((2, 64), np.float32), blocks, None, np.zeros((2, 4), np.float32), weight_dtype="float32")
    with pytest.raises(ValueError, match="uint8"):
        backend.gemm(np.zeros((2, 64), np.float32), np.zeros((4, 10), np.float32), None, np.zeros((2, 4), np.float32),
                     weight_dtype="q4_1")


def random_block_bytes(rng, fmt, num_rows, num_blocks):
    """Blocks with arbitrary item bytes and finite f16 scales (minimum too): every bit pattern of
    the items, not only what quantize() produces (q8_0 includes -128)."""
    block_bytes = {"q8_0": 34, "q4_0": 18, "q4_1": 20}[fmt]
    raw = rng.integers(0, 256, (num_rows, num_blocks, block_bytes), dtype=np.uint8)
    num_halves = 2 if fmt == "q4_1" else 1
    halves = (rng.standard_normal((num_rows, num_blocks, num_halves)) * 0.1).astype(np.float16)
    raw[:, :, :2 * num_halves] = halves.view(np.uint8).reshape(num_rows, num_blocks, 2 * num_halves)
    return raw.reshape(num_rows, num_blocks * block_bytes)


@pytest.mark.parametrize("fmt", FORMATS)
def test_embed_dequantises_like_gguf(any_isa_backend, fmt):
    """Block round trip: embed's rows are gguf-py's dequantize, bit for bit, for any block bytes."""
    seed = 7
    rng = np.random.default_rng(seed)
    table = random_block_bytes(rng, fmt, 50, 6)  # (vocab 50, hidden 192)
    expected = quants.dequantize(table, FORMATS[fmt]).astype(np.float32)
    token_ids = np.array([0, 49, 3, 3, 17], np.int32)
    output = np.full((5, 192), np.nan, np.float32)
    any_isa_backend.embed(token_ids, table, output, weight_dtype=fmt)
    assert_exact(output, expected[token_ids], f"embed {fmt}", seed)


@pytest.mark.parametrize("fmt", FORMATS)
def test_gemm_quant_any_block_bytes(any_isa_backend, fmt):
    """Arbitrary block bytes (q8_0 items of -128, large nibbles) against gguf-py's values."""
    seed = 11
    rng = np.random.default_rng(seed)
    blocks = random_block_bytes(rng, fmt, 29, 5)
    weight = quants.dequantize(blocks, FORMATS[fmt]).astype(np.float32)
    x = rng.standard_normal((5, 160)).astype(np.float32)
    output = np.full((5, 29), np.nan, np.float32)
    any_isa_backend.gemm(x, blocks, None, output, weight_dtype=fmt)
    assert_matches_dequantised(output, x, weight, 0.0, f"{fmt} any bytes", seed)
