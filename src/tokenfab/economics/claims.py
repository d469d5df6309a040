"""`tokenfab claims`: the keynote's comparisons recomputed by the performance model, beside the stated figures.

Assumptions (each printed with the report): DeepSeek-R1 at 8k input / 1k output for the GPU
generations (FP8 on Hopper, FP4 from Blackwell on), Kimi-K2 (FP4) for the trillion-parameter LPX
claims; a 1 GW factory with 25% of power per tier; tier speeds and prices below (the keynote gave
the prices $0, $3, $6 and ~$150 but no speeds; these speeds are ours).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from tokenfab.curve import Curve
from tokenfab.perf.catalog import Catalog
from tokenfab.perf.model import Efficiency, Scenario, sweep

CLAIM_TIERS = [("free", 0.0, 20.0), ("medium", 3.0, 50.0), ("high", 6.0, 100.0), ("premium", 150.0, 400.0)]
SECONDS_PER_YEAR = 365.0 * 24 * 3600
GW_MW = 1000.0


@dataclass
class System:
    label: str
    curve: Curve

    def tpm(self, speed: float) -> float:
        return self.curve.tok_s_per_mw_at(speed)

    def usd_per_mtok(self, speed: float) -> float:
        ok = [p for p in self.curve.points if p.tok_s_user >= speed]
        if not ok:
            return float("inf")
        return min(p.extra["usd_per_mtok"] for p in ok)

    def revenue_per_year(self) -> float:
        return sum(0.25 * GW_MW * self.tpm(speed) * price / 1e6 * SECONDS_PER_YEAR for _, price, speed in CLAIM_TIERS)

    def tokens_per_s_gw(self) -> float:
        return sum(0.25 * GW_MW * self.tpm(speed) for _, _, speed in CLAIM_TIERS)


def systems(cat: Catalog, eff: Efficiency) -> dict[str, System]:
    dsr1, kimi = cat.model("DeepSeek-R1"), cat.model("Kimi-K2")
    out = {}
    for hw, prec in (("H200", "fp8"), ("GB200", "fp4"), ("GB300", "fp4"), ("VR200", "fp4")):
        out[hw] = System(f"{hw} DeepSeek-R1 {prec}", sweep(Scenario(dsr1, cat.hw(hw), prec, 8192, 1024), eff))
    out["VR200+LPX"] = System("VR200 + LPX decode, DeepSeek-R1 fp4", sweep(
        Scenario(dsr1, cat.hw("LPX"), "fp4", 8192, 1024, mode="sram-decode", prefill_hardware=cat.hw("VR200")), eff))
    out["kimi VR200"] = System("VR200 Kimi-K2 fp4", sweep(Scenario(kimi, cat.hw("VR200"), "fp4", 8192, 1024), eff))
    out["kimi GB300"] = System("GB300 Kimi-K2 fp4", sweep(Scenario(kimi, cat.hw("GB300"), "fp4", 8192, 1024), eff))
    out["kimi VR200+LPX"] = System("VR200 + LPX decode, Kimi-K2 fp4", sweep(
        Scenario(kimi, cat.hw("LPX"), "fp4", 8192, 1024, mode="sram-decode", prefill_hardware=cat.hw("VR200")), eff))
    return out


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("inf")


def _max_speed_ratio(a: System, b: System) -> float:
    speeds = sorted({round(p.tok_s_user, 3) for p in b.curve.points})
    return max((_ratio(a.tpm(s), b.tpm(s)) for s in speeds if b.tpm(s) > 0), default=float("nan"))


def compute(cat: Catalog | None = None, eff: Efficiency = Efficiency()) -> tuple[list[dict], dict[str, System]]:
    cat = cat or Catalog.default()
    s = systems(cat, eff)
    per_tier = [_ratio(s["GB200"].tpm(sp), s["H200"].tpm(sp)) for _, _, sp in CLAIM_TIERS if s["H200"].tpm(sp) > 0]
    rows = [
        ("Blackwell (GB200) vs Hopper (H200): per-tier throughput at iso-power", 35.0,
         statistics.median(per_tier) if per_tier else float("inf"),
         "median over the tiers Hopper can serve of tok/s per MW at each tier's speed"),
        ("Vera Rubin vs GB300: factory revenue, 1 GW, 25% power per tier", 5.0,
         _ratio(s["VR200"].revenue_per_year(), s["GB300"].revenue_per_year()), "DeepSeek-R1 8k/1k, claim tiers"),
        ("Vera Rubin + LPX vs GB300: factory revenue", 10.0,
         _ratio(s["VR200+LPX"].revenue_per_year(), s["GB300"].revenue_per_year()),
         "LPX chips hold the weights, VR200 GPUs do prefill and attention"),
        ("Vera Rubin + LPX vs Vera Rubin: throughput per MW, trillion-parameter model (up to)", 35.0,
         _max_speed_ratio(s["kimi VR200+LPX"], s["kimi VR200"]), "Kimi-K2 fp4, best ratio over speeds VR200 reaches"),
        ("Tokens per GW, Hopper (H200) to Vera Rubin", 350.0,
         _ratio(s["VR200"].tokens_per_s_gw(), s["H200"].tokens_per_s_gw()), "1 GW split 25% per claim tier"),
        ("GB300 vs Hopper: throughput per MW (up to)", 50.0, _max_speed_ratio(s["GB300"], s["H200"]),
         "DeepSeek-R1; best ratio over the speeds H200 reaches"),
        ("GB300 vs Hopper: cost per million tokens (x lower)", 35.0,
         _ratio(s["H200"].usd_per_mtok(50), s["GB300"].usd_per_mtok(50)), "at 50 tok/s per user, $/GPU-hour pricing"),
        ("Vera Rubin vs GB300: cost per token, Kimi-K2 (x lower)", 10.0,
         _ratio(s["kimi GB300"].usd_per_mtok(50), s["kimi VR200"].usd_per_mtok(50)), "at 50 tok/s per user"),
    ]
    out = []
    for claim, stated, model, how in rows:
        gap = (model - stated) / stated * 100 if model == model and model != float("inf") else float("nan")
        if gap != gap:
            verdict = "cannot compute"
        elif abs(gap) <= 25:
            verdict = "agrees (within 25%)"
        elif gap < 0:
            verdict = "model DISAGREES: lower than claimed"
        else:
            verdict = "model DISAGREES: higher than claimed"
        out.append({"claim": claim, "stated": stated, "model": model, "gap_pct": gap, "verdict": verdict, "how": how})
    return out, s


def markdown(rows: list[dict], s: dict[str, System], eff: Efficiency) -> str:
    lines = ["# The keynote's claims, recomputed", "",
             "Generated by `tokenfab claims`. Stated figures: `src/tokenfab/perf/anchors.csv` (sources there).",
             "", "| claim | stated | model | gap | verdict | how the model reads it |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['claim']} | {r['stated']:g}x | {r['model']:.1f}x | {r['gap_pct']:+.0f}% | {r['verdict']} | "
                     f"{r['how']} |")
    lines += ["", "## Per system at the claim tiers (1 GW, 25% of power per tier)", "",
              "| system | " + " | ".join(f"{n} ≥{sp:g} tok/s/user (${p:g}/M): tok/s per MW" for n, p, sp in CLAIM_TIERS)
              + " | revenue $/yr | tokens/s per GW |", "|---" * (len(CLAIM_TIERS) + 3) + "|"]
    for sys in s.values():
        lines.append(f"| {sys.label} | " + " | ".join(f"{sys.tpm(sp):,.0f}" for _, _, sp in CLAIM_TIERS)
                     + f" | {sys.revenue_per_year():,.3g} | {sys.tokens_per_s_gw():,.3g} |")
    lines += ["", "## Assumptions that drive the gaps", "",
              "- Tier speeds are ours (the keynote gave no per-tier speeds): " +
              ", ".join(f"{n} {sp:g} tok/s/user at ${p:g}/M" for n, p, sp in CLAIM_TIERS) + ".",
              "- Hardware numbers and their confidence: `src/tokenfab/perf/hardware.yaml`. Vera Rubin's BF16/FP8 "
              "rates, all-in power and price, and everything about LPX but its SRAM size and bandwidth, are LOW "
              "confidence.",
              "- Efficiencies used: " + ", ".join(f"{k}={v:g}" for k, v in eff.__dict__.items()) + ".",
              "- Aggregated serving (prefill interleaved with decode) for GPUs; the LPX case puts all weights in "
              "SRAM over as many chips as they need, with a per-layer chip hop.",
              "- MoE models may run expert-parallel with data-parallel attention inside a scale-up domain (an NVL72 "
              "rack), whichever layout is faster at each point; no expert parallelism across racks, and no "
              "speculative decoding (MTP) on either side of a comparison: the keynote's largest ratios include "
              "such software gains, which a hardware roofline does not see.", ""]
    return "\n".join(lines)


def charts_for(s: dict[str, System], out_dir) -> None:  # type: ignore[no-untyped-def]
    """claims-curves.png: tok/s per MW vs tok/s per user, per system, with the claim tiers' speeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 5.2), dpi=120)
    for key in ("H200", "GB200", "GB300", "VR200", "VR200+LPX"):
        f = s[key].curve.frontier()
        ax.plot([p.tok_s_user for p in f.points], [p.extra["tok_s_per_mw"] for p in f.points], marker="o", ms=3,
                label=s[key].label)
    for name, price, speed in CLAIM_TIERS:
        ax.axvline(speed, color="#999", ls="--", lw=0.8)
        ax.text(speed, 1.0, f" {name}\n ${price:g}/M", fontsize=7, va="top", transform=ax.get_xaxis_transform())
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tok/s per user")
    ax.set_ylabel("output tok/s per MW (all-in)")
    ax.set_title("DeepSeek-R1 8k/1k: predicted frontiers per system (tokenfab.perf)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "claims-curves.png")
    plt.close(fig)
