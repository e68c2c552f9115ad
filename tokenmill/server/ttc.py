"""Test-time compute on the HTTP side: a request's tokenmill.ttc run driven over the async
engine. Every launch of paths joins one request group, so a client that goes away aborts all of
them (and their blocks are freed); pruned or settled paths are aborted one sample at a time."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from tokenmill.engine.slo import SLOTarget
from tokenmill.ops.energy import sum_compute
from tokenmill.outputs import RequestMetrics, RequestOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.context import ServerContext
from tokenmill.server.errors import APIError, bad_request
from tokenmill.server.reasoning import split_reasoning
from tokenmill.server.streaming import SSE_DONE, StreamFailed, sse, sse_response, unless_disconnected, usage
from tokenmill.ttc import MAX_PATHS, TTCParams, TTCRun, launch_params

logger = logging.getLogger("tokenmill.server")
KEEPALIVE_S = 10.0


def ttc_params(req: Any) -> TTCParams | None:
    """The request's test_time_compute as TTCParams (None without it); a 400 naming what is wrong,
    including the fields it cannot be combined with."""
    field = req.test_time_compute
    if field is None:
        return None
    logprobs = getattr(req, "logprobs", None)
    for name, bad in (("n", req.n != 1), ("logprobs", logprobs is not None and logprobs is not False),
                      ("prompt_logprobs", req.prompt_logprobs is not None),
                      ("tools", bool(getattr(req, "tools", None))), ("echo", bool(getattr(req, "echo", False)))):
        if bad:
            raise APIError(400, f"{name}: cannot be combined with test_time_compute (its paths are set by "
                           f"test_time_compute.n, and one answer comes back)", param=name)
    tp = TTCParams.from_dict(field.model_dump())
    try:
        tp.validate(MAX_PATHS)
    except ValueError as e:
        raise bad_request(e) from None
    return tp


class TTCDriver:
    """Runs one request's paths over the async engine. start() makes the first launch (so bad
    input or a full queue is an HTTP error before any stream starts); finish() goes on to the
    strategy's end. Every launch joins one request group: however the request ends (done, an
    error, the client gone), closing it aborts whatever still runs."""

    def __init__(self, ctx: ServerContext, tp: TTCParams, rid: str, prompt: dict[str, Any], params: SamplingParams,
                 priority: int, arrival: float) -> None:
        try:
            self.run = TTCRun(tp, prompt.get("prompt") or "", len(prompt["prompt_token_ids"]), params.max_tokens,
                              ctx.engine.engine.max_model_len)
        except ValueError as e:  # a budget that cannot hold the prompt and one token
            raise bad_request(e) from None
        self.ctx, self.rid, self.prompt, self.params = ctx, rid, prompt, params
        self.priority, self.arrival = priority, arrival
        self.group: Any = None
        self.where: dict[tuple[str, int], int] = {}  # (engine request, sample) -> path
        self.path_at: dict[int, tuple[str, int]] = {}
        self.cached_tokens = 0  # the first launch's prefix-cache hit
        self.computes: dict[str, Any] = {}  # each launch's latest compute account (usage.compute sums them)
        self.first: RequestOutput | None = None  # the first launch's latest output (its timings, targets)
        self.counted = False

    async def _launch(self) -> None:
        run = self.run
        while (launch := run.launch()) is not None:
            lrid = f"{self.rid}-{run.launches}"
            sp = launch_params(self.params, run, launch)
            # Through submit, so that a later launch refused (queue full, shutting down) is the
            # same clear error as the first; later launches join the group and skip the queue
            # limit (their request was admitted).
            # A tenant's tokens are reserved at the first launch for the whole run: every path's most.
            # Every launch is part of one request, which the driver counts once, at its end (_count);
            # later ones were admitted with the first, and their first token is not the request's:
            # no TTFT target of theirs (with the arrival's, long past, they would go before every
            # other request with targets).
            prompt = {**self.prompt, "uncounted": True}
            if self.group is not None:
                prompt["slo_admitted"] = True
                slo = prompt.pop("slo", None)
                if isinstance(slo, SLOTarget) and slo.tpot_s is not None:
                    prompt["slo"] = dataclasses.replace(slo, ttft_s=None)
            self.group = await self.ctx.submit([(lrid, prompt, sp)], self.priority, self.arrival,
                                               group=self.group,
                                               reserve_tokens=self.most_tokens() if self.group is None else None)
            for i, pid in enumerate(launch.path_ids):
                self.where[(lrid, i)], self.path_at[pid] = pid, (lrid, i)

    def most_tokens(self) -> int:
        """The prompt once and the most every path together may generate."""
        run = self.run
        paths = run.p.n * run.max_tokens
        return run.prompt_tokens + (paths if run.budget is None else min(paths, run.budget))

    async def start(self) -> None:
        try:
            await self._launch()
        except BaseException:
            self.close()
            raise

    async def finish(self) -> TTCRun:
        """Runs to the end; the run holds the winner and the account."""
        run, engine = self.run, self.ctx.engine
        reason = "abort"  # (the client gone: cancelled)
        try:
            while True:
                await self._launch()
                if run.done:
                    win = run.winner()
                    reason = win.finish_reason if win is not None and win.finish_reason else "length"
                    return run
                if not self.group.pending:  # cannot happen: an unclosed path's request is pending
                    raise APIError(500, "test-time compute: no path is running but the run is not done")
                for out in await self.group.get():
                    if out.error is not None:
                        raise self.ctx.engine_error(out)
                    if out.compute is not None:
                        self.computes[out.request_id] = out.compute
                    if out.request_id == f"{self.rid}-1":
                        self.first = out
                        self.cached_tokens = max(self.cached_tokens, out.num_cached_tokens)
                        if out.slo_demoted:  # admission made the request best effort: its later launches too
                            self.prompt = {k: v for k, v in self.prompt.items() if k != "slo"}
                    for c in out.outputs:
                        run.observe_output(self.where[(out.request_id, c.index)], c)
                for pid in run.stops():
                    engine.abort_seq(*self.path_at[pid])
        except Exception:
            reason = "error"
            raise
        finally:
            self.close(reason)

    def close(self, reason: str = "abort") -> None:
        if self.group is not None:
            self.ctx.engine.release(self.group)  # whatever still runs (a client gone, an error) is aborted
        self._count(reason)

    def _count(self, reason: str) -> None:
        """The request in the metrics, once: its launches ran uncounted (their tokens were counted as
        they came). Its outcome is the run's (paths the run stopped are not a client's abort); its
        first token and targets the first launch's; its end now (no TPOT: paths run side by side)."""
        first = self.first
        if self.counted or self.group is None:  # (nothing was submitted: a refusal, counted where it is made)
            return
        self.counted = True
        if first is None:  # ended before its first output was read (the client gone at once, an error)
            slo = self.prompt.get("slo")
            first = RequestOutput(self.rid, self.prompt.get("prompt"), self.prompt["prompt_token_ids"], None, [],
                                  finished=True, metrics=RequestMetrics(self.arrival),
                                  tenant=self.prompt.get("tenant"), slo=slo if isinstance(slo, SLOTarget) else None)
        m = dataclasses.replace(first.metrics, finished_time=time.time(), num_generated_tokens=0)
        out = dataclasses.replace(first, request_id=self.rid, outputs=[], metrics=m, finished=True, uncounted=False)
        # (its prompt counts once it had a first token, as a plain request's)
        prompt_tokens = len(self.prompt["prompt_token_ids"]) if m.first_token_time is not None else 0
        self.ctx.metrics.observe_request(out, self.ctx.name, reason, prompt_tokens)


async def ttc_response(ctx: ServerContext, request: Request, req: Any, chat: bool, rid: str, prompt: dict[str, Any],
                       params: SamplingParams, tp: TTCParams, arrival: float) -> Response:
    """The response to a test-time-compute request: the winning path as the one choice (message
    or text), every path's tokens in usage.completion_tokens, the run's account in
    test_time_compute. Streaming sends the role at once and the winner once decided."""
    driver = TTCDriver(ctx, tp, rid, prompt, params, req.priority, arrival)
    await driver.start()
    run = driver.run
    created, name = int(arrival), ctx.name
    obj = "chat.completion" if chat else "text_completion"
    n_prompt = len(prompt["prompt_token_ids"])

    def choice(text: str, reason: str | None, delta: bool) -> dict[str, Any]:
        if not chat:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        body: dict[str, Any] = {"role": "assistant", "content": text}
        if ctx.settings.reasoning_parser is not None:
            body["reasoning"], body["content"] = split_reasoning(ctx.settings.reasoning_parser, text)
            body["reasoning_content"] = body["reasoning"]
        return {"index": 0, ("delta" if delta else "message"): body, "logprobs": None, "finish_reason": reason}

    def outcome() -> tuple[str, str, dict[str, Any]]:
        win = run.winner()
        account = run.result()
        return (win.text if win is not None else ""), (win.finish_reason if win is not None else "length"), account

    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        chunk_obj = obj + ".chunk" if chat else obj

        async def events() -> AsyncIterator[str]:
            task = asyncio.ensure_future(driver.finish())
            try:
                if chat:
                    yield sse({"id": rid, "object": chunk_obj, "created": created, "model": name,
                               "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}]})
                while not task.done():  # paths run silently: a comment now and then keeps proxies patient
                    await asyncio.wait({task}, timeout=KEEPALIVE_S)
                    if not task.done():
                        yield ": keep-alive\n\n"
                task.result()
            except APIError as e:  # (its own status and code, as unstreamed)
                for event in ctx.stream_error(e):
                    yield event
                return
            except Exception as e:  # never a stream cut without an error event
                logger.exception("test-time compute request %s failed", rid)
                for event in ctx.stream_failed(StreamFailed(str(e), 500)):
                    yield event
                return
            finally:
                if not task.done():
                    task.cancel()  # the client went away: finish() closes the group, aborting every path
                driver.close()
            text, reason, account = outcome()
            c = choice(text, reason, delta=True)
            if chat:
                c["delta"].pop("role")
            yield sse({"id": rid, "object": chunk_obj, "created": created, "model": name, "choices": [c],
                       "test_time_compute": account})
            if include_usage:
                yield sse({"id": rid, "object": chunk_obj, "created": created, "model": name, "choices": [],
                           "usage": usage(n_prompt, account["tokens"]["generated"], driver.cached_tokens,
                                          sum_compute(driver.computes.values()))})
            yield SSE_DONE

        return sse_response(events(), driver.close)

    async def collect() -> Response:
        await driver.finish()
        text, reason, account = outcome()
        return JSONResponse({"id": rid, "object": obj, "created": created, "model": name,
                             "choices": [choice(text, reason, delta=False)],
                             "usage": usage(n_prompt, account["tokens"]["generated"], driver.cached_tokens,
                                            sum_compute(driver.computes.values())),
                             "test_time_compute": account})

    return await unless_disconnected(request, collect())
