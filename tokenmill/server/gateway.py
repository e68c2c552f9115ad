"""The steps before a request reaches its model: body, auth, admission, and which model serves it.

A request's `model` names a model of the pool or a tier (a virtual model with a route policy,
tokenmill/routing.py). `Gateway.open_request` parses and checks the body, resolves the name
(404 listing what exists), waits while the pool brings the model back (the wait is reported in
the response's `swap` object), and returns that model's ServerContext. For a `rules` tier the
policy picks the model from the prompt; for a `cascade` tier the context's engine is a
CascadeEngine, which runs the small model first and the strong one when it must (cascade.py).

Handlers are wrapped by `Gateway.route`, which gives back the model leases the request took and
adds what the gateway learned (`routing`, `swap`, and for a cascade the model that answered) to
the response: a JSON body, or the first event of a stream.

With tenants (`--tenants`, tokenmill/ops/tenants.py) `open_request` also finds the caller's tenant
from its key, keeps it to its models and max_tokens cap, and admits it under its concurrency and
requests-per-minute limits before anything waits for a model (its tokens are reserved where the
prompt is known, `ServerContext.submit`). `route` gives the admission back when the response has
ended: when the handler returns, or for a stream when its last event is sent or it is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import copy
import functools
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from tokenmill.engine.llm_engine import load_tokenizer, resolve_task
from tokenmill.engine.slo import SLOTarget
from tokenmill.ops.tenants import Admission, LimitExceeded, Tenant, Tenants, TenantsConfig, hash_key
from tokenmill.routing import CascadePolicy, RulesPolicy
from tokenmill.server.async_engine import EngineStats
from tokenmill.server.context import ADMISSION, REQUEST_TAGS, ServerContext, ServerSettings
from tokenmill.server.errors import APIError, invalid_key_error, limit_error, validation_error
from tokenmill.server.metrics import ServerMetrics
from tokenmill.server.pool import ACTIVE, ModelPool, PoolError, configured_max_model_len
from tokenmill.server.response_store import ResponseStore
from tokenmill.server.retrieval import Retrieval
from tokenmill.server.streaming import ReleasingIterator, sse, wait_for_disconnect

logger = logging.getLogger("tokenmill.server")

# The response extras of the request being handled (routing, swap, the answering model).
EXTRAS: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("tokenmill_extras", default=None)


# The header a fleet router sends a prefill with: its --kv-transfer-key (kv_transfer_params is refused
# without it; clients' headers never carry it through the router, which forwards only FORWARDED).
KV_TRANSFER_HEADER = "x-tokenmill-kv-transfer-key"
KV_RELEASE_HEADER = "x-tokenmill-kv-release"  # the import hold a request lets go of as it ends
_BACKGROUND: set[asyncio.Future] = set()  # (tasks nobody awaits, kept until done)


@functools.cache
def _field_names(model: type[BaseModel]) -> frozenset[str]:
    """A request body's top-level keys: its fields' names and aliases."""
    return frozenset({f.alias or n for n, f in model.model_fields.items()} | set(model.model_fields))


@dataclass
class GatewaySettings:
    max_body_bytes: int = 8 * 2**20
    api_key: str | None = None  # required on /v1 routes when set
    admin_api_key: str | None = None  # required on the admin routes when set (else api_key, when set)
    # --tenants: the generation and embedding routes take tenants' keys (and api_key no longer opens them)
    tenants: TenantsConfig | None = None
    responses_store_bytes: int = 64 * 2**20  # the Responses API's stored responses (0: none are kept)
    trust_request_chat_template: bool = False  # render a request's own chat_template (vLLM's flag)
    metric_names: str = "tokenmill"  # "vllm": /metrics under vLLM's names (metrics._VLLMNames)
    # RAG (server/retrieval.py): where vector stores live (None: in memory; a folder; a Qdrant URL),
    # the Qdrant server's key, and the embedding model new stores use (None: the one served)
    vector_store: str | None = None
    vector_store_api_key: str | None = None
    rag_embedding_model: str | None = None
    rag_reranker: str | None = None  # a served reranker that reorders vector store searches
    rag_excerpt_order: str = "score"  # file_search's excerpts in the prompt: "score" or "document"
    # Prefill/decode disaggregation (routes/kv_transfer.py): the KV transfer routes and prefills that
    # hold their prompt's KV for a decode worker, and how long they hold it
    kv_transfer: bool = False
    kv_transfer_key: str | None = None  # required of every KV transfer (KV_TRANSFER_HEADER or the routes' bearer)
    kv_hold_s: float = 30.0
    # base URLs a pull may name as its source (--kv-transfer-sources; None: any the key holder names)
    kv_transfer_sources: tuple[str, ...] | None = None


@dataclass
class Tier:
    """A virtual model: a route policy over models of the pool."""

    name: str
    policy: RulesPolicy | CascadePolicy

    @property
    def models(self) -> list[str]:
        p = self.policy
        if isinstance(p, CascadePolicy):
            return [p.small, p.strong]
        return list(dict.fromkeys([r.model for r in p.rules] + [p.default]))


class Gateway:
    def __init__(self, pool: ModelPool, tiers: list[Tier], settings: GatewaySettings, app: FastAPI) -> None:
        self.pool = pool
        self.tiers = {t.name: t for t in tiers}
        self._ignored_seen: set[tuple[str, ...]] = set()  # (_note_ignored)
        for t in tiers:
            if t.name in pool.entries:
                raise ValueError(f"tiers: {t.name!r} is also the name of a model")
        self.settings = settings
        self.app = app
        self.created = int(time.time())
        self.metrics = ServerMetrics(self._model_stats, settings.metric_names)
        self.responses = ResponseStore(settings.responses_store_bytes)
        self.tenants: Tenants | None = None
        if settings.tenants is not None:
            self.tenants = self._make_tenants(settings.tenants)
        pool.on_swap = lambda name, s, frm: _call_soon(self, self.metrics.observe_swap, name, s, frm)
        # A rules tier counts prompt tokens with its default model's tokenizer (loaded here, so a
        # model on disk need not come back just to route a request).
        self._tier_tokenizers: dict[str, Any] = {}
        self._tokenizer_ctxs: dict[str, ServerContext] = {}  # /tokenize of models on disk
        self._tasks: dict[str, tuple[str, int]] = {}  # each model's task ("generate", ...) and labels, once known
        for t in tiers:
            first = pool.entries[t.policy.default if isinstance(t.policy, RulesPolicy) else t.policy.small]
            cfg = first.spec.config
            self._tier_tokenizers[t.name] = load_tokenizer(cfg.tokenizer or cfg.model, cfg.chat_template)
            if isinstance(t.policy, CascadePolicy):
                _check_same_tokenizer(t, pool)
        for flag, name, task in (("--rag-embedding-model", settings.rag_embedding_model, ("embed", None)),
                                 ("--rag-reranker", settings.rag_reranker, ("classify", 1))):
            if name is None:
                continue
            if name not in pool.entries:
                raise ValueError(f"{flag}: no served model is named {name!r}")
            found = self._task(name)
            if found is not None and (found[0] != task[0] or task[1] not in (None, found[1])):
                what = "an embedding model" if task[0] == "embed" else "a reranker (a one-label classifier)"
                raise ValueError(f"{flag}: {name!r} is not {what}")
        self.retrieval = Retrieval(self, settings.vector_store, settings.vector_store_api_key,
                                   settings.rag_embedding_model, settings.rag_reranker, settings.rag_excerpt_order)

    def _make_tenants(self, config: TenantsConfig) -> Tenants:
        for t in config.tenants:
            for m in t.models or ():
                if m not in self.pool.entries and m not in self.tiers:
                    raise ValueError(f"--tenants: tenant {t.name!r}: models: {m!r} is not a model or tier of this "
                                     f"server (it serves {', '.join(self.names)})")
            if self.settings.api_key and hash_key(self.settings.api_key) in t.keys_sha256:
                raise ValueError(f"--api-key: it is also a key of tenant {t.name!r}; give the operator's key and "
                                 f"the tenants' keys apart")
        tenants = Tenants(config, on_reject=self.metrics.observe_rejected)
        self.metrics.watch_tenants(tenants)
        return tenants

    def _model_stats(self) -> list[tuple[str, EngineStats, str]]:
        return self.pool.model_stats()

    # -- the request preamble -----------------------------------------------------------------------
    async def parse(self, request: Request, model: type[BaseModel]) -> Any:
        max_bytes = self.settings.max_body_bytes
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise APIError(413, f"request body exceeds {max_bytes} bytes", code="request_too_large")
            chunks.append(chunk)
        body = b"".join(chunks)
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"malformed JSON body: {e}", code="invalid_json") from None
        except RecursionError:
            raise APIError(400, "malformed JSON body: nested too deeply", code="invalid_json") from None
        try:
            parsed = model.model_validate_json(body)
        except ValidationError as e:
            raise validation_error(e) from None
        except RecursionError:
            raise APIError(400, "body: nested too deeply", code="invalid_json") from None
        if isinstance(doc, dict):
            self._note_ignored(model, doc)
        return parsed

    def _note_ignored(self, model: type[BaseModel], doc: dict[str, Any]) -> None:
        """Fields the API does not know are ignored, as vLLM and OpenAI's newer fields want (store,
        metadata, service_tier, ...); vLLM logs them, and so does this, once per set of names.
        What is kept and logged is bounded (a body may hold millions of made-up keys)."""
        known = _field_names(model)
        extra = sorted(k[:64] for k in doc if k not in known)
        if not extra:
            return
        shown = tuple(extra[:16])
        if shown not in self._ignored_seen and len(self._ignored_seen) < 256:
            self._ignored_seen.add(shown)
            more = f" (and {len(extra) - len(shown)} more)" if len(extra) > len(shown) else ""
            logger.warning("the following fields were present in the request but ignored: %s%s", list(shown), more)

    def check_auth(self, request: Request, service: bool = False) -> Tenant | None:
        """The caller's tenant (None without --tenants); 401 for a missing or unknown key. With
        tenants, the generation and embedding routes take a tenant's key only; the routes an
        operator or a fleet router reads (service: /v1/models, /v1/kv_events) take --api-key too."""
        header = request.headers.get("authorization")
        if self.tenants is not None:
            tenant = self.tenants.authenticate(header)
            if tenant is not None:
                return tenant
            if not (service and self.settings.api_key and _key_matches(header, self.settings.api_key)):
                raise invalid_key_error()
            return None
        api_key = self.settings.api_key
        if api_key and not _key_matches(header, api_key):
            raise invalid_key_error()
        return None

    def check_service(self, request: Request) -> None:
        """/v1/kv_events: with tenants, the operator's --api-key only (a fleet router's
        --replica-api-key); a tenant's key does not watch the cache."""
        if self.tenants is None:
            self.check_auth(request)
            return
        key = self.settings.api_key
        if not key:
            raise APIError(403, "this route is closed: this server has tenants (--tenants); start it with --api-key "
                           "(a fleet router's --replica-api-key) to open it", type_="permission_error",
                           code="permission_denied")
        if not _key_matches(request.headers.get("authorization"), key):
            raise invalid_key_error()

    def check_admin(self, request: Request) -> None:
        key = self.settings.admin_api_key or self.settings.api_key
        if not key and self.tenants is not None:  # a tenant's key must not unload models
            raise APIError(403, "the admin routes are closed: this server has tenants (--tenants); start it with "
                           "--admin-api-key to use them", type_="permission_error", code="permission_denied")
        if key and not _key_matches(request.headers.get("authorization"), key):
            raise APIError(401, "invalid or missing admin API key", code="invalid_api_key")

    def visible(self, tenant: Tenant | None) -> list[str]:
        """The models and tiers a caller may use (all of them without a tenant, or for --api-key)."""
        return [n for n in self.names if tenant is None or tenant.allows(n)]

    def check_admitting(self) -> None:
        if self.app.state.draining:
            raise APIError(503, "the server is shutting down", headers={"Retry-After": "5"})

    @property
    def names(self) -> list[str]:
        return list(self.pool.entries) + list(self.tiers)

    def unknown(self, model: str) -> APIError:
        return APIError(404, f"The model `{model}` does not exist; this server serves: "
                        f"{', '.join(f'`{n}`' for n in self.names)}.", param="model", code="model_not_found")

    def check_model(self, model: str | None, tenant: Tenant | None = None) -> str:
        """The model or tier a request names (the first model when it names none, or its tenant's
        first); 404 otherwise, also for a model its tenant may not use (as OpenAI answers a key
        that cannot see a model), naming only what the tenant may use."""
        if tenant is not None and tenant.models is not None:
            name = model if model is not None else tenant.models[0]
            if not tenant.allows(name):
                raise APIError(404, f"The model `{name}` does not exist or you do not have access to it; "
                               f"tenant {tenant.name} may use: {', '.join(f'`{n}`' for n in tenant.models)}.",
                               param="model", code="model_not_found")
        else:
            name = model if model is not None else self.pool.default
        if name not in self.pool.entries and name not in self.tiers:
            raise self.unknown(name)
        return name

    def cap_max_tokens(self, req: Any, tenant: Tenant) -> None:
        """A 400 for a max_tokens / max_completion_tokens above the tenant's cap; a request that
        sets neither gets the cap (a completion's default of 16 stays when it is lower)."""
        cap = tenant.max_tokens
        names = ("max_tokens", "max_completion_tokens", "max_output_tokens")
        fields = [f for f in names if f in type(req).model_fields]
        if cap is None or not fields:
            return
        given = [f for f in fields if f in req.model_fields_set and getattr(req, f) is not None]
        for f in given:
            if getattr(req, f) > cap:
                raise APIError(400, f"{f}: tenant {tenant.name} may ask for at most {cap} tokens per request "
                               f"(its max_tokens cap), got {getattr(req, f)}", param=f)
        if not given:
            default = getattr(req, fields[0])
            setattr(req, fields[0], cap if default is None else min(default, cap))
            tags = REQUEST_TAGS.get()
            if tags is not None and (default is None or cap < default):
                tags["max_tokens_is_cap"] = True  # (ServerContext.submit marks the params)

    def admit(self, tenant: Tenant) -> Admission:
        """The tenant's admission (concurrency and requests per minute) or a 429; the request's
        route gives it back when the response has ended."""
        assert self.tenants is not None
        try:
            adm = self.tenants.admit(tenant)
        except LimitExceeded as e:
            raise limit_error(e) from None
        ADMISSION.set(adm)
        return adm

    async def open_request(self, request: Request, body: type[BaseModel], generation: bool = False,
                           auth: bool = True, tasks: tuple[str, ...] = (),
                           precheck: Callable[[Any], None] | None = None,
                           prepare: Callable[[Any], Awaitable[None]] | None = None) -> tuple[ServerContext, Any, float]:
        """What every model endpoint does first: auth, admission, body, model. Returns the serving
        model's context (once it is active), the parsed body and its arrival time. /tokenize and
        /detokenize skip auth and admission, as vLLM's do. What can be refused without the model on
        the device (the body's own checks, `precheck`; the endpoint against the model's task) is
        refused before waiting for it: a 400 must not park another model and load this one first.
        tasks: the pooling tasks a pooling endpoint serves ("embed", "classify"; "score": a model that
        scores pairs, an embedding model or a one-label classifier). prepare: work on the body
        after admission and before the model is taken (a file_search's retrieval, which may need
        another model: one request never holds two models' leases at once)."""
        arrival = time.time()
        tenant = None
        if auth:
            tenant = self.check_auth(request)
            self.check_admitting()
        req = await self.parse(request, body)
        tags = REQUEST_TAGS.get()
        slo = getattr(req, "slo", None)
        if slo is not None and tags is not None:
            try:
                tags["slo"] = SLOTarget.from_dict(slo)
            except ValueError as e:
                raise APIError(400, str(e), param="slo") from None
        name = self.check_model(req.model, tenant)
        if tenant is not None and tags is not None:  # its prompts carry it: its own prefix-cache namespace,
            tags["tenant"] = tenant.name  # metrics, accounting (and its stored responses, for the precheck)
        if precheck is not None:
            precheck(req)
        if getattr(req, "kv_transfer_params", None) is not None:
            self._kv_prefill(request, req, name, tags)
        release = request.headers.get(KV_RELEASE_HEADER)
        if release is not None and tags is not None:
            self.check_kv_transfer(request)
            tags["kv_release"] = release
        if (generation or tasks) and name not in self.tiers:
            self._check_task(name, generation, tasks)
        if tenant is not None:
            if tags is not None:
                if tags.get("slo") is None and tenant.slo is not None:
                    tags["slo"] = tenant.slo
            self.cap_max_tokens(req, tenant)
            self.admit(tenant)  # before waiting for a model: a tenant over its limits waits for nothing
        if prepare is not None:
            await prepare(req)
        tier = self.tiers.get(name)
        if not auth:  # tokenizing needs no device: a parked model's tokenizer serves as it is
            if tier is not None:
                name = tier.policy.default if isinstance(tier.policy, RulesPolicy) else tier.policy.small
            ctx, _ = await self.pool.acquire(name, need_device=False)
            if ctx is None:  # on disk: its tokenizer alone, from its folder
                return self._tokenizer_only(name), req, arrival
            _extras().setdefault("_leases", []).append(name)
            return ctx, req, arrival
        if tier is None:
            ctx = await self.acquire(name, request=request)
        elif isinstance(tier.policy, RulesPolicy):
            ctx = await self._route_rules(tier, req, request)
        else:
            ctx = await self._cascade(tier, req, generation, request)
        if generation or tasks:  # (a tier's model, known only now)
            _check_task(ctx.name, (ctx.llm_engine.task, len(ctx.llm_engine.model_config.labels)), generation, tasks)
        return ctx, req, arrival

    def check_kv_transfer(self, request: Request, header: str = KV_TRANSFER_HEADER) -> None:
        """KV transfer is the fleet's own business: on (--kv-transfer) and with its key."""
        if not self.settings.kv_transfer:
            raise APIError(404, "KV transfer is off on this server (start it with --kv-transfer)",
                           code="kv_transfer_disabled")
        key = self.settings.kv_transfer_key or ""
        got = request.headers.get(header)
        if header == "authorization":
            ok = _key_matches(got, key)
        else:
            ok = _key_matches(f"Bearer {got}" if got is not None else None, key)
        if not key or not ok:
            raise APIError(403, "KV transfer takes the fleet's --kv-transfer-key", type_="permission_error",
                           code="permission_denied")

    def let_go_of_import(self, request: Request) -> None:
        """An import hold (routes/kv_transfer.py) kept for a request refused before it ran (a 400
        the router's render did not foresee, a full queue, a 429 the router retries elsewhere): let
        go now, not after --kv-hold-timeout. Only for the fleet key's holder, as the header is."""
        try:
            self._let_go_of_import(request)
        except Exception:  # (never in the way of the answer or the cleanup before it)
            logger.exception("letting go of an import hold failed")

    def _let_go_of_import(self, request: Request) -> None:
        hold = request.headers.get(KV_RELEASE_HEADER)
        if not hold:
            return
        try:
            self.check_kv_transfer(request)  # (the header's own check: on, and with the fleet's key)
        except APIError:
            return
        engines = [e.engine for e in self.pool.entries.values() if e.engine is not None]

        async def release() -> None:
            for engine in engines:
                if not engine.parked and hold in engine.kv_holds:
                    with contextlib.suppress(Exception):  # (the engine stopping: its holds go with it)
                        await self.pool.run_on_device(lambda engine=engine: engine.release_kv_hold(hold))

        task = asyncio.ensure_future(release())
        _BACKGROUND.add(task)
        task.add_done_callback(_BACKGROUND.discard)

    def _kv_prefill(self, request: Request, req: Any, name: str, tags: dict[str, Any] | None) -> None:
        """A prefill for a decode worker (`kv_transfer_params: {"do_remote_decode": true}`, vLLM's
        field): its prompt's KV is held once it finishes, named in the response's kv_transfer_params."""
        params = req.kv_transfer_params
        if not self.settings.kv_transfer:
            raise APIError(400, "kv_transfer_params: KV transfer is off on this server (start it with --kv-transfer)",
                           param="kv_transfer_params")
        self.check_kv_transfer(request)
        if not isinstance(params, dict) or set(params) - {"do_remote_decode"} or params.get("do_remote_decode") \
                is not True:
            raise APIError(400, 'kv_transfer_params: the only form taken is {"do_remote_decode": true} (a prefill '
                           "whose KV a decode worker takes)", param="kv_transfer_params")
        if name in self.tiers:
            raise APIError(400, "kv_transfer_params: name a model, not a tier", param="kv_transfer_params")
        prompt = getattr(req, "prompt", None)
        several = isinstance(prompt, list) and len(prompt) > 1 and not isinstance(prompt[0], int)
        tools = getattr(req, "tools", None) or []
        searches = any((t.get("type") if isinstance(t, dict) else getattr(t, "type", None)) == "file_search"
                       for t in tools)
        if req.stream or several or (req.n or 1) != 1 or getattr(req, "use_beam_search", False) \
                or getattr(req, "test_time_compute", None) is not None or req.resume_token_ids or searches:
            raise APIError(400, "kv_transfer_params: a prefill is one prompt, one choice, not streamed, resumed, "
                           "beam searched, test-time computed or searching files", param="kv_transfer_params")
        tid = f"kvx-{uuid.uuid4().hex}"
        if tags is not None:
            tags["kv_hold"] = (tid, self.settings.kv_hold_s)
        _extras()["kv_transfer_params"] = {"transfer_id": tid, "expires_in": self.settings.kv_hold_s}

    def _check_task(self, name: str, generation: bool, tasks: tuple[str, ...]) -> None:
        """The endpoint against a model's task, before it is on the device."""
        task = self._task(name)
        if task is not None:
            _check_task(name, task, generation, tasks)

    def task_of(self, name: str) -> str | None:
        """A model's task ("generate", "embed", "classify"), from its folder if it is not loaded;
        None where its folder cannot tell (loading it will say what is wrong)."""
        task = self._task(name)
        return task[0] if task is not None else None

    def _task(self, name: str) -> tuple[str, int] | None:
        task = self._tasks.get(name)
        if task is None:
            e = self.pool.entries[name]
            engine = e.engine  # (read once: the device thread may let it go meanwhile)
            if engine is not None:
                task = (engine.task, len(engine.model_config.labels))
            else:  # (from its folder's config.json: nothing is loaded)
                from tokenmill.config import ModelConfig

                cfg = e.spec.config
                try:
                    mc = ModelConfig.from_pretrained(cfg.model)
                    tokens = cfg.classifier_from_token
                    labels = (1 if len(tokens) == 2 else len(tokens)) if tokens is not None else len(mc.labels)
                    task = (resolve_task(cfg.task, mc, tokens), labels)
                except Exception:  # (loading it will say what is wrong)
                    return None
            self._tasks[name] = task
        return task

    def _tokenizer_only(self, name: str) -> ServerContext:
        """A context for /tokenize and /detokenize of a model on disk: its tokenizer and limits,
        read from its folder, and no engine (so nothing is loaded)."""
        ctx = self._tokenizer_ctxs.get(name)
        if ctx is None:
            from types import SimpleNamespace

            from tokenmill.config import ModelConfig

            cfg = self.pool.entries[name].spec.config
            mc = ModelConfig.from_pretrained(cfg.model)
            ctx = object.__new__(ServerContext)
            ctx.name, ctx.vocab = name, mc.vocab_size
            ctx.tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, cfg.chat_template)
            ctx.settings = ServerSettings(name, cfg.model, trust_request_chat_template=self.settings.
                                          trust_request_chat_template)
            ctx.tokenize_lock = asyncio.Lock()
            ctx.llm_engine = SimpleNamespace(max_model_len=configured_max_model_len(cfg))  # type: ignore
            self._tokenizer_ctxs[name] = ctx
        return ctx

    async def acquire(self, name: str, need_device: bool = True, request: Request | None = None) -> ServerContext:
        """The model's context once it is active; the lease it takes is given back when the
        handler returns (Gateway.route). With request, a client that goes away while its model is
        brought back stops waiting (499): its demand must not swap a model in for no one."""
        try:
            ctx, swap = await (self.pool_acquire(name, request) if need_device else self.pool.acquire(name, False))
        except PoolError as e:
            raise pool_api_error(e) from None
        if ctx is None:  # (need_device=False and the model on disk: the pool kept no lease)
            raise APIError(404, f"model {name!r} is not loaded (it is on disk)", param="model",
                           code="model_not_loaded")
        leases = _extras().setdefault("_leases", [])
        leases.append(name)
        if swap is not None:
            _extras()["swap"] = swap
        return ctx

    async def pool_acquire(self, name: str, request: Request | None = None) -> tuple[Any, dict[str, Any] | None]:
        """pool.acquire(name); with request, an APIError(499) once the client has gone away while the
        model is being brought back (a stream notices only when a write fails, and a cascade's
        writes none before it has decided)."""
        if request is None or self.pool.entries[name].state == ACTIVE:
            return await self.pool.acquire(name)
        task = asyncio.ensure_future(self.pool.acquire(name))
        watcher = asyncio.ensure_future(wait_for_disconnect(request))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not task.done():  # the client left: a cancelled acquire gives back its lease and its place in line
                task.cancel()
        try:
            return await task
        except asyncio.CancelledError:
            raise APIError(499, "the client closed the request while its model was being brought back") from None

    async def _route_rules(self, tier: Tier, req: Any, request: Request | None = None) -> ServerContext:
        text, ids = _prompt_text(req)
        tok = self._tier_tokenizers[tier.name]
        if ids is None:
            if tok is None:
                ntok = len(text.encode()) // 4  # no tokenizer: about four bytes a token
            elif len(text) < 4096:
                ntok = len(tok.encode(text, add_special_tokens=False))
            else:
                ntok = len(await asyncio.to_thread(tok.encode, text, add_special_tokens=False))
        else:
            ntok = ids
        max_tokens = getattr(req, "max_completion_tokens", None)
        if max_tokens is None:
            max_tokens = getattr(req, "max_tokens", None)
        model, account = tier.policy.route(text, ntok, max_tokens)  # type: ignore[union-attr]
        _extras()["routing"] = {"tier": tier.name, **account}
        return await self.acquire(model, request=request)

    async def _cascade(self, tier: Tier, req: Any, generation: bool, request: Request | None = None) -> ServerContext:
        from tokenmill.server.cascade import CascadeEngine

        policy: CascadePolicy = tier.policy  # type: ignore[assignment]
        if generation:
            for field, bad in (("test_time_compute", getattr(req, "test_time_compute", None) is not None),
                               ("use_beam_search", bool(getattr(req, "use_beam_search", False))),
                               ("max_tokens", getattr(req, "max_tokens", None) == 0)):
                if bad:
                    raise APIError(400, f"{field}: not available on the cascade tier `{tier.name}` (its answer is "
                                   f"judged by token confidence); name one of its models "
                                   f"({', '.join(tier.models)})", param=field)
        if generation:  # a strong model that can never come back makes every escalation fail: refused now
            try:
                self.pool.check_fits(policy.strong)
            except PoolError as e:
                raise pool_api_error(e) from None
        small = await self.acquire(policy.small, request=request)
        if not generation:
            return small
        ctx = copy.copy(small)
        extras = _extras()
        extras["_decides_late"] = True  # a stream's events get the answering model once it is known
        # A stream notices a client gone only when it writes (unstreamed, unless_disconnected watches).
        watch = request if getattr(req, "stream", False) else None
        ctx.engine = CascadeEngine(self, tier.name, policy, small, extras, watch)  # type: ignore[assignment]
        return ctx

    # -- handlers -----------------------------------------------------------------------------------
    def route(self, handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        """Wraps a handler: the model leases it took are given back when it returns, and the
        response carries the gateway's extras (routing, swap, the model that answered)."""

        @functools.wraps(handler)
        async def wrapped(request: Request, *args: Any, **kwargs: Any) -> Any:
            extras: dict[str, Any] = {}
            token = EXTRAS.set(extras)
            tags_token = REQUEST_TAGS.set({})
            adm_token = ADMISSION.set(None)
            resp = None
            try:
                resp = await handler(request, *args, **kwargs)
            finally:
                adm = ADMISSION.get()
                EXTRAS.reset(token)
                REQUEST_TAGS.reset(tags_token)
                ADMISSION.reset(adm_token)
                for name in extras.pop("_leases", []):
                    self.pool.release(name)
                if adm is not None and not isinstance(resp, StreamingResponse):
                    adm.release()  # an error, or a whole answer: the request has ended
                if resp is None or (not isinstance(resp, StreamingResponse)
                                    and getattr(resp, "status_code", 200) >= 400):
                    self.let_go_of_import(request)  # (a request that ends in the engine lets go there)
            if adm is None:
                return with_extras(resp, extras)
            try:
                resp = with_extras(resp, extras)
            except BaseException:
                adm.release()
                raise
            if isinstance(resp, StreamingResponse):  # held until the stream has ended, however it ends
                resp.body_iterator = ReleasingIterator(resp.body_iterator, adm.release)
            return resp

        return wrapped


def pool_api_error(e: PoolError) -> APIError:
    """A model the pool cannot bring back: a 503 with Retry-After while it may come back, else no
    Retry-After and `x-should-retry: false` (OpenAI's clients retry every 5xx unless told not to)."""
    headers = {"x-should-retry": "false"} if not e.retryable else {"Retry-After": "5"} if e.status == 503 else None
    return APIError(e.status, str(e), code=e.code, headers=headers)


def _key_matches(header: str | None, key: str) -> bool:
    """Whether an Authorization header carries `Bearer key`, compared in constant time."""
    got = hashlib.sha256((header or "").encode("utf-8", "surrogatepass")).digest()
    return hmac.compare_digest(got, hashlib.sha256(f"Bearer {key}".encode("utf-8", "surrogatepass")).digest())


def _extras() -> dict[str, Any]:
    extras = EXTRAS.get()
    if extras is None:  # outside Gateway.route (a test calling a method directly): nothing to report to
        extras = {}
    return extras


def _call_soon(gw: Gateway, fn: Callable[..., Any], *args: Any) -> None:
    loop = gw.pool._loop
    if loop is not None:
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass


def _prompt_text(req: Any) -> tuple[str, int | None]:
    """The text a rules tier matches (completion prompts, or the conversation's text) and, for
    token-id prompts, their token count."""
    req = getattr(req, "_chat", None) or req  # (a Responses request: the chat request that runs it)
    messages = getattr(req, "messages", None)
    if messages is not None:
        parts = []
        for m in messages:
            c = m.content
            if isinstance(c, str):
                parts.append(c)
            elif isinstance(c, list):
                parts.extend(p.get("text", "") if isinstance(p, dict) else getattr(p, "text", "") or "" for p in c)
        return "\n".join(parts), None
    p = getattr(req, "prompt", None)
    if isinstance(p, str):
        return p, None
    if isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        return "\n".join(p), None
    if isinstance(p, list) and p and all(isinstance(x, int) for x in p):
        return "", len(p)
    if isinstance(p, list) and p:
        return "", max(len(x) for x in p)
    return "", None


def _check_same_tokenizer(tier: Tier, pool: ModelPool) -> None:
    """A cascade sends the small model's prompt tokens to the strong model: both must read them alike."""
    from tokenmill.config import ModelConfig

    small, strong = (pool.entries[n].spec.config for n in tier.models)
    a, b = (load_tokenizer(c.tokenizer or c.model, c.chat_template) for c in (small, strong))
    same = (a is None and b is None) or (a is not None and b is not None and a.get_vocab() == b.get_vocab())
    if same and a is not None and b is not None and a.chat_template != b.chat_template:
        raise ValueError(f"tiers: {tier.name!r}: a cascade's small and strong models must share a chat template "
                         f"(the strong model continues the small one's prompt; {small.model} and {strong.model} "
                         f"render chats differently)")
    # Structured outputs compiled for the small model's vocabulary must fit the strong one's too.
    same = same and ModelConfig.from_pretrained(small.model).vocab_size == ModelConfig.from_pretrained(
        strong.model).vocab_size
    if not same:
        raise ValueError(f"tiers: {tier.name!r}: a cascade's small and strong models must share a tokenizer "
                         f"({small.model} and {strong.model} differ)")


def _check_task(name: str, task_labels: tuple[str, int], generation: bool, tasks: tuple[str, ...]) -> None:
    """A 400 for an endpoint the model's task does not serve: generation on a pooling model (an
    embedding model, a classifier), /v1/embeddings on a generative model or a classifier, ..."""
    task, labels = task_labels
    if generation:
        if task == "embed":
            raise APIError(400, f"this server runs the embedding model `{name}`: it answers /v1/embeddings, "
                           f"/score and /rerank, not text generation")
        if task == "classify":
            raise APIError(400, f"this server runs the classifier `{name}`: it answers /classify (and /score and "
                           f"/rerank for a reranker), not text generation")
        return
    if "score" in tasks:
        from tokenmill.scoring import check_scorer

        try:
            check_scorer(task, labels, name)
        except ValueError as e:
            raise APIError(400, str(e), param="model") from None
        return
    if task in tasks:
        return
    if tasks == ("embed",):
        kind = "a classifier" if task == "classify" else "served as a generative model"
        raise APIError(400, f"`{name}` is {kind}, which has no embeddings; serve an embedding model, or this one "
                       f"with --task embed", param="model")
    raise APIError(400, f"`{name}` is {'an embedding model' if task == 'embed' else 'served as a generative model'}, "
                   f"not a classifier; serve a *ForSequenceClassification checkpoint, or a causal LM with "
                   f"--classifier-from-token", param="model")


def with_extras(resp: Any, extras: dict[str, Any]) -> Any:
    """The response with the gateway's extras: `routing` and `swap` in a JSON body or the first
    event of a stream, and `model` set to the model that answered (a cascade decides late)."""
    if not extras or not isinstance(resp, Response) or resp.status_code != 200:
        return resp
    if isinstance(resp, JSONResponse):
        body = json.loads(resp.body)
        if isinstance(body, dict) and "object" in body:
            _apply(body, extras, first=True)
            return JSONResponse(body, status_code=resp.status_code)
        return resp
    if isinstance(resp, StreamingResponse):
        inner = resp.body_iterator

        async def events() -> AsyncIterator[Any]:
            first = True
            try:
                async for ev in inner:
                    if isinstance(ev, str) and "data: {" in ev and (first or "model" in extras):
                        out = []
                        for one in ev.split("\n\n"):  # (a step's chunks are one write: several events)
                            # "data: {...}", or the Responses API's "event: type\ndata: {...}"
                            head, data = ("", one[6:]) if one.startswith("data: ") else one.partition("\ndata: ")[::2]
                            if data.startswith("{") and (first or "model" in extras):
                                obj = json.loads(data)
                                target = obj if "object" in obj else obj.get("response")
                                if isinstance(target, dict):
                                    _apply(target, extras, first)
                                    first = False
                                    out.append(f"{head}\n" * bool(head) + sse(obj))
                                    continue
                            if one:
                                out.append(one + "\n\n")
                        ev = "".join(out)
                    yield ev
            finally:
                aclose = getattr(inner, "aclose", None)
                if aclose is not None:
                    await aclose()

        resp.body_iterator = events()
    return resp


def _apply(obj: dict[str, Any], extras: dict[str, Any], first: bool) -> None:
    if "model" in extras:
        obj["model"] = extras["model"]
    if first:
        for k in ("routing", "swap", "file_search_call", "kv_transfer_params"):
            if k in extras:
                obj[k] = extras[k]
