"""EngineLoop: one background thread owns the Engine; asyncio handlers talk to it through queues.

Contract: every engine call (add_request, abort_request, step, stats, has_unfinished_requests)
happens on the engine thread, because lserve.Engine keeps Python-side request state that is not
thread-safe. Handlers queue commands (add, abort) under a lock and wake the thread; the thread
applies them between steps, so requests from all clients join one continuous batch. Outputs go
back to the event loop with one loop.call_soon_threadsafe per step, into per-call RequestStreams
that keep only the newest RequestOutput of each request (outputs are cumulative, so a slow reader
skips intermediate ones instead of queueing them).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator, Dict, List, Optional, Sequence, Tuple

from lserve.outputs import RequestOutput
from lserve.sampling import SamplingParams
from lserve.server.metrics import ServerMetrics

logger = logging.getLogger("lserve.server")


class ServiceUnavailableError(RuntimeError):
    """The server cannot take the request now (HTTP 503): overloaded, shutting down or failed."""


class ServerOverloadedError(ServiceUnavailableError):
    pass


class ShuttingDownError(ServiceUnavailableError):
    pass


class EngineDeadError(ServiceUnavailableError):
    pass


class RequestTooLargeError(ValueError):
    """The request alone holds more sequences than max_pending_requests: no retry could admit it (HTTP 400)."""


@dataclass
class GenerateItem:
    """One engine request: prompt is whatever Engine.add_request takes (text, ids or a prompt dict)."""

    request_id: str
    prompt: object
    params: SamplingParams

    @property
    def num_seqs(self) -> int:
        """Sequences this request runs (one per continuation): what the pending limit counts."""
        return self.params.n


class RequestStream:
    """The outputs of one API call's engine requests (several for a list of prompts), on the event loop.

    Example:
        >>> stream = await engine_loop.submit([GenerateItem("cmpl-1-0", "Hello", params)])
        >>> with stream:                      # aborts unfinished requests on exit (client gone)
        ...     async for changed in stream.updates():   # {request_id: newest RequestOutput}
        ...         ...
    """

    def __init__(self, engine_loop: "EngineLoop", request_ids: Sequence[str]) -> None:
        self._engine_loop = engine_loop
        self.request_ids = list(request_ids)
        self.latest: Dict[str, RequestOutput] = {}
        self._changed: Dict[str, RequestOutput] = {}
        self._unfinished = set(self.request_ids)
        self._error: Optional[BaseException] = None
        self._event = asyncio.Event()

    @property
    def finished(self) -> bool:
        return not self._unfinished

    def _deliver(self, output: RequestOutput) -> None:
        self.latest[output.request_id] = output
        self._changed[output.request_id] = output
        if output.finished:
            self._unfinished.discard(output.request_id)
        self._event.set()

    def _fail(self, error: BaseException) -> None:
        if self._unfinished:
            self._error = error
            self._event.set()

    async def updates(self) -> AsyncIterator[Dict[str, RequestOutput]]:
        """Yields {request_id: newest output} for the requests that changed, until all are finished."""
        while True:
            if not self._changed and self._error is None and self._unfinished:
                self._event.clear()
                await self._event.wait()
            if self._changed:
                changed, self._changed = self._changed, {}
                yield changed
                continue
            if self._error is not None:
                raise self._error
            if not self._unfinished:
                return

    async def final(self) -> Dict[str, RequestOutput]:
        """Waits for every request to finish; returns their last outputs."""
        async for _ in self.updates():
            pass
        return self.latest

    def close(self) -> None:
        """Aborts the requests that are still running (their KV pages are freed); idempotent."""
        if self._unfinished:
            self._engine_loop.abort(sorted(self._unfinished))
            self._unfinished.clear()

    def __enter__(self) -> "RequestStream":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


@dataclass
class _Tracked:
    """Engine-thread bookkeeping of one running request, for delivery and metrics."""

    stream: RequestStream
    loop: asyncio.AbstractEventLoop
    arrival: float
    num_seqs: int
    last_token_at: Optional[float] = None
    num_tokens: int = 0
    num_tokens_per_seq: int = 0


class EngineLoop:
    """Runs engine.step() on a dedicated thread while requests are pending.

    max_pending_requests: sequences (each request's n continuations, queued + running) beyond which
    submit() raises ServerOverloadedError; a submit that alone exceeds it raises RequestTooLargeError.
    Counting sequences, not requests, is what bounds the work: one request of 8 prompts x n=128 is
    1,024 sequences. shutdown_grace_s: after begin_shutdown(), how long running requests may
    go on before they are aborted (their streams then end with finish_reason "abort").
    """

    def __init__(self, engine, metrics: Optional[ServerMetrics] = None, *, max_pending_requests: int = 4096,
                 shutdown_grace_s: float = 30.0) -> None:
        if max_pending_requests < 1:
            raise ValueError(f"max_pending_requests must be >= 1, got {max_pending_requests}")
        self.engine = engine
        self.metrics = metrics
        self.max_pending_requests = max_pending_requests
        self.shutdown_grace_s = shutdown_grace_s
        self._cond = threading.Condition(threading.Lock())
        self._commands: List[Tuple] = []  # guarded by _cond
        self._num_pending = 0  # sequences, guarded by _cond
        self._stop = False  # guarded by _cond
        self._closed = False  # guarded by _cond: the thread takes no more commands
        self._shutdown_requested_at: Optional[float] = None  # set from a signal handler: no lock
        self._error: Optional[BaseException] = None
        self._tracked: Dict[str, _Tracked] = {}  # engine thread only
        self._stats = None
        self._thread: Optional[threading.Thread] = None

    # ---- event-loop side --------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the engine loop is already started")
        self._thread = threading.Thread(target=self._run, name="lserve-engine", daemon=True)
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._error is None

    @property
    def is_shutting_down(self) -> bool:
        return self._shutdown_requested_at is not None or self._stop

    @property
    def error(self) -> Optional[BaseException]:
        return self._error

    @property
    def stats(self):
        """The engine's stats() as of the end of the engine thread's last iteration (None before)."""
        return self._stats

    @property
    def num_pending(self) -> int:
        with self._cond:
            return self._num_pending

    async def submit(self, items: Sequence[GenerateItem]) -> RequestStream:
        """Queues engine requests (all or none); returns their stream once the engine took them.

        Raises ValueError when the engine rejects one (nothing stays queued) or RequestTooLargeError
        (a ValueError) when the items' sequences alone exceed max_pending_requests; ServerOverloadedError,
        ShuttingDownError or EngineDeadError (all ServiceUnavailableError).
        """
        num_seqs = sum(item.num_seqs for item in items)
        if num_seqs > self.max_pending_requests:
            raise RequestTooLargeError(
                f"this request needs {num_seqs} sequences, more than the server ever holds at once "
                f"(max_pending_requests={self.max_pending_requests})")
        if self._error is not None or not self.is_alive:
            raise EngineDeadError(f"the engine has stopped: {self._error or 'not running'}")
        if self.is_shutting_down:
            raise ShuttingDownError("the server is shutting down")
        loop = asyncio.get_running_loop()
        stream = RequestStream(self, [item.request_id for item in items])
        accepted = loop.create_future()
        with self._cond:
            if self._closed:
                raise EngineDeadError(f"the engine has stopped: {self._error or 'shut down'}")
            if self._num_pending + num_seqs > self.max_pending_requests:
                raise ServerOverloadedError(
                    f"the server is overloaded ({self._num_pending} sequences pending, this request adds "
                    f"{num_seqs}, limit {self.max_pending_requests}); retry later")
            self._num_pending += num_seqs
            self._commands.append(("add", list(items), stream, loop, accepted, time.monotonic()))
            self._cond.notify()
        try:
            await accepted
        except asyncio.CancelledError:
            # The add may still go through after we leave; the abort queued behind it undoes it.
            self.abort(stream.request_ids)
            raise
        return stream

    async def call(self, function):
        """Runs function(engine) on the engine thread between steps (e.g. reset_prefix_cache); an
        exception it raises comes back here."""
        if self._error is not None or not self.is_alive:
            raise EngineDeadError(f"the engine has stopped: {self._error or 'not running'}")
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        with self._cond:
            if self._closed:
                raise EngineDeadError(f"the engine has stopped: {self._error or 'shut down'}")
            self._commands.append(("call", function, loop, done))
            self._cond.notify()
        await done

    def abort(self, request_ids: Sequence[str]) -> None:
        """Queues aborts; safe from any thread except inside a signal handler."""
        with self._cond:
            self._commands.append(("abort", list(request_ids)))
            self._cond.notify()

    def begin_shutdown(self) -> None:
        """New requests get ShuttingDownError; running ones get shutdown_grace_s to finish.

        Only assigns an attribute, so it is safe to call from a signal handler.
        """
        if self._shutdown_requested_at is None:
            self._shutdown_requested_at = time.monotonic()

    def stop(self, timeout: Optional[float] = 10.0) -> None:
        """Aborts what is left, ends every stream and joins the engine thread."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- engine thread ------------------------------------------------------------------------

    def _run(self) -> None:
        busy = False
        aborted_for_shutdown = False
        try:
            while True:
                with self._cond:
                    while not self._commands and not self._stop and not busy:
                        self._cond.wait(1.0)
                    commands, self._commands = self._commands, []
                    stop = self._stop
                for command in commands:
                    if command[0] == "add":
                        self._add(*command[1:])
                    elif command[0] == "call":
                        function, loop, done = command[1:]
                        try:
                            function(self.engine)
                            _call_soon(loop, _settle, done, None)
                        except Exception as error:  # the caller reports it; the engine goes on
                            _call_soon(loop, _settle, done, error)
                    else:
                        self._abort(command[1])
                if stop:
                    self._finish_for_stop()
                    return
                requested_at = self._shutdown_requested_at
                if (requested_at is not None and not aborted_for_shutdown
                        and time.monotonic() - requested_at >= self.shutdown_grace_s):
                    self._abort(list(self._tracked))
                    aborted_for_shutdown = True
                if self.engine.has_unfinished_requests():
                    self._dispatch(self.engine.step())
                busy = self.engine.has_unfinished_requests()
                self._stats = self.engine.stats()
        except BaseException as error:  # the engine is unusable now: fail everything, loudly
            logger.exception("engine loop failed")
            self._error = error
            self._fail_all(EngineDeadError(f"the engine failed: {error}"))

    def _add(self, items: List[GenerateItem], stream: RequestStream, loop: asyncio.AbstractEventLoop,
             accepted: asyncio.Future, arrival: float) -> None:
        added = []
        try:
            for item in items:
                self.engine.add_request(item.request_id, item.prompt, item.params)
                added.append(item.request_id)
        except Exception as error:  # ValueError for bad input; anything else is reported the same way
            for request_id in added:
                self.engine.abort_request(request_id)  # its "abort" output is dropped: not tracked
            with self._cond:
                self._num_pending -= sum(item.num_seqs for item in items)
            _call_soon(loop, _settle, accepted, error)
            return
        for item in items:
            self._tracked[item.request_id] = _Tracked(stream, loop, arrival, item.num_seqs)
        _call_soon(loop, _settle, accepted, None)

    def _abort(self, request_ids: List[str]) -> None:
        for request_id in request_ids:
            if request_id in self._tracked:
                self.engine.abort_request(request_id)

    def _dispatch(self, outputs: List[RequestOutput]) -> None:
        now = time.monotonic()
        deliveries: Dict[asyncio.AbstractEventLoop, List[Tuple[RequestStream, RequestOutput]]] = {}
        num_finished_seqs = 0
        for output in outputs:
            tracked = self._tracked.get(output.request_id)
            if tracked is None:
                continue
            self._record(tracked, output, now)
            if output.finished:
                del self._tracked[output.request_id]
                num_finished_seqs += tracked.num_seqs
            deliveries.setdefault(tracked.loop, []).append((tracked.stream, output))
        if num_finished_seqs:
            with self._cond:
                self._num_pending -= num_finished_seqs
        for loop, batch in deliveries.items():
            _call_soon(loop, _deliver_batch, batch)

    def _record(self, tracked: _Tracked, output: RequestOutput, now: float) -> None:
        num_tokens = sum(len(seq.token_ids) for seq in output.outputs)
        num_tokens_per_seq = max((len(seq.token_ids) for seq in output.outputs), default=0)
        num_new = num_tokens - tracked.num_tokens
        if num_new > 0 and self.metrics is not None:
            if tracked.last_token_at is None:
                self.metrics.record_first_token(now - tracked.arrival, len(output.prompt_token_ids))
                self.metrics.record_tokens(num_new, None)
            else:
                num_new_per_seq = max(num_tokens_per_seq - tracked.num_tokens_per_seq, 1)
                self.metrics.record_tokens(num_new, (now - tracked.last_token_at) / num_new_per_seq)
        if num_new > 0:
            tracked.last_token_at = now
            tracked.num_tokens = num_tokens
            tracked.num_tokens_per_seq = num_tokens_per_seq
        if output.finished and self.metrics is not None:
            reason = output.outputs[0].finish_reason if output.outputs else None
            self.metrics.record_finished(reason, now - tracked.arrival)

    def _finish_for_stop(self) -> None:
        """Aborts every tracked request and steps until their final outputs are delivered."""
        self._abort(list(self._tracked))
        for _ in range(8):  # an abort surfaces in the next step; a few steps bound a misbehaving engine
            if not self._tracked or not self.engine.has_unfinished_requests():
                break
            self._dispatch(self.engine.step())
        self._stats = self.engine.stats()
        self._fail_all(ShuttingDownError("the server shut down"))

    def _fail_all(self, error: BaseException) -> None:
        with self._cond:
            commands, self._commands = self._commands, []
            self._num_pending = 0
            self._closed = True
        for command in commands:
            if command[0] == "add":
                _, _, stream, loop, accepted, _ = command
                _call_soon(loop, _settle, accepted, error)
        for tracked in self._tracked.values():
            _call_soon(tracked.loop, tracked.stream._fail, error)
        self._tracked.clear()


def _call_soon(loop: asyncio.AbstractEventLoop, callback, *args) -> None:
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # the loop is closed: nobody is listening any more
        pass


def _settle(future: asyncio.Future, error: Optional[BaseException]) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _deliver_batch(batch: List[Tuple[RequestStream, RequestOutput]]) -> None:
    for stream, output in batch:
        stream._deliver(output)
