"""The openai backend: any OpenAI-compatible server over HTTP (a `tokenfab worker`, vLLM, SGLang, llama.cpp).

The gateway has already templated and tokenised the prompt, so it is sent as token ids to
`/v1/completions`, streamed, with `stream_options.include_usage` forced on so that the server's own
token counts come back. Everything the gateway meters it times on its own clock (TTFT, TPOT,
inter-token latency, end to end). The server's kind is read from its `/v1/models` card
(`owned_by`) unless configured; it decides which extensions may be sent (`top_k`, `min_tokens`,
`ignore_eos`, `priority`) so that a field the server would ignore is refused here instead.

Load comes from the server's Prometheus `/metrics` where it has them (vLLM's and SGLang's names,
llama.cpp's with `--metrics`; a tokenfab worker uses vLLM's), polled in the background, and from
what the gateway observes itself: its own requests in flight, and recent TTFT and TPOT. A
background health check (`GET /health`) brings a backend back after a failure ejected it.

Energy comes from the device's own meter where the pool names one (`energy_url`: a DCGM exporter's
`/metrics`, whose energy counter gives the power over each second it is read), else from a labelled
power model (`PowerModel`, idle and busy watts). While the device serves, that power (less the
idle draw) is split evenly across the requests in flight at each moment.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import httpx

from tokenfab.backends.base import (
    Backend,
    BackendError,
    Capabilities,
    EnergyInfo,
    LoadSnapshot,
    ModelInfo,
    PromptTokenizer,
)
from tokenfab.generation import RequestError, RequestMetering, RequestOutput, SamplingParams, TextPrompt

log = logging.getLogger("tokenfab.backends.openai")

KINDS = ("auto", "tokenfab", "vllm", "sglang", "llamacpp", "openai")
# which of vLLM's sampling extensions each kind honours (an unlisted kind gets plain OpenAI fields only)
EXTENSIONS = {
    "tokenfab": {"top_k", "min_tokens", "ignore_eos", "priority"},
    "vllm": {"top_k", "min_tokens", "ignore_eos"},  # priority only under --scheduling-policy priority
    "sglang": {"top_k", "min_tokens", "ignore_eos"},
    "llamacpp": {"top_k", "ignore_eos"},
    "openai": set(),
}
# Prometheus names of the load a router needs, by what they mean (first found wins)
LOAD_METRICS = {
    "running": ("vllm:num_requests_running", "sglang:num_running_reqs", "llamacpp:requests_processing"),
    "waiting": ("vllm:num_requests_waiting", "sglang:num_queue_reqs", "llamacpp:requests_deferred"),
    "kv": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "sglang:token_usage",
           "llamacpp:kv_cache_usage_ratio"),
    "hits": ("vllm:prefix_cache_hits_total", "llamacpp:prompt_tokens_cached_total"),
    "queries": ("vllm:prefix_cache_queries_total", "llamacpp:prompt_tokens_total"),
    "hit_rate": ("sglang:cache_hit_rate",),
}
_WANTED = tuple({n for names in LOAD_METRICS.values() for n in names})
EWMA = 0.2
# a device meter's Prometheus names: NVIDIA DCGM's energy counter (millijoules since boot, summed over the
# exporter's GPUs) or, failing that, its power gauge (watts)
ENERGY_COUNTER_MJ = "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"
POWER_GAUGE_W = "DCGM_FI_DEV_POWER_USAGE"
ENERGY_INTERVAL_S = 1.0  # DCGM's default update period


@dataclass(frozen=True)
class PowerModel:
    """A device's power draw: `idle_watts` always (not attributed to requests), `busy_watts` while it serves."""

    idle_watts: float
    busy_watts: float

    @property
    def label(self) -> str:
        return f"model:{self.idle_watts:g}-{self.busy_watts:g}W"


def parse_load_metrics(text: str, wanted: tuple[str, ...] = _WANTED) -> dict[str, float]:
    """The load metrics in a Prometheus text exposition, summed over label sets. Only lines that start with
    a wanted name are split (a vLLM exposition is mostly histogram buckets, and this runs every 100 ms)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(wanted):
            continue
        brace = line.find("{")
        space = line.find(" ")
        end = brace if 0 <= brace < space or (brace >= 0 and space < 0) else space
        name = line[:end]
        if name not in wanted:
            continue
        rest = line[line.rfind("}") + 1:] if brace >= 0 else line[end:]
        try:
            value = float(rest.split()[0])
        except (IndexError, ValueError):
            continue
        if math.isfinite(value):
            out[name] = out.get(name, 0.0) + value
    return out


def _first(found: dict[str, float], key: str) -> float | None:
    for name in LOAD_METRICS[key]:
        if name in found:
            return found[name]
    return None


class OpenAIBackend(Backend):
    def __init__(self, url: str, *, name: str = "", model: str = "", kind: str = "auto", api_key: str = "",
                 tokenizer: PromptTokenizer | None = None, max_model_len: int = 0, vocab_size: int = 0,
                 power: PowerModel | None = None, energy_url: str = "", idle_watts: float = 0.0,
                 trust: str = "external",
                 metrics_interval_s: float = 0.1,
                 health_interval_s: float = 1.0, connect_timeout_s: float = 2.0, timeout_s: float = 600.0) -> None:
        """`url`: the server's OpenAI base URL (ending in /v1); `model`: its model name ("" = the first it
        lists); `tokenizer`: the model's tokenizer, if the gateway has it (prompts are sent as its ids)."""
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"backend kind {kind!r} is not one of {', '.join(KINDS)}")
        self.url = url.rstrip("/")
        self.root = self.url[:-3] if self.url.endswith("/v1") else self.url
        self.name = name or self.root.split("://", 1)[-1]
        self.model = model
        self.kind = kind
        self.api_key = api_key
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.power = power
        self.energy_url = energy_url
        self.idle_watts = idle_watts  # subtracted from a measured power: the draw the device has anyway
        self.measured_watts: float | None = None  # from the device's meter, once two readings are in
        self._energy_prev: tuple[float, float] | None = None  # (monotonic time, millijoules)
        self.trust = trust
        self.metrics_interval_s = metrics_interval_s
        self.health_interval_s = health_interval_s
        self.timeout_s, self.connect_timeout_s = timeout_s, connect_timeout_s
        self.info = ModelInfo(name=model or "?", max_model_len=max_model_len)
        self._configured_len = max_model_len
        self.capabilities = Capabilities(local_tokenizer=tokenizer is not None, text_prompts=True, trust=trust)
        self.energy = (EnergyInfo(f"dcgm:{energy_url}", True) if energy_url else
                       EnergyInfo(power.label if power else "none", False))
        self.max_num_seqs = 0
        self.max_num_batched_tokens = 0
        self.healthy = False  # until the first check passes
        self.discovered = False
        self.in_flight = 0
        self._scraped: dict[str, float] = {}
        self._scraped_at: float | None = None
        self._has_metrics = True
        self._prev_hits: tuple[float, float] | None = None
        self._hit_rate: float | None = None
        self.ttft_ewma_s: float | None = None
        self.tpot_ewma_s: float | None = None
        self.completed = 0
        self.failed = 0
        self._client: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task] = []
        self._busy_since = 0.0  # for the energy split: when the in-flight count last changed
        self._share_j: dict[str, float] = {}  # request id -> joules attributed so far
        self._share_s: dict[str, float] = {}  # request id -> device seconds attributed so far

    # --- lifecycle -----------------------------------------------------------------------------
    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _session(self) -> aiohttp.ClientSession:
        # llama-server closes its connection after every streamed response though it advertises keep-alive:
        # a pooled connection then fails the next request, so it gets none
        return aiohttp.ClientSession(
            headers=self._headers(), timeout=aiohttp.ClientTimeout(total=self.timeout_s, connect=self.connect_timeout_s),
            connector=aiohttp.TCPConnector(limit=0, force_close=self.kind == "llamacpp"))

    async def open(self) -> None:
        self._client = self._session()
        await self.check_health()
        self._tasks = [asyncio.create_task(self._health_loop(), name=f"health {self.name}")]
        if self.metrics_interval_s > 0:
            self._tasks.append(asyncio.create_task(self._metrics_loop(), name=f"metrics {self.name}"))
        if self.energy_url:
            self._tasks.append(asyncio.create_task(self._energy_loop(), name=f"energy {self.name}"))

    async def aclose(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - stopping
                pass
        if self._client is not None:
            await self._client.close()

    @property
    def client(self) -> aiohttp.ClientSession:
        if self._client is None:
            raise RuntimeError(f"backend {self.name} is not open")
        return self._client

    async def discover(self) -> None:
        """Read the server's model card: its model name, kind and context length."""
        quick = aiohttp.ClientTimeout(total=max(2.0, self.connect_timeout_s))
        async with self.client.get(self.url + "/models", timeout=quick) as r:
            r.raise_for_status()
            card = self._pick_card(await r.json(content_type=None))
        props: dict[str, Any] = {}
        if self._kind_of(card) == "llamacpp":
            try:
                async with self.client.get(self.root + "/props", timeout=quick) as r:
                    props = await r.json(content_type=None)
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                pass
        kind_was = self.kind
        self._apply_card(card, props)
        if kind_was == "auto" and self.kind == "llamacpp":  # a fresh session without keep-alive (see _session)
            old = self._client
            self._client = self._session()
            if old is not None:
                await old.close()

    def discover_sync(self) -> bool:
        """`discover` from outside any event loop (the gateway is built before its loop runs); False if down."""
        try:
            with httpx.Client(timeout=max(2.0, self.connect_timeout_s), headers=self._headers()) as c:
                card = self._pick_card(c.get(self.url + "/models").raise_for_status().json())
                props: dict[str, Any] = {}
                if self._kind_of(card) == "llamacpp":
                    props = c.get(self.root + "/props").json()
        except (httpx.HTTPError, ValueError, BackendError) as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            return False
        self._apply_card(card, props)
        return True

    def _pick_card(self, listing: Any) -> dict[str, Any]:
        cards = listing.get("data") if isinstance(listing, dict) else None
        if not cards:
            raise BackendError(f"{self.name} lists no models", retryable=True)
        card = next((c for c in cards if c.get("id") == self.model), None) if self.model else cards[0]
        if card is None:
            raise BackendError(f"{self.name} does not serve '{self.model}' (it lists "
                               f"{', '.join(str(c.get('id')) for c in cards)})", retryable=False)
        return card

    def _kind_of(self, card: dict[str, Any]) -> str:
        if self.kind != "auto":
            return self.kind
        owner = str(card.get("owned_by", "")).lower().replace(".", "")
        return next((k for k in ("tokenfab", "vllm", "sglang", "llamacpp") if k in owner), "openai")

    def _apply_card(self, card: dict[str, Any], props: dict[str, Any]) -> None:
        self.kind = self._kind_of(card)
        self.model = str(card["id"])
        meta = card.get("meta") if isinstance(card.get("meta"), dict) else {}  # llama-server's card
        length = self._configured_len or int(card.get("max_model_len") or meta.get("n_ctx") or 0)
        if not length:  # llama-server: its context per slot
            length = int((props.get("default_generation_settings") or {}).get("n_ctx") or 0)
        self.kv_cache_tokens = int(card.get("kv_cache_tokens") or 0)
        self.max_num_seqs = int(card.get("max_num_seqs") or props.get("total_slots") or 0)
        if not self.vocab_size:
            self.vocab_size = int(card.get("vocab_size") or meta.get("n_vocab") or 0)
        self.info = ModelInfo(name=self.model, max_model_len=length, synthetic=bool(card.get("synthetic", False)),
                              source=f"{self.kind} at {self.url}")
        self.capabilities = Capabilities(local_tokenizer=self.tokenizer is not None, text_prompts=True,
                                         priority="priority" in EXTENSIONS[self.kind], trust=self.trust)
        self.discovered = True

    async def check_health(self) -> bool:
        try:
            if not self.discovered:
                await self.discover()
            async with self.client.get(self.root + "/health",
                                       timeout=aiohttp.ClientTimeout(total=max(2.0, self.connect_timeout_s))) as r:
                ok = r.status == 200
                if not ok:
                    self.last_error = f"GET /health answered {r.status}"
        except (aiohttp.ClientError, asyncio.TimeoutError, BackendError, ValueError, KeyError) as exc:
            ok = False
            self.last_error = f"{type(exc).__name__}: {exc}"
        if ok and not self.healthy:
            log.info("backend %s is up (%s, model %s)", self.name, self.kind, self.model)
        elif not ok and self.healthy:
            log.warning("backend %s is down: %s", self.name, self.last_error)
        self.healthy = ok
        return ok

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            await self.check_health()

    async def _metrics_loop(self) -> None:
        while self._has_metrics:
            await asyncio.sleep(self.metrics_interval_s)
            if not self.healthy:
                continue
            try:
                async with self.client.get(self.root + "/metrics", timeout=aiohttp.ClientTimeout(
                        total=max(1.0, self.metrics_interval_s * 5))) as r:
                    status, body = r.status, await r.text()
            except (aiohttp.ClientError, asyncio.TimeoutError, UnicodeDecodeError):
                continue
            if status == 404 or (status == 501 and self.kind == "llamacpp"):
                log.info("backend %s has no /metrics: its load is what the gateway observes", self.name)
                self._has_metrics = False
                return
            if status != 200:
                continue
            found = parse_load_metrics(body)
            hits, queries = _first(found, "hits"), _first(found, "queries")
            if hits is not None and queries is not None:
                if self._prev_hits is not None and queries > self._prev_hits[1]:
                    self._hit_rate = (hits - self._prev_hits[0]) / (queries - self._prev_hits[1])
                elif self._prev_hits is None and queries > 0:
                    self._hit_rate = hits / queries
                self._prev_hits = (hits, queries)
            elif _first(found, "hit_rate") is not None:
                self._hit_rate = _first(found, "hit_rate")
            self._scraped, self._scraped_at = found, time.monotonic()

    async def _energy_loop(self) -> None:
        """Read the device's meter: power = the energy counter's rise over the time between readings."""
        wanted = (ENERGY_COUNTER_MJ, POWER_GAUGE_W)
        while True:
            try:
                async with self.client.get(self.energy_url, timeout=aiohttp.ClientTimeout(total=5.0)) as r:
                    found = parse_load_metrics(await r.text(), wanted) if r.status == 200 else {}
            except (aiohttp.ClientError, asyncio.TimeoutError, UnicodeDecodeError):
                found = {}
            now = time.monotonic()
            if ENERGY_COUNTER_MJ in found:
                mj = found[ENERGY_COUNTER_MJ]
                if self._energy_prev is not None and now > self._energy_prev[0] and mj >= self._energy_prev[1]:
                    self._account(now)  # the time before this reading at the power measured before it
                    self.measured_watts = (mj - self._energy_prev[1]) / 1000 / (now - self._energy_prev[0])
                self._energy_prev = (now, mj)
            elif POWER_GAUGE_W in found:
                self._account(now)
                self.measured_watts = found[POWER_GAUGE_W]
            await asyncio.sleep(ENERGY_INTERVAL_S)

    # --- load and health -----------------------------------------------------------------------
    def load(self) -> LoadSnapshot:
        s = self._scraped
        age = None if self._scraped_at is None else time.monotonic() - self._scraped_at
        running = _first(s, "running")
        waiting = _first(s, "waiting")
        kv = _first(s, "kv")
        return LoadSnapshot(
            running=int(running) if running is not None else self.in_flight,
            waiting=int(waiting) if waiting is not None else 0,
            in_flight=self.in_flight, kv_cache_usage=float(kv) if kv is not None else 0.0,
            prefix_cache_hit_rate=self._hit_rate,
            ttft_ewma_ms=None if self.ttft_ewma_s is None else self.ttft_ewma_s * 1000,
            tpot_ewma_ms=None if self.tpot_ewma_s is None else self.tpot_ewma_s * 1000,
            metrics_age_s=age if self._has_metrics else None,
        )

    def health(self) -> dict[str, Any]:
        return {"url": self.url, "kind": self.kind, "model": self.model, "healthy": self.healthy,
                "last_error": self.last_error, "completed": self.completed, "failed": self.failed,
                "metrics": self._has_metrics}

    def check_request(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        length = self.info.max_model_len
        if length and num_prompt_tokens + params.max_tokens > length:
            raise RequestError(f"this model's maximum context length is {length} tokens and {num_prompt_tokens} "
                               f"prompt tokens + max_tokens {params.max_tokens} were requested")
        ext = EXTENSIONS.get(self.kind, set())
        for field, used in (("top_k", params.top_k not in (0, -1)), ("min_tokens", params.min_tokens > 0),
                            ("ignore_eos", params.ignore_eos)):
            if used and field not in ext:
                raise RequestError(f"'{field}' is not supported by this model's server ({self.kind})")

    # --- generation ----------------------------------------------------------------------------
    def _body(self, prompt_ids: list[int], params: SamplingParams, priority: int,
              text: TextPrompt | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model, "max_tokens": params.max_tokens,
            "temperature": 0.0 if params.greedy else params.temperature, "top_p": params.top_p,
            "stream": True, "stream_options": {"include_usage": True},
        }
        if text is None:
            body["prompt"] = prompt_ids
        elif text.messages is not None:
            body["messages"] = list(text.messages)
        else:
            body["prompt"] = text.text
        if text is not None and not text.max_tokens_given:
            del body["max_tokens"]  # the server's own default: the rest of its context
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        if params.frequency_penalty:
            body["frequency_penalty"] = params.frequency_penalty
        if params.presence_penalty:
            body["presence_penalty"] = params.presence_penalty
        ext = EXTENSIONS.get(self.kind, set())
        if params.top_k not in (0, -1):
            body["top_k"] = params.top_k
        if params.min_tokens:
            body["min_tokens"] = params.min_tokens
        if params.ignore_eos:
            body["ignore_eos"] = True
        if priority and "priority" in ext:
            body["priority"] = priority
        return body

    def _account(self, now: float) -> None:
        """Attribute the device's time since the last change of the in-flight count to the requests in flight."""
        if self.in_flight and self._share_s:
            dt = now - self._busy_since
            each_s = dt / len(self._share_s)
            if self.energy_url:
                watts = max(0.0, (self.measured_watts or 0.0) - self.idle_watts)
            else:
                watts = self.power.busy_watts if self.power else 0.0
            for rid in self._share_s:
                self._share_s[rid] += each_s
                self._share_j[rid] += each_s * watts
        self._busy_since = now

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
                       priority: int = 0, tier: str | None = None,
                       text: TextPrompt | None = None) -> AsyncIterator[RequestOutput]:
        arrival = time.monotonic()
        self._account(arrival)
        self.in_flight += 1
        self._share_s[request_id], self._share_j[request_id] = 0.0, 0.0
        started = False
        try:
            async for out in self._stream(prompt_ids, params, request_id, priority, arrival, text):
                started = True
                yield out
            self.completed += 1
        except BackendError as exc:
            exc.started = exc.started or started
            self.failed += 1
            raise
        finally:
            self._account(time.monotonic())
            self.in_flight -= 1
            self._share_s.pop(request_id, None)
            self._share_j.pop(request_id, None)

    async def _stream(self, prompt_ids: list[int], params: SamplingParams, rid: str, priority: int,
                      arrival: float, text: TextPrompt | None = None) -> AsyncIterator[RequestOutput]:
        body = self._body(prompt_ids, params, priority, text)
        path = "/chat/completions" if text is not None and text.messages is not None else "/completions"
        times: list[float] = []
        finish: str | None = None
        usage: dict[str, Any] | None = None
        cached_hint = 0
        for attempt in (0, 1):  # a connection the server closed while idle fails before any byte: once more
            try:
                async with self.client.post(self.url + path, json=body) as r:
                    if r.status != 200:
                        raise self._http_error(r.status, (await r.read())[:2000])
                    async for raw in r.content:
                        line = raw.decode("utf-8", "replace").rstrip("\r\n")
                        if not line.startswith("data:"):
                            continue
                        data = line[5:].strip()
                        if data == "[DONE]":
                            continue  # read on to the end of the body, so the connection can be reused
                        try:
                            obj = json.loads(data)
                        except ValueError:
                            raise BackendError(f"{self.name} sent a stream event that is not JSON",
                                               retryable=True, started=bool(times)) from None
                        if "error" in obj:
                            err = obj["error"]
                            msg = err.get("message", err) if isinstance(err, dict) else err
                            raise BackendError(f"{self.name}: {msg}", retryable=not times, started=bool(times))
                        if obj.get("usage"):
                            usage = obj["usage"]
                        timings = obj.get("timings")  # llama-server: cache_n = prompt tokens reused
                        if isinstance(timings, dict) and timings.get("cache_n") is not None:
                            cached_hint = int(timings["cache_n"])
                        for ch in obj.get("choices") or []:
                            delta = ch.get("text")
                            if delta is None and isinstance(ch.get("delta"), dict):  # a chat chunk
                                delta = ch["delta"].get("content")
                            if ch.get("finish_reason"):
                                finish = ch["finish_reason"]
                            if delta:
                                now = time.monotonic()
                                times.append(now)
                                yield RequestOutput(rid, (), delta, False, None, len(prompt_ids), len(times),
                                                    0, now)
                break
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
                # a pooled connection the server had closed while idle fails before any byte comes back
                first_byte_lost = isinstance(exc, aiohttp.ServerDisconnectedError) and not times and usage is None
                if first_byte_lost and attempt == 0:
                    continue
                raise BackendError(f"{self.name}: {type(exc).__name__}: {exc}", retryable=not times,
                                   started=bool(times)) from None
        if finish is None:
            raise BackendError(f"{self.name} ended the stream without a finish reason", retryable=not times,
                               started=bool(times))
        end = time.monotonic()
        self._account(end)
        prompt = int(usage.get("prompt_tokens", len(prompt_ids))) if usage else len(prompt_ids)
        completion = int(usage.get("completion_tokens", len(times))) if usage else len(times)
        details = (usage or {}).get("prompt_tokens_details") or {}
        cached = int(details.get("cached_tokens") or cached_hint or 0)
        gaps = [b - a for a, b in zip(times, times[1:])]
        ttft = times[0] - arrival if times else None
        tpot = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None
        if ttft is not None:
            self.ttft_ewma_s = ttft if self.ttft_ewma_s is None else (1 - EWMA) * self.ttft_ewma_s + EWMA * ttft
        if tpot is not None:
            self.tpot_ewma_s = tpot if self.tpot_ewma_s is None else (1 - EWMA) * self.tpot_ewma_s + EWMA * tpot
        joules, device_s, source = self._share_j.get(rid, 0.0), self._share_s.get(rid, 0.0), self.energy.source
        reported = (usage or {}).get("tokenfab_energy")  # a tokenfab worker's own attribution
        if (self.power is None and not self.energy_url and isinstance(reported, dict)
                and reported.get("joules") is not None):
            joules, device_s = float(reported["joules"]), float(reported.get("device_s") or device_s)
            source = f"worker:{reported.get('source', '?')}"
        metering = RequestMetering(
            arrival_s=arrival, queue_s=None, ttft_s=ttft, tpot_s=tpot,
            itl_p50_s=_quantile(gaps, 0.5), itl_p99_s=_quantile(gaps, 0.99), itl_max_s=max(gaps) if gaps else None,
            e2e_s=end - arrival, joules=joules, device_s=device_s, num_preemptions=0, energy_source=source)
        yield RequestOutput(rid, (), "", True, finish, prompt, completion, cached, end, metering)

    def _http_error(self, status: int, raw: bytes) -> BackendError:
        try:
            err = json.loads(raw).get("error")
            msg = err.get("message") if isinstance(err, dict) else str(err)
        except (ValueError, AttributeError):
            msg = raw.decode("utf-8", "replace")[:300]
        # the server's own trouble (5xx, overloaded) may pass on another backend; a request it refuses won't
        retryable = status >= 500 or status == 429
        return BackendError(f"{self.name} answered {status}: {msg}", retryable=retryable, status=status)


def _quantile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]
