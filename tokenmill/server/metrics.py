"""Prometheus metrics with vLLM's names under a `tokenmill:` prefix, plus the per-request log line.

Gauges are read from the engine thread's latest stats snapshot at scrape time. Counters and
histograms are fed by `observe`, which sees every engine output on the event loop, including
outputs of requests whose client has gone. The request-level series carry a `tenant` label (the
tenant's name, "default" without --tenants); tenants' refusals and requests in flight have their own.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from tokenmill.outputs import RequestOutput
from tokenmill.server.async_engine import EngineStats
from tokenmill.server.pool import STATES

logger = logging.getLogger("tokenmill.server")
disable_created_metrics()  # the *_created series only add noise to every scrape

# vLLM's buckets, so dashboards built for it read ours the same way.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)
SWAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DEFAULT_TENANT = "default"  # the tenant label of requests on a server without --tenants
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class _Tracked:
    escalated: bool = False  # a cascade stopped it to ask its strong model (finished_reason "escalated")
    prompt_counted: bool = False
    tokens: int = 0
    compute: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0)  # energy, device seconds, FLOPs, cost counted so far


class ServerMetrics:
    """One registry for every model of the server, each series labelled by model_name (as vLLM's)."""

    def __init__(self, models: Callable[[], list[tuple[str, EngineStats, str]]], names: str = "tokenmill") -> None:
        """names: "tokenmill", or "vllm": /metrics shows the series under vLLM's own names (`vllm:`)."""
        if names not in ("tokenmill", "vllm"):
            raise ValueError(f"metric names: tokenmill or vllm, got {names!r}")
        self.names = names
        self.registry = CollectorRegistry()
        self._models = models  # (name, the engine's latest stats, pool state) of every model
        labels = ["model_name", "tenant"]  # the request-level series
        r = self.registry
        self.prompt_tokens = Counter("tokenmill:prompt_tokens", "Prefill tokens processed.", labels, registry=r)
        self.generation_tokens = Counter("tokenmill:generation_tokens", "Tokens generated.", labels, registry=r)
        self.request_success = Counter("tokenmill:request_success", "Finished requests by finish reason.",
                                       labels + ["finished_reason"], registry=r)
        self.ttft = Histogram("tokenmill:time_to_first_token_seconds", "Time from arrival to the first token.",
                              labels, buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("tokenmill:time_per_output_token_seconds",
                              "Mean time per output token after the first, per request.", labels,
                              buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("tokenmill:e2e_request_latency_seconds", "Time from arrival to the last token.",
                             labels, buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("tokenmill:request_queue_time_seconds",
                                    "Time from arrival until first scheduled.", labels, buckets=LATENCY_BUCKETS,
                                    registry=r)
        self.swaps = Counter("tokenmill:model_swaps", "Times a model was brought back to the device (from parked "
                             "or from disk) after the server started.", ["model_name", "from_state"], registry=r)
        self.swap_seconds = Histogram("tokenmill:model_swap_seconds", "Time to bring a model back to the device.",
                                      ["model_name", "from_state"], buckets=SWAP_BUCKETS, registry=r)
        self.tenant_rejected = Counter("tokenmill:tenant_rejected_requests", "Requests a tenant's limit refused "
                                       "(requests_per_minute, tokens_per_minute, concurrent_requests).",
                                       ["tenant", "limit"], registry=r)
        self._tenants: Any = None  # ops.tenants.Tenants (watch_tenants)
        # What was attributed to requests (tokenmill/ops/energy.py), per model and tenant.
        compute_labels = ["model_name", "tenant"]
        self.compute_counters = [
            Counter("tokenmill:request_energy_joules", "Energy attributed to requests (joules).", compute_labels,
                    registry=r),
            Counter("tokenmill:request_device_seconds", "Device time attributed to requests.", compute_labels,
                    registry=r),
            Counter("tokenmill:request_flops", "FLOPs of requests (from the model's shape).", compute_labels,
                    registry=r),
            Counter("tokenmill:request_cost_usd", "Cost of requests in US dollars (device time and energy at the "
                    "configured prices).", compute_labels, registry=r),
        ]
        r.register(_EngineGauges(self))
        self._tracked: dict[str, _Tracked] = {}
        slo_labels = ["model_name", "tenant", "slo_class"]
        self.slo_attained = Counter("tokenmill:slo_attained", "Requests with latency targets that met them all.",
                                    slo_labels, registry=r)
        self.slo_missed = Counter("tokenmill:slo_missed", "Requests with latency targets that missed one, by the "
                                  "first missed (ttft, tpot), or were refused (rejected), demoted to best effort at "
                                  "admission (demoted) or failed (error).", slo_labels + ["reason"], registry=r)
        self.goodput = Goodput()
        r.register(self.goodput)

    def observe_slo_rejected(self, name: str, tenant: str | None, slo_class: str) -> None:
        self.slo_missed.labels(name, tenant or DEFAULT_TENANT, slo_class, "rejected").inc()

    def _observe_slo(self, out: RequestOutput, name: str, reason: str) -> None:
        """Whether a finished request with targets met them (a client's abort counts neither way)."""
        slo = out.slo
        if slo is None or reason in ("abort", "escalated"):  # (an escalation's outcome is the strong model's)
            return
        m = out.metrics
        missed = None
        if out.slo_demoted:
            missed = "demoted"
        elif reason == "error":
            missed = "error"
        elif slo.ttft_s is not None and out.pooled is not None:
            # An embedding has no first token: its vector, the whole answer, comes at the end, so the
            # TTFT target is held against its end-to-end latency (not counted a miss for want of a TTFT).
            if m.e2e_latency is None or m.e2e_latency > slo.ttft_s:
                missed = "ttft"
        elif slo.ttft_s is not None and (m.ttft is None or m.ttft > slo.ttft_s):
            missed = "ttft"
        elif slo.tpot_s is not None and m.mean_tpot is not None and m.mean_tpot > slo.tpot_s:
            missed = "tpot"
        tenant = out.tenant or DEFAULT_TENANT
        if missed is None:
            self.slo_attained.labels(name, tenant, slo.slo_class).inc()
            self.goodput.add(name, slo.slo_class)
        else:
            self.slo_missed.labels(name, tenant, slo.slo_class, missed).inc()

    def watch_tenants(self, tenants: Any) -> None:
        """Exports the tenants' requests in flight, and a zero for each tenant and limit from the start."""
        from tokenmill.ops.tenants import LIMIT_NAMES

        self._tenants = tenants
        for t in tenants:
            for limit in LIMIT_NAMES:
                self.tenant_rejected.labels(t.name, limit)

    def observe_rejected(self, tenant: str, limit: str) -> None:
        self.tenant_rejected.labels(tenant, limit).inc()

    def observe_swap(self, name: str, seconds: float, from_state: str) -> None:
        self.swaps.labels(name, from_state).inc()
        self.swap_seconds.labels(name, from_state).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry if self.names == "tokenmill" else _VLLMNames(self.registry))

    def observe(self, out: RequestOutput, name: str) -> None:
        t = self._tracked.setdefault(out.request_id, _Tracked())
        m = out.metrics
        tenant = out.tenant or DEFAULT_TENANT
        # A prompt counts once prefilled: at the first token, or for an embedding (which makes no
        # token) when its vector is out.
        if (not t.prompt_counted and not out.uncounted
                and (m.first_token_time is not None or (out.finished and out.pooled is not None))):
            t.prompt_counted = True  # (an uncounted part's prompt is its request's: observe_request)
            self.prompt_tokens.labels(name, tenant).inc(len(out.prompt_token_ids))
        tokens = _output_tokens(out)
        if tokens > t.tokens:
            self.generation_tokens.labels(name, tenant).inc(tokens - t.tokens)
            t.tokens = tokens
        if out.compute is not None:  # counted as it grows, so the counters are live
            c = out.compute
            now = (c["energy_joules"], c["device_seconds"], c["flops"], c["cost_usd"])
            tenant = out.tenant or "default"
            for counter, new, old in zip(self.compute_counters, now, t.compute):
                if new > old:
                    counter.labels(name, tenant).inc(new - old)
            t.compute = now
        if not out.finished:
            return
        del self._tracked[out.request_id]
        if not out.uncounted:  # (else its caller counts the request: observe_request)
            self._finished(out, name, "escalated" if t.escalated else _request_finish_reason(out))

    def escalated(self, request_id: str) -> None:
        """A cascade stops this request to ask its strong model: it ends as "escalated", not "abort"."""
        t = self._tracked.get(request_id)
        if t is not None:
            t.escalated = True

    def observe_request(self, out: RequestOutput, name: str, reason: str, prompt_tokens: int) -> None:
        """A request made of engine requests its caller ran uncounted (test-time compute's launches,
        whose tokens were counted as they came): the request and its prompt, once, at its end."""
        if prompt_tokens:
            self.prompt_tokens.labels(name, out.tenant or DEFAULT_TENANT).inc(prompt_tokens)
        self._finished(out, name, reason)

    def _finished(self, out: RequestOutput, name: str, reason: str) -> None:
        m = out.metrics
        tenant = out.tenant or DEFAULT_TENANT
        tokens = _output_tokens(out)
        self.request_success.labels(name, tenant, reason).inc()
        self._observe_slo(out, name, reason)
        if m.ttft is not None:
            self.ttft.labels(name, tenant).observe(m.ttft)
        if m.mean_tpot is not None:
            self.tpot.labels(name, tenant).observe(m.mean_tpot)
        if m.e2e_latency is not None:
            self.e2e.labels(name, tenant).observe(m.e2e_latency)
        if m.time_in_queue is not None:
            self.queue_time.labels(name, tenant).observe(m.time_in_queue)
        # (a RAG retrieval's own embedding and reranking requests, "rag-*": one per chunk of a file, so
        # an upload would flood the log; debug level, errors included, since its file records them)
        level = logging.DEBUG if out.request_id.startswith("rag-") else logging.INFO
        logger.log(
            level, "request %s: tenant=%s prompt_tokens=%d output_tokens=%d ttft=%s e2e=%s finish_reason=%s%s",
            out.request_id, tenant, len(out.prompt_token_ids), tokens, _secs(m.ttft), _secs(m.e2e_latency), reason,
            f" error={out.error!r}" if out.error else "",
        )


class Goodput:
    """tokenmill:goodput: requests per second that met their targets, over the last WINDOW_S."""

    WINDOW_S = 60.0

    def __init__(self) -> None:
        self.started = time.monotonic()
        self._met: dict[tuple[str, str], collections.deque[float]] = {}

    def add(self, name: str, slo_class: str) -> None:
        now = time.monotonic()
        q = self._met.setdefault((name, slo_class), collections.deque())
        q.append(now)
        self._trim(q, now)  # (here too, not only at a scrape: without scrapes it would grow forever)

    def _trim(self, q: collections.deque[float], now: float) -> None:
        while q and q[0] < now - self.WINDOW_S:
            q.popleft()

    def rate(self, name: str, slo_class: str) -> float:
        now = time.monotonic()
        q = self._met.get((name, slo_class))
        if q is None:
            return 0.0
        self._trim(q, now)
        return len(q) / max(1.0, min(self.WINDOW_S, now - self.started))

    def collect(self):
        g = GaugeMetricFamily("tokenmill:goodput", f"Requests per second that met their latency targets, over the "
                              f"last {self.WINDOW_S:.0f} s.", labels=["model_name", "slo_class"])
        for name, cls in list(self._met):
            g.add_metric([name, cls], self.rate(name, cls))
        yield g


def _output_tokens(out: RequestOutput) -> int:
    """The tokens this server generated for it: as usage counts them (none for scoring or embedding),
    less a resumed stream's tokens, which another replica generated (and counted)."""
    if out.prompt_only:
        return 0
    return sum(len(c.token_ids) for c in out.outputs) - out.metrics.num_resumed_tokens


def _request_finish_reason(out: RequestOutput) -> str:
    reasons = [c.finish_reason for c in out.outputs if c.finish_reason]
    for r in ("error", "abort", "length"):
        if r in reasons:
            return r
    return "stop" if reasons else ("error" if out.error else "abort")


def _secs(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}s"


class _EngineGauges:
    """Gauges computed at scrape time from the engine's stats snapshot."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    def collect(self):
        models = self.metrics._models()
        for metric, doc, attr in (
            ("tokenmill:num_requests_running", "Sequences in the running batch.", "num_requests_running"),
            ("tokenmill:num_requests_waiting", "Sequences waiting to be scheduled.", "num_requests_waiting"),
            ("tokenmill:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0 to 1).", "kv_cache_usage_perc"),
            ("tokenmill:kv_cache_cached_blocks",
             "KV cache blocks no sequence references that still hold a reusable prefix (evicted LRU when needed).",
             "kv_cache_cached_blocks"),
            ("tokenmill:kv_holds", "KV held for a transfer (a prefill's for its decode worker, an import's for its "
             "request).", "kv_holds"),
            ("tokenmill:kv_held_blocks", "KV cache blocks the transfer holds pin.", "kv_held_blocks"),
        ):
            g = GaugeMetricFamily(metric, doc, labels=["model_name"])
            for name, s, _state in models:
                g.add_metric([name], getattr(s, attr))
            yield g
        for metric, doc, attr in (
            ("tokenmill:num_preemptions", "Sequences preempted (recomputed later).", "num_preemptions"),
            ("tokenmill:prefix_cache_queries", "Tokens looked up in the prefix cache (at each admission).",
             "prefix_cache_queries"),
            ("tokenmill:prefix_cache_hits", "Tokens found in the prefix cache (their prefill was skipped).",
             "prefix_cache_hits"),
            ("tokenmill:spec_decode_num_drafts", "Speculative decoding: verification steps that carried drafts.",
             "spec_decode_num_drafts"),
            ("tokenmill:spec_decode_num_draft_tokens", "Speculative decoding: draft tokens proposed and verified.",
             "spec_decode_num_draft_tokens"),
            ("tokenmill:spec_decode_num_accepted_tokens", "Speculative decoding: draft tokens accepted.",
             "spec_decode_num_accepted_tokens"),
            ("tokenmill:kv_holds_reclaimed", "KV transfer holds let go early for blocks a request needed.",
             "kv_holds_reclaimed"),
            ("tokenmill:kv_holds_capped", "KV transfer holds let go for newer ones beyond half the KV cache.",
             "kv_holds_capped"),
            ("tokenmill:kv_holds_expired", "KV transfer holds nobody took within --kv-hold-timeout (a prefill "
             "computed for nothing, or an import whose request never came).", "kv_holds_expired"),
        ):
            c = CounterMetricFamily(metric, doc, labels=["model_name"])
            for name, s, _state in models:
                c.add_metric([name], getattr(s, attr))
            yield c
        tenants = self.metrics._tenants
        if tenants is not None:
            g = GaugeMetricFamily("tokenmill:tenant_requests_in_flight", "A tenant's admitted requests whose "
                                  "response has not ended (what max_concurrent_requests limits).", labels=["tenant"])
            for name, n in tenants.in_flight().items():
                g.add_metric([name], n)
            yield g
        c = CounterMetricFamily("tokenmill:engine_energy_joules", "Energy measured over the engine's steps "
                                "(source: rapl, nvml, or model: a power model's estimate).",
                                labels=["model_name", "source"])
        idle = CounterMetricFamily("tokenmill:idle_energy_joules", "Energy measured outside every engine step (idle, "
                                   "host work between steps): attributed to no request. One per meter (device).",
                                   labels=["source"])
        idle_by_source: dict[str, float] = {}
        for name, s, _state in models:
            if s.energy_source:
                c.add_metric([name, s.energy_source], s.energy_joules)
                idle_by_source[s.energy_source] = max(idle_by_source.get(s.energy_source, 0.0), s.idle_energy_joules)
        for source, v in idle_by_source.items():
            idle.add_metric([source], v)
        yield c
        yield idle
        g = GaugeMetricFamily("tokenmill:model_state", "1 for the state each model is in (active: on the device, "
                              "parked: weights in host memory, loading, on_disk).", labels=["model_name", "state"])
        for name, _s, state in models:
            for st in STATES:
                g.add_metric([name, st], 1.0 if st == state else 0.0)
        yield g


# tokenmill's metric names (after the prefix) that vLLM names otherwise: its per-request TPOT histogram.
_VLLM_RENAMES = {"time_per_output_token_seconds": "request_time_per_output_token_seconds"}


class _VLLMNames:
    """A registry's collection under vLLM's names (`--metric-names vllm`): `tokenmill:X` becomes
    `vllm:X` (the series that mean what vLLM's mean keep vLLM's suffix; tokenmill's own, energy or
    SLOs, just change prefix), for what reads vLLM's metrics unchanged: the Kubernetes inference
    gateway's endpoint picker (num_requests_waiting, kv_cache_usage_perc), vLLM's production
    stack, its Grafana dashboards and alerts."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self):
        for family in self.registry.collect():
            old = family.name
            if old.startswith("tokenmill:"):
                base = old.removeprefix("tokenmill:")
                family.name = "vllm:" + _VLLM_RENAMES.get(base, base)
                family.samples = [s._replace(name=family.name + s.name[len(old):]) if s.name.startswith(old) else s
                                  for s in family.samples]
            yield family
