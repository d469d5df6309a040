"""What a token costs: energy at the wall (x PUE) at an electricity price, plus amortised capital per second."""

from __future__ import annotations


def energy_cost_usd(joules: float, usd_per_kwh: float, pue: float = 1.0) -> float:
    return joules / 3.6e6 * usd_per_kwh * pue


def request_cost_usd(joules: float, device_s: float, usd_per_kwh: float, pue: float, capex_usd_per_hour: float) -> float:
    """Energy cost of the joules a request drew plus its share of the machine's amortised cost."""
    return energy_cost_usd(joules, usd_per_kwh, pue) + device_s * capex_usd_per_hour / 3600.0


def usd_per_mtok_from_device_hour(usd_per_device_hour: float, tok_s_per_device: float) -> float:
    """InferenceX's formula: $/M tokens = $/device-hour x 1e6 / (tok/s per device x 3600)."""
    if tok_s_per_device <= 0:
        raise ValueError("tok/s per device must be > 0")
    return usd_per_device_hour * 1e6 / (tok_s_per_device * 3600.0)
