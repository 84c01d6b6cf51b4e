"""sample on CUDA against the CPU reference on the same Args (ops/sample.h).

Exact, row by row, sampled tokens included: the two backends share the op's arithmetic
(cpp/include/lserve/ops/sample_rules.h: IEEE-rounded float steps, integer weights, an integer
draw target from Philox4x32-10), so there is no floating-point CDF for a uniform to land near and no
tolerance to tune. On a mismatch the message also compares the scratch both backends leave in the
logits (penalised logits for greedy rows, probabilities otherwise) to say which step diverged.
(The basename differs from tests/ops/test_sample.py: pytest's default import mode needs unique ones.)"""
from __future__ import annotations

import numpy as np
import pytest

from cuda_testing import DEVICE, STANDIN, ints, on_gpu, require, torch
from lserve import _C
from lserve_testing import assert_exact

pytestmark = pytest.mark.cuda

POISON = -12345


def csr(lists):
    indptr = np.zeros(len(lists) + 1, np.int32)
    indptr[1:] = np.cumsum([len(ids) for ids in lists])
    ids = np.concatenate([np.asarray(ids, np.int64) for ids in lists]) if lists else np.zeros(0)
    return indptr, ids.astype(np.int32)


def make_batch(num_rows: int, vocab_size: int, seed: int, penalties: bool = True, banned: bool = True) -> dict:
    """Host arguments with every parameter mixed across rows: greedy and sampled rows, top-k/top-p/min-p on
    and off, long repetitive histories, bans (some beyond the vocabulary), tied logits."""
    rng = np.random.default_rng(seed)
    scale = rng.uniform(1.0, 5.0, (num_rows, 1))
    logits = (rng.standard_normal((num_rows, vocab_size)) * scale).astype(np.float32)
    logits[1::5] = np.round(logits[1::5] * 2.0) / 2.0  # many ties: threshold rules and lowest-id argmax
    logits[2::7, :3] = logits[2::7].max(axis=1, keepdims=True)  # a tied maximum
    args = dict(
        logits=logits,
        temperature=rng.choice([0.0, 0.5, 1.0, 1.3], num_rows).astype(np.float32),
        top_k=rng.choice([0, -1, 1, 20, 50, 1000, vocab_size], num_rows).astype(np.int32),
        top_p=rng.choice([1.0, 0.95, 0.9, 0.5, 1e-6], num_rows).astype(np.float32),
        min_p=rng.choice([0.0, 0.0, 0.05, 0.2], num_rows).astype(np.float32),
        seed=rng.integers(-2**62, 2**62, num_rows).astype(np.int64),
        offset=rng.integers(0, 5000, num_rows).astype(np.int64),
    )
    if penalties:
        prompts, outputs = [], []
        for row in range(num_rows):
            favourites = np.argsort(logits[row])[-40:]  # the likely tokens, penalised and repeated
            pool = np.concatenate([favourites, rng.integers(0, vocab_size, 200)])
            prompts.append(rng.choice(pool, int(rng.integers(0, 3000))))
            outputs.append(rng.choice(pool, int(rng.integers(0, 500))))
        args["history_indptr"], args["history_token_ids"] = csr([list(p) + list(o) for p, o in zip(prompts, outputs)])
        args["num_prompt_tokens"] = np.array([len(p) for p in prompts], np.int32)
        args["repetition_penalty"] = rng.choice([1.0, 1.1, 1.5, 0.8], num_rows).astype(np.float32)
        args["presence_penalty"] = rng.choice([0.0, 0.5, -0.5, 2.0], num_rows).astype(np.float32)
        args["frequency_penalty"] = rng.choice([0.0, 0.3, -0.2, 1.0], num_rows).astype(np.float32)
    if banned:
        lists = []
        for row in range(num_rows):
            ids = list(rng.integers(0, vocab_size, int(rng.integers(0, 4)))) if vocab_size > 4 else []
            if row % 3 == 0 and vocab_size > 1:
                ids += [int(np.argmax(logits[row])), vocab_size + 5, -2]  # the best token; ids outside: skipped
            lists.append(ids)
        args["banned_indptr"], args["banned_token_ids"] = csr(lists)
    return args


def run_cpu(cpu_backend, host: dict) -> tuple:
    args = {key: value.copy() for key, value in host.items()}
    num_rows, vocab_size = args["logits"].shape
    args["output"] = np.full(num_rows, POISON, np.int32)
    if "history_indptr" in args:
        args["workspace"] = np.zeros(_C.sample_workspace_bytes(num_rows, vocab_size), np.uint8)
    cpu_backend.sample(**args)
    return args["output"], args["logits"]


def run_cuda(cuda_backend, host: dict, strided: bool = False, raise_invalid_rows: bool = True) -> tuple:
    num_rows, vocab_size = host["logits"].shape
    args = {}
    for key, value in host.items():
        args[key] = on_gpu(value) if value.dtype == np.float32 else ints(value)
    if strided:  # rows of the logits inside a wider buffer
        wide = torch.full((num_rows, vocab_size + 7), float("nan"), device=DEVICE)
        wide[:, 3:3 + vocab_size] = args["logits"]
        args["logits"] = wide[:, 3:3 + vocab_size]
    args["output"] = torch.full((num_rows,), POISON, dtype=torch.int32, device=DEVICE)
    if "history_indptr" in args:  # garbage first: the op needs no initialised workspace
        num_bytes = _C.sample_workspace_bytes(num_rows, vocab_size)
        args["workspace"] = torch.full((num_bytes,), 0xA5, dtype=torch.uint8, device=DEVICE)
    cuda_backend.sample(**args, raise_invalid_rows=raise_invalid_rows)  # CUDA: -1 either way
    return args["output"].cpu().numpy(), args["logits"].cpu().numpy()


def assert_same_tokens(actual, expected, actual_scratch, expected_scratch, what: str, seed) -> None:
    assert not (actual == POISON).any(), f"{what}: rows {np.flatnonzero(actual == POISON)[:10]} unwritten (seed={seed})"
    bad = np.flatnonzero(actual != expected)
    if bad.size:
        row = int(bad[0])
        same = np.array_equal(actual_scratch[row], expected_scratch[row], equal_nan=True)
        diverged = "identical" if same else (
            f"differ at {np.flatnonzero(actual_scratch[row] != expected_scratch[row])[:5].tolist()}")
        raise AssertionError(f"{what}: {bad.size} of {actual.size} rows differ; row {row}: cuda {actual[row]} vs cpu "
                             f"{expected[row]}; scratch (penalised logits or probabilities) {diverged} (seed={seed})")


@pytest.mark.parametrize("vocab_size", [49152, 128256])
@pytest.mark.parametrize("num_rows", [1, 7, 64])
def test_sample_matches_cpu(cuda_backend, cpu_backend, vocab_size, num_rows):
    require(cuda_backend, "sample")
    seed = vocab_size + num_rows
    host = make_batch(num_rows, vocab_size, seed)
    expected, expected_scratch = run_cpu(cpu_backend, host)
    actual, actual_scratch = run_cuda(cuda_backend, host, strided=num_rows == 7)
    assert_same_tokens(actual, expected, actual_scratch, expected_scratch,
                       f"sample ({num_rows}, {vocab_size})", seed)


@pytest.mark.parametrize("vocab_size", [1, 19, 1023, 2048, 2049, 32000])
def test_sample_odd_vocab_sizes(cuda_backend, cpu_backend, vocab_size):
    """Vocabularies around the 256/1024-thread switch and not multiples of any block size."""
    seed = 300 + vocab_size
    host = make_batch(33, vocab_size, seed)
    expected, expected_scratch = run_cpu(cpu_backend, host)
    actual, actual_scratch = run_cuda(cuda_backend, host)
    assert_same_tokens(actual, expected, actual_scratch, expected_scratch, f"sample vocab {vocab_size}", seed)


def test_sample_without_penalties_or_bans(cuda_backend, cpu_backend):
    seed = 400
    host = make_batch(40, 49152, seed, penalties=False, banned=False)
    expected, expected_scratch = run_cpu(cpu_backend, host)
    actual, actual_scratch = run_cuda(cuda_backend, host)
    assert_same_tokens(actual, expected, actual_scratch, expected_scratch, "sample, no penalties", seed)


def test_many_draws_match_cpu(cuda_backend, cpu_backend):
    """One row drawn 2000 times (seeds x offsets), sampled with each filter: every draw identical."""
    seed = 500
    vocab_size = 4096
    row = (np.random.default_rng(seed).standard_normal(vocab_size) * 3.0).astype(np.float32)
    num_rows = 2000
    for filters in (dict(), dict(top_k=40), dict(top_p=0.9), dict(min_p=0.05), dict(top_k=100, top_p=0.8,
                                                                                        temperature=0.7)):
        host = dict(logits=np.tile(row, (num_rows, 1)),
                    temperature=np.full(num_rows, filters.get("temperature", 1.0), np.float32),
                    top_k=np.full(num_rows, filters.get("top_k", 0), np.int32),
                    top_p=np.full(num_rows, filters.get("top_p", 1.0), np.float32),
                    min_p=np.full(num_rows, filters.get("min_p", 0.0), np.float32),
                    seed=(seed + np.arange(num_rows) // 100).astype(np.int64),
                    offset=(np.arange(num_rows) % 100).astype(np.int64))
        expected, expected_scratch = run_cpu(cpu_backend, host)
        actual, actual_scratch = run_cuda(cuda_backend, host)
        assert_same_tokens(actual, expected, actual_scratch, expected_scratch, f"draws {filters}", seed)
        assert len(set(actual.tolist())) > 1 or filters.get("top_k") == 1


def test_invalid_rows_get_minus_one(cuda_backend, cpu_backend):
    """CUDA cannot raise without a sync: rows the CPU rejects get -1, the others their usual token.
    (The CPU stand-in writes -1 too, with raise_invalid_rows=False, the engine's setting.)"""
    seed = 600
    vocab_size = 3000
    num_rows = 9
    host = make_batch(num_rows, vocab_size, seed)
    host["temperature"][[0, 4, 8]] = [0.0, 1.0, 0.7]
    host["logits"][0, 17] = np.nan                    # row 0: a NaN logit
    host["top_p"][1] = 1.5                             # row 1: parameter out of range
    history = rows_of(host, "history")
    host["repetition_penalty"][2] = 1.3                # row 2: a history id outside the vocabulary
    history[2] = [vocab_size] + history[2]
    host["num_prompt_tokens"][2] += 1
    host["history_indptr"], host["history_token_ids"] = csr(history)
    host["num_prompt_tokens"][3] = len(history[3]) + 1  # row 3: more prompt tokens than history
    banned = rows_of(host, "banned")
    banned[5] = list(range(vocab_size))                # row 5: everything banned
    host["banned_indptr"], host["banned_token_ids"] = csr(banned)
    host["temperature"][6] = np.inf                    # row 6
    invalid = [0, 1, 2, 3, 5, 6]
    actual, _ = run_cuda(cuda_backend, host, raise_invalid_rows=not STANDIN)
    assert_exact(actual[invalid], np.full(len(invalid), -1, np.int32), "invalid rows", seed)
    for row in invalid:
        one = select_rows(host, [row])
        with pytest.raises(ValueError):
            run_cpu(cpu_backend, one)
    valid = [4, 7, 8]
    expected, _ = run_cpu(cpu_backend, select_rows(host, valid))
    assert_exact(actual[valid], expected, "valid rows beside invalid ones (position in the batch is no input)", seed)


def rows_of(host: dict, prefix: str) -> list:
    """The per-row id lists of the CSR pair {prefix}_indptr / {prefix}_token_ids."""
    indptr, ids = host[f"{prefix}_indptr"], host[f"{prefix}_token_ids"]
    return [ids[indptr[r]:indptr[r + 1]].tolist() for r in range(indptr.size - 1)]


def select_rows(host: dict, rows: list) -> dict:
    """The arguments of a sub-batch: per-row tensors indexed, CSR lists rebuilt."""
    out = {}
    for key, value in host.items():
        if key in ("history_indptr", "history_token_ids", "banned_indptr", "banned_token_ids"):
            continue
        out[key] = value[rows].copy()
    for prefix in ("history", "banned"):
        if f"{prefix}_indptr" in host:
            lists = rows_of(host, prefix)
            out[f"{prefix}_indptr"], out[f"{prefix}_token_ids"] = csr([lists[r] for r in rows])
    return out


def test_reordered_batch_gives_the_same_tokens(cuda_backend, cpu_backend):
    seed = 700
    host = make_batch(24, 49152, seed)
    actual, _ = run_cuda(cuda_backend, host)
    order = np.random.default_rng(seed).permutation(24)
    shuffled, _ = run_cuda(cuda_backend, select_rows(host, list(order)))
    assert_exact(shuffled, actual[order], "tokens after reordering the batch", seed)
