"""sample (ops/sample.h) on the CPU reference against numpy formulas.

Greedy tokens are exact (the penalties are recomputed in float32 numpy). Distributions are checked
by sampling one row per (seed, offset): no token outside the numpy reference's kept set may appear,
and the counts must pass a chi-square bound at a false-alarm rate of about 1e-6 (seeds are fixed,
so the outcome is deterministic). The draw itself is pinned to Philox4x32-10's published answers."""
from __future__ import annotations

import numpy as np
import pytest

from lserve import _C
from lserve_testing import FILTER_CASES, assert_distribution, assert_exact, make_logits

NUM_SAMPLES = 20000


@pytest.fixture(scope="module")
def cpu():
    return _C.Backend("cpu", 2)


# ---- arguments ----------------------------------------------------------------------------------


def csr(lists):
    indptr = np.zeros(len(lists) + 1, np.int32)
    indptr[1:] = np.cumsum([len(ids) for ids in lists])
    ids = np.concatenate([np.asarray(ids, np.int32) for ids in lists]) if lists else np.zeros(0, np.int32)
    return indptr, ids.astype(np.int32)


def sample_args(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0, offset=0, prompts=None,
                outputs=None, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, banned=None):
    """Keyword arguments of Backend.sample for logits (num_rows, vocab_size): scalars broadcast per row;
    prompts/outputs (lists per row) switch the penalties on, banned (lists per row) the bans."""
    num_rows, vocab_size = logits.shape

    def per_row(value, dtype):
        return np.ascontiguousarray(np.broadcast_to(np.asarray(value, dtype), (num_rows,)))

    args = dict(logits=np.array(logits, np.float32), temperature=per_row(temperature, np.float32),
                top_k=per_row(top_k, np.int32), top_p=per_row(top_p, np.float32), min_p=per_row(min_p, np.float32),
                seed=per_row(seed, np.int64), offset=per_row(offset, np.int64),
                output=np.full(num_rows, -7, np.int32))
    if prompts is not None or outputs is not None:
        prompts = prompts if prompts is not None else [[]] * num_rows
        outputs = outputs if outputs is not None else [[]] * num_rows
        args["history_indptr"], args["history_token_ids"] = csr([list(p) + list(o) for p, o in zip(prompts, outputs)])
        args["num_prompt_tokens"] = np.array([len(p) for p in prompts], np.int32)
        args["repetition_penalty"] = per_row(repetition_penalty, np.float32)
        args["presence_penalty"] = per_row(presence_penalty, np.float32)
        args["frequency_penalty"] = per_row(frequency_penalty, np.float32)
        args["workspace"] = np.zeros(_C.sample_workspace_bytes(num_rows, vocab_size), np.uint8)
    if banned is not None:
        args["banned_indptr"], args["banned_token_ids"] = csr(banned)
    return args


def run(backend, **args):
    backend.sample(**args)
    return args["output"]


# ---- numpy reference ------------------------------------------------------------------------------


def penalised(logits, prompt=(), output=(), repetition=1.0, presence=0.0, frequency=0.0, banned=()):
    """Bans, then the repetition penalty (prompt and output), then presence/frequency (output), in float32."""
    x = np.array(logits, np.float32)
    vocab_size = x.size
    for token_id in banned:
        if 0 <= token_id < vocab_size:
            x[token_id] = -np.inf
    seen = np.unique(np.asarray(list(prompt) + list(output), np.int64))
    rep = np.float32(repetition)
    x[seen] = np.where(x[seen] > 0, x[seen] / rep, x[seen] * rep)
    counts = np.bincount(np.asarray(output, np.int64), minlength=vocab_size)
    hit = counts > 0
    x[hit] = x[hit] - (np.float32(frequency) * counts[hit].astype(np.float32) + np.float32(presence))
    return x


def reference_probs(x, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """The contract's threshold rules in float64: top-k keeps p >= the k-th largest p, top-p keeps
    p >= the value where the descending cumulative mass reaches top_p, min-p keeps p >= min_p."""
    x = np.asarray(x, np.float64)
    vocab_size = x.size
    if temperature == 0:
        out = np.zeros(vocab_size)
        out[np.argmax(x)] = 1.0
        return out
    probs = np.exp((x - x.max()) / temperature)
    k_threshold = np.sort(probs)[::-1][top_k - 1] if 1 <= top_k < vocab_size else 0.0
    kept = probs[probs >= k_threshold]
    p_threshold = 0.0
    if top_p < 1:
        descending = np.sort(kept)[::-1]
        reached = np.cumsum(descending) >= np.float32(top_p) * kept.sum()
        p_threshold = descending[int(np.argmax(reached))]
    threshold = max(k_threshold, p_threshold, float(np.float32(min_p)))
    out = np.where(probs >= threshold, probs, 0.0)
    return out / out.sum()


def draws(backend, row, num_samples=NUM_SAMPLES, seed=0, **kwargs):
    """num_samples draws from one logits row: one batch row per (seed, offset) pair."""
    index = np.arange(num_samples)
    for key in ("prompts", "outputs", "banned"):
        if key in kwargs:
            kwargs[key] = kwargs[key] * num_samples
    args = sample_args(np.tile(row, (num_samples, 1)), seed=seed + index // 1000, offset=index % 1000, **kwargs)
    return run(backend, **args)


# ---- Philox4x32-10, written from the paper (Salmon et al., SC 2011) --------------------------------

MASK32 = 0xFFFFFFFF


def philox4x32_10(counter, key):
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        product0, product1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1 = (product1 >> 32) ^ c1 ^ k0, product1 & MASK32
        c2, c3 = (product0 >> 32) ^ c3 ^ k1, product0 & MASK32
        k0, k1 = (k0 + 0x9E3779B9) & MASK32, (k1 + 0xBB67AE85) & MASK32
    return c0, c1, c2, c3


def random_bits(seed: int, offset: int) -> int:
    """The op's 64 bits for (seed, offset): key = seed, counter = (offset, 0); word 0 high."""
    seed, offset = seed & (2**64 - 1), offset & (2**64 - 1)
    words = philox4x32_10((offset & MASK32, offset >> 32, 0, 0), (seed & MASK32, seed >> 32))
    return (words[0] << 32) | words[1]


def test_python_philox_known_answers():
    """Random123's kat_vectors for Philox4x32-10 pin the Python model the op is checked against."""
    assert philox4x32_10((0, 0, 0, 0), (0, 0)) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    assert philox4x32_10((MASK32,) * 4, (MASK32,) * 2) == (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)
    assert philox4x32_10((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0)) == (
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)


# ---- greedy -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab_size", [1, 19, 1023, 50257])
def test_greedy_is_argmax(cpu, vocab_size):
    seed = vocab_size
    logits = np.stack([make_logits(seed + r, vocab_size) for r in range(5)])
    if vocab_size > 3:
        logits[1, [2, vocab_size - 1]] = logits[1].max() + 1.0  # a tie: the lower id wins
        logits[2, :] = 0.0  # all equal: token 0
        logits[3, 0] = -np.inf
    output = run(cpu, **sample_args(logits, temperature=0.0, top_k=3, top_p=0.5, seed=seed))
    assert_exact(output, np.argmax(logits, axis=1).astype(np.int32), "greedy tokens", seed)


def test_greedy_with_penalties_and_bans(cpu):
    seed = 7
    vocab_size = 200
    logits = np.stack([make_logits(seed + r, vocab_size) for r in range(4)])
    best = np.argmax(logits, axis=1)
    second = np.argsort(logits, axis=1)[:, -2]
    prompts = [[3, 5, 5, 9], [best[1]], [], [int(best[3]), 1]]
    outputs = [[int(best[0]), 11, 11, 11], [], [int(best[2]), int(best[2])], [2, 2]]
    banned = [[], [int(second[1]), 5000, -3], [int(second[2])], [int(best[3])]]
    params = dict(repetition_penalty=[1.7, 2.5, 1.0, 0.5], presence_penalty=[0.5, 0.0, 1.5, 0.0],
                  frequency_penalty=[0.9, 0.0, 2.0, -1.0])
    output = run(cpu, **sample_args(logits, temperature=0.0, prompts=prompts, outputs=outputs, banned=banned,
                                    **params))
    expected = [int(np.argmax(penalised(logits[r], prompts[r], outputs[r], params["repetition_penalty"][r],
                                        params["presence_penalty"][r], params["frequency_penalty"][r], banned[r])))
                for r in range(4)]
    assert_exact(output, np.array(expected, np.int32), "greedy with penalties", seed)
    assert all(expected[r] != best[r] for r in range(4)), "each row's penalty or ban should move its argmax"


def test_banned_ids_outside_vocab_are_skipped(cpu):
    logits = np.array([[1.0, 2.0, 0.5]], np.float32)
    output = run(cpu, **sample_args(logits, temperature=0.0, banned=[[1, 3, 50000, -1]]))
    assert output[0] == 0


# ---- the filtered distribution ---------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(FILTER_CASES))
def test_filters_match_reference(cpu, case):
    seed = sorted(FILTER_CASES).index(case) + 100
    logits = make_logits(seed, 48)
    samples = draws(cpu, logits, seed=seed, **FILTER_CASES[case])
    assert_distribution(samples, reference_probs(logits, **FILTER_CASES[case]), case, seed)


PENALTY_CASES = {
    "repetition 1.5": dict(repetition_penalty=1.5),
    "repetition 0.7": dict(repetition_penalty=0.7),
    "presence 1.0": dict(presence_penalty=1.0),
    "frequency 0.6": dict(frequency_penalty=0.6),
    "presence -1 + frequency 0.4": dict(presence_penalty=-1.0, frequency_penalty=0.4),
    "all + temperature + top_p": dict(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=-0.5,
                                      temperature=0.7, top_p=0.9),
}


@pytest.mark.parametrize("case", sorted(PENALTY_CASES))
def test_penalties_and_bans_match_reference(cpu, case):
    seed = sorted(PENALTY_CASES).index(case) + 200
    logits = make_logits(seed, 30)
    logits[:10] = np.abs(logits[:10]) + 0.5  # penalised tokens on both sides of zero
    logits[10:15] = -np.abs(logits[10:15]) - 0.5
    logits[20] = 6.0  # banned: would dominate
    prompt, output, banned = [0, 1, 10, 11, 1], [2, 2, 2, 3, 12, 13, 13, 0], [20, 29]
    kwargs = dict(PENALTY_CASES[case])
    filters = {key: kwargs.pop(key) for key in ("temperature", "top_p") if key in kwargs}
    samples = draws(cpu, logits, seed=seed, prompts=[prompt], outputs=[output], banned=[banned], **kwargs, **filters)
    x = penalised(logits, prompt, output, kwargs.get("repetition_penalty", 1.0), kwargs.get("presence_penalty", 0.0),
                  kwargs.get("frequency_penalty", 0.0), banned)
    assert_distribution(samples, reference_probs(x, **filters), case, seed)


def test_top_k_keeps_every_tie_at_the_threshold(cpu):
    """The threshold rule: unlike sample_token (lowest ids first), all tokens tied at the k-th value stay."""
    logits = np.array([0.0, 2.0, 1.0, 2.0, 2.0, 2.0, -1.0], np.float32)
    samples = draws(cpu, logits, num_samples=4000, seed=3, top_k=3)
    assert set(samples.tolist()) == {1, 3, 4, 5}
    assert_distribution(samples, reference_probs(logits, top_k=3), "top_k ties", 3)


def test_top_p_keeps_every_tie_at_the_threshold(cpu):
    logits = np.array([5.0, 5.0, 5.0, 5.0, 4.0] + [-100.0] * 5, np.float32)
    samples = draws(cpu, logits, num_samples=4000, seed=4, top_p=0.3)  # one of four equals reaches 0.3
    assert set(samples.tolist()) == {0, 1, 2, 3}
    assert_distribution(samples, reference_probs(logits, top_p=0.3), "top_p ties", 4)


def test_infinite_logits(cpu):
    logits = np.array([[-np.inf, 1.0, -np.inf, 0.0], [np.inf, 3.0, np.inf, -np.inf]], np.float32)
    samples = run(cpu, **sample_args(np.repeat(logits, 500, axis=0), seed=np.arange(1000), offset=0))
    assert set(samples[:500].tolist()) == {1, 3}
    assert set(samples[500:].tolist()) == {0, 2}, "+inf logits share all the mass"


def test_large_vocab_filters_never_leak(cpu):
    seed = 11
    vocab_size = 32000
    logits = make_logits(seed, vocab_size, scale=3.0)
    for kwargs in (dict(top_p=0.5), dict(top_p=0.95, temperature=0.7), dict(top_k=40), dict(min_p=0.02),
                   dict(top_k=2000, top_p=0.3, min_p=0.01)):
        expected = reference_probs(logits, **kwargs)
        samples = draws(cpu, logits, num_samples=300, seed=seed, **kwargs)
        assert (expected[samples] > 0).all(), f"{kwargs}: drew a token outside the kept set (seed={seed})"
        top = np.argsort(-expected)[:5]
        assert abs(np.isin(samples, top).mean() - expected[top].sum()) < 0.1, kwargs


# ---- reproducibility and the draw -----------------------------------------------------------------


def test_same_seed_and_offset_same_token(cpu):
    logits = make_logits(400, 1000)
    rows = np.tile(logits, (6, 1))
    seeds, offsets = [5, 5, 5, 6, 5, 5], [0, 0, 1, 0, 0, 0]
    first = run(cpu, **sample_args(rows, temperature=0.9, seed=seeds, offset=offsets))
    again = run(cpu, **sample_args(rows[::-1].copy(), temperature=0.9, seed=seeds[::-1], offset=offsets[::-1]))
    assert_exact(again[::-1], first, "same (seed, offset), other batch positions", 5)
    assert first[0] == first[1] == first[4] == first[5]
    # Streams: 300 offsets of one seed, and 300 seeds at one offset, differ from each other.
    uniform = np.zeros((300, 1024), np.float32)
    by_offset = run(cpu, **sample_args(uniform, seed=5, offset=np.arange(300)))
    by_seed = run(cpu, **sample_args(uniform, seed=np.arange(300), offset=0))
    assert len(set(by_offset.tolist())) > 200 and len(set(by_seed.tolist())) > 200
    assert (by_offset != by_seed).mean() > 0.9


@pytest.mark.parametrize("vocab_log2", [10, 20])
def test_draw_is_pinned_to_philox(cpu, vocab_log2):
    """With 2^k equally likely tokens the token is the top k of the 64 random bits; seed 0, offset 0 is
    Philox's all-zero known answer (0x6627e8d5 high)."""
    pairs = [(0, 0), (1, 0), (0, 1), (-1, 2**40 + 7), (2**63 - 1, -5), (123456789, 987654321)]
    num_rows = len(pairs) if vocab_log2 <= 16 else 2
    pairs = pairs[:num_rows]
    logits = np.zeros((num_rows, 2**vocab_log2), np.float32)
    output = run(cpu, **sample_args(logits, seed=[s for s, _ in pairs], offset=[o for _, o in pairs]))
    expected = [random_bits(s, o) >> (64 - vocab_log2) for s, o in pairs]
    assert_exact(output, np.array(expected, np.int32), f"Philox draws, vocab 2^{vocab_log2}")
    assert expected[0] == 0x6627E8D5 >> (32 - vocab_log2)


def test_draw_walks_kept_tokens_in_id_order(cpu):
    """Kept weights laid end to end in token order: the token is where floor(r * S / 2^64) falls."""
    logits = np.array([[0.0, -np.inf, np.log(0.5), np.log(0.25), np.log(0.125)]], np.float32)  # p = 1, 0, 1/2, ...
    cumulative = np.cumsum([1.0, 0.0, 0.5, 0.25, 0.125]) / 1.875
    for seed in range(40):
        u = random_bits(seed, 3) / 2.0**64
        expected = int(np.searchsorted(cumulative, u, side="right"))
        assert run(cpu, **sample_args(logits, seed=seed, offset=3))[0] == expected, seed


# ---- errors -----------------------------------------------------------------------------------------


def test_invalid_parameters_raise(cpu):
    logits = np.zeros((3, 8), np.float32)
    for field, value, message in [("temperature", -0.5, "temperature"), ("temperature", np.nan, "temperature"),
                                  ("top_p", 0.0, r"top_p\[1\] = 0 must be in \(0, 1\]"), ("top_p", 1.5, "top_p"),
                                  ("min_p", -0.1, "min_p"), ("min_p", 2.0, "min_p"),
                                  ("repetition_penalty", 0.0, "repetition_penalty"),
                                  ("presence_penalty", np.inf, "presence_penalty"),
                                  ("frequency_penalty", np.nan, "frequency_penalty")]:
        args = sample_args(logits, prompts=[[1]] * 3)
        args[field] = args[field].copy()
        args[field][1] = value
        with pytest.raises(ValueError, match=message):
            cpu.sample(**args)


def test_bad_shapes_and_dtypes_raise(cpu):
    logits = np.zeros((3, 8), np.float32)
    cases = [
        ("logits", np.zeros((3, 8), np.float16), "'logits' must be float32, got float16"),
        ("logits", np.zeros(8, np.float32), "'logits' must have 2 dims"),
        ("temperature", np.ones(2, np.float32), "'temperature' dim 0 must be 3"),
        ("top_k", np.zeros(3, np.int64), "'top_k' must be int32"),
        ("seed", np.zeros(3, np.int32), "'seed' must be int64"),
        ("offset", np.zeros(3, np.float32), "'offset' must be int64"),
        ("output", np.zeros(4, np.int32), "'output' dim 0 must be 3"),
        ("history_indptr", np.zeros(3, np.int32), "'history_indptr' dim 0 must be 4"),
        ("history_token_ids", np.zeros(2, np.int64), "'history_token_ids' must be int32"),
        ("workspace", np.zeros(8, np.uint8), "'workspace' holds 8 bytes, needs 96"),
        ("workspace", np.zeros(96, np.int32), "'workspace' must be uint8"),
    ]
    for field, value, message in cases:
        args = sample_args(logits, prompts=[[1]] * 3)
        args[field] = value
        with pytest.raises(ValueError, match=message):
            cpu.sample(**args)
    args = sample_args(logits, prompts=[[1]] * 3)
    del args["workspace"]
    with pytest.raises(ValueError, match="go together"):
        cpu.sample(**args)
    args = sample_args(logits, banned=[[1]] * 3)
    del args["banned_token_ids"]
    with pytest.raises(ValueError, match="go together"):
        cpu.sample(**args)
    with pytest.raises(ValueError, match="vocab_size"):
        cpu.sample(**sample_args(np.zeros((2, 0), np.float32)))


def test_bad_data_raises(cpu):
    logits = np.zeros((3, 8), np.float32)
    args = sample_args(logits, prompts=[[1], [2, 8], [3]], repetition_penalty=1.2)
    with pytest.raises(ValueError, match=r"history_token_ids\[2\] = 8 \(row 1\) outside the vocabulary \[0, 8\)"):
        cpu.sample(**args)
    args = sample_args(logits, outputs=[[1], [2], [-1]], frequency_penalty=0.5)
    with pytest.raises(ValueError, match=r"history_token_ids\[2\] = -1"):
        cpu.sample(**args)
    args = sample_args(logits, prompts=[[1], [2], [3]], repetition_penalty=1.2)
    args["history_indptr"] = np.array([0, 2, 1, 3], np.int32)
    with pytest.raises(ValueError, match=r"history_indptr\[1:3\] = \[2, 1\]"):
        cpu.sample(**args)
    args = sample_args(logits, prompts=[[1], [2], [3]])
    args["num_prompt_tokens"] = np.array([1, 2, 1], np.int32)
    with pytest.raises(ValueError, match=r"num_prompt_tokens\[1\] = 2 outside \[0, 1\]"):
        cpu.sample(**args)
    args = sample_args(logits, banned=[[], [], [0]])
    args["banned_indptr"] = np.array([0, 0, 0, 2], np.int32)
    with pytest.raises(ValueError, match=r"banned_indptr\[2:4\]"):
        cpu.sample(**args)
    args = sample_args(logits, banned=[[], list(range(8)), []])
    with pytest.raises(ValueError, match="row 1: every token is masked"):
        cpu.sample(**args)
    bad = logits.copy()
    bad[2, 5] = np.nan
    with pytest.raises(ValueError, match=r"logits\[2, 5\] is NaN"):
        cpu.sample(**sample_args(bad, temperature=0.0))


def test_invalid_rows_get_minus_one_without_raising(cpu):
    """raise_invalid_rows=False (the engine's setting): bad rows get -1, as on CUDA; the other rows get
    the token they get alone (a row's place in the batch is no input)."""
    seed = 31
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((5, 8)).astype(np.float32)
    logits[1, 3] = np.nan
    args = sample_args(logits, seed=[1, 2, 3, 4, 5], offset=7, banned=[[], [], list(range(8)), [], []])
    args["raise_invalid_rows"] = False
    output = run(cpu, **args)
    assert output[1] == -1 and output[2] == -1, output
    for row in (0, 3, 4):
        alone = run(cpu, **sample_args(logits[row:row + 1], seed=row + 1, offset=7))
        assert output[row] == alone[0], f"row {row} (seed={seed})"
    with pytest.raises(ValueError, match=r"logits\[1, 3\] is NaN"):
        cpu.sample(**sample_args(logits, seed=[1, 2, 3, 4, 5], offset=7))


def test_history_ids_unused_without_penalties(cpu):
    """Rows whose penalties are off never read their history: ids there are not checked."""
    logits = np.array([[0.0, 3.0, 1.0]], np.float32)
    output = run(cpu, **sample_args(logits, temperature=0.0, prompts=[[99]], outputs=[[-4]]))
    assert output[0] == 1


def test_workspace_size():
    assert _C.sample_workspace_bytes(3, 128256) == 3 * 128256 * 4
