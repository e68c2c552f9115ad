"""The fleet router: one OpenAI-compatible endpoint over many tokenmill replicas.

A request's body is read once; for the generation endpoints the router computes the prompt's
block keys (index.PromptHasher), asks the policy (policy.py) for a replica, and relays the
replica's answer. It talks to replicas only over their public HTTP API and KV event stream, so a
replica is any `tokenmill serve`.

Failover, on by default (`max_retries` other replicas at most):
- before a response has started (connection refused or reset, a 502/503/504, a 429 when another
  replica may have room), the request is sent to another replica, unchanged;
- a stream whose replica dies midway goes on elsewhere: the router asks replicas for the token
  ids of every chunk (`return_token_ids`, stripped again unless the client asked), and sends the
  same request with `resume_token_ids` (what the client already has) to another replica, which
  prefills prompt and tokens and continues (a seeded request's generator skips the draws already
  taken; see LLMEngine._resume). The client sees one stream: the first replica's id, no repeated
  role chunk, and a `failover` object on each chunk after the switch. Greedy and seeded outputs
  equal an undisturbed run. Streams of several choices or prompts cannot resume: they end with an
  error event.

Tenants (`tokenmill router --tenants tenants.yaml`, the replicas' file): the router knows the caller
from its key (401 for a missing or unknown one, at the edge) and
- hashes the tenant's prompts with the salt a replica gives them (ops.tenants.tenant_salt), so
  KV-aware routing finds the tenant's cached blocks (without the file it would look for blocks
  no replica holds, and route tenants' traffic by load alone);
- holds each tenant's max_concurrent_requests and requests_per_minute for the whole fleet (each
  replica holds them too, for what reaches it); a request that no replica admitted (the router's
  own 413 or 503, a replica's 401/403/404/429/5xx) gives its place in the requests window back;
- relays a replica's refusal by the tenant's own limit (429, rate_limit_exceeded) instead of trying
  another replica, whose window the tenant has not used yet: that would multiply its limit.
tokens_per_minute, max_tokens and models stay with the replicas (the router does not count the
tokens of a response): a tenant's tokens_per_minute holds per replica.

The Responses API (/v1/responses) is stateful: a stored response lives on the replica that made
it. The router remembers which one (the id of every response it relayed; a replica asked
otherwise, after a router restart), sends a previous_response_id's continuation and
GET/DELETE /v1/responses/{id} there, and answers 503 while that replica is down. Its streams are
relayed as they come (no mid-stream failover: a continuation cannot move; a lost replica ends one
as the API ends a failed stream). A request that continues nothing is hashed as the chat request
the replica makes of it; Ollama's /api/chat and /api/generate as the OpenAI request they become
(routes/ollama.openai_request). With prefill workers, both are disaggregated as chat and
completions are (router/disagg.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.routing import get_route_path

from tokenmill.ops.tenants import LimitExceeded, Tenants, TenantsConfig, tenant_salt
from tokenmill.router.disagg import DisaggConfig, decide, left_to_compute, prefill_body, prefill_path
from tokenmill.router.index import PromptHasher
from tokenmill.router.policy import Candidate, Chooser, KVAwareWeights
from tokenmill.router.replicas import Replica, merge_models
from tokenmill.server.errors import error_body, error_response, invalid_key_error, limit_error
from tokenmill.server.gateway import KV_RELEASE_HEADER, KV_TRANSFER_HEADER
from tokenmill.server.routes.dashboard import merge_snapshots, register_page
from tokenmill.server.streaming import ReleasingIterator, unless_disconnected

logger = logging.getLogger("tokenmill.router")
disable_created_metrics()  # the *_created series only add noise to every scrape

# Headers a replica gets from the client (the rest are the router's business).
FORWARDED = ("authorization", "content-type", "accept", "openai-organization", "openai-project")
RETRY_STATUS = (500, 502, 503, 504)  # a replica's failure, not the request's: another replica may succeed
# In-stream errors that are the replica's failure, not the request's (server_error: the engine failed
# the request; service_unavailable: a model could not be brought back): the stream moves on.
ENGINE_FAILURE_TYPES = ("server_error", "service_unavailable")
# The replica that answered (the first one, for a stream that moved: see its `failover` object).
REPLICA_HEADER = "X-Tokenmill-Replica"
# Bodies larger than this are tokenized off the event loop.
THREAD_TOKENIZE_BYTES = 8192
# With --tenants, the endpoints a replica opens to tenants' keys (its generation and embedding routes).
TENANT_ENDPOINTS = ("chat", "completions", "embeddings", "responses", "classify", "score", "rerank", "ollama")
# The requests the routing and latency metrics are about (a POST to one of these): not the rest of the
# traffic the catch-all relays (/version, /tokenize, a dashboard's polls) nor stored responses' GETs.
GENERATION_ENDPOINTS = TENANT_ENDPOINTS
# Router limits (ops.tenants.LIMIT_NAMES) whose tenant_rejected_total series start at 0 (the rest
# are the replicas').
ROUTER_LIMITS = ("requests_per_minute", "concurrent_requests")
# Responses whose replica the router remembers (previous_response_id, GET/DELETE /v1/responses/{id}).
MAX_RESPONSE_HOMES = 100_000
_SEQUENCE = re.compile(r'"sequence_number": (\d+)')  # (a Responses stream event's, near its start)
# Answers that mean the request was not admitted (the router's own 413 and 503s, a replica's key,
# permission or model refusal, its 429s: a tenant's limit, a full queue, an SLO it cannot meet; and
# 5xx): they do not count against requests_per_minute.
NOT_ADMITTED = (401, 403, 404, 413, 429)
# requests_total's outcome for a request whose client left before its answer ended (no e2e latency is
# observed for it: it measures the client's patience, not the fleet).
CLIENT_CLOSED = "client_closed"
# How long the dashboard shows a replica that is up but did not answer its last poll at its last snapshot.
DASHBOARD_STALE_S = 30.0


@dataclass
class RouterConfig:
    policy: str = "kv_aware"
    weights: KVAwareWeights = field(default_factory=KVAwareWeights)
    max_retries: int = 2  # other replicas a failed request is tried on
    health_interval_s: float = 1.0
    health_timeout_s: float = 2.0
    backoff_max_s: float = 10.0
    connect_timeout_s: float = 2.0
    tokenizer: str | None = None  # the folder whose tokenizer hashes prompts (default: each model's own, if local)
    replica_api_key: str | None = None  # for the router's own calls (KV events)
    max_body_bytes: int = 8 * 2**20
    tenants: TenantsConfig | None = None  # keys, and fleet-wide concurrency and requests/min (module docstring)
    disagg: DisaggConfig = field(default_factory=DisaggConfig)  # with prefill workers: when they prefill
    kv_transfer_key: str | None = None  # the servers' --kv-transfer-key (prefills and transfers carry it)


class NoReplica(Exception):
    pass


class _Metrics:
    def __init__(self, router: Router) -> None:
        r = self.registry = CollectorRegistry()
        p = "tokenmill_router:"
        self.requests = Counter(p + "requests", "Requests relayed, by replica, endpoint and outcome",
                                ["replica", "endpoint", "outcome"], registry=r)
        self.decisions = Counter(p + "routing_decisions", "Routing decisions by policy and reason",
                                 ["policy", "reason"], registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens of routed requests (hashed)", registry=r)
        self.cached_tokens = Counter(p + "predicted_cached_tokens",
                                     "Prompt tokens the chosen replica's cache held (from its KV events)", registry=r)
        self.failovers = Counter(p + "failovers", "Requests moved to another replica, by phase and outcome",
                                 ["phase", "outcome"], registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Time to first token seen by the router",
                              buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60), registry=r)
        self.e2e = Histogram(p + "e2e_request_latency_seconds", "Request latency seen by the router",
                             buckets=(.05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300), registry=r)
        up = Gauge(p + "replica_up", "1 while the replica passes its health checks", ["replica"], registry=r)
        synced = Gauge(p + "replica_kv_events_synced", "1 while the replica's KV event stream is connected",
                       ["replica"], registry=r)
        inflight = Gauge(p + "replica_requests_in_flight", "Requests the router has in flight there",
                         ["replica"], registry=r)
        blocks = Gauge(p + "replica_cached_blocks", "Cached prefix blocks the replica reports", ["replica"],
                       registry=r)
        self.prefills = Counter(p + "prefill_decisions", "Where prompts were prefilled (remote: on a prefill "
                                "worker, its KV moved to the decode replica), and why", ["where", "reason"],
                                registry=r)
        self.kv_transfer_bytes = Counter(p + "kv_transfer_bytes", "KV moved from prefill workers to replicas",
                                         registry=r)
        self.kv_transfer_blocks = Counter(p + "kv_transfer_blocks", "KV blocks a replica took from a prefill "
                                          "worker", registry=r)
        self.kv_transfer_failures = Counter(p + "kv_transfer_failures", "Remote prefills that fell back to a "
                                            "local prefill, by stage", ["stage"], registry=r)
        self.remote_prefill = Histogram(p + "remote_prefill_seconds", "A remote prefill and its KV transfer",
                                        buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60), registry=r)
        self.kv_transfer_seconds = Histogram(p + "kv_transfer_seconds", "A KV transfer alone: the export "
                                             "streamed into the import", registry=r,
                                             buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 10))
        self.rejected = Counter(p + "tenant_rejected", "Requests the router refused by a tenant's limit",
                                ["tenant", "limit"], registry=r)
        tenant_inflight = Gauge(p + "tenant_requests_in_flight", "A tenant's requests in flight in the fleet",
                                ["tenant"], registry=r)
        self._gauges = (up, synced, inflight, blocks, tenant_inflight)
        self.router = router

    def render(self) -> bytes:
        up, synced, inflight, blocks, tenant_inflight = self._gauges
        for g in self._gauges:
            g.clear()
        for rep in self.router.replicas.values():
            up.labels(rep.url).set(1 if rep.up else 0)
            synced.labels(rep.url).set(1 if rep.stream_connected else 0)
            inflight.labels(rep.url).set(rep.inflight)
            blocks.labels(rep.url).set(sum(len(m.keys) for m in rep.index.models.values()))
        if self.router.tenants is not None:
            for name, n in self.router.tenants.in_flight().items():
                tenant_inflight.labels(name).set(n)
        return generate_latest(self.registry)


class _Ticket:
    """One attempt of a request on a replica: the router's ledger of it (load, pending prefix)."""

    _ids = itertools.count()

    def __init__(self, replica: Replica, model: str, keys: list[bytes], uncached: int) -> None:
        self.id = next(self._ids)
        self.replica, self.model, self.keys = replica, model, keys
        self.candidate: Candidate | None = None  # the replica as routing saw it (before this request)
        replica.inflight += 1
        replica.prefilling[self.id] = uncached
        replica.index.add_pending(model, keys)
        self.open = True

    def first_token(self) -> None:
        if self.open and self.replica.prefilling.pop(self.id, None) is not None:
            self.replica.decoding += 1

    def end(self) -> None:
        if not self.open:
            return
        self.open = False
        r = self.replica
        r.inflight -= 1
        if r.prefilling.pop(self.id, None) is None:
            r.decoding -= 1
        r.index.remove_pending(self.model, self.keys)


@dataclass
class _Plan:
    """What routing knows of a request: its model, prompt token ids and salt."""

    model: str | None
    ids: list[int] | None
    salt: Any
    keys_by_bs: dict[int, list[bytes]] = field(default_factory=dict)
    home: str | None = None  # the one replica that can answer (it holds a stored response)
    # A generation request (GENERATION_ENDPOINTS): routing decisions, prompt tokens and latencies
    # count it; `counted`: its prompt and predicted cached tokens were, once (not per attempt).
    generation: bool = False
    counted: bool = False
    prefill: dict[str, Any] | None = None  # the body a prefill worker would get (disagg.prefill_body)
    prefill_path: str | None = None  # where it goes there (None: the request's own path)

    def keys(self, block_size: int | None) -> list[bytes]:
        if self.ids is None or block_size is None:
            return []
        if block_size not in self.keys_by_bs:
            self.keys_by_bs[block_size] = PromptHasher.keys(self.ids, block_size, self.salt)
        return self.keys_by_bs[block_size]


class Router:
    def __init__(self, config: RouterConfig | None = None, replicas: list[str] | None = None,
                 prefill: list[str] | None = None) -> None:
        self.config = config or RouterConfig()
        self.chooser = Chooser(self.config.policy, self.config.weights)
        self.replicas: dict[str, Replica] = {}
        self.hashers: dict[str, PromptHasher] = {}
        self.roots: dict[str, str] = {}  # model -> its folder, as replicas report it
        self.response_homes: OrderedDict[str, str] = OrderedDict()  # response id -> its replica's url
        # replica url -> (when, its last /dashboard/data): _dashboard_data
        self.dashboard_snaps: dict[str, tuple[float, dict[str, Any]]] = {}
        self.client: httpx.AsyncClient | None = None
        self.metrics = _Metrics(self)
        self.tenants = None if self.config.tenants is None else Tenants(
            self.config.tenants, on_reject=lambda tenant, limit: self.metrics.rejected.labels(tenant, limit).inc())
        for t in self.tenants or ():  # every tenant's series from the start, at 0 (as a replica's)
            for limit in ROUTER_LIMITS:
                self.metrics.rejected.labels(t.name, limit)
        self.draining = False
        self._tasks: set[asyncio.Future] = set()
        for url in replicas or []:
            self._add(url)
        for url in prefill or []:
            self._add(url, role="prefill")
        self.app = self._build_app()

    # -- replicas -------------------------------------------------------------------------------
    def _add(self, url: str, role: str = "decode") -> Replica:
        headers = {"authorization": f"Bearer {self.config.replica_api_key}"} if self.config.replica_api_key else {}
        rep = Replica(url, headers)
        rep.role = role
        rep.on_change = self._replica_changed
        self.replicas[rep.url] = rep
        if self.client is not None:
            self._start(rep)
        return rep

    def _start(self, rep: Replica) -> None:
        c = self.config
        assert self.client is not None
        rep.start(self.client, c.health_interval_s, c.health_timeout_s, c.backoff_max_s)

    def set_replicas(self, urls: list[str]) -> None:
        """Adds and removes replicas at run time (on the router's event loop)."""
        want = {u.rstrip("/") for u in urls}
        for url in list(self.replicas):
            if url not in want and self.replicas[url].role == "decode":
                rep = self.replicas.pop(url)
                asyncio.ensure_future(rep.stop())
        for url in want - set(self.replicas):
            self._add(url)

    def fleet_load(self) -> dict[str, dict[str, Any]]:
        """Each replica's load as reported on its event stream, with the router's own count."""
        out = {}
        for rep in self.replicas.values():
            loads = list(rep.load.values())
            out[rep.url] = {"healthy": rep.up, "inflight": rep.inflight,
                            "running": sum(x[0] for x in loads), "waiting": sum(x[1] for x in loads),
                            "kv_usage": max((x[2] for x in loads), default=0.0)}
        return out

    def _replica_changed(self, rep: Replica) -> None:
        if rep.up and self.client is not None:  # (re)joined: learn where its models' folders are
            self._spawn(self._learn_roots(rep))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Runs coro in the background; stop() waits a moment for what is left."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _learn_roots(self, rep: Replica) -> None:
        """The model folders a replica reports (/v1/models `root`): on this machine, their
        tokenizers hash prompts."""
        try:
            assert self.client is not None
            r = await self.client.get(rep.url + "/v1/models", headers=rep.headers, timeout=5.0)
            for card in r.json().get("data", []):
                root = card.get("root")
                if card.get("id") and root:
                    self.roots.setdefault(card["id"], root)
        except Exception as e:
            logger.debug("router: /v1/models of %s: %s", rep.url, e)

    def _hasher(self, model: str) -> PromptHasher | None:
        if self.config.tokenizer is not None:  # one tokenizer for every model
            return self.hashers.setdefault("", PromptHasher(self.config.tokenizer))
        h = self.hashers.get(model)
        if h is None:
            path = self.roots.get(model)
            if path is None or not os.path.isdir(path):
                return None
            h = self.hashers[model] = PromptHasher(path)
        return h

    # -- routing --------------------------------------------------------------------------------
    def _candidates(self, model: str | None, exclude: set[str], roles: tuple[str, ...] | None = ("decode",)
                    ) -> list[Replica]:
        """Replicas up for model (roles None: prefill workers too)."""
        return [r for r in self.replicas.values()
                if r.up and r.url not in exclude and (roles is None or r.role in roles)
                and (model is None or not r.models or model in r.models)]

    async def _plan(self, endpoint: str, body: dict[str, Any], size: int, tenant: str | None = None,
                    headers: dict[str, str] | None = None, path: str | None = None) -> _Plan:
        prefill = any(r.role == "prefill" for r in self.replicas.values())  # (disaggregation needs the ids too)
        hashed, as_openai = endpoint, body
        if endpoint == "ollama":
            if isinstance(body.get("name"), str) and "model" not in body:  # (older clients' name, as _parse)
                body = {**body, "model": body["name"]}
            if self.config.policy == "kv_aware" or prefill:  # (the OpenAI request a replica runs it as)
                hashed, as_openai = _ollama_as_openai(path or "", body)
        model = body.get("model") if isinstance(body.get("model"), str) else None
        name = model or next((r.models[0] for r in self.replicas.values() if r.models), None)
        ids = None
        if (self.config.policy == "kv_aware" or prefill) and name is not None and hashed in (
                "chat", "completions", "responses"):
            h = self._hasher(name)
            if h is not None:
                if size > THREAD_TOKENIZE_BYTES or not h.loaded:
                    ids = await asyncio.to_thread(h.token_ids, hashed, as_openai)
                else:
                    ids = h.token_ids(hashed, as_openai)
        salt = as_openai.get("cache_salt")  # (an Ollama request's: none, whatever its body holds)
        if tenant is not None:  # as the replica salts it (a salt that is no string: the replica's 400)
            salt = tenant_salt(tenant, salt if isinstance(salt, str) else None)
        home = None
        prev = body.get("previous_response_id") if endpoint in ("responses", "input_tokens") else None
        if isinstance(prev, str):
            found = await self._home(prev, headers or {})
            home = found if isinstance(found, str) else None  # (else a replica answers: 400, 401)
        plan = _Plan(name, ids, salt, home=home, generation=endpoint in GENERATION_ENDPOINTS)
        if prefill and hashed in ("chat", "completions", "responses"):
            if ids is None:  # no tokenizer for the model here, or a continued response: its prompt is unknown
                continued = endpoint == "responses" and isinstance(body.get("previous_response_id"), str)
                self.metrics.prefills.labels("local", "continued" if continued else "no_token_ids").inc()
            else:
                plan.prefill, plan.prefill_path = prefill_body(endpoint, as_openai, ids), prefill_path(endpoint)
        return plan

    def _remember(self, response_id: Any, url: str) -> None:
        if isinstance(response_id, str) and response_id.startswith("resp_"):
            self.response_homes[response_id] = url
            self.response_homes.move_to_end(response_id)
            while len(self.response_homes) > MAX_RESPONSE_HOMES:
                self.response_homes.popitem(last=False)

    async def _home(self, response_id: str, headers: dict[str, str]) -> str | httpx.Response | None:
        """The replica holding a stored response: remembered, or found by asking the replicas that
        are up (the router restarted since). None when none has it (a replica answers the 404); a
        replica's 401 or 403 when none has it for this caller's key, to relay."""
        url = self.response_homes.get(response_id)
        if url is not None:
            self.response_homes.move_to_end(response_id)
            return url
        reps, asks = await self._ask_up(f"/v1/responses/{response_id}", headers, 10.0)
        for r, a in zip(reps, asks):
            if isinstance(a, httpx.Response) and a.status_code == 200:
                self._remember(response_id, r.url)
                return r.url
        return next((a for a in asks if isinstance(a, httpx.Response) and a.status_code in (401, 403)), None)

    def _pick(self, plan: _Plan, exclude: set[str]) -> tuple[Replica, _Ticket]:
        if plan.home is not None:
            reps = [r for r in self._candidates(None, exclude) if r.url == plan.home]
            if not reps:
                raise NoReplica(f"the replica holding this stored response ({plan.home}) is not available")
        else:
            reps = self._candidates(plan.model, exclude)
        if not reps and plan.model is not None and plan.home is None and not any(
                plan.model in r.models for r in self.replicas.values() if r.role == "decode"):
            reps = self._candidates(None, exclude)  # a model no replica serves: one of them answers the 404
        if not reps:
            raise NoReplica("no replica is available" + (" for this model" if plan.model else ""))
        prompt = len(plan.ids) if plan.ids is not None else 0
        cands, keys = [], []
        for r in reps:
            c, k = self._candidate(r, plan)
            cands.append(c)
            keys.append(k)
        i, reason = self.chooser.choose(cands, prompt)
        if plan.generation:  # (every attempt is a decision; a request's prompt counts once)
            self.metrics.decisions.labels(self.config.policy, reason).inc()
            if plan.ids is not None and not plan.counted:
                plan.counted = True
                self.metrics.prompt_tokens.inc(prompt)
                self.metrics.cached_tokens.inc(cands[i].cached_tokens)
        ticket = _Ticket(reps[i], plan.model or "", keys[i], max(0, prompt - cands[i].cached_tokens))
        ticket.candidate = cands[i]
        return reps[i], ticket

    @staticmethod
    def _candidate(r: Replica, plan: _Plan) -> tuple[Candidate, list[bytes]]:
        """What routing knows of replica r for plan's prompt, and the prompt's block keys there."""
        model = plan.model or ""
        bs = r.index.block_size(model)
        k = plan.keys(bs)
        running, waiting, kv = r.reported(model)
        return Candidate(r.url, inflight=r.inflight, queued_prefill=sum(r.prefilling.values()),
                         running=max(running, r.decoding), waiting=waiting, kv_usage=kv,
                         cached_tokens=r.index.match(model, k) * (bs or 0)), k

    async def _remote_prefill(self, plan: _Plan, rep: Replica, ticket: _Ticket, path: str,
                              headers: dict[str, str]) -> dict[str, str]:
        """Has a prefill worker compute plan's prompt and moves its KV into rep's prefix cache, when
        disagg.decide says so (router/disagg.py). Any failure leaves rep to prefill it itself. The
        headers the request then goes to rep with: its import's hold, let go as the request ends."""
        prompt = len(plan.ids) if plan.ids is not None else 0
        dcand = ticket.candidate or self._candidate(rep, plan)[0]
        workers = self._candidates(plan.model, set(), roles=("prefill",))
        pc = [self._candidate(r, plan) for r in workers]
        i, reason = decide(self.config.disagg, prompt, dcand, [c for c, _ in pc])
        self.metrics.prefills.labels("local" if i is None else "remote", reason).inc()
        if i is None:
            return {}
        worker, (pcand, pkeys) = workers[i], pc[i]
        pticket = _Ticket(worker, plan.model or "", pkeys, max(0, prompt - pcand.cached_tokens))
        # The prompt is the worker's work now: on rep's ledger only its last block (a prompt counted
        # on both would make rep look as far behind as the worker, and every prompt would go remote).
        bs = rep.index.block_size(plan.model or "") or 0
        local = rep.prefilling.get(ticket.id)
        if local is not None and bs:
            rep.prefilling[ticket.id] = min(local, left_to_compute(prompt, bs))
        t0 = time.perf_counter()
        stage = ["prefill"]
        try:
            # (a _Call on the worker: given up on at once when its health checks find it hung)
            got, nbytes = await asyncio.wait_for(_Call(worker, self._transfer(
                plan, worker, pticket, rep, dcand, path, headers, stage)).result(), self.config.disagg.timeout_s)
        except Exception as e:  # (a timeout too; not a cancellation: the client left)
            self.metrics.kv_transfer_failures.labels(stage[0]).inc()
            logger.info("router: remote prefill on %s for %s failed at %s (%s); it prefills locally", worker.url,
                        rep.url, stage[0], f"{type(e).__name__}: {e}")
            if local is not None and ticket.id in rep.prefilling:
                rep.prefilling[ticket.id] = local
            return {}
        finally:
            pticket.end()
        self.metrics.remote_prefill.observe(time.perf_counter() - t0)
        self.metrics.kv_transfer_bytes.inc(nbytes)
        self.metrics.kv_transfer_blocks.inc(got.get("imported", 0))
        if ticket.id in rep.prefilling:  # what is left for rep to compute (at least its last token's block)
            rep.prefilling[ticket.id] = left_to_compute(prompt, bs, got.get("reachable_blocks") or 0) if bs else prompt
        hold = got.get("hold_id")
        return {KV_RELEASE_HEADER: hold, KV_TRANSFER_HEADER: self.config.kv_transfer_key or ""} if hold else {}

    async def _transfer(self, plan: _Plan, worker: Replica, pticket: _Ticket, rep: Replica, dcand: Candidate,
                        path: str, headers: dict[str, str], stage: list[str]) -> tuple[dict[str, Any], int]:
        """The prefill on worker, then its KV moved from worker into rep (what rep took, and bytes):
        rep pulls it (DisaggConfig.transfer "pull"), or the router relays it ("relay")."""
        assert self.client is not None
        key = self.config.kv_transfer_key or ""
        r = await self.client.post(worker.url + (plan.prefill_path or path), json=plan.prefill,
                                   headers={**headers, KV_TRANSFER_HEADER: key})
        if r.status_code != 200:
            raise RuntimeError(f"the prefill got {r.status_code}: {r.text[:200]}")
        answer = r.json()
        tid = answer["kv_transfer_params"]["transfer_id"]
        model = plan.model or answer.get("model")
        pticket.end()
        stage[0] = "transfer"
        bs = rep.index.block_size(plan.model or "")
        # What the replica holds (not what requests in flight there will compute: their blocks may
        # land after this one's KV, which would then be sent without the prefix it continues).
        skip = (rep.index.match(plan.model or "", plan.keys(bs), pending_too=False)
                if bs and worker.index.block_size(plan.model or "") == bs else 0)
        sent = [0]

        async def chunks(source: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
            async for c in source:
                sent[0] += len(c)
                yield c

        t0 = time.perf_counter()
        auth = {"authorization": f"Bearer {key}"}
        if self.config.disagg.transfer == "pull":  # (rep GETs it from the worker itself: one hop, not two)
            stage[0] = "pull"
            try:
                imp = await self.client.post(rep.url + "/v1/kv_transfer", params={"model": model}, headers=auth,
                                             json={"source": worker.url, "transfer_id": tid, "skip_blocks": skip,
                                                   "source_model": model})
                if imp.status_code != 200:
                    raise RuntimeError(f"the pull got {imp.status_code}: {imp.text[:200]}")
            except BaseException:
                # (given up on in any way, a timeout or the client leaving too: the replica may not have
                # asked, and the worker's hold would stay until it expired; in its own task, which a
                # cancellation here does not stop)
                self._release_hold(worker, tid, model, auth)
                raise
            self.metrics.kv_transfer_seconds.observe(time.perf_counter() - t0)
            got = imp.json()
            return got, int(got.get("bytes") or 0)
        async with self.client.stream("GET", f"{worker.url}/v1/kv_transfer/{tid}", headers=auth,
                                      params={"model": model, "skip_blocks": skip}) as ex:
            if ex.status_code != 200:
                await ex.aread()
                raise RuntimeError(f"the export got {ex.status_code}: {ex.text[:200]}")
            stage[0] = "import"
            imp = await self.client.post(rep.url + "/v1/kv_transfer", params={"model": model},
                                         content=chunks(ex.aiter_bytes()), headers=auth)
        if imp.status_code != 200:
            raise RuntimeError(f"the import got {imp.status_code}: {imp.text[:200]}")
        self.metrics.kv_transfer_seconds.observe(time.perf_counter() - t0)
        return imp.json(), sent[0]

    def _release_hold(self, worker: Replica, tid: str, model: str | None, auth: dict[str, str]) -> None:
        async def release() -> None:
            assert self.client is not None
            with contextlib.suppress(httpx.HTTPError, RuntimeError):  # (RuntimeError: the client closed)
                await self.client.delete(f"{worker.url}/v1/kv_transfer/{tid}", params={"model": model}, headers=auth,
                                         timeout=5.0)

        self._spawn(release())

    def _retryable(self, resp: httpx.Response) -> bool:
        """A replica's answer that another replica may do better with: a failure, or a 429 other than
        the tenant's own limit (a full queue, an SLO it cannot meet) while there is another replica."""
        return resp.status_code in RETRY_STATUS or (resp.status_code == 429 and len(self.replicas) > 1
                                                    and not _tenant_limit(resp))

    # -- the app --------------------------------------------------------------------------------
    def _build_app(self) -> FastAPI:
        @contextlib.asynccontextmanager
        async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
            await self.start()
            yield
            self.draining = True
            await self.stop()

        app = FastAPI(title="tokenmill router", lifespan=lifespan)

        @app.get("/health")
        async def health() -> Response:
            if self.draining:
                return JSONResponse(error_body(503, "the router is shutting down"), status_code=503)
            up = sum(r.up for r in self.replicas.values())
            if up == 0:
                return JSONResponse(error_body(503, "no replica is up"), status_code=503)
            return JSONResponse({"replicas_up": up, "replicas": len(self.replicas)})

        @app.get("/metrics")
        async def metrics() -> Response:
            return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

        @app.get("/v1/models")
        async def models(request: Request) -> Response:
            return await self._models(request)

        @app.get("/dashboard/data")
        async def dashboard_data(request: Request) -> Response:
            return await self._dashboard_data(request)

        register_page(app)  # GET /dashboard and its assets, as a server serves them

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            return await self._generate(request, "chat")

        @app.post("/v1/completions")
        async def completions(request: Request) -> Response:
            return await self._generate(request, "completions")

        @app.post("/v1/embeddings")
        async def embeddings(request: Request) -> Response:
            return await self._generate(request, "embeddings")

        @app.post("/v1/responses")
        async def responses(request: Request) -> Response:
            return await self._generate(request, "responses")

        def pooling(endpoint: str) -> Callable[[Request], Awaitable[Response]]:
            async def handler(request: Request) -> Response:
                return await self._generate(request, endpoint)
            return handler

        for name in ("classify", "score", "rerank"):  # vLLM's pooling endpoints, at every path a replica has
            for prefix in ("", "/v1") + (("/v2",) if name == "rerank" else ()):
                app.add_api_route(f"{prefix}/{name}", pooling(name), methods=["POST"])
        for path in ("/api/chat", "/api/generate"):  # Ollama's generation routes: their streams relayed as they come
            app.add_api_route(path, pooling("ollama"), methods=["POST"])

        @app.post("/v1/responses/input_tokens")
        async def input_tokens(request: Request) -> Response:  # (at the replica holding what it continues)
            return await self._generate(request, "input_tokens")

        @app.api_route("/v1/responses/{response_id}", methods=["GET", "DELETE"])
        async def stored_response(request: Request, response_id: str) -> Response:
            return await self._stored_response(request, response_id)

        @app.get("/v1/responses/{response_id}/input_items")
        async def stored_input_items(request: Request, response_id: str) -> Response:
            return await self._stored_response(request, response_id)

        @app.get("/v1/kv_events")
        async def kv_events() -> Response:  # each replica has its own; the router has none
            return JSONResponse(error_body(404, "the router publishes no KV events; subscribe to a replica"),
                                status_code=404)

        @app.api_route("/v1/kv_transfer", methods=["GET", "POST", "DELETE"])
        @app.api_route("/v1/kv_transfer/{transfer_id}", methods=["GET", "POST", "DELETE"])
        async def kv_transfer(transfer_id: str = "") -> Response:  # the fleet's own traffic, never a client's
            return JSONResponse(error_body(404, "KV transfer is between the router and its servers"),
                                status_code=404)

        # The router's own paths called with another method: a 405 here rather than a hop to a replica
        # that answers the same (the catch-all below would otherwise take them).
        own: dict[str, set[str]] = {}
        for r in app.routes:
            if isinstance(r, APIRoute):
                own.setdefault(r.path, set()).update(r.methods)

        @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
        async def other(request: Request, path: str) -> Response:
            if path.endswith("/") and ("/" + path).rstrip("/") in own:  # as Starlette redirects a trailing
                # slash (a replica's own redirect would name the replica)
                return RedirectResponse(request.url.replace(path=request.url.path.rstrip("/")), status_code=307)
            allowed = own.get("/" + path)
            if allowed is not None:
                return JSONResponse(error_body(405, "Method Not Allowed"), status_code=405,
                                    headers={"Allow": ", ".join(sorted(allowed))})
            return await self._generate(request, "other")

        return app

    async def start(self) -> None:
        c = self.config
        if c.tokenizer is not None:  # loaded now rather than by the first requests
            h = self.hashers.setdefault("", PromptHasher(c.tokenizer))
            await asyncio.to_thread(lambda: h.tokenizer)
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=c.connect_timeout_s),
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=256))
        for rep in self.replicas.values():
            self._start(rep)

    async def stop(self) -> None:
        for rep in self.replicas.values():
            await rep.stop()
        if self._tasks:  # (holds being released, roots being learned: briefly, before the client closes)
            await asyncio.wait(self._tasks, timeout=5.0)
        if self.client is not None:
            await self.client.aclose()

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Until every replica is up with its KV events in sync (tests, benchmarks)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(r.up and r.stream_connected and all(m.synced for m in r.index.models.values())
                   for r in self.replicas.values()):
                return
            await asyncio.sleep(0.05)
        raise TimeoutError("replicas not ready")

    # -- relaying -------------------------------------------------------------------------------
    @staticmethod
    def _headers(request: Request) -> dict[str, str]:
        return {k: v for k, v in request.headers.items() if k.lower() in FORWARDED}

    async def _body(self, request: Request) -> bytes:
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _TooLarge(limit)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _TooLarge(limit)
            chunks.append(chunk)
        return b"".join(chunks)

    async def _ask_up(self, path: str, headers: dict[str, str],
                      timeout: float) -> tuple[list[Replica], list[httpx.Response | BaseException]]:
        """GET path on every replica that is up, at once: the replicas and each one's answer (or error)."""
        reps = self._candidates(None, set(), roles=None)
        assert self.client is not None
        results = await asyncio.gather(*(self.client.get(r.url + path, headers=headers, timeout=timeout)
                                         for r in reps), return_exceptions=True)
        return reps, results

    @staticmethod
    def _none_up() -> Response:
        return JSONResponse(error_body(503, "no replica is up"), status_code=503, headers={"Retry-After": "1"})

    async def _models(self, request: Request) -> Response:
        reps, results = await self._ask_up("/v1/models", self._headers(request), 10.0)
        if not reps:
            return self._none_up()
        ok = [x for x in results if isinstance(x, httpx.Response) and x.status_code == 200]
        if not ok:
            first = next((x for x in results if isinstance(x, httpx.Response)), None)
            if first is not None:
                return Response(first.content, first.status_code, media_type="application/json")
            return JSONResponse(error_body(503, "no replica answered"), status_code=503)
        return JSONResponse({"object": "list", "data": merge_models([x.json().get("data", []) for x in ok])})

    async def _dashboard_data(self, request: Request) -> Response:
        """Every up replica's /dashboard/data (asked with the caller's key: each replica checks its
        admin key), merged with a `replica` label (merge_snapshots). A replica that is up but did not
        answer this time is shown with its last snapshot (of the last DASHBOARD_STALE_S, and only
        beside a fresh one, which vouches for the key): leaving it out would make its counters start
        again from 0 on the page at its next answer (a rate spike)."""
        reps, results = await self._ask_up("/dashboard/data", self._headers(request), 5.0)
        if not reps:
            return self._none_up()
        refusal = next((x for x in results if isinstance(x, httpx.Response) and x.status_code in (401, 403)), None)
        if refusal is not None:  # the key is the replicas' to judge: their answer, not a partial view
            return Response(refusal.content, refusal.status_code, media_type="application/json")
        now = time.monotonic()
        for url in list(self.dashboard_snaps):
            if url not in self.replicas or self.dashboard_snaps[url][0] < now - DASHBOARD_STALE_S:
                del self.dashboard_snaps[url]
        fresh = {}
        for r, x in zip(reps, results):
            if isinstance(x, httpx.Response) and x.status_code == 200:
                with contextlib.suppress(ValueError):
                    snap = x.json()
                    if isinstance(snap, dict):
                        fresh[r.url] = snap
                        self.dashboard_snaps[r.url] = (now, snap)
        snaps = {r.url: fresh[r.url] if r.url in fresh else self.dashboard_snaps[r.url][1] for r in reps
                 if fresh and (r.url in fresh or r.url in self.dashboard_snaps)}
        if not snaps:
            first = next((x for x in results if isinstance(x, httpx.Response)), None)
            if first is not None:
                return Response(first.content, first.status_code, media_type="application/json")
            return JSONResponse(error_body(503, "no replica answered"), status_code=503, headers={"Retry-After": "1"})
        return JSONResponse(merge_snapshots(snaps), headers={"Cache-Control": "no-store"})

    async def _generate(self, request: Request, endpoint: str) -> Response:
        if self.tenants is None or endpoint not in TENANT_ENDPOINTS:
            return await self._relay_request(request, endpoint, None)
        tenant = self.tenants.authenticate(request.headers.get("authorization"))
        if tenant is None:
            return error_response(invalid_key_error())
        try:
            adm = self.tenants.admit(tenant)
        except LimitExceeded as e:
            return error_response(limit_error(e))
        resp = None
        try:
            try:
                resp = await self._relay_request(request, endpoint, tenant.name)
            except Exception:
                adm.refund_request()  # (a 500 of the router's own)
                raise
            if resp.status_code in NOT_ADMITTED or resp.status_code >= 500:
                adm.refund_request()
            if isinstance(resp, StreamingResponse):  # its slot is held until the stream has ended, however
                resp.body_iterator = ReleasingIterator(resp.body_iterator, adm.release)
            return resp
        finally:
            if not isinstance(resp, StreamingResponse):
                adm.release()  # an error, a whole answer, or cancelled: the request has ended

    async def _relay_request(self, request: Request, endpoint: str, tenant: str | None) -> Response:
        t0 = time.perf_counter()
        try:
            raw = await self._body(request)
        except _TooLarge as e:
            return JSONResponse(error_body(413, f"request body exceeds {e.limit} bytes", code="request_too_large"),
                                status_code=413)
        body: Any = None
        if endpoint != "other":
            with contextlib.suppress(ValueError, UnicodeDecodeError, RecursionError):
                body = json.loads(raw)
        if not isinstance(body, dict):  # not ours to judge: a replica answers it (with its own error)
            body, endpoint = {}, endpoint if endpoint == "other" else "invalid"
        headers = self._headers(request)
        # The path within the app: behind a proxy's prefix (--root-path) request.url has the prefix,
        # which replicas do not serve.
        route = get_route_path(request.scope)
        path = route + (f"?{request.url.query}" if request.url.query else "")
        plan = await self._plan(endpoint, body, len(raw), tenant, headers, route)
        if body.get("stream") is True and endpoint in ("chat", "completions"):
            return await self._stream(request, endpoint, path, body, plan, headers, t0)
        if body.get("stream") is True and endpoint == "responses":
            return await self._stream_through(endpoint, path, body, plan, headers, t0)
        if endpoint == "ollama" and body.get("stream", True) is not False:  # (Ollama streams by default)
            return await self._ndjson_through(endpoint, path, body, plan, headers, t0)
        return await unless_disconnected(request, self._unary(request, endpoint, path, raw, plan, headers, t0))

    async def _stored_response(self, request: Request, response_id: str) -> Response:
        """GET/DELETE /v1/responses/{id} (and GET its input_items) on the replica that holds it."""
        if self.tenants is not None and self.tenants.authenticate(request.headers.get("authorization")) is None:
            return error_response(invalid_key_error())  # (at the edge, before any replica is asked)
        headers = self._headers(request)
        home = await self._home(response_id, headers)
        if isinstance(home, httpx.Response):  # the replicas refused the caller's key
            return self._relay(home, None)
        if home is None:
            return JSONResponse(error_body(404, f"No response found with id '{response_id}'.", param="response_id",
                                           code="response_not_found"), status_code=404)
        plan = _Plan(None, None, None, home=home)
        path = get_route_path(request.scope) + (f"?{request.url.query}" if request.url.query else "")
        resp = await self._unary(request, "responses", path, b"", plan, headers,
                                 time.perf_counter())
        if request.method == "DELETE" and resp.status_code == 200:
            self.response_homes.pop(response_id, None)
        return resp

    async def _unary(self, request: Request, endpoint: str, path: str, raw: bytes, plan: _Plan,
                     headers: dict[str, str], t0: float) -> Response:
        assert self.client is not None
        tried: list[str] = []
        last: httpx.Response | None = None
        for _attempt in range(self.config.max_retries + 1):
            try:
                rep, ticket = self._pick(plan, set(tried))
            except NoReplica as e:
                if last is not None:
                    break
                return JSONResponse(error_body(503, str(e), code="no_replica"), status_code=503,
                                    headers={"Retry-After": "1"})
            try:
                extra = await self._remote_prefill(plan, rep, ticket, path, headers) if plan.prefill else {}
            except BaseException:
                ticket.end()
                raise
            call = _Call(rep, self.client.request(request.method, rep.url + path, content=raw,
                                                  headers={**headers, **extra}))
            try:
                resp = await call.result()
            except httpx.TransportError as e:
                rep.mark_down(f"{type(e).__name__}: {e}")
                tried.append(rep.url)
                self.metrics.requests.labels(rep.url, endpoint, "failed").inc()
                continue
            except asyncio.CancelledError:  # the client went away (unless_disconnected) before the answer
                self.metrics.requests.labels(rep.url, endpoint, CLIENT_CLOSED).inc()
                raise
            finally:
                ticket.end()
            if self._retryable(resp):
                tried.append(rep.url)
                last = resp
                self.metrics.requests.labels(rep.url, endpoint, str(resp.status_code)).inc()
                continue
            self.metrics.requests.labels(rep.url, endpoint, "ok" if resp.status_code < 400 else
                                         str(resp.status_code)).inc()
            if tried:
                self.metrics.failovers.labels("before_response", "retried").inc()
            if plan.generation:  # (not a stored response's GET/DELETE, nor other relayed traffic)
                self.metrics.e2e.observe(time.perf_counter() - t0)
            if endpoint == "responses" and resp.status_code == 200 and request.method == "POST":
                with contextlib.suppress(ValueError, AttributeError):
                    stored = resp.json()
                    if stored.get("store"):  # (one not stored has no home to come back to)
                        self._remember(stored.get("id"), rep.url)
            return self._relay(resp, {"retries": len(tried), "replicas": tried + [rep.url]} if tried else None,
                               rep.url, request.scope.get("root_path", ""))
        if tried:
            self.metrics.failovers.labels("before_response", "failed").inc()
        if last is not None:
            return self._relay(last, None)
        return JSONResponse(error_body(503, f"every replica tried failed ({', '.join(tried)})",
                                       code="replica_failed"), status_code=503, headers={"Retry-After": "1"})

    @staticmethod
    def _relay(resp: httpx.Response, failover: dict[str, Any] | None, replica: str | None = None,
               root: str = "") -> Response:
        content = resp.content
        ctype = resp.headers.get("content-type", "application/json")
        if failover is not None and ctype.startswith("application/json"):
            with contextlib.suppress(ValueError):
                obj = json.loads(content)
                if isinstance(obj, dict):
                    obj["failover"] = failover
                    content = json.dumps(obj).encode()
        headers = {k: v for k, v in resp.headers.items() if k.lower() in ("retry-after", "allow")}
        loc = resp.headers.get("location")
        if loc is not None:  # a replica's redirect names the replica: the same path through the router
            u = urlsplit(loc)
            headers["Location"] = (root + u.path + (f"?{u.query}" if u.query else "")
                                   if u.netloc or loc.startswith("/") else loc)
        if replica is not None:
            headers[REPLICA_HEADER] = replica
        return Response(content, resp.status_code, headers=headers, media_type=ctype)

    async def _open(self, path: str, body: dict[str, Any], plan: _Plan, headers: dict[str, str], tried: list[str],
                    endpoint: str) -> tuple[Replica, _Ticket, _Relay] | Response:
        """A replica's stream that answered 200, trying others on failure; else the response to relay."""
        assert self.client is not None
        content = json.dumps(body).encode()
        last: httpx.Response | None = None
        while len(tried) <= self.config.max_retries:
            try:
                rep, ticket = self._pick(plan, set(tried))
            except NoReplica as e:
                if last is not None:
                    return self._relay(last, None)
                return JSONResponse(error_body(503, str(e), code="no_replica"), status_code=503,
                                    headers={"Retry-After": "1"})
            resp: httpx.Response | None = None
            try:
                extra = await self._remote_prefill(plan, rep, ticket, path, headers) if plan.prefill else {}
                # (abortable while it waits for the headers: a replica that hangs now is given up on)
                resp = await _Call(rep, self.client.send(self.client.build_request(
                    "POST", rep.url + path, content=content, headers={**headers, **extra}), stream=True)).result()
                if resp.status_code == 200:
                    return rep, ticket, _Relay(rep, resp)
                await resp.aread()
            except httpx.TransportError as e:
                ticket.end()
                if resp is not None:
                    await resp.aclose()
                rep.mark_down(f"{type(e).__name__}: {e}")
                tried.append(rep.url)
                self.metrics.requests.labels(rep.url, endpoint, "failed").inc()
                continue
            except BaseException as e:  # the client went away (cancelled) or worse: leave the ledger straight
                ticket.end()
                if isinstance(e, asyncio.CancelledError):
                    self.metrics.requests.labels(rep.url, endpoint, CLIENT_CLOSED).inc()
                if resp is not None:
                    await asyncio.shield(resp.aclose())
                raise
            await resp.aclose()
            ticket.end()
            self.metrics.requests.labels(rep.url, endpoint, str(resp.status_code)).inc()
            if self._retryable(resp):
                tried.append(rep.url)
                last = resp
                continue
            return self._relay(resp, None, rep.url)
        if last is not None:
            return self._relay(last, None)
        return JSONResponse(error_body(503, f"every replica tried failed ({', '.join(tried)})", code="replica_failed"),
                            status_code=503, headers={"Retry-After": "1"})

    async def _stream_through(self, endpoint: str, path: str, body: dict[str, Any], plan: _Plan,
                              headers: dict[str, str], t0: float) -> Response:
        """A stream relayed as the replica sends it (the Responses API's): failover only before it
        starts; a replica lost midway ends it with an error event."""
        tried: list[str] = []
        opened = await self._open(path, body, plan, headers, tried, endpoint)
        if isinstance(opened, Response):
            return opened
        rep, ticket, relay = opened
        metrics = self.metrics
        recorded = [False]  # its outcome was counted (else, when it ends: the client left)

        async def events() -> AsyncIterator[str]:
            first = True
            created: dict[str, Any] | None = None  # the response.created event's response
            seq = -1  # the last relayed event's sequence_number
            m = None  # the event being read's
            ended = last = False  # the terminal event was relayed / is the one being read
            lines: list[str] = []  # the event being read: relayed whole, so a cut never splits one
            try:
                async for line in relay.lines():
                    lines.append(line)
                    if line.startswith("data: "):
                        m = _SEQUENCE.search(line, 0, 128)
                        head = line[:80]  # (the event's type comes first: "response.function_call_arguments.delta")
                        if first and '"response.created"' in head:
                            with contextlib.suppress(ValueError, AttributeError, TypeError):
                                created = json.loads(line[6:])["response"]
                                if created.get("store"):
                                    self._remember(created["id"], rep.url)
                        elif first and '.delta"' in head:  # its first token
                            first = False
                            ticket.first_token()
                            metrics.ttft.observe(time.perf_counter() - t0)
                        last = any(f'"response.{k}"' in head for k in ("completed", "incomplete", "failed"))
                    if line == "":
                        yield "\n".join(lines) + "\n"
                        lines = []
                        ended = ended or last
                        if m is not None:  # (numbered once relayed: a cut event's number is not used)
                            seq = int(m.group(1))
                if lines:
                    yield "\n".join(lines) + "\n"
                recorded[0] = True
                metrics.requests.labels(rep.url, endpoint, "ok").inc()
                metrics.e2e.observe(time.perf_counter() - t0)
            except httpx.TransportError as e:
                rep.mark_down(f"{type(e).__name__}: {e}")
                recorded[0] = True
                if ended:  # (lost after its last event: the answer is whole)
                    metrics.requests.labels(rep.url, endpoint, "ok").inc()
                    return
                metrics.requests.labels(rep.url, endpoint, "failed").inc()
                msg = f"replica {rep.url} failed mid-stream ({type(e).__name__}: {e})"
                # The Responses API's ending of a failed stream: an error event, then response.failed.
                events = [("error", {"code": "replica_failed", "message": msg, "param": None})]
                if isinstance(created, dict):
                    events.append(("response.failed", {"response": {
                        **created, "status": "failed", "error": {"code": "server_error", "message": msg}}}))
                out = ""
                for i, (kind, fields) in enumerate(events):
                    data = json.dumps({"type": kind, "sequence_number": seq + 1 + i, **fields})
                    out += f"event: {kind}\ndata: {data}\n\n"
                yield out
            finally:
                ticket.end()
                await relay.close()

        return self._relayed(events(), "text/event-stream", rep, ticket, relay, endpoint, recorded)

    async def _ndjson_through(self, endpoint: str, path: str, body: dict[str, Any], plan: _Plan,
                              headers: dict[str, str], t0: float) -> Response:
        """An Ollama stream (newline-delimited JSON) relayed line by line as the replica sends it:
        failover only before it starts; a replica lost midway ends it with Ollama's error line."""
        tried: list[str] = []
        opened = await self._open(path, body, plan, headers, tried, endpoint)
        if isinstance(opened, Response):
            return opened
        rep, ticket, relay = opened
        metrics = self.metrics
        recorded = [False]

        async def lines() -> AsyncIterator[str]:
            first = True
            try:
                async for line in relay.lines():
                    if first and line:
                        first = False
                        ticket.first_token()
                        metrics.ttft.observe(time.perf_counter() - t0)
                    yield line + "\n"
                recorded[0] = True
                metrics.requests.labels(rep.url, endpoint, "ok").inc()
                metrics.e2e.observe(time.perf_counter() - t0)
            except httpx.TransportError as e:
                rep.mark_down(f"{type(e).__name__}: {e}")
                recorded[0] = True
                metrics.requests.labels(rep.url, endpoint, "failed").inc()
                yield json.dumps({"error": f"replica {rep.url} failed mid-stream ({type(e).__name__}: {e})"}) + "\n"
            finally:
                ticket.end()
                await relay.close()

        return self._relayed(lines(), "application/x-ndjson", rep, ticket, relay, endpoint, recorded)

    def _relayed(self, body: AsyncIterator[str], media_type: str, rep: Replica, ticket: _Ticket, relay: _Relay,
                 endpoint: str, recorded: list[bool]) -> StreamingResponse:
        """A stream relayed through as the replica sends it (_stream_through, _ndjson_through). Its
        cleanup does what the body's finally does, for a body never iterated (the client gone before
        the response started: a generator never started skips its finally)."""
        loop = asyncio.get_running_loop()

        def cleanup() -> None:
            ticket.end()
            if not recorded[0]:
                recorded[0] = True
                self.metrics.requests.labels(rep.url, endpoint, CLIENT_CLOSED).inc()
            relay.close_soon(loop)

        return StreamingResponse(ReleasingIterator(body, cleanup), media_type=media_type,
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                          REPLICA_HEADER: rep.url})

    async def _stream(self, request: Request, endpoint: str, path: str, body: dict[str, Any], plan: _Plan,
                      headers: dict[str, str], t0: float) -> Response:
        want_ids = body.get("return_token_ids") is True
        upstream = {**body, "return_token_ids": True}
        tried: list[str] = []
        opened = await self._open(path, upstream, plan, headers, tried, endpoint)
        if isinstance(opened, Response):
            if tried:
                self.metrics.failovers.labels("before_response", "failed").inc()
            return opened
        state = _StreamState(body, endpoint, want_ids)
        if tried:
            state.failover = {"retries": len(tried), "replicas": tried + [opened[0].url], "resumed_at_token": 0}
            self.metrics.failovers.labels("before_response", "retried").inc()
        metrics = self.metrics

        # The attempt in use (failover replaces it), and whether its outcome was counted (ok, failed):
        # a stream that ends without one lost its client (cleanup).
        current: dict[str, Any] = {"ticket": opened[1], "relay": opened[2], "replica": opened[0].url,
                                   "recorded": False}

        async def events() -> AsyncIterator[str]:
            rep, ticket, relay = opened
            first = True
            try:
                while True:
                    try:
                        async for line in relay.lines():
                            if not line.startswith("data: "):
                                continue
                            data = line[6:]
                            if data == "[DONE]":
                                state.done = True
                                break
                            obj = json.loads(data)
                            err = obj.get("error") if "choices" not in obj else None
                            if isinstance(err, dict) and err.get("type") in ENGINE_FAILURE_TYPES:
                                raise _EngineFailed(str(err.get("message")))
                            out = state.take(obj)
                            if state.tokens_seen and first:
                                first = False
                                ticket.first_token()
                                metrics.ttft.observe(time.perf_counter() - t0)
                            if out is not None:
                                yield out
                        if not state.done:
                            raise httpx.RemoteProtocolError("the stream ended without [DONE]")
                        current["recorded"] = True
                        metrics.requests.labels(rep.url, endpoint, "ok").inc()
                        metrics.e2e.observe(time.perf_counter() - t0)
                        yield "data: [DONE]\n\n"
                        return
                    except (httpx.TransportError, ValueError) as e:
                        why = f"{type(e).__name__}: {e}"
                        rep.mark_down(why)
                    except _EngineFailed as e:  # the replica answers; its engine failed this request
                        why = f"its engine failed: {e}"
                    # The replica failed midway.
                    ticket.end()
                    await relay.close()
                    tried.append(rep.url)
                    current["recorded"] = True
                    metrics.requests.labels(rep.url, endpoint, "failed").inc()
                    if state.finished():
                        # Everything was generated; only the end of the stream was lost.
                        for event in state.ending():
                            yield event
                        return
                    refusal = state.unresumable() if state.sent_any else None  # nothing sent: start again
                    if refusal is not None:
                        metrics.failovers.labels("mid_stream", "failed").inc()
                        yield _sse(error_body(503, f"replica {rep.url} failed mid-stream ({why}); {refusal}",
                                              code="replica_failed"))
                        yield "data: [DONE]\n\n"
                        return
                    resumed = state.tokens.get(0, []) if state.sent_any else []
                    given = body.get("resume_token_ids")  # a client resuming a stream itself: its tokens first
                    if isinstance(given, list):
                        resumed = given + resumed
                    up = {**upstream, **({"resume_token_ids": resumed} if resumed else {})}
                    if "max_tokens" in up and up.get("max_tokens") is None:
                        up.pop("max_tokens")
                    opened2 = await self._open(path, up, plan, headers, tried, endpoint)
                    if isinstance(opened2, Response):
                        metrics.failovers.labels("mid_stream", "failed").inc()
                        yield _sse(error_body(503, f"replica {rep.url} failed mid-stream ({why}) and no other "
                                              f"replica could continue the stream", code="replica_failed"))
                        yield "data: [DONE]\n\n"
                        return
                    metrics.failovers.labels("mid_stream", "resumed").inc()
                    logger.info("stream moved from %s to %s after %d tokens (%s)", rep.url, opened2[0].url,
                                len(resumed), why)
                    rep, ticket, relay = opened2
                    current.update(ticket=ticket, relay=relay, replica=rep.url, recorded=False)
                    state.switched({"retries": len(tried), "replicas": tried + [rep.url],
                                    "resumed_at_token": len(resumed)})
                    if resumed:
                        first = False
                        ticket.first_token()
            finally:
                ticket.end()
                await relay.close()

        loop = asyncio.get_running_loop()

        def cleanup() -> None:
            """What events()'s finally does, for a body that was never iterated (the client gone
            before the response started): a generator never started skips its finally."""
            current["ticket"].end()
            if not current["recorded"]:
                current["recorded"] = True
                metrics.requests.labels(current["replica"], endpoint, CLIENT_CLOSED).inc()
            current["relay"].close_soon(loop)

        return StreamingResponse(ReleasingIterator(events(), cleanup), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                          REPLICA_HEADER: opened[0].url})


def _ollama_as_openai(path: str, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """An Ollama generation request (/api/chat, /api/generate) as the endpoint and body of the
    OpenAI request a replica runs it as (routes/ollama.openai_request); ("ollama", body) when it
    is none (a load request, a body the replica refuses)."""
    from tokenmill.server.routes.ollama import OllamaError, openai_request

    try:
        run = openai_request(path, body, warn=False) if path in ("/api/chat", "/api/generate") else None
    except (OllamaError, AttributeError, KeyError, TypeError, ValueError):
        run = None
    if run is None:
        return "ollama", body
    return ("chat" if run[0] == "/v1/chat/completions" else "completions"), run[1]


def _error_code(body: bytes) -> Any:
    """The `error.code` of an OpenAI-style error body (None for anything else)."""
    with contextlib.suppress(ValueError, LookupError, TypeError, AttributeError):
        return json.loads(body)["error"]["code"]
    return None


def _tenant_limit(resp: httpx.Response) -> bool:
    """Whether a replica's 429 is the tenant's own limit (not a full queue or an SLO it cannot meet)."""
    return _error_code(resp.content) == "rate_limit_exceeded"


class _Relay:
    """A replica's open stream, read by a task of its own into a queue, so that the replica can
    be given up on (Replica.abort_relays: it stopped answering) while a read is pending."""

    _END = object()

    def __init__(self, replica: Replica, resp: httpx.Response) -> None:
        self.replica, self.resp = replica, resp
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.task = asyncio.ensure_future(self._read())
        replica.relays.add(self)

    async def _read(self) -> None:
        try:
            async for line in self.resp.aiter_lines():
                self.queue.put_nowait(line)
            self.queue.put_nowait(self._END)
        except Exception as e:  # handed to the reader
            self.queue.put_nowait(e)

    def abort(self, why: str) -> None:
        self.queue.put_nowait(httpx.ReadError(f"given up: {why}"))

    async def lines(self) -> AsyncIterator[str]:
        while True:
            item = await self.queue.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close_soon(self, loop: asyncio.AbstractEventLoop) -> None:
        """close() from where nothing can be awaited (a stream's cleanup), unless it ran already."""
        if self in self.replica.relays:  # (close() takes it out first)
            with contextlib.suppress(RuntimeError):  # (the loop closed: nothing left to close)
                loop.call_soon_threadsafe(lambda: loop.create_task(self.close()))

    async def close(self) -> None:
        self.replica.relays.discard(self)
        # Shielded, and the reader awaited without passing a cancellation on: Starlette cancels a
        # stream whose client left with an anyio cancel scope that cancels again and again, which
        # cut httpcore's cleanup short and left the replica's connection open and generating.
        await asyncio.shield(self._close())

    async def _close(self) -> None:
        self.task.cancel()
        await asyncio.wait({self.task})
        await self.resp.aclose()


class _Call:
    """A request to a replica awaiting its answer (a non-streamed one, or a stream's headers), which
    can be given up on like an open stream (_Relay): abort() makes result() raise ReadError. The
    abort is its own future, so a CancelledError reaching the caller is always the caller's own."""

    def __init__(self, replica: Replica, coro: Any) -> None:
        self.replica = replica
        self.task = asyncio.ensure_future(coro)
        self.aborted: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        replica.relays.add(self)

    def abort(self, why: str) -> None:
        if not self.aborted.done():
            self.aborted.set_result(why)

    async def result(self) -> httpx.Response:
        try:
            done, _ = await asyncio.wait({self.task, self.aborted}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the client went away: so does the request to the replica
            self.task.cancel()
            raise
        finally:
            self.replica.relays.discard(self)
        if self.task in done:
            return self.task.result()
        self.task.cancel()
        raise httpx.ReadError(f"given up: {self.aborted.result()}")


class _EngineFailed(Exception):
    """A replica's stream ended with an engine error (its engine thread died, or a fault in this
    request's step): tried on another replica, which may well succeed."""


class _TooLarge(Exception):
    def __init__(self, limit: int) -> None:
        self.limit = limit


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _StreamState:
    """What a relayed stream has sent: per choice its token ids and whether it finished; the
    first replica's id and creation time (kept after a switch); whether usage went out."""

    def __init__(self, body: dict[str, Any], endpoint: str, want_ids: bool) -> None:
        self.body = body
        self.endpoint = endpoint
        self.want_ids = want_ids
        self.id: str | None = None
        self.created: Any = None
        self.model: Any = None
        self.tokens: dict[int, list[int]] = {}
        self.ended: set[int] = set()
        self.prompt_tokens = 0
        self.usage_sent = False
        self.role_sent = False
        self.done = False
        self.tokens_seen = False
        self.sent_any = False  # a choice chunk went to the client
        self.failover: dict[str, Any] | None = None

    def take(self, obj: dict[str, Any]) -> str | None:
        """A replica's chunk as the client gets it (None: dropped)."""
        if "error" in obj and "choices" not in obj:
            return _sse(obj)
        if self.id is None:
            self.id, self.created, self.model = obj.get("id"), obj.get("created"), obj.get("model")
        else:
            obj["id"], obj["created"] = self.id, self.created
        pids = obj.get("prompt_token_ids") if "prompt_token_ids" in obj else None
        keep = []
        for ch in obj.get("choices") or []:
            idx = ch.get("index", 0)
            ids = ch.get("token_ids") if self.want_ids else ch.pop("token_ids", None)
            if ids:
                self.tokens.setdefault(idx, []).extend(ids)
                self.tokens_seen = True
            p = ch.get("prompt_token_ids") if self.want_ids else ch.pop("prompt_token_ids", None)
            if p is not None and pids is None:
                pids = p
            if ch.get("finish_reason") is not None:
                self.ended.add(idx)
            delta = ch.get("delta")
            if delta == {"role": "assistant", "content": ""} and not ids:
                if self.role_sent:  # a replica that took over starts again with it
                    continue
                self.role_sent = True
            keep.append(ch)
        if "choices" in obj:
            if not keep and obj["choices"]:
                return None
            obj["choices"] = keep
            self.sent_any = self.sent_any or bool(keep)
        if pids is not None and not self.prompt_tokens:
            self.prompt_tokens = len(pids)
        elif pids is not None:  # a replica that took over sends them again: the client has them
            obj.pop("prompt_token_ids", None)
            for ch in keep:
                ch.pop("prompt_token_ids", None)
        if not self.want_ids:
            obj.pop("prompt_token_ids", None)
        if obj.get("usage") and not obj.get("choices"):  # (the final usage chunk, not a running one)
            self.usage_sent = True
        if self.failover is not None:
            obj["failover"] = self.failover
        return _sse(obj)

    def switched(self, failover: dict[str, Any]) -> None:
        self.failover = failover

    def n_choices(self) -> int:
        n = self.body.get("n") or 1
        prompt = self.body.get("prompt")
        prompts = len(prompt) if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)) else 1
        return n * prompts if isinstance(n, int) else 1

    def finished(self) -> bool:
        return len(self.ended) >= self.n_choices()

    def unresumable(self) -> str | None:
        """Why the stream cannot go on elsewhere (None: it can)."""
        b = self.body
        if self.n_choices() != 1:
            return "a stream of several choices or prompts cannot be resumed"
        if b.get("use_beam_search") or b.get("test_time_compute") is not None:
            return "beam search and test-time compute streams cannot be resumed"
        if b.get("echo") and b.get("logprobs") is not None and self.tokens_seen:
            return "an echoed stream with logprobs cannot be resumed"
        return None

    def ending(self) -> list[str]:
        """The end of a stream whose choices all finished before the replica went away."""
        out = []
        opts = self.body.get("stream_options")
        if isinstance(opts, dict) and opts.get("include_usage") and not self.usage_sent:
            given = self.body.get("resume_token_ids")  # a client's own resume: replicas count those tokens
            n = sum(len(t) for t in self.tokens.values()) + (len(given) if isinstance(given, list) else 0)
            obj = {"id": self.id, "object": "chat.completion.chunk" if self.endpoint == "chat" else "text_completion",
                   "created": self.created, "model": self.model, "choices": [],
                   "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": n,
                             "total_tokens": self.prompt_tokens + n}}
            out.append(_sse(obj))
        out.append("data: [DONE]\n\n")
        return out
