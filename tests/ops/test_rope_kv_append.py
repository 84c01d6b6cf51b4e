"""rope_kv_append against the rotate_half formula in float64 with a cos/sin table built in the
test. q/k/v are column slices of one qkv matrix (as the engine calls it); the paged cache is
checked slot by slot, skipped slots (slot < 0) must stay untouched, and invalid positions or
slots must raise before anything is modified."""
import numpy as np
import pytest
import torch
from lserve_testing import assert_close_fp32, assert_close_lowp, assert_exact

POISON = -12288.0  # exact in bfloat16


def cos_sin_table(max_positions: int, rotary_dim: int, theta: float = 10000.0) -> np.ndarray:
    inv_freq = theta ** (-np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)
    angles = np.arange(max_positions, dtype=np.float64)[:, None] * inv_freq[None, :]
    return np.concatenate([np.cos(angles), np.sin(angles)], axis=1)


def reference_rope(x: np.ndarray, positions: np.ndarray, table: np.ndarray) -> np.ndarray:
    """x (num_tokens, num_heads, head_dim); rotate_half over the first rotary_dim channels."""
    rotary_dim = table.shape[1]
    half = rotary_dim // 2
    cos = table[positions, :half][:, None, :]
    sin = table[positions, half:][:, None, :]
    out = x.astype(np.float64).copy()
    x1, x2 = out[..., :half].copy(), out[..., half:rotary_dim].copy()
    out[..., :half] = x1 * cos - x2 * sin
    out[..., half:rotary_dim] = x2 * cos + x1 * sin
    return out


def make_case(seed, num_tokens, num_qo_heads, num_kv_heads, head_dim, rotary_dim, num_pages, page_size):
    generator = torch.Generator().manual_seed(seed)
    qkv = torch.randn(num_tokens, (num_qo_heads + 2 * num_kv_heads) * head_dim, generator=generator)
    positions = torch.randint(0, 500, (num_tokens,), generator=generator, dtype=torch.int32)
    slots = torch.randperm(num_pages * page_size, generator=generator)[:num_tokens].to(torch.int64)
    table = cos_sin_table(512, rotary_dim)
    return qkv, positions, slots, table


def split_qkv(qkv, num_qo_heads, num_kv_heads, head_dim):
    """Views (strided rows) of one (num_tokens, (Hq + 2 Hkv) * head_dim) matrix."""
    num_tokens = qkv.shape[0]
    q_width, kv_width = num_qo_heads * head_dim, num_kv_heads * head_dim
    query = qkv[:, :q_width].view(num_tokens, num_qo_heads, head_dim)
    key = qkv[:, q_width:q_width + kv_width].view(num_tokens, num_kv_heads, head_dim)
    value = qkv[:, q_width + kv_width:].view(num_tokens, num_kv_heads, head_dim)
    return query, key, value


@pytest.mark.parametrize("cache_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("num_tokens,num_qo_heads,num_kv_heads,head_dim,rotary_dim,page_size", [
    (1, 1, 1, 64, 64, 1),
    (19, 4, 1, 64, 64, 16),
    (37, 8, 2, 128, 128, 16),
    (13, 8, 1, 128, 64, 5),  # partial rotary; GQA 8
])
def test_rope_kv_append_matches_formula(backend, cache_dtype, num_tokens, num_qo_heads, num_kv_heads, head_dim,
                                        rotary_dim, page_size):
    seed = num_tokens * 1000 + head_dim + rotary_dim
    num_pages = (num_tokens + 2 * page_size - 1) // page_size + 2
    qkv, positions, slots, table = make_case(seed, num_tokens, num_qo_heads, num_kv_heads, head_dim, rotary_dim,
                                             num_pages, page_size)
    slots[num_tokens // 2] = -1  # a skipped token (e.g. padding)
    torch_dtype = torch.float32 if cache_dtype == "float32" else torch.bfloat16
    k_cache = torch.full((num_pages, page_size, num_kv_heads, head_dim), POISON, dtype=torch_dtype)
    v_cache = torch.full_like(k_cache, POISON)
    query, key, value = split_qkv(qkv, num_qo_heads, num_kv_heads, head_dim)
    q_before, k_before, v_before = query.numpy().copy(), key.numpy().copy(), value.numpy().copy()

    backend.rope_kv_append(query, key, value, positions, torch.from_numpy(table.astype(np.float32)), k_cache,
                           v_cache, slots)

    pos = positions.numpy()
    # The table the kernel reads is float32; the reference uses the same rounded table.
    table32 = table.astype(np.float32).astype(np.float64)
    expected_q = reference_rope(q_before, pos, table32)
    expected_k = reference_rope(k_before, pos, table32)
    assert_close_fp32(query.numpy(), expected_q, "rotated query", seed)
    assert_close_fp32(key.numpy(), expected_k, "rotated key", seed)
    assert_exact(value.numpy(), v_before, "value untouched", seed)

    flat_k = k_cache.float().reshape(num_pages * page_size, num_kv_heads, head_dim).numpy()
    flat_v = v_cache.float().reshape(num_pages * page_size, num_kv_heads, head_dim).numpy()
    written = slots.numpy() >= 0
    if cache_dtype == "float32":
        assert_close_fp32(flat_k[slots.numpy()[written]], expected_k[written], "k_cache slots", seed)
        assert_exact(flat_v[slots.numpy()[written]], v_before[written], "v_cache slots", seed)
    else:
        assert_close_lowp(flat_k[slots.numpy()[written]], expected_k[written], "bfloat16", "k_cache slots", seed)
        expected_v = torch.from_numpy(v_before[written]).bfloat16().float().numpy()
        assert_exact(flat_v[slots.numpy()[written]], expected_v, "v_cache slots (round to nearest even)", seed)
    untouched = np.ones(num_pages * page_size, bool)
    untouched[slots.numpy()[written]] = False
    assert_exact(flat_k[untouched], np.full_like(flat_k[untouched], POISON), "unwritten k slots", seed)
    assert_exact(flat_v[untouched], np.full_like(flat_v[untouched], POISON), "unwritten v slots", seed)


def test_rope_kv_append_contiguous_inputs(backend):
    """Separate contiguous q/k/v tensors (numpy) behave like the qkv slices."""
    seed = 99
    rng = np.random.default_rng(seed)
    query = rng.standard_normal((5, 4, 64)).astype(np.float32)
    key = rng.standard_normal((5, 2, 64)).astype(np.float32)
    value = rng.standard_normal((5, 2, 64)).astype(np.float32)
    positions = np.array([0, 1, 2, 100, 511], np.int32)
    table = cos_sin_table(512, 64)
    expected_q = reference_rope(query, positions, table.astype(np.float32).astype(np.float64))
    k_cache = np.zeros((2, 4, 2, 64), np.float32)
    v_cache = np.zeros((2, 4, 2, 64), np.float32)
    backend.rope_kv_append(query, key, value, positions, table.astype(np.float32), k_cache, v_cache,
                           np.array([7, 6, 5, 4, 3], np.int64))
    assert_close_fp32(query, expected_q, "rotated query", seed)
    assert_exact(v_cache.reshape(8, 2, 64)[[7, 6, 5, 4, 3]], value, "values by slot", seed)
    # position 0 is the identity rotation
    assert_close_fp32(k_cache.reshape(8, 2, 64)[7], key[0], "position 0 key", seed)


@pytest.mark.parametrize("seq_len", [16, 17, 31, 32, 33])  # seq_len % page_size in {0, 1, page_size - 1}
def test_rope_kv_append_chunked_sequence_across_pages(backend, seq_len):
    """One sequence appended as the engine does it: a prefill chunk of 7 tokens, then chunks of 1, each
    token at slot page[pos // page_size] * page_size + pos % page_size on scattered pages. Reading
    the pages back in order gives every rotated key and value at its position, with nothing else touched."""
    seed = 4000 + seq_len
    page_size, num_qo_heads, num_kv_heads, head_dim = 16, 4, 2, 64
    rng = np.random.default_rng(seed)
    num_pages = 6
    pages = rng.permutation(num_pages)[:(seq_len + page_size - 1) // page_size]
    table = cos_sin_table(64, head_dim).astype(np.float32)
    k_cache = np.full((num_pages, page_size, num_kv_heads, head_dim), POISON, np.float32)
    v_cache = np.full_like(k_cache, POISON)
    keys = rng.standard_normal((seq_len, num_kv_heads, head_dim)).astype(np.float32)
    values = rng.standard_normal((seq_len, num_kv_heads, head_dim)).astype(np.float32)
    starts = [0] + list(range(min(7, seq_len), seq_len))
    for start, end in zip(starts, starts[1:] + [seq_len]):
        positions = np.arange(start, end, dtype=np.int32)
        slots = (pages[positions // page_size] * page_size + positions % page_size).astype(np.int64)
        query = np.zeros((end - start, num_qo_heads, head_dim), np.float32)
        backend.rope_kv_append(query, keys[start:end].copy(), values[start:end], positions, table, k_cache, v_cache,
                               slots)
    expected_k = reference_rope(keys, np.arange(seq_len), table.astype(np.float64))
    gathered_k = k_cache[pages].reshape(-1, num_kv_heads, head_dim)
    gathered_v = v_cache[pages].reshape(-1, num_kv_heads, head_dim)
    assert_close_fp32(gathered_k[:seq_len], expected_k, f"keys by position, seq_len={seq_len}", seed)
    assert_exact(gathered_v[:seq_len], values, f"values by position, seq_len={seq_len}", seed)
    assert_exact(gathered_k[seq_len:], np.full_like(gathered_k[seq_len:], POISON), "tail of the last page", seed)
    unused = np.setdiff1d(np.arange(num_pages), pages)
    assert_exact(k_cache[unused], np.full_like(k_cache[unused], POISON), "pages of no sequence", seed)
    assert_exact(v_cache[unused], np.full_like(v_cache[unused], POISON), "pages of no sequence (v)", seed)


def test_rope_kv_append_rejects_bad_indices_before_writing(backend):
    rng = np.random.default_rng(3)
    table = cos_sin_table(16, 64).astype(np.float32)

    def run(positions, slots, cache_dtype=np.float32, slots_dtype=np.int64):
        query = rng.standard_normal((2, 2, 64)).astype(np.float32)
        key = rng.standard_normal((2, 1, 64)).astype(np.float32)
        value = np.zeros((2, 1, 64), np.float32)
        before = query.copy()
        k_cache = np.zeros((2, 4, 1, 64), cache_dtype)
        v_cache = np.zeros((2, 4, 1, 64), cache_dtype)
        try:
            backend.rope_kv_append(query, key, value, np.array(positions, np.int32), table, k_cache, v_cache,
                                   np.array(slots, slots_dtype))
        finally:
            assert_exact(query, before, "query must be untouched after an error")

    with pytest.raises(ValueError, match="positions"):
        run([0, 16], [0, 1])
    with pytest.raises(ValueError, match="positions"):
        run([-1, 0], [0, 1])
    with pytest.raises(ValueError, match="slot_mapping"):
        run([0, 1], [0, 8])  # 2 pages x 4 slots
    with pytest.raises(ValueError, match="slot_mapping"):
        run([0, 1], [0, 1], slots_dtype=np.int32)
    with pytest.raises(ValueError, match="k_cache"):
        run([0, 1], [0, 1], cache_dtype=np.float16)


def test_rope_kv_append_rejects_bad_shapes(backend):
    table = cos_sin_table(16, 64).astype(np.float32)
    query = np.zeros((2, 3, 64), np.float32)
    key = np.zeros((2, 2, 64), np.float32)
    cache = np.zeros((2, 4, 2, 64), np.float32)
    with pytest.raises(ValueError, match="multiple"):
        backend.rope_kv_append(query, key, key.copy(), np.zeros(2, np.int32), table, cache, cache.copy(),
                               np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="rotary_dim"):
        backend.rope_kv_append(np.zeros((2, 2, 32), np.float32), np.zeros((2, 2, 32), np.float32),
                               np.zeros((2, 2, 32), np.float32), np.zeros(2, np.int32), table,
                               np.zeros((2, 4, 2, 32), np.float32), np.zeros((2, 4, 2, 32), np.float32),
                               np.zeros(2, np.int64))
