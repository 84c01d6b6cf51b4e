"""Native weights (dtype "native", the default for a GGUF on the CPU): weight matrices kept as the
file stores them against the float32 reference (dtype "float32", every weight dequantised).

bf16 / f16 files: the same values reach the same fp32 GEMM code, so logits are identical. q8_0 /
q4_0 / q4_1 files: the quantized GEMM multiplies fp32 activations with the blocks dequantised to the
same fp32 values, so logits differ only by summation order (normalised MSE bound at the fp32 level);
the q/k rows llama.cpp permutes are un-permuted block-whole. Memory:
SmolLM2's resident set holds no float32 copy.
"""
from __future__ import annotations

import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
from gguf_testing import write_tiny_llama
from lserve_testing import assert_exact, assert_nmse

from lserve import Engine, SamplingParams

QTYPES = {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16,
          "q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0,
          "q4_1": gguf.GGMLQuantizationType.Q4_1}
NATIVE_NMSE = {"q8_0": 5e-2, "q4_0": 5e-3, "q4_1": 2e-3}
PROMPT = [3, 17, 5, 9, 22, 31, 4, 8, 12, 2, 19, 7, 33]  # 13 tokens: the prefill takes the M > 8 GEMM path


def prompt_logits(engine: Engine, prompts) -> np.ndarray:
    """(len(prompts), vocab): the last-position logits of each prompt's prefill (greedy sequences
    part after the first token where margins are small, so only the prefill is compared)."""
    rows = []
    for prompt in prompts:
        engine.add_request(None, list(prompt), SamplingParams(temperature=0.0, max_tokens=1))
        while engine._core.has_unfinished_requests():
            for out in engine._core.step():
                if out.logits is not None:
                    rows.append(np.asarray(out.logits))
    return np.stack(rows)


@pytest.fixture(scope="module", params=list(QTYPES))
def tiny_pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("native") / f"tiny_{request.param}.gguf"
    write_tiny_llama(path, qtype=QTYPES[request.param], inter=96)
    common = dict(max_num_seqs=4, show_progress=False, capture_logits=True)
    return request.param, Engine(str(path), **common), Engine(str(path), dtype="float32", **common)


def test_auto_is_native_for_gguf_on_cpu(tiny_pair):
    _, native, reference = tiny_pair
    assert native.dtype == "native"
    assert reference.dtype == "float32"


def test_native_logits_match_float32(tiny_pair):
    qtype, native, reference = tiny_pair
    prompts = [PROMPT[:length] for length in (1, 3, 8, 9, 13)]  # decode (<= 8 rows) and blocked GEMM paths
    ours = prompt_logits(native, prompts)
    expected = prompt_logits(reference, prompts)
    if qtype in ("f16", "bf16"):
        assert_exact(ours, expected, f"native {qtype} logits vs float32")
    else:
        # The GEMM quantises activations to 8-bit blocks (tests/ops/test_gemm_quant.py). Measured
        # NMSE 2026-12-05 on this tiny random model (both kernel builds give the same bits): q8_0
        # 1.6e-2, q4_0 1.4e-3, q4_1 6.9e-4 (the random weights amplify the activation error; SmolLM2
        # itself is in test_smollm2.py). Bounds about 3x those; a misplaced block or head gives O(1).
        assert_nmse(ours, expected, NATIVE_NMSE[qtype], f"native {qtype} logits vs float32")


def test_native_rows_do_not_depend_on_the_batch(tiny_pair):
    """Greedy tokens of a prompt alone and beside two others agree (batch-invariant GEMM rows)."""
    qtype, native, _ = tiny_pair
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    alone = native.generate([PROMPT], params, use_tqdm=False)[0].outputs[0].token_ids
    batch = native.generate([PROMPT[:5], PROMPT, PROMPT[3:]], params, use_tqdm=False)
    assert_exact(batch[1].outputs[0].token_ids, alone, f"native {qtype}: prompt in a batch of 3 vs alone")


def test_native_is_cpu_only_and_dtype_checked(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path)
    with pytest.raises(ValueError, match="runs on the CPU only"):
        Engine(str(path), dtype="native", device="cuda", show_progress=False)
    with pytest.raises(ValueError, match="'native'"):
        Engine(str(path), dtype="q4_1", show_progress=False)


_RSS_SCRIPT = r"""
import ctypes, gc, os, sys
# Transparent huge pages off for this process (PR_SET_THP_DISABLE): the figure is the memory lserve
# touches. With THP on and huge pages free, the same load grows by about 35 MB more (232 MB,
# 2026-12-06; docs/PERFORMANCE.md), depending on the host's free huge pages.
ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)
from lserve import Engine, SamplingParams
def rss():
    with open("/proc/self/status") as status:
        return int(status.read().split("VmRSS:")[1].split()[0]) * 1024
before = rss()
engine = Engine(sys.argv[1], dtype=sys.argv[2], kv_cache_memory=64 << 20, max_model_len=1024, show_progress=False)
engine.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=4), use_tqdm=False)
gc.collect()
print(rss() - before)
"""


def test_native_resident_memory(smollm2_gguf):
    """Engine(SmolLM2 Q4_1) on the CPU: resident growth <= 1.5 x the file + the 64 MiB KV cache it
    was given (measured 2026-12-05: 191 MB = 1.29 x 98 MB + 64 MiB with the matrices served from the
    mapping; 200 MB = 1.36 x 98 MB + 64 MiB with them packed in the CPU backend's arena and the mapping's
    pages dropped; dtype float32: 635 MB)."""
    kv_bytes = 64 << 20
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    grown = int(subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(smollm2_gguf), "native"], env=env, check=True,
                               capture_output=True, text=True).stdout.split()[-1])
    file_bytes = os.path.getsize(smollm2_gguf)
    assert grown <= 1.5 * file_bytes + kv_bytes, (
        f"native SmolLM2 grew the resident set by {grown} bytes, more than 1.5 x {file_bytes} + {kv_bytes}")


def test_native_sparse_head_reordering(tmp_path):
    """Sparse attention serves KV heads reordered (dense first): q/k/v rows of q4_1 blocks move whole,
    o_proj stays as stored (the attention output is put back in order). Layer 1 streams KV head 0, so
    its heads are reordered."""
    from lserve import SparsityConfig

    path = tmp_path / "tiny_q4_1.gguf"
    write_tiny_llama(path, qtype=QTYPES["q4_1"], inter=96)  # 4 query / 2 KV heads of 16: a group is one block
    sparsity = SparsityConfig(streaming_heads=[[], [0]], prefill_sink_tokens=4, prefill_local_tokens=8,
                              decode_sink_tokens=4, decode_local_tokens=8, physical_page_size=16, logical_page_size=4,
                              decode_token_budget=32)
    common = dict(sparsity=sparsity, max_model_len=256, num_kv_pages=32, show_progress=False, capture_logits=True)
    native = Engine(str(path), **common)
    reference = Engine(str(path), dtype="float32", **common)
    prompts = [PROMPT[:length] for length in (3, 9, 13)]
    # Measured NMSE 6.7e-4 (8-bit activations, as in test_native_logits_match_float32).
    assert_nmse(prompt_logits(native, prompts), prompt_logits(reference, prompts), NATIVE_NMSE["q4_1"],
                "native q4_1 sparse logits vs float32")


def test_native_sparse_equals_dense_when_everything_fits(tmp_path):
    """With windows and a budget that cover the whole context, sparse attention reads what dense reads,
    so native weights give dense's logits bit for bit, with reordered heads (layer 1 streams KV head
    0): o_proj must sum the heads in their original order, since native mode quantizes its input
    (a rounding-level change of order grows through the requantized layers)."""
    from lserve import SparsityConfig

    path = tmp_path / "tiny_q4_1.gguf"
    # 3 KV groups of two 32-wide heads: o_proj sums 6 blocks, so a reorder changes the order of its sums.
    write_tiny_llama(path, qtype=QTYPES["q4_1"], hidden=96, heads=6, kv_heads=3, head_dim=32, inter=96)
    wide = SparsityConfig(streaming_heads=[[], [0]], prefill_sink_tokens=4, prefill_local_tokens=256,
                          decode_sink_tokens=4, decode_local_tokens=256, physical_page_size=16, logical_page_size=4,
                          decode_token_budget=256)
    common = dict(max_model_len=256, num_kv_pages=32, show_progress=False, capture_logits=True)
    prompts = [PROMPT[:length] for length in (3, 9, 13)]
    dense = prompt_logits(Engine(str(path), **common), prompts)
    sparse = prompt_logits(Engine(str(path), sparsity=wide, **common), prompts)
    assert_exact(sparse, dense, what="native sparse (everything fits) vs native dense logits")


STORED_AS_IS = ("token_embd.weight", "output.weight", "attn_output.weight", "ffn_down.weight")


def _stored_bytes(path, suffixes=STORED_AS_IS) -> int:
    """Bytes of the GGUF matrices whose names end in one of `suffixes`. By default those the engine can
    serve as stored: whole matrices of its layout (attn_q/k/v fuse into q|k|v and ffn_gate/up into
    gate|up, so those are copies)."""
    reader = gguf.GGUFReader(str(path))
    return sum(int(t.n_bytes) for t in reader.tensors if t.name.endswith(suffixes) and len(t.shape) == 2)


def _matrix_bytes(path) -> int:
    """Bytes of every 2-D tensor (the matrices; norms are 1-D)."""
    reader = gguf.GGUFReader(str(path))
    return sum(int(t.n_bytes) for t in reader.tensors if len(t.shape) == 2)


@pytest.mark.parametrize("tied", [False, True])
def test_block_matrices_are_packed_and_the_embedding_stays_mapped(tmp_path, tied):
    """Native q4_1 weights on the CPU: every gemm matrix goes to the backend's interleaved layout
    (Backend::pack_gemm_weight), copied from the mapping or from the fused q|k|v and gate|up; the
    embedding stays a view into the mapping (embed reads its rows) and a tied lm_head is a packed copy
    of it. The logits stay those of the float32 reference (test above), and the engine runs after the
    file object is gone (the view holds the mapping)."""
    path = tmp_path / "tiny_q4_1.gguf"
    write_tiny_llama(path, qtype=QTYPES["q4_1"], inter=96, tied=tied)
    embedding = _stored_bytes(path, ("token_embd.weight",))
    packed = _matrix_bytes(path) - embedding + (embedding if tied else 0)
    native = Engine(str(path), show_progress=False, capture_logits=True)
    assert (native._core.stats().weight_bytes_mapped, native._core.stats().weight_bytes_packed) == (embedding, packed)
    assert embedding > 0 and packed > 0
    reference = Engine(str(path), dtype="float32", show_progress=False)._core.stats()
    assert (reference.weight_bytes_mapped, reference.weight_bytes_packed) == (0, 0)

    # The C++ loader (Engine::from_gguf) closes its GgufFile on return; the view keeps the mapping.
    from lserve import _C

    config = _C.EngineConfig()
    config.dtype = "native"
    config.capture_logits = True
    core = _C.Engine.from_gguf(str(path), config)
    assert (core.stats().weight_bytes_mapped, core.stats().weight_bytes_packed) == (embedding, packed)
    core.add_request(0, PROMPT, SamplingParams(temperature=0.0, max_tokens=1).to_core(1, None))
    logits = [np.asarray(out.logits) for out in core.step() if out.logits is not None]
    assert_exact(logits[0], prompt_logits(native, [PROMPT])[0], "from_gguf vs Engine, native weights")


@pytest.mark.parametrize("tied", [False, True])
def test_float_matrices_stay_in_the_file_mapping(tmp_path, tied):
    """Native f16 weights: the CPU gemm reads them as stored, so whole matrices are views into the
    GGUF mapping (no copy) and nothing is packed; the rest are copies."""
    path = tmp_path / "tiny_f16.gguf"
    write_tiny_llama(path, qtype=QTYPES["f16"], inter=96, tied=tied)
    stats = Engine(str(path), show_progress=False)._core.stats()
    assert (stats.weight_bytes_mapped, stats.weight_bytes_packed) == (_stored_bytes(path), 0)
    assert stats.weight_bytes_mapped > 0


@pytest.mark.parametrize("qtype", ["f16", "q4_1"])
def test_reordered_heads_keep_o_proj_as_stored(tmp_path, qtype):
    """With sparse attention, a layer whose KV heads are reordered still serves its o_proj as stored
    (the attention output is put back in order instead of moving o_proj's columns): f16 from the
    mapping, as ffn_down and the embedding; q4_1 packed from the mapping like every other matrix
    (the reordered q|k|v copies too), the embedding mapped."""
    from lserve import SparsityConfig

    path = tmp_path / f"tiny_{qtype}.gguf"
    write_tiny_llama(path, qtype=QTYPES[qtype], inter=96)
    sparsity = SparsityConfig(streaming_heads=[[], [0]], physical_page_size=16, logical_page_size=4,
                              decode_token_budget=32, prefill_local_tokens=8, decode_local_tokens=8)
    engine = Engine(str(path), sparsity=sparsity, max_model_len=256, num_kv_pages=32, show_progress=False)
    stats = engine._core.stats()
    if qtype == "f16":
        assert (stats.weight_bytes_mapped, stats.weight_bytes_packed) == (_stored_bytes(path), 0)
    else:
        embedding = _stored_bytes(path, ("token_embd.weight",))
        assert (stats.weight_bytes_mapped, stats.weight_bytes_packed) == (embedding, _matrix_bytes(path) - embedding)
