"""Admission by tier: bounded per-tier queues and early rejection when a tier's SLO cannot be met.

Runs on the event loop (no locks). It tracks, per tier, requests admitted but not yet streaming
(`queued`, with their prompt tokens) and all admitted requests (`in_flight`), and predicts a new
request's TTFT from the engine's live step-time model: the prompt tokens ahead of it (its tier and
faster ones) are processed at the per-step prefill capacity left after decodes.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass

from tokenfab.economics.tiers import Tier, TierTable
from tokenfab.engine.step_model import StepTimeModel


# Predictions and running means estimate a typical wait; the SLO bounds the 95th percentile, so admit
# only while the typical wait stays under this fraction of the limit.
P95_MARGIN = 0.5


@dataclass(frozen=True)
class Rejection:
    reason: str  # queue_full | ttft_slo | speed_slo
    message: str
    retry_after_s: int


class Admission:
    def __init__(self, tiers: TierTable, step_model: StepTimeModel, max_batched_tokens: int, queue_limit: int,
                 slack: float = 1.0, enabled: bool = True) -> None:
        self.tiers = tiers
        self.model = step_model
        self.max_batched_tokens = max_batched_tokens
        self.queue_limit = queue_limit
        self.slack = slack
        self.enabled = enabled
        self.queued = {t.name: 0 for t in tiers}
        self.ttft_ewma_s = {t.name: 0.0 for t in tiers}  # recent admission -> first token, per tier
        self.speed_ewma = {t.name: 0.0 for t in tiers}  # recent tok/s per user (1/TPOT) of finished requests
        self.starts: dict[str, deque[tuple[float, int]]] = {t.name: deque() for t in tiers}  # (time, prompt)
        self.queued_tokens = {t.name: 0 for t in tiers}
        self.in_flight = {t.name: 0 for t in tiers}

    def _faster_or_equal(self, tier: Tier) -> list[Tier]:
        return [t for t in self.tiers if t.rank <= tier.rank]

    def predict_ttft_s(self, tier: Tier, prompt_tokens: int) -> float:
        m = self.model
        active = [t for t in self.tiers if self.in_flight[t.name] > 0] + [tier]
        fastest = max(t.slo.min_tok_s_user for t in active)  # steps are sized for the fastest tier with work
        budget_s = min(m.time_for(fastest), self.max_batched_tokens * m.b_pre_s)
        # prefill time per step left to this tier: the budget less the decodes of its own and faster
        # tiers and the guaranteed shares of slower tiers with work, but never below its own guarantee
        mine = self._faster_or_equal(tier)
        decoding = sum(self.in_flight[t.name] - self.queued[t.name] for t in mine)
        reserved = sum(t.guaranteed_share * budget_s for t in self.tiers
                       if t.rank > tier.rank and self.in_flight[t.name])
        per_step_s = max(budget_s - decoding * m.b_dec_s - reserved, tier.guaranteed_share * budget_s, m.b_pre_s)
        ahead = sum(self.queued_tokens[t.name] for t in mine) + prompt_tokens
        steps = math.ceil(ahead * m.b_pre_s / per_step_s)
        return steps * (m.a_s + budget_s)

    def check(self, tier: Tier, prompt_tokens: int) -> Rejection | None:
        if self.queued[tier.name] >= self.queue_limit:
            return Rejection("queue_full", f"tier '{tier.name}' has {self.queued[tier.name]} requests queued "
                             f"(limit {self.queue_limit})", self._retry(tier))
        if not self.enabled:
            return None
        running = {t: self.in_flight[t] - self.queued[t] for t in self.in_flight}
        if self.queued[tier.name] == 0 and running[tier.name] < tier.guaranteed_share * sum(running.values()):
            return None  # a tier running below its guaranteed share with nothing waiting gets the next slot
        cap = self.model.max_decodes_for(tier.slo.min_tok_s_user)
        decoding = sum(self.in_flight[t.name] - self.queued[t.name] for t in self._faster_or_equal(tier))
        if decoding + 1 > cap and decoding > 0:
            return Rejection("speed_slo", f"tier '{tier.name}' cannot hold {tier.slo.min_tok_s_user:g} tok/s per user "
                             f"with {decoding + 1} streams of its priority or higher (the engine's step time allows "
                             f"{cap})", self._retry(tier))
        speed = self.speed_ewma[tier.name]
        if self.in_flight[tier.name] > 0 and 0 < speed < tier.slo.min_tok_s_user / self.slack:
            return Rejection("speed_slo", f"tier '{tier.name}' recently delivered {speed:.1f} tok/s per user "
                             f"(SLO {tier.slo.min_tok_s_user:g}) with {self.in_flight[tier.name]} requests running",
                             self._retry(tier))
        limit_s = tier.slo.max_ttft_p95_ms / 1000 * self.slack
        recent = self.ttft_ewma_s[tier.name]
        # observed: recent requests' mean wait is already half the p95 limit and more are waiting
        if self.queued[tier.name] > 0 and recent > P95_MARGIN * limit_s:
            return Rejection("ttft_slo", f"tier '{tier.name}' recently took ~{recent:.1f}s to a first token "
                             f"(SLO {limit_s:g}s) and {self.queued[tier.name]} requests are waiting",
                             self._retry(tier, recent))
        drain = self.drain_s(tier.name, prompt_tokens)  # Little's law on the tier's own queue
        if drain is not None and drain > P95_MARGIN * limit_s:
            return Rejection("ttft_slo", f"tier '{tier.name}' has {self.queued_tokens[tier.name]} prompt tokens "
                             f"queued, ~{drain:.1f}s of work at its recent rate (SLO {limit_s:g}s)",
                             self._retry(tier, drain))
        ttft = self.predict_ttft_s(tier, prompt_tokens)
        if ttft > P95_MARGIN * limit_s:
            return Rejection("ttft_slo", f"tier '{tier.name}' would wait ~{ttft:.1f}s for a first token "
                             f"(SLO {tier.slo.max_ttft_p95_ms / 1000:g}s) at the current load", self._retry(tier, ttft))
        return None

    def drain_s(self, tier: str, prompt_tokens: int, window_s: float = 10.0) -> float | None:
        """Seconds to start everything queued for `tier` (plus this prompt) at the rate it started lately."""
        q = self.starts[tier]
        now = time.monotonic()
        while q and now - q[0][0] > window_s:
            q.popleft()
        if self.queued[tier] == 0 or len(q) < 2:
            return None
        rate = sum(n for _, n in q) / max(now - q[0][0], 1e-3)
        return (self.queued_tokens[tier] + prompt_tokens) / rate

    def _retry(self, tier: Tier, predicted_s: float | None = None) -> int:
        wait = predicted_s - tier.slo.max_ttft_p95_ms / 1000 if predicted_s else self.model.step_s(
            sum(self.in_flight.values())) * max(1, self.queued[tier.name])
        return max(1, math.ceil(wait))

    # --- bookkeeping ---------------------------------------------------------------------------
    def admitted(self, tier: str, prompt_tokens: int) -> None:
        self.queued[tier] += 1
        self.queued_tokens[tier] += prompt_tokens
        self.in_flight[tier] += 1

    def started(self, tier: str, prompt_tokens: int, waited_s: float | None = None) -> None:
        self.queued[tier] -= 1
        self.queued_tokens[tier] -= prompt_tokens
        if waited_s is not None:
            self.starts[tier].append((time.monotonic(), prompt_tokens))
            old = self.ttft_ewma_s[tier]
            self.ttft_ewma_s[tier] = waited_s if old == 0 else 0.8 * old + 0.2 * waited_s

    def finished(self, tier: str, tpot_s: float | None = None) -> None:
        self.in_flight[tier] -= 1
        if tpot_s:
            old = self.speed_ewma[tier]
            self.speed_ewma[tier] = 1 / tpot_s if old == 0 else 0.8 * old + 0.2 / tpot_s
