"""Energy counters: cumulative joules from NVML (GPUs), RAPL (powercap), or a labelled CPU-time model.

Every source says what it is (`name`); a modelled figure is never passed off as a measured one.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Protocol


class EnergySource(Protocol):
    name: str  # e.g. "nvml", "rapl", "model:cpu-time(...)"
    measured: bool

    def read_j(self) -> float:
        """Cumulative joules since an arbitrary origin (monotonic)."""
        ...


class NvmlEnergy:
    measured = True

    def __init__(self) -> None:
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        self._nvml = pynvml
        n = pynvml.nvmlDeviceGetCount()
        if n == 0:
            raise RuntimeError("no NVIDIA devices")
        self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(n)]
        self.name = f"nvml({n} GPU{'s' if n > 1 else ''})"
        self.read_j()

    def read_j(self) -> float:
        return sum(self._nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self.handles) / 1000.0


class RaplEnergy:
    """Package energy from /sys/class/powercap (intel-rapl / amd), with counter wrap-around handled."""

    measured = True

    def __init__(self, root: str = "/sys/class/powercap") -> None:
        zones = [p for p in Path(root).glob("*rapl:[0-9]*") if p.name.count(":") == 1]
        if not zones:
            raise RuntimeError(f"no RAPL package zones under {root}")
        self.zones = sorted(zones)
        self.max = [int((z / "max_energy_range_uj").read_text()) for z in self.zones]
        self.last = [self._raw(z) for z in self.zones]
        self.total_uj = 0
        self.name = f"rapl({len(self.zones)} package{'s' if len(self.zones) > 1 else ''})"

    @staticmethod
    def _raw(zone: Path) -> int:
        return int((zone / "energy_uj").read_text())

    def read_j(self) -> float:
        for i, z in enumerate(self.zones):
            v = self._raw(z)
            d = v - self.last[i]
            if d < 0:
                d += self.max[i]
            self.total_uj += d
            self.last[i] = v
        return self.total_uj / 1e6


class CpuTimeModel:
    """joules = idle_w x wall seconds + busy_w_per_core x CPU seconds of this process. A model, labelled so."""

    measured = False

    def __init__(self, busy_w_per_core: float = 10.0, idle_w: float = 0.0) -> None:
        self.busy_w_per_core = busy_w_per_core
        self.idle_w = idle_w
        self.t0 = time.monotonic()
        self.c0 = _cpu_s()
        self.name = f"model:cpu-time({busy_w_per_core:g} W/busy core + {idle_w:g} W idle)"

    def read_j(self) -> float:
        return self.idle_w * (time.monotonic() - self.t0) + self.busy_w_per_core * (_cpu_s() - self.c0)


def _cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def detect(prefer: str = "auto", busy_w_per_core: float = 10.0, idle_w: float = 0.0) -> EnergySource:
    """NVML where a GPU is, else RAPL where readable, else the CPU-time model. `prefer` forces one."""
    if prefer in ("auto", "nvml"):
        try:
            return NvmlEnergy()
        except Exception:  # noqa: BLE001 - no library, no driver, or no GPU
            if prefer == "nvml":
                raise
    if prefer in ("auto", "rapl"):
        try:
            return RaplEnergy()
        except (OSError, RuntimeError, ValueError):
            if prefer == "rapl":
                raise
    if prefer not in ("auto", "nvml", "rapl", "model"):
        raise ValueError(f"energy source {prefer!r}: use auto, nvml, rapl or model")
    return CpuTimeModel(busy_w_per_core, idle_w)
