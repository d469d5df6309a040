"""Tiers: the same tokens sold at different speeds for different prices, with SLOs and capacity shares.

The tier table is data (tokenfab.yaml `tiers:`), validated when loaded; the default ships in
default_tiers.yaml with the assumption behind each number written beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml


class TierError(ValueError):
    pass


@dataclass(frozen=True)
class SLO:
    max_ttft_p95_ms: float  # time to first token, 95th percentile
    min_tok_s_user: float  # tok/s per user = 1 / TPOT, at p50

    @property
    def max_tpot_ms(self) -> float:
        return 1000.0 / self.min_tok_s_user if self.min_tok_s_user > 0 else float("inf")


@dataclass(frozen=True)
class Tier:
    name: str
    usd_per_mtok_input: float
    usd_per_mtok_output: float
    slo: SLO
    guaranteed_share: float = 0.0  # of engine capacity (tokens per step) this tier always gets when it has work
    max_share: float = 1.0  # most of the capacity it may take
    rank: int = 0  # 0 = highest priority (the table's order, fastest first)
    assumption: str = ""

    def price_usd(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.usd_per_mtok_input + completion_tokens * self.usd_per_mtok_output) / 1e6


@dataclass(frozen=True)
class TierTable:
    tiers: tuple[Tier, ...]

    def __post_init__(self) -> None:
        if not self.tiers:
            raise TierError("the tier table is empty")
        names = [t.name for t in self.tiers]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise TierError(f"tier names must be unique; repeated: {', '.join(sorted(dup))}")
        for t in self.tiers:
            if not 0 <= t.guaranteed_share <= t.max_share <= 1:
                raise TierError(f"tier {t.name}: need 0 <= guaranteed_share <= max_share <= 1, "
                                f"got {t.guaranteed_share} and {t.max_share}")
            if t.usd_per_mtok_input < 0 or t.usd_per_mtok_output < 0:
                raise TierError(f"tier {t.name}: prices must be >= 0")
            if t.slo.max_ttft_p95_ms <= 0 or t.slo.min_tok_s_user < 0:
                raise TierError(f"tier {t.name}: SLO needs max_ttft_p95_ms > 0 and min_tok_s_user >= 0")
        total = sum(t.guaranteed_share for t in self.tiers)
        if total > 1 + 1e-9:
            raise TierError(f"guaranteed shares add up to {total:.2f}; they must not exceed 1")

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.tiers)

    def __len__(self) -> int:
        return len(self.tiers)

    def get(self, name: str) -> Tier:
        for t in self.tiers:
            if t.name == name:
                return t
        raise TierError(f"unknown tier {name!r}; tiers: {', '.join(t.name for t in self.tiers)}")

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tiers]


def tiers_from_list(items: list[dict[str, Any]], where: str = "tiers") -> TierTable:
    if not isinstance(items, list):
        raise TierError(f"{where}: expected a list of tiers")
    tiers = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise TierError(f"{where}[{i}]: expected a mapping")
        try:
            slo = item["slo"]
            tiers.append(Tier(
                name=str(item["name"]),
                usd_per_mtok_input=float(item["usd_per_mtok_input"]),
                usd_per_mtok_output=float(item["usd_per_mtok_output"]),
                slo=SLO(float(slo["max_ttft_p95_ms"]), float(slo["min_tok_s_user"])),
                guaranteed_share=float(item.get("guaranteed_share", 0.0)),
                max_share=float(item.get("max_share", 1.0)),
                rank=i,
                assumption=str(item.get("assumption", "")),
            ))
        except KeyError as exc:
            raise TierError(f"{where}[{i}]: missing key {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise TierError(f"{where}[{i}]: {exc}") from None
    return TierTable(tuple(tiers))


def default_tiers() -> TierTable:
    text = resources.files("tokenfab.economics").joinpath("default_tiers.yaml").read_text()
    return tiers_from_list(yaml.safe_load(text)["tiers"], "default_tiers.yaml")


def load_tiers(path: str | Path | None) -> TierTable:
    """The `tiers:` list of a YAML file, or the default table when the file has none."""
    if path is None:
        return default_tiers()
    data = yaml.safe_load(Path(path).read_text()) or {}
    if "tiers" not in data:
        return default_tiers()
    return tiers_from_list(data["tiers"], f"{path}: tiers")
