"""Metering: energy sources (NVML, RAPL, a labelled CPU-time model), per-request attribution, Prometheus metrics."""
