"""Tenants: who is calling, what each may use, and its limits (`tokenmill serve --tenants tenants.yaml`).

```yaml
slo_classes:                  # named latency targets; a tenant picks one
  interactive: {ttft_ms: 800, tpot_ms: 150}
  batch: {}                   # best effort (no targets)
tenants:
  - name: acme
    keys_sha256: [9f86d0...]  # sha256 of each API key (`tokenmill tenants hash-key`): never in clear
    priority: 0               # lower runs first; a request may ask for a larger value, never a smaller
    slo_class: interactive
    requests_per_minute: 600  # every limit is optional: left out, none
    tokens_per_minute: 200000 # prompt + completion tokens
    max_concurrent_requests: 8
    max_tokens: 1024          # cap on a request's max_tokens / max_completion_tokens
    models: [llama, tier-a]   # models or tiers it may use; left out, all
```

`Tenants` holds the limiter state, on the event loop (single-threaded: every check and the
reservation it guards happen with no await in between, so concurrent requests cannot both pass
one check). Requests per minute and tokens per minute are sliding 60 s windows of what was
admitted, not fixed buckets. Tokens are reserved at admission, prompt plus the most the request
may generate, so the window never overshoots; when the response ends the reservation becomes the
real count (outputs seen through `observe`), still at its admission time. Concurrency counts
`Admission`s from admission until `release`, which the server calls on every path.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from tokenmill.engine.slo import SLOTarget
from tokenmill.outputs import RequestOutput

WINDOW_S = 60.0  # the span of the per-minute limits
LIMIT_NAMES = ("requests_per_minute", "tokens_per_minute", "concurrent_requests")  # metric labels
TENANT_KEYS = ("name", "keys_sha256", "priority", "slo_class", "requests_per_minute", "tokens_per_minute",
               "max_concurrent_requests", "max_tokens", "models")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # a metrics label and part of the cache salt
_SHA256 = re.compile(r"[0-9a-f]{64}")


def hash_key(key: str) -> str:
    """The hex sha256 of an API key, as tenants.yaml stores it."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def tenant_salt(tenant: str, client_salt: str | None) -> str:
    """The prefix-cache salt of a tenant's request: its own namespace, within which a client's
    cache_salt still separates further. (A fleet router hashes prompts with it too.)"""
    return f"tenant:{tenant}" if client_salt is None else f"tenant:{tenant}\x00{client_salt}"


@dataclass(frozen=True)
class Tenant:
    name: str
    keys_sha256: tuple[str, ...]
    priority: int = 0
    slo_class: str | None = None
    slo: SLOTarget | None = None  # the class's targets (best effort when the class has none)
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent_requests: int | None = None
    max_tokens: int | None = None
    models: tuple[str, ...] | None = None  # None: every model and tier

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models


@dataclass(frozen=True)
class TenantsConfig:
    tenants: tuple[Tenant, ...]
    slo_classes: dict[str, SLOTarget]


def load_tenants(path: str) -> TenantsConfig:
    """A tenants.yaml file, validated; ValueError naming the file and the field at fault."""
    from tokenmill.config import load_yaml_file

    doc = load_yaml_file(path, "--tenants")
    try:
        return parse_tenants(doc)
    except ValueError as e:
        raise ValueError(f"--tenants {path}: {e}") from None


def parse_tenants(doc: Any) -> TenantsConfig:
    if not isinstance(doc, dict):
        raise ValueError("expected a mapping with `tenants` (and optionally `slo_classes`)")
    unknown = sorted(set(doc) - {"tenants", "slo_classes"}, key=str)
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown key (known: slo_classes, tenants)")
    classes = _slo_classes(doc.get("slo_classes"))
    raw = doc.get("tenants")
    if not isinstance(raw, list) or not raw:
        raise ValueError("tenants: a non-empty list of tenants")
    tenants: list[Tenant] = []
    owner: dict[str, str] = {}  # key hash -> tenant
    for i, t in enumerate(raw):
        tenant = _tenant(t, f"tenants[{i}]", classes)
        if any(x.name == tenant.name for x in tenants):
            raise ValueError(f"tenants[{i}].name: {tenant.name!r} names two tenants")
        for h in tenant.keys_sha256:
            if h in owner:
                raise ValueError(f"tenants[{i}].keys_sha256: {h[:12]}... is also a key of tenant {owner[h]!r} "
                                 f"(each key belongs to one tenant)")
            owner[h] = tenant.name
        tenants.append(tenant)
    return TenantsConfig(tuple(tenants), classes)


def _slo_classes(raw: Any) -> dict[str, SLOTarget]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError("slo_classes: a mapping of class name -> {ttft_ms, tpot_ms}")
    classes = {}
    for name, targets in raw.items():
        where = f"slo_classes.{name}"
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"{where}: a class name is letters, digits, '.', '_' or '-'")
        targets = {} if targets is None else targets
        if not isinstance(targets, dict):
            raise ValueError(f"{where}: expected {{ttft_ms, tpot_ms}} (or {{}} for best effort)")
        unknown = sorted(set(targets) - {"ttft_ms", "tpot_ms"}, key=str)
        if unknown:
            raise ValueError(f"{where}.{unknown[0]}: unknown key (known: ttft_ms, tpot_ms)")
        classes[name] = SLOTarget.from_dict(targets, slo_class=name, param=where)
    return classes


def _tenant(t: Any, where: str, classes: dict[str, SLOTarget]) -> Tenant:
    if not isinstance(t, dict):
        raise ValueError(f"{where}: expected a mapping with name and keys_sha256")
    name = t.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"{where}.name: required; letters, digits, '.', '_' or '-' (at most 64), got {name!r}")
    where = f"{where} ({name})"
    unknown = sorted(set(t) - set(TENANT_KEYS), key=str)
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown key (known: {', '.join(TENANT_KEYS)})")
    keys = t.get("keys_sha256")
    if not isinstance(keys, list) or not keys:
        raise ValueError(f"{where}.keys_sha256: a non-empty list of hex sha256 digests of API keys "
                         f"(`tokenmill tenants hash-key` prints one)")
    hashes = []
    for j, h in enumerate(keys):
        if not isinstance(h, str) or not _SHA256.fullmatch(h.strip().lower()):
            raise ValueError(f"{where}.keys_sha256[{j}]: not a sha256 digest (64 hex digits); store the hash of "
                             f"the key (`tokenmill tenants hash-key`), never the key itself")
        h = h.strip().lower()
        if h in hashes:
            raise ValueError(f"{where}.keys_sha256[{j}]: listed twice")
        hashes.append(h)
    priority = t.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ValueError(f"{where}.priority: an integer (lower runs first), got {priority!r}")
    cls = t.get("slo_class")
    if cls is not None and (not isinstance(cls, str) or cls not in classes):
        known = ", ".join(classes) or "none are defined"
        raise ValueError(f"{where}.slo_class: {cls!r} is not a class in slo_classes ({known})")
    limits = {k: _positive(t.get(k), f"{where}.{k}")
              for k in ("requests_per_minute", "tokens_per_minute", "max_concurrent_requests", "max_tokens")}
    models = t.get("models")
    if models is not None:
        if (not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models)):
            raise ValueError(f"{where}.models: a non-empty list of model or tier names (leave it out for all)")
        if len(set(models)) != len(models):
            raise ValueError(f"{where}.models: a name is listed twice")
        models = tuple(models)
    return Tenant(name, tuple(hashes), priority, cls, classes.get(cls) if cls else None, models=models, **limits)


def _positive(v: Any, where: str) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{where}: a positive integer (leave it out for no limit), got {v!r}")
    return v


# -- the limiter ----------------------------------------------------------------------------------


class LimitExceeded(Exception):
    """A tenant's limit refused a request: a 429 with Retry-After (None: not known in advance)."""

    def __init__(self, tenant: str, limit: str, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.tenant, self.limit, self.message, self.retry_after = tenant, limit, message, retry_after

    @property
    def retry_after_s(self) -> int:
        """Retry-After: whole seconds, rounded up, at least 1."""
        return _seconds(self.retry_after) if self.retry_after is not None else 1


def _seconds(wait: float) -> int:
    return max(1, math.ceil(wait - 1e-9))


class RequestTooLarge(ValueError):
    """A request that could never fit in its tenant's tokens_per_minute: a 400, as waiting cannot help."""


class _Entry:
    __slots__ = ("t", "amount", "live")

    def __init__(self, t: float, amount: int) -> None:
        self.t, self.amount, self.live = t, amount, True


class SlidingWindow:
    """Amounts recorded over the last `span` seconds (an entry at t counts while now < t + span).
    An entry's amount may change later (a reservation settled); it stays at its time."""

    def __init__(self, span: float = WINDOW_S) -> None:
        self.span = span
        self.total = 0
        self._entries: deque[_Entry] = deque()

    def __len__(self) -> int:
        return len(self._entries)

    def prune(self, now: float) -> None:
        while self._entries and self._entries[0].t + self.span <= now:
            e = self._entries.popleft()
            self.total -= e.amount
            e.live = False

    def add(self, now: float, amount: int) -> _Entry:
        e = _Entry(now, amount)
        self._entries.append(e)
        self.total += amount
        return e

    def remove(self, e: _Entry) -> None:
        """Takes an entry out (a request refused after all): refused requests must not pile up in
        the window, where `wait` walks them on every refusal. Searched from the newest end,
        where such an entry almost always is."""
        if not e.live:
            return
        e.live = False
        self.total -= e.amount
        for i in range(len(self._entries) - 1, -1, -1):
            if self._entries[i] is e:
                del self._entries[i]
                return

    def set(self, e: _Entry, amount: int) -> None:
        """Changes an entry's amount; an entry that left the window no longer counts."""
        if e.live:
            self.total += amount - e.amount
            e.amount = amount

    def wait(self, now: float, need: int, limit: int) -> float:
        """Seconds until `need` more fits under `limit` as the entries now in the window leave it
        (0: it fits now). The caller makes sure need <= limit, and has pruned at now."""
        excess = self.total + need - limit
        if excess <= 0:
            return 0.0
        for e in self._entries:
            excess -= e.amount
            if excess <= 0:
                return e.t + self.span - now
        return self.span  # only when need > limit; callers refuse that first


class _TenantState:
    def __init__(self, tenant: Tenant) -> None:
        self.tenant = tenant
        self.requests = SlidingWindow()
        self.tokens = SlidingWindow()
        self.in_flight = 0


class Admission:
    """One admitted request of a tenant: its slot (concurrency), its place in the requests window
    and its token reservation. `release` (idempotent) ends it; the server calls it on every path."""

    def __init__(self, limits: Tenants, state: _TenantState, request_entry: _Entry | None) -> None:
        self.tenant = state.tenant
        self._limits = limits
        self._state = state
        self._request_entry = request_entry
        self._token_entry: _Entry | None = None
        self.reserved = 0  # tokens reserved at admission (prompt + the most it may generate)
        self.prompt_tokens = 0
        self._generated: dict[str, int] = {}  # engine request id -> tokens generated (latest output)
        self._counted: set[str] = set()  # ids whose output counts (not a scored prompt's dropped token)
        self._rids: set[str] = set()  # ids still tracked (not finished)
        self.released = False

    @property
    def used(self) -> int:
        """Tokens used so far: the prompts plus every output token of its engine requests."""
        return self.prompt_tokens + sum(n for rid, n in self._generated.items() if rid in self._counted)

    def reserve(self, prompt_tokens: int, need: int) -> None:
        """Reserves `need` tokens (prompt_tokens of them the prompt's) in the tokens window, or
        raises LimitExceeded / RequestTooLarge; nothing is reserved twice."""
        self._limits._reserve(self, prompt_tokens, need)

    def track(self, request_ids: Iterable[str], counts_output: bool = True) -> None:
        """Engine requests whose outputs are this admission's real usage."""
        if self._token_entry is None:
            return
        for rid in request_ids:
            self._rids.add(rid)
            self._generated.setdefault(rid, 0)
            if counts_output:
                self._counted.add(rid)
            self._limits._by_rid[rid] = self

    def add_prompt_tokens(self, n: int) -> None:
        """Prompts the admission runs again beyond the reserved ones (a cascade's escalation to its
        strong model): counted as they are processed, past the reservation if need be."""
        if self._token_entry is not None:
            self.prompt_tokens += n
            self._settle()

    def untrack(self, request_ids: Iterable[str]) -> None:
        for rid in request_ids:
            self._forget(rid)
            self._generated.pop(rid, None)
            self._counted.discard(rid)

    def cancel_reservation(self) -> None:
        """The engine refused the request: nothing was used."""
        if self._token_entry is not None:
            self._state.tokens.remove(self._token_entry)
            self.untrack(list(self._rids))
            self._token_entry = None

    def refund_request(self) -> None:
        """Takes the request out of the requests window (refused by tokens_per_minute: not admitted)."""
        if self._request_entry is not None:
            self._state.requests.remove(self._request_entry)
            self._request_entry = None

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self._state.in_flight -= 1
        self._settle()
        if self._token_entry is None or not self._token_entry.live:
            self.untrack(list(self._rids))

    def _observe(self, out: RequestOutput) -> None:
        self._generated[out.request_id] = sum(len(c.token_ids) for c in out.outputs)
        if out.finished:
            self._forget(out.request_id)
        self._settle()

    def _forget(self, rid: str) -> None:
        self._rids.discard(rid)
        if self._limits._by_rid.get(rid) is self:
            del self._limits._by_rid[rid]

    def _settle(self) -> None:
        """While the request runs its entry holds the reservation (or more, should it use more);
        once it ended, what it used."""
        if self._token_entry is not None:
            used = self.used
            self._state.tokens.set(self._token_entry, used if self.released else max(self.reserved, used))


class Tenants:
    """The tenants of a server and their limiter state (on the event loop)."""

    def __init__(self, config: TenantsConfig, clock: Callable[[], float] = time.monotonic,
                 on_reject: Callable[[str, str], None] | None = None) -> None:
        self.config = config
        self.clock = clock
        self.on_reject = on_reject  # (tenant, limit): metrics
        self.states = {t.name: _TenantState(t) for t in config.tenants}
        self._keys = [(bytes.fromhex(h), t) for t in config.tenants for h in t.keys_sha256]
        self._by_rid: dict[str, Admission] = {}

    def __iter__(self):
        return iter(self.config.tenants)

    def authenticate(self, authorization: str | None) -> Tenant | None:
        """The tenant whose key the `Authorization: Bearer KEY` header carries, or None. The key's
        sha256 is compared with every stored hash in constant time, all of them every time."""
        if not authorization:
            return None
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return None
        digest = hashlib.sha256(key.strip().encode("utf-8")).digest()
        found = None
        for stored, tenant in self._keys:
            if hmac.compare_digest(digest, stored) and found is None:
                found = tenant
        return found

    def in_flight(self) -> dict[str, int]:
        return {name: s.in_flight for name, s in self.states.items()}

    def admit(self, tenant: Tenant) -> Admission:
        """Checks the tenant's concurrency and requests_per_minute and takes a slot in both, or
        raises LimitExceeded. Synchronous: nothing runs between the checks and the taking."""
        s = self.states[tenant.name]
        now = self.clock()
        if tenant.max_concurrent_requests is not None and s.in_flight >= tenant.max_concurrent_requests:
            self._refuse(tenant, "concurrent_requests",
                         f"tenant {tenant.name}: max_concurrent_requests limit {tenant.max_concurrent_requests} "
                         f"reached; retry when one of its requests has finished", None)
        entry = None
        if tenant.requests_per_minute is not None:
            s.requests.prune(now)
            wait = s.requests.wait(now, 1, tenant.requests_per_minute)
            if wait > 0:
                self._refuse(tenant, "requests_per_minute",
                             f"tenant {tenant.name}: requests_per_minute limit {tenant.requests_per_minute} reached; "
                             f"retry in {_seconds(wait)} s", wait)
            entry = s.requests.add(now, 1)
        s.in_flight += 1
        return Admission(self, s, entry)

    def _reserve(self, adm: Admission, prompt_tokens: int, need: int) -> None:
        tenant, s = adm.tenant, adm._state
        limit = tenant.tokens_per_minute
        if limit is None or adm._token_entry is not None or adm.released:
            return
        if need > limit:
            if self.on_reject is not None:
                self.on_reject(tenant.name, "tokens_per_minute")
            raise RequestTooLarge(
                f"max_tokens: tenant {tenant.name}: this request may use up to {need} tokens (its prompt's "
                f"{prompt_tokens} and at most {need - prompt_tokens} generated), more than its tokens_per_minute "
                f"limit {limit}; lower max_tokens")
        now = self.clock()
        s.tokens.prune(now)
        self._forget_expired(s)
        wait = s.tokens.wait(now, need, limit)
        if wait > 0:
            adm.refund_request()  # not admitted after all: it does not count as a request either
            self._refuse(tenant, "tokens_per_minute",
                         f"tenant {tenant.name}: tokens_per_minute limit {limit} reached ({s.tokens.total} used or "
                         f"reserved in the last {WINDOW_S:g} s, this request may use {need}); "
                         f"retry in {_seconds(wait)} s", wait)
        adm._token_entry = s.tokens.add(now, need)
        adm.reserved, adm.prompt_tokens = need, prompt_tokens

    def _forget_expired(self, s: _TenantState) -> None:
        """Ended requests whose reservation left the window need no more tracking (an engine that
        never sent their last output must not keep them forever)."""
        stale = {a for a in self._by_rid.values() if a._state is s and a.released and
                 (a._token_entry is None or not a._token_entry.live)}
        for a in stale:
            a.untrack(list(a._rids))

    def _refuse(self, tenant: Tenant, limit: str, message: str, wait: float | None) -> None:
        if self.on_reject is not None:
            self.on_reject(tenant.name, limit)
        raise LimitExceeded(tenant.name, limit, message, wait)

    def observe(self, out: RequestOutput) -> None:
        """Every engine output (on the event loop): an admission's real token count."""
        adm = self._by_rid.get(out.request_id)
        if adm is not None:
            adm._observe(out)
