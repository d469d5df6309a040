"""`tokenfab plan factory.yaml`: curves per hardware, the LP's power split, revenue, cost and payback, as markdown + PNG."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tokenfab.economics.planner import HardwareOption, Plan, PlanError, TierDemand, plan_factory
from tokenfab.economics.tiers import TierError, TierTable, tiers_from_list
from tokenfab.perf.catalog import Catalog, CatalogError
from tokenfab.perf.model import Efficiency, Scenario, sweep

FACTORY_TIERS = [
    {"name": "premium", "usd_per_mtok_input": 37.5, "usd_per_mtok_output": 150.0,
     "slo": {"max_ttft_p95_ms": 2000, "min_tok_s_user": 400}},
    {"name": "high", "usd_per_mtok_input": 1.5, "usd_per_mtok_output": 6.0,
     "slo": {"max_ttft_p95_ms": 3000, "min_tok_s_user": 100}},
    {"name": "medium", "usd_per_mtok_input": 0.75, "usd_per_mtok_output": 3.0,
     "slo": {"max_ttft_p95_ms": 5000, "min_tok_s_user": 50}},
    {"name": "free", "usd_per_mtok_input": 0.0, "usd_per_mtok_output": 0.0,
     "slo": {"max_ttft_p95_ms": 10000, "min_tok_s_user": 20}},
]


@dataclass
class FactorySpec:
    power_mw: float
    model: str
    isl: int
    osl: int
    hardware: list[dict[str, Any]]
    tiers: TierTable
    demand: dict[str, TierDemand] = field(default_factory=dict)
    objective: str = "revenue"
    usd_per_kwh: float = 0.08
    pue: float = 1.2


def load_spec(path: str | Path) -> FactorySpec:
    p = Path(path)
    if not p.is_file():
        raise PlanError(f"{path} does not exist")
    try:
        d = yaml.safe_load(p.read_text()) or {}
        tiers = tiers_from_list(d.get("tiers", FACTORY_TIERS), f"{path}: tiers")
        demand = {k: TierDemand(**v) for k, v in (d.get("demand") or {}).items()}
        for k in demand:
            tiers.get(k)
        hw = d.get("hardware") or []
        if not hw:
            raise PlanError(f"{path}: list at least one hardware entry")
        return FactorySpec(float(d.get("power_mw", 1000)), str(d.get("model", "DeepSeek-R1")), int(d.get("isl", 8192)),
                           int(d.get("osl", 1024)), [h if isinstance(h, dict) else {"name": h} for h in hw], tiers,
                           demand, d.get("objective", "revenue"), float(d.get("electricity_usd_per_kwh", 0.08)),
                           float(d.get("pue", 1.2)))
    except (yaml.YAMLError, TypeError, TierError) as exc:
        raise PlanError(f"{path}: {str(exc).splitlines()[0]}") from None


def options(spec: FactorySpec, cat: Catalog, eff: Efficiency) -> list[HardwareOption]:
    model = cat.model(spec.model)
    out = []
    for h in spec.hardware:
        hw = cat.hw(h["name"])
        prefill = cat.hw(h["prefill_hardware"]) if h.get("prefill_hardware") else None
        prec = h.get("precision", "fp4" if "fp4" in hw.tflops else "fp8")
        s = Scenario(model, hw, prec, spec.isl, spec.osl, mode=h.get("mode", "aggregated"), prefill_hardware=prefill,
                     spec_tokens=int(h.get("spec_tokens", 0)), spec_acceptance=float(h.get("spec_acceptance", 0.85)))
        curve = sweep(s, eff)
        kw = curve.points[0].extra.get("kw_per_device", hw.kw_all_in)
        label = h.get("label") or (f"{hw.name}+{prefill.name}" if prefill and s.mode == "sram-decode" else hw.name)
        rental = h.get("usd_per_device_hour", None if "capex_usd_per_device" in h else hw.usd_per_device_hour)
        out.append(HardwareOption(label, curve, kw, rental, h.get("capex_usd_per_device"),
                                  float(h.get("depreciation_years", 4))))
    return out


def render(spec: FactorySpec, plan: Plan, opts: list[HardwareOption], out_dir: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for o in opts:
        f = o.curve.frontier()
        ax.plot([p.tok_s_user for p in f.points], [p.extra.get("tok_s_per_mw", 0) for p in f.points], marker="o",
                ms=3, label=o.name)
    for t in spec.tiers:
        ax.axvline(t.slo.min_tok_s_user, color="#999", ls="--", lw=0.8)
        ax.text(t.slo.min_tok_s_user, 1.0, f" {t.name}\n ${t.usd_per_mtok_output:g}/M", fontsize=7,
                transform=ax.get_xaxis_transform(), va="top")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tok/s per user")
    ax.set_ylabel("output tok/s per MW (all-in)")
    ax.set_title(f"{spec.model}, {spec.isl}/{spec.osl}: predicted frontiers")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "curves.png")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 4), dpi=120)
    tiers = [t.name for t in spec.tiers]
    width = 0.8 / max(1, len(opts))
    for j, o in enumerate(opts):
        vals = [0.25 * spec.power_mw * o.tok_s_per_mw(t.slo.min_tok_s_user) * t.usd_per_mtok_output / 1e6 * 3.1536e7
                for t in spec.tiers]
        ax.bar([i + j * width for i in range(len(tiers))], vals, width, label=o.name)
    ax.set_xticks([i + width * (len(opts) - 1) / 2 for i in range(len(tiers))], tiers)
    ax.set_yscale("symlog")
    ax.set_ylabel("$/year with 25% of power")
    ax.set_title("Revenue per tier per hardware (25% of the factory's power each)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "revenue.png")
    plt.close(fig)
    lines = [f"# Factory plan: {spec.power_mw:g} MW, {spec.model} ({spec.isl} in / {spec.osl} out), objective {plan.objective}",
             "", "![curves](curves.png)", "", "![revenue](revenue.png)", "",
             "| tier | hardware | share of power | MW | tok/s | tok/s per MW | revenue $/yr | cost $/yr |",
             "|---|---|---|---|---|---|---|---|"]
    for a in plan.allocation:
        lines.append(f"| {a['tier']} | {a['hardware']} | {a['share']:.1%} | {a['mw']:,.1f} | {a['tok_s']:,.0f} | "
                     f"{a['tok_s_per_mw']:,.0f} | {a['revenue_usd_per_year']:,.0f} | {a['cost_usd_per_year']:,.0f} |")
    pb = plan.payback_years
    lines += ["", f"- annual revenue: **${plan.revenue_usd_per_year:,.0f}**",
              f"- annual cost: ${plan.cost_usd_per_year:,.0f} (rental $/device-hour, or capex over depreciation + "
              f"electricity at ${spec.usd_per_kwh}/kWh)",
              f"- annual margin: ${plan.margin_usd_per_year:,.0f}",
              f"- cost per million tokens: ${plan.cost_per_mtok_usd:,.4f}",
              f"- payback: {'n/a (rented hardware or no margin)' if pb is None else f'{pb:.1f} years'}"]
    if plan.unserved:
        lines.append(f"- tiers no candidate hardware can serve at their speed: {', '.join(plan.unserved)}")
    text = "\n".join(lines) + "\n"
    (out_dir / "plan.md").write_text(text)
    return text


def run_plan(path: str | Path, out_dir: Path, eff: Efficiency = Efficiency()) -> tuple[Plan, str]:
    spec = load_spec(path)
    cat = Catalog.default()
    try:
        opts = options(spec, cat, eff)
    except CatalogError as exc:
        raise PlanError(str(exc)) from None
    plan = plan_factory(spec.power_mw, spec.tiers, opts, spec.demand, spec.objective, spec.usd_per_kwh, spec.pue)
    return plan, render(spec, plan, opts, out_dir)
