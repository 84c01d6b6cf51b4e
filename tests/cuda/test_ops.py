"""Every CUDA op against the CPU reference on the same Args: random inputs, outputs poisoned with NaN
first, awkward shapes (1, primes, non-multiples of tiles), strided rows, page boundaries.

The CPU runs in float32 on the GPU inputs' exact values (bfloat16/float16 inputs upcast), so a
low-precision GPU output is checked against the float32 result with the bf16/fp16 rule, and a
float32 one with the fp32 rule (elementwise) or a normalised MSE bound (reductions, GEMM)."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest

from attention_lib import check_attention
from cuda_testing import DEVICE, STANDIN, as_f32, ints, on_gpu, on_host, poisoned, randn, require, torch
from lserve_testing import assert_close_fp32, assert_close_lowp, assert_exact, assert_nmse

pytestmark = pytest.mark.cuda

FLOATS = ["float32", "bfloat16", "float16"]


def check_output(actual, expected, dtype: str, what: str, seed, elementwise: bool = True, nmse: float = 1e-10):
    """float32 outputs: the fp32 rule (or an NMSE bound for reductions); low precision: atol + |ref| eps."""
    assert np.isfinite(actual).all(), f"{what}: NaN/inf left in the output (unwritten?) (seed={seed})"
    if dtype == "float32":
        if elementwise:
            assert_close_fp32(actual, expected, what=what, seed=seed)
        else:
            assert_nmse(actual, expected, bound=nmse, what=what, seed=seed)
    else:
        assert_close_lowp(actual, expected, dtype, what=what, seed=seed, atol=1e-5)


def rounded(array: np.ndarray, dtype: str) -> np.ndarray:
    """The float32 values of `array` after rounding to `dtype` (what the GPU holds)."""
    return on_host(array, dtype).float().numpy()


# ---- embed ------------------------------------------------------------------------------------


@pytest.mark.parametrize("weight_dtype", FLOATS)
@pytest.mark.parametrize("num_tokens,vocab,hidden", [(1, 5, 19), (7, 113, 64), (300, 211, 1023)])
def test_embed(cuda_backend, cpu_backend, weight_dtype, num_tokens, vocab, hidden):
    require(cuda_backend, "embed", weight_dtype=weight_dtype)
    seed = num_tokens * 31 + hidden
    weight = rounded(randn((vocab, hidden), seed), weight_dtype)
    ids = np.random.default_rng(seed).integers(0, vocab, size=num_tokens).astype(np.int32)
    out = poisoned((num_tokens, hidden + 3))[:, :hidden]  # strided rows
    cuda_backend.embed(ints(ids), on_gpu(weight, weight_dtype), out)
    expected = np.zeros((num_tokens, hidden), np.float32)
    cpu_backend.embed(ids, on_host(weight, weight_dtype), expected)
    assert_exact(as_f32(out), expected, what=f"embed {weight_dtype}", seed=seed)


# ---- rms_norm ---------------------------------------------------------------------------------


@pytest.mark.parametrize("in_dtype,out_dtype", [("float32", "float32"), ("float32", "bfloat16"),
                                                ("bfloat16", "bfloat16"), ("float16", "float16"),
                                                ("bfloat16", "float32")])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("num_tokens,hidden", [(1, 19), (13, 576), (130, 1023), (3, 4096)])
def test_rms_norm(cuda_backend, cpu_backend, in_dtype, out_dtype, with_residual, num_tokens, hidden):
    require(cuda_backend, "rms_norm", dtype=in_dtype)
    seed = num_tokens + hidden + with_residual
    x = rounded(randn((num_tokens, hidden), seed), in_dtype)
    weight = rounded(1.0 + randn((hidden,), seed + 1, 0.1), "bfloat16")
    residual = randn((num_tokens, hidden), seed + 2)
    gpu_residual = on_gpu(residual) if with_residual else None
    out = poisoned((num_tokens, hidden), out_dtype)
    cuda_backend.rms_norm(on_gpu(x, in_dtype), gpu_residual, on_gpu(weight, "bfloat16"), out, 1e-5)

    cpu_residual = residual.copy() if with_residual else None
    expected = np.zeros((num_tokens, hidden), np.float32)
    cpu_backend.rms_norm(x, cpu_residual, on_host(weight, "bfloat16"), expected, 1e-5)
    what = f"rms_norm {in_dtype}->{out_dtype} residual={with_residual} ({num_tokens}, {hidden})"
    check_output(as_f32(out), expected, out_dtype, what, seed)
    if with_residual:
        assert_close_fp32(as_f32(gpu_residual), cpu_residual, what=what + " residual", seed=seed)


def test_rms_norm_in_place(cuda_backend, cpu_backend):
    seed = 5
    x = rounded(randn((9, 257), seed), "bfloat16")
    weight = 1.0 + randn((257,), seed + 1, 0.1)
    buffer = on_gpu(x, "bfloat16")
    cuda_backend.rms_norm(buffer, None, on_gpu(weight), buffer, 1e-6)
    expected = np.zeros_like(x)
    cpu_backend.rms_norm(x, None, weight, expected, 1e-6)
    check_output(as_f32(buffer), expected, "bfloat16", "rms_norm in place", seed)


# ---- gemm -------------------------------------------------------------------------------------


@pytest.mark.parametrize("in_dtype,weight_dtype", [("float32", "float32"), ("bfloat16", "bfloat16"),
                                                   ("float16", "float16"), ("float32", "bfloat16"),
                                                   ("bfloat16", "float32")])
@pytest.mark.parametrize("out_dtype", ["float32", "same"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("num_tokens,in_features,out_features", [(1, 64, 96), (7, 19, 113), (300, 576, 1536),
                                                                 (33, 1023, 65)])
def test_gemm(cuda_backend, cpu_backend, in_dtype, weight_dtype, out_dtype, with_bias, num_tokens, in_features,
              out_features):
    require(cuda_backend, "gemm", dtype=in_dtype, weight_dtype=weight_dtype)
    out_dtype = in_dtype if out_dtype == "same" else out_dtype
    seed = num_tokens * 7 + in_features + out_features
    x = rounded(randn((num_tokens, in_features), seed), in_dtype)
    weight = rounded(randn((out_features, in_features), seed + 1, 1.0 / math.sqrt(in_features)), weight_dtype)
    bias = randn((out_features,), seed + 2) if with_bias else None
    x_gpu = torch.full((num_tokens, in_features + 8), float("nan"), device=DEVICE,
                       dtype=on_gpu(x, in_dtype).dtype)
    x_gpu[:, :in_features] = on_gpu(x, in_dtype)
    out = poisoned((num_tokens, out_features), out_dtype)
    cuda_backend.gemm(x_gpu[:, :in_features], on_gpu(weight, weight_dtype),
                      on_gpu(bias) if with_bias else None, out)
    expected = np.zeros((num_tokens, out_features), np.float32)
    cpu_backend.gemm(x, on_host(weight, weight_dtype), bias, expected)
    what = f"gemm {in_dtype}x{weight_dtype}->{out_dtype} bias={with_bias} ({num_tokens}, {in_features}, {out_features})"
    # The GPU multiplies in the weight's dtype: a float32 input meets bf16 weights rounded to bf16.
    input_rounded = in_dtype != weight_dtype and weight_dtype != "float32"
    if out_dtype == "float32":
        check_output(as_f32(out), expected, "float32", what, seed, elementwise=False,
                     nmse=2e-5 if input_rounded else 1e-10)
    elif input_rounded:
        assert_nmse(as_f32(out), expected, bound=4e-5, what=what, seed=seed)
    else:
        check_output(as_f32(out), expected, out_dtype, what, seed)


# ---- silu_mul ---------------------------------------------------------------------------------


@pytest.mark.parametrize("in_dtype,out_dtype", [("float32", "float32"), ("bfloat16", "bfloat16"),
                                                ("float16", "float16"), ("float32", "bfloat16")])
@pytest.mark.parametrize("num_tokens,width", [(1, 19), (7, 1536), (130, 97)])
def test_silu_mul(cuda_backend, cpu_backend, in_dtype, out_dtype, num_tokens, width):
    require(cuda_backend, "silu_mul", dtype=in_dtype)
    seed = num_tokens + width
    x = rounded(randn((num_tokens, 2 * width), seed, 3.0), in_dtype)
    out = poisoned((num_tokens, width + 5), out_dtype)[:, :width]
    cuda_backend.silu_mul(on_gpu(x, in_dtype), out)
    expected = np.zeros((num_tokens, width), np.float32)
    cpu_backend.silu_mul(x, expected)
    check_output(as_f32(out), expected, out_dtype, f"silu_mul {in_dtype}->{out_dtype}", seed)


# ---- gather_rows ------------------------------------------------------------------------------


@pytest.mark.parametrize("in_dtype,out_dtype", [("float32", "float32"), ("bfloat16", "bfloat16"),
                                                ("float32", "bfloat16"), ("float16", "float32")])
@pytest.mark.parametrize("num_rows,num_out,width", [(1, 1, 19), (113, 7, 576), (40, 40, 1023)])
def test_gather_rows(cuda_backend, cpu_backend, in_dtype, out_dtype, num_rows, num_out, width):
    require(cuda_backend, "gather_rows", dtype=in_dtype)
    seed = num_rows + num_out + width
    x = rounded(randn((num_rows, width), seed), in_dtype)
    indices = np.random.default_rng(seed).integers(0, num_rows, size=num_out).astype(np.int32)
    out = poisoned((num_out, width), out_dtype)
    cuda_backend.gather_rows(on_gpu(x, in_dtype), ints(indices), out)
    expected = np.zeros((num_out, width), np.float32)
    cpu_backend.gather_rows(x, indices, expected)
    assert_exact(as_f32(out), rounded(expected, out_dtype), what=f"gather_rows {in_dtype}->{out_dtype}", seed=seed)


# ---- rope_kv_append ---------------------------------------------------------------------------


def _cos_sin_table(max_positions: int, rotary_dim: int, seed: int) -> np.ndarray:
    angles = np.random.default_rng(seed).uniform(-np.pi, np.pi, size=(max_positions, rotary_dim // 2))
    scale = np.float32(1.1)  # like yarn's attention scaling: cos^2 + sin^2 need not be 1
    return (np.concatenate([np.cos(angles), np.sin(angles)], axis=1) * scale).astype(np.float32)


@pytest.mark.parametrize("act_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("cache_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("num_qo_heads,num_kv_heads,head_dim,rotary_dim", [(8, 2, 64, 64), (4, 4, 128, 64),
                                                                          (6, 1, 80, 80), (16, 2, 256, 256)])
@pytest.mark.parametrize("num_tokens,page_size", [(1, 16), (13, 7)])
def test_rope_kv_append(cuda_backend, cpu_backend, act_dtype, cache_dtype, num_qo_heads, num_kv_heads, head_dim,
                        rotary_dim, num_tokens, page_size):
    require(cuda_backend, "rope_kv_append", dtype=act_dtype, kv_cache_dtype=cache_dtype, head_dim=head_dim)
    seed = num_tokens + head_dim + num_qo_heads
    rng = np.random.default_rng(seed)
    q_width, kv_width = num_qo_heads * head_dim, num_kv_heads * head_dim
    qkv = rounded(randn((num_tokens, q_width + 2 * kv_width), seed), act_dtype)
    table = _cos_sin_table(40, rotary_dim, seed + 1)
    positions = rng.integers(0, 40, size=num_tokens).astype(np.int32)
    num_pages = 5
    slots = rng.permutation(num_pages * page_size)[:num_tokens].astype(np.int64)
    slots[::4] = -1  # skipped tokens still rotate
    cache_shape = (num_pages, page_size, num_kv_heads, head_dim)

    def split(buffer):  # views into the fused buffer, as the model passes them
        q = buffer[:, :q_width].reshape(num_tokens, num_qo_heads, head_dim)
        k = buffer[:, q_width:q_width + kv_width].reshape(num_tokens, num_kv_heads, head_dim)
        v = buffer[:, q_width + kv_width:].reshape(num_tokens, num_kv_heads, head_dim)
        return q, k, v

    qkv_gpu = on_gpu(qkv, act_dtype)
    k_cache, v_cache = poisoned(cache_shape, cache_dtype), poisoned(cache_shape, cache_dtype)
    q, k, v = split(qkv_gpu)
    cuda_backend.rope_kv_append(q, k, v, ints(positions), on_gpu(table), k_cache, v_cache,
                                ints(slots))

    qkv_cpu = qkv.copy()
    k_cache_cpu = np.full(cache_shape, np.nan, np.float32)
    v_cache_cpu = np.full(cache_shape, np.nan, np.float32)
    q_cpu, k_cpu, v_cpu = split(qkv_cpu)
    cpu_backend.rope_kv_append(q_cpu, k_cpu, v_cpu, positions, table, k_cache_cpu, v_cache_cpu, slots)

    what = f"rope_kv_append {act_dtype}/{cache_dtype} heads {num_qo_heads}/{num_kv_heads} d{head_dim} r{rotary_dim}"
    check_output(as_f32(qkv_gpu), qkv_cpu, act_dtype, what + " q|k|v", seed)
    written = np.zeros(num_pages * page_size, bool)
    written[slots[slots >= 0]] = True
    for name, gpu, cpu in (("k_cache", k_cache, k_cache_cpu), ("v_cache", v_cache, v_cache_cpu)):
        gpu_flat = as_f32(gpu).reshape(num_pages * page_size, -1)
        cpu_flat = cpu.reshape(num_pages * page_size, -1)
        check_output(gpu_flat[written], cpu_flat[written], cache_dtype, f"{what} {name}", seed)
        assert np.isnan(gpu_flat[~written]).all(), f"{what}: {name} slots outside slot_mapping were written"


# ---- attention --------------------------------------------------------------------------------


def _paged_batch(chunks, page_size: int, seed: int):
    """chunks: (q_len, kv_len) per sequence. Returns indptrs, shuffled page lists, kv_lens, num_pages."""
    rng = np.random.default_rng(seed)
    pages_per_seq = [-(-kv_len // page_size) for _, kv_len in chunks]
    num_pages = sum(pages_per_seq) + 3
    pool = rng.permutation(num_pages)
    qo_indptr, page_indptr, indices, cursor = [0], [0], [], 0
    for (q_len, _), count in zip(chunks, pages_per_seq):
        indices.extend(pool[cursor:cursor + count])
        cursor += count
        qo_indptr.append(qo_indptr[-1] + q_len)
        page_indptr.append(len(indices))
    as_i32 = lambda values: np.asarray(values, dtype=np.int32)  # noqa: E731
    return (as_i32(qo_indptr), as_i32(page_indptr), as_i32(indices), as_i32([kv for _, kv in chunks]), num_pages)


BATCHES = {
    "decode": [(1, 1), (1, 17), (1, 113), (1, 32)],
    "prefill": [(5, 5), (19, 19), (33, 33)],
    "mixed": [(1, 40), (16, 16), (7, 23), (1, 1), (19, 64), (0, 8)],
}


@pytest.mark.parametrize("batch", sorted(BATCHES))
@pytest.mark.parametrize("num_qo_heads,num_kv_heads,head_dim", [(8, 2, 64), (4, 4, 128), (6, 1, 80), (8, 1, 256),
                                                                (3, 3, 32)])
@pytest.mark.parametrize("page_size", [16, 7])
@pytest.mark.parametrize("query_dtype,cache_dtype,out_dtype", [("float32", "float32", "float32"),
                                                               ("bfloat16", "bfloat16", "bfloat16"),
                                                               ("float32", "bfloat16", "float32")])
def test_attention(cuda_backend, cpu_backend, batch, num_qo_heads, num_kv_heads, head_dim, page_size, query_dtype,
                   cache_dtype, out_dtype):
    require(cuda_backend, "attention", dtype=query_dtype, kv_cache_dtype=cache_dtype, head_dim=head_dim)
    chunks = BATCHES[batch]
    seed = head_dim + num_qo_heads + page_size + len(chunks)
    qo_indptr, page_indptr, page_indices, kv_lens, num_pages = _paged_batch(chunks, page_size, seed)
    num_tokens = int(qo_indptr[-1])
    query = rounded(randn((num_tokens, num_qo_heads, head_dim), seed + 1), query_dtype)
    cache_shape = (num_pages, page_size, num_kv_heads, head_dim)
    k_cache = rounded(randn(cache_shape, seed + 2), cache_dtype)
    v_cache = rounded(randn(cache_shape, seed + 3), cache_dtype)
    sm_scale = 1.0 / math.sqrt(head_dim)

    out = poisoned((num_tokens, num_qo_heads, head_dim), out_dtype)
    cuda_backend.attention(on_gpu(query, query_dtype), on_gpu(k_cache, cache_dtype), on_gpu(v_cache, cache_dtype),
                           ints(qo_indptr), ints(page_indptr), ints(page_indices), ints(kv_lens), out, sm_scale)
    expected = np.zeros((num_tokens, num_qo_heads, head_dim), np.float32)
    cpu_backend.attention(query, on_host(k_cache, cache_dtype), on_host(v_cache, cache_dtype), qo_indptr, page_indptr,
                          page_indices, kv_lens, expected, sm_scale)
    what = (f"attention {batch} heads {num_qo_heads}/{num_kv_heads} d{head_dim} page {page_size} "
            f"{query_dtype}/{cache_dtype}->{out_dtype}")
    check_output(as_f32(out), expected, out_dtype, what, seed, elementwise=False, nmse=1e-10)


@pytest.mark.parametrize("head_dim", [32, 256, 320])
def test_attention_supports_is_truthful(cuda_backend, cpu_backend, head_dim):
    """supports() answers for the op as it runs: a head_dim it refuses (CUDA: above 256) raises with
    the answer's reason; one it accepts matches the CPU."""
    seed = 7 + head_dim
    qo_indptr, page_indptr, page_indices, kv_lens, num_pages = _paged_batch(BATCHES["mixed"], 16, seed)
    num_tokens = int(qo_indptr[-1])
    query = randn((num_tokens, 4, head_dim), seed + 1)
    cache_shape = (num_pages, 16, 2, head_dim)
    k_cache, v_cache = randn(cache_shape, seed + 2), randn(cache_shape, seed + 3)
    sm_scale = 1.0 / math.sqrt(head_dim)
    out = poisoned((num_tokens, 4, head_dim))
    args = (on_gpu(query), on_gpu(k_cache), on_gpu(v_cache), ints(qo_indptr), ints(page_indptr), ints(page_indices),
            ints(kv_lens), out, sm_scale)
    answer = cuda_backend.supports("attention", head_dim=head_dim)
    if not answer:
        assert str(head_dim) in answer.reason
        with pytest.raises(ValueError, match=re.escape(answer.reason)):
            cuda_backend.attention(*args)
        return
    cuda_backend.attention(*args)
    expected = np.zeros((num_tokens, 4, head_dim), np.float32)
    cpu_backend.attention(query, k_cache, v_cache, qo_indptr, page_indptr, page_indices, kv_lens, expected, sm_scale)
    check_output(as_f32(out), expected, "float32", f"attention d{head_dim} (supported)", seed, elementwise=False,
                 nmse=1e-10)


def _torch_lowp_attention(query, k_cache, v_cache, qo_indptr, page_indptr, page_indices, kv_lens, sm_scale, dtype):
    """The plain torch implementation in `dtype` (scores and P rounded to it), per sequence: the
    error yardstick of the tensor-core kernels (FA3's rule)."""
    tdtype = getattr(torch, dtype)
    q_all = torch.from_numpy(query).to(DEVICE, tdtype)
    kc, vc = torch.from_numpy(k_cache).to(DEVICE, tdtype), torch.from_numpy(v_cache).to(DEVICE, tdtype)
    out = torch.zeros(q_all.shape, dtype=torch.float32, device=DEVICE)
    num_qo, num_kv = q_all.shape[1], kc.shape[2]
    group = num_qo // num_kv
    for s in range(len(kv_lens)):
        q_start, q_end, kv_len = int(qo_indptr[s]), int(qo_indptr[s + 1]), int(kv_lens[s])
        if q_end == q_start:
            continue
        pages = torch.from_numpy(page_indices[page_indptr[s]:page_indptr[s + 1]].astype(np.int64)).to(DEVICE)
        k = kc[pages].reshape(-1, num_kv, kc.shape[3])[:kv_len]
        v = vc[pages].reshape(-1, num_kv, vc.shape[3])[:kv_len]
        q = q_all[q_start:q_end]
        q_pos = torch.arange(kv_len - (q_end - q_start), kv_len, device=DEVICE)[:, None]
        mask = torch.arange(kv_len, device=DEVICE)[None, :] <= q_pos
        for h in range(num_qo):
            scores = ((q[:, h] @ k[:, h // group].T).float() * sm_scale).masked_fill(~mask, float("-inf"))
            probs = torch.softmax(scores, dim=-1).to(tdtype)
            out[q_start:q_end, h] = (probs @ v[:, h // group]).float()
    return out.cpu().numpy()


# Shapes the tensor-core kernels take (bf16, head_dim 64/128); page 16 runs the Hopper prefill on an
# H100, page 24 the mma.sync one; "decode" batches take the split-KV decode kernel.
TC_BATCHES = {
    "decode": [(1, 1), (1, 17), (1, 1500), (1, 64)],
    "prefill": [(5, 5), (130, 130), (300, 1000), (1, 77)],
    "mixed": [(1, 40), (16, 16), (7, 23), (1, 1), (200, 457)],
}


@pytest.mark.parametrize("batch", sorted(TC_BATCHES))
@pytest.mark.parametrize("num_qo_heads,num_kv_heads,head_dim", [(9, 3, 64), (8, 2, 128), (4, 4, 128)])
@pytest.mark.parametrize("page_size", [16, 24])
def test_attention_tensor_cores(cuda_backend, cpu_backend, batch, num_qo_heads, num_kv_heads, head_dim, page_size):
    """The engine's path (host length hints given): the tensor-core kernels against an fp32 reference,
    max error <= 2x a plain torch bf16 implementation's plus output rounding noise."""
    require(cuda_backend, "attention", dtype="bfloat16", kv_cache_dtype="bfloat16", head_dim=head_dim)
    chunks = TC_BATCHES[batch]
    seed = 7 * head_dim + num_qo_heads + page_size + len(chunks)
    qo_indptr, page_indptr, page_indices, kv_lens, num_pages = _paged_batch(chunks, page_size, seed)
    num_tokens = int(qo_indptr[-1])
    query = rounded(randn((num_tokens, num_qo_heads, head_dim), seed + 1), "bfloat16")
    cache_shape = (num_pages, page_size, num_kv_heads, head_dim)
    k_cache = rounded(randn(cache_shape, seed + 2), "bfloat16")
    v_cache = rounded(randn(cache_shape, seed + 3), "bfloat16")
    sm_scale = 1.0 / math.sqrt(head_dim)
    out = poisoned((num_tokens, num_qo_heads, head_dim), "bfloat16")
    cuda_backend.attention(on_gpu(query, "bfloat16"), on_gpu(k_cache, "bfloat16"), on_gpu(v_cache, "bfloat16"),
                           ints(qo_indptr), ints(page_indptr), ints(page_indices), ints(kv_lens), out, sm_scale,
                           max_q_len=max(q for q, _ in chunks), max_kv_len=max(kv for _, kv in chunks))
    expected = np.zeros((num_tokens, num_qo_heads, head_dim), np.float32)
    cpu_backend.attention(query, k_cache, v_cache, qo_indptr, page_indptr, page_indices, kv_lens, expected, sm_scale)
    lowp = _torch_lowp_attention(query, k_cache, v_cache, qo_indptr, page_indptr, page_indices, kv_lens, sm_scale,
                                 "bfloat16")
    check_attention(out, torch.from_numpy(expected).to(DEVICE), torch.from_numpy(lowp).to(DEVICE), torch.bfloat16,
                    f"tensor-core attention {batch} heads {num_qo_heads}/{num_kv_heads} d{head_dim} page {page_size} "
                    f"(seed={seed})")


# ---- copies -----------------------------------------------------------------------------------


@pytest.mark.parametrize("src_dtype,dst_dtype", [("float32", "bfloat16"), ("bfloat16", "float32"),
                                                 ("float16", "bfloat16"), ("float32", "float32")])
def test_copy_host_device(cuda_backend, src_dtype, dst_dtype):
    seed = 11
    values = rounded(randn((37, 19), seed), src_dtype)
    device = poisoned((37, 19), dst_dtype)
    cuda_backend.copy(device, on_host(values, src_dtype))  # host -> device, converting
    assert_exact(as_f32(device), rounded(values, dst_dtype), what=f"copy h2d {src_dtype}->{dst_dtype}", seed=seed)
    host = torch.full((37, 19), float("nan"), dtype=on_host(values, src_dtype).dtype)
    cuda_backend.copy(host, device)  # device -> host, converting back
    assert_exact(host.float().numpy(), rounded(rounded(values, dst_dtype), src_dtype),
                 what=f"copy d2h {dst_dtype}->{src_dtype}", seed=seed)
    other = poisoned((37, 19), src_dtype)
    cuda_backend.copy(other, device)  # device -> device
    assert_exact(as_f32(other), host.float().numpy(), what="copy d2d", seed=seed)


def test_memory_info(cuda_backend):
    if STANDIN:
        pytest.skip("the CPU has no device memory")
    free, total = cuda_backend.memory_info()
    assert 0 < free <= total
