"""Hardware-aware search: measured latency, latency datasets, a learned latency
predictor and the differentiable latency penalty (see docs/latency.md)."""

from diffnas.hardware.latency import (
    LatencySettings,
    LatencyStats,
    device_fingerprint,
    measure_latency,
    measure_many,
)

__all__ = [
    "LatencySettings", "LatencyStats", "device_fingerprint", "measure_latency", "measure_many",
]
