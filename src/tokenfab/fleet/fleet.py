"""A fleet of backends behind the Backend interface: the gateway routes, fails over and meters through it.

A request's prompt is hashed into blocks once; the router ranks the healthy members of the pools
that take the request's tier, and the fleet streams from the first. A member that fails before
any output reached the caller is marked failed (ejected until its health check passes) and the
request is tried once more on the next member, so a dead backend costs a retry, never a lost
request; a failure after output began ends the stream with its error (the caller has part of an
answer, and nothing is sent twice). When no member can take a request the fleet raises
`NoBackendAvailable` (a 503 with Retry-After). The final output of each request names the member
that served it, and every member's index learns the blocks routed to it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from collections.abc import AsyncIterator
from typing import Any

from tokenfab.backends.base import (
    Backend,
    BackendError,
    Capabilities,
    EnergyInfo,
    LoadSnapshot,
    ModelInfo,
    NoBackendAvailable,
    PromptTokenizer,
)
from tokenfab.fleet.prefix_index import block_hashes, text_block_hashes
from tokenfab.fleet.router import Member, Router
from tokenfab.generation import RequestError, RequestOutput, SamplingParams, TextPrompt

log = logging.getLogger("tokenfab.fleet")
MAX_ATTEMPTS = 2  # the first choice and one other, for a failure before the first token


class FleetBackend(Backend):
    name = "fleet"

    def __init__(self, members: list[Member], router: Router, tokenizer: PromptTokenizer | None, model: str,
                 max_model_len: int, block_tokens: int = 16, health_interval_s: float = 1.0) -> None:
        super().__init__()
        if not members:
            raise ValueError("a fleet needs at least one backend")
        names = [m.name for m in members]
        if len(set(names)) != len(names):
            raise ValueError(f"backend names must be unique in a fleet, got {', '.join(names)}")
        self.members = members
        self.router = router
        self.tokenizer = tokenizer
        self.block_tokens = block_tokens
        self.health_interval_s = health_interval_s
        lengths = [m.backend.info.max_model_len for m in members if m.backend.info.max_model_len]
        self.info = ModelInfo(name=model, max_model_len=min(lengths) if lengths else max_model_len,
                              synthetic=any(m.backend.info.synthetic for m in members),
                              source=f"fleet of {len(members)} ({router.policy})")
        caps = [m.backend.capabilities for m in members]
        self.capabilities = Capabilities(
            local_tokenizer=tokenizer is not None, text_prompts=all(c.text_prompts for c in caps),
            priority=all(c.priority for c in caps),
            trust="local" if all(c.trust == "local" for c in caps) else "external")
        self.energy = EnergyInfo("fleet", all(m.backend.energy.measured for m in members))
        self.max_num_seqs = sum(max(1, m.backend.max_num_seqs) for m in members)
        self.max_num_batched_tokens = sum(max(1, m.backend.max_num_batched_tokens) for m in members)
        vocabs = [m.backend.vocab_size for m in members if m.backend.vocab_size]
        self.vocab_size = min(vocabs) if vocabs else int(getattr(tokenizer, "vocab_size", 0) or 0)
        self.routed = {m.name: 0 for m in members}
        self.retried = 0
        self.owned_workers: list[Any] = []  # local worker processes this fleet started (stopped with it)

    # --- lifecycle -----------------------------------------------------------------------------
    async def open(self) -> None:
        await asyncio.gather(*(m.backend.open() for m in self.members))
        up = [m.name for m in self.members if m.backend.healthy]
        log.info("fleet: %d of %d backends up (%s), routing %s", len(up), len(self.members), ", ".join(up) or "none",
                 self.router.policy)

    async def aclose(self) -> None:
        await asyncio.gather(*(m.backend.aclose() for m in self.members), return_exceptions=True)

    def start(self) -> None:
        for m in self.members:
            m.backend.start()

    def shutdown(self) -> None:
        for m in self.members:
            m.backend.shutdown()
        for w in self.owned_workers:
            w.stop()
        self.owned_workers = []
        super().shutdown()

    # --- what the gateway asks -----------------------------------------------------------------
    def candidates(self, tier: str | None) -> list[Member]:
        return [m for m in self.members if m.backend.healthy and (not m.tiers or tier is None or tier in m.tiers)]

    def check_request(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        errors = []
        for m in self.members:
            try:
                m.backend.check_request(num_prompt_tokens, params)
                return  # some member can run it; routing keeps to those (see generate)
            except RequestError as exc:
                errors.append(str(exc))
        raise RequestError(errors[0])

    def load(self) -> LoadSnapshot:
        loads = [m.backend.load() for m in self.members]
        hits = [ld.prefix_cache_hit_rate for ld in loads if ld.prefix_cache_hit_rate is not None]
        return LoadSnapshot(
            running=sum(ld.running for ld in loads), waiting=sum(ld.waiting for ld in loads),
            in_flight=sum(ld.in_flight for ld in loads),
            kv_cache_usage=sum(ld.kv_cache_usage for ld in loads) / len(loads),
            steps=sum(ld.steps for ld in loads),
            prefix_cache_hit_rate=sum(hits) / len(hits) if hits else None)

    def health(self) -> dict[str, Any]:
        out = []
        for m in self.members:
            ld = m.backend.load()
            out.append({"name": m.name, "pool": m.pool, "healthy": m.backend.healthy,
                        "routed": self.routed[m.name], "in_flight": ld.in_flight, "running": ld.running,
                        "waiting": ld.waiting, "kv_cache_usage": round(ld.kv_cache_usage, 4),
                        "prefix_cache_hit_rate": ld.prefix_cache_hit_rate,
                        "ttft_ewma_ms": ld.ttft_ewma_ms, "tpot_ewma_ms": ld.tpot_ewma_ms,
                        "index_blocks": len(m.index), **m.backend.health()})
        return {"fleet": {"policy": self.router.policy, "retried": self.retried, "members": out}}

    # --- generation ----------------------------------------------------------------------------
    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
                       priority: int = 0, tier: str | None = None,
                       text: TextPrompt | None = None) -> AsyncIterator[RequestOutput]:
        hashes = block_hashes(prompt_ids, self.block_tokens) if text is None else text_block_hashes(text.routing_key())
        n_prompt = len(prompt_ids) if text is None else 1  # a lower bound: the backend checks a text prompt's length
        tried: set[str] = set()
        last_error: BackendError | None = None
        for attempt in range(MAX_ATTEMPTS):
            ranked = [c for c in self.router.rank(self.candidates(tier), hashes) if c.member.name not in tried]
            runnable = []
            for c in ranked:
                try:
                    c.member.backend.check_request(n_prompt, params)
                    runnable.append(c)
                except RequestError:
                    continue
            if not runnable:
                break
            member = runnable[0].member
            tried.add(member.name)
            member.index.insert(hashes)
            self.routed[member.name] += 1
            started = False
            try:
                async for out in member.backend.generate(prompt_ids, params, request_id, priority, tier, text):
                    started = True
                    yield dataclasses.replace(out, served_by=member.name) if out.finished else out
                return
            except BackendError as exc:
                if exc.retryable:
                    member.backend.mark_failed(str(exc))
                    member.index.clear()  # a restarted engine has an empty cache
                if started or exc.started or not exc.retryable or attempt + 1 == MAX_ATTEMPTS:
                    raise
                log.warning("fleet: %s failed before its first token on %s (%s); retrying elsewhere",
                            request_id, member.name, exc)
                self.retried += 1
                last_error = exc
        why = f" (last error: {last_error})" if last_error else ""
        down = [m.name for m in self.members if not m.backend.healthy]
        raise NoBackendAvailable(
            f"no backend can take this request now: {len(down)} of {len(self.members)} are down"
            + (f" ({', '.join(down)})" if down else "") + why, max(1, math.ceil(self.health_interval_s)))
