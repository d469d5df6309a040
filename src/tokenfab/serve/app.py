"""The HTTP gateway: /v1/models, /v1/completions, /v1/chat/completions (SSE or not), /v1/usage, /health.

A request goes: authenticate -> read the body (bounded in bytes and JSON objects) -> validate ->
refuse an oversized prompt from a cheap bound -> template and tokenise on a worker thread ->
check it fits -> admit by tier (checked and counted in one synchronous step) -> reserve its budget
-> stream from the engine. Nothing slow runs on the event loop: ledger calls, templating and
tokenising run on their own thread pools, and settling a request that ends abruptly is handed to
the ledger's pool without waiting. Every failure, expected or not, becomes an OpenAI error body
with the connection kept; a client that goes away aborts its sequence, which frees its KV blocks.
While requests run, a keeper thread checkpoints what each has delivered (see ledger/keeper.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import functools
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tokenfab.backends.base import Backend, BackendError, NoBackendAvailable
from tokenfab.config import Settings, legacy_ledger_hint
from tokenfab.economics.cost import request_cost_usd
from tokenfab.economics.tiers import Tier
from tokenfab.generation import RequestError, RequestOutput, SamplingParams, TextPrompt
from tokenfab.ledger.keeper import LeaseKeeper, Progress
from tokenfab.ledger.store import Ledger, Principal, UsageRecord
from tokenfab.ledger.writer import LedgerWriter
from tokenfab.meter.metrics import FactoryMetrics
from tokenfab.serve.admission import Admission
from tokenfab.serve.body import parse_json, read_body, until_disconnect, validate
from tokenfab.serve.formats import ChatFormat, CompletionFormat, Format, sse_event
from tokenfab.serve.openapi import openapi_document
from tokenfab.serve.protocol import APIError, ChatRequest, CompletionRequest

log = logging.getLogger("tokenfab.serve")
_Req = TypeVar("_Req", CompletionRequest, ChatRequest)
USAGE_MAX_LIMIT = 10_000
HEAVY_BODY_BYTES = 256 * 1024  # bodies from this size on are parsed one at a time ...
PASSTHROUGH_BYTES_PER_TOKEN = 16  # sizes the body cap when the gateway has no tokenizer to say
INLINE_TOKENISE_CHARS = 1024  # text up to this long is tokenised on the event loop (tens of us)
HEAVY_BODY_PAUSE_S = 0.010  # ... each followed by this long for the engine thread (a decode step or more)


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


class GenerationFailed(RuntimeError):
    """The engine ended a request with an error (its own fault or the engine's; the others went on)."""


@dataclass
class Ctx:
    """One admitted request: who, which tier, what it may cost, its id, and what it has delivered."""

    rid: str
    principal: Principal
    tier: Tier
    prompt_tokens: int
    max_tokens: int
    admitted_s: float = 0.0
    started: bool = False
    predicted_ttft_s: float | None = None  # admission's raw prediction, to learn its bias from
    received_s: float | None = None  # when the server began reading the request (monotonic)
    delivered: int = 0  # completion tokens handed to the client so far
    backend: str | None = None  # where it was sent, once known
    prompt_known: bool = True  # False: `prompt_tokens` is an upper bound (a text prompt, counted by the backend)

    @property
    def billable_prompt_tokens(self) -> int:
        """What a cut-off request's prompt is billed at before the backend has counted it: never a guess above."""
        return self.prompt_tokens if self.prompt_known else 0

    def price_so_far_usd(self) -> float:
        return charge_usd(self.tier, self.billable_prompt_tokens, self.delivered)


def charge_usd(tier: Tier, prompt_tokens: int, completion_tokens: int) -> float:
    """What a request that delivered `completion_tokens` is charged: nothing before its first token,
    then its prompt and each token at the tier's rates."""
    return tier.price_usd(prompt_tokens, completion_tokens) if completion_tokens else 0.0


class Gateway:
    def __init__(self, settings: Settings, backend: Backend, ledger: Ledger, metrics: FactoryMetrics) -> None:
        self.settings = settings
        self.backend = backend
        self.ledger = ledger
        self.metrics = metrics
        self.energy_source = backend.energy.source
        self.tiers = settings.tiers
        if backend.tokenizer is None and not backend.capabilities.text_prompts:
            raise ValueError(f"{type(backend).__name__} {backend.name} has no tokenizer and takes no text prompts")
        self.admission = Admission(settings.tiers, backend.step_model, backend.max_num_batched_tokens,
                                   settings.admission.tier_queue_limit, settings.admission.admission_slack,
                                   enabled=settings.admission.tier_scheduling)
        self.tokenizer = backend.tokenizer  # None: the backends template and tokenise (prompts pass through as text)
        self.model_name = settings.server.served_model_name or backend.info.name
        self.created = int(time.time())
        self.max_model_len = backend.info.max_model_len
        self.max_token_bytes = self.tokenizer.max_token_bytes if self.tokenizer is not None else None
        self.max_body_bytes = settings.server.max_body_bytes or auto_body_bytes(
            self.max_model_len, self.max_token_bytes or PASSTHROUGH_BYTES_PER_TOKEN)
        self._heavy = asyncio.Lock()
        # templating and tokenising (the tokenizer releases the GIL), and the ledger, each on threads of their own;
        # tokenising runs at a lower CPU priority than the engine, so a long prompt arriving slows no live stream
        self._prep = cf.ThreadPoolExecutor(2, thread_name_prefix="tokenfab-prep", initializer=_lower_priority)
        self._db = cf.ThreadPoolExecutor(4, thread_name_prefix="tokenfab-ledger")  # reads
        self._writer = LedgerWriter(ledger)  # reservations and settlements, group-committed
        self.live: dict[str, Ctx] = {}  # admitted and not yet settled, by request id
        self._ensured: set[str] = set()  # keyless tenants known to exist in the ledger
        self.keeper = LeaseKeeper(ledger, self.progress, settings.ledger.checkpoint_interval_s)
        self._openapi = openapi_document(self.model_name)
        members = getattr(backend, "members", None)  # a fleet: per-backend metrics
        self.fleet_members = members
        if members is not None:
            metrics.watch_fleet(lambda: [(m.name, m.backend.healthy, m.backend.load()) for m in members])

    def start(self) -> None:
        self.keeper.start()

    def close(self) -> None:
        """After the HTTP server has stopped: write the last settles and checkpoint, free the pools."""
        self._db.shutdown(wait=True)
        self._writer.shutdown(wait=True)
        self.keeper.stop()
        self._prep.shutdown(wait=False, cancel_futures=True)

    def progress(self) -> Progress:
        """Each live request's delivered tokens and price so far (the keeper thread calls this)."""
        return {c.rid: (c.delivered, c.price_so_far_usd()) for c in list(self.live.values())}

    async def _on(self, pool: cf.Executor, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args))

    async def _write(self, fn: Callable[..., Any], *args: Any) -> Any:
        """A ledger write, committed (durably) with whatever other writes are waiting (ledger/writer.py)."""
        return await asyncio.wrap_future(self._writer.submit(fn, *args))

    async def _tokenise(self, fn: Callable[[Any], list[int]], arg: Any, chars: int) -> list[int]:
        """Short text is tokenised here, on the event loop (tens of microseconds, less than a thread hop);
        longer text on the prep threads, at a lower priority than any engine."""
        if chars <= INLINE_TOKENISE_CHARS:
            return fn(arg)
        return await self._on(self._prep, fn, arg)

    # --- plumbing ------------------------------------------------------------------------------
    async def read_request(self, request: Request, model_cls: type[_Req]) -> _Req:
        """Read, parse and validate a request body and check its model.

        Parsing and validating hold the GIL for as long as they run (a few ms per MB), and the engine
        thread needs the GIL between every op of a step, so a step is delayed by the sum of all the
        parses that run during it. Large bodies are therefore parsed one at a time, each followed by
        a pause in which the engine runs: a burst of them delays a step by one parse, not by all.
        """
        raw = await read_body(request, self.max_body_bytes)
        if len(raw) < HEAVY_BODY_BYTES:
            req = validate(parse_json(raw), model_cls)
        else:
            async with self._heavy:
                try:
                    req = validate(parse_json(raw), model_cls)
                finally:
                    await asyncio.sleep(HEAVY_BODY_PAUSE_S)
        self.check_model(req.model)
        return req

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            shown = name if len(name) <= 100 else name[:100] + "..."
            raise APIError(
                404, f"the model '{shown}' does not exist; this server serves '{self.model_name}' (see GET /v1/models)",
                param="model", code="model_not_found",
            )

    def sampling(self, req: CompletionRequest | ChatRequest, max_tokens: int) -> SamplingParams:
        if req.n != 1:
            raise APIError(400, f"n={req.n} is not supported: this server returns one choice; send n separate requests",
                           param="n")
        if req.logit_bias:
            raise APIError(400, "logit_bias is not supported by this server", param="logit_bias")
        if max_tokens < 1:
            raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
        if max_tokens >= self.max_model_len:
            raise self._too_long(f"max_tokens is {max_tokens}", "max_tokens")
        return req.sampling_params(max_tokens)

    def _too_long(self, what: str, param: str) -> APIError:
        return APIError(400, f"this model's maximum context length is {self.max_model_len} tokens and {what}; "
                        "shorten the prompt or lower max_tokens", param=param, code="context_length_exceeded")

    def bound_text(self, texts: list[str], max_tokens: int | None, param: str) -> None:
        """Refuse text that cannot fit, before tokenising it: no token stands for more than
        `max_token_bytes` bytes, so n bytes are at least n / max_token_bytes tokens."""
        if self.max_token_bytes is None:  # no tokenizer: the backend checks the length itself
            return
        nbytes = sum(len(t.encode("utf-8")) for t in texts)
        at_least = math.ceil(nbytes / self.max_token_bytes)
        if at_least + (max_tokens or 1) > self.max_model_len:
            raise self._too_long(f"the {param} hold {nbytes} bytes of text, at least {at_least} tokens"
                                 + (f", plus max_tokens {max_tokens}" if max_tokens else ""), param)

    async def principal(self, request: Request) -> Principal:
        auth = request.headers.get("authorization", "")
        if not auth:
            anon = self.settings.ledger.anonymous_tier
            if anon:
                return Principal("anonymous", anon, None)
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>' (create one with "
                           "`tokenfab keys create`)", type_="authentication_error", code="missing_api_key")
        scheme, _, key = auth.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise APIError(401, "malformed Authorization header: use 'Bearer <key>'", type_="authentication_error",
                           code="invalid_api_key")
        p = await self._on(self._db, self.ledger.authenticate, key.strip())
        if p is None:
            raise APIError(401, "invalid or revoked API key", type_="authentication_error", code="invalid_api_key")
        return p

    def tier_of(self, p: Principal) -> Tier:
        try:
            return self.tiers.get(p.tier)
        except ValueError:
            raise APIError(403, f"this key's tier '{p.tier}' is not offered by this server "
                           f"(tiers: {', '.join(self.tiers.names)})", type_="permission_error",
                           code="unknown_tier") from None

    def _reject(self, tier: str, reason: str, message: str, retry_s: int) -> APIError:
        self.metrics.rejections.labels(tier, reason).inc()
        return APIError(429, message + "; retry later", type_="rate_limit_error", code=reason,
                        headers={"Retry-After": str(retry_s)})

    async def admit(self, request: Request, principal: Principal, prompt_ids: list[int], params: SamplingParams,
                    param: str, prefix: str, text: TextPrompt | None = None) -> Ctx:
        """A text prompt (no tokenizer here) is judged by the most tokens it can be (admission, the budget's
        reservation) and the fewest (whether it fits: the backend refuses what does not)."""
        tier = self.tier_of(principal)
        n_prompt = len(prompt_ids) if text is None else text.upper_bound_tokens()
        try:
            self.backend.check_request(len(prompt_ids) if text is None else 1, params)
        except RequestError as exc:
            self.metrics.rejections.labels(tier.name, "too_long").inc()
            raise APIError(400, str(exc), param=param, code="context_length_exceeded") from None
        limit = self.settings.server.max_waiting + self.backend.max_num_seqs
        in_flight = self.admission.total_in_flight
        if in_flight >= limit:
            step_ms = self.backend.load().step_ewma_ms or 0.0
            raise self._reject(tier.name, "overloaded", f"server overloaded: {in_flight} requests "
                               f"in flight (limit {limit})", max(1, round(step_ms * 64 / 1000)))
        # checked and counted in one step: no other request can be judged between the two
        rej = self.admission.admit(tier, n_prompt)
        if rej is not None:
            raise self._reject(tier.name, rej.reason, rej.message, rej.retry_after_s)
        predicted = self.admission.last_prediction_s
        try:
            rid = prefix + uuid.uuid4().hex
            worst = tier.price_usd(n_prompt, params.max_tokens)
            if principal.key_id is None and principal.tenant not in self._ensured:
                await self._on(self._db, self.ledger.ensure_tenant, principal.tenant)
                self._ensured.add(principal.tenant)  # tenants are never deleted: once is enough
            ok = await self._write(self.ledger.reserve_in, rid, principal.tenant, tier.name, self.model_name,
                                worst, n_prompt)
            if not ok:
                raise await self._budget_error(principal, tier, n_prompt, params.max_tokens, worst)
        except BaseException:
            self.admission.withdraw(tier.name, n_prompt)
            raise
        self.metrics.in_flight.labels(tier.name).inc()
        self.metrics.queued.labels(tier.name).inc()
        ctx = Ctx(rid, principal, tier, n_prompt, params.max_tokens, time.monotonic(),
                  predicted_ttft_s=predicted, received_s=getattr(request.state, "received_s", None),
                  prompt_known=text is None)
        self.live[rid] = ctx
        return ctx

    async def _budget_error(self, principal: Principal, tier: Tier, prompt: int, max_tokens: int,
                            worst: float) -> APIError:
        t = await self._on(self._db, self.ledger.tenant, principal.tenant) or {}
        self.metrics.rejections.labels(tier.name, "budget").inc()
        budget, spent, held = t.get("budget_usd") or 0.0, t.get("spent_usd", 0.0), t.get("reserved_usd", 0.0)
        free = max(0.0, budget - spent - held)
        state = ("has spent its budget" if spent >= budget else
                 f"has ${free:.6f} of its ${budget:.6f} budget free (${spent:.6f} spent, ${held:.6f} held by "
                 "requests in flight)")
        return APIError(402, f"tenant '{principal.tenant}' {state}; this request could cost up to ${worst:.6f} "
                        f"({prompt} prompt tokens + max_tokens {max_tokens} at tier '{tier.name}' prices; a "
                        "request without max_tokens reserves the rest of the context). Lower max_tokens, or raise "
                        "the budget with `tokenfab keys create --tenant ... --budget-usd ...`",
                        type_="insufficient_quota", code="budget_exhausted")

    def _record(self, ctx: Ctx, last: RequestOutput | None, status: str, error: str | None) -> UsageRecord:
        m = last.metering if last is not None else None
        tier, model = ctx.tier, self.model_name
        prompt = last.prompt_tokens if last else ctx.billable_prompt_tokens
        completion = last.completion_tokens if last else ctx.delivered
        price = 0.0 if status == "failed" else charge_usd(tier, prompt, completion)  # the engine's failure: free
        mc = self.settings.meter
        cost = request_cost_usd(m.joules, m.device_s, mc.electricity_usd_per_kwh, mc.pue,
                                mc.capex_usd_per_hour) if m else None
        source = (m.energy_source or self.energy_source) if m else None
        joules = m.joules if m and source != "none" else None
        # timings run from when the server received the request: parsing, tokenising, auth, admission
        # and the budget reservation happen before the engine's own clock starts, and a user waits
        # through them too
        gateway_s = max(0.0, m.arrival_s - ctx.received_s) if m and ctx.received_s is not None else 0.0
        ms = (lambda v: None if v is None else (v + gateway_s) * 1000.0)  # noqa: E731
        dur = (lambda v: None if v is None else v * 1000.0)  # noqa: E731
        return UsageRecord(
            request_id=ctx.rid, tenant=ctx.principal.tenant, tier=tier.name, model=model, status=status,
            prompt_tokens=prompt, cached_tokens=last.cached_tokens if last else 0, completion_tokens=completion,
            finish_reason=last.finish_reason if last else None, error=error,
            queue_ms=ms(m.queue_s) if m else None, ttft_ms=ms(m.ttft_s) if m else None,
            tpot_ms=dur(m.tpot_s) if m else None, itl_p50_ms=dur(m.itl_p50_s) if m else None,
            itl_p99_ms=dur(m.itl_p99_s) if m else None, itl_max_ms=dur(m.itl_max_s) if m else None,
            e2e_ms=ms(m.e2e_s) if m else None, joules=joules,
            energy_source=source, device_s=m.device_s if m else None,
            cost_usd=cost, price_usd=price, backend=(last.served_by or self.backend.name) if last else ctx.backend,
        )

    def _observe(self, rec: UsageRecord) -> None:
        lab = (rec.tier, rec.model)
        mt = self.metrics
        mt.requests.labels(*lab, rec.status).inc()
        mt.tokens.labels(*lab, "prompt").inc(rec.prompt_tokens)
        mt.tokens.labels(*lab, "cached").inc(rec.cached_tokens)
        mt.tokens.labels(*lab, "completion").inc(rec.completion_tokens)
        mt.revenue.labels(*lab).inc(rec.price_usd)
        if rec.joules is not None:
            mt.joules.labels(*lab).inc(rec.joules)
        if rec.cost_usd is not None:
            mt.cost.labels(*lab).inc(rec.cost_usd)
        if rec.ttft_ms is not None:
            mt.ttft.labels(*lab).observe(rec.ttft_ms / 1000)
        if rec.tpot_ms is not None:
            mt.tpot.labels(*lab).observe(rec.tpot_ms / 1000)
        if rec.e2e_ms is not None:
            mt.e2e.labels(*lab).observe(rec.e2e_ms / 1000)
        if self.fleet_members is not None and rec.backend:
            mt.backend_requests.labels(rec.backend, rec.status).inc()
            if rec.ttft_ms is not None:
                mt.backend_ttft.labels(rec.backend).observe(rec.ttft_ms / 1000)

    def _mark_started(self, ctx: Ctx, first_token: bool = False) -> None:
        if not ctx.started:
            ctx.started = True
            waited = time.monotonic() - ctx.admitted_s if first_token else None
            self.admission.started(ctx.tier.name, ctx.prompt_tokens, waited, ctx.predicted_ttft_s)
            self.metrics.queued.labels(ctx.tier.name).dec()

    def _end(self, ctx: Ctx, rec: UsageRecord) -> None:
        self._mark_started(ctx)
        self.admission.finished(ctx.tier.name, rec.tpot_ms / 1000 if rec.tpot_ms else None)
        self.metrics.in_flight.labels(ctx.tier.name).dec()
        self.live.pop(ctx.rid, None)
        self._observe(rec)

    def _settle_soon(self, rec: UsageRecord) -> None:
        """Hand the record to the ledger's pool without waiting (we may be inside a cancelled task)."""
        def done(f: cf.Future) -> None:
            if f.exception() is not None:
                log.error("could not write the usage record of %s: %s", rec.request_id, f.exception())

        try:
            self._writer.submit(self.ledger.settle_in, rec).add_done_callback(done)
        except RuntimeError:  # the pool is shut down: the server is stopping; write it here
            self.ledger.settle(rec)

    async def _metered(self, ctx: Ctx, agen: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
        """Yield the engine's outputs; the usage record is durable before the final output is passed on.

        A request that fails or is abandoned (client gone) is recorded too, from the finally block.
        """
        done = False
        error: str | None = None
        status = "aborted"
        try:
            async for out in agen:
                self._mark_started(ctx, first_token=True)
                if out.error is None:
                    ctx.delivered = max(ctx.delivered, out.completion_tokens)
                if out.finished:
                    failed = out.error is not None
                    rec = self._record(ctx, out, "failed" if failed else "completed", out.error)
                    await self._write(self.ledger.settle_in, rec)
                    done = True
                    self._end(ctx, rec)
                    if failed:
                        raise GenerationFailed(out.error)
                yield out
        except Exception as exc:
            status, error = "failed", f"{type(exc).__name__}: {exc}"
            raise
        finally:
            if not done:
                rec = self._record(ctx, None, status, error or "client disconnected")
                self._settle_soon(rec)
                self._end(ctx, rec)

    async def run(self, request: Request, prompt_ids: list[int], params: SamplingParams, ctx: Ctx,
                  stream: bool, include_usage: bool, fmt: type[Format], text: TextPrompt | None = None) -> Response:
        """Stream or collect the backend's outputs. The first output is awaited before any header is sent,
        so that a request no backend could start gets a real status (503, 502, ...), not a 200 with an
        error inside, and a fleet can retry it elsewhere unseen."""
        rid = ctx.rid
        priority = ctx.tier.rank if self.settings.admission.tier_scheduling else 0
        agen = self._metered(ctx, self.backend.generate(prompt_ids, params, rid, priority, ctx.tier.name, text))
        f = fmt(rid, self.model_name)
        try:
            first = await until_disconnect(request, _first_output(agen))
        except NoBackendAvailable as exc:
            raise APIError(503, f"{exc}; retry later", type_="server_error", code="no_backend_available",
                           headers={"Retry-After": str(exc.retry_after_s)}) from None
        except BackendError as exc:
            status = exc.status if 400 <= exc.status < 500 and not exc.retryable else 502
            raise APIError(status, f"the backend could not serve this request: {exc}",
                           type_="invalid_request_error" if status < 500 else "server_error",
                           code="backend_error") from None
        except GenerationFailed as exc:
            raise APIError(500, f"generation failed: {exc}", type_="server_error", code="generation_failed") from None
        if first is None:  # client went away; the sequence was aborted
            await agen.aclose()
            return Response(status_code=499)
        if stream:
            return StreamingResponse(self._sse(agen, f, include_usage, first), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Request-Id": rid})
        try:
            result = await until_disconnect(request, _collect(agen, first))
        except (GenerationFailed, BackendError) as exc:
            raise APIError(500, f"generation failed: {exc}", type_="server_error", code="generation_failed") from None
        if result is None:  # client went away; the sequence was aborted
            return Response(status_code=499)
        text, last = result
        return JSONResponse(f.full(text, last), headers={"X-Request-Id": rid})

    async def _sse(self, agen: AsyncIterator[RequestOutput], f: Format, include_usage: bool,
                   first: RequestOutput) -> AsyncIterator[bytes]:
        last: RequestOutput | None = None
        try:
            yield sse_event(f.first())
            async for out in _prepend(first, agen):
                last = out
                if out.text or out.finished:
                    yield sse_event(f.chunk(out.text, out.finish_reason if out.finished else None))
            if include_usage and last is not None:
                yield sse_event(f.usage_chunk(last))
        except Exception as exc:  # noqa: BLE001 - report in-band; the HTTP status is already sent
            if not isinstance(exc, (GenerationFailed, BackendError)):
                log.exception("stream %s failed", f.rid)
            yield sse_event({"error": {"message": f"generation failed: {exc}", "type": "server_error", "param": None,
                                  "code": "generation_failed"}})
        finally:
            await agen.aclose()
        yield b"data: [DONE]\n\n"

    # --- routes --------------------------------------------------------------------------------
    async def health(self, request: Request) -> JSONResponse:
        load = self.backend.load()
        return JSONResponse({
            "status": "ok", "model": self.model_name, "synthetic": self.backend.info.synthetic,
            "backend": type(self.backend).__name__,
            "running": load.running, "waiting": load.waiting, "in_flight": load.in_flight,
            "admitted": self.admission.total_in_flight, "kv_cache_usage": round(load.kv_cache_usage, 4),
            "steps": load.steps, "step_ewma_ms": None if load.step_ewma_ms is None else round(load.step_ewma_ms, 3),
            **self.backend.health(),
            "admission": {"ttft_bias": {k: round(v, 3) for k, v in self.admission.ttft_bias.items()},
                          "queued": dict(self.admission.queued), "in_flight": dict(self.admission.in_flight),
                          "max_queued": dict(self.admission.max_queued),
                          "queue_limit": self.admission.queue_limit},
            "ledger": {"owner": self.ledger.owner, "live": len(self.live)},
            "limits": {"max_body_bytes": self.max_body_bytes, "max_model_len": self.max_model_len},
        })

    def _model_card(self) -> dict[str, Any]:
        info = self.backend.info
        return {
            "id": self.model_name, "object": "model", "created": self.created, "owned_by": "tokenfab",
            "synthetic": info.synthetic, "source": info.source, "quantization": info.quantization,
            "dtype": info.dtype, "max_model_len": self.max_model_len,
        }

    async def prometheus(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

    async def openapi(self, request: Request) -> JSONResponse:
        return JSONResponse(self._openapi)

    async def usage(self, request: Request) -> JSONResponse:
        p = await self.principal(request)
        if p.key_id is None:
            raise APIError(401, "usage records belong to a tenant: send your API key", type_="authentication_error",
                           code="missing_api_key")
        q = request.query_params
        since_f = None
        if q.get("since"):
            try:
                since_f = float(q["since"])
            except ValueError:
                since_f = math.nan
            if not math.isfinite(since_f):
                raise APIError(400, f"since must be unix seconds (a finite number), got {q['since'][:40]!r}",
                               param="since")
        raw_limit = q.get("limit", "1000")
        if not (raw_limit.isdigit() and 1 <= int(raw_limit) <= USAGE_MAX_LIMIT):  # isdigit first: no huge ints
            raise APIError(400, f"limit must be an integer from 1 to {USAGE_MAX_LIMIT}, got {raw_limit[:40]!r}",
                           param="limit")
        rows = await self._on(self._db, self.ledger.usage_records, p.tenant, since_f, int(raw_limit))
        return JSONResponse({"object": "list", "tenant": p.tenant, "data": rows})

    async def models(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> JSONResponse:
        self.check_model(request.path_params["model"])
        return JSONResponse(self._model_card())

    async def completions(self, request: Request) -> Response:
        request.state.received_s = time.monotonic()
        principal = await self.principal(request)
        req = await self.read_request(request, CompletionRequest)
        prompt = req.single_prompt()
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        params = self.sampling(req, max_tokens)
        text = None
        if isinstance(prompt, str) and self.tokenizer is None:
            if not prompt:
                raise APIError(400, "the prompt is empty: give at least one token of input", param="prompt")
            ids, text = [], TextPrompt(text=prompt)
        elif isinstance(prompt, str):
            self.bound_text([prompt], max_tokens, "prompt")
            ids = await self._tokenise(self.tokenizer.encode, prompt, len(prompt))
        else:
            if len(prompt) + max_tokens > self.max_model_len:
                raise self._too_long(f"{len(prompt)} prompt tokens + max_tokens {max_tokens} were requested", "prompt")
            vocab = self.backend.vocab_size
            bad = [t for t in prompt if not 0 <= t < vocab] if vocab else [t for t in prompt if t < 0]
            if bad:
                raise APIError(400, f"prompt token ids must be in [0, {vocab}); got {str(bad[0])[:40]}", param="prompt")
            ids = list(prompt)
        if not ids and text is None:
            raise APIError(400, "the prompt is empty: give at least one token of input", param="prompt")
        return await self.serve(request, principal, req, ids, params, "prompt", "cmpl-", CompletionFormat, text)

    async def chat(self, request: Request) -> Response:
        request.state.received_s = time.monotonic()
        principal = await self.principal(request)
        req = await self.read_request(request, ChatRequest)
        if req.logprobs or req.top_logprobs:
            raise APIError(400, "'logprobs' is not supported by this server", param="logprobs")
        if req.tools:
            raise APIError(400, "tool calling is not supported by this model's server", param="tools")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if self.tokenizer is None:  # the backend templates and tokenises; its usage counts the prompt
            text = TextPrompt(messages=tuple(messages), max_tokens_given=limit is not None)
            max_tokens = limit if limit is not None else max(1, self.max_model_len - 1)
            return await self.serve(request, principal, req, [], self.sampling(req, max_tokens), "messages",
                                    "chatcmpl-", ChatFormat, text)
        self.bound_text([m["content"] for m in messages], limit, "messages")
        try:
            ids = await self._tokenise(self.tokenizer.encode_chat, messages, sum(len(m["content"]) for m in messages))
        except Exception as exc:  # noqa: BLE001 - template errors are the caller's message shape
            raise APIError(400, f"messages cannot be formatted with the model's chat template: {exc}",
                           param="messages") from None
        max_tokens = limit if limit is not None else max(1, self.max_model_len - len(ids))
        params = self.sampling(req, max_tokens)
        return await self.serve(request, principal, req, ids, params, "messages", "chatcmpl-", ChatFormat)

    async def serve(self, request: Request, principal: Principal, req: CompletionRequest | ChatRequest,
                    ids: list[int], params: SamplingParams, param: str, prefix: str, fmt: type[Format],
                    text: TextPrompt | None = None) -> Response:
        ctx = await self.admit(request, principal, ids, params, param, prefix, text)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return await self.run(request, ids, params, ctx, req.stream, include_usage, fmt, text)


async def _first_output(agen: AsyncIterator[RequestOutput]) -> RequestOutput:
    try:
        return await agen.__anext__()
    except StopAsyncIteration:
        raise GenerationFailed("the backend ended the request without any output") from None


async def _prepend(first: RequestOutput, agen: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    yield first
    async for out in agen:
        yield out


async def _collect(agen: AsyncIterator[RequestOutput], first: RequestOutput) -> tuple[str, RequestOutput]:
    parts: list[str] = []
    last = None
    async for out in _prepend(first, agen):
        parts.append(out.text)
        last = out
    assert last is not None
    return "".join(parts), last


def auto_body_bytes(max_model_len: int, max_token_bytes: int) -> int:
    """The body cap when none is configured: room for a prompt of the whole context in the longest tokens,
    twice over for JSON's escapes, and never under 1 MiB."""
    return max(1 << 20, 2 * max_model_len * max_token_bytes + (64 << 10))


PREP_NICENESS = 10  # CFS weights a nice-10 thread at about a tenth of the engine's nice-0 threads


def _lower_priority() -> None:
    """Raise this thread's niceness (Linux schedules threads individually; anyone may lower their own priority)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), PREP_NICENESS)
    except (AttributeError, OSError):  # not Linux, or not allowed: the thread runs at normal priority
        pass


def _lifespan(backend: Backend, gw: Gateway) -> Any:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await backend.open()
        gw.start()
        try:
            yield
        finally:
            await backend.aclose()
            backend.shutdown()
            gw.close()

    return lifespan


def _guarded(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """Answer every exception of a route as an OpenAI error here, so none reaches the server's last-resort
    handler (which closes the connection after a 500, failing the client's next request on it)."""
    @functools.wraps(handler)
    async def route(request: Request) -> Response:
        try:
            return await handler(request)
        except APIError as exc:
            return error_response(exc)
        except Exception as exc:  # noqa: BLE001 - a bug: logged, answered, and the server goes on
            log.exception("unhandled error on %s %s", request.method, request.url.path)
            return error_response(APIError(500, f"internal error ({type(exc).__name__}); the server logged it",
                                           type_="server_error", code="internal_error"))

    return route


ROUTES = ("GET /v1/models, GET /v1/models/{model}, POST /v1/completions, POST /v1/chat/completions, "
          "GET /v1/usage, GET /health, GET /metrics, GET /openapi.json")


def build_app(settings: Settings, backend: Backend, ledger: Ledger, metrics: FactoryMetrics | None = None) -> Starlette:
    metrics = metrics or FactoryMetrics(backend.energy.source, backend.energy.measured)
    gw = Gateway(settings, backend, ledger, metrics)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = "not_found" if exc.status_code == 404 else None
        msg = f"{request.method} {request.url.path[:200]}: {exc.detail}"
        if exc.status_code in (404, 405):
            msg += f" (routes: {ROUTES})"
        return error_response(APIError(exc.status_code, msg, code=kind))

    routes = [
        Route("/health", _guarded(gw.health), methods=["GET"]),
        Route("/metrics", _guarded(gw.prometheus), methods=["GET"]),
        Route("/openapi.json", _guarded(gw.openapi), methods=["GET"]),
        Route("/v1/usage", _guarded(gw.usage), methods=["GET"]),
        Route("/v1/models", _guarded(gw.models), methods=["GET"]),
        Route("/v1/models/{model:path}", _guarded(gw.model), methods=["GET"]),
        Route("/v1/completions", _guarded(gw.completions), methods=["POST"]),
        Route("/v1/chat/completions", _guarded(gw.chat), methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: on_http_error}, lifespan=_lifespan(backend, gw))
    app.state.gateway = gw
    return app


def open_ledger(settings: Settings) -> Ledger:
    """The configured ledger, with this server's lease; recovers only what dead servers left behind."""
    lc = settings.ledger
    hint = legacy_ledger_hint(lc)
    if hint:
        log.warning("ledger: %s", hint)
    ledger = Ledger(lc.resolved_url(), lease_s=lc.reservation_lease_s)
    recovered = ledger.recover()
    if recovered:
        log.warning("ledger: %d requests were left in flight by servers that stopped; recorded as aborted, billed "
                    "what they had delivered", recovered)
    return ledger


def create_server(settings: Settings, loaded: Any = None) -> tuple[Starlette, Backend, Ledger]:
    """Everything `tokenfab serve` runs: the ledger (recovered), the backend (the embedded engine, with its
    energy source and tier policy; or a fleet of pools), metrics, the app. `loaded`: an already loaded
    model (tests share one)."""
    if settings.fleet_pools():
        from tokenfab.fleet.build import build_fleet

        ledger = open_ledger(settings)
        backend: Backend = build_fleet(settings)
        app = build_app(settings, backend, ledger, FactoryMetrics(backend.energy.source, backend.energy.measured))
        log.info("fleet: %s; ledger: %s (this server: %s)", backend.info.source, ledger.url, ledger.owner)
        return app, backend, ledger
    try:
        from tokenfab.backends.embedded import EmbeddedBackend
    except ImportError as exc:  # a gateway-only install
        raise ValueError(f"the embedded engine needs PyTorch ({exc}): pip install 'tokenfab[engine]'; "
                         "or route to other engines with --backends URL or --workers N") from None
    from tokenfab.meter.energy import detect

    mc = settings.meter
    energy = detect(mc.energy_source, mc.cpu_watts_per_core, mc.idle_watts)
    ledger = open_ledger(settings)
    tiers = settings.tiers if settings.admission.tier_scheduling else None
    backend = EmbeddedBackend(settings.engine, tiers, energy, loaded, settings.server.served_model_name)
    app = build_app(settings, backend, ledger, FactoryMetrics(energy.name, energy.measured))
    log.info("energy: %s (%s); ledger: %s (this server: %s)", energy.name,
             "measured" if energy.measured else "modelled", ledger.url, ledger.owner)
    return app, backend, ledger
