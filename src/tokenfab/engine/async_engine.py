"""Runs an LLMEngine off the event loop so it never blocks; streams outputs to asyncio tasks.

`run()` drives the engine in the calling thread (`tokenfab serve` gives it the main thread and
runs the HTTP server on another: measured on this CPU, torch's parallel kernels run up to 2x slower
from a non-main thread); `start()` drives it on a thread of its own (tests, embedding).

Requests and aborts go in through a thread-safe queue; each step's outputs come back to the
event loop in one `call_soon_threadsafe`. A request the engine cannot run ends with an output
whose `error` is set (`LLMEngine.step` isolates it; the others in its step go on). Only if a
step raises outside that isolation (a bug in the engine itself) are the requests it held failed,
with the exception, and the loop carries on serving new ones.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from tokenfab.engine.llm_engine import LLMEngine, RequestOutput
from tokenfab.engine.sampling import SamplingParams

log = logging.getLogger("tokenfab.engine")


class EngineDead(RuntimeError):
    pass


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    finished: bool = False


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tokenfab-engine", daemon=True)
        self.num_steps = 0
        self.step_ewma_s = 0.0

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def run(self) -> None:
        """Drive the engine in the calling thread until `shutdown()`."""
        self._run()

    def shutdown(self) -> None:
        self._stop.set()
        self._inbox.put(("wake",))
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)

    # --- requests ------------------------------------------------------------------------------
    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str, priority: int = 0
    ) -> AsyncIterator[RequestOutput]:
        """Yield outputs for one request; closing the iterator early aborts it and frees its blocks."""
        self.engine.check_request(len(prompt_ids), params)  # raise RequestError before queueing
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            self._streams[request_id] = stream
        self._inbox.put(("add", request_id, prompt_ids, params, priority))
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    stream.finished = True
                    raise item
                yield item
                if item.finished:
                    stream.finished = True
                    return
        finally:
            if not stream.finished:
                self._inbox.put(("abort", request_id))
            with self._lock:
                self._streams.pop(request_id, None)

    # --- the engine thread ---------------------------------------------------------------------
    def _deliver(self, outputs: list[RequestOutput | tuple[str, BaseException]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, object]]] = {}
        with self._lock:
            for o in outputs:
                rid, item = (o.request_id, o) if isinstance(o, RequestOutput) else o
                s = self._streams.get(rid)
                if s is not None:
                    by_loop.setdefault(s.loop, []).append((s, item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # loop closed
                pass

    def _handle(self, msg: tuple) -> list:
        kind = msg[0]
        if kind == "add":
            _, rid, prompt_ids, params, priority = msg
            try:
                self.engine.add_request(prompt_ids, params, rid, priority)
            except Exception as exc:  # noqa: BLE001 - the request fails, the engine goes on
                return [(rid, exc)]
        elif kind == "abort":
            self.engine.abort(msg[1])
        return []

    def _run(self) -> None:
        while not self._stop.is_set():
            failed: list = []
            try:
                msg = self._inbox.get(timeout=0.5) if not self.engine.has_work() else self._inbox.get_nowait()
                failed += self._handle(msg)
                while True:
                    failed += self._handle(self._inbox.get_nowait())
            except queue.Empty:
                pass
            if failed:
                self._deliver(failed)
            if self._stop.is_set() or not self.engine.has_work():
                continue
            t0 = time.monotonic()
            try:
                outputs = self.engine.step()
            except Exception as exc:  # noqa: BLE001
                log.exception("engine step failed outside request isolation; failing the requests it held")
                victims = list(self.engine.seqs)
                for rid in victims:
                    self.engine.abort(rid)
                self._deliver([(rid, EngineDead(f"engine step failed: {exc}")) for rid in victims])
                continue
            dt = time.monotonic() - t0
            self.num_steps += 1
            self.step_ewma_s = dt if self.step_ewma_s == 0 else 0.9 * self.step_ewma_s + 0.1 * dt
            if outputs:
                self._deliver(outputs)  # type: ignore[arg-type]


def _put_all(items: list[tuple[_Stream, object]]) -> None:
    for stream, item in items:
        stream.queue.put_nowait(item)
