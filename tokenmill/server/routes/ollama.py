"""Ollama's API (/api/chat, /api/generate, /api/embed, /api/embeddings, /api/tags, /api/show,
/api/ps, /api/version), so that what speaks Ollama (the ollama library, LangChain's ChatOllama,
Open WebUI, editors' assistants) uses tokenmill unchanged.

A translation, not a second server: each request becomes the OpenAI request that means the same
(options -> sampling fields, `format` -> response_format, `think` -> the template's
enable_thinking) and runs through this app's own route in process (`_Inner`), with the caller's
headers, so auth, tenants, the model pool, metrics and errors are the OpenAI routes' own. The
answer comes back in Ollama's shapes: newline-delimited JSON when streamed (Ollama's default),
durations in nanoseconds, errors as {"error": "..."} with the same status.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from tokenmill.server.errors import APIError
from tokenmill.server.gateway import Gateway

logger = logging.getLogger("tokenmill.server")

# The Ollama API version whose request and response shapes these routes follow (clients ask /api/version).
OLLAMA_API_VERSION = "0.12.0"
# Ollama's options and the OpenAI/vLLM sampling fields they are (num_predict is max_tokens, below).
_OPTIONS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p", "seed": "seed",
            "stop": "stop", "repeat_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
            "frequency_penalty": "frequency_penalty"}
# Options about Ollama's runtime (context size, threads, GPU layers, ...): the server's settings decide
# those here, so they are accepted and change nothing, as a fixed-context Ollama model would.
_RUNTIME_OPTIONS = {"num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread", "use_mmap", "use_mlock", "numa",
                    "low_vram", "vocab_only", "num_keep", "penalize_newline", "repeat_last_n", "mirostat_tau",
                    "mirostat_eta"}
# Sampling options there is no equivalent of here: taken at the value that turns them off (clients send
# Ollama's defaults), any other a 400 (the output would not be what was asked for).
_OFF_OPTIONS = {"mirostat": 0, "typical_p": 1.0, "tfs_z": 1.0}
_warned: set[str] = set()


class OllamaError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        self.status, self.message, self.headers = status, message, headers


def register(app: FastAPI, gw: Gateway) -> None:
    async def body(request: Request) -> dict[str, Any]:
        """The caller's key first (nothing is read for a caller without one), then the body, counted
        against --max-body-size as it arrives (a chunked body has no Content-Length to check)."""
        try:
            gw.check_auth(request)
        except APIError as e:
            raise OllamaError(e.status, e.message) from None
        limit, raw = gw.settings.max_body_bytes, bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limit:
                raise OllamaError(413, f"request body exceeds {limit} bytes")
        return _parse(bytes(raw))

    async def with_body(request: Request, handler: Any, *args: Any) -> Response:
        try:
            return await handler(app, request, await body(request), *args)
        except OllamaError as e:
            gw.let_go_of_import(request)  # (refused here, before the inner route: its hold, as Gateway.route does)
            return JSONResponse({"error": e.message}, status_code=e.status, headers=e.headers)

    @app.post("/api/chat", include_in_schema=False)
    async def chat(request: Request) -> Response:
        return await with_body(request, _chat)

    @app.post("/api/generate", include_in_schema=False)
    async def generate(request: Request) -> Response:
        return await with_body(request, _generate)

    @app.post("/api/embed", include_in_schema=False)
    async def embed(request: Request) -> Response:
        return await with_body(request, _embed, False)

    @app.post("/api/embeddings", include_in_schema=False)
    async def embeddings(request: Request) -> Response:
        return await with_body(request, _embed, True)

    @app.api_route("/api/tags", methods=["GET", "HEAD"], include_in_schema=False)
    async def tags(request: Request) -> Response:
        return await _guard(_tags(app, request, running=False))

    @app.api_route("/api/ps", methods=["GET", "HEAD"], include_in_schema=False)
    async def ps(request: Request) -> Response:
        return await _guard(_tags(app, request, running=True))

    @app.post("/api/show", include_in_schema=False)
    async def show(request: Request) -> Response:
        return await with_body(request, _show)

    @app.api_route("/api/version", methods=["GET", "HEAD"], include_in_schema=False)
    async def version() -> dict[str, str]:
        return {"version": OLLAMA_API_VERSION}

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def root() -> Response:  # (Ollama's clients check that the server is up here)
        return PlainTextResponse("tokenmill is running")

    @app.api_route("/api/{rest:path}", methods=["GET", "POST", "DELETE", "PUT", "HEAD"], include_in_schema=False)
    async def not_served(rest: str) -> Response:  # pull, push, create, copy, delete, blobs: a model store's
        return JSONResponse({"error": f"/api/{rest} is not served: tokenmill serves local model folders "
                                      f"(--model, --models), not Ollama's model store"}, status_code=404)


async def _guard(work: Any) -> Response:
    try:
        return await work
    except OllamaError as e:
        return JSONResponse({"error": e.message}, status_code=e.status, headers=e.headers)


# -- the in-process call ---------------------------------------------------------------------------
class _Inner:
    """One call of this app's own route, in process: the OpenAI request sent with the caller's
    headers (its key), the answer read as it comes (a stream stays a stream). The caller leaving
    reaches the inner route as its own client leaving."""

    def __init__(self, app: FastAPI, request: Request, method: str, path: str, body: dict[str, Any] | None) -> None:
        raw = json.dumps(body, separators=(",", ":")).encode() if body is not None else b""
        scope = {k: v for k, v in request.scope.items() if k in ("type", "http_version", "scheme", "server", "client",
                                                                  "root_path", "state", "app", "asgi", "extensions")}
        headers = [(k, v) for k, v in request.scope.get("headers", [])
                   if k not in (b"content-length", b"content-type", b"accept-encoding")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
        scope.update(method=method, path=path, raw_path=path.encode(), query_string=b"", headers=headers)
        self.queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        sent = False
        outer = request.receive

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await outer()  # (the caller's own disconnect)

        async def send(message: dict[str, Any]) -> None:
            await self.queue.put(message)

        self.task = asyncio.ensure_future(app(scope, receive, send))
        self.task.add_done_callback(self._ended)
        self.headers: dict[str, str] = {}
        self.complete = False  # the answer ended as the route ends it (a stream: with [DONE])

    def _ended(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:  # (retrieved: logged once, here)
            logger.error("ollama API: the inner route failed: %r", task.exception())
        self.queue.put_nowait(None)

    async def start(self) -> int:
        msg = await self.queue.get()
        if msg is None or msg.get("type") != "http.response.start":
            raise OllamaError(500, "the server gave no answer")
        self.headers = {k.decode().lower(): v.decode() for k, v in msg.get("headers", [])}
        return int(msg["status"])

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            while True:
                msg = await self.queue.get()
                if msg is None:
                    return
                if msg.get("type") == "http.response.body":
                    if msg.get("body"):
                        yield msg["body"]
                    if not msg.get("more_body"):
                        self.complete = True
                        return
        finally:
            if not self.task.done():
                self.task.cancel()

    async def json(self) -> Any:
        return json.loads(b"".join([c async for c in self.chunks()]) or b"null")

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """A server-sent-events answer's JSON events ([DONE] ends it)."""
        buf = b""
        async for c in self.chunks():
            buf += c
            while b"\n\n" in buf:
                block, buf = buf.split(b"\n\n", 1)
                for line in block.split(b"\n"):
                    if line.startswith(b"data: "):
                        data = line[6:].strip()
                        if data == b"[DONE]":
                            return
                        yield json.loads(data)
        # (the route always ends a stream with [DONE]: without it, it failed midway)
        yield {"error": {"message": "the answer ended early: the server failed while generating it"}}


async def _call(app: FastAPI, request: Request, method: str, path: str,
                body: dict[str, Any] | None = None, model: str | None = None) -> tuple[_Inner, int]:
    inner = _Inner(app, request, method, path, body)
    status = await inner.start()
    if status >= 400:
        err = await inner.json()
        error = err.get("error", {}) if isinstance(err, dict) else {}
        message = error.get("message") if isinstance(error, dict) else None
        model = model or (body.get("model") if isinstance(body, dict) else None)
        # (a missing model; a file_search tool's missing vector store says so itself)
        tool = isinstance(error, dict) and str(error.get("param") or "").startswith("tools")
        if status == 404 and model is not None and not tool:
            message = f"model '{model}' not found"  # (Ollama's words: clients match them)
        keep = {k: v for k, v in inner.headers.items() if k in ("retry-after", "x-should-retry")}
        raise OllamaError(status, message or f"HTTP {status}", keep or None)
    return inner, status


# -- translation -------------------------------------------------------------------------------------
def _parse(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw or b"{}")
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise OllamaError(400, f"invalid JSON body: {e}") from None
    if not isinstance(body, dict):
        raise OllamaError(400, "the body must be a JSON object")
    if "model" not in body and isinstance(body.get("name"), str):  # (older clients' name for it)
        body["model"] = body["name"]
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise OllamaError(400, "model is required")
    return body


async def _known(app: FastAPI, request: Request, model: str) -> None:
    """The caller may use this model, which exists (the 401 or 404 otherwise, as a request would get)."""
    from urllib.parse import quote

    inner, _ = await _call(app, request, "GET", "/v1/models/" + quote(model, safe=""), None, model)
    await inner.json()


def _sampling(body: dict[str, Any], warn: bool = True) -> dict[str, Any]:
    """Ollama's options, format and think as the OpenAI/vLLM request fields (warn: log an option
    that is not one here, once)."""
    out: dict[str, Any] = {"model": body["model"]}
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise OllamaError(400, "options must be an object")
    for key, value in options.items():
        if value is None:  # (unset, as clients that send every option write it)
            continue
        if key in _OFF_OPTIONS:
            if value != _OFF_OPTIONS[key]:
                raise OllamaError(400, f"options.{key} is not supported (only {_OFF_OPTIONS[key]}, off)")
        elif key in _OPTIONS:
            out[_OPTIONS[key]] = value
        elif key == "num_predict":
            if not isinstance(value, int) or isinstance(value, bool):
                raise OllamaError(400, f"options.num_predict must be an integer, got {value!r}")
            if value >= 0:  # (-1: until the model stops; -2: until the context is full. Both: no limit)
                out["max_tokens"] = value
        elif warn and key not in _RUNTIME_OPTIONS and key not in _warned:  # (Ollama's way: logged, ignored)
            _warned.add(key)
            logger.warning("ollama API: options.%s is not an option here; ignored", key)
    fmt = body.get("format")
    if fmt == "json":
        out["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        out["response_format"] = {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt}}
    elif fmt not in (None, ""):
        raise OllamaError(400, f"format must be 'json' or a JSON schema, got {fmt!r}")
    think = body.get("think")
    if think is not None:
        if not isinstance(think, bool):  # ("low", "medium", "high": gpt-oss's levels)
            raise OllamaError(400, f"think: true or false here, got {think!r}")
        out["chat_template_kwargs"] = {"enable_thinking": think}
    if body.get("images"):
        raise OllamaError(400, "images are not supported: tokenmill serves text models")
    return out


def _messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list):
        raise OllamaError(400, "messages must be a list")
    out = []
    pending: list[str] = []  # the last calls' ids, for tool results that name none (Ollama's own don't)
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise OllamaError(400, f"messages[{i}] must be an object")
        if m.get("images"):
            raise OllamaError(400, f"messages[{i}].images: images are not supported: tokenmill serves text models")
        role = m.get("role").lower() if isinstance(m.get("role"), str) else m.get("role")
        msg: dict[str, Any] = {"role": role, "content": m.get("content") or ""}
        calls = m.get("tool_calls")
        if calls:
            if not isinstance(calls, list):
                raise OllamaError(400, f"messages[{i}].tool_calls must be a list")
            msg["tool_calls"] = []
            for j, c in enumerate(calls):
                f = c.get("function") if isinstance(c, dict) else None
                if not isinstance(f, dict) or not isinstance(f.get("name"), str):
                    raise OllamaError(400, f"messages[{i}].tool_calls[{j}] must be {{'function': {{'name': ..., "
                                           f"'arguments': {{...}}}}}}")
                args = f.get("arguments") or {}
                cid = c.get("id") if isinstance(c.get("id"), str) and c.get("id") else f"call_{i}_{j}"
                msg["tool_calls"].append({"id": cid, "type": "function", "function": {
                    "name": f["name"], "arguments": args if isinstance(args, str) else json.dumps(args)}})
            pending = [c["id"] for c in msg["tool_calls"]]
        if role == "tool":
            if m.get("tool_name"):
                msg["name"] = m["tool_name"]
            cid = m.get("tool_call_id")
            if isinstance(cid, str) and cid:
                if cid in pending:
                    pending.remove(cid)
            else:
                cid = pending.pop(0) if pending else None
            msg["tool_call_id"] = cid
        out.append(msg)
    return out


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _done(body: dict[str, Any], usage: dict[str, Any] | None, reason: str | None, t0: float,
          first: float | None) -> dict[str, Any]:
    """The last object of an answer: why it stopped, its token counts and durations (ns)."""
    end = time.perf_counter()
    first = first or end
    u = usage or {}
    return {"done": True, "done_reason": "length" if reason == "length" else "stop",
            "total_duration": int((end - t0) * 1e9), "load_duration": 0,
            "prompt_eval_count": u.get("prompt_tokens", 0), "prompt_eval_duration": int((first - t0) * 1e9),
            "eval_count": u.get("completion_tokens", 0), "eval_duration": int((end - first) * 1e9)}


def _ndjson(objects: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def lines() -> AsyncIterator[bytes]:
        async for o in objects:
            o.pop("_status", None)
            yield json.dumps(o).encode() + b"\n"

    return StreamingResponse(lines(), media_type="application/x-ndjson",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _calls(calls: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    if not calls:
        return None
    out = []
    for i, c in enumerate(calls):
        f = c.get("function") or {}
        try:
            args = json.loads(f.get("arguments") or "{}")
        except ValueError:
            args = {}
        out.append({"id": c.get("id"), "function": {"index": i, "name": f.get("name"),
                                                    "arguments": args if isinstance(args, dict) else {}}})
    return out


def openai_request(path: str, body: dict[str, Any], warn: bool = True) -> tuple[str, dict[str, Any]] | None:
    """The OpenAI request /api/chat or /api/generate (path) runs for body (as _parse gives it): its
    path and body; None for Ollama's way to load a model (no messages, no prompt). OllamaError for
    what it refuses. (A fleet router renders the same request's prompt with it; warn=False.)"""
    oa = _sampling(body, warn)

    def checked(to: str) -> tuple[str, dict[str, Any]]:  # (top_logprobs last: no load request is refused for it)
        top = body.get("top_logprobs")
        if top is not None and (not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= 20):
            raise OllamaError(400, f"top_logprobs must be an integer from 0 to 20, got {top!r}")
        return to, oa

    if path == "/api/chat":
        oa["messages"] = _messages(body.get("messages") or [])
        if not oa["messages"]:
            return None
        if body.get("tools"):
            oa["tools"] = body["tools"]
        return checked("/v1/chat/completions")
    for field in ("context", "template", "suffix"):
        if body.get(field):
            raise OllamaError(400, f"{field} is not supported (send the conversation to /api/chat"
                                   + (")" if field != "suffix" else "; fill-in-the-middle is not served)"))
    prompt = body.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise OllamaError(400, "prompt must be a string")
    if not prompt:
        return None
    if body.get("raw"):
        if body.get("system"):
            raise OllamaError(400, "system cannot be combined with raw (the prompt is sent as it is)")
        oa["prompt"] = prompt
        oa.setdefault("max_tokens", None)  # (Ollama's default: until the model stops)
        oa.pop("chat_template_kwargs", None)
        return checked("/v1/completions")
    system = body.get("system")
    oa["messages"] = ([{"role": "system", "content": system}] if system else []) + [{"role": "user",
                                                                                     "content": prompt}]
    return checked("/v1/chat/completions")


async def _chat(app: FastAPI, request: Request, body: dict[str, Any]) -> Response:
    run = openai_request("/api/chat", body)
    if run is None:  # (Ollama's way to load a model: an empty chat. The pool decides what loads.)
        await _known(app, request, body["model"])
        return JSONResponse({"model": body["model"], "created_at": _now(),
                             "message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "load"})
    return await _answer(app, request, body, run[0], run[1], chat=True)


async def _generate(app: FastAPI, request: Request, body: dict[str, Any]) -> Response:
    run = openai_request("/api/generate", body)
    if run is None:  # (Ollama's way to load a model: an empty prompt. The pool decides what loads.)
        await _known(app, request, body["model"])
        return JSONResponse({"model": body["model"], "created_at": _now(), "response": "", "done": True,
                             "done_reason": "load"})
    return await _answer(app, request, body, run[0], run[1], chat=False)


async def _answer(app: FastAPI, request: Request, body: dict[str, Any], path: str, oa: dict[str, Any],
                  chat: bool) -> Response:
    """Runs the OpenAI request and answers in Ollama's shape: /api/chat's `message` or
    /api/generate's `response`, streamed as NDJSON unless `stream` is false."""
    stream = body.get("stream", True) is not False
    want_lp = bool(body.get("logprobs"))
    if want_lp:  # (top_logprobs checked by openai_request)
        if path == "/v1/completions":
            oa["logprobs"] = int(body.get("top_logprobs") or 0)
        else:
            oa["logprobs"], oa["top_logprobs"] = True, int(body.get("top_logprobs") or 0)
    t0 = time.perf_counter()
    head = {"model": body["model"]}
    oa["stream"], oa["stream_options"] = True, {"include_usage": True}
    inner, _ = await _call(app, request, "POST", path, oa)

    async def objects() -> AsyncIterator[dict[str, Any]]:
        first = None
        reason, usage = None, None
        calls: dict[int, dict[str, Any]] = {}
        async for ev in inner.events():
            if "error" in ev:
                err = ev["error"] or {}
                status = {"invalid_request_error": 400, "service_unavailable": 503,
                          "rate_limit_error": 429}.get(err.get("type"), 500)
                yield {"error": err.get("message", "error"), "_status": status}
                return
            if ev.get("usage"):
                usage = ev["usage"]
            for choice in ev.get("choices") or []:
                reason = choice.get("finish_reason") or reason
                if path == "/v1/completions":
                    text, thinking = choice.get("text") or "", None
                else:
                    delta = choice.get("delta") or {}
                    text, thinking = delta.get("content") or "", delta.get("reasoning")
                    for c in delta.get("tool_calls") or []:  # (Ollama sends each call whole: gathered here)
                        slot = calls.setdefault(c.get("index", 0), {"id": None, "function": {"name": None,
                                                                                              "arguments": ""}})
                        slot["id"] = c.get("id") or slot["id"]
                        f = c.get("function") or {}
                        slot["function"]["name"] = f.get("name") or slot["function"]["name"]
                        slot["function"]["arguments"] += f.get("arguments") or ""
                lp = _logprobs(choice, path) if want_lp else None
                if not (text or thinking or lp):
                    continue
                first = first or time.perf_counter()
                o: dict[str, Any] = {**head, "created_at": _now()}
                if chat:
                    o["message"] = {"role": "assistant", "content": text} | ({"thinking": thinking} if thinking
                                                                              else {})
                else:
                    o["response"] = text
                    if thinking:
                        o["thinking"] = thinking
                if lp:
                    o["logprobs"] = lp
                yield o | {"done": False}
        last: dict[str, Any] = {**head, "created_at": _now()}
        if chat:
            last["message"] = {"role": "assistant", "content": ""}
            if calls:
                last["message"]["tool_calls"] = _calls([calls[k] for k in sorted(calls)])
        else:
            last["response"] = ""
        yield last | _done(body, usage, reason, t0, first)

    if stream:
        return _ndjson(objects())
    # Unstreamed: the same stream, gathered (so its durations are measured as a stream's are).
    whole: dict[str, Any] = {}
    texts: dict[str, list[str]] = {"content": [], "thinking": [], "response": []}
    lps: list[dict[str, Any]] = []
    async for o in objects():
        if "error" in o:
            return JSONResponse({"error": o["error"]}, status_code=o.get("_status", 500))
        part = o.get("message") or o
        for key in texts:
            if part.get(key):
                texts[key].append(part[key])
        lps += o.get("logprobs") or []
        whole = o
    if chat:
        whole["message"] = {"role": "assistant", "content": "".join(texts["content"])} | (
            {"thinking": "".join(texts["thinking"])} if texts["thinking"] else {}) | (
            {"tool_calls": whole["message"]["tool_calls"]} if whole["message"].get("tool_calls") else {})
    else:
        whole["response"] = "".join(texts["response"])
        if texts["thinking"]:
            whole["thinking"] = "".join(texts["thinking"])
    if want_lp:
        whole["logprobs"] = lps
    return JSONResponse(whole)


def _logprobs(choice: dict[str, Any], path: str) -> list[dict[str, Any]]:
    """An OpenAI choice's logprobs as Ollama's list ({token, logprob, top_logprobs})."""
    lp = choice.get("logprobs") or {}
    if path == "/v1/completions":
        tokens, values, tops = lp.get("tokens") or [], lp.get("token_logprobs") or [], lp.get("top_logprobs") or []
        return [{"token": t, "logprob": v, "top_logprobs": [{"token": k, "logprob": x}
                                                            for k, x in (tops[i] or {}).items()] if i < len(tops)
                 else []} for i, (t, v) in enumerate(zip(tokens, values))]
    return [{"token": e["token"], "logprob": e["logprob"],
             "top_logprobs": [{"token": x["token"], "logprob": x["logprob"]} for x in e.get("top_logprobs") or []]}
            for e in lp.get("content") or []]


async def _embed(app: FastAPI, request: Request, body: dict[str, Any], legacy: bool) -> Response:
    t0 = time.perf_counter()
    if legacy:  # /api/embeddings: one prompt, one `embedding`
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise OllamaError(400, "prompt must be a string")
        inner, _ = await _call(app, request, "POST", "/v1/embeddings", {"model": body["model"], "input": prompt})
        return JSONResponse({"embedding": (await inner.json())["data"][0]["embedding"]})
    texts = body.get("input")
    if not isinstance(texts, (str, list)):
        raise OllamaError(400, "input must be a string or a list of strings")
    oa: dict[str, Any] = {"model": body["model"], "input": texts}
    if body.get("truncate", True):  # (Ollama's default: a long input is cut to the context)
        oa["truncate_prompt_tokens"] = -1
    if body.get("dimensions") is not None:
        oa["dimensions"] = body["dimensions"]
    inner, _ = await _call(app, request, "POST", "/v1/embeddings", oa)
    r = await inner.json()
    return JSONResponse({"model": body["model"], "embeddings": [d["embedding"] for d in r["data"]],
                         "total_duration": int((time.perf_counter() - t0) * 1e9), "load_duration": 0,
                         "prompt_eval_count": r["usage"]["prompt_tokens"]})


_DETAILS: dict[str, dict[str, Any]] = {}
_TEMPLATES: dict[str, str] = {}


def _template(root: str) -> str:
    """A model folder's chat template (read once; off the event loop: a tokenizer takes a while)."""
    if root and root not in _TEMPLATES:
        from tokenmill.engine.llm_engine import load_tokenizer

        try:
            tok = load_tokenizer(root)
            t = tok.chat_template if tok is not None else None
        except ValueError:
            t = None
        _TEMPLATES[root] = t if isinstance(t, str) else ""
    return _TEMPLATES.get(root, "")


def _details(card: dict[str, Any]) -> dict[str, Any]:
    """Ollama's `details` of a model from its folder's config.json (read once)."""
    root = card.get("root")
    if not root:
        return {"format": "", "family": "", "families": None, "parameter_size": "", "quantization_level": ""}
    if root not in _DETAILS:
        from tokenmill.config import ModelConfig

        try:
            mc = ModelConfig.from_pretrained(root)
            n = mc.num_parameters
            size = f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"
            dtype = str(mc.checkpoint_dtype).removeprefix("torch.").replace("float", "F").replace("bF16", "BF16")
            _DETAILS[root] = {"format": "safetensors", "family": mc.model_type, "families": [mc.model_type],
                              "parameter_size": size, "quantization_level": dtype.upper(), "parent_model": "",
                              "_params": n, "_context": mc.max_context, "_arch": mc.model_type}
        except (ValueError, OSError):
            _DETAILS[root] = {"format": "safetensors", "family": "", "families": None, "parameter_size": "",
                              "quantization_level": "", "parent_model": ""}
    return {k: v for k, v in _DETAILS[root].items() if not k.startswith("_")}


async def _tags(app: FastAPI, request: Request, running: bool) -> Response:
    inner, _ = await _call(app, request, "GET", "/v1/models")
    models = []
    for card in (await inner.json())["data"]:
        if running and card.get("state") != "active":
            continue
        root = card.get("root") or ""
        modified = os.path.getmtime(root) if root and os.path.exists(root) else time.time()
        m = {"name": card["id"], "model": card["id"],
             "modified_at": datetime.fromtimestamp(modified, timezone.utc).isoformat().replace("+00:00", "Z"),
             "size": card.get("size_bytes") or 0, "digest": hashlib.sha256((root or card["id"]).encode()).hexdigest(),
             "details": _details(card)}
        if running:
            m |= {"expires_at": "0001-01-01T00:00:00Z", "size_vram": card.get("size_bytes") or 0}
        models.append(m)
    return JSONResponse({"models": models})


async def _show(app: FastAPI, request: Request, body: dict[str, Any]) -> Response:
    inner, _ = await _call(app, request, "GET", "/v1/models")
    card = next((c for c in (await inner.json())["data"] if c["id"] == body["model"]), None)
    if card is None:
        raise OllamaError(404, f"model '{body['model']}' not found")
    details = _details(card)
    extra = _DETAILS.get(card.get("root") or "", {})
    info: dict[str, Any] = {}
    if extra.get("_arch"):
        info = {"general.architecture": extra["_arch"], "general.parameter_count": extra["_params"],
                f"{extra['_arch']}.context_length": card.get("max_model_len") or extra["_context"]}
    template = await asyncio.to_thread(_template, card.get("root") or "")
    caps = ["completion"] + (["tools"] if "tools" in template else []) + (["thinking"] if "think" in template else [])
    return JSONResponse({"modelfile": "", "parameters": "", "template": template, "details": details,
                         "model_info": info, "capabilities": caps, "modified_at": _now()})
