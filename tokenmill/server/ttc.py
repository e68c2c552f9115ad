"""Test-time compute on the HTTP side: a request's tokenmill.ttc run driven over the async
engine. Every launch of paths joins one request group, so a client that goes away aborts all of
them (and their blocks are freed); pruned or settled paths are aborted one sample at a time."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from tokenmill.sampling_params import SamplingParams
from tokenmill.server.context import ServerContext
from tokenmill.server.errors import APIError, bad_request
from tokenmill.server.streaming import SSE_DONE, StreamFailed, sse, sse_response, unless_disconnected, usage
from tokenmill.ttc import MAX_PATHS, TTCParams, TTCRun


def ttc_params(req: Any) -> TTCParams | None:
    """The request's test_time_compute as TTCParams (None without it); a 400 naming what is wrong,
    including the fields it cannot be combined with."""
    field = req.test_time_compute
    if field is None:
        return None
    for name, bad in (("n", req.n != 1), ("logprobs", bool(getattr(req, "logprobs", None))),
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


def new_run(tp: TTCParams, prompt: dict[str, Any], params: SamplingParams) -> TTCRun:
    try:
        return TTCRun(tp, prompt.get("prompt") or "", len(prompt["prompt_token_ids"]), params.max_tokens)
    except ValueError as e:  # a budget that cannot hold the prompt and one token
        raise bad_request(e) from None


async def run_ttc(ctx: ServerContext, run: TTCRun, rid: str, prompt: dict[str, Any], params: SamplingParams,
                  priority: int, arrival: float) -> TTCRun:
    """Runs every path of one request to the strategy's end; the run holds the winner and the account."""
    engine = ctx.engine
    group = None
    where: dict[tuple[str, int], int] = {}  # (engine request, sample) -> path
    path_at: dict[int, tuple[str, int]] = {}
    seen: dict[int, int] = {}  # path -> logprobs read
    try:
        while True:
            while (launch := run.launch()) is not None:
                lrid = f"{rid}-{run.launches}"
                sp = replace(params, n=len(launch.path_ids), max_tokens=launch.max_tokens,
                             logprobs=0,  # the sampled token's logprob: the paths' confidence
                             seed=None if params.seed is None else params.seed + launch.path_ids[0])
                if group is None:
                    group = await ctx.submit([(lrid, prompt, sp)], priority, arrival)
                else:
                    await engine.add_requests([(lrid, prompt, sp)], priority, arrival, group=group)
                for i, pid in enumerate(launch.path_ids):
                    where[(lrid, i)], path_at[pid] = pid, (lrid, i)
            if run.done:
                return run
            assert group is not None
            if not group.pending:  # cannot happen: a running path's request is pending
                raise APIError(500, "test-time compute: no path is running but the run is not done")
            for out in await group.get():
                if out.error is not None:
                    raise ctx.engine_error(out)
                for c in out.outputs:
                    pid = where[(out.request_id, c.index)]
                    k = seen.get(pid, 0)
                    new = [e[t].logprob for e, t in zip((c.logprobs or [])[k:], c.token_ids[k:])]
                    seen[pid] = k + len(new)
                    run.observe(pid, c.text, c.token_ids, new, c.finish_reason)
            for pid in run.stops():
                engine.abort_seq(*path_at[pid])
    finally:
        if group is not None:
            engine.release(group)  # whatever still runs (stopped paths, a client gone) is aborted


async def ttc_response(ctx: ServerContext, request: Request, req: Any, chat: bool, rid: str, prompt: dict[str, Any],
                       params: SamplingParams, tp: TTCParams, arrival: float) -> Response:
    """The response to a test-time-compute request: the winning path as the one choice (message
    or text), every path's tokens in usage.completion_tokens, the run's account in
    test_time_compute. Streaming sends the role at once and the winner once decided."""
    run = new_run(tp, prompt, params)
    created, name = int(arrival), ctx.name
    obj = "chat.completion" if chat else "text_completion"
    n_prompt = len(prompt["prompt_token_ids"])

    def choice(text: str, reason: str | None, delta: bool) -> dict[str, Any]:
        if not chat:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        body = {"role": "assistant", "content": text}
        return {"index": 0, ("delta" if delta else "message"): body, "logprobs": None, "finish_reason": reason}

    def outcome() -> tuple[str, str, dict[str, Any]]:
        win = run.winner()
        account = run.result()
        return (win.text if win is not None else ""), (win.finish_reason if win is not None else "length"), account

    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        chunk_obj = obj + ".chunk" if chat else obj

        async def events() -> AsyncIterator[str]:
            if chat:
                yield sse({"id": rid, "object": chunk_obj, "created": created, "model": name,
                           "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}]})
            try:
                await run_ttc(ctx, run, rid, prompt, params, req.priority, arrival)
            except APIError as e:
                for event in ctx.stream_failed(StreamFailed(e.message, e.status)):
                    yield event
                return
            text, reason, account = outcome()
            c = choice(text, reason, delta=True)
            if chat:
                c["delta"].pop("role")
            yield sse({"id": rid, "object": chunk_obj, "created": created, "model": name, "choices": [c],
                       "test_time_compute": account})
            if include_usage:
                yield sse({"id": rid, "object": chunk_obj, "created": created, "model": name, "choices": [],
                           "usage": usage(n_prompt, account["tokens"]["generated"], 0)})
            yield SSE_DONE

        return sse_response(events(), lambda: None)  # run_ttc releases its paths however it ends

    async def collect() -> Response:
        await run_ttc(ctx, run, rid, prompt, params, req.priority, arrival)
        text, reason, account = outcome()
        return JSONResponse({"id": rid, "object": obj, "created": created, "model": name,
                             "choices": [choice(text, reason, delta=False)],
                             "usage": usage(n_prompt, account["tokens"]["generated"], 0),
                             "test_time_compute": account})

    return await unless_disconnected(request, collect())
