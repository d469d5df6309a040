"""The factory planner: split a power budget across tiers (and hardware) to maximise revenue or margin.

For each (tier, hardware) the Curve gives tok/s per MW at the tier's minimum speed. With x[t,h] the
share of facility power given to tier t on hardware h, revenue/s = sum x[t,h] x P x tpm[t,h] x price_t.
A linear programme (scipy `linprog`, HiGHS) chooses x under: total share <= 1, each tier within its
[min_share, max_share] of power, and optional demand caps per tier (tok/s).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tokenfab.curve import Curve
from tokenfab.economics.tiers import TierTable

SECONDS_PER_YEAR = 365.0 * 24 * 3600


class PlanError(ValueError):
    pass


@dataclass(frozen=True)
class HardwareOption:
    name: str
    curve: Curve  # predicted or measured; points carry tok/s per device
    kw_per_device: float  # all-in
    usd_per_device_hour: float | None = None  # cost by rental
    capex_usd_per_device: float | None = None  # or cost by ownership
    depreciation_years: float = 4.0

    def tok_s_per_mw(self, min_tok_s_user: float) -> float:
        return self.curve.tok_s_per_mw_at(min_tok_s_user, self.kw_per_device)

    def usd_per_mw_hour(self, usd_per_kwh: float, pue: float) -> float:
        """Cost of running 1 MW of this hardware for an hour: capital (or rental) plus electricity."""
        devices_per_mw = 1000.0 / self.kw_per_device
        if self.usd_per_device_hour is not None:
            return devices_per_mw * self.usd_per_device_hour  # rental prices include power
        if self.capex_usd_per_device is None:
            raise PlanError(f"{self.name}: give usd_per_device_hour or capex_usd_per_device")
        capex_h = self.capex_usd_per_device / (self.depreciation_years * 8760.0)
        # all-in kW already includes facility overhead; PUE applies when kW is IT power only
        return devices_per_mw * capex_h + 1000.0 * usd_per_kwh * (pue if pue else 1.0)


@dataclass(frozen=True)
class TierDemand:
    min_share: float = 0.0
    max_share: float = 1.0
    max_tok_s: float | None = None  # demand cap for the whole factory


@dataclass
class Plan:
    power_mw: float
    objective: str
    allocation: list[dict] = field(default_factory=list)  # tier, hardware, share, tok/s, revenue/yr, cost/yr
    revenue_usd_per_year: float = 0.0
    cost_usd_per_year: float = 0.0
    tokens_per_year: float = 0.0
    capex_usd: float | None = None
    unserved: list[str] = field(default_factory=list)

    @property
    def margin_usd_per_year(self) -> float:
        return self.revenue_usd_per_year - self.cost_usd_per_year

    @property
    def cost_per_mtok_usd(self) -> float:
        return self.cost_usd_per_year / (self.tokens_per_year / 1e6) if self.tokens_per_year else float("inf")

    @property
    def payback_years(self) -> float | None:
        if self.capex_usd is None or self.margin_usd_per_year <= 0:
            return None
        return self.capex_usd / self.margin_usd_per_year


def plan_factory(power_mw: float, tiers: TierTable, options: list[HardwareOption],
                 demand: dict[str, TierDemand] | None = None, objective: str = "revenue",
                 usd_per_kwh: float = 0.08, pue: float = 1.2) -> Plan:
    from scipy.optimize import linprog

    if power_mw <= 0:
        raise PlanError("power must be > 0 MW")
    if objective not in ("revenue", "margin"):
        raise PlanError(f"objective {objective!r}: revenue or margin")
    demand = demand or {}
    names = tiers.names
    nt, nh = len(names), len(options)
    tpm = np.array([[o.tok_s_per_mw(t.slo.min_tok_s_user) for o in options] for t in tiers])  # [nt, nh]
    price = np.array([t.usd_per_mtok_output / 1e6 for t in tiers])  # $/token (output)
    cost_mw_s = np.array([o.usd_per_mw_hour(usd_per_kwh, pue) / 3600.0 for o in options])  # $/s per MW
    # value per unit share: $/s when tier t on hardware h gets all the power
    rev = tpm * power_mw * price[:, None]
    val = rev - (cost_mw_s[None, :] * power_mw if objective == "margin" else 0.0)
    unserved = [t.name for i, t in enumerate(tiers) if tpm[i].max() == 0]
    for name in unserved:
        d = demand.get(name)
        if d and d.min_share > 0:
            speed = tiers.get(name).slo.min_tok_s_user
            raise PlanError(f"tier {name} needs {speed:g} tok/s per user, which no candidate hardware reaches; "
                            f"its minimum share of {d.min_share:.0%} cannot be served")
    c = -val.ravel()  # linprog minimises
    a_ub, b_ub = [np.ones(nt * nh)], [1.0]
    bounds = []
    for i, t in enumerate(tiers):
        d = demand.get(t.name, TierDemand())
        row = np.zeros(nt * nh)
        row[i * nh:(i + 1) * nh] = 1.0
        a_ub.append(row)
        b_ub.append(d.max_share)
        if d.min_share > 0:
            a_ub.append(-row)
            b_ub.append(-d.min_share)
        if d.max_tok_s is not None:
            trow = np.zeros(nt * nh)
            trow[i * nh:(i + 1) * nh] = tpm[i] * power_mw
            a_ub.append(trow)
            b_ub.append(d.max_tok_s)
        for j in range(nh):
            bounds.append((0.0, 0.0 if tpm[i, j] == 0 else 1.0))
    res = linprog(c, A_ub=np.array(a_ub), b_ub=np.array(b_ub), bounds=bounds, method="highs")
    if not res.success:
        raise PlanError(f"no feasible plan: {res.message} (check that minimum shares add up to <= 100%)")
    x = res.x.reshape(nt, nh)
    plan = Plan(power_mw=power_mw, objective=objective, unserved=unserved)
    capex = 0.0
    have_capex = True
    for i, t in enumerate(tiers):
        for j, o in enumerate(options):
            if x[i, j] <= 1e-9:
                continue
            mw = x[i, j] * power_mw
            tok_s = tpm[i, j] * mw
            r = tok_s * price[i] * SECONDS_PER_YEAR
            cst = cost_mw_s[j] * mw * SECONDS_PER_YEAR
            plan.allocation.append({"tier": t.name, "hardware": o.name, "share": x[i, j], "mw": mw, "tok_s": tok_s,
                                    "tok_s_per_mw": tpm[i, j], "revenue_usd_per_year": r, "cost_usd_per_year": cst})
            plan.revenue_usd_per_year += r
            plan.cost_usd_per_year += cst
            plan.tokens_per_year += tok_s * SECONDS_PER_YEAR
            if o.capex_usd_per_device is not None:
                capex += mw * 1000.0 / o.kw_per_device * o.capex_usd_per_device
            else:
                have_capex = False
    plan.capex_usd = capex if have_capex and capex > 0 else None
    return plan
