"""Fuzzing GGUF loading (tests/gguf_fuzz.py): seeded mutations of a tiny llama GGUF, each loaded
through lserve.Engine in a worker subprocess under a 4 GiB address-space limit. Every outcome
must be a successful load or a clean error (ValueError / OSError, not an allocation failure);
never a signal, a hang, MemoryError, RecursionError or another exception type.

The default suite runs 3,000 mutations (about 15 s on 2 cores); the slow test 30,000. The same
harness runs as a script: python3 tests/gguf_fuzz.py --num-mutations 30000 (counts in
docs/ROBUSTNESS.md).
"""
from __future__ import annotations

import json
import random

import pytest

from gguf_fuzz import OUTCOMES, classify, fuzz, map_header, mutate, run_files, write_base_files


def _assert_clean(report: dict) -> None:
    failures = report["failures"]
    shown = "\n".join(json.dumps(failure) for failure in failures[:10])
    assert not failures, (f"seed {report['seed']}: {len(failures)} of {report['num_mutations']} mutations ended "
                          f"badly ({report['counts']}):\n{shown}")
    counts = report["counts"]
    assert counts["loaded"] + counts["clean_error"] == report["num_mutations"]
    # the mutations exercise both outcomes: a harness that only ever fails (or loads) tests nothing
    assert counts["loaded"] >= report["num_mutations"] // 50 and counts["clean_error"] >= report["num_mutations"] // 2


def test_fuzz_gguf_loading(tmp_path):
    _assert_clean(fuzz(3000, seed=20261205, workdir=tmp_path, num_workers=2))


@pytest.mark.slow
def test_fuzz_gguf_loading_long(tmp_path):
    _assert_clean(fuzz(30000, seed=1, workdir=tmp_path, num_workers=2))


def test_mutations_are_seeded(tmp_path):
    bases = write_base_files(tmp_path)
    blob = bases[0].read_bytes()
    header = map_header(blob)
    first = [mutate(blob, header, random.Random(7)) for _ in range(3)]
    assert first[0] == first[1] == first[2]
    many = {mutate(blob, header, random.Random(seed))[0] for seed in range(50)}
    assert len(many) > 40


def test_harness_detects_crashes_hangs_and_unclean_errors(tmp_path, monkeypatch):
    """The harness itself: a file that kills the worker, one that hangs and one that raises
    MemoryError are each reported against that file, and the files after them still load."""
    good = write_base_files(tmp_path)[0]
    jobs = [str(good),
            (str(good), {"__test_action__": "crash"}),
            (str(good), {"__test_action__": "memory_error"}),
            (str(good), {"__test_action__": "hang"}),
            str(good)]
    monkeypatch.setenv("LSERVE_GGUF_FUZZ_SELF_TEST", "1")
    results = run_files(jobs, file_timeout_s=5.0)
    assert [result["outcome"] for result in results] == ["loaded", "crash", "unclean_error", "hang", "loaded"]
    assert results[1]["signal"] == "SIGSEGV" and results[2]["type"] == "MemoryError"
    assert set(OUTCOMES) >= {result["outcome"] for result in results}
    assert classify({"status": "error", "type": "Error", "message": "CpuBackend: failed to allocate 8 bytes"}) == \
        "unclean_error"
    assert classify({"status": "error", "type": "ValueError", "message": "x.gguf: bad"}) == "clean_error"
    assert classify({"status": "error", "type": "TypeError", "message": "x.gguf: bad"}) == "unclean_error"
