"""Percentiles, one definition for the engine (test-time compute's pruning) and every benchmark."""

from __future__ import annotations

import math
import statistics


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation, as numpy's default."""
    v = sorted(values)
    if len(v) == 1:
        return v[0]
    pos = (len(v) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def percentile_summary(values: list[float], scale: float = 1.0) -> dict[str, float]:
    """n, mean, p50, p90, p99 and max of the values times scale (1000: seconds as ms); {} for none."""
    if not values:
        return {}
    v = sorted(x * scale for x in values)
    return {"n": len(v), "mean": statistics.fmean(v), "p50": percentile(v, 50), "p90": percentile(v, 90),
            "p99": percentile(v, 99), "max": v[-1]}
