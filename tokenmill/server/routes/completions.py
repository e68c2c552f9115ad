"""/v1/completions: text or token-id prompts (one or many), streamed or not, with echo,
logprobs, scoring (max_tokens 0 with echo) and vLLM's prompt_logprobs."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from tokenmill.ops.energy import sum_compute
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import MAX_LOGPROBS
from tokenmill.server.errors import APIError, bad_request, error_response
from tokenmill.server.gateway import Gateway
from tokenmill.server.protocol import CompletionRequest
from tokenmill.server.routes import body
from tokenmill.server.streaming import (
    SSE_DONE,
    ChoiceState,
    StreamFailed,
    collect_finished,
    finish_reason,
    sse,
    sse_response,
    unless_disconnected,
    usage,
)
from tokenmill.server.ttc import ttc_params, ttc_response


def shifted(lp: dict[str, Any] | None, by: int) -> dict[str, Any] | None:
    return None if lp is None else {**lp, "text_offset": [by + o for o in lp["text_offset"]]}


def joined(a: dict[str, Any] | None, b: dict[str, Any] | None, by: int) -> dict[str, Any] | None:
    """Two completion logprobs objects as one (the prompt's, then the completion's, its offsets
    moved past the prompt's text, `by` characters)."""
    if a is None or b is None:
        return a or b
    b = shifted(b, by)
    return {"tokens": a["tokens"] + b["tokens"], "token_logprobs": a["token_logprobs"] + b["token_logprobs"],
            "top_logprobs": a["top_logprobs"] + b["top_logprobs"], "text_offset": a["text_offset"] + b["text_offset"]}


def _checked(req: CompletionRequest) -> None:
    """The body's own checks: made before the model is waited for (Gateway.open_request)."""
    if req.best_of is not None and req.best_of != req.n:
        raise APIError(400, "best_of: only best_of == n is supported", param="best_of")
    if req.suffix:
        raise APIError(400, "suffix: not supported", param="suffix")
    if req.truncate_prompt_tokens is not None and req.echo:  # (what would echo give: the whole prompt?)
        raise APIError(400, "truncate_prompt_tokens: not with echo", param="truncate_prompt_tokens")
    if req.max_tokens == 0 and not req.echo:
        raise APIError(400, "max_tokens: 0 is only allowed with echo (scoring the prompt)", param="max_tokens")
    if req.stream and req.prompt_logprobs is not None:
        raise APIError(400, "prompt_logprobs: not available when stream is true", param="prompt_logprobs")
    if req.prompt_logprobs is not None and not 0 <= req.prompt_logprobs <= MAX_LOGPROBS:
        # Checked alone: with echo the engine gets the larger of it and logprobs.
        raise APIError(400, f"prompt_logprobs: must be an integer in [0, {MAX_LOGPROBS}], "
                       f"got {req.prompt_logprobs}", param="prompt_logprobs")
    ttc_params(req)
    try:  # (again once the model is there, with its vocabulary)
        req.sampling_params(1 if req.max_tokens == 0 else req.max_tokens, req.logprobs).validate()
    except ValueError as e:
        raise bad_request(e) from None


def register(app: FastAPI, gw: Gateway) -> None:
    @app.post("/v1/completions", openapi_extra=body(CompletionRequest))
    @gw.route
    async def completions(request: Request) -> Response:
        ctx, req, arrival = await gw.open_request(request, CompletionRequest, generation=True, precheck=_checked)
        score_only = req.max_tokens == 0
        tp = ttc_params(req)
        prompts = await ctx.prompts(req.prompt)
        if tp is not None and len(prompts) != 1:
            raise APIError(400, "prompt: test_time_compute takes one prompt", param="prompt")
        # echo with logprobs scores the prompt too: its positions come from the engine's prompt logprobs.
        echo_lp = req.echo and req.logprobs is not None
        want_plp = max(req.logprobs if echo_lp else -1, -1 if req.prompt_logprobs is None else req.prompt_logprobs)
        # max_tokens 0 (score only) generates one token, from the prefill's last logits, and drops it.
        params = ctx.sampling_params(req, 1 if score_only else req.max_tokens, req.logprobs,
                                     want_plp if want_plp >= 0 else None)
        params._prompt_only = score_only
        cut = [ctx.llm_engine.truncate_prompt(ids, params, t) for t, ids in prompts]
        prompts = [(t, ids) for ids, t in cut]
        if not score_only:
            await ctx.constrain(params, ctx.constraint(req))
        ctx.check_resume(req, params, len(prompts))
        if req.resume_token_ids and echo_lp:
            raise APIError(400, "resume_token_ids: not with echo and logprobs", param="resume_token_ids")
        as_ids = req.return_tokens_as_token_ids
        rid = f"cmpl-{uuid.uuid4().hex}"
        if tp is not None:
            (t, ids), = prompts
            return await ttc_response(ctx, request, req, False, rid, ctx.prompt_dict(t, ids, req.cache_salt),
                                      params, tp, arrival)
        reqs = [(f"{rid}-{i}", ctx.prompt_dict(t, ids, req.cache_salt, req.resume_token_ids), params)
                for i, (t, ids) in enumerate(prompts)]
        group = await ctx.submit(reqs, req.priority, arrival)
        # Choice index = prompt index * n + sample index, as in the OpenAI API.
        index = {r[0]: i for i, r in enumerate(reqs)}
        prompt_tokens = sum(len(ids) for _, ids in prompts)
        name, engine, tokenizer = ctx.name, ctx.engine, ctx.tokenizer

        echoed: dict[int, str] = {}

        def prefix(i: int) -> str:
            if not req.echo:
                return ""
            if i not in echoed:  # (decoded once: every streamed chunk's offsets are moved past it)
                text, ids = prompts[i]
                echoed[i] = text if text is not None else (tokenizer.decode(ids) if tokenizer is not None else "")
            return echoed[i]

        def prompt_lp(i: int, out: RequestOutput) -> dict[str, Any]:
            return ctx.echo_logprobs(prompts[i][1], out.prompt_logprobs or [], req.logprobs, as_ids, prefix(i),
                                     prompts[i][0] is not None)

        if req.stream and not score_only:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            # (with include_usage only, as vLLM reads the pair)
            continuous = include_usage and bool(req.stream_options and req.stream_options.continuous_usage_stats)

            async def events() -> AsyncIterator[str]:
                states: dict[tuple[str, int], ChoiceState] = {}
                cached: dict[str, int] = {}
                computes: dict[str, Any] = {}
                offsets: dict[tuple[str, int], Any] = {}  # each choice's TextOffsets
                ids_sent: set[tuple[str, int]] = set()  # choices whose prompt_token_ids went out
                if req.resume_token_ids:  # the first server streamed this much: start where it stopped
                    states[(reqs[0][0], 0)], _ = ctx.resumed_state(prompts[0][1], req.resume_token_ids, params)
                try:
                    async for out, c, d in ctx.choice_deltas(group, params, states, cached, computes):
                        pi = index[out.request_id]
                        lp = None
                        if req.logprobs is not None:
                            key = (out.request_id, c.index)
                            if key not in offsets:
                                offsets[key] = ctx.text_offsets(prompts[pi][1], params.skip_special_tokens)
                            at = offsets[key].take(c.token_ids, *d.tokens, d.text_start + len(d.text))
                            lp = ctx.completion_logprobs(c, *d.tokens, req.logprobs, at, as_ids)
                        if echo_lp and d.first:
                            lp = joined(prompt_lp(pi, out), lp, len(prefix(pi)))
                        elif echo_lp:  # later chunks: offsets continue after the echoed prompt
                            lp = shifted(lp, len(prefix(pi)))
                        choice = {
                            "index": pi * req.n + c.index, "text": (prefix(pi) if d.first else "") + d.text,
                            "logprobs": lp, "finish_reason": d.finish_reason,
                            "stop_reason": c.stop_reason if d.finish_reason else None,
                        }
                        if req.return_token_ids:
                            choice["token_ids"] = c.token_ids[d.tokens[0]:d.tokens[1]]
                            if (out.request_id, c.index) not in ids_sent:  # (a resumed stream's too)
                                ids_sent.add((out.request_id, c.index))
                                choice["prompt_token_ids"] = prompts[pi][1]
                        body = {"id": rid, "object": "text_completion", "created": int(arrival), "model": name,
                                "choices": [choice]}
                        if continuous:  # (vLLM's: the choice's tokens so far on every chunk)
                            n, p = states[(out.request_id, c.index)].tokens, len(prompts[pi][1])
                            body["usage"] = {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}
                        yield sse(body)
                except StreamFailed as e:
                    for event in ctx.stream_failed(e):
                        yield event
                    return
                if include_usage:
                    n_out = sum(st.tokens for st in states.values())
                    yield sse({"id": rid, "object": "text_completion", "created": int(arrival), "model": name,
                               "choices": [], "usage": usage(prompt_tokens, n_out, sum(cached.values()),
                                                             sum_compute(computes.values()))})
                yield SSE_DONE

            return sse_response(events(), lambda: engine.release(group))

        async def final_choices() -> tuple[list[dict[str, Any]], int, int, dict[str, Any] | None] | Response:
            final = await collect_finished(engine, group)
            choices = []
            n_out = n_cached = 0
            for r, _ in enumerate(reqs):
                out = final[reqs[r][0]]
                if out.error is not None:
                    return error_response(ctx.engine_error(out))
                n_cached += out.num_cached_tokens
                for c in out.outputs:
                    n_gen = 0 if score_only else len(c.token_ids)
                    n_out += n_gen
                    lp = None
                    if req.logprobs is not None:
                        at = ctx.text_offsets(prompts[r][1], params.skip_special_tokens).take(
                            c.token_ids, 0, n_gen, len(c.text))
                        lp = ctx.completion_logprobs(c, 0, n_gen, req.logprobs, at, as_ids)
                    choice = {
                        "index": r * req.n + c.index, "text": prefix(r) + ("" if score_only else c.text),
                        "logprobs": joined(prompt_lp(r, out), lp, len(prefix(r))) if echo_lp else lp,
                        "finish_reason": "length" if score_only else finish_reason(c),
                        "stop_reason": None if score_only else c.stop_reason,
                    }
                    if req.return_token_ids:
                        choice["prompt_token_ids"] = prompts[r][1]
                        choice["token_ids"] = [] if score_only else c.token_ids
                    if req.prompt_logprobs is not None:
                        choice["prompt_logprobs"] = ctx.vllm_prompt_logprobs(prompts[r][1], out.prompt_logprobs or [],
                                                                             req.prompt_logprobs)
                    choices.append(choice)
            return choices, n_out, n_cached, sum_compute(final[r[0]].compute for r in reqs)

        if req.stream:  # score only: the whole answer in one chunk per choice
            async def scored_events() -> AsyncIterator[str]:
                result = await final_choices()
                if isinstance(result, Response):
                    yield sse(json.loads(result.body))
                    yield SSE_DONE
                    return
                choices, n_out, n_cached, compute = result
                for ch in choices:
                    yield sse({"id": rid, "object": "text_completion", "created": int(arrival), "model": name,
                               "choices": [ch]})
                if req.stream_options and req.stream_options.include_usage:
                    yield sse({"id": rid, "object": "text_completion", "created": int(arrival), "model": name,
                               "choices": [], "usage": usage(prompt_tokens, n_out, n_cached, compute)})
                yield SSE_DONE

            return sse_response(scored_events(), lambda: engine.release(group))

        async def collect() -> Response:
            result = await final_choices()
            if isinstance(result, Response):
                return result
            choices, n_out, n_cached, compute = result
            return JSONResponse({"id": rid, "object": "text_completion", "created": int(arrival), "model": name,
                                 "choices": choices, "usage": usage(prompt_tokens, n_out, n_cached, compute)})

        return await unless_disconnected(request, collect())
