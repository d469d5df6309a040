"""The HTTP gateway: /v1/models, /v1/completions, /v1/chat/completions (SSE or not), /health.

A request goes: read body (bounded) -> parse and validate -> tokenise -> check it fits ->
shed load if the queue is full -> stream from the engine. Every failure becomes an OpenAI error
body; a client that goes away aborts its sequence, which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tokenfab.config import Settings
from tokenfab.engine.async_engine import AsyncEngine
from tokenfab.engine.llm_engine import RequestError, RequestOutput
from tokenfab.engine.sampling import SamplingParams
from tokenfab.serve.protocol import APIError, ChatRequest, CompletionRequest, validation_error

log = logging.getLogger("tokenfab.serve")


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


class Gateway:
    def __init__(self, settings: Settings, engine: AsyncEngine) -> None:
        self.settings = settings
        self.engine = engine
        core = engine.engine
        self.tokenizer = core.tokenizer
        self.loaded = core.loaded
        self.model_name = settings.server.served_model_name or core.loaded.name
        self.created = int(time.time())
        self.max_model_len = core.max_model_len

    # --- plumbing ------------------------------------------------------------------------------
    async def read_json(self, request: Request) -> Any:
        limit = self.settings.server.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"request body is {declared} bytes; the limit is {limit} bytes", code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
            chunks.append(chunk)
        raw = b"".join(chunks)
        if not raw.strip():
            raise APIError(400, "request body is empty: send a JSON object")
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(400, f"request body is not valid JSON: {exc}") from None

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(
                404, f"the model '{name}' does not exist; this server serves '{self.model_name}' (see GET /v1/models)",
                param="model", code="model_not_found",
            )

    def sampling(self, req: CompletionRequest | ChatRequest, max_tokens: int, prompt_len: int) -> SamplingParams:
        if req.n != 1:
            raise APIError(400, f"n={req.n} is not supported: this server returns one choice; send n separate requests",
                           param="n")
        if req.logit_bias:
            raise APIError(400, "logit_bias is not supported by this server", param="logit_bias")
        if max_tokens < 1:
            raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
        try:
            return SamplingParams(
                max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                seed=req.seed, stop=req.stop_list(), ignore_eos=req.ignore_eos, min_tokens=req.min_tokens,
                frequency_penalty=req.frequency_penalty, presence_penalty=req.presence_penalty,
            )
        except ValueError as exc:
            raise APIError(400, str(exc)) from None

    def admit(self, prompt_ids: list[int], params: SamplingParams, param: str) -> None:
        try:
            self.engine.engine.check_request(len(prompt_ids), params)
        except RequestError as exc:
            raise APIError(400, str(exc), param=param, code="context_length_exceeded") from None
        core = self.engine.engine
        limit = self.settings.server.max_waiting + core.config.max_num_seqs
        if self.engine.num_in_flight >= limit:
            retry = max(1, round(self.engine.step_ewma_s * 64))
            raise APIError(
                429, f"server overloaded: {self.engine.num_in_flight} requests in flight (limit {limit}); retry later",
                type_="rate_limit_error", code="overloaded", headers={"Retry-After": str(retry)},
            )

    async def run(self, request: Request, prompt_ids: list[int], params: SamplingParams, rid: str,
                  stream: bool, include_usage: bool, fmt: type[_Format]) -> Response:
        agen = self.engine.generate(prompt_ids, params, rid)
        f = fmt(rid, self.model_name)
        if stream:
            return StreamingResponse(self._sse(agen, f, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Request-Id": rid})
        result = await _until_disconnect(request, _collect(agen))
        if result is None:  # client went away; the sequence was aborted
            return Response(status_code=499)
        text, last = result
        return JSONResponse(f.full(text, last), headers={"X-Request-Id": rid})

    async def _sse(self, agen: AsyncIterator[RequestOutput], f: _Format, include_usage: bool) -> AsyncIterator[bytes]:
        last: RequestOutput | None = None
        try:
            yield _sse(f.first())
            async for out in agen:
                last = out
                if out.text or out.finished:
                    yield _sse(f.chunk(out.text, out.finish_reason if out.finished else None))
            if include_usage and last is not None:
                yield _sse(f.usage_chunk(last))
        except Exception as exc:  # noqa: BLE001 - report in-band; the HTTP status is already sent
            log.exception("stream %s failed", f.rid)
            yield _sse({"error": {"message": f"generation failed: {exc}", "type": "server_error", "param": None,
                                  "code": None}})
        finally:
            await agen.aclose()
        yield b"data: [DONE]\n\n"

    # --- routes --------------------------------------------------------------------------------
    async def health(self, request: Request) -> JSONResponse:
        core = self.engine.engine
        return JSONResponse({
            "status": "ok", "model": self.model_name, "synthetic": self.loaded.synthetic,
            "running": len(core.scheduler.running), "waiting": len(core.scheduler.waiting),
            "in_flight": self.engine.num_in_flight, "kv_cache_usage": round(core.block_manager.usage(), 4),
            "steps": self.engine.num_steps, "step_ewma_ms": round(self.engine.step_ewma_s * 1000, 3),
        })

    def _model_card(self) -> dict[str, Any]:
        core = self.engine.engine
        return {
            "id": self.model_name, "object": "model", "created": self.created, "owned_by": "tokenfab",
            "synthetic": self.loaded.synthetic, "source": self.loaded.source,
            "quantization": self.loaded.quantization, "dtype": str(core.dtype).replace("torch.", ""),
            "max_model_len": self.max_model_len,
        }

    async def models(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> JSONResponse:
        self.check_model(request.path_params["model"])
        return JSONResponse(self._model_card())

    async def completions(self, request: Request) -> Response:
        body = await self.read_json(request)
        try:
            req = CompletionRequest.model_validate(body)
        except ValidationError as exc:
            raise validation_error(exc) from None
        self.check_model(req.model)
        for name, bad in (("echo", req.echo), ("logprobs", req.logprobs), ("suffix", req.suffix),
                          ("best_of", req.best_of not in (None, 1))):
            if bad:
                raise APIError(400, f"'{name}' is not supported by this server", param=name)
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise APIError(400, f"a batch of {len(prompt)} prompts is not supported: send one prompt per request",
                               param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            vocab = self.engine.engine.vocab_limit
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"prompt token ids must be in [0, {vocab}); got {bad[0]}", param="prompt")
            ids = list(prompt)
        if not ids:
            raise APIError(400, "the prompt is empty: give at least one token of input", param="prompt")
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        params = self.sampling(req, max_tokens, len(ids))
        self.admit(ids, params, "prompt")
        rid = "cmpl-" + uuid.uuid4().hex
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return await self.run(request, ids, params, rid, req.stream, include_usage, _CompletionFormat)

    async def chat(self, request: Request) -> Response:
        body = await self.read_json(request)
        try:
            req = ChatRequest.model_validate(body)
        except ValidationError as exc:
            raise validation_error(exc) from None
        self.check_model(req.model)
        if req.logprobs or req.top_logprobs:
            raise APIError(400, "'logprobs' is not supported by this server", param="logprobs")
        if req.tools:
            raise APIError(400, "tool calling is not supported by this model's server", param="tools")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages)
        except Exception as exc:  # noqa: BLE001 - template errors are the caller's message shape
            raise APIError(400, f"messages cannot be formatted with the model's chat template: {exc}",
                           param="messages") from None
        ids = self.tokenizer.encode(text)
        limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = limit if limit is not None else max(1, self.max_model_len - len(ids))
        params = self.sampling(req, max_tokens, len(ids))
        self.admit(ids, params, "messages")
        rid = "chatcmpl-" + uuid.uuid4().hex
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return await self.run(request, ids, params, rid, req.stream, include_usage, _ChatFormat)


# --- response shapes ------------------------------------------------------------------------------
def _usage(o: RequestOutput) -> dict[str, Any]:
    return {
        "prompt_tokens": o.prompt_tokens, "completion_tokens": o.completion_tokens,
        "total_tokens": o.prompt_tokens + o.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": o.cached_tokens},
    }


class _Format:
    object_full = ""
    object_chunk = ""

    def __init__(self, rid: str, model: str) -> None:
        self.rid, self.model, self.created = rid, model, int(time.time())

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.model}

    def usage_chunk(self, last: RequestOutput) -> dict[str, Any]:
        return {**self._base(self.object_chunk), "choices": [], "usage": _usage(last)}

    def first(self) -> dict[str, Any]:
        raise NotImplementedError

    def chunk(self, text: str, finish: str | None) -> dict[str, Any]:
        raise NotImplementedError

    def full(self, text: str, last: RequestOutput) -> dict[str, Any]:
        raise NotImplementedError


class _CompletionFormat(_Format):
    object_full = object_chunk = "text_completion"

    def first(self) -> dict[str, Any]:
        return self.chunk("", None)

    def chunk(self, text: str, finish: str | None) -> dict[str, Any]:
        return {**self._base(self.object_chunk),
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

    def full(self, text: str, last: RequestOutput) -> dict[str, Any]:
        return {**self._base(self.object_full),
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": last.finish_reason}],
                "usage": _usage(last)}


class _ChatFormat(_Format):
    object_full = "chat.completion"
    object_chunk = "chat.completion.chunk"

    def first(self) -> dict[str, Any]:
        return {**self._base(self.object_chunk),
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}]}

    def chunk(self, text: str, finish: str | None) -> dict[str, Any]:
        delta = {"content": text} if text else {}
        return {**self._base(self.object_chunk),
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    def full(self, text: str, last: RequestOutput) -> dict[str, Any]:
        return {**self._base(self.object_full),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": last.finish_reason}],
                "usage": _usage(last)}


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


async def _collect(agen: AsyncIterator[RequestOutput]) -> tuple[str, RequestOutput]:
    parts: list[str] = []
    last = None
    async for out in agen:
        parts.append(out.text)
        last = out
    assert last is not None
    return "".join(parts), last


async def _until_disconnect(request: Request, coro: Any) -> Any:
    """Await `coro`, or cancel it (aborting the sequence) if the client disconnects first."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work = asyncio.ensure_future(coro)
    watch = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if work in done:
        return work.result()
    work.cancel()
    try:
        await work
    except asyncio.CancelledError:
        pass
    return None


def _lifespan(engine: AsyncEngine) -> Any:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        engine.shutdown()

    return lifespan


def build_app(settings: Settings, engine: AsyncEngine) -> Starlette:
    gw = Gateway(settings, engine)

    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        return error_response(exc)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = "not_found" if exc.status_code == 404 else None
        msg = f"{request.method} {request.url.path}: {exc.detail}"
        if exc.status_code == 404:
            msg += " (routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET /health)"
        return error_response(APIError(exc.status_code, msg, code=kind))

    async def on_error(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(APIError(500, f"internal error: {exc}", type_="server_error"))

    routes = [
        Route("/health", gw.health, methods=["GET"]),
        Route("/v1/models", gw.models, methods=["GET"]),
        Route("/v1/models/{model:path}", gw.model, methods=["GET"]),
        Route("/v1/completions", gw.completions, methods=["POST"]),
        Route("/v1/chat/completions", gw.chat, methods=["POST"]),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={APIError: on_api_error, HTTPException: on_http_error, Exception: on_error},
        lifespan=_lifespan(engine),
    )
    app.state.gateway = gw
    return app
