"""Calibration: fit the named efficiencies to measured points (anchors.csv rows, a bench summary, or a CSV).

A measured point is (hardware, model, precision, ISL, OSL, metric, value, at tok/s per user). The
prediction for it is the frontier's tok/s per device at that speed (or the maximum when no speed is
given, or the fastest speed for a tok_s_user metric). The fit minimises squared log errors with
scipy's `least_squares` over (eff_mem, eff_compute, eff_prefill, step_overhead_s), within bounds.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

import numpy as np

from tokenfab.perf.catalog import Catalog, CatalogError
from tokenfab.perf.model import Efficiency, Scenario, sweep

FIT = ("eff_mem", "eff_compute", "eff_prefill", "step_overhead_s")
BOUNDS = {"eff_mem": (0.2, 0.95), "eff_compute": (0.05, 0.9), "eff_prefill": (0.1, 0.9),
          "step_overhead_s": (1e-4, 0.05)}


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
        out.append(Measured(row["subject"], hw, model, row["precision"] or "fp8",
                            int(row["isl"] or 1024), int(row["osl"] or 1024), row["metric"], float(row["value"]),
                            float(row["at_tok_s_user"]) if row["at_tok_s_user"] else None, devices, row["source"]))
    return out


def mode_for(m: Measured) -> str:
    return "disaggregated" if "disagg" in m.label.lower() else "aggregated"


def predict(cat: Catalog, m: Measured, eff: Efficiency) -> float:
    s = Scenario(cat.model(m.model), cat.hw(m.hardware), m.precision, m.isl, m.osl, mode=mode_for(m))
    curve = sweep(s, eff)
    if m.metric == "tok_s_user":
        return max(p.tok_s_user for p in curve.points)
    if m.at_tok_s_user is None:
        return max(p.tok_s_device for p in curve.points)
    return curve.throughput_at(m.at_tok_s_user)


def errors(cat: Catalog, points: list[Measured], eff: Efficiency) -> list[float]:
    """Relative error of each prediction: predicted / measured - 1."""
    out = []
    for m in points:
        try:
            out.append(predict(cat, m, eff) / m.value - 1.0)
        except CatalogError:
            out.append(float("nan"))
    return out


def calibrate(cat: Catalog, points: list[Measured], start: Efficiency = Efficiency()) -> Efficiency:
    from scipy.optimize import least_squares

    x0 = np.array([getattr(start, k) for k in FIT])
    lo = np.array([BOUNDS[k][0] for k in FIT])
    hi = np.array([BOUNDS[k][1] for k in FIT])

    def resid(x: np.ndarray) -> np.ndarray:
        eff = replace(start, **dict(zip(FIT, x)))
        r = []
        for m in points:
            try:
                p = predict(cat, m, eff)
            except CatalogError:
                p = 0.0
            r.append(math.log(max(p, 1e-9) / m.value))
        return np.array(r)

    res = least_squares(resid, np.clip(x0, lo, hi), bounds=(lo, hi), diff_step=0.05)
    return replace(start, **dict(zip(FIT, res.x)))


def split(points: list[Measured]) -> tuple[list[Measured], list[Measured]]:
    """Deterministic held-out split: every other row is held out."""
    return points[0::2], points[1::2]

