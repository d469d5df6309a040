"""Calibration: fit the named efficiencies to measured points (anchors.csv rows, a bench summary, or a CSV).

A measured point is (hardware, model, precision, ISL, OSL, metric, value, at tok/s per user), plus how
it was measured where the source says: which tokens a tok/s/GPU figure counts (InferenceX's
`tput_per_gpu` counts input and output tokens: output x (1 + ISL/OSL)), the serving mode, and
speculative decoding (MTP: one draft token per step at the Scenario's default acceptance). The
prediction is the frontier's tok/s per device at that speed, or the fastest speed for a tok_s_user
metric, or its maximum for a "max throughput" row. A tok/s/GPU figure with no stated speed is not
comparable with a point of a curve (the same hardware gives 90 or 5,000 tok/s/GPU depending on the
speed): such rows are listed, not scored. The fit minimises squared log errors over FIT (eff_mem,
eff_compute, eff_attention, eff_prefill, layer_latency_s, token_cost_s, moe_token_cost_s) within bounds:
scipy's differential evolution (seeded), then `least_squares`; step_overhead_s keeps the start's value
(see FIT).
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from tokenfab.curve import Curve, OperatingPoint, pareto
from tokenfab.perf.catalog import Catalog, CatalogError
from tokenfab.perf.model import Efficiency, Scenario, sweep

# step_overhead_s is not fitted: on these rows it cannot be told apart from layer_latency_s (every
# scored point runs on several devices, where both are constants per step; two half-fits traded
# 0.1 ms + 33 us against 3.8 ms + 6 us), so it stays at its default and the fit is stable.
FIT = ("eff_mem", "eff_compute", "eff_attention", "eff_prefill", "layer_latency_s", "token_cost_s",
       "moe_token_cost_s")
BOUNDS = {"eff_mem": (0.2, 0.95), "eff_compute": (0.05, 0.9), "eff_attention": (0.05, 0.9),
          "eff_prefill": (0.1, 0.9),
          "step_overhead_s": (1e-4, 0.05), "layer_latency_s": (1e-6, 2e-4),
          "a2a_latency_s": (1e-6, 2e-4), "token_cost_s": (1e-12, 1e-9),
          "moe_token_cost_s": (1e-12, 1e-9)}


@dataclass(frozen=True)
class Measured:
    label: str
    hardware: str
    model: str
    precision: str
    isl: int
    osl: int
    metric: str  # tok_s_gpu | tok_s_user
    value: float
    at_tok_s_user: float | None
    devices: int | None
    source: str
    tokens_counted: str = "output"  # output | total (input + output)
    serving: str = ""  # aggregated | disaggregated | "" (not stated)
    spec_decoding: str = ""  # mtp | none | "" (not stated)
    max_concurrency: int = 0  # the largest concurrency per server instance the source ran (0: not known)
    parallelism: str = ""  # the decode parallelism the source ran: "TP<n>" or "DEP<n>" (attention DP + EP); "" = any
    # the KV cache's share of the memory left after the weights, where the engine sizes it that way
    # (TensorRT-LLM's kv_cache_free_gpu_mem_fraction); 0 = a share of the whole device (Scenario.kv_free_fraction)
    kv_free_fraction: float = 0.0

    @property
    def layout(self) -> tuple[int, str]:
        """(devices per replica, layout) the row states: (0, "") where it does not."""
        return parse_parallelism(self.parallelism)

    @property
    def comparable(self) -> bool:
        """A speed is stated, or the row is a curve's end: the fastest speed, or maximum throughput."""
        return self.metric == "tok_s_user" or self.at_tok_s_user is not None or "max throughput" in self.label


def parse_parallelism(text: str) -> tuple[int, str]:
    """'TP4' -> (4, 'tp'); 'DEP8' (data-parallel attention + expert parallel, TensorRT-LLM's name) or 'EP8'
    -> (8, 'ep'); '' -> (0, '')."""
    if not text:
        return 0, ""
    m = re.fullmatch(r"(TP|DEP|EP)(\d+)", text.strip().upper())
    if not m or int(m.group(2)) < 1:
        raise CatalogError(f"parallelism {text!r}: expected TP<n> or DEP<n> (e.g. TP8, DEP4)")
    return int(m.group(2)), "tp" if m.group(1) == "TP" else "ep"


def load_anchors(path: str | Path | None = None) -> list[Measured]:
    """The `measured` tok/s rows of anchors.csv (costs are checked by `tokenfab claims`, not fitted)."""
    text = Path(path).read_text() if path else resources.files("tokenfab.perf").joinpath("anchors.csv").read_text()
    out = []
    for row in csv.DictReader(text.splitlines()):
        if row["kind"] != "measured" or row["metric"] not in ("tok_s_gpu", "tok_s_user"):
            continue
        hw = row["hardware"]
        m = re.match(r"(\d+)x\s+(.*)", hw)
        devices = int(m.group(1)) if m else None
        hw = (m.group(2) if m else hw).replace(" NVL72", "")
        model = row["model"].split(" / ")[0]
        parse_parallelism(row.get("parallelism") or "")  # a malformed value fails here, naming itself
        kv_free = parse_fraction(row.get("kv_free_fraction") or "", "kv_free_fraction")
        out.append(Measured(row["subject"], hw, model, row["precision"] or "fp8",
                            int(row["isl"] or 1024), int(row["osl"] or 1024), row["metric"], float(row["value"]),
                            float(row["at_tok_s_user"]) if row["at_tok_s_user"] else None, devices, row["source"],
                            row.get("tokens_counted") or "output", row.get("serving") or "",
                            row.get("spec_decoding") or "", int(row.get("max_concurrency") or 0),
                            row.get("parallelism") or "", kv_free))
    return out


def parse_fraction(text: str, name: str) -> float:
    """'0.9' -> 0.9; '' -> 0.0 (not stated); anything outside (0, 1] fails, naming the value."""
    if not text.strip():
        return 0.0
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 < value <= 1.0:
        raise CatalogError(f"{name} {text!r}: expected a fraction in (0, 1], e.g. 0.9")
    return value


def mode_for(m: Measured) -> str:
    if m.serving:
        return m.serving
    return "disaggregated" if "disagg" in m.label.lower() else "aggregated"


def configurations(cat: Catalog, m: Measured) -> list[Scenario]:
    """The serving configurations a row's figure may come from, as its source describes them.

    A stated serving mode and speculative decoding give one configuration. Where the source does not
    say whether speculative decoding ran, its curve is the best over the configurations it ran
    (InferenceX plots the frontier over its search space, and its DeepSeek-R1 search space includes
    MTP runs), so for a model that ships MTP heads the prediction is the better of no drafts and one
    MTP draft per step. (InferenceX also runs 2 and 3 drafts; at one acceptance rate for every draft
    the model over-credits those, since it charges neither the lower acceptance of later drafts nor
    their sequential draft passes, so they are left out.) A serving mode not stated is aggregated.
    `max_concurrency` caps the concurrency per replica where the source says how far it swept, and
    `parallelism` pins the devices per replica and the layout where the source states them, and
    `kv_free_fraction` sizes the KV cache as the source's engine does.
    """
    model = cat.model(m.model)
    devices, layout = m.layout
    if layout == "ep" and not model.is_moe:
        raise CatalogError(f"{m.label}: {m.parallelism} is expert parallel, but {model.name} has no experts")
    mode = mode_for(m)
    if m.spec_decoding == "mtp":
        drafts = [1]
    elif m.spec_decoding == "none" or not model.mtp_layers:
        drafts = [0]
    else:
        drafts = [0, 1]
    return [Scenario(model, cat.hw(m.hardware), m.precision, m.isl, m.osl, mode=mode, spec_tokens=k,
                     max_concurrency=m.max_concurrency, devices=devices, layout=layout,
                     kv_free_fraction=m.kv_free_fraction) for k in drafts]


def throughput_at_speed(points: list[OperatingPoint], speed: float) -> float:
    """tok/s per device at exactly `speed` tok/s per user on the Pareto frontier of `points`, read as
    InferenceX reads its own runs: a monotone (PCHIP, like its Steffen splines) interpolation between
    frontier points. 0 beyond the fastest point; the slowest point's throughput below it."""
    from scipy.interpolate import PchipInterpolator

    front = pareto(points)  # ascending speed, descending throughput
    xs = [p.tok_s_user for p in front]
    ys = [p.tok_s_device for p in front]
    if speed > xs[-1]:
        return 0.0
    if speed <= xs[0] or len(xs) == 1:
        return ys[0] if speed <= xs[0] else ys[-1]
    return float(PchipInterpolator(np.log(xs), ys)(math.log(speed)))


def predict(cat: Catalog, m: Measured, eff: Efficiency) -> float:
    """The model's figure for `m`'s metric over `configurations(m)` (a tok/s/GPU row with no stated
    speed gets the maximum)."""
    points = []
    for s in configurations(cat, m):
        try:
            points.extend(sweep(s, eff).points)
        except CatalogError:
            continue
    if not points:
        raise CatalogError(f"no configuration of {m.model} on {m.hardware} fits")
    if m.metric == "tok_s_user":
        return max(p.tok_s_user for p in points)
    out = max(p.tok_s_device for p in points) if m.at_tok_s_user is None else \
        throughput_at_speed(points, m.at_tok_s_user)
    return out * (1 + m.isl / m.osl) if m.tokens_counted == "total" else out


def predictable(cat: Catalog, m: Measured, eff: Efficiency = Efficiency()) -> bool:
    """Whether the model can represent `m` at all (e.g. not a model that needs more than one scale-up domain)."""
    try:
        predict(cat, m, eff)
    except CatalogError:
        return False
    return True


def scorable(cat: Catalog, points: list[Measured], eff: Efficiency = Efficiency()) -> list[Measured]:
    """The rows a prediction can be compared with: a speed (or curve end) stated, and representable."""
    return [m for m in points if m.comparable and predictable(cat, m, eff)]


def errors(cat: Catalog, points: list[Measured], eff: Efficiency) -> list[float]:
    """Relative error of each prediction: predicted / measured - 1."""
    out = []
    for m in points:
        try:
            out.append(predict(cat, m, eff) / m.value - 1.0)
        except CatalogError:
            out.append(float("nan"))
    return out


def calibrate(cat: Catalog, points: list[Measured], start: Efficiency = Efficiency(),
              fit: tuple[str, ...] = FIT) -> Efficiency:
    """Fit the efficiencies named in `fit` (any of BOUNDS; default FIT) to `points`, the others kept
    at `start`'s: a global search (differential evolution, seeded) then a local polish.

    The objective is the sum of squared log errors. It is piecewise in the parameters (a prediction
    is read off a frontier of discrete operating points), which traps a local method alone in the
    first flat step it meets; the global search finds the basin, least squares refines it.
    """
    from scipy.optimize import differential_evolution, least_squares

    unknown = [k for k in fit if k not in BOUNDS]
    if unknown or not fit:
        raise CatalogError(f"cannot fit {', '.join(unknown) or 'nothing'}: choose from {', '.join(BOUNDS)}")
    pts = scorable(cat, points, start)
    if not pts:
        raise CatalogError("no measured point the model can represent: nothing to fit")
    lo = np.array([BOUNDS[k][0] for k in fit])
    hi = np.array([BOUNDS[k][1] for k in fit])
    logscale = np.array([k.endswith("_s") for k in fit])  # times span decades: search their logarithm

    def to_params(z: np.ndarray) -> np.ndarray:
        return np.where(logscale, np.exp(z), z)

    zlo, zhi = np.where(logscale, np.log(lo), lo), np.where(logscale, np.log(hi), hi)

    def resid(z: np.ndarray) -> np.ndarray:
        eff = replace(start, **dict(zip(fit, to_params(z))))
        r = []
        for m in pts:
            try:
                p = predict(cat, m, eff)
            except CatalogError:
                p = 0.0
            r.append(math.log(max(p, 1e-9) / m.value))
        return np.array(r)

    best = differential_evolution(lambda z: float(np.sum(resid(z) ** 2)), list(zip(zlo, zhi)), seed=0,
                                  maxiter=25, popsize=8, tol=1e-3, polish=False)
    res = least_squares(resid, best.x, bounds=(zlo, zhi), diff_step=0.02)
    z = res.x if np.sum(res.fun**2) <= best.fun else best.x
    return replace(start, **{k: float(v) for k, v in zip(fit, to_params(z))})


def measured_from_curve(curve: Curve, hardware: str, model: str, precision: str, isl: int,
                        osl: int) -> list[Measured]:
    """A measured Curve (a `tokenfab bench` summary) as calibration rows: each point's output tok/s per
    device at its tok/s per user, aggregated serving, no speculative decoding, and the sweep capped at
    the highest concurrency the run served (the model is not credited with batches never measured)."""
    pts = [p for p in curve.points if p.tok_s_device > 0 and p.tok_s_user > 0]
    if not pts:
        raise CatalogError(f"curve {curve.name!r} has no point with throughput")
    cap = int(max(p.concurrency for p in pts))
    return [Measured(f"concurrency {p.concurrency:g}: {curve.name}", hardware, model, precision, isl, osl,
                     "tok_s_gpu", p.tok_s_device, p.tok_s_user, None, curve.provenance.source, "output",
                     "aggregated", "none", cap) for p in pts]


def efficiency_sets() -> dict[str, dict[str, Any]]:
    """The built-in efficiency sets (`efficiency_sets.yaml`): name -> {"about": ..., "efficiency": {...}}."""
    text = resources.files("tokenfab.perf").joinpath("efficiency_sets.yaml").read_text()
    return yaml.safe_load(text)["sets"]


def load_efficiency(path: str | Path) -> Efficiency:
    """Efficiencies from a JSON file `tokenfab calibrate --out` wrote (or a flat {name: value} object), or
    a built-in set by name (`efficiency_sets`); efficiencies a file or set does not name keep the defaults."""
    sets = efficiency_sets()
    if str(path) in sets and not Path(path).exists():
        return Efficiency(**sets[str(path)]["efficiency"])
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CatalogError(f"cannot read efficiencies from {path}: no such file, and not a built-in set "
                           f"({', '.join(sets)})") from None
    except (OSError, ValueError) as exc:
        raise CatalogError(f"cannot read efficiencies from {path}: {exc}") from None
    data = data.get("efficiency", data) if isinstance(data, dict) else data
    if not isinstance(data, dict):
        raise CatalogError(f"{path}: expected a JSON object of efficiencies")
    known = {f.name for f in fields(Efficiency)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise CatalogError(f"{path}: unknown efficiency {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    bad = [k for k, v in data.items() if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0]
    if bad:
        raise CatalogError(f"{path}: {', '.join(bad)} must be non-negative numbers")
    return Efficiency(**{k: float(v) for k, v in data.items()})


def split(points: list[Measured], cat: Catalog | None = None) -> tuple[list[Measured], list[Measured]]:
    """Deterministic held-out split of the scorable rows (comparable, and predictable given `cat`):
    every other one is held out."""
    rows = [m for m in points if m.comparable] if cat is None else scorable(cat, points)
    return rows[0::2], rows[1::2]

