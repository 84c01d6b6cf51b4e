"""CUDA attention kernels (cuda/attention/) through the standalone library, against an fp32 torch
reference on the expanded mask. Rule (STYLE.md): max error <= 2x a plain torch bf16/fp16
implementation's error + output rounding noise; outputs are poisoned with NaN first, and the cache
holds NaN in every slot no sequence owns (so unmasked or unzeroed reads show up).
"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

from attention_lib import (CUDA_ERROR_NOT_SUPPORTED, PREFILL_AUTO, PREFILL_SM80, PREFILL_SM90,  # noqa: E402
                           AttentionLib, PagedBatch, build_library, check_attention, reference)

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def lib():
    try:
        path = build_library()
    except Exception as e:  # no nvcc / CUTLASS here
        pytest.skip(f"attention library could not be built: {getattr(e, 'stderr', e)}")
    return AttentionLib(path)


def _run_prefill(lib, batch, impl, **sparse):
    out = batch.poisoned_output()
    code = lib.prefill(batch.args(out, **sparse), impl)
    if code == CUDA_ERROR_NOT_SUPPORTED and impl == PREFILL_SM90:
        pytest.skip("Hopper kernel not available for this device or page size")
    assert code == 0, lib.error(code)
    torch.cuda.synchronize()
    return out


# (seqs [(q_len, kv_len)], num_qo_heads, num_kv_heads, head_dim, page_size)
PREFILL_CASES = [
    ([(1, 1), (19, 19), (113, 113), (1023, 1023)], 4, 4, 128, 16),      # GQA 1, whole prompts
    ([(200, 1100), (1, 577), (64, 64), (130, 4096)], 8, 2, 128, 64),    # GQA 4, chunked prefill
    ([(128, 128), (129, 129), (191, 191), (300, 2000)], 8, 1, 128, 64),  # GQA 8, kv % page in {0, 1, 63}
    ([(257, 257), (129, 385), (7, 1000)], 8, 1, 64, 32),                # d64
    ([(300, 300), (1, 700)], 4, 1, 128, 256),                           # pages longer than a KV tile
    ([(100, 333), (65, 65)], 4, 2, 128, 24),                            # page size the TMA path refuses
]


@pytest.mark.parametrize("impl", [PREFILL_SM80, PREFILL_SM90, PREFILL_AUTO], ids=["sm80", "sm90", "auto"])
@pytest.mark.parametrize("case", range(len(PREFILL_CASES)))
def test_prefill_dense(lib, case, impl):
    seqs, hq, hkv, d, page = PREFILL_CASES[case]
    seed = 100 + case
    batch = PagedBatch(seqs, hq, hkv, d, page, torch.bfloat16, seed)
    out = _run_prefill(lib, batch, impl)
    check_attention(out, reference(batch, False), reference(batch, True), torch.bfloat16,
                    f"prefill case {case} impl {impl} seed {seed}")


# The Hopper launcher runs a persistent grid (one CTA per SM walking rounds of work tiles, the K/V ring
# running on across them) up to 20 waves of (128-query tile, head, sequence) work tiles, and one CTA per
# tile beyond (prefill_sm90.cuh). Both with many tiles, empty tiles (short sequences) and chunks.
SCHEDULE_CASES = {
    "persistent": [(2000, 2000), (37, 4000), (1000, 1500), (1, 1), (640, 641)],  # 2560 tiles: ~19 per CTA on 132 SMs
    "one_cta_per_tile": [(2700, 2700), (2700, 3000), (2600, 2600), (2700, 2777), (129, 129), (2700, 2700)],
}


@pytest.mark.parametrize("schedule", list(SCHEDULE_CASES))
def test_prefill_sm90_work_schedules(lib, schedule):
    batch = PagedBatch(SCHEDULE_CASES[schedule], 32, 8, 128, 64, torch.bfloat16, seed=len(schedule))
    out = _run_prefill(lib, batch, PREFILL_SM90)
    check_attention(out, reference(batch, False), reference(batch, True), torch.bfloat16, f"prefill {schedule}")


@pytest.mark.parametrize("impl", [PREFILL_SM80, PREFILL_SM90], ids=["sm80", "sm90"])
def test_prefill_fp16(lib, impl):
    batch = PagedBatch([(333, 333), (64, 1500)], 8, 2, 128, 64, torch.float16, seed=7)
    out = _run_prefill(lib, batch, impl)
    check_attention(out, reference(batch, False), reference(batch, True), torch.float16, f"prefill fp16 impl {impl}")


@pytest.mark.parametrize("impl", [PREFILL_SM80, PREFILL_SM90], ids=["sm80", "sm90"])
@pytest.mark.parametrize("sink, local", [(64, 200), (0, 128), (128, 8192), (5, 1)])
def test_prefill_streaming_heads(lib, impl, sink, local):
    """Streaming heads (Lambda mask, token-exact) beside dense heads, against the expanded mask."""
    batch = PagedBatch([(700, 700), (300, 1500), (5, 900), (1, 1)], 8, 4, 128, 16, torch.bfloat16, seed=sink + local)
    sparse = dict(streaming=[1, 0, 1, 1], sink=sink, local=local)
    out = _run_prefill(lib, batch, impl, streaming_heads=sparse["streaming"], sink_tokens=sink, local_tokens=local)
    check_attention(out, reference(batch, False, **sparse), reference(batch, True, **sparse), torch.bfloat16,
                    f"streaming prefill sink {sink} local {local} impl {impl}")


def _run_decode(lib, batch, num_splits=None, **sparse):
    out = batch.poisoned_output()
    args = batch.args(out, **sparse)
    splits = lib.num_splits(args) if num_splits is None else num_splits
    workspace = lib.decode_workspace(args, splits)
    if workspace is not None:
        workspace.fill_(255)  # NaN floats: every partial result must be written
    code = lib.decode(args, splits, workspace)
    assert code == 0, lib.error(code)
    torch.cuda.synchronize()
    return out


# (seqs [(q_len, kv_len)], num_qo_heads, num_kv_heads, head_dim, page_size)
DECODE_CASES = [
    ([(1, 1), (1, 17), (1, 5000), (1, 40000)], 32, 8, 128, 16),  # GQA 4, long contexts
    ([(1, 1023), (1, 64), (1, 65)], 8, 8, 128, 64),                # GQA 1
    ([(2, 3000), (1, 129)], 16, 2, 128, 64),                       # GQA 8, two queries -> 16 rows
    ([(1, 777), (1, 63)], 8, 1, 64, 32),                           # d64, GQA 8
    ([(3, 2000)], 16, 4, 64, 16),                                  # three queries x GQA 4 = 12 rows
    ([(1, 100), (1, 131)], 4, 2, 128, 24),                         # odd page size
]


@pytest.mark.parametrize("splits", [1, None, 7], ids=["nosplit", "heuristic", "split7"])
@pytest.mark.parametrize("case", range(len(DECODE_CASES)))
def test_decode_dense(lib, case, splits):
    seqs, hq, hkv, d, page = DECODE_CASES[case]
    seed = 200 + case
    batch = PagedBatch(seqs, hq, hkv, d, page, torch.bfloat16, seed)
    out = _run_decode(lib, batch, splits)
    check_attention(out, reference(batch, False), reference(batch, True), torch.bfloat16,
                    f"decode case {case} splits {splits} seed {seed}")


def test_decode_fp16(lib):
    batch = PagedBatch([(1, 3000), (1, 5)], 32, 8, 128, 16, torch.float16, seed=9)
    out = _run_decode(lib, batch)
    check_attention(out, reference(batch, False), reference(batch, True), torch.float16, "decode fp16")


def _selection(batch, block_size, keep_fraction, seed, every=False):
    """(num_seqs, num_kv_heads, stride) ascending block ids (newest block always) and their counts."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = [-(-kv // block_size) for _, kv in batch.seqs]
    stride = max(num_blocks)
    selected = torch.zeros((len(batch.seqs), batch.num_kv_heads, stride), dtype=torch.int32)
    counts = torch.zeros((len(batch.seqs), batch.num_kv_heads), dtype=torch.int32)
    for s, n in enumerate(num_blocks):
        for h in range(batch.num_kv_heads):
            if every:
                ids = torch.arange(n)
            else:
                keep = torch.rand(n, generator=gen) < keep_fraction
                keep[n - 1] = True
                ids = torch.nonzero(keep).flatten()
            selected[s, h, :len(ids)] = ids.to(torch.int32)
            counts[s, h] = len(ids)
    return selected.cuda(), counts.cuda()


@pytest.mark.parametrize("block_size", [16, 64, 128])
def test_decode_selected_and_streaming(lib, block_size):
    """Dense heads read only selected blocks, streaming heads sink + local; expanded-mask reference."""
    batch = PagedBatch([(1, 5000), (1, 70), (2, 2500)], 16, 4, 128, 16, torch.bfloat16, seed=block_size)
    selected, counts = _selection(batch, block_size, 0.3, seed=block_size)
    streaming = [0, 1, 0, 1]
    out = _run_decode(lib, batch, None, streaming_heads=streaming, sink_tokens=128, local_tokens=256,
                      selected=selected, num_selected=counts, selected_block_size=block_size)
    mask = dict(streaming=streaming, sink=128, local=256, selected=selected.cpu(), num_selected=counts.cpu(),
                block_size=block_size)
    check_attention(out, reference(batch, False, **dict(mask)), reference(batch, True, **dict(mask)), torch.bfloat16,
                    f"decode selected blocks of {block_size}")


def test_decode_every_block_selected_matches_dense(lib):
    batch = PagedBatch([(1, 4000), (1, 33)], 32, 8, 128, 16, torch.bfloat16, seed=11)
    selected, counts = _selection(batch, 64, 1.0, seed=0, every=True)
    dense = _run_decode(lib, batch)
    sparse = _run_decode(lib, batch, None, selected=selected, num_selected=counts, selected_block_size=64)
    ref = reference(batch, False)
    check_attention(sparse, ref, reference(batch, True), torch.bfloat16, "every block selected")
    assert (sparse.float() - dense.float()).abs().max() <= 2 * (dense.float() - ref).abs().max() + 1e-3


def test_decode_rejects_too_many_rows(lib):
    batch = PagedBatch([(3, 100)], 16, 2, 128, 16, torch.bfloat16, seed=1)  # 3 x 8 = 24 rows > 16
    out = batch.poisoned_output()
    assert lib.decode(batch.args(out), 1, None) != 0
