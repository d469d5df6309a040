"""`tokenfab worker`: one engine as its own process, behind an OpenAI-compatible HTTP surface, for a gateway to route to.

A worker has no keys, tiers or ledger: the gateway in front of it authenticates, admits, meters
and bills. It serves `POST /v1/completions` (a prompt as text or token ids) and
`POST /v1/chat/completions` (templated with the model's own chat template), streamed or not,
with vLLM's extensions (`top_k`, `min_tokens`, `ignore_eos`, `priority`) and usage that counts
the prompt tokens served from the prefix cache. It reports its load where a router looks for it:
`GET /metrics` uses vLLM's metric names (so llm-d's EPP or vllm-router read it too), and
`GET /load` gives the same as JSON. Running each replica as a process of its own also gives each
engine a GIL of its own: HTTP parsing in the gateway never delays a worker's step.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tokenfab.backends.base import Backend
from tokenfab.generation import RequestError, RequestOutput
from tokenfab.serve.body import parse_json, read_body, until_disconnect, validate
from tokenfab.serve.formats import ChatFormat, CompletionFormat, Format, sse_event
from tokenfab.serve.protocol import APIError, ChatRequest, CompletionRequest

log = logging.getLogger("tokenfab.worker")
MAX_BODY_BYTES = 8 << 20
MAX_PRIORITY = 1 << 20


class WorkerCompletionRequest(CompletionRequest):
    priority: int = 0  # vLLM's extension: lower runs first


class WorkerChatRequest(ChatRequest):
    priority: int = 0


class Counters:
    """Totals since start, for /metrics: requests, and prompt tokens looked up in / served from the prefix cache."""

    def __init__(self) -> None:
        self.requests = {"completed": 0, "failed": 0, "aborted": 0}
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.generation_tokens = 0

    def finished(self, last: RequestOutput | None, status: str) -> None:
        self.requests[status] += 1
        if last is not None:
            self.prompt_tokens += last.prompt_tokens
            self.cached_tokens += last.cached_tokens
            self.generation_tokens += last.completion_tokens


class Worker:
    def __init__(self, backend: Backend, served_name: str = "") -> None:
        if backend.tokenizer is None:
            raise ValueError("a worker needs a backend with a tokenizer of its own")
        self.backend = backend
        self.tokenizer = backend.tokenizer
        self.model_name = served_name or backend.info.name
        self.created = int(time.time())
        self.counters = Counters()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)  # collect() below, at each scrape

    # --- load, as vLLM names it ---------------------------------------------------------------
    def collect(self) -> Any:
        load = self.backend.load()
        labels = ["model_name"]
        name = [self.model_name]

        def gauge(metric: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(metric, doc, labels=labels)
            g.add_metric(name, value)
            return g

        def counter(metric: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(metric, doc, labels=labels)
            c.add_metric(name, value)
            return c

        c = self.counters
        yield gauge("vllm:num_requests_running", "Requests in the running batch.", load.running)
        yield gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.", load.waiting)
        yield gauge("vllm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1).", load.kv_cache_usage)
        yield counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", c.prompt_tokens)
        yield counter("vllm:prefix_cache_hits", "Prompt tokens served from the prefix cache.", c.cached_tokens)
        yield counter("vllm:prompt_tokens", "Prompt tokens of finished requests.", c.prompt_tokens)
        yield counter("vllm:generation_tokens", "Generated tokens of finished requests.", c.generation_tokens)
        yield gauge("tokenfab:step_ewma_seconds", "Recent engine step time (EWMA).", (load.step_ewma_ms or 0) / 1000)
        ok = CounterMetricFamily("vllm:request_success", "Finished requests.", labels=[*labels, "finished_reason"])
        for status, n in c.requests.items():
            ok.add_metric([*name, status], n)
        yield ok

    def load_json(self) -> dict[str, Any]:
        load = self.backend.load()
        c = self.counters
        return {"model": self.model_name, "running": load.running, "waiting": load.waiting,
                "in_flight": load.in_flight, "kv_cache_usage": load.kv_cache_usage, "steps": load.steps,
                "step_ewma_ms": load.step_ewma_ms, "max_num_seqs": self.backend.max_num_seqs,
                "prefix_cache_hit_rate": c.cached_tokens / c.prompt_tokens if c.prompt_tokens else None,
                "requests": dict(c.requests)}

    # --- routes --------------------------------------------------------------------------------
    async def health(self, request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "model": self.model_name, **self.load_json()})

    async def metrics(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type="text/plain; version=0.0.4")

    async def load(self, request: Request) -> JSONResponse:
        return JSONResponse(self.load_json())

    async def models(self, request: Request) -> JSONResponse:
        info = self.backend.info
        return JSONResponse({"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": self.created, "owned_by": "tokenfab",
            "max_model_len": info.max_model_len, "synthetic": info.synthetic,
            "vocab_size": self.backend.vocab_size, "max_num_seqs": self.backend.max_num_seqs,
            "kv_cache_tokens": self.backend.kv_cache_tokens}]})

    async def _read(self, request: Request, cls: type[Any]) -> Any:
        req = validate(parse_json(await read_body(request, MAX_BODY_BYTES)), cls)
        if req.model != self.model_name:
            raise APIError(404, f"this worker serves '{self.model_name}', not '{req.model[:100]}'", param="model",
                           code="model_not_found")
        if req.n != 1 or req.logit_bias:
            raise APIError(400, "n > 1 and logit_bias are not supported", param="n" if req.n != 1 else "logit_bias")
        if not -MAX_PRIORITY <= req.priority <= MAX_PRIORITY:
            raise APIError(400, f"priority must be within +-{MAX_PRIORITY}", param="priority")
        return req

    async def completions(self, request: Request) -> Response:
        req = await self._read(request, WorkerCompletionRequest)
        prompt = req.single_prompt()
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            vocab = self.backend.vocab_size
            if any(not 0 <= t < vocab for t in prompt):
                raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
            ids = list(prompt)
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        return await self._run(request, req, ids, max_tokens, "cmpl-", CompletionFormat)

    async def chat(self, request: Request) -> Response:
        req = await self._read(request, WorkerChatRequest)
        if req.logprobs or req.top_logprobs or req.tools:
            raise APIError(400, "logprobs and tools are not supported by this worker",
                           param="tools" if req.tools else "logprobs")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        try:
            ids = self.tokenizer.encode_chat(messages)
        except Exception as exc:  # noqa: BLE001 - template errors are the caller's message shape
            raise APIError(400, f"messages cannot be formatted with the model's chat template: {exc}",
                           param="messages") from None
        limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = limit if limit is not None else max(1, self.backend.info.max_model_len - len(ids))
        return await self._run(request, req, ids, max_tokens, "chatcmpl-", ChatFormat)

    async def _run(self, request: Request, req: Any, ids: list[int], max_tokens: int, prefix: str,
                   fmt: type[Format]) -> Response:
        params = req.sampling_params(max_tokens)
        try:
            self.backend.check_request(len(ids), params)
        except RequestError as exc:
            raise APIError(400, str(exc), param="prompt", code="context_length_exceeded") from None
        rid = prefix + uuid.uuid4().hex
        agen = self._counted(self.backend.generate(ids, params, rid, req.priority))
        f = fmt(rid, self.model_name)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        if req.stream:
            return StreamingResponse(self._sse(agen, f, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Request-Id": rid})
        result = await until_disconnect(request, _collect(agen))
        if result is None:
            return Response(status_code=499)
        text, last = result
        if last.error is not None:
            raise APIError(500, f"generation failed: {last.error}", type_="server_error", code="generation_failed")
        return JSONResponse(f.full(text, last), headers={"X-Request-Id": rid})

    async def _counted(self, agen: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
        last: RequestOutput | None = None
        try:
            async for out in agen:
                last = out
                yield out
        finally:
            status = "aborted" if last is None or not last.finished else "failed" if last.error else "completed"
            self.counters.finished(last if last is not None and last.finished else None, status)
            await agen.aclose()

    async def _sse(self, agen: AsyncIterator[RequestOutput], f: Format, include_usage: bool) -> AsyncIterator[bytes]:
        last: RequestOutput | None = None
        try:
            yield sse_event(f.first())
            async for out in agen:
                last = out
                if out.error is not None:
                    yield sse_event({"error": {"message": f"generation failed: {out.error}", "type": "server_error",
                                               "param": None, "code": "generation_failed"}})
                    return
                if out.text or out.finished:
                    yield sse_event(f.chunk(out.text, out.finish_reason if out.finished else None))
            if include_usage and last is not None:
                yield sse_event(self._usage_chunk(f, last))
            yield b"data: [DONE]\n\n"
        finally:
            await agen.aclose()


    def _usage_chunk(self, f: Format, last: RequestOutput) -> dict[str, Any]:
        """OpenAI's usage chunk, plus the energy the engine attributed to the request (an extension field)."""
        body = f.usage_chunk(last)
        m = last.metering
        if m is not None and self.backend.energy.source != "none":
            body["usage"]["tokenfab_energy"] = {"joules": m.joules, "device_s": m.device_s,
                                                "source": self.backend.energy.source,
                                                "measured": self.backend.energy.measured}
        return body


async def _collect(agen: AsyncIterator[RequestOutput]) -> tuple[str, RequestOutput]:
    parts: list[str] = []
    last = None
    async for out in agen:
        parts.append(out.text)
        last = out
    assert last is not None
    return "".join(parts), last


def build_worker_app(backend: Backend, served_name: str = "") -> Starlette:
    w = Worker(backend, served_name)

    def guarded(handler: Any) -> Any:
        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except APIError as exc:
                return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)
            except Exception as exc:  # noqa: BLE001 - a bug: logged and answered; the worker goes on
                log.exception("unhandled error on %s", request.url.path)
                err = APIError(500, f"internal error ({type(exc).__name__})", type_="server_error")
                return JSONResponse(err.body(), status_code=500)

        return route

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        err = APIError(exc.status_code, f"{request.method} {request.url.path[:200]}: {exc.detail}")
        return JSONResponse(err.body(), status_code=exc.status_code)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        backend.shutdown()

    routes = [
        Route("/health", guarded(w.health), methods=["GET"]),
        Route("/metrics", guarded(w.metrics), methods=["GET"]),
        Route("/load", guarded(w.load), methods=["GET"]),
        Route("/v1/models", guarded(w.models), methods=["GET"]),
        Route("/v1/completions", guarded(w.completions), methods=["POST"]),
        Route("/v1/chat/completions", guarded(w.chat), methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: on_http_error}, lifespan=lifespan)
    app.state.worker = w
    return app
