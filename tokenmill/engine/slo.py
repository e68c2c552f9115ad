"""Latency targets (SLOs) and the step-time model the slo scheduler and the energy accounting share.

A request may carry an `SLOTarget`: a time to first token and a time per output token, both
optional (a request with neither is best effort). The scheduler's `slo` policy orders work by
slack, the deadline minus the predicted finish, and so it must predict how long a step takes.

`StepTimeModel` predicts a step's duration from what the step holds:

    t = c0 + c_tok * new_tokens + c_row * sampled_rows + c_att * sum(new_tokens * context) / 1024

c0 is the fixed cost of a step (reading every weight once: what makes small decode batches
memory bound), c_tok the per-token matmul work, c_row the per-row LM head and sampler, c_att
attention over the cached context. It is fitted by exponentially weighted least squares on the
engine's own steps (`observe`, every step; solved every few steps, see REFIT_EVERY), kept near a
prior by a ridge term so that steps that never vary a feature (all decodes, say) leave its
coefficient where the prior put it, and coefficients are kept non-negative. `LLMEngine.calibrate`
measures a prior at startup.

The same row costs weigh each request's share of a step when energy and device time are
attributed (tokenmill/ops/energy.py): a prefill chunk of 500 tokens costs about 500 c_tok plus
its attention, a decode row c_tok + c_row + its attention, as measured, not as assumed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

NUM_FEATURES = 4  # intercept, new tokens, sampled rows, attention (new tokens x context / 1024)
DEFAULT_PRIOR = (5e-3, 2e-4, 1e-4, 2e-6)  # seconds: a small model on a CPU core, before anything is measured
# The fit is solved after every step for its first REFIT_WARMUP steps, then every REFIT_EVERY steps, or at
# once when a step's time is off its prediction by more than REFIT_ERROR. A solve costs ~0.15 ms (the
# non-negative active set loop, which decode-only steps take): a tenth of a GPU step's host work at batch
# 256, where observations decay with a half-life of ~140 steps and coefficients 7 steps old lose nothing.
REFIT_WARMUP, REFIT_EVERY, REFIT_ERROR = 64, 8, 0.2


class SLOAdmissionError(Exception):
    """A request's TTFT target cannot be met (slo_admission="reject"); the server answers 429."""


@dataclass(frozen=True)
class SLOTarget:
    """A request's latency targets, in seconds; None: no target for that part."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    slo_class: str = "custom"  # the tenant's SLO class it came from, or "custom" (the request's own)

    @property
    def best_effort(self) -> bool:
        return self.ttft_s is None and self.tpot_s is None

    @classmethod
    def from_dict(cls, d: dict[str, Any], slo_class: str = "custom", param: str = "slo") -> SLOTarget:
        """From `{"ttft_ms": ..., "tpot_ms": ...}` (the HTTP field); ValueError names what is wrong."""
        if not isinstance(d, dict):
            raise ValueError(f"{param}: expected an object with ttft_ms and/or tpot_ms")
        # (no "class": the class label is the server's, a tenant's class or "custom", never the client's)
        unknown = set(d) - {"ttft_ms", "tpot_ms"}
        if unknown:
            raise ValueError(f"{param}: unknown field(s) {sorted(unknown)}; expected ttft_ms, tpot_ms")
        vals = {}
        for k in ("ttft_ms", "tpot_ms"):
            v = d.get(k)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{param}.{k}: must be a positive number of milliseconds, got {v!r}")
            vals[k] = float(v) / 1000.0
        return cls(vals.get("ttft_ms"), vals.get("tpot_ms"), slo_class)

    def to_dict(self) -> dict[str, Any]:
        return {"class": self.slo_class,
                "ttft_ms": None if self.ttft_s is None else round(self.ttft_s * 1000, 3),
                "tpot_ms": None if self.tpot_s is None else round(self.tpot_s * 1000, 3)}


def row_features(new_tokens: int, context: int, sampled: bool) -> tuple[float, float, float]:
    """One chunk's variable features: its new tokens, whether a row of logits is sampled, and its
    attention work (each new token attends to the context before it and to the chunk)."""
    attn = new_tokens * (context + (new_tokens + 1) / 2) / 1024.0
    return float(new_tokens), 1.0 if sampled else 0.0, attn


def step_features(scheduled: list) -> np.ndarray:
    """row_features of each of a step's chunks (ScheduledSeq), as the rows of an [n, 3] array:
    one pass in Python, the arithmetic in numpy (a step may hold hundreds of decodes)."""
    raw = np.empty((len(scheduled), 3), dtype=np.float64)
    new = raw[:, 0]
    new[:] = [s.num_new_tokens for s in scheduled]  # (column lists: twice as fast as an array of tuples)
    raw[:, 1] = [s.completes for s in scheduled]
    raw[:, 2] = [s.start for s in scheduled]
    raw[:, 2] += (new + 1) / 2
    raw[:, 2] *= new / 1024.0
    return raw


class StepTimeModel:
    """Predicts a step's seconds from its features; fitted online (see the module docstring)."""

    def __init__(self, prior: tuple[float, float, float, float] = DEFAULT_PRIOR,
                 decay: float = 0.995, prior_weight: float = 1.0) -> None:
        self.decay = decay
        self.prior_weight = prior_weight
        self.overhead_s = 0.0
        self.set_prior(prior)

    def observe_overhead(self, seconds: float) -> None:
        """The engine's own work per step outside the model (scheduling, stop checks, detokenizing):
        a running mean, which the scheduler adds to each step's predicted time."""
        if math.isfinite(seconds) and seconds >= 0:
            self.overhead_s += 0.05 * (seconds - self.overhead_s)

    def set_prior(self, prior: tuple[float, ...]) -> None:
        """Restarts the fit from these coefficients (a calibration's, or the defaults)."""
        self.prior = np.asarray(prior, dtype=np.float64)
        self.coef = self.prior.copy()
        self._floor = 1e-6 / np.maximum(np.abs(self.prior), DEFAULT_PRIOR) ** 2  # (_solve's second term)
        self._xtx = np.zeros((NUM_FEATURES, NUM_FEATURES))
        self._xty = np.zeros(NUM_FEATURES)
        self._n = 0.0  # observations, decayed as the sums are
        self.num_observed = 0
        self._unsolved = 0  # observations since the last solve

    # -- prediction -------------------------------------------------------------------------------
    def predict(self, tokens: float, rows: float, attn: float) -> float:
        c = self.coef
        return float(c[0] + c[1] * tokens + c[2] * rows + c[3] * attn)

    def row_cost(self, tokens: float, sampled: float, attn: float) -> float:
        """A chunk's variable cost in seconds (the step's fixed cost c0 excluded)."""
        c = self.coef
        return float(c[1] * tokens + c[2] * sampled + c[3] * attn)

    def row_costs(self, features: np.ndarray) -> np.ndarray:
        """row_cost of each row of step_features."""
        return features @ self.coef[1:]

    @property
    def per_token(self) -> float:
        return float(self.coef[1])

    # -- fitting ----------------------------------------------------------------------------------
    def observe(self, tokens: float, rows: float, attn: float, seconds: float) -> None:
        if not math.isfinite(seconds) or seconds <= 0:
            return
        # (the prediction before this step updates the sums: does the fit need solving now?)
        surprise = abs(self.predict(tokens, rows, attn) - seconds) > REFIT_ERROR * seconds
        x = np.array([1.0, tokens, rows, attn])
        # Relative error matters (a 5 ms decode and a 500 ms prefill alike): weigh by 1/t^2.
        w = 1.0 / max(seconds, 1e-4) ** 2
        self._xtx = self._xtx * self.decay + w * np.outer(x, x)
        self._xty = self._xty * self.decay + w * x * seconds
        self._n = self._n * self.decay + 1.0
        self.num_observed += 1
        self._unsolved += 1
        if surprise or self._unsolved >= REFIT_EVERY or self.num_observed <= REFIT_WARMUP:
            self._solve()

    def fit(self) -> np.ndarray:
        """The coefficients with every observation so far solved in (coef may be a few steps behind)."""
        if self._unsolved:
            self._solve()
        return self.coef

    def _solve(self) -> None:
        self._unsolved = 0
        # Ridge toward the prior: deviating a coefficient costs as much as prior_weight average steps
        # would tell about it (the data's own scale), so a feature the steps vary is learned from them
        # within a few steps, whatever the prior, and one they never vary apart from the others (say
        # tokens and rows in decode-only steps) stays where the prior put it. The small second term
        # keeps coefficients of features never seen at all (zero columns) at the prior.
        n = max(self._n, 1.0)
        lam = self.prior_weight * (np.diag(self._xtx) / n + self._floor)  # (a diagonal)
        a_all = self._xtx + np.diag(lam)
        b_all = self._xty + lam * self.prior
        # (every step: the whole system first, which is the answer unless a coefficient comes out negative)
        try:
            sol = np.linalg.solve(a_all, b_all)
        except np.linalg.LinAlgError:
            return
        if not (sol < 0).any():
            self.coef = sol
            return
        active = np.arange(NUM_FEATURES)
        coef = self.prior.copy()
        for _ in range(NUM_FEATURES):
            # Coefficients taken out of the fit stay at 0 and what they explained moves to the others.
            try:
                sol = np.linalg.solve(a_all[np.ix_(active, active)], b_all[active])
            except np.linalg.LinAlgError:
                return
            coef = np.zeros(NUM_FEATURES)
            coef[active] = sol
            if not (sol < 0).any():
                break
            active = active[sol >= 0]
            if not len(active):
                return
        self.coef = np.maximum(coef, 0.0)

    def to_dict(self) -> dict[str, float]:
        self.fit()
        return self.snapshot()

    def snapshot(self) -> dict[str, float]:
        """The coefficients as last solved (at most REFIT_EVERY steps behind), without solving: what
        another thread may read (a server's model card) while the engine thread observes."""
        c = self.coef
        return {"step_s": float(c[0]), "overhead_s": self.overhead_s, "per_token_s": float(c[1]),
                "per_row_s": float(c[2]), "per_attention_ktoken_s": float(c[3]), "steps_observed": self.num_observed}
