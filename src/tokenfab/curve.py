"""The Curve: a throughput-interactivity frontier of operating points, measured (bench) or predicted (perf).

Pure values, no heavy imports. x = tok/s per user (1/TPOT), y = output tok/s per device.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from collections.abc import Iterable
from typing import Any


@dataclass(frozen=True)
class OperatingPoint:
    concurrency: float
    tok_s_user: float  # 1 / TPOT (p50 across requests)
    tok_s_device: float  # output tokens per second per device
    ttft_ms: float | None = None  # p50 (p95 in `extra` when measured)
    watts: float | None = None  # per device
    j_per_token: float | None = None
    request_rate: float | None = None  # requests/s for the whole system
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def tok_s_per_mw(self, kw_per_device: float, pue: float = 1.0) -> float:
        """Output tok/s per MW of facility power, given all-in kW per device and PUE."""
        return self.tok_s_device * 1000.0 / (kw_per_device * pue)


@dataclass(frozen=True)
class Provenance:
    kind: str  # "measured" | "predicted"
    source: str  # the tool and version, e.g. "tokenfab bench 0.1.0" or "tokenfab.perf roofline"
    subject: str  # endpoint + model, or hardware + model + precision
    created: str  # ISO-8601 time
    details: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


def pareto(points: Iterable[OperatingPoint]) -> tuple[OperatingPoint, ...]:
    """The Pareto set of `points` (tok/s per user against tok/s per device), by ascending speed."""
    keep: list[OperatingPoint] = []
    best_y = float("-inf")
    for p in sorted(points, key=lambda p: (-p.tok_s_user, -p.tok_s_device)):
        if p.tok_s_device > best_y:
            keep.append(p)
            best_y = p.tok_s_device
    return tuple(reversed(keep))


@dataclass(frozen=True)
class Curve:
    name: str
    points: tuple[OperatingPoint, ...]
    provenance: Provenance

    def frontier(self) -> Curve:
        """Pareto set: no other point is at least as good on both axes and better on one."""
        return replace(self, points=pareto(self.points))

    def throughput_at(self, min_tok_s_user: float) -> float:
        """Best tok/s per device among points that give every user at least `min_tok_s_user`; 0 if none."""
        ok = [p.tok_s_device for p in self.points if p.tok_s_user >= min_tok_s_user]
        return max(ok, default=0.0)

    def tok_s_per_mw_at(self, min_tok_s_user: float, kw_per_device: float | None = None, pue: float = 1.0) -> float:
        """Best tok/s per MW among points at least that fast; a point's own `kw_per_device` (mixed pools)
        wins over the one given. 0 if no point is fast enough."""
        best = 0.0
        for p in self.points:
            kw = p.extra.get("kw_per_device", kw_per_device)
            if p.tok_s_user >= min_tok_s_user and kw:
                best = max(best, p.tok_s_per_mw(kw, pue))
        return best

    # --- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "provenance": asdict(self.provenance), "points": [asdict(p) for p in self.points]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Curve:
        if "curve" in d and "points" not in d:  # a bench summary holds its curve under "curve"
            d = d["curve"]
        try:
            return cls(
                name=d["name"],
                points=tuple(OperatingPoint(**p) for p in d["points"]),
                provenance=Provenance(**d["provenance"]),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a Curve: {exc}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> Curve:
        return cls.from_dict(json.loads(Path(path).read_text()))
