"""Metric definitions, each defined once here (and in docs/bench.md), computed from per-request records.

* TTFT  = time from sending the request to the first chunk with non-empty content.
* E2E   = time from sending the request to the last byte of the response.
* TPOT  = (E2E - TTFT) / (output tokens - 1), per request with >= 2 output tokens.
* ITL   = every gap between consecutive content chunks, pooled across requests (vLLM's ITL; a chunk may
          hold several tokens on some servers).
* tok/s per user = 1 / TPOT, per request.
* output tok/s   = output tokens of measured requests / measurement duration.
* request throughput = completed measured requests / duration.
* goodput        = measured requests meeting every given SLO / duration (requests/s).
* SLO attainment = fraction of a tier's completed requests meeting that tier's SLO (TTFT <= max and
                   tok/s per user >= min); a tier also reports whether its p95 TTFT and p50 tok/s/user
                   meet the SLO as stated (on percentiles).
Duration = from the first measured request's send to the last measured request's end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 95, 99)


@dataclass
class RequestRecord:
    request_id: str
    start_s: float  # send time, seconds since the run began
    tier: str = ""
    scheduled_s: float | None = None  # when open-loop load meant to send it
    ttft_s: float | None = None
    e2e_s: float | None = None
    chunk_times_s: list[float] = field(default_factory=list)  # content chunk arrivals, since send
    output_tokens: int = 0
    output_tokens_source: str = ""  # "usage" (server) or "chunks" (counted by the client)
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    status: int | None = None
    error: str | None = None  # category, None when it succeeded
    error_detail: str = ""
    warmup: bool = False
    level: str = ""  # the sweep point it belongs to

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def tok_s_user(self) -> float | None:
        t = self.tpot_s
        return 1.0 / t if t else None

    @property
    def itls_s(self) -> list[float]:
        c = self.chunk_times_s
        return [b - a for a, b in zip(c, c[1:])]


@dataclass(frozen=True)
class SLOSpec:
    max_ttft_ms: float | None = None
    min_tok_s_user: float | None = None
    max_e2e_ms: float | None = None

    def met_by(self, r: RequestRecord) -> bool:
        if not r.ok:
            return False
        if self.max_ttft_ms is not None and (r.ttft_s is None or r.ttft_s * 1000 > self.max_ttft_ms):
            return False
        if self.min_tok_s_user is not None:
            speed = r.tok_s_user
            if speed is not None and speed < self.min_tok_s_user:
                return False
        if self.max_e2e_ms is not None and (r.e2e_s is None or r.e2e_s * 1000 > self.max_e2e_ms):
            return False
        return True


def stats(values: list[float], scale: float = 1.0) -> dict[str, float | None]:
    """mean, p50/p90/p95/p99 (linear interpolation, as numpy and vLLM), min, max; None when empty."""
    if not values:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}, "min": None, "max": None, "n": 0}
    a = np.asarray(values, dtype=float) * scale
    out: dict[str, float | None] = {"mean": float(a.mean())}
    for p, v in zip(PERCENTILES, np.percentile(a, PERCENTILES)):
        out[f"p{p}"] = float(v)
    out |= {"min": float(a.min()), "max": float(a.max()), "n": len(a)}
    return out


def summarize(records: list[RequestRecord], slo: SLOSpec | None = None,
              tier_slos: dict[str, SLOSpec] | None = None) -> dict[str, Any]:
    measured = [r for r in records if not r.warmup]
    done = [r for r in measured if r.ok]
    errors: dict[str, int] = {}
    for r in measured:
        if r.error:
            errors[r.error] = errors.get(r.error, 0) + 1
    if measured:
        t0 = min(r.start_s for r in measured)
        t1 = max(r.start_s + (r.e2e_s or 0.0) for r in measured)
        duration = max(t1 - t0, 1e-9)
    else:
        duration = 0.0
    out_tokens = sum(r.output_tokens for r in done)
    in_tokens = sum(r.prompt_tokens or 0 for r in done)
    speeds = [s for r in done if (s := r.tok_s_user) is not None]
    summary: dict[str, Any] = {
        "requests": len(measured),
        "completed": len(done),
        "errors": errors,
        "duration_s": duration,
        "output_tokens": out_tokens,
        "prompt_tokens": in_tokens,
        "cached_tokens": sum(r.cached_tokens or 0 for r in done),
        "output_tok_s": out_tokens / duration if duration else 0.0,
        "total_tok_s": (out_tokens + in_tokens) / duration if duration else 0.0,
        "request_throughput": len(done) / duration if duration else 0.0,
        "ttft_ms": stats([r.ttft_s for r in done if r.ttft_s is not None], 1000),
        "tpot_ms": stats([t for r in done if (t := r.tpot_s) is not None], 1000),
        "itl_ms": stats([g for r in done for g in r.itls_s], 1000),
        "e2e_ms": stats([r.e2e_s for r in done if r.e2e_s is not None], 1000),
        "tok_s_user": stats(speeds),
        "output_tokens_source": sorted({r.output_tokens_source for r in done}),
    }
    if slo is not None:
        good = sum(1 for r in measured if slo.met_by(r))
        summary["goodput"] = good / duration if duration else 0.0
        summary["slo_attainment"] = good / len(measured) if measured else None
    if tier_slos:
        per: dict[str, Any] = {}
        for name, spec in tier_slos.items():
            rs = [r for r in measured if r.tier == name]
            ok = [r for r in rs if r.ok]
            good = sum(1 for r in rs if spec.met_by(r))
            ttft = stats([r.ttft_s for r in ok if r.ttft_s is not None], 1000)
            spd = stats([s for r in ok if (s := r.tok_s_user) is not None])
            per[name] = {
                "requests": len(rs), "completed": len(ok),
                "errors": {e: sum(1 for r in rs if r.error == e) for e in {r.error for r in rs if r.error}},
                "slo_attainment": good / len(ok) if ok else None,
                "goodput": good / duration if duration else 0.0,
                "output_tokens": sum(r.output_tokens for r in ok),
                "ttft_ms": ttft, "tok_s_user": spd,
                "p95_ttft_meets_slo": None if ttft["p95"] is None or spec.max_ttft_ms is None
                else ttft["p95"] <= spec.max_ttft_ms,
                "p50_speed_meets_slo": None if spd["p50"] is None or spec.min_tok_s_user is None
                else spd["p50"] >= spec.min_tok_s_user,
            }
        total = sum(v["output_tokens"] for v in per.values()) or 1
        for v in per.values():
            v["token_share"] = v["output_tokens"] / total
        summary["tiers"] = per
    return summary


def finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)
