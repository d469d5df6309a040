"""The throughput-interactivity chart: x = tok/s per user, y = tok/s per device (or per MW); a point per
load level, the Pareto frontier drawn, tier speed thresholds as vertical bands. PNG (matplotlib) and a
self-contained interactive HTML file (inline SVG, hover for values, no external assets)."""

from __future__ import annotations

import html
import json
from pathlib import Path

from tokenfab.curve import Curve
from tokenfab.economics.tiers import TierTable

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"]
BAND_COLORS = ["#fde2e2", "#fff1d6", "#e3f4e1", "#e2ecfb", "#efe4f7"]


def _y(p, per_mw: tuple[float, float] | None) -> float:  # type: ignore[no-untyped-def]
    return p.tok_s_per_mw(*per_mw) if per_mw else p.tok_s_device


def _ylabel(per_mw: tuple[float, float] | None) -> str:
    return "output tok/s per MW" if per_mw else "output tok/s per device"


def plot_png(curves: list[tuple[str, Curve]], path: str | Path, tiers: TierTable | None = None,
             per_mw: tuple[float, float] | None = None, title: str = "Throughput vs interactivity") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.2), dpi=120)
    xmax = max((p.tok_s_user for _, c in curves for p in c.points), default=1.0) * 1.15
    if tiers:
        speeds = sorted({t.slo.min_tok_s_user for t in tiers})
        for i, t in enumerate(sorted(tiers, key=lambda t: t.slo.min_tok_s_user)):
            lo = t.slo.min_tok_s_user
            hi = next((s for s in speeds if s > lo), max(xmax, lo * 1.2))
            ax.axvspan(lo, hi, color=BAND_COLORS[i % len(BAND_COLORS)], alpha=0.6, lw=0)
            ax.axvline(lo, color="#999", lw=0.8, ls="--")
            ax.text(lo, 1.0, f" {t.name}\n ≥{lo:g} tok/s\n ${t.usd_per_mtok_output:g}/M", va="top", ha="left",
                    fontsize=7, color="#555", transform=ax.get_xaxis_transform())
        xmax = max(xmax, speeds[-1] * 1.3)
    for i, (label, c) in enumerate(curves):
        col = COLORS[i % len(COLORS)]
        xs = [p.tok_s_user for p in c.points]
        ys = [_y(p, per_mw) for p in c.points]
        ax.scatter(xs, ys, color=col, s=28, zorder=3, label=label)
        for p, x, y in zip(c.points, xs, ys):
            ax.annotate(f"{p.concurrency:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7,
                        color=col)
        f = c.frontier()
        ax.plot([p.tok_s_user for p in f.points], [_y(p, per_mw) for p in f.points], color=col, lw=1.6, zorder=2)
    ax.set_xlim(0, xmax)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("tok/s per user (1 / TPOT, p50)")
    ax.set_ylabel(_ylabel(per_mw))
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    src = "; ".join(f"{label}: {c.provenance.kind} by {c.provenance.source} on {c.provenance.subject}"
                    for label, c in curves)
    fig.text(0.01, 0.005, src[:180], fontsize=6, color="#666")
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_html(curves: list[tuple[str, Curve]], path: str | Path, tiers: TierTable | None = None,
              per_mw: tuple[float, float] | None = None, title: str = "Throughput vs interactivity") -> Path:
    w, h, ml, mb, mt, mr = 820, 520, 70, 50, 30, 20
    pts = [(p.tok_s_user, _y(p, per_mw)) for _, c in curves for p in c.points]
    xmax = max((x for x, _ in pts), default=1.0) * 1.15
    if tiers:
        xmax = max(xmax, max(t.slo.min_tok_s_user for t in tiers) * 1.3)
    ymax = max((y for _, y in pts), default=1.0) * 1.15

    def sx(x: float) -> float:
        return ml + (w - ml - mr) * x / xmax

    def sy(y: float) -> float:
        return h - mb - (h - mb - mt) * y / ymax

    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">']
    if tiers:
        ordered = sorted(tiers, key=lambda t: t.slo.min_tok_s_user)
        for i, t in enumerate(ordered):
            lo = t.slo.min_tok_s_user
            hi = ordered[i + 1].slo.min_tok_s_user if i + 1 < len(ordered) else xmax
            svg.append(f'<rect x="{sx(lo):.1f}" y="{mt}" width="{max(sx(hi) - sx(lo), 0):.1f}" height="{h - mb - mt}" '
                       f'fill="{BAND_COLORS[i % len(BAND_COLORS)]}"><title>{html.escape(t.name)}: '
                       f'≥ {lo:g} tok/s/user, TTFT p95 ≤ {t.slo.max_ttft_p95_ms:g} ms, '
                       f'${t.usd_per_mtok_output:g}/M output</title></rect>')
            svg.append(f'<text x="{sx(lo) + 3:.1f}" y="{mt + 12}" fill="#555">{html.escape(t.name)}</text>')
    for k in range(6):
        y = ymax * k / 5
        svg.append(f'<line x1="{ml}" x2="{w - mr}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#ddd"/>'
                   f'<text x="{ml - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:,.0f}</text>')
        x = xmax * k / 5
        svg.append(f'<text x="{sx(x):.1f}" y="{h - mb + 16}" text-anchor="middle">{x:,.1f}</text>')
    svg.append(f'<text x="{(w + ml) / 2}" y="{h - 10}" text-anchor="middle">tok/s per user (1 / TPOT, p50)</text>')
    svg.append(f'<text transform="translate(16,{(h - mb + mt) / 2}) rotate(-90)" text-anchor="middle">'
               f'{_ylabel(per_mw)}</text>')
    for i, (label, c) in enumerate(curves):
        col = COLORS[i % len(COLORS)]
        f = c.frontier().points
        if len(f) > 1:
            d = " ".join(f"{sx(p.tok_s_user):.1f},{sy(_y(p, per_mw)):.1f}" for p in f)
            svg.append(f'<polyline points="{d}" fill="none" stroke="{col}" stroke-width="2"/>')
        for p in c.points:
            tip = (f"{label} | load {p.concurrency:g} | {p.tok_s_user:.1f} tok/s/user | {_y(p, per_mw):,.1f} "
                   f"{'tok/s/MW' if per_mw else 'tok/s/device'}")
            if p.ttft_ms is not None:
                tip += f" | TTFT p50 {p.ttft_ms:.0f} ms"
            if p.j_per_token is not None:
                tip += f" | {p.j_per_token:.3f} J/token"
            svg.append(f'<circle cx="{sx(p.tok_s_user):.1f}" cy="{sy(_y(p, per_mw)):.1f}" r="5" fill="{col}">'
                       f'<title>{html.escape(tip)}</title></circle>')
        svg.append(f'<rect x="{w - mr - 200}" y="{mt + 8 + 16 * i}" width="10" height="10" fill="{col}"/>'
                   f'<text x="{w - mr - 185}" y="{mt + 17 + 16 * i}">{html.escape(label)}</text>')
    svg.append("</svg>")
    data = json.dumps({label: c.to_dict() for label, c in curves}, indent=1)
    doc = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
           f"<body style='font-family:sans-serif'><h3>{html.escape(title)}</h3>{''.join(svg)}"
           "<p style='color:#666;font-size:12px'>Hover a point for its values. Data (Curve JSON):</p>"
           f"<pre style='font-size:11px;max-height:300px;overflow:auto;background:#f7f7f7'>{html.escape(data)}</pre>"
           "</body></html>")
    path = Path(path)
    path.write_text(doc)
    return path
