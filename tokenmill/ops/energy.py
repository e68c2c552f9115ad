"""Energy, device time, FLOPs and cost per request.

Measurement. An `EnergyMeter` is a cumulative joule counter, read right before each engine step
(`LLMEngine.before_step`) and right after it (`LLMEngine.on_step`); the difference is the step's
energy. Three sources:

- `rapl`: Linux powercap (Intel RAPL, and AMD's RAPL through the same driver),
  `/sys/class/powercap/intel-rapl:N/energy_uj` of every top-level (package) zone; subzones
  (`intel-rapl:N:M`: cores, uncore, DRAM) lie inside their package and are skipped, as are
  `psys` (the whole platform, packages included) and the `intel-rapl-mmio` duplicates. The
  counters wrap at `max_energy_range_uj`; a reading below the last one is a wrap. They are often
  readable by root only. `TOKENMILL_RAPL_ROOT` replaces `/sys/class/powercap` (tests).
  It measures the whole package, whatever runs on it.
- `nvml`: on CUDA, NVML's `nvmlDeviceGetTotalEnergyConsumption` (mJ since the driver loaded) of
  the engine's GPU, when `pynvml` is installed (it is not a dependency) and the GPU supports it.
  The counter moves every ~20 ms; it is read at most every 10 ms (`NvmlMeter.read_joules`).
- `model`: a power model, where neither counter is readable (a VM without powercap, a container):
  watts = idle + busy x busy units. On the CPU the busy units are the process's threads that are
  running, counted by the process CPU clock: a step that ran 2 torch threads for 10 ms adds 20 ms
  of busy time, and one held up by other processes on a shared machine adds only what it ran
  (threads x wall time would charge it for theirs). On a GPU a step's wall time is busy (1 unit).
  Defaults: on the CPU an idle share of 1.5 W per torch thread the engine uses and 5 W per busy
  thread (current server CPUs draw 3.5 to 7 W per core at full load: TDP over cores, e.g. EPYC
  9654 360 W / 96 cores, Xeon 8480+ 350 W / 56; an idle package about a third of that); on a GPU
  50 W idle and 250 W busy. Both are set with --power-idle-watts and --power-watts. Every figure
  it gives is flagged `energy_source: "model"`: an estimate from time, not a measurement.

`--energy-source auto` takes nvml on CUDA and rapl on the CPU, else the model (a CUDA engine does
not fall back on rapl: the CPU package's counter would miss the GPU's work; ask for it by name).

Attribution. A step's energy and its seconds are split among the chunks it ran by each chunk's
share of the step's variable cost, `StepTimeModel.row_cost` (tokenmill/engine/slo.py): its new
tokens, its sampled row and its attention over the cached context, each weighted by the cost
the engine measured for it on its own steps (fitted online). A 500-token prefill chunk thus
carries about 500 decode tokens' worth of the step, plus its attention. The step's fixed cost
(reading every weight once) is shared in the same proportion, so the shares sum to the step
exactly. A request sums its chunks (n > 1 samples, beams, forks; a preempted request's recompute
too: that work was done again). Energy measured between steps (idle, the host's Python between
steps, a step that failed) is attributed to no request: it is counted apart (`idle_joules`,
the `tokenmill:idle_energy_joules` metric) and is per meter, so per device and process.

FLOPs per chunk come from the model's shape: 2 x non-embedding parameters x new tokens, plus
attention 4 x layers x query heads x head_dim x (context + new/2) x new tokens (a sliding-window
layer's span capped at its window), plus the LM head 2 x hidden x vocab per row of logits
(sampled rows, forks, draft tokens verified, prompt logprobs).

Cost: cost_usd = device_seconds x price_per_device_hour / 3600
                 + energy_joules x PUE / 3.6e6 x price_per_kwh.
Device seconds are the request's share of the steps' wall time (a device-hour is the rental of
the machine or GPU); time the device sits idle is nobody's.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

ENERGY_SOURCES = ("auto", "rapl", "nvml", "model")
RAPL_ROOT = "/sys/class/powercap"
# The power model's defaults: (idle watts per thread, busy watts per thread) on CPU; (idle, busy) per GPU.
CPU_IDLE_WATTS_PER_THREAD, CPU_BUSY_WATTS_PER_THREAD = 1.5, 5.0  # busy: per CPU second per second
GPU_IDLE_WATTS, GPU_BUSY_WATTS = 50.0, 250.0


class MeterUnavailable(Exception):
    """The asked-for energy counter cannot be read here (the message says why)."""


class EnergyMeter:
    """A cumulative joule counter. One per source and device in a process (`open_meter`), shared
    by every engine on that device, which also share its ledger: the joules their steps took
    (`stepped_joules`) and, from that, the joules no step took (`idle_joules`)."""

    source = ""
    # The smallest change the counter shows, in joules, and how often it updates (seconds).
    resolution_joules = 0.0
    update_period_s = 0.0

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.stepped_joules = 0.0
        self.opened_joules = 0.0  # the reading when it was opened (set by open_meter)

    def read_joules(self) -> float:
        raise NotImplementedError

    def note_busy(self, seconds: float) -> None:
        """A step ran for this long (the power model's busy time; counters need not be told)."""

    def idle_joules(self) -> float:
        """Energy read since the meter opened that no engine step took."""
        return max(0.0, self.read_joules() - self.opened_joules - self.stepped_joules)

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "resolution_joules": self.resolution_joules,
                "update_period_s": self.update_period_s}


class _Zone:
    __slots__ = ("path", "fd", "range_uj", "last", "total")

    def __init__(self, path: str, fd: int, range_uj: int, first: int) -> None:
        self.path, self.fd, self.range_uj, self.last, self.total = path, fd, range_uj, first, 0


class RaplMeter(EnergyMeter):
    """The package zones of Linux powercap (see the module docstring)."""

    source = "rapl"
    resolution_joules = 2.0 ** -16  # RAPL's energy unit on Intel and AMD (15.3 uJ); the file counts uJ
    update_period_s = 0.001

    def __init__(self, root: str | None = None) -> None:
        super().__init__()
        root = root or os.environ.get("TOKENMILL_RAPL_ROOT") or RAPL_ROOT
        self.root = root
        self.zones: list[_Zone] = []
        if not os.path.isdir(root):
            raise MeterUnavailable(f"rapl: {root} does not exist (no powercap on this machine)")
        problems = []
        for name in sorted(os.listdir(root)):
            if not re.fullmatch(r"intel-rapl:\d+", name):  # subzones, the mmio duplicates, the control type
                continue
            zone = os.path.join(root, name)
            if _read_text(os.path.join(zone, "name")) == "psys":  # the whole platform: holds the packages
                continue
            path = os.path.join(zone, "energy_uj")
            try:
                fd = os.open(path, os.O_RDONLY)
                first = int(os.pread(fd, 32, 0))
            except (OSError, ValueError) as e:
                problems.append(f"{path}: {getattr(e, 'strerror', None) or e}")
                continue
            rng = _read_text(os.path.join(zone, "max_energy_range_uj"))
            self.zones.append(_Zone(path, fd, int(rng) if rng and rng.isdigit() else 2**32, first))
        if not self.zones:
            why = "; ".join(problems) if problems else "no intel-rapl:N package zone"
            raise MeterUnavailable(f"rapl: nothing readable under {root} ({why}); the counters are often "
                                   f"readable by root only")

    def read_joules(self) -> float:
        with self.lock:
            total = 0
            for z in self.zones:
                v = int(os.pread(z.fd, 32, 0))
                d = v - z.last
                if d < 0:  # the counter wrapped
                    d += z.range_uj
                z.last = v
                z.total += d
                total += z.total
            return total / 1e6

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "zones": [z.path for z in self.zones]}


class NvmlMeter(EnergyMeter):
    """NVML's energy counter of one GPU (mJ since the driver loaded)."""

    source = "nvml"
    resolution_joules = 1e-3
    update_period_s = 0.02

    def __init__(self, device_index: int = 0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._clock = clock
        self._read_at = -math.inf
        self._last = 0.0
        try:
            import pynvml  # optional: not a dependency of tokenmill
        except ImportError:
            raise MeterUnavailable("nvml: the pynvml package is not installed (pip install nvidia-ml-py)") from None
        try:
            pynvml.nvmlInit()
            self._handle = _nvml_handle(pynvml, device_index)
            self._energy = pynvml.nvmlDeviceGetTotalEnergyConsumption
            self._energy(self._handle)
        except Exception as e:
            raise MeterUnavailable(f"nvml: cannot read GPU {device_index}'s energy counter: {e}") from None

    def read_joules(self) -> float:
        # The counter moves every ~20 ms and an NVML call costs tens to hundreds of microseconds
        # (0.36 ms a power read on a K40, ~0.1 ms for a few metrics on an RTX 5080, as reported):
        # read twice every 2 ms step, it would cost a GPU engine a tenth of its host time for the
        # same value. Readings closer than half an update period apart return the last one; a
        # step between two reads gets the energy the counter showed by its end, as it did anyway.
        with self.lock:
            now = self._clock()
            if now - self._read_at >= self.update_period_s / 2:
                self._last = self._energy(self._handle) / 1000.0
                self._read_at = now
            return self._last


def _nvml_handle(pynvml: Any, index: int) -> Any:
    """The NVML handle of torch's CUDA device `index` (by UUID: CUDA_VISIBLE_DEVICES renumbers)."""
    try:
        import torch

        uuid = str(torch.cuda.get_device_properties(index).uuid)
        return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
    except Exception:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
        if index < len(visible) and visible[index].strip().isdigit():
            index = int(visible[index])
        return pynvml.nvmlDeviceGetHandleByIndex(index)


class ModelMeter(EnergyMeter):
    """The power model: idle watts all the time, plus busy watts per busy unit. On the CPU a busy
    unit is a second of CPU time the process's threads ran (`cpu_clock`, the process CPU clock):
    threads x wall time would also charge the time other processes held the cores. On a GPU
    it is a second a step ran (`note_busy`). Its joules are an estimate from time."""

    source = "model"

    def __init__(self, idle_watts: float, busy_watts: float, cpu_clock: Callable[[], float] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.idle_watts, self.busy_watts = idle_watts, busy_watts
        self.cpu_clock = cpu_clock
        self.unit = "thread" if cpu_clock is not None else "gpu"  # what busy_watts is per
        self.clock = clock
        self._t0 = clock()
        self._cpu0 = cpu_clock() if cpu_clock is not None else 0.0
        self._gpu_busy = 0.0

    def wall_seconds(self) -> float:
        return self.clock() - self._t0

    def busy_seconds(self) -> float:
        """Busy unit-seconds since the meter opened: the process's CPU seconds, or a GPU's step seconds."""
        return self.cpu_clock() - self._cpu0 if self.cpu_clock is not None else self._gpu_busy

    def read_joules(self) -> float:
        return self.idle_watts * self.wall_seconds() + self.busy_watts * self.busy_seconds()

    def note_busy(self, seconds: float) -> None:
        if self.cpu_clock is None:
            self._gpu_busy += seconds

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "idle_watts": self.idle_watts, f"busy_watts_per_{self.unit}": self.busy_watts}


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


_METERS: dict[tuple, EnergyMeter] = {}
_METERS_LOCK = threading.Lock()


def open_meter(source: str, device: str = "cpu", idle_watts: float | None = None,
               busy_watts: float | None = None) -> EnergyMeter:
    """The process's meter for this source and device (one per key, shared by the engines on it).
    "auto": nvml on CUDA, rapl on the CPU, else the model. ValueError when an explicit source cannot be read."""
    if source not in ENERGY_SOURCES:
        raise ValueError(f"energy_source: one of {', '.join(ENERGY_SOURCES)}, got {source!r}")
    dev_type, _, idx = device.partition(":")
    cuda = dev_type == "cuda"
    if source == "auto":
        # A GPU's work is measured on the GPU: the CPU package's counter would miss nearly all of it.
        try:
            return open_meter("nvml" if cuda else "rapl", device)
        except ValueError:
            source = "model"
    if source == "model":
        idle = idle_watts if idle_watts is not None else (GPU_IDLE_WATTS if cuda else
                                                          CPU_IDLE_WATTS_PER_THREAD * _torch_threads())
        busy = busy_watts if busy_watts is not None else (GPU_BUSY_WATTS if cuda else CPU_BUSY_WATTS_PER_THREAD)
        key: tuple = ("model", device, idle, busy)
    elif source == "rapl":
        key = ("rapl", os.environ.get("TOKENMILL_RAPL_ROOT") or RAPL_ROOT)
    else:
        if not cuda:
            raise ValueError("energy_source: nvml reads a GPU's counter; this engine runs on the CPU")
        key = ("nvml", int(idx) if idx else _current_cuda_index())
    with _METERS_LOCK:
        meter = _METERS.get(key)
        if meter is None:
            try:
                if key[0] == "model":
                    meter = ModelMeter(idle, busy, None if cuda else time.process_time)
                else:
                    meter = RaplMeter(key[1]) if key[0] == "rapl" else NvmlMeter(key[1])
            except MeterUnavailable as e:
                raise ValueError(f"energy_source: {e}") from None
            meter.opened_joules = meter.read_joules()
            _METERS[key] = meter
    return meter


def _current_cuda_index() -> int:
    import torch

    return torch.cuda.current_device()


@dataclass(frozen=True)
class Prices:
    per_device_hour: float = 0.0  # $ per hour of device time (the machine's or the GPU's rental)
    per_kwh: float = 0.0  # $ per kWh drawn from the grid
    pue: float = 1.0  # power usage effectiveness: facility energy per joule the device draws

    def cost(self, device_seconds: float, energy_joules: float) -> float:
        return (device_seconds * self.per_device_hour / 3600.0
                + energy_joules * self.pue / 3.6e6 * self.per_kwh)


@dataclass
class RequestCompute:
    """What a request's share of the steps it ran in came to (Request.compute)."""

    device_seconds: float = 0.0
    flops: int = 0
    energy_joules: float = 0.0


class FlopModel:
    """FLOPs of one chunk, from the model's shape (see the module docstring); built once per model."""

    def __init__(self, mc: Any, lm_head: bool = True) -> None:
        h, d = mc.hidden_size, mc.head_dim
        self.per_token = 2 * mc.layer_matmul_parameters * mc.num_layers
        self.lm_head_row = 2 * h * mc.vocab_size if lm_head else 0
        self.attn_per_layer = 4 * mc.num_heads * d
        windows = Counter(tuple(mc.sliding_windows) or (None,) * mc.num_layers)
        self.full_layers = windows.pop(None, 0)
        self.windows = sorted(windows.items())  # (window, layers) of the sliding-window layers

    def chunk(self, new_tokens: int, context: int, logit_rows: int) -> int:
        return int(self.chunks(np.array([new_tokens]), np.array([context]), np.array([logit_rows]))[0])

    def chunks(self, new_tokens: np.ndarray, context: np.ndarray, logit_rows: np.ndarray) -> np.ndarray:
        """chunk over arrays: one step's chunks at once (float64 holds the sums exactly)."""
        new = new_tokens.astype(np.float64)
        span = context + new / 2
        attn = self.full_layers * span
        for w, n in self.windows:
            attn = attn + n * np.minimum(span, w)
        return np.floor(self.per_token * new + self.attn_per_layer * attn * new
                        + self.lm_head_row * logit_rows).astype(np.int64)


class EnergyAccounting:
    """One engine's accounting: measures each step, splits it among the step's requests, keeps
    the engine's totals. `before_step` and `on_step` are the engine's hooks (LLMEngine)."""

    def __init__(self, mc: Any, meter: EnergyMeter, prices: Prices, row_costs: Callable[[np.ndarray], np.ndarray],
                 embed: bool = False) -> None:
        self.meter = meter
        self.source = meter.source
        self.prices = prices
        self.row_costs = row_costs  # StepTimeModel.row_costs: each chunk's share of the step
        self.embed = embed
        self.flop_model = FlopModel(mc, lm_head=not embed)
        self.num_steps = 0
        self.step_joules = 0.0  # measured over the steps
        self.step_seconds = 0.0
        self.attributed_joules = 0.0  # handed to requests (equal to step_joules up to rounding)
        self.attributed_seconds = 0.0
        self.flops = 0
        self._e0: float | None = None

    def reset(self) -> None:
        """Forgets the engine's totals (after steps that served no one: a calibration's). Requests
        keep what they were given; the meter's ledger keeps the steps (their energy was a step's)."""
        self.num_steps = 0
        self.step_joules = self.step_seconds = self.attributed_joules = self.attributed_seconds = 0.0
        self.flops = 0

    def before_step(self) -> None:
        self._e0 = self.meter.read_joules()

    def on_step(self, sched: Any, rows: np.ndarray, seconds: float) -> None:
        e0, self._e0 = self._e0, None
        if e0 is None:
            return
        meter = self.meter
        meter.note_busy(seconds)
        joules = max(0.0, meter.read_joules() - e0)
        with meter.lock:
            meter.stepped_joules += joules
        self.num_steps += 1
        self.step_joules += joules
        self.step_seconds += seconds
        weights = self.row_costs(rows)
        total = float(weights.sum())
        if not total > 0:  # a model with nothing fitted yet: by new tokens
            weights = rows[:, 0]
            total = float(weights.sum()) or 1.0
        scheduled = sched.scheduled
        logit_rows = self._logit_rows
        starts = np.array([s.start for s in scheduled], dtype=np.float64)
        # (a decode past its prompt has one row, its sampled one: most rows of most steps, no call)
        lrows = np.array([logit_rows(s) if self.embed or s.num_spec or s.forks or not s.completes
                          or s.start < s.seq.num_prompt_tokens else 1 for s in scheduled], dtype=np.float64)
        flops = self.flop_model.chunks(rows[:, 0], starts, lrows)
        for s, e, t, f in zip(scheduled, (weights * (joules / total)).tolist(), (weights * (seconds / total)).tolist(),
                              flops.tolist()):
            req = s.seq.request
            c = req.compute
            if c is None:
                c = req.compute = RequestCompute()
            c.energy_joules += e
            c.device_seconds += t
            c.flops += f
        self.attributed_joules += joules
        self.attributed_seconds += seconds
        self.flops += int(flops.sum())

    def _logit_rows(self, s: Any) -> int:
        """Rows of this chunk that go through the LM head (as ModelRunner.prepare picks them)."""
        if self.embed:
            return 0
        if s.num_spec:
            rows = s.num_spec + 1
        else:
            rows = 1 + len(s.forks) if s.completes else 0
        seq = s.seq
        req = seq.request
        if (seq.index == 0 and req.prompt_logprobs is not None and len(req.prompt_logprobs) < seq.num_prompt_tokens
                and s.start < seq.num_prompt_tokens):
            rows += s.num_new_tokens
        return rows

    def report(self, compute: RequestCompute | None) -> dict[str, Any]:
        """A request's `compute` as RequestOutput and the HTTP usage carry it."""
        c = compute or RequestCompute()
        return {"device_seconds": c.device_seconds, "flops": c.flops, "energy_joules": c.energy_joules,
                "cost_usd": self.prices.cost(c.device_seconds, c.energy_joules), "energy_source": self.source}

    def idle_joules(self) -> float:
        return self.meter.idle_joules()

    def totals(self) -> dict[str, Any]:
        """The engine's totals: energy measured over its steps and what was attributed, the meter's
        energy outside every step (idle, shared by the engines on the meter)."""
        return {"energy_source": self.source, "steps": self.num_steps, "step_joules": self.step_joules,
                "attributed_joules": self.attributed_joules, "step_seconds": self.step_seconds,
                "attributed_seconds": self.attributed_seconds, "flops": self.flops,
                "idle_joules": self.idle_joules(),
                "cost_usd": self.prices.cost(self.attributed_seconds, self.attributed_joules)}


COMPUTE_KEYS = ("device_seconds", "flops", "energy_joules", "cost_usd")


def sum_compute(parts: Iterable[dict[str, Any] | None]) -> dict[str, Any] | None:
    """The compute of a response made of several requests (prompts, n > 1 launches, a cascade's two
    models): numbers summed, the energy sources joined ("model", or "nvml+rapl" when they differ).
    None when no part has one."""
    parts = [p for p in parts if p]
    if not parts:
        return None
    out: dict[str, Any] = {k: sum(p.get(k, 0) for p in parts) for k in COMPUTE_KEYS}
    out["energy_source"] = "+".join(sorted({p.get("energy_source") or "unknown" for p in parts}))
    return out


def check_config(source: str, idle_watts: float | None, busy_watts: float | None, price_per_device_hour: float,
                 price_per_kwh: float, pue: float) -> None:
    """ValueError naming the setting that is wrong (EngineConfig.validate)."""
    if source not in ENERGY_SOURCES:
        raise ValueError(f"energy_source: one of {', '.join(ENERGY_SOURCES)}, got {source!r}")
    for name, v in (("power_idle_watts", idle_watts), ("power_watts", busy_watts),
                    ("price_per_device_hour", price_per_device_hour), ("price_per_kwh", price_per_kwh)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                              or v < 0):
            raise ValueError(f"{name}: must be a number >= 0, got {v!r}")
    if isinstance(pue, bool) or not isinstance(pue, (int, float)) or not math.isfinite(pue) or pue < 1:
        raise ValueError(f"pue: power usage effectiveness is >= 1 (facility energy over device energy), got {pue!r}")
