"""A cascade tier's requests: the small model answers first; the strong one when it is unsure.

`CascadeEngine` stands in for the AsyncEngine of the context a route gets for a cascade tier, so
the routes run unchanged: `add_requests` starts the small model (asking it for the chosen
tokens' logprobs), and `stream` yields nothing until the decision. A CascadeMonitor per choice
follows the small model's tokens; as soon as one escalates (or when the answer ends below the
threshold) the small model's requests are aborted and the same requests go to the strong model,
whose outputs stream as they come. An answer that stands is yielded whole. Either way the
response's `model` is the model that answered, and its `routing` object says why.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from tokenmill.engine.llm_engine import check_length
from tokenmill.engine.slo import SLOAdmissionError
from tokenmill.ops.energy import sum_compute
from tokenmill.outputs import RequestOutput
from tokenmill.routing import CascadeMonitor, CascadePolicy
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.async_engine import EngineStoppedError, QueueFullError
from tokenmill.server.errors import APIError
from tokenmill.server.pool import PoolError

if TYPE_CHECKING:
    from fastapi import Request

    from tokenmill.server.context import ServerContext
    from tokenmill.server.gateway import Gateway

ESCALATED = ":escalated"  # the suffix of the strong model's request ids (its logs, its tenant tracking)


class CascadeGroup:
    """The group a route holds: the small model's, then (escalated) the strong model's."""

    def __init__(self, request_ids: list[str], small_group: Any) -> None:
        self.request_ids = list(request_ids)
        self.small_group = small_group
        self.strong_group: Any = None
        self.strong_engine: Any = None

    @property
    def pending(self) -> set[str]:
        g = self.strong_group if self.strong_group is not None else self.small_group
        return g.pending


class CascadeEngine:
    def __init__(self, gateway: Gateway, tier: str, policy: CascadePolicy, small: ServerContext,
                 extras: dict[str, Any], request: Request | None = None) -> None:
        self.gateway = gateway
        self.tier = tier
        self.policy = policy
        self.small = small
        self.engine = small.engine.engine  # the small model's LLMEngine (routes read its limits)
        self.extras = extras  # the request's response extras (gateway.EXTRAS)
        self.request = request  # the client's, whose leaving stops a wait for the strong model
        self._requests: list[tuple[str, dict[str, Any], SamplingParams]] = []
        self._priority = 0
        self._arrival: float | None = None

    @property
    def is_running(self) -> bool:
        return self.small.engine.is_running

    async def add_requests(self, requests: list[tuple[str, dict[str, Any], SamplingParams]], priority: int = 0,
                           arrival_time: float | None = None, group: Any = None) -> CascadeGroup:
        if group is not None:
            raise ValueError(f"test_time_compute: not available on the cascade tier `{self.tier}`")
        # The strong model may have a shorter context than the small one. Such a tier is allowed (each
        # model alone keeps its own context), so a request the strong model could not take is refused
        # here, before the small model runs, not only once it has escalated: the tier's limit is the
        # lower of the two. (Its max_model_len is known from its config while it is on disk.)
        strong_len = self.gateway.pool.entries[self.policy.strong].max_model_len
        if strong_len is not None:
            for _, prompt, params in requests:
                try:
                    check_length(len(prompt["prompt_token_ids"]), params, strong_len)
                except ValueError as e:
                    raise ValueError(f"{e} (of `{self.policy.strong}`, the strong model of the cascade tier "
                                     f"`{self.tier}`)") from None
        self._requests, self._priority, self._arrival = list(requests), priority, arrival_time
        small_reqs = []
        for rid, prompt, params in requests:
            p = copy.copy(params)
            p.logprobs = max(params.logprobs or 0, 0)  # the chosen tokens' logprobs decide
            small_reqs.append((rid, prompt, p))
        g = await self.small.engine.add_requests(small_reqs, priority=priority, arrival_time=arrival_time)
        return CascadeGroup([r[0] for r in requests], g)

    async def stream(self, cg: CascadeGroup) -> AsyncIterator[list[RequestOutput]]:
        try:
            async for batch in self._run(cg):
                yield batch
        finally:
            self.release(cg)

    async def _run(self, cg: CascadeGroup) -> AsyncIterator[list[RequestOutput]]:
        monitors: dict[tuple[str, int], CascadeMonitor] = {}
        latest: dict[str, RequestOutput] = {}
        escalate = False
        async for batch in self.small.engine.stream(cg.small_group):
            for out in batch:
                if out.error is not None:
                    yield [out]
                    return
                latest[out.request_id] = out
                for c in out.outputs:
                    m = monitors.setdefault((out.request_id, c.index), CascadeMonitor(self.policy))
                    seen = len(m.logprobs)
                    new = [e[t].logprob for t, e in zip(c.token_ids[seen:], (c.logprobs or [])[seen:])]
                    escalate = m.observe(new) or escalate
            if escalate:
                break
        decisions = [m.finish() for m in monitors.values()]
        if not escalate:
            escalate = not decisions or any(account["escalated"] for _, account in decisions)
        # The account of the least confident choice speaks for the request.
        account = min((a for _, a in decisions), default={"confidence": None},
                      key=lambda a: float("inf") if a["confidence"] is None else a["confidence"])
        routing = {"tier": self.tier, "policy": "cascade", "small_model": self.policy.small,
                   "strong_model": self.policy.strong, "escalated": escalate, "metric": self.policy.metric,
                   "confidence": account.get("confidence"), "threshold": self.policy.threshold,
                   "small_tokens": sum(len(m.logprobs) for m in monitors.values()),
                   "escalated_at_token": account.get("escalated_at_token")}
        if self.policy.metric == "surprise":
            routing["margin"] = self.policy.margin
        if not escalate:
            routing["model"] = self.policy.small
            self.extras["model"], self.extras["routing"] = self.policy.small, routing
            yield list(latest.values())
            return
        for rid in cg.small_group.request_ids:  # (not a client's abort in the small model's metrics)
            self.small.metrics.escalated(rid)
        self.small.engine.release(cg.small_group)  # stop the small model's answer now
        routing["model"] = self.policy.strong
        self.extras["model"], self.extras["routing"] = self.policy.strong, routing
        pool = self.gateway.pool
        try:
            strong, swap = await self.gateway.pool_acquire(self.policy.strong, self.request)
        except PoolError as e:
            yield self._failed(cg, str(e), e.status)  # (503: may come back; 500: can never fit)
            return
        except APIError:  # the client has gone away: bring the strong model back for no one
            return
        # The strong model's requests get ids of their own: the small model's last outputs (its
        # abort's) may still be on their way, and a tenant counts each model's tokens (below).
        # Admitted already: an SLO admission now would count its budget from the arrival, which the
        # small model's tokens spent, and refuse the request half-way.
        requests = [(rid + ESCALATED, {**prompt, "slo_admitted": True}, params)
                    for rid, prompt, params in self._requests]
        rids = {r[0]: orig[0] for r, orig in zip(requests, self._requests)}  # the strong id -> the route's
        # The tenant's tokens count both models' work, as usage.compute does: the small model's
        # prompts and tokens (its outputs, tracked already), then the strong model's.
        adm = getattr(cg, "admission", None)  # (ServerContext.submit's, when the tenant has a token limit)
        if adm is not None:
            adm.track(list(rids))
        try:
            if swap is not None:
                routing["swap"] = swap
            try:
                cg.strong_group = await strong.engine.add_requests(requests, priority=self._priority,
                                                                   arrival_time=self._arrival)
            except ValueError as e:  # the strong model's own limits (a shorter max_model_len)
                yield self._failed(cg, f"escalated to `{self.policy.strong}`: {e}", 400)
                return
            except (QueueFullError, EngineStoppedError, SLOAdmissionError) as e:
                # (an slo refusal too: the small model took the request, the answer is the strong one's)
                yield self._failed(cg, f"escalated to `{self.policy.strong}`: {e}", 503)
                return
            cg.strong_engine = strong.engine
        finally:
            pool.release(self.policy.strong)
            if adm is not None and cg.strong_engine is None:
                adm.untrack(list(rids))  # nothing of it ran
        if adm is not None:
            adm.add_prompt_tokens(sum(len(prompt["prompt_token_ids"]) for _, prompt, _ in requests))
        # The small model's work counts in the request's compute too (usage.compute sums both models).
        spent = {rid: out.compute for rid, out in latest.items() if out.compute is not None}
        async for batch in strong.engine.stream(cg.strong_group):
            outs = []
            for out in batch:
                rid = rids[out.request_id]
                compute = sum_compute([spent[rid], out.compute]) if rid in spent else out.compute
                outs.append(dataclasses.replace(out, request_id=rid, compute=compute))
            yield outs

    def _failed(self, cg: CascadeGroup, message: str, status: int) -> list[RequestOutput]:
        return [RequestOutput(rid, None, [], None, [], finished=True, error=message, error_status=status)
                for rid in cg.request_ids]

    def release(self, cg: CascadeGroup) -> None:
        self.small.engine.release(cg.small_group)
        if cg.strong_group is not None:
            cg.strong_engine.release(cg.strong_group)

    def abort(self, request_id: str) -> None:
        self.small.engine.abort(request_id)
