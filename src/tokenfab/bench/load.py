"""Load generation: one asyncio process sends streaming requests and times every chunk itself.

Closed loop: N conversations in flight, each starting its next request when the last ends.
Open loop: arrivals at a rate (gamma-distributed gaps; burstiness 1 = Poisson), optionally capped
by a maximum number in flight (time spent waiting for the cap is recorded). Replay: a trace's own
timestamps. Failures are recorded by category, never raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import aiohttp

from tokenfab.bench.metrics import RequestRecord
from tokenfab.bench.workload import Job


@dataclass
class Endpoint:
    url: str  # base URL, e.g. http://127.0.0.1:8000/v1
    model: str
    api_keys: dict[str, str] = field(default_factory=dict)  # tier -> key ("" tier = default key)
    ignore_eos: bool = False
    timeout_s: float = 600.0
    extra_body: dict = field(default_factory=dict)

    def key_for(self, tier: str) -> str | None:
        return self.api_keys.get(tier) or self.api_keys.get("")


@dataclass
class LoadSpec:
    mode: str = "concurrency"  # concurrency | rate | replay
    concurrency: int = 1
    rate: float = 1.0  # requests/s (rate mode)
    burstiness: float = 1.0
    max_in_flight: int = 0  # 0 = no cap
    duration_s: float = 0.0  # 0 = until the jobs run out
    warmup: int = 0  # jobs run first and excluded from metrics
    seed: int = 0
    ramp_s: float = 0.0  # closed loop: start the streams evenly over this many seconds, not all at once


def arrival_times(n: int, rate: float, burstiness: float, rng: random.Random) -> list[float]:
    """n arrival offsets with gamma-distributed gaps of mean 1/rate (shape = burstiness)."""
    if rate <= 0:
        raise ValueError("rate must be > 0")
    if burstiness <= 0:
        raise ValueError("burstiness must be > 0")
    t, out = 0.0, []
    for _ in range(n):
        t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
        out.append(t)
    return out


def _classify(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "unreachable"
    if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return "timeout"
    if isinstance(exc, (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        return "truncated"
    return "client_error"


async def send(client: aiohttp.ClientSession, ep: Endpoint, messages: list[dict], prompt: str | None,
               max_tokens: int, rec: RequestRecord, t_origin: float) -> str:
    """One streaming request; fills `rec`; returns the generated text (for multi-turn)."""
    body: dict = {"model": ep.model, "max_tokens": max_tokens, "stream": True,
                  "stream_options": {"include_usage": True}, **ep.extra_body}
    if ep.ignore_eos:
        body["ignore_eos"] = True
    if prompt is not None:
        body["prompt"] = prompt
        path = "/completions"
    else:
        body["messages"] = messages
        path = "/chat/completions"
    headers = {}
    key = ep.key_for(rec.tier)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    parts: list[str] = []
    t0 = time.perf_counter()
    rec.start_s = t0 - t_origin
    finished = False
    usage = None
    try:
        async with client.post(ep.url + path, json=body, headers=headers) as r:
            rec.status = r.status
            if r.status != 200:
                text = (await r.read()).decode(errors="replace")
                rec.error = {401: "auth", 403: "auth", 429: "rate_limited", 402: "budget"}.get(
                    r.status, f"http_{r.status // 100}xx")
                rec.error_detail = text[:300]
                rec.e2e_s = time.perf_counter() - t0
                return ""
            if "text/event-stream" not in r.headers.get("content-type", ""):
                # a server that ignored stream=true: one JSON body; TTFT = E2E
                obj = json.loads(await r.read())
                ch = obj["choices"][0]
                text = ch.get("text") or (ch.get("message") or {}).get("content") or ""
                parts.append(text)
                usage = obj.get("usage")
                finished = True
                rec.error_detail = "non-streaming response"
            else:
                async for raw in r.content:
                    arrived = time.perf_counter() - t0  # before any parsing: the chunk's arrival time
                    if not raw.startswith(b"data:"):
                        continue
                    data = raw[5:].strip().decode()
                    if data == "[DONE]":
                        finished = finished or bool(parts)
                        break
                    obj = json.loads(data)
                    if "error" in obj:
                        rec.error, rec.error_detail = "stream_error", str(obj["error"])[:300]
                        break
                    if obj.get("usage"):
                        usage = obj["usage"]
                    for ch in obj.get("choices") or []:
                        piece = ch.get("text")
                        if piece is None:
                            piece = (ch.get("delta") or {}).get("content")
                        if piece:
                            if rec.ttft_s is None:
                                rec.ttft_s = arrived
                            rec.chunk_times_s.append(arrived)
                            parts.append(piece)
                        if ch.get("finish_reason"):
                            finished = True
        rec.e2e_s = time.perf_counter() - t0
        if rec.error_detail == "non-streaming response":
            rec.ttft_s = rec.e2e_s
            rec.chunk_times_s = [rec.e2e_s]
        if rec.error is None and not finished:
            rec.error, rec.error_detail = "truncated", "stream ended without a finish_reason"
    except Exception as exc:  # noqa: BLE001 - every failure is a recorded category
        rec.e2e_s = time.perf_counter() - t0
        rec.error, rec.error_detail = _classify(exc), f"{type(exc).__name__}: {exc}"[:300]
        return ""
    if usage:
        rec.output_tokens = int(usage.get("completion_tokens") or 0)
        rec.prompt_tokens = usage.get("prompt_tokens")
        rec.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        rec.output_tokens_source = "usage"
    else:
        rec.output_tokens = len(rec.chunk_times_s)
        rec.output_tokens_source = "chunks"
    if rec.ok and rec.ttft_s is None:
        rec.ttft_s = rec.e2e_s
    return "".join(parts)


async def run_job(client: aiohttp.ClientSession, ep: Endpoint, job: Job, idx: int, warmup: bool, level: str,
                  t_origin: float, records: list[RequestRecord], on_done: Callable[[], None],
                  scheduled_s: float | None = None) -> None:
    history: list[dict] = [{"role": "system", "content": job.system}] if job.system else []
    for t, turn in enumerate(job.turns):
        rec = RequestRecord(f"{level}-{idx}-{t}", 0.0, tier=job.tier, warmup=warmup, level=level,
                            scheduled_s=scheduled_s if t == 0 else None)
        records.append(rec)
        if job.kind == "completion":
            text = await send(client, ep, [], job.system + turn.user, turn.max_tokens, rec, t_origin)
        else:
            history.append({"role": "user", "content": turn.user})
            text = await send(client, ep, history, None, turn.max_tokens, rec, t_origin)
            history.append({"role": "assistant", "content": text})
        on_done()
        if not rec.ok:
            break


def run_load_sync(ep: Endpoint, jobs: list[Job], load: LoadSpec, level: str = "",
                  on_done: Callable[[], None] = lambda: None) -> list[RequestRecord]:
    """`run_load` in a fresh event loop: uvloop's where it is installed (it needs ~30% less CPU per chunk
    than asyncio's default loop at 1,000 streams, docs/performance.md), asyncio's otherwise."""
    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(run_load(ep, jobs, load, level, on_done))


async def run_load(ep: Endpoint, jobs: list[Job], load: LoadSpec, level: str = "",
                   on_done: Callable[[], None] = lambda: None) -> list[RequestRecord]:
    """Run `jobs` under `load`; returns one record per request sent (warm-up ones flagged)."""
    with _no_collection_pauses():
        watchdog = asyncio.create_task(_gc_backstop())
        try:
            return await _run_load(ep, jobs, load, level, on_done)
        finally:
            watchdog.cancel()


@contextlib.contextmanager
def _no_collection_pauses() -> Iterator[None]:
    """Keep the garbage collector's pauses out of the chunk timestamps.

    A collection stops the event loop while it walks the tracked objects; with a thousand streams in
    flight a full pass takes tens of ms, during which no chunk is timestamped (measured: client timing
    error p99 52 ms with the collector on, ~1 ms with it off, docs/performance.md). Automatic
    collection is off while the load runs (reference counting still frees almost everything at once;
    only cyclic garbage waits), a watchdog collects anyway if uncollected objects pile past
    GC_BACKSTOP, and a full pass runs when the load ends.
    """
    was_enabled = gc.isenabled()
    gc.collect()
    gc.freeze()  # objects alive now are never walked again during the run
    gc.disable()
    try:
        yield
    finally:
        gc.unfreeze()
        if was_enabled:
            gc.enable()
        gc.collect()


GC_BACKSTOP = 2_000_000  # tracked objects allocated and not yet freed since the last collection


async def _gc_backstop() -> None:
    while True:
        await asyncio.sleep(1.0)
        if gc.get_count()[0] > GC_BACKSTOP:
            gc.collect()


async def _run_load(ep: Endpoint, jobs: list[Job], load: LoadSpec, level: str,
                    on_done: Callable[[], None]) -> list[RequestRecord]:
    records: list[RequestRecord] = []
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=ep.timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as client:
        t_origin = time.perf_counter()
        warm, main = jobs[: load.warmup], jobs[load.warmup :]
        if warm:
            sem = asyncio.Semaphore(max(1, load.concurrency))

            async def warm_one(i: int, j: Job) -> None:
                async with sem:
                    await run_job(client, ep, j, i, True, level, t_origin, records, lambda: None)

            await asyncio.gather(*(warm_one(i, j) for i, j in enumerate(warm)))
        deadline = time.perf_counter() + load.duration_s if load.duration_s > 0 else None
        if load.mode == "concurrency":
            queue = list(enumerate(main))
            queue.reverse()

            async def worker(k: int) -> None:
                if load.ramp_s > 0:
                    await asyncio.sleep(load.ramp_s * k / max(1, load.concurrency))
                while queue and (deadline is None or time.perf_counter() < deadline):
                    i, j = queue.pop()
                    await run_job(client, ep, j, i, False, level, t_origin, records, on_done)

            await asyncio.gather(*(worker(k) for k in range(max(1, load.concurrency))))
        elif load.mode in ("rate", "replay"):
            rng = random.Random(load.seed)
            if load.mode == "rate":
                times = arrival_times(len(main), load.rate, load.burstiness, rng)
            else:
                times = [j.at_s or 0.0 for j in main]
            cap = asyncio.Semaphore(load.max_in_flight) if load.max_in_flight > 0 else None
            start = time.perf_counter()
            tasks = []

            async def one(i: int, j: Job, at: float) -> None:
                if cap is None:
                    await run_job(client, ep, j, i, False, level, t_origin, records, on_done, at)
                else:
                    async with cap:
                        await run_job(client, ep, j, i, False, level, t_origin, records, on_done, at)

            for i, (j, at) in enumerate(zip(main, times)):
                if deadline is not None and start + at > deadline:
                    break
                delay = start + at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(i, j, start + at - t_origin)))
            await asyncio.gather(*tasks)
        else:
            raise ValueError(f"load mode {load.mode!r}: concurrency, rate or replay")
    return records
