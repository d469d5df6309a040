"""A bench run: a sweep of load levels against one endpoint, with energy, written as JSONL/JSON/CSV/charts."""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tokenfab import __version__
from tokenfab.bench import charts
from tokenfab.bench.load import Endpoint, LoadSpec, run_load_sync
from tokenfab.bench.metrics import SLOSpec, summarize
from tokenfab.bench.workload import WorkloadSpec, build
from tokenfab.curve import Curve, OperatingPoint, Provenance
from tokenfab.economics.tiers import TierTable


@dataclass
class BenchConfig:
    endpoint: Endpoint
    workload: WorkloadSpec
    mode: str = "concurrency"  # concurrency | rate | replay
    levels: list[float] = field(default_factory=lambda: [1.0])
    requests_per_level: int = 0  # 0 = max(16, 4 x concurrency)
    duration_s: float = 0.0
    warmup: int = 1
    max_in_flight: int = 0
    ramp_s: float = 0.0
    burstiness: float = 1.0
    slo: SLOSpec | None = None
    tiers: TierTable | None = None
    devices: int = 1
    kw_per_device: float | None = None
    pue: float = 1.0
    energy: str = "auto"  # auto | endpoint | local | none
    out_dir: Path = Path("bench-out")
    label: str = ""
    tokenizer: Any = None


class EnergyProbe:
    """Joules over an interval: from the endpoint's /metrics (tokenfab), a local counter, or nothing."""

    def __init__(self, how: str, base_url: str) -> None:
        self.metrics_url = base_url.rstrip("/").removesuffix("/v1") + "/metrics"
        self.source: str | None = None
        self.local = None
        if how in ("auto", "endpoint"):
            got = self._endpoint()
            if got is not None:
                self.source = f"endpoint /metrics ({got[1]})"
                self.read = lambda: (self._endpoint() or (None,))[0]  # type: ignore[method-assign]
                return
            if how == "endpoint":
                raise ValueError(f"{self.metrics_url} has no tokenfab_energy_joules_total")
        if how in ("auto", "local"):
            from tokenfab.meter.energy import detect

            src = detect("auto")
            if src.measured or how == "local":
                self.local = src
                self.source = f"local {src.name}: the whole machine, not just the endpoint"
                self.read = src.read_j  # type: ignore[method-assign]
                return
        self.source = None
        self.read = lambda: None  # type: ignore[method-assign]

    def _endpoint(self) -> tuple[float, str] | None:
        try:
            r = httpx.get(self.metrics_url, timeout=5)
            if r.status_code != 200:
                return None
            from prometheus_client.parser import text_string_to_metric_families

            total, found, src = 0.0, False, "?"
            for fam in text_string_to_metric_families(r.text):
                if fam.name == "tokenfab_energy_joules":
                    found = True  # present even before any request has been attributed energy
                    for s in fam.samples:
                        if s.name == "tokenfab_energy_joules_total":
                            total += s.value
                if fam.name == "tokenfab_energy_source":
                    for s in fam.samples:
                        src = s.labels.get("source", src) + ("" if s.labels.get("measured") == "true" else ", modelled")
            return (total, src) if found else None
        except (httpx.HTTPError, ValueError):
            return None

    def read(self) -> float | None:  # replaced per instance
        return None


def _point(level: float, s: dict[str, Any], cfg: BenchConfig, joules: float | None) -> OperatingPoint:
    dur = s["duration_s"] or 1e-9
    watts = joules / dur / cfg.devices if joules is not None else None
    jpt = joules / s["output_tokens"] if joules is not None and s["output_tokens"] else None
    return OperatingPoint(
        concurrency=level,
        tok_s_user=s["tok_s_user"]["p50"] or 0.0,
        tok_s_device=s["output_tok_s"] / cfg.devices,
        ttft_ms=s["ttft_ms"]["p50"],
        watts=watts,
        j_per_token=jpt,
        request_rate=s["request_throughput"],
        extra={"ttft_p95_ms": s["ttft_ms"]["p95"], "tpot_p50_ms": s["tpot_ms"]["p50"],
               "goodput": s.get("goodput"), "errors": s["errors"]},
    )


def run(cfg: BenchConfig, progress: bool = True) -> dict[str, Any]:
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    probe = EnergyProbe(cfg.energy, cfg.endpoint.url) if cfg.energy != "none" else None
    tier_slos = None
    if cfg.tiers and cfg.workload.tiers:
        tier_slos = {t.name: SLOSpec(t.slo.max_ttft_p95_ms, t.slo.min_tok_s_user) for t in cfg.tiers
                     if t.name in cfg.workload.tiers}
    levels_out, points = [], []
    req_path = cfg.out_dir / "requests.jsonl"
    with req_path.open("w") as fh, _progress(progress) as bar:
        for li, level in enumerate(cfg.levels):
            n = cfg.requests_per_level or max(16, int(4 * level)) if cfg.mode == "concurrency" else (
                cfg.requests_per_level or max(16, int(10 * level)))
            spec = dataclasses.replace(cfg.workload, num_jobs=n + cfg.warmup, seed=cfg.workload.seed + li)
            jobs = build(spec, cfg.tokenizer)
            turns = sum(len(j.turns) for j in jobs[cfg.warmup:])
            task = bar.add_task(f"{cfg.mode} {level:g}", total=turns) if bar else None
            load = LoadSpec(mode=cfg.mode, concurrency=int(level) if cfg.mode == "concurrency" else 1,
                            rate=float(level), burstiness=cfg.burstiness, max_in_flight=cfg.max_in_flight,
                            duration_s=cfg.duration_s, warmup=cfg.warmup, seed=cfg.workload.seed + li,
                            ramp_s=cfg.ramp_s)
            j0 = probe.read() if probe else None
            records = run_load_sync(cfg.endpoint, jobs, load, level=f"{level:g}",
                                    on_done=(lambda: bar.advance(task)) if bar else (lambda: None))
            j1 = probe.read() if probe else None
            joules = j1 - j0 if j0 is not None and j1 is not None else None
            s = summarize(records, cfg.slo, tier_slos)
            s["energy"] = {"joules": joules, "source": probe.source if probe and joules is not None else None,
                           "j_per_output_token": joules / s["output_tokens"] if joules and s["output_tokens"] else None,
                           "output_tokens_per_j": s["output_tokens"] / joules if joules else None}
            for r in records:
                fh.write(json.dumps(dataclasses.asdict(r)) + "\n")
            p = _point(level, s, cfg, joules)
            points.append(p)
            levels_out.append({"level": level, "summary": s})
    curve = Curve(
        name=cfg.label or f"{cfg.endpoint.model} @ {cfg.endpoint.url}",
        points=tuple(points),
        provenance=Provenance(
            kind="measured", source=f"tokenfab bench {__version__}", subject=f"{cfg.endpoint.model} at {cfg.endpoint.url}",
            created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            details={"workload": dataclasses.asdict(cfg.workload), "mode": cfg.mode, "devices": cfg.devices,
                     "energy_source": probe.source if probe else None},
        ),
    )
    summary = {
        "meta": {"tool": f"tokenfab bench {__version__}", "created": curve.provenance.created,
                 "endpoint": cfg.endpoint.url, "model": cfg.endpoint.model, "mode": cfg.mode,
                 "workload": dataclasses.asdict(cfg.workload), "devices": cfg.devices,
                 "kw_per_device": cfg.kw_per_device, "pue": cfg.pue,
                 "energy_source": probe.source if probe else "none (disabled)",
                 "slo": dataclasses.asdict(cfg.slo) if cfg.slo else None},
        "levels": levels_out,
        "curve": curve.to_dict(),
    }
    if cfg.kw_per_device:
        summary["tok_s_per_mw"] = [p.tok_s_per_mw(cfg.kw_per_device, cfg.pue) for p in points]
    (cfg.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    write_csv(summary, cfg.out_dir / "summary.csv")
    per_mw = (cfg.kw_per_device, cfg.pue) if cfg.kw_per_device else None
    label = cfg.label or cfg.endpoint.model
    charts.plot_png([(label, curve)], cfg.out_dir / "chart.png", cfg.tiers, per_mw)
    charts.plot_html([(label, curve)], cfg.out_dir / "chart.html", cfg.tiers, per_mw)
    return summary


CSV_COLUMNS = [
    ("level", lambda lv: lv["level"]),
    ("requests", lambda lv: lv["summary"]["requests"]),
    ("completed", lambda lv: lv["summary"]["completed"]),
    ("errors", lambda lv: sum(lv["summary"]["errors"].values())),
    ("output_tok_s", lambda lv: lv["summary"]["output_tok_s"]),
    ("request_throughput", lambda lv: lv["summary"]["request_throughput"]),
    ("goodput", lambda lv: lv["summary"].get("goodput")),
    ("ttft_ms_p50", lambda lv: lv["summary"]["ttft_ms"]["p50"]),
    ("ttft_ms_p95", lambda lv: lv["summary"]["ttft_ms"]["p95"]),
    ("ttft_ms_p99", lambda lv: lv["summary"]["ttft_ms"]["p99"]),
    ("tpot_ms_p50", lambda lv: lv["summary"]["tpot_ms"]["p50"]),
    ("tpot_ms_p95", lambda lv: lv["summary"]["tpot_ms"]["p95"]),
    ("itl_ms_p50", lambda lv: lv["summary"]["itl_ms"]["p50"]),
    ("itl_ms_p99", lambda lv: lv["summary"]["itl_ms"]["p99"]),
    ("e2e_ms_p50", lambda lv: lv["summary"]["e2e_ms"]["p50"]),
    ("tok_s_user_p50", lambda lv: lv["summary"]["tok_s_user"]["p50"]),
    ("joules", lambda lv: lv["summary"]["energy"]["joules"]),
    ("j_per_output_token", lambda lv: lv["summary"]["energy"]["j_per_output_token"]),
]


def write_csv(summary: dict[str, Any], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([c for c, _ in CSV_COLUMNS])
        for lv in summary["levels"]:
            w.writerow([fn(lv) for _, fn in CSV_COLUMNS])


def console_table(summary: dict[str, Any]) -> str:
    from io import StringIO

    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"tokenfab bench: {summary['meta']['model']} at {summary['meta']['endpoint']}")
    cols = ["level", "ok/sent", "output tok/s", "req/s", "TTFT p50/p95 ms", "TPOT p50 ms", "ITL p99 ms",
            "tok/s/user p50", "goodput", "J/token"]
    for c in cols:
        t.add_column(c, justify="right")

    def f(x: Any, fmt: str = "{:.1f}") -> str:
        return "-" if x is None else fmt.format(x)

    for lv in summary["levels"]:
        s = lv["summary"]
        t.add_row(f"{lv['level']:g}", f"{s['completed']}/{s['requests']}", f(s["output_tok_s"]),
                  f(s["request_throughput"], "{:.2f}"), f"{f(s['ttft_ms']['p50'], '{:.0f}')}/{f(s['ttft_ms']['p95'], '{:.0f}')}",
                  f(s["tpot_ms"]["p50"]), f(s["itl_ms"]["p99"]), f(s["tok_s_user"]["p50"]),
                  f(s.get("goodput"), "{:.2f}"), f(s["energy"]["j_per_output_token"], "{:.3f}"))
    buf = StringIO()
    Console(file=buf, width=160).print(t)
    errs = {k: v for lv in summary["levels"] for k, v in lv["summary"]["errors"].items()}
    out = buf.getvalue()
    if errs:
        out += "errors by category: " + ", ".join(f"{k}={v}" for k, v in sorted(errs.items())) + "\n"
    out += f"energy: {summary['meta']['energy_source'] or 'none available (no tokenfab /metrics, NVML or RAPL)'}\n"
    return out


class _NoBar:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None


def _progress(enabled: bool):  # type: ignore[no-untyped-def]
    if not enabled:
        return _NoBar()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    transient=False)


def compare(paths: list[Path], out: Path, tiers: TierTable | None = None) -> list[tuple[str, Curve]]:
    curves = []
    for p in paths:
        try:
            d = json.loads(Path(p).read_text())
            c = Curve.from_dict(d)
        except (OSError, json.JSONDecodeError, ValueError) as exc:
            raise ValueError(f"{p}: not a bench summary or Curve ({exc})") from None
        curves.append((c.name or Path(p).stem, c))
    charts.plot_png(curves, out.with_suffix(".png"), tiers)
    charts.plot_html(curves, out.with_suffix(".html"), tiers)
    return curves
