"""Fuzzing GGUF loading: seeded mutations of a tiny llama GGUF, each loaded the way a user loads a
model (lserve.Engine on the CPU, then a short generation and a chat-template render) in a worker
subprocess under an address-space limit, so a crash, a hang or an over-allocation is caught.

Mutations (mutate()): truncations, byte flips in the header (metadata and tensor infos), bytes
inserted into or deleted from the header, chosen header fields (counts, string and array lengths,
value types, integer and float values, tensor dims, types and offsets) overwritten with boundary
values, tensors made to overlap, and byte flips in tensor data. Every outcome must be a load or a clean error: ValueError / OSError (lserve's
_C.Error is a ValueError) whose message is not an allocation failure; never a signal, a hang,
MemoryError, RecursionError or another exception type.

Script (PYTHONPATH=python:tests):
    python3 tests/gguf_fuzz.py --num-mutations 30000 [--seed 1] [--workers 2] [--json out.json]
tests/model/test_gguf_fuzz.py runs it in the default suite (3,000 mutations) and marked slow
(30,000); docs/ROBUSTNESS.md keeps the counts.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import platform
import random
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

from gguf_testing import Field, HeaderMap, map_header, write_tiny_llama

ADDRESS_SPACE_LIMIT = 4 << 30  # bytes; an over-allocation fails instead of swapping the machine
FILE_TIMEOUT_S = 30.0  # one load taking longer counts as a hang
CLEAN_TYPES = ("ValueError", "OSError", "Error", "FileNotFoundError", "PermissionError")
# Messages that are allocation failures or internal faults however they are typed.
UNCLEAN_MESSAGES = ("bad_alloc", "failed to allocate", "Assertion", "RecursionError", "MemoryError",
                    "std::length_error", "vector::", "basic_string")

OUTCOMES = ("loaded", "clean_error", "unclean_error", "crash", "hang")


# ---- the base files ---------------------------------------------------------------------------

def write_base_files(directory: pathlib.Path) -> List[pathlib.Path]:
    """Two tiny llamas with a gpt2 tokenizer: float32 and untied; Q8_0, tied, with q/k/v biases."""
    from gguf import GGMLQuantizationType

    paths = [directory / "base_f32.gguf", directory / "base_q8_0.gguf"]
    write_tiny_llama(paths[0])
    write_tiny_llama(paths[1], qtype=GGMLQuantizationType.Q8_0, tied=True, bias=True, num_layers=1)
    return paths


# ---- mutations --------------------------------------------------------------------------------

_BOUNDARY_INTS = (0, 1, 2, 3, 7, 31, 32, 33, 255, 256, 2**15, 2**16 - 1, 2**16, 2**20, 10**6, 2**24, 2**30,
                  2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**53, 2**62, 2**63 - 1, 2**63, 2**64 - 1)
_BOUNDARY_FLOATS = (0.0, -0.0, -1.0, 1.0, 1e-45, 1e-38, 1e-6, 0.5, 2.0, 1e10, 3.4e38, float("inf"), float("-inf"),
                    float("nan"))
_SMALL_ENUMS = {"value_type": 14, "array_type": 14, "ggml_type": 42, "n_dims": 6}  # kind -> values to try


def _boundary_value(rng: random.Random, field: Field, current: int, file_size: int) -> int:
    if field.kind in _SMALL_ENUMS and rng.random() < 0.5:
        return rng.randrange(_SMALL_ENUMS[field.kind])
    choices = list(_BOUNDARY_INTS) + [current + 1, current - 1, current * 2, current // 2, current * 1000,
                                      file_size, file_size + 1, rng.getrandbits(8 * field.size)]
    return rng.choice(choices) % (1 << (8 * field.size))


MUTATION_CLASSES = ("truncate", "header bytes", "insert/delete", "field", "overlap", "data bytes")


def mutate(blob: bytes, header: HeaderMap, rng: random.Random) -> tuple[bytes, str]:
    """One seeded mutation of `blob`; returns (mutated bytes, "<class>: <details>"), the class one of
    MUTATION_CLASSES."""
    out = bytearray(blob)
    roll = rng.random()
    if roll < 0.12:  # truncation, mostly inside the header
        in_header = rng.random() < 0.6
        cut = rng.randrange(0, header.data_offset + 1) if in_header else rng.randrange(header.data_offset, len(blob))
        return bytes(out[:cut]), f"truncate: at {cut}"
    if roll < 0.37:  # random bytes in the header
        positions = [rng.randrange(8, header.header_end) for _ in range(rng.randint(1, 4))]
        for position in positions:
            out[position] = out[position] ^ (1 << rng.randrange(8)) if rng.random() < 0.5 else rng.randrange(256)
        return bytes(out), f"header bytes: {positions}"
    if roll < 0.42:  # bytes inserted into or deleted from the header: every later field shifts
        position = rng.randrange(8, header.header_end)
        count = rng.randint(1, 9)
        if rng.random() < 0.5:
            out[position:position] = bytes(rng.randrange(256) for _ in range(count))
            return bytes(out), f"insert/delete: {count} bytes inserted at {position}"
        del out[position:position + count]
        return bytes(out), f"insert/delete: {count} bytes deleted at {position}"
    if roll < 0.85:  # one field set to a boundary value
        field = rng.choice(header.fields)
        if field.kind == "float":
            value = rng.choice(_BOUNDARY_FLOATS)
            struct.pack_into("<f" if field.size == 4 else "<d", out, field.offset, value)
        else:
            current = int.from_bytes(blob[field.offset:field.offset + field.size], "little")
            value = _boundary_value(rng, field, current, len(blob))
            out[field.offset:field.offset + field.size] = value.to_bytes(field.size, "little")
        return bytes(out), f"field: {field.kind} of {field.label} at {field.offset} = {value!r}"
    if roll < 0.92:  # one tensor's data moved onto another's
        offsets = [field for field in header.fields if field.kind == "tensor_offset"]
        target, source = rng.sample(range(len(offsets)), 2)
        value = header.tensor_offsets[source] + rng.choice((0, 32, 64))
        struct.pack_into("<Q", out, offsets[target].offset, value)
        return bytes(out), f"overlap: tensor_offset of {offsets[target].label} = {value}"
    positions = [rng.randrange(header.data_offset, len(blob)) for _ in range(rng.randint(1, 16))]
    for position in positions:
        out[position] = rng.randrange(256)
    return bytes(out), f"data bytes: {positions[:4]}"


# ---- the worker: loads files, reports one JSON line each ----------------------------------------

ENGINE_ARGS = dict(max_num_seqs=2, max_num_batched_tokens=64, num_threads=1, show_progress=False)


def load_one(path: str, engine_args: Optional[dict] = None) -> None:
    """What a user does with a model file: build the engine, generate, tokenize, render the chat.
    engine_args: lserve.Engine keyword arguments over ENGINE_ARGS."""
    import lserve

    engine_args = dict(engine_args or {})
    action = engine_args.pop("__test_action__", None)
    if action is not None and os.environ.get("LSERVE_GGUF_FUZZ_SELF_TEST") == "1":  # the harness's own test
        if action == "crash":
            os.kill(os.getpid(), signal.SIGSEGV)
        if action == "memory_error":
            raise MemoryError("self-test")
        if action == "hang":
            time.sleep(3600)
    engine = lserve.Engine(path, **{**ENGINE_ARGS, **engine_args})
    engine.generate([[5, 6, 7]], lserve.SamplingParams(max_tokens=2, temperature=0), use_tqdm=False)
    if engine.tokenizer is not None:
        engine.tokenizer.decode(engine.tokenizer.encode("abc 12"))
        if engine.tokenizer.chat_template is not None:
            engine.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


def run_worker(jobs: Sequence, start: int) -> None:
    """Loads jobs[start:] (each a path, or [path, engine_args]); prints a JSON line when each starts
    and one with its outcome."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))
    import lserve  # noqa: F401  (imported once, before the first file)

    for idx in range(start, len(jobs)):
        print(json.dumps({"idx": idx, "status": "start"}), flush=True)
        path, engine_args = (jobs[idx], None) if isinstance(jobs[idx], str) else jobs[idx]
        try:
            load_one(path, engine_args)
            report = {"idx": idx, "status": "loaded"}
        except BaseException as error:  # noqa: B036  (every outcome is reported, MemoryError included)
            report = {"idx": idx, "status": "error", "type": type(error).__name__, "message": str(error)[:2000]}
        print(json.dumps(report), flush=True)


# ---- the parent: runs workers, restarts them after a crash or hang ------------------------------

def classify(report: dict) -> str:
    if report["status"] == "loaded":
        return "loaded"
    message = report["message"]
    if report["type"] in CLEAN_TYPES and message and not any(text in message for text in UNCLEAN_MESSAGES):
        return "clean_error"
    return "unclean_error"


def _worker_env() -> Dict[str, str]:
    import lserve

    env = dict(os.environ)
    python_dir = str(pathlib.Path(lserve.__file__).resolve().parent.parent)
    tests_dir = str(pathlib.Path(__file__).resolve().parent)
    env["PYTHONPATH"] = os.pathsep.join([python_dir, tests_dir] + [p for p in env.get("PYTHONPATH", "").split(
        os.pathsep) if p])
    env["OMP_NUM_THREADS"] = "1"
    env["TQDM_DISABLE"] = "1"
    return env


def run_files(paths: Sequence, file_timeout_s: float = FILE_TIMEOUT_S) -> List[dict]:
    """Loads every file (a path, or (path, lserve.Engine keyword arguments)) with load_one() in worker
    subprocesses under ADDRESS_SPACE_LIMIT, one worker at a time, restarted after a crash or a hang;
    returns one result per file: {"outcome": one of OUTCOMES, "type", "message", "signal"} (the last
    three when they apply)."""
    results: List[Optional[dict]] = [None] * len(paths)
    list_file = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
    json.dump(list(paths), list_file)
    list_file.close()
    env = _worker_env()
    start = 0
    try:
        while start < len(paths):
            command = [sys.executable, os.path.abspath(__file__), "--worker", list_file.name, "--start", str(start)]
            worker = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
            current = None
            buffered = b""
            deadline = time.monotonic() + file_timeout_s + 30.0  # the first file pays for the imports
            finished = False
            while not finished:
                remaining = deadline - time.monotonic()
                ready, _, _ = select.select([worker.stdout], [], [], max(remaining, 0.0))
                if not ready:  # hang
                    worker.kill()
                    worker.wait()
                    idx = current if current is not None else start
                    results[idx] = {"outcome": "hang"}
                    start = idx + 1
                    break
                chunk = os.read(worker.stdout.fileno(), 1 << 16)
                if not chunk:  # the worker ended
                    code = worker.wait()
                    if current is not None and results[current] is None:
                        results[current] = {"outcome": "crash",
                                            "signal": signal.Signals(-code).name if code < 0 else f"exit {code}"}
                        start = current + 1
                    else:
                        start = len(paths) if current is None or current + 1 >= len(paths) else current + 1
                        if code != 0 and current is None:
                            raise RuntimeError(f"the fuzz worker failed before its first file (exit {code})")
                    finished = True
                    break
                buffered += chunk
                *lines, buffered = buffered.split(b"\n")
                for line in lines:
                    report = json.loads(line)
                    if report["status"] == "start":
                        current = report["idx"]
                        deadline = time.monotonic() + file_timeout_s
                    else:
                        results[report["idx"]] = {"outcome": classify(report), "type": report.get("type"),
                                                  "message": report.get("message")}
            worker.stdout.close()
    finally:
        os.unlink(list_file.name)
    return results  # type: ignore[return-value]


def fuzz(num_mutations: int, seed: int, workdir: pathlib.Path, num_workers: int = 1) -> dict:
    """Writes `num_mutations` seeded mutations of the base files into `workdir`, loads them in
    `num_workers` parallel workers, and returns counts and the failures."""
    from concurrent.futures import ThreadPoolExecutor

    began = time.monotonic()
    bases = write_base_files(workdir)
    blobs = [path.read_bytes() for path in bases]
    headers = [map_header(blob) for blob in blobs]
    rng = random.Random(seed)
    paths, descriptions = [], []
    for idx in range(num_mutations):
        base_idx = rng.randrange(len(bases))
        mutated, description = mutate(blobs[base_idx], headers[base_idx], rng)
        path = workdir / f"mutant_{idx:05d}.gguf"
        path.write_bytes(mutated)
        paths.append(str(path))
        descriptions.append(f"{bases[base_idx].name}: {description}")
    chunks = [paths[worker_idx::num_workers] for worker_idx in range(num_workers)]
    with ThreadPoolExecutor(num_workers) as pool:
        chunk_results = list(pool.map(run_files, chunks))
    results: List[dict] = [None] * num_mutations  # type: ignore[list-item]
    for worker_idx, chunk in enumerate(chunk_results):
        for position, result in enumerate(chunk):
            results[worker_idx + position * num_workers] = result
    counts = collections.Counter(result["outcome"] for result in results)
    error_types = collections.Counter(result["type"] for result in results if result.get("type"))
    by_class: Dict[str, collections.Counter] = {name: collections.Counter() for name in MUTATION_CLASSES}
    for description, result in zip(descriptions, results):
        by_class[description.split(": ", 1)[1].split(":")[0]][result["outcome"]] += 1
    failures = [{"file": paths[idx], "mutation": descriptions[idx], **result}
                for idx, result in enumerate(results) if result["outcome"] not in ("loaded", "clean_error")]
    return {"num_mutations": num_mutations, "seed": seed, "workers": num_workers,
            "counts": {outcome: counts.get(outcome, 0) for outcome in OUTCOMES},
            "error_types": dict(error_types),
            "clean_errors_naming_the_file": sum(result["outcome"] == "clean_error" and path in result["message"]
                                                for path, result in zip(paths, results)),
            "by_mutation": {name: {outcome: count[outcome] for outcome in OUTCOMES if count[outcome]}
                            for name, count in by_class.items()},
            "failures": failures,
            "seconds": round(time.monotonic() - began, 1)}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-mutations", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        with open(args.worker) as handle:
            run_worker(json.load(handle), args.start)
        return 0
    with tempfile.TemporaryDirectory(prefix="gguf_fuzz_") as workdir:
        report = fuzz(args.num_mutations, args.seed, pathlib.Path(workdir), args.workers)
    report["machine"] = f"{_cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    report["date"] = time.strftime("%Y-%m-%d")
    summary = {key: value for key, value in report.items() if key != "failures"}
    print(json.dumps(summary, indent=1))
    for failure in report["failures"][:20]:
        print(json.dumps(failure))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)
    return 0 if not report["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
