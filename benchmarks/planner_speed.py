"""Planner speed: 6 hardware types x 5 tiers x 64 concurrency points, curves predicted and the LP solved.

    python benchmarks/planner_speed.py
"""

from __future__ import annotations

import statistics
import sys
import time

from tokenfab.economics.planner import HardwareOption, plan_factory
from tokenfab.economics.tiers import SLO, Tier, TierTable
from tokenfab.perf.catalog import Catalog
from tokenfab.perf.model import Efficiency, Scenario, sweep

HW = [("H100", "fp8"), ("H200", "fp8"), ("B200", "fp4"), ("GB200", "fp4"), ("GB300", "fp4"), ("VR200", "fp4")]
TIERS = TierTable(tuple(Tier(n, 0, p, SLO(5000, s), rank=i) for i, (n, p, s) in enumerate(
    [("ultra", 150, 400), ("premium", 45, 200), ("high", 6, 100), ("medium", 3, 50), ("free", 0, 20)])))


def once() -> float:
    t0 = time.perf_counter()
    cat = Catalog.default()
    model = cat.model("Llama-3.1-70B")
    concs = [int(1.15**i) + i for i in range(64)]  # 64 distinct points, 1 .. ~8,000
    opts = []
    for name, prec in HW:
        hw = cat.hw(name)
        curve = sweep(Scenario(model, hw, prec, 1024, 1024), Efficiency(), concurrencies=concs, parallelisms=[8])
        opts.append(HardwareOption(name, curve, hw.kw_all_in, hw.usd_per_device_hour))
    plan_factory(1000.0, TIERS, opts)
    return time.perf_counter() - t0


def main() -> int:
    times = [once() for _ in range(7)]
    print(f"full plan (6 hardware x 5 tiers x 64 concurrency points): median {statistics.median(times) * 1000:.1f} ms, "
          f"min {min(times) * 1000:.1f} ms over {len(times)} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
