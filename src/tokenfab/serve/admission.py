"""Admission by tier: bounded per-tier queues and early rejection when a tier's SLO cannot be met.

Runs on the event loop (no locks). It tracks, per tier, requests admitted but not yet streaming
(`queued`, with their prompt tokens) and all admitted requests (`in_flight`), and predicts a new
request's TTFT from the engine's live step-time model where the backend has one: the prompt tokens
ahead of it (its tier and faster ones) are processed at the per-step prefill capacity left after
decodes. Over a backend without one (a fleet, an external server) it judges from what it observes:
each tier's recent time to first token and tok/s per user, and how fast its queue drains.

`admit` checks and counts in one synchronous call, so a burst of simultaneous requests is judged
one after another against counts that include each other; a request that fails after admission
and before it starts (its budget, say) hands its place back with `withdraw`.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from tokenfab.economics.tiers import Tier, TierTable
from tokenfab.step_model import SPEED_HEADROOM, StepTimeModel


# Predictions and running means estimate a typical wait; the SLO bounds the 95th percentile, so admit
# only while the typical wait stays under this fraction of the limit. Waits in a loaded queue have a
# roughly exponential tail, whose 95th percentile is 3x its mean.
P95_MARGIN = 1 / 3


@dataclass(frozen=True)
class Rejection:
    reason: str  # queue_full | ttft_slo | speed_slo
    message: str
    retry_after_s: int


class Admission:
    def __init__(self, tiers: TierTable, step_model: StepTimeModel | None, max_batched_tokens: int, queue_limit: int,
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
        self.max_queued = {t.name: 0 for t in tiers}  # high-water mark of `queued`, for /health
        self.busy_since: dict[str, float] = {}  # tier -> when its queue last became non-empty
        # closed loop on the TTFT prediction: recent actual / predicted first-token wait, per tier (the
        # step model times the forward pass alone; sampling, streaming and a CPU shared with the HTTP
        # side stretch real steps by a factor this learns)
        self.ttft_bias = {t.name: 1.0 for t in tiers}
        self.last_prediction_s: float | None = None  # of the latest check(), for the caller to hand back

    def _faster_or_equal(self, tier: Tier) -> list[Tier]:
        return [t for t in self.tiers if t.rank <= tier.rank]

    def _load(self, tier: Tier) -> tuple[float, float, float, Callable[..., float]]:
        """(variable step seconds, steps per second, step seconds of work per second, decode load of a tier).

        Steps are sized for the fastest tier with work (with `tier` counted as having work); a decoding
        stream costs one decode per token at its tier's pace (the scheduler paces slower tiers).
        """
        m = self.model
        assert m is not None, "predictions need a step-time model"
        running = {t.name: self.in_flight[t.name] - self.queued[t.name] for t in self.tiers}
        active = [t for t in self.tiers if self.in_flight[t.name] > 0] + [tier]
        fastest = max(t.slo.min_tok_s_user for t in active) / SPEED_HEADROOM
        budget_s = min(m.time_for(fastest), self.max_batched_tokens * m.b_pre_s)
        steps_per_s = 1.0 / (m.a_s + budget_s)

        def decode_load(t: Tier, streams: int | None = None) -> float:
            pace = t.slo.min_tok_s_user / SPEED_HEADROOM
            n = running[t.name] if streams is None else streams
            return n * (min(pace, steps_per_s) if pace > 0 else steps_per_s) * m.b_dec_s

        return budget_s, steps_per_s, budget_s * steps_per_s, decode_load

    def _reserved_share(self, tier: Tier) -> float:
        """Share of step time promised to the guarantees of slower tiers that have work."""
        return sum(t.guaranteed_share for t in self.tiers if t.rank > tier.rank and self.in_flight[t.name])

    def decode_demand(self, tier: Tier) -> tuple[float, float]:
        """(share of step time the decodes of `tier` and faster tiers need with one more stream of `tier`,
        share they can have): the guarantees of slower tiers with work come first, and `tier` itself
        stops at its max share."""
        _, _, capacity, decode_load = self._load(tier)
        mine = self._faster_or_equal(tier)
        need = (sum(decode_load(t) for t in mine) + decode_load(tier, 1)) / capacity
        own = (decode_load(tier) + decode_load(tier, 1)) / capacity
        if own > tier.max_share:  # report the binding limit
            return own, tier.max_share
        return need, 1.0 - self._reserved_share(tier)

    def predict_ttft_s(self, tier: Tier, prompt_tokens: int) -> float:
        """Seconds until a new request of `tier` would get its first token, from the live step model.

        The prompt tokens queued in this tier and faster ones are prefilled with the step time left
        after their decodes (at each tier's pace) and the guarantees of slower tiers with work, but
        never with less than this tier's own guarantee less its own decodes.
        """
        m = self.model
        assert m is not None, "predictions need a step-time model"
        budget_s, steps_per_s, capacity, decode_load = self._load(tier)
        mine = self._faster_or_equal(tier)
        reserved = self._reserved_share(tier) * capacity
        avail = max(capacity - sum(decode_load(t) for t in mine) - reserved,
                    tier.guaranteed_share * capacity - decode_load(tier), m.b_pre_s * steps_per_s)
        ahead = sum(self.queued_tokens[t.name] for t in mine) + prompt_tokens
        return ahead * m.b_pre_s / avail + m.a_s + budget_s

    def check(self, tier: Tier, prompt_tokens: int) -> Rejection | None:
        self.last_prediction_s = None
        if self.queued[tier.name] >= self.queue_limit:
            return Rejection("queue_full", f"tier '{tier.name}' has {self.queued[tier.name]} requests queued "
                             f"(limit {self.queue_limit})", self._retry(tier))
        if not self.enabled:
            return None
        running = self.in_flight[tier.name] - self.queued[tier.name]
        if self.model is not None:
            _, _, capacity, decode_load = self._load(tier)
            if self.queued[tier.name] == 0 and decode_load(tier) < tier.guaranteed_share * capacity:
                return None  # a tier using less than its guaranteed share with nothing waiting gets the next slot
            need, room = self.decode_demand(tier)
        else:
            need, room = 0.0, 1.0
        if need > room and running > 0:
            return Rejection("speed_slo", f"tier '{tier.name}' cannot hold {tier.slo.min_tok_s_user:g} tok/s per user "
                             f"with one more stream: its decodes and faster tiers' would need {need:.0%} of the "
                             f"engine's step time, {room:.0%} is theirs at the current load", self._retry(tier))
        speed = self.speed_ewma[tier.name]
        if self.in_flight[tier.name] > 0 and 0 < speed < tier.slo.min_tok_s_user / self.slack:
            return Rejection("speed_slo", f"tier '{tier.name}' recently delivered {speed:.1f} tok/s per user "
                             f"(SLO {tier.slo.min_tok_s_user:g}) with {self.in_flight[tier.name]} requests running",
                             self._retry(tier))
        limit_s = tier.slo.max_ttft_p95_ms / 1000 * self.slack
        recent = self.ttft_ewma_s[tier.name]
        # observed: recent requests' mean wait is already past the margin and more are waiting
        if self.queued[tier.name] > 0 and recent > P95_MARGIN * limit_s:
            return Rejection("ttft_slo", f"tier '{tier.name}' recently took ~{recent:.1f}s to a first token "
                             f"(SLO {limit_s:g}s) and {self.queued[tier.name]} requests are waiting",
                             self._retry(tier, recent))
        drain = self.drain_s(tier.name, prompt_tokens)  # Little's law on the tier's own queue
        if drain is not None and drain > P95_MARGIN * limit_s:
            return Rejection("ttft_slo", f"tier '{tier.name}' has {self.queued_tokens[tier.name]} prompt tokens "
                             f"queued, ~{drain:.1f}s of work at its recent rate (SLO {limit_s:g}s)",
                             self._retry(tier, drain))
        if self.model is None:
            return None
        raw = self.predict_ttft_s(tier, prompt_tokens)
        self.last_prediction_s = raw
        ttft = raw * self.ttft_bias[tier.name]
        if ttft > P95_MARGIN * limit_s:
            return Rejection("ttft_slo", f"tier '{tier.name}' would wait ~{ttft:.1f}s for a first token "
                             f"(SLO {tier.slo.max_ttft_p95_ms / 1000:g}s) at the current load", self._retry(tier, ttft))
        return None

    def drain_s(self, tier: str, prompt_tokens: int, window_s: float = 10.0) -> float | None:
        """Seconds to start everything queued for `tier` (plus this prompt) at the rate it started lately.

        The rate is prompt tokens started per second over the time the tier's queue has been busy, at
        most `window_s`: counting idle time before a burst would make an idle server look slow (it
        turned away a fresh burst of 4 requests with a 10 s estimate). None while the queue has been
        busy for under a second or has started nothing in that time (the step model judges then).
        """
        q = self.starts[tier]
        now = time.monotonic()
        while q and now - q[0][0] > window_s:
            q.popleft()
        since = self.busy_since.get(tier)
        if self.queued[tier] == 0 or since is None or now - since < 1.0:
            return None
        span = min(now - since, window_s)
        started = sum(n for t, n in q if t >= now - span)
        if started == 0:
            return None
        return (self.queued_tokens[tier] + prompt_tokens) / (started / span)

    def _retry(self, tier: Tier, predicted_s: float | None = None) -> int:
        if predicted_s:
            wait = predicted_s - tier.slo.max_ttft_p95_ms / 1000
        elif self.model is not None:
            wait = self.model.step_s(sum(self.in_flight.values())) * max(1, self.queued[tier.name])
        else:
            wait = self.ttft_ewma_s[tier.name]
        return max(1, math.ceil(wait))

    # --- bookkeeping ---------------------------------------------------------------------------
    def admit(self, tier: Tier, prompt_tokens: int) -> Rejection | None:
        """`check`, and if it passes count the request as admitted before anything else can run."""
        rej = self.check(tier, prompt_tokens)
        if rej is None:
            self.admitted(tier.name, prompt_tokens)
        return rej

    def admitted(self, tier: str, prompt_tokens: int) -> None:
        if self.queued[tier] == 0:
            self.busy_since[tier] = time.monotonic()
        self.queued[tier] += 1
        self.max_queued[tier] = max(self.max_queued[tier], self.queued[tier])
        self.queued_tokens[tier] += prompt_tokens
        self.in_flight[tier] += 1

    def withdraw(self, tier: str, prompt_tokens: int) -> None:
        """Undo `admitted` for a request that never reached the engine."""
        self.started(tier, prompt_tokens)
        self.in_flight[tier] -= 1

    @property
    def total_in_flight(self) -> int:
        return sum(self.in_flight.values())

    def started(self, tier: str, prompt_tokens: int, waited_s: float | None = None,
                predicted_s: float | None = None) -> None:
        self.queued[tier] -= 1
        self.queued_tokens[tier] -= prompt_tokens
        if self.queued[tier] == 0:
            self.busy_since.pop(tier, None)
        if waited_s is not None and predicted_s:
            ratio = min(8.0, max(0.5, waited_s / predicted_s))
            self.ttft_bias[tier] = 0.9 * self.ttft_bias[tier] + 0.1 * ratio
        if waited_s is not None:
            self.starts[tier].append((time.monotonic(), prompt_tokens))
            old = self.ttft_ewma_s[tier]
            self.ttft_ewma_s[tier] = waited_s if old == 0 else 0.8 * old + 0.2 * waited_s

    def finished(self, tier: str, tpot_s: float | None = None) -> None:
        self.in_flight[tier] -= 1
        if tpot_s:
            old = self.speed_ewma[tier]
            self.speed_ewma[tier] = 1 / tpot_s if old == 0 else 0.8 * old + 0.2 / tpot_s
