"""EngineLoop: one engine thread, shared batches, aborts, overload, shutdown and engine failure."""
from __future__ import annotations

import asyncio
import threading

import pytest

from fake_engine import FakeEngine
from lserve.sampling import SamplingParams
from lserve.server.engine_loop import (EngineDeadError, EngineLoop, GenerateItem, RequestTooLargeError,
                                       ServerOverloadedError, ShuttingDownError)
from lserve.server.metrics import ServerMetrics

GREEDY = SamplingParams(temperature=0.0, max_tokens=6)


def run(coroutine_fn, engine, **kwargs):
    """Runs coroutine_fn(engine_loop) on a fresh event loop around a started EngineLoop."""
    engine_loop = EngineLoop(engine, ServerMetrics("fake"), **kwargs)
    engine_loop.start()
    try:
        return asyncio.run(coroutine_fn(engine_loop))
    finally:
        engine_loop.stop()


def test_outputs_arrive_and_all_engine_calls_use_one_thread():
    engine = FakeEngine()

    async def scenario(engine_loop):
        stream = await engine_loop.submit([GenerateItem("a", "hello", GREEDY), GenerateItem("b", "world", GREEDY)])
        with stream:
            final = await stream.final()
        return final

    final = run(scenario, engine)
    assert sorted(final) == ["a", "b"]
    assert all(output.finished and len(output.outputs[0].token_ids) == 6 for output in final.values())
    assert len(engine.calling_threads) == 1 and threading.get_ident() not in engine.calling_threads


def test_concurrent_requests_share_batches_and_match_solo_runs():
    engine = FakeEngine(step_delay=0.002)
    prompts = [f"prompt number {index}" for index in range(16)]

    async def scenario(engine_loop):
        async def one(index):
            stream = await engine_loop.submit([GenerateItem(f"r{index}", prompts[index], GREEDY)])
            with stream:
                return (await stream.final())[f"r{index}"].outputs[0].token_ids

        solo = [await one(index) for index in range(len(prompts))]
        solo_max_batch = max(engine.batch_sizes)
        together = await asyncio.gather(*(one(index) for index in range(len(prompts))))
        return solo, solo_max_batch, together

    solo, solo_max_batch, together = run(scenario, engine)
    assert solo_max_batch == 1
    assert together == solo
    assert max(engine.batch_sizes) > 1


def test_invalid_request_raises_and_queues_nothing():
    engine = FakeEngine(max_model_len=16)

    async def scenario(engine_loop):
        with pytest.raises(ValueError, match="max_model_len"):
            await engine_loop.submit([GenerateItem("ok", "hi", GREEDY), GenerateItem("long", "x" * 40, GREEDY)])
        assert engine_loop.num_pending == 0
        stream = await engine_loop.submit([GenerateItem("after", "hi", GREEDY)])
        with stream:
            return await stream.final()

    assert run(scenario, engine)["after"].finished
    assert not engine.has_unfinished_requests()


def test_close_aborts_running_request():
    engine = FakeEngine(step_delay=0.005)

    async def scenario(engine_loop):
        stream = await engine_loop.submit([GenerateItem("long", "hi", SamplingParams(temperature=0, max_tokens=100))])
        with stream:
            async for changed in stream.updates():
                break
        for _ in range(200):
            if engine_loop.stats is not None and engine_loop.stats.num_running == 0 and engine_loop.num_pending == 0:
                break
            await asyncio.sleep(0.01)
        return engine_loop.stats

    stats = run(scenario, engine)
    assert stats.num_running == 0 and stats.num_free_pages == stats.num_total_pages
    assert sum(engine.batch_sizes) < 100


def test_overload_and_shutdown_are_refused():
    engine = FakeEngine(step_delay=0.005)
    long = SamplingParams(temperature=0, max_tokens=100)

    async def scenario(engine_loop):
        first = await engine_loop.submit([GenerateItem("a", "hi", long), GenerateItem("b", "hi", long)])
        with pytest.raises(ServerOverloadedError):
            await engine_loop.submit([GenerateItem("c", "hi", long)])
        first.close()
        engine_loop.begin_shutdown()
        with pytest.raises(ShuttingDownError):
            await engine_loop.submit([GenerateItem("d", "hi", long)])

    run(scenario, engine, max_pending_requests=2)


def test_shutdown_grace_then_abort():
    engine = FakeEngine(step_delay=0.005)

    async def scenario(engine_loop):
        stream = await engine_loop.submit([GenerateItem("a", "hi", SamplingParams(temperature=0, max_tokens=120))])
        engine_loop.begin_shutdown()
        with stream:
            return (await stream.final())["a"]

    output = run(scenario, engine, shutdown_grace_s=0.05)
    assert output.outputs[0].finish_reason == "abort"


def test_engine_failure_fails_streams_and_later_submits():
    engine = FakeEngine(step_delay=0.002)

    async def scenario(engine_loop):
        stream = await engine_loop.submit([GenerateItem("a", "hi", SamplingParams(temperature=0, max_tokens=100))])
        engine.fail_next_step = RuntimeError("device lost")
        with pytest.raises(EngineDeadError, match="device lost"):
            with stream:
                await stream.final()
        assert not engine_loop.is_alive
        with pytest.raises(EngineDeadError):
            await engine_loop.submit([GenerateItem("b", "hi", GREEDY)])

    run(scenario, engine)


def test_stop_ends_running_streams():
    engine = FakeEngine(step_delay=0.005)

    async def scenario(engine_loop):
        stream = await engine_loop.submit([GenerateItem("a", "hi", SamplingParams(temperature=0, max_tokens=120))])
        await asyncio.to_thread(engine_loop.stop)
        with stream:
            return (await stream.final())["a"]

    assert run(scenario, engine).outputs[0].finish_reason == "abort"


def test_pending_limit_counts_sequences():
    """Each request counts its n continuations: 2 x n=3 = 6 of 8 pending, so 1 x n=3 more is refused (503)
    and 1 x n=2 fits; 3 x n=3 = 9 could never fit: RequestTooLargeError (400), nothing queued."""
    engine = FakeEngine(step_delay=0.005)
    three = SamplingParams(temperature=0.0, max_tokens=100, n=3)

    async def scenario(engine_loop):
        first = await engine_loop.submit([GenerateItem("a", "hi", three), GenerateItem("b", "hi", three)])
        assert engine_loop.num_pending == 6
        with pytest.raises(ServerOverloadedError, match="6 sequences pending"):
            await engine_loop.submit([GenerateItem("c", "hi", three)])
        second = await engine_loop.submit([GenerateItem("d", "hi", SamplingParams(max_tokens=2, n=2))])
        assert engine_loop.num_pending == 8
        with pytest.raises(RequestTooLargeError, match="9 sequences"):
            await engine_loop.submit([GenerateItem(f"e{i}", "hi", three) for i in range(3)])
        assert engine_loop.num_pending == 8
        with second:
            await second.final()
        first.close()
        for _ in range(200):
            if engine_loop.num_pending == 0:
                break
            await asyncio.sleep(0.01)
        return engine_loop.num_pending

    assert run(scenario, engine, max_pending_requests=8) == 0
