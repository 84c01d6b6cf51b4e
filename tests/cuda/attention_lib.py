"""ctypes access to the standalone attention kernels (cuda/attention/attention_capi.cu) plus the
torch references the tests and benchmarks share. Torch tensors in, torch tensors out.

The library comes from $LSERVE_ATTN_LIB, else it is built once into build/attention_standalone with
cuda/attention/build_standalone.sh (needs nvcc and the CUTLASS headers).
"""
from __future__ import annotations

import ctypes
import math
import os
import pathlib
import subprocess

import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
DTYPES = {torch.float16: 0, torch.bfloat16: 1}
PREFILL_AUTO, PREFILL_SM80, PREFILL_SM90 = 0, 1, 2
CUDA_ERROR_NOT_SUPPORTED = 801

CUDA_ERROR_INVALID_VALUE = 1

_INT_FIELDS = ("dtype", "head_dim", "num_qo_heads", "num_kv_heads", "page_size", "num_pages", "num_seqs",
               "num_tokens", "max_q_len", "max_kv_len", "num_slots", "capacity")
_STRIDE_FIELDS = ("q_stride_token", "q_stride_head", "o_stride_token", "o_stride_head", "kv_stride_page",
                  "kv_stride_token", "kv_stride_head")
# The sparse policy of AttentionArgs (cpp/include/lserve/ops/attention.h), one int32 tensor each.
SPARSE_FIELDS = ("window_sink", "window_local", "stream_ring", "selection", "selection_count", "select_slot",
                 "select_base")
_PTR_FIELDS = ("q", "o", "k_cache", "v_cache", "qo_indptr", "kv_page_indptr", "kv_page_indices",
               "kv_lens") + SPARSE_FIELDS


class AttnArgs(ctypes.Structure):
    """Mirror of LserveAttnArgs in attention_capi.cu."""
    _fields_ = ([(name, ctypes.c_int32) for name in _INT_FIELDS] + [("sm_scale", ctypes.c_float),
                ("reserved", ctypes.c_int32)] + [(name, ctypes.c_int64) for name in _STRIDE_FIELDS]
                + [(name, ctypes.c_void_p) for name in _PTR_FIELDS])


def build_library() -> pathlib.Path:
    explicit = os.environ.get("LSERVE_ATTN_LIB")
    if explicit:
        return pathlib.Path(explicit)
    out = ROOT / "build" / "attention_standalone"
    lib = out / "libattention_kernels.so"
    sources = list((ROOT / "cuda" / "attention").rglob("*.cu*")) + list((ROOT / "cuda" / "attention").glob("*.h"))
    if lib.exists() and lib.stat().st_mtime >= max(s.stat().st_mtime for s in sources):
        return lib
    jobs = os.environ.get("LSERVE_BUILD_JOBS", "2")
    subprocess.run(["bash", str(ROOT / "cuda" / "attention" / "build_standalone.sh"), str(out), jobs], check=True,
                   capture_output=True, text=True)
    return lib


class AttentionLib:
    def __init__(self, path: pathlib.Path):
        self.lib = ctypes.CDLL(str(path))
        L = self.lib
        L.lserve_attn_args_size.restype = ctypes.c_int
        assert L.lserve_attn_args_size() == ctypes.sizeof(AttnArgs), "AttnArgs does not mirror LserveAttnArgs"
        L.lserve_attn_prefill.argtypes = [ctypes.POINTER(AttnArgs), ctypes.c_int, ctypes.c_void_p]
        L.lserve_attn_decode.argtypes = [ctypes.POINTER(AttnArgs), ctypes.c_int, ctypes.c_void_p, ctypes.c_uint64,
                                         ctypes.c_void_p]
        L.lserve_attn_decode_num_splits.argtypes = [ctypes.POINTER(AttnArgs), ctypes.c_int]
        L.lserve_attn_decode_workspace_bytes.argtypes = [ctypes.POINTER(AttnArgs), ctypes.c_int]
        L.lserve_attn_decode_workspace_bytes.restype = ctypes.c_uint64
        L.lserve_attn_error_string.restype = ctypes.c_char_p

    def error(self, code: int) -> str:
        return self.lib.lserve_attn_error_string(code).decode()

    def prefill(self, args: AttnArgs, impl: int = PREFILL_AUTO) -> int:
        return self.lib.lserve_attn_prefill(ctypes.byref(args), impl, torch.cuda.current_stream().cuda_stream)

    def num_splits(self, args: AttnArgs) -> int:
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        return self.lib.lserve_attn_decode_num_splits(ctypes.byref(args), sms)

    def decode(self, args: AttnArgs, num_splits: int, workspace: torch.Tensor | None) -> int:
        ptr = workspace.data_ptr() if workspace is not None else None
        nbytes = workspace.numel() if workspace is not None else 0
        return self.lib.lserve_attn_decode(ctypes.byref(args), num_splits, ptr, nbytes,
                                           torch.cuda.current_stream().cuda_stream)

    def decode_workspace(self, args: AttnArgs, num_splits: int) -> torch.Tensor | None:
        nbytes = self.lib.lserve_attn_decode_workspace_bytes(ctypes.byref(args), num_splits)
        return torch.empty(nbytes, dtype=torch.uint8, device="cuda") if nbytes else None


class PagedBatch:
    """A batch of query chunks over a paged KV cache, pages shuffled (or in order), unused slots NaN.

    seqs: [(q_len, kv_len)]; query row i of a chunk sits at position kv_len - q_len + i.
    """

    def __init__(self, seqs, num_qo_heads, num_kv_heads, head_dim, page_size, dtype, seed, spare_pages=3,
                 shuffle=True):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        self.seqs, self.dtype = list(seqs), dtype
        self.num_qo_heads, self.num_kv_heads, self.head_dim, self.page_size = (num_qo_heads, num_kv_heads,
                                                                               head_dim, page_size)
        pages_per_seq = [max(1, math.ceil(kv / page_size)) for _, kv in seqs]
        num_pages = sum(pages_per_seq) + spare_pages
        order = (torch.randperm(num_pages, generator=gen, device="cuda") if shuffle
                 else torch.arange(num_pages, device="cuda")).to(torch.int32)
        shape = (num_pages, page_size, num_kv_heads, head_dim)
        self.k_cache = torch.full(shape, float("nan"), dtype=dtype, device="cuda")
        self.v_cache = torch.full(shape, float("nan"), dtype=dtype, device="cuda")
        self.page_lists, start = [], 0
        for (q_len, kv_len), n in zip(seqs, pages_per_seq):
            pages = order[start:start + n]
            start += n
            self.page_lists.append(pages)
            k = torch.randn((n * page_size, num_kv_heads, head_dim), generator=gen, device="cuda").to(dtype)
            v = torch.randn((n * page_size, num_kv_heads, head_dim), generator=gen, device="cuda").to(dtype)
            k[kv_len:] = float("nan")
            v[kv_len:] = float("nan")
            self.k_cache[pages.long()] = k.view(n, page_size, num_kv_heads, head_dim)
            self.v_cache[pages.long()] = v.view(n, page_size, num_kv_heads, head_dim)
        self.num_tokens = sum(q for q, _ in seqs)
        self.q = torch.randn((self.num_tokens, num_qo_heads, head_dim), generator=gen, device="cuda").to(dtype)
        self.qo_indptr = torch.tensor([0] + [q for q, _ in seqs], device="cuda").cumsum(0).to(torch.int32)
        self.kv_page_indptr = torch.tensor([0] + pages_per_seq, device="cuda").cumsum(0).to(torch.int32)
        self.kv_page_indices = torch.cat(self.page_lists).contiguous()
        self.kv_lens = torch.tensor([kv for _, kv in seqs], dtype=torch.int32, device="cuda")
        self.sm_scale = 1.0 / math.sqrt(head_dim)
        self.keep = []  # tensors whose pointers an AttnArgs holds

    def args(self, out: torch.Tensor, **sparse) -> AttnArgs:
        """The C struct for this batch writing `out`; sparse: SPARSE_FIELDS as int32 tensors or lists
        (None or absent: null)."""
        unknown = set(sparse) - set(SPARSE_FIELDS)
        assert not unknown, f"unknown sparse fields {unknown}"
        a = AttnArgs()
        a.dtype = DTYPES[self.dtype]
        a.head_dim, a.num_qo_heads, a.num_kv_heads = self.head_dim, self.num_qo_heads, self.num_kv_heads
        a.page_size, a.num_pages, a.num_seqs = self.page_size, self.k_cache.shape[0], len(self.seqs)
        a.num_tokens = self.num_tokens
        a.max_q_len = max(q for q, _ in self.seqs)
        a.max_kv_len = max(kv for _, kv in self.seqs)
        a.sm_scale = self.sm_scale
        a.q_stride_token, a.q_stride_head = self.q.stride(0), self.q.stride(1)
        a.o_stride_token, a.o_stride_head = out.stride(0), out.stride(1)
        a.kv_stride_page, a.kv_stride_token, a.kv_stride_head = self.k_cache.stride()[:3]
        a.q, a.o = self.q.data_ptr(), out.data_ptr()
        a.k_cache, a.v_cache = self.k_cache.data_ptr(), self.v_cache.data_ptr()
        a.qo_indptr, a.kv_page_indptr = self.qo_indptr.data_ptr(), self.kv_page_indptr.data_ptr()
        a.kv_page_indices, a.kv_lens = self.kv_page_indices.data_ptr(), self.kv_lens.data_ptr()
        for name, value in sparse.items():
            if value is None:
                continue
            tensor = torch.as_tensor(value, dtype=torch.int32).to("cuda").contiguous()
            self.keep.append(tensor)
            setattr(a, name, tensor.data_ptr())
            if name == "selection":
                a.num_slots, a.capacity = tensor.shape[0], tensor.shape[2]
        return a

    def poisoned_output(self) -> torch.Tensor:
        return torch.full_like(self.q, float("nan"))

    def seq_kv(self, s):
        """(kv_len, num_kv_heads, head_dim) keys and values of sequence s, in the cache dtype."""
        kv_len = self.seqs[s][1]
        pages = self.page_lists[s].long()
        k = self.k_cache[pages].reshape(-1, self.num_kv_heads, self.head_dim)[:kv_len]
        v = self.v_cache[pages].reshape(-1, self.num_kv_heads, self.head_dim)[:kv_len]
        return k, v


def visible_mask(q_pos, k_pos, seq_idx, kv_head, page_size, window_sink=None, window_local=None, selection=None,
                 selection_count=None, select_slot=None, select_base=None):
    """(q_len, kv_len) bool of sequence seq_idx's KV head: causal, and the sparse policy of
    ops/attention.h (as cpp/src/cpu/attention.cpp applies it). A stored selection (slot >= 0 and
    count >= 0) keeps its positions below base (up to the first one >= base) and every page from base
    on; a window (local > 0) keeps keys k < sink or q - k < local; with both, keys both keep.
    Arguments: host int32 tensors."""
    mask = k_pos[None, :] <= q_pos[:, None]
    if selection_count is not None:
        slot = int(select_slot[seq_idx]) if select_slot is not None else seq_idx
        count = int(selection_count[slot, kv_head]) if slot >= 0 else -1
        if count >= 0:
            num_pages = -(-k_pos.numel() // page_size)
            base = int(select_base[seq_idx]) if select_base is not None else num_pages
            chosen = torch.zeros(num_pages, dtype=torch.bool)
            for position in selection[slot, kv_head, :count].tolist():
                if position >= base:
                    break
                chosen[position] = True
            chosen[base:] = True
            mask &= chosen.to(k_pos.device)[k_pos // page_size][None, :]
    if window_local is not None and int(window_local[seq_idx]) > 0:
        sink, local = int(window_sink[seq_idx]), int(window_local[seq_idx])
        mask &= (k_pos[None, :] < sink) | (q_pos[:, None] - k_pos[None, :] < local)
    return mask


def reference(batch: PagedBatch, lowp: bool, **sparse) -> torch.Tensor:
    """Attention of every query row on its expanded mask (visible_mask; sparse: the fields given to
    PagedBatch.args). lowp=False: fp32 throughout; lowp=True: the plain torch implementation in the
    batch dtype (scores and P rounded to it)."""
    out = torch.zeros((batch.num_tokens, batch.num_qo_heads, batch.head_dim), dtype=torch.float32, device="cuda")
    group = batch.num_qo_heads // batch.num_kv_heads
    host = {name: torch.as_tensor(value, dtype=torch.int32).cpu() for name, value in sparse.items()
            if value is not None}
    start = 0
    for s, (q_len, kv_len) in enumerate(batch.seqs):
        k, v = batch.seq_kv(s)
        q = batch.q[start:start + q_len]
        q_pos = torch.arange(kv_len - q_len, kv_len, device="cuda")
        k_pos = torch.arange(kv_len, device="cuda")
        for h in range(batch.num_kv_heads):
            mask = visible_mask(q_pos, k_pos, s, h, batch.page_size, **host)
            qh = q[:, h * group:(h + 1) * group].transpose(0, 1)  # (group, q_len, D)
            kh, vh = k[:, h], v[:, h]
            if lowp:
                scores = (qh @ kh.T).float() * batch.sm_scale
            else:
                scores = (qh.float() @ kh.float().T) * batch.sm_scale
            scores = scores.masked_fill(~mask[None], float("-inf"))
            p = torch.softmax(scores, dim=-1).nan_to_num(0.0)
            o = (p.to(batch.dtype) @ vh).float() if lowp else p @ vh.float()
            out[start:start + q_len, h * group:(h + 1) * group] = o.transpose(0, 1)
        start += q_len
    return out


def check_attention(out, ref, ref_lowp, dtype, what):
    """FA3's rule: max error vs fp32 <= 2x the torch low-precision error + output rounding noise."""
    bad = ~torch.isfinite(out)
    if bad.any():
        idx = tuple(torch.nonzero(bad)[0].tolist())
        raise AssertionError(f"{what}: {int(bad.sum())} non-finite outputs (unwritten?), first at {idx}")
    err = (out.float() - ref).abs()
    err_lowp = (ref_lowp - ref).abs()
    noise = 2 * ((ref.to(dtype) + 0.3 - 0.3).float() - ref).abs().max()
    bound = 2 * err_lowp.max() + noise
    if err.max() > bound:
        idx = tuple(torch.nonzero(err == err.max())[0].tolist())
        raise AssertionError(f"{what}: max error {err.max():.3e} at (token, head, dim)={idx} > bound {bound:.3e} "
                             f"(torch {dtype} error {err_lowp.max():.3e}); out {out[idx].item():.4f} "
                             f"ref {ref[idx].item():.4f}")
    assert err.mean() <= 2 * err_lowp.mean() + 1e-4, (
        f"{what}: mean error {err.mean():.3e} > 2 x torch {dtype} mean error {err_lowp.mean():.3e}")
