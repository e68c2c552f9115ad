"""The OpenAI-compatible HTTP API: FastAPI routes over an AsyncEngine.

Every failure a client can cause becomes a 4xx with an OpenAI-style error body; request
bodies are parsed and validated here (strict pydantic models, then the engine's own
checks) before anything reaches the engine, so the engine only ever sees valid requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException

from tokenmill.engine.detokenizer import BYTE_TO_UNICODE, safe_stream_end
from tokenmill.engine.llm_engine import load_tokenizer
from tokenmill.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.async_engine import AsyncEngine, EngineStoppedError, QueueFullError
from tokenmill.server.metrics import CONTENT_TYPE, ServerMetrics
from tokenmill.server.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)

logger = logging.getLogger("tokenmill.server")

# Sequences one HTTP request may start (prompts x n): a small body must not queue millions.
MAX_SEQS_PER_REQUEST = 256


@dataclass
class ServerSettings:
    served_model_name: str
    model_path: str
    max_queue: int | None = None  # waiting sequences beyond which requests get 429
    max_body_bytes: int = 8 * 2**20
    api_key: str | None = None
    retry_after_s: int = 1


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type_ or _ERROR_TYPES.get(status, "invalid_request_error")
        self.code = code
        self.headers = headers


_ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
    429: "rate_limit_error", 500: "server_error", 503: "service_unavailable",
}


def error_body(status: int, message: str, param: str | None = None, type_: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_ or _ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.status, e.message, e.param, e.type, e.code), status_code=e.status,
                        headers=e.headers)


def bad_request(e: ValueError) -> APIError:
    """The engine's ValueErrors start with the parameter at fault: "max_tokens: ..."."""
    msg = str(e)
    head, sep, _ = msg.partition(":")
    param = head if sep and head.replace("_", "").isalnum() else None
    return APIError(400, msg, param=param)


def _validation_error(e: ValidationError) -> APIError:
    def field_path(err: dict) -> str | None:
        # Union members add their type to the location ("stop", "list[str]", 0); keep the field path.
        loc = [str(x) for x in err["loc"]
               if isinstance(x, int) or not (x in _TYPE_TAGS or "[" in str(x) or str(x)[:1].isupper())]
        return ".".join(loc) or None

    errors = e.errors()
    param = field_path(errors[0])
    msg = errors[0]["msg"]
    if sum(field_path(x) == param for x in errors) > 1:
        msg = f"matches none of the accepted types (got {errors[0]['input']!r:.80})"
    return APIError(400, f"{param or 'body'}: {msg}", param=param)


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "dict", "list"}


class BodyLimitMiddleware:
    """Answers 413 before reading a body whose Content-Length is over the limit. Bodies sent
    without a length (chunked) are counted as they are read (see `parse`)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            for k, v in scope.get("headers", []):
                if k == b"content-length" and v.isdigit() and int(v) > self.max_bytes:
                    body = error_body(413, f"request body exceeds {self.max_bytes} bytes", code="request_too_large")
                    return await JSONResponse(body, status_code=413)(scope, receive, send)
        await self.app(scope, receive, send)


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


async def _unless_disconnected(request: Request, work: Awaitable[Response]) -> Response:
    """Runs work; if the client disconnects first, cancels it (which aborts its requests)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watcher.cancel()
        raise
    watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    return Response(status_code=499)  # nobody is listening; nginx's "client closed request"


@dataclass
class _Delta:
    """What one streamed chunk of a choice carries."""

    text: str
    text_start: int  # where `text` starts in the choice's full text
    tokens: tuple[int, int]  # the [start, end) token range it covers
    finish_reason: str | None
    first: bool  # the choice's first chunk


class _ChoiceState:
    """How much of one choice has been streamed."""

    __slots__ = ("text", "tokens", "done")

    def __init__(self) -> None:
        self.text = 0
        self.tokens = 0
        self.done = False

    def advance(self, c: CompletionOutput, params: SamplingParams) -> _Delta | None:
        """The next chunk for this choice, or None when there is nothing new. One chunk per step
        with new tokens, even when their text is held back (a partial character, a possible stop
        string): clients time tokens by chunks."""
        if self.done:
            return None
        end = safe_stream_end(c.text, params.stop or [], c.finished(), self.text)
        ntok = len(c.token_ids)
        reason = _finish_reason(c)
        if end == self.text and reason is None and ntok == self.tokens:
            return None
        delta = _Delta(c.text[self.text:end], self.text, (self.tokens, ntok), reason, self.tokens == 0)
        self.text, self.tokens, self.done = end, ntok, c.finished()
        return delta


class _StreamFailed(Exception):
    pass


def _finish_reason(c: CompletionOutput) -> str | None:
    return c.finish_reason if c.finish_reason in ("stop", "length") else None


_BODIES = (CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest)


def body(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI requestBody of a route that parses `model` itself (to answer with OpenAI-style
    400s rather than FastAPI's 422), so /docs and schema-driven clients see its fields."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def _with_body_schemas(app: FastAPI) -> None:
    """Adds the request models (and the models they use) to the OpenAPI components."""
    default = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = default()
            _, defs = models_json_schema([(m, "validation") for m in _BODIES],
                                         ref_template="#/components/schemas/{model}")
            schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def build_app(engine: AsyncEngine, settings: ServerSettings) -> FastAPI:
    app = FastAPI(title="tokenmill", version="0.1.0", description="OpenAI-compatible LLM inference server")
    _with_body_schemas(app)
    llm_engine = engine.engine
    # The HTTP side gets its own tokenizer instance: the engine thread decodes with the engine's
    # at the same time, and a Rust tokenizer object should not be shared across threads.
    tokenizer = load_tokenizer(llm_engine.config.tokenizer or llm_engine.config.model)
    vocab = llm_engine.model_config.vocab_size
    name = settings.served_model_name
    created = int(time.time())
    metrics = ServerMetrics(name, lambda: engine.stats)
    engine.on_output = metrics.observe
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.draining = False
    tokenize_lock = asyncio.Lock()

    # -- helpers --------------------------------------------------------------------------------
    async def parse(request: Request, model: type[BaseModel]) -> Any:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > settings.max_body_bytes:
                raise APIError(413, f"request body exceeds {settings.max_body_bytes} bytes", code="request_too_large")
            chunks.append(chunk)
        body = b"".join(chunks)
        try:
            json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"malformed JSON body: {e}", code="invalid_json") from None
        except RecursionError:
            raise APIError(400, "malformed JSON body: nested too deeply", code="invalid_json") from None
        try:
            return model.model_validate_json(body)
        except ValidationError as e:
            raise _validation_error(e) from None
        except RecursionError:
            raise APIError(400, "body: nested too deeply", code="invalid_json") from None

    def check_auth(request: Request) -> None:
        if settings.api_key and request.headers.get("authorization") != f"Bearer {settings.api_key}":
            raise APIError(401, "invalid or missing API key", code="invalid_api_key")

    def check_model(model: str | None) -> None:
        if model is not None and model != name:
            raise APIError(404, f"The model `{model}` does not exist; this server serves `{name}`.", param="model",
                           code="model_not_found")

    def check_admitting() -> None:
        if app.state.draining:
            raise APIError(503, "the server is shutting down", headers={"Retry-After": "5"})

    def encode_now(text: str, add_special_tokens: bool = True) -> list[int]:
        if tokenizer is None:
            raise APIError(400, "prompt: this model has no tokenizer; send token ids", param="prompt")
        return tokenizer.encode(text, add_special_tokens=add_special_tokens)

    async def encode(text: str, add_special_tokens: bool = True) -> list[int]:
        # Long texts take milliseconds to tokenize: do that off the event loop, one at a time
        # (and never while a short one runs on the loop, so the tokenizer has one user at a time).
        if len(text) < 4096 and not tokenize_lock.locked():
            return encode_now(text, add_special_tokens)
        async with tokenize_lock:
            return await asyncio.to_thread(encode_now, text, add_special_tokens)

    def chat_prompt(messages: list[ChatMessage], add_generation_prompt: bool) -> str:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise APIError(400, "messages: this model's tokenizer has no chat template; use /v1/completions",
                           param="messages")
        convo = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in messages]
        try:
            return tokenizer.apply_chat_template(convo, add_generation_prompt=add_generation_prompt, tokenize=False)
        except Exception as e:  # a template may raise on role orders it does not accept
            raise APIError(400, f"messages: the chat template rejected the conversation: {e}",
                           param="messages") from None

    def token_bytes(tid: int, s: str) -> list[int]:
        """The token's own bytes: for a piece of a UTF-8 character, not the encoding of U+FFFD."""
        if tokenizer is None or "\ufffd" not in tokenizer.decode([tid]):
            return list(s.encode("utf-8"))
        return list(_raw_token_bytes(s))

    def token_str(tid: int, as_id: bool = False) -> str:
        if as_id or tokenizer is None:
            return f"token_id:{tid}"
        s = tokenizer.decode([tid])
        # A token holding part of a UTF-8 character decodes to U+FFFD; its vocabulary string is
        # unique, so top_logprobs entries do not collide.
        return tokenizer.convert_ids_to_tokens(tid) if "\ufffd" in s else s

    async def submit(requests: list[tuple[str, dict, SamplingParams]], priority: int, arrival: float):
        try:
            requests[0][2].validate(vocab)  # every prompt shares these params; n is checked before counting
        except ValueError as e:
            raise bad_request(e) from None
        seqs = sum(r[2].n for r in requests)
        if seqs > MAX_SEQS_PER_REQUEST:
            raise APIError(400, f"prompt: {len(requests)} prompts x n={requests[0][2].n} = {seqs} sequences; "
                           f"at most {MAX_SEQS_PER_REQUEST} per request", param="prompt")
        try:
            return await engine.add_requests(requests, priority=priority, arrival_time=arrival)
        except ValueError as e:
            raise bad_request(e) from None
        except QueueFullError as e:
            raise APIError(429, f"too many requests waiting: {e}", code="queue_full",
                           headers={"Retry-After": str(settings.retry_after_s)}) from None
        except EngineStoppedError as e:
            raise APIError(503, str(e), headers={"Retry-After": "5"}) from None

    def engine_error(out: RequestOutput) -> APIError:
        return APIError(500, f"the engine failed this request: {out.error}", code="engine_error")

    async def open_request(request: Request, model: type[BaseModel]) -> tuple[Any, float]:
        """What both generation endpoints do first: auth, admission, body, model, unsupported fields."""
        arrival = time.time()
        check_auth(request)
        check_admitting()
        req = await parse(request, model)
        check_model(req.model)
        if req.logit_bias:
            raise APIError(400, "logit_bias: not supported", param="logit_bias")
        return req, arrival

    def prompt_dict(text: str | None, ids: list[int], cache_salt: str | None) -> dict[str, Any]:
        d: dict[str, Any] = {"prompt": text, "prompt_token_ids": ids}
        if cache_salt is not None:
            d["cache_salt"] = cache_salt
        return d

    async def choice_deltas(group, params: SamplingParams, states: dict[tuple[str, int], _ChoiceState],
                            cached: dict[str, int]):
        """(request output, choice, delta) for every streamable change; _StreamFailed on an engine error.
        cached collects each request's prefix-cache hit (known once it is scheduled)."""
        async for batch in engine.stream(group):
            for out in batch:
                if out.error is not None:
                    raise _StreamFailed(out.error)
                cached[out.request_id] = out.num_cached_tokens
                for c in out.outputs:
                    delta = states.setdefault((out.request_id, c.index), _ChoiceState()).advance(c, params)
                    if delta is not None:
                        yield out, c, delta

    def stream_failed(e: _StreamFailed) -> list[str]:
        return [_sse(error_body(500, f"the engine failed this request: {e}")), "data: [DONE]\n\n"]

    # -- logprob formats ------------------------------------------------------------------------
    def completion_logprobs(c: CompletionOutput, start: int, end: int, k: int, offset: int,
                            as_ids: bool) -> dict[str, Any]:
        tokens, lps, tops, offsets = [], [], [], []
        for tid, entry in zip(c.token_ids[start:end], (c.logprobs or [])[start:end]):
            s = token_str(tid, as_ids)
            tokens.append(s)
            lps.append(entry[tid].logprob)
            tops.append({token_str(t, as_ids): lp.logprob for t, lp in _top(entry, k, tid)})
            offsets.append(offset)
            offset += len(s)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def echo_logprobs(ids: list[int], entries: list[PositionLogprobs | None], k: int,
                      as_ids: bool) -> dict[str, Any]:
        """The prompt's part of an echoed completion's logprobs, as OpenAI returned it: the first
        token's logprob and top_logprobs null (nothing precedes it)."""
        tokens, lps, tops, offsets, offset = [], [], [], [], 0
        for i, tid in enumerate(ids):
            s = token_str(tid, as_ids)
            entry = entries[i] if i < len(entries) else None
            tokens.append(s)
            lps.append(None if entry is None else entry[tid].logprob)
            tops.append(None if entry is None else {token_str(t, as_ids): lp.logprob for t, lp in _top(entry, k, tid)})
            offsets.append(offset)
            offset += len(s)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def vllm_prompt_logprobs(ids: list[int], entries: list[PositionLogprobs | None],
                             k: int) -> list[dict[str, Any] | None]:
        """vLLM's prompt_logprobs: per position None (the first) or {token id: {logprob, rank,
        decoded_token}} for the top k and the prompt's own token."""
        result: list[dict[str, Any] | None] = []
        for i, tid in enumerate(ids):
            entry = entries[i] if i < len(entries) else None
            result.append(None if entry is None else {
                str(t): {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": token_str(t)}
                for t, lp in _top(entry, k, tid)})
        return result

    def chat_logprobs(c: CompletionOutput, start: int, end: int, k: int, as_ids: bool) -> list[dict[str, Any]]:
        content = []
        for tid, entry in zip(c.token_ids[start:end], (c.logprobs or [])[start:end]):
            s = token_str(tid, as_ids)
            content.append({
                # With return_tokens_as_token_ids the bytes stay the token's own (as vLLM does).
                "token": s, "logprob": entry[tid].logprob, "bytes": token_bytes(tid, token_str(tid)),
                "top_logprobs": [
                    {"token": (ts := token_str(t, as_ids)), "logprob": lp.logprob, "bytes": token_bytes(t, ts)}
                    for t, lp in _top(entry, k, None)
                ],
            })
        return content

    # -- routes ---------------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        return JSONResponse(error_body(500, f"internal error: {type(e).__name__}: {e}"), status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(e.status_code, str(e.detail)), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)

    @app.get("/health")
    async def health() -> Response:
        if not engine.is_running:
            return JSONResponse(error_body(503, "the engine is not running"), status_code=503)
        return Response(status_code=200)

    def model_card() -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created, "owned_by": "tokenmill",
                "root": settings.model_path, "max_model_len": llm_engine.max_model_len}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        check_auth(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str) -> dict[str, Any]:
        check_auth(request)
        check_model(model_id)
        return model_card()

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/tokenize", openapi_extra=body(TokenizeRequest))
    async def tokenize(request: Request) -> dict[str, Any]:
        req: TokenizeRequest = await parse(request, TokenizeRequest)
        check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "prompt: give exactly one of prompt or messages", param="prompt")
        if req.messages is not None:
            ids = await encode(chat_prompt(req.messages, req.add_generation_prompt), add_special_tokens=False)
        else:
            ids = await encode(req.prompt or "", add_special_tokens=req.add_special_tokens)
        return {"count": len(ids), "max_model_len": llm_engine.max_model_len, "tokens": ids}

    @app.post("/detokenize", openapi_extra=body(DetokenizeRequest))
    async def detokenize(request: Request) -> dict[str, Any]:
        req: DetokenizeRequest = await parse(request, DetokenizeRequest)
        check_model(req.model)
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"tokens: {bad[:5]} outside the vocabulary [0, {vocab})", param="tokens")
        if tokenizer is None:
            raise APIError(400, "tokens: this model has no tokenizer", param="tokens")
        return {"prompt": tokenizer.decode(req.tokens)}

    @app.post("/v1/completions", openapi_extra=body(CompletionRequest))
    async def completions(request: Request) -> Response:
        req, arrival = await open_request(request, CompletionRequest)
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, "best_of: only best_of == n is supported", param="best_of")
        if req.suffix:
            raise APIError(400, "suffix: not supported", param="suffix")
        score_only = req.max_tokens == 0
        if score_only and not req.echo:
            raise APIError(400, "max_tokens: 0 is only allowed with echo (scoring the prompt)", param="max_tokens")
        if req.stream and req.prompt_logprobs is not None:
            raise APIError(400, "prompt_logprobs: not available when stream is true", param="prompt_logprobs")
        p = req.prompt
        if isinstance(p, str):
            prompts = [(p, await encode(p))]
        elif p and all(isinstance(x, str) for x in p):
            prompts = [(x, await encode(x)) for x in p]  # type: ignore[arg-type]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [(None, list(p))]  # type: ignore[arg-type]
        elif p:
            prompts = [(None, list(x)) for x in p]  # type: ignore[union-attr]
        else:
            raise APIError(400, "prompt: the prompt list is empty", param="prompt")
        # echo with logprobs scores the prompt too: its positions come from the engine's prompt logprobs.
        echo_lp = req.echo and req.logprobs is not None
        want_plp = max(req.logprobs if echo_lp else -1, -1 if req.prompt_logprobs is None else req.prompt_logprobs)
        # max_tokens 0 (score only) generates one token, from the prefill's last logits, and drops it.
        params = req.sampling_params(1 if score_only else req.max_tokens, req.logprobs,
                                     want_plp if want_plp >= 0 else None)
        as_ids = req.return_tokens_as_token_ids
        rid = f"cmpl-{uuid.uuid4().hex}"
        reqs = [(f"{rid}-{i}", prompt_dict(t, ids, req.cache_salt), params) for i, (t, ids) in enumerate(prompts)]
        group = await submit(reqs, req.priority, arrival)
        # Choice index = prompt index * n + sample index, as in the OpenAI API.
        index = {r[0]: i for i, r in enumerate(reqs)}
        prompt_tokens = sum(len(ids) for _, ids in prompts)

        def prefix(i: int) -> str:
            if not req.echo:
                return ""
            text, ids = prompts[i]
            return text if text is not None else (tokenizer.decode(ids) if tokenizer is not None else "")

        def prompt_lp(i: int, out: RequestOutput) -> dict[str, Any]:
            return echo_logprobs(prompts[i][1], out.prompt_logprobs or [], req.logprobs, as_ids)

        def joined(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
            if a is None or b is None:
                return a or b
            end = a["text_offset"][-1] + len(a["tokens"][-1]) if a["tokens"] else 0
            return {"tokens": a["tokens"] + b["tokens"], "token_logprobs": a["token_logprobs"] + b["token_logprobs"],
                    "top_logprobs": a["top_logprobs"] + b["top_logprobs"],
                    "text_offset": a["text_offset"] + [end + o for o in b["text_offset"]]}

        if req.stream and not score_only:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            async def events() -> AsyncIterator[str]:
                states: dict[tuple[str, int], _ChoiceState] = {}
                cached: dict[str, int] = {}
                try:
                    async for out, c, d in choice_deltas(group, params, states, cached):
                        pi = index[out.request_id]
                        lp = (completion_logprobs(c, *d.tokens, req.logprobs, d.text_start, as_ids)
                              if req.logprobs is not None else None)
                        if echo_lp and d.first:
                            lp = joined(prompt_lp(pi, out), lp)
                        yield _sse({"id": rid, "object": "text_completion", "created": int(arrival), "model": name,
                                    "choices": [{
                                        "index": pi * req.n + c.index, "text": (prefix(pi) if d.first else "") + d.text,
                                        "logprobs": lp, "finish_reason": d.finish_reason,
                                        "stop_reason": c.stop_reason if d.finish_reason else None,
                                    }]})
                except _StreamFailed as e:
                    for event in stream_failed(e):
                        yield event
                    return
                if include_usage:
                    n_out = sum(st.tokens for st in states.values())
                    yield _sse({"id": rid, "object": "text_completion", "created": int(arrival), "model": name,
                                "choices": [], "usage": _usage(prompt_tokens, n_out, sum(cached.values()))})
                yield "data: [DONE]\n\n"

            return _sse_response(events(), lambda: engine.release(group))

        async def final_choices() -> tuple[list[dict[str, Any]], int, int] | Response:
            final = await _collect(engine, group)
            choices = []
            n_out = n_cached = 0
            for r, _ in enumerate(reqs):
                out = final[reqs[r][0]]
                if out.error is not None:
                    return error_response(engine_error(out))
                n_cached += out.num_cached_tokens
                for c in out.outputs:
                    n_gen = 0 if score_only else len(c.token_ids)
                    n_out += n_gen
                    lp = completion_logprobs(c, 0, n_gen, req.logprobs, 0, as_ids) if req.logprobs is not None else None
                    choice = {
                        "index": r * req.n + c.index, "text": prefix(r) + ("" if score_only else c.text),
                        "logprobs": joined(prompt_lp(r, out), lp) if echo_lp else lp,
                        "finish_reason": "length" if score_only else _finish_reason(c),
                        "stop_reason": None if score_only else c.stop_reason,
                    }
                    if req.prompt_logprobs is not None:
                        choice["prompt_logprobs"] = vllm_prompt_logprobs(prompts[r][1], out.prompt_logprobs or [],
                                                                         req.prompt_logprobs)
                    choices.append(choice)
            return choices, n_out, n_cached

        if req.stream:  # score only: the whole answer in one chunk per choice
            async def scored_events() -> AsyncIterator[str]:
                result = await final_choices()
                if isinstance(result, Response):
                    yield _sse(json.loads(result.body))
                    yield "data: [DONE]\n\n"
                    return
                choices, n_out, n_cached = result
                for ch in choices:
                    yield _sse({"id": rid, "object": "text_completion", "created": int(arrival), "model": name,
                                "choices": [ch]})
                if req.stream_options and req.stream_options.include_usage:
                    yield _sse({"id": rid, "object": "text_completion", "created": int(arrival), "model": name,
                                "choices": [], "usage": _usage(prompt_tokens, n_out, n_cached)})
                yield "data: [DONE]\n\n"

            return _sse_response(scored_events(), lambda: engine.release(group))

        async def collect() -> Response:
            result = await final_choices()
            if isinstance(result, Response):
                return result
            choices, n_out, n_cached = result
            return JSONResponse({"id": rid, "object": "text_completion", "created": int(arrival), "model": name,
                                 "choices": choices, "usage": _usage(prompt_tokens, n_out, n_cached)})

        return await _unless_disconnected(request, collect())

    @app.post("/v1/chat/completions", openapi_extra=body(ChatCompletionRequest))
    async def chat_completions(request: Request) -> Response:
        req, arrival = await open_request(request, ChatCompletionRequest)
        if req.tools:
            raise APIError(400, "tools: tool calling is not supported yet", param="tools")
        if req.stream and req.prompt_logprobs is not None:
            raise APIError(400, "prompt_logprobs: not available when stream is true", param="prompt_logprobs")
        if req.response_format is not None and req.response_format.type != "text":
            raise APIError(400, "response_format: only type 'text' is supported", param="response_format")
        if req.top_logprobs is not None:
            if not req.logprobs:
                raise APIError(400, "top_logprobs: requires logprobs to be true", param="top_logprobs")
            if not 0 <= req.top_logprobs <= 20:
                raise APIError(400, f"top_logprobs: must be in [0, 20], got {req.top_logprobs}", param="top_logprobs")
        k = (req.top_logprobs or 0) if req.logprobs else None
        text = chat_prompt(req.messages, req.add_generation_prompt)
        ids = await encode(text, add_special_tokens=False)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = req.sampling_params(max_tokens, k)
        as_ids = req.return_tokens_as_token_ids
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        group = await submit([(rid, prompt_dict(text, ids, req.cache_salt), params)], req.priority, arrival)

        def chunk(choice: dict[str, Any]) -> str:
            return _sse({"id": rid, "object": "chat.completion.chunk", "created": int(arrival), "model": name,
                         "choices": [choice]})

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            async def events() -> AsyncIterator[str]:
                states: dict[tuple[str, int], _ChoiceState] = {}
                cached: dict[str, int] = {}
                try:
                    async for _, c, d in choice_deltas(group, params, states, cached):
                        if d.first:  # the role comes first, with the first token, as vLLM sends it
                            yield chunk({"index": c.index, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None})
                        lp = {"content": chat_logprobs(c, *d.tokens, k, as_ids)} if k is not None else None
                        yield chunk({"index": c.index, "delta": {"content": d.text} if d.text else {},
                                     "logprobs": lp, "finish_reason": d.finish_reason,
                                     "stop_reason": c.stop_reason if d.finish_reason else None})
                except _StreamFailed as e:
                    for event in stream_failed(e):
                        yield event
                    return
                if include_usage:
                    n_out = sum(st.tokens for st in states.values())
                    yield _sse({"id": rid, "object": "chat.completion.chunk", "created": int(arrival),
                                "model": name, "choices": [], "usage": _usage(len(ids), n_out, cached.get(rid, 0))})
                yield "data: [DONE]\n\n"

            return _sse_response(events(), lambda: engine.release(group))

        async def collect() -> Response:
            out = (await _collect(engine, group))[rid]
            if out.error is not None:
                return error_response(engine_error(out))
            choices = [{
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": {"content": chat_logprobs(c, 0, len(c.token_ids), k, as_ids)} if k is not None else None,
                "finish_reason": _finish_reason(c), "stop_reason": c.stop_reason,
            } for c in out.outputs]
            n_out = sum(len(c.token_ids) for c in out.outputs)
            resp = {"id": rid, "object": "chat.completion", "created": int(arrival), "model": name,
                    "choices": choices, "usage": _usage(len(ids), n_out, out.num_cached_tokens)}
            if req.prompt_logprobs is not None:  # vLLM puts them beside the choices
                resp["prompt_logprobs"] = vllm_prompt_logprobs(ids, out.prompt_logprobs or [], req.prompt_logprobs)
            return JSONResponse(resp)

        return await _unless_disconnected(request, collect())

    return app


_BYTE_LEVEL = {c: b for b, c in BYTE_TO_UNICODE.items()}
_HEX_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _raw_token_bytes(vocab_str: str) -> bytes:
    """Bytes of a vocabulary string: SentencePiece byte tokens (<0xE2>) or byte-level BPE."""
    m = _HEX_BYTE.match(vocab_str)
    if m:
        return bytes([int(m.group(1), 16)])
    if all(c in _BYTE_LEVEL for c in vocab_str):
        return bytes(_BYTE_LEVEL[c] for c in vocab_str)
    return vocab_str.encode("utf-8")


def _top(entry: PositionLogprobs, k: int, sampled: int | None) -> list[tuple[int, Any]]:
    """The k most likely tokens of a position (plus the sampled one when given), best first."""
    items = [(t, lp) for t, lp in entry.items() if lp.rank <= k or t == sampled]
    return sorted(items, key=lambda x: x[1].rank)


async def _collect(engine: AsyncEngine, group) -> dict[str, RequestOutput]:
    final: dict[str, RequestOutput] = {}
    async for batch in engine.stream(group):
        for out in batch:
            if out.finished:
                final[out.request_id] = out
    return final


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _sse_response(events: AsyncIterator[str], release: Callable[[], None]) -> StreamingResponse:
    async def guarded() -> AsyncIterator[str]:
        # However the stream ends (done, client gone, cancelled), abort what is unfinished now
        # rather than whenever the generator is garbage-collected.
        try:
            async for event in events:
                yield event
        finally:
            release()

    return StreamingResponse(guarded(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
