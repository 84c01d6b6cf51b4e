"""The page selector (cpp/include/lserve/kv/page_selector.h) against a Python model of its policy.

Random event sequences (admission with and without a prefill ring, chunked prefill, decode steps past
the budget, preemption and resume, finished sequences whose slot and ring are recycled) drive the C++
selector and the model side by side: admission answers, select modes, slots and bases must agree
exactly. Every planned cache slot is also checked for what the attention needs: inside the
sequence's own pages, distinct for every key a chunk can see, and the decode ring (filled through
the mirror while prefilling through a ring) complete when prefill ends.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

_C = pytest.importorskip("lserve._C")

DENSE, FRESH, REUSE = 0, 1, 2


def _core_config(**overrides):
    core = _C.SparsityConfig()
    core.enabled = True
    settings = dict(prefill_sink_tokens=8, prefill_local_tokens=40, decode_sink_tokens=8, decode_local_tokens=24,
                    physical_page_size=16, logical_page_size=4, decode_token_budget=64, selection_reuse_interval=3)
    settings.update(overrides)
    for name, value in settings.items():
        setattr(core, name, value)
    return core


class PolicyModel:
    """What the selector promises, written from its header comment."""

    def __init__(self, cfg, page_size, num_slots, num_rings, slot_tokens):
        self.cfg, self.page_size = cfg, page_size
        self.free_slots = list(reversed(range(num_slots)))
        self.free_rings = list(reversed(range(num_rings)))
        self.slot_tokens = slot_tokens
        self.num_select = max(1, cfg.decode_token_budget // page_size)
        self.seqs, self.planned = {}, []

    def acquire(self, seq, prefill_tokens):
        if seq in self.seqs:
            return True
        needs_ring = max(prefill_tokens, self.cfg.dense_below_tokens) > self.slot_tokens
        if not self.free_slots or (needs_ring and not self.free_rings):
            return False
        self.seqs[seq] = dict(slot=self.free_slots.pop(), ring=self.free_rings.pop() if needs_ring else -1,
                              decoding=False, steps=0, base=0, ends=False, next=0)
        return True

    def release(self, seq):
        st = self.seqs.pop(seq, None)
        if st is None:
            return
        self.free_slots.append(st["slot"])
        if st["ring"] >= 0:
            self.free_rings.append(st["ring"])

    def plan(self, seq, start, n, num_pages, samples):
        st = self.seqs[seq]
        mode, slot, base = DENSE, -1, num_pages
        if not st["decoding"]:
            st["steps"] = 0
        elif num_pages > self.num_select:
            slot = st["slot"]
            if st["steps"] == 0 or st["steps"] >= self.cfg.selection_reuse_interval:
                st["steps"], st["base"], mode = 1, num_pages, FRESH
            else:
                st["steps"] += 1
                mode, base = REUSE, st["base"]
        st["ends"] = not st["decoding"] and samples
        st["next"] = start + n
        self.planned.append(seq)
        return mode, slot, base

    def commit(self):
        for seq in self.planned:
            st = self.seqs.get(seq)
            if st is None:
                continue
            if st["ends"] and st["next"] + 1 >= self.cfg.dense_below_tokens:
                st["decoding"] = True
                if st["ring"] >= 0:
                    self.free_rings.append(st["ring"])
                    st["ring"] = -1
            st["ends"] = False
        self.planned = []


class Sequence:
    def __init__(self, seq_id, prompt_len, max_new):
        self.id, self.prompt_len, self.max_new = seq_id, prompt_len, max_new
        self.computed, self.generated = 0, 0

    @property
    def num_tokens(self):
        return self.prompt_len + self.generated


def _check_addresses(sel, plan, seq_state, start, n, ps, window_keys):
    """Slots of this chunk's tokens: in the sequence's own pages; every key the chunk can see on a
    distinct slot; mirrors only while prefilling through a ring, inside the decode ring."""
    sink_base, num_sink, ring_base, num_ring = plan["stream_ring"]
    slot_pages = sel.slot_pages
    own_slot = range(sink_base * ps, (sink_base + slot_pages) * ps)
    decode_ring = range((sink_base + num_sink) * ps, (sink_base + slot_pages) * ps)
    ring_pages = range(ring_base * ps, (ring_base + num_ring) * ps)
    for i, slot in enumerate(plan["stream_slot_mapping"]):
        position = start + i
        if position < num_sink * ps:
            assert slot in own_slot and slot // ps == sink_base + position // ps
        else:
            assert slot in ring_pages
        mirror = plan["stream_mirror_mapping"][i]
        if mirror >= 0:
            assert ring_base != sink_base + num_sink, "a mirror without a prefill ring"
            assert mirror in decode_ring
            assert position >= num_sink * ps
    mirrors = [m for m in plan["stream_mirror_mapping"] if m >= 0]
    assert len(mirrors) == len(set(mirrors)), "two tokens of one chunk mirror onto one slot"
    # Keys visible to the chunk: its own tokens' slots are recorded in window_keys (position -> slot);
    # sink keys and the window of the chunk's first query must not have been overwritten.
    for i, slot in enumerate(plan["stream_slot_mapping"]):
        window_keys[start + i] = slot
    first, local = start, plan["window_local"]
    visible = [p for p in window_keys if p < plan["window_sink"] or p > first - local]
    slots = [window_keys[p] for p in visible]
    assert len(slots) == len(set(slots)), f"keys {visible} of one chunk share slots"


@pytest.mark.parametrize("seed", range(6))
def test_selector_matches_policy_model(seed):
    rng = np.random.default_rng(seed)
    ps = 16
    cfg = _core_config(selection_reuse_interval=int(rng.integers(1, 5)),
                       dense_below_tokens=int(rng.choice([0, 0, 100])))
    max_model_len = 400
    sel = _C.PageSelector(cfg, ps, 4, 48, max_model_len)
    dense_bytes, stream_bytes = 1000, 700
    taken = sel.size_memory(4 * (sel.slot_pages * ps * stream_bytes + dense_bytes * 208) + 10 ** 6, stream_bytes,
                            dense_bytes)
    assert sel.num_slots == 4 and sel.num_prefill_rings == 1
    assert taken == sel.num_slots * sel.slot_pages * ps * stream_bytes + sel.prefill_ring_pages * ps * stream_bytes
    model = PolicyModel(cfg, ps, sel.num_slots, sel.num_prefill_rings, sel.decode_slot_tokens)

    running, waiting, next_id = [], [], 0
    windows = {}  # seq -> {position: slot} of the streaming keys written so far (this residency)
    decode_ring_at_prefill_end = {}
    for step in range(160):
        if rng.random() < 0.35 and len(waiting) < 4:
            waiting.append(Sequence(next_id, int(rng.integers(1, 220)), int(rng.integers(1, 40))))
            next_id += 1
        for seq in list(waiting):  # admission in order, stops at the first refusal
            ok = sel.acquire(seq.id, seq.num_tokens)
            assert ok == model.acquire(seq.id, seq.num_tokens), f"step {step}: acquire({seq.id}) disagrees"
            if not ok:
                break
            waiting.remove(seq)
            running.append(seq)
            windows[seq.id] = {}
        budget = 48
        chunks = []
        for seq in running:
            remaining = seq.num_tokens - seq.computed
            n = min(remaining, budget)
            if n <= 0:
                continue
            budget -= n
            chunks.append((seq, seq.computed, n, seq.computed + n == seq.num_tokens))
        for seq, start, n, samples in chunks:
            num_pages = math.ceil((start + n) / ps)
            plan = sel.plan_chunk(seq.id, start, n, num_pages, samples)
            want = model.plan(seq.id, start, n, num_pages, samples)
            got = (plan["select_mode"], plan["select_slot"], plan["select_base"])
            assert got == want, f"step {step}, sequence {seq.id}: (mode, slot, base) {got} != {want}"
            assert plan["select_slot"] == (sel.slot_of(seq.id) if got[0] != DENSE else -1)
            _check_addresses(sel, plan, model.seqs[seq.id], start, n, ps, windows[seq.id])
        sel.commit()
        model.commit()
        for seq, start, n, samples in chunks:
            seq.computed = start + n
            if samples:
                seq.generated += 1
                if model.seqs[seq.id]["decoding"] and seq.id not in decode_ring_at_prefill_end:
                    decode_ring_at_prefill_end[seq.id] = seq.computed
        assert sel.num_free_slots == len(model.free_slots)
        assert sel.num_free_prefill_rings == len(model.free_rings)
        # Finish, or preempt (release and recompute from scratch), now and then.
        for seq in list(running):
            if seq.generated >= seq.max_new:
                running.remove(seq)
                sel.release(seq.id)
                model.release(seq.id)
            elif rng.random() < 0.03:
                running.remove(seq)
                sel.release(seq.id)
                model.release(seq.id)
                seq.computed = 0
                waiting.insert(0, seq)
    assert next_id > 5


def test_decode_ring_holds_the_window_after_a_ring_prefill():
    """While prefilling through a prefill ring, each chunk mirrors its last decode-ring worth of
    tokens into the decode ring: at the first decode step every key of the decode window is there."""
    ps = 16
    cfg = _core_config()
    sel = _C.PageSelector(cfg, ps, 2, 32, 512)
    sel.size_memory(10 ** 9, 10, 10)
    prompt = 203
    assert sel.acquire(7, prompt) and sel.num_free_prefill_rings == 0
    decode_ring = {}
    start = 0
    while start < prompt:
        n = min(32 if start else 5, prompt - start)  # an odd first chunk, then full ones
        plan = sel.plan_chunk(7, start, n, math.ceil((start + n) / ps), start + n == prompt)
        for i, mirror in enumerate(plan["stream_mirror_mapping"]):
            if mirror >= 0:
                decode_ring[mirror] = start + i  # later writes win, as in the cache
        sink_slots = plan["stream_slot_mapping"][:max(0, min(n, cfg.prefill_sink_tokens - start))]
        for i, slot in enumerate(sink_slots):
            decode_ring[slot] = start + i
        sel.commit()
        start += n
    assert sel.num_free_prefill_rings == 1, "the prefill ring was not handed back"
    plan = sel.plan_chunk(7, prompt, 1, math.ceil((prompt + 1) / ps), True)
    assert plan["stream_mirror_mapping"] == [-1] and plan["window_local"] == cfg.decode_local_tokens
    sink_base, num_sink, ring_base, num_ring = plan["stream_ring"]
    assert (ring_base, num_ring) == (sink_base + num_sink, sel.decode_ring_pages)
    for position in list(range(cfg.decode_sink_tokens)) + list(range(prompt - cfg.decode_local_tokens + 1, prompt)):
        lp = position // ps
        page = sink_base + lp if lp < num_sink else ring_base + (lp - num_sink) % num_ring
        slot = page * ps + position % ps
        assert decode_ring.get(slot) == position, f"position {position} missing from the decode ring"


def test_memory_tiers_and_split():
    ps = 64
    cfg = _core_config(prefill_sink_tokens=128, decode_sink_tokens=128, prefill_local_tokens=8192,
                       decode_local_tokens=256, physical_page_size=64, logical_page_size=16,
                       decode_token_budget=1024)
    sel = _C.PageSelector(cfg, ps, 256, 2048, 8192)
    # Decode slot: 2 sink pages + ceil(256 / 64) + 1 ring pages, whatever the prefill window.
    assert (sel.num_sink_pages, sel.decode_ring_pages, sel.slot_pages) == (2, 5, 7)
    # Prefill ring: the window plus a chunk, capped by the longest sequence past its sinks.
    assert sel.prefill_ring_pages == 8192 // 64 - 2
    stream, dense = 45 * 512, 24480  # SmolLM2 with half its heads streaming, float32
    taken = sel.size_memory(1 << 30, stream, dense)
    per_seq = 7 * 64 * stream + dense * 4096
    assert sel.num_slots == ((1 << 30) - sel.prefill_ring_pages * 64 * stream) // per_seq
    assert taken == sel.num_slots * 7 * 64 * stream + sel.prefill_ring_pages * 64 * stream
    cfg.prefill_local_tokens = 1024
    narrow = _C.PageSelector(cfg, ps, 256, 2048, 8192)
    assert narrow.slot_pages == 7
    assert narrow.prefill_ring_pages == math.ceil((1024 + 2048 - 1) / 64) + 1
    # Plenty of memory: a slot for every sequence the engine may run.
    roomy = _C.PageSelector(cfg, ps, 16, 2048, 8192)
    roomy.size_memory(1 << 40, stream, dense)
    assert roomy.num_slots == 16
    # A model short enough for the decode slot needs no prefill ring.
    short = _C.PageSelector(cfg, ps, 4, 2048, 448)
    short.size_memory(1 << 30, stream, dense)
    assert short.num_prefill_rings == 0
