"""/v1/responses: OpenAI's Responses API, run as a chat request.

A request's instructions and input items (messages, function calls and their outputs) become chat
messages, its function tools and text format chat's tools and response_format; the chat route's
planning (plan_chat: template, tool setup, constraints, reasoning parser) prepares it and the
answer comes back as output items: reasoning, a message, function calls, whole or as the
Responses API's typed events. Responses are kept (store, the default; response_store.py) for
previous_response_id, which continues their conversation, and GET/DELETE /v1/responses/{id}.

The file_search tool runs on the server before the model (server/file_search.py): the search is
the first output item, its excerpts join the prompt. Not here: other built-in tools (web search,
MCP, ...), images and files as input, background runs and reasoning summaries; each is a 400
naming its field.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from tokenmill.ops.energy import sum_compute
from tokenmill.outputs import CompletionOutput
from tokenmill.server.answer import AnswerStream, answer_parts
from tokenmill.server.context import REQUEST_TAGS, ServerContext, TextOffsets, engine_api_error
from tokenmill.server.errors import APIError, error_response, validation_error
from tokenmill.server.file_search import FileSearch
from tokenmill.server.gateway import EXTRAS, Gateway
from tokenmill.server.protocol import ChatCompletionRequest, ResponsesRequest, _SamplingFields
from tokenmill.server.reasoning import split_reasoning
from tokenmill.server.response_store import StoredResponse
from tokenmill.server.routes import body
from tokenmill.server.routes.chat import ChatPlan, _checked, plan_chat, plan_searched
from tokenmill.server.streaming import (
    ChoiceState,
    StreamFailed,
    collect_finished,
    finish_reason,
    sse_response,
    unless_disconnected,
)

# Chat request fields that mean nothing for one response (its one answer, its own stream format).
_NOT_HERE = ("n", "use_beam_search", "test_time_compute", "resume_token_ids", "prompt_logprobs",
             "return_token_ids", "response_format", "kv_transfer_params")
_TEXT_PARTS = ("input_text", "output_text", "text")
# Chat's names in error messages, as a Responses request names them.
_RENAMES = ((re.compile(r"\bmax_(?:completion_)?tokens\b"), "max_output_tokens"),
            (re.compile(r"\bresponse_format\b"), "text.format"),
            (re.compile(r"\btools\[(\d+)\]\.function\."), r"tools[\1]."),
            (re.compile(r"\bmessages\b"), "input"))


class _ResponsesError(APIError):
    """An error this module raised, naming the Responses request's own fields (not renamed)."""


def _renamed(e: APIError) -> APIError:
    if isinstance(e, _ResponsesError):
        return e

    def sub(s: str | None) -> str | None:
        if s is None:
            return None
        for pattern, repl in _RENAMES:
            s = pattern.sub(repl, s)
        return s

    if e.param == "prompt":  # (the prompt is the input's, with the instructions and the conversation before it)
        e.message, e.param = "input" + e.message.removeprefix("prompt"), "input"
    e.message, e.param = sub(e.message) or "", sub(e.param)
    return e


def _bad(param: str, message: str) -> APIError:
    return _ResponsesError(400, f"{param}: {message}", param=param)


def _text(content: Any, where: str) -> str:
    """A message's content as text: a string or a list of text parts."""
    return _parts(content, f"{where}.content")


def _parts(content: Any, where: str) -> str:
    """A string, or a list of text parts joined; where: the field's path, for errors."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(where, "must be a string or a list of content parts")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _TEXT_PARTS and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
        elif kind in ("input_image", "input_file", "input_audio"):
            raise _bad(f"{where}[{j}]", f"{kind} is not supported: this server runs text-only models")
        else:
            raise _bad(f"{where}[{j}]", "must be a text part ({'type': 'input_text', 'text': ...})")
    return "".join(texts)


def _string(item: dict[str, Any], key: str, where: str) -> str:
    v = item.get(key)
    if not isinstance(v, str):
        raise _bad(f"{where}.{key}", "must be a string")
    return v


def input_messages(inp: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The input items as chat messages: a function call joins the assistant message before it
    (or makes one), its output is a tool message, reasoning items are left out (templates drop
    earlier turns' reasoning)."""
    if isinstance(inp, str):
        return [{"role": "user", "content": inp}]
    out: list[dict[str, Any]] = []
    for i, item in enumerate(inp):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise _bad(f"{where}.role", f"must be 'user', 'system', 'developer' or 'assistant', got {role!r}")
            out.append({"role": role, "content": _text(item.get("content"), where)})
        elif kind == "function_call":
            call = {"id": _string(item, "call_id", where), "type": "function",
                    "function": {"name": _string(item, "name", where), "arguments": _string(item, "arguments", where)}}
            if out and out[-1]["role"] == "assistant":
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            out.append({"role": "tool", "tool_call_id": _string(item, "call_id", where),
                        "content": output if isinstance(output, str) else _parts(output, where + ".output")})
        elif kind not in ("reasoning", "file_search_call"):  # (searches are not replayed: their turn is over)
            raise _bad(f"{where}.type", f"{kind!r} is not supported; an input item is a message, a function_call, "
                       "a function_call_output, a reasoning item or a file_search_call")
    if not out:
        raise _bad("input", "holds no message")
    return out


def input_items(inp: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The input as the API lists it back (GET /v1/responses/{id}/input_items): items with ids
    and status, a message's content as parts (called after input_messages has checked them)."""
    if isinstance(inp, str):
        inp = [{"role": "user", "content": inp}]
    out = []
    for item in inp:
        kind = item.get("type", "message")
        if kind == "message":
            content = item.get("content")
            part = {"type": "output_text", "annotations": []} if item.get("role") == "assistant" else {
                "type": "input_text"}
            parts = [{**part, "text": content}] if isinstance(content, str) else content
            out.append({"id": item.get("id") or f"msg_{uuid.uuid4().hex}", "type": "message", "role": item["role"],
                        "content": parts, "status": "completed"})
        else:
            prefix = {"function_call": "fc", "function_call_output": "fco", "reasoning": "rs",
                      "file_search_call": "fs"}.get(kind, "item")
            out.append({**item, "id": item.get("id") or f"{prefix}_{uuid.uuid4().hex}",
                        **({"status": item.get("status") or "completed"} if kind != "reasoning" else {})})
    return out


def _chat_tools(req: ResponsesRequest) -> tuple[list[dict[str, Any]] | None, Any]:
    """The function tools and tool_choice in chat's form."""
    tools = None
    if req.tools is not None:
        tools = []
        for i, t in enumerate(req.tools):
            if t.get("type") == "file_search":  # (run by the server before the model: server/file_search.py)
                continue
            if t.get("type") != "function":
                raise _bad(f"tools[{i}].type", f"only function tools and file_search are supported (this server "
                           f"runs no other built-in tools), got {t.get('type')!r}")
            f = {k: v for k, v in t.items() if k != "type"}
            if f.get("parameters", {}) is None:  # (OpenAI's schema allows null: no parameters)
                f["parameters"] = {"type": "object", "properties": {}}
            tools.append({"type": "function", "function": f})
    _, choice = FileSearch.other_tools(req.tools, req.tool_choice)
    if tools == [] and req.tools:  # file_search alone: no function tools for the model
        tools = None
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise _bad("tool_choice", "must be 'none', 'auto', 'required' or {'type': 'function', 'name': ...}")
        choice = {"type": "function", "function": {"name": choice["name"]}}
    return tools, choice


def _response_format(req: ResponsesRequest) -> dict[str, Any] | None:
    fmt = (req.text or {}).get("format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        if fmt.get("schema") is None:
            raise _bad("text.format.schema", "is required with type json_schema")
        if not isinstance(fmt["schema"], (dict, bool)):
            raise _bad("text.format.schema", "must be a JSON schema object")
        return {"type": "json_schema", "json_schema": {k: fmt[k] for k in ("name", "description", "schema", "strict")
                                                       if k in fmt}}
    raise _bad("text.format.type", f"must be 'text', 'json_object' or 'json_schema', got {kind!r}")


def chat_request(req: ResponsesRequest, history: list[dict[str, Any]],
                 turn: list[dict[str, Any]]) -> ChatCompletionRequest:
    """The chat request that runs a Responses request: its instructions, then the conversation it
    continues, then its input; the sampling fields both share pass through."""
    for name in _NOT_HERE:
        if name in req.model_fields_set and getattr(req, name) != type(req).model_fields[name].default:
            raise _bad(name, "is not a field of /v1/responses (use /v1/chat/completions)")
    if req.background:
        raise _bad("background", "background responses are not supported")
    if req.conversation is not None:
        raise _bad("conversation", "is not supported (no Conversations API here): continue a conversation with "
                   "previous_response_id, or send it as input items")
    if req.prompt is not None:
        raise _bad("prompt", "stored prompt templates are not supported: send the instructions and input")
    shared = set(_SamplingFields.model_fields) - set(_NOT_HERE)
    d = req.model_dump(include=shared & req.model_fields_set, by_alias=True, exclude_none=True)
    instructions = [{"role": "system", "content": req.instructions}] if req.instructions else []
    tools, choice = _chat_tools(req)
    d.update(messages=instructions + history + turn, max_completion_tokens=req.max_output_tokens,
             tools=tools, tool_choice=choice, parallel_tool_calls=req.parallel_tool_calls,
             response_format=_response_format(req), chat_template_kwargs=req.chat_template_kwargs,
             logprobs=req.top_logprobs is not None or "message.output_text.logprobs" in (req.include or ()),
             top_logprobs=req.top_logprobs)
    try:
        return ChatCompletionRequest.model_validate_json(json.dumps(d))
    except ValidationError as e:
        raise validation_error(e) from None


def _query(turn: list[dict[str, Any]]) -> str | None:
    """What a file_search searches for: the turn's latest user message (None: a turn of tool outputs)."""
    return next((m["content"] for m in reversed(turn) if m["role"] == "user"), None)


def _owner() -> str | None:
    tags = REQUEST_TAGS.get()
    return tags.get("tenant") if tags else None


def _reasoning_end(rparser: str | None, text: str) -> int:
    """Where a choice's reasoning ends in its text (0: none)."""
    return len(text) - len(split_reasoning(rparser, text)[1] or "") if rparser is not None else 0


def _usage(ctx: ServerContext, prompt_ids: list[int], c: CompletionOutput, cached: int, reasoning_end: int,
           offsets: TextOffsets | None, skip_special_tokens: bool, compute: dict[str, Any] | None) -> dict[str, Any]:
    """offsets: the choice's token offsets when the message's logprobs have them already (else made here)."""
    n_prompt, n_out = len(prompt_ids), len(c.token_ids)
    u: dict[str, Any] = {"input_tokens": n_prompt,
                         "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
                         "output_tokens": n_out, "output_tokens_details": {"reasoning_tokens": 0},
                         "total_tokens": n_prompt + n_out}
    if reasoning_end > 0 and ctx.tokenizer is not None:  # the tokens whose text starts in the reasoning
        offsets = offsets or ctx.text_offsets(prompt_ids, skip_special_tokens)
        starts = offsets.take(c.token_ids, 0, n_out, len(c.text))
        u["output_tokens_details"]["reasoning_tokens"] = sum(o < reasoning_end for o in starts)
    if compute is not None:
        u["compute"] = compute
    return u


def _status(reason: str | None) -> str:
    if reason == "length":
        return "incomplete"
    return "completed" if reason is not None else "cancelled"


def _message(text: str, status: str, logprobs: list[dict[str, Any]]) -> dict[str, Any]:
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}
    return {"id": f"msg_{uuid.uuid4().hex}", "type": "message", "status": status, "role": "assistant",
            "content": [part]}


def _reasoning(text: str, status: str) -> dict[str, Any]:
    return {"id": f"rs_{uuid.uuid4().hex}", "type": "reasoning", "summary": [],
            "content": [{"type": "reasoning_text", "text": text}], "status": status}


def _function_call(call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {"id": f"fc_{uuid.uuid4().hex}", "type": "function_call", "status": status, "call_id": call_id,
            "name": name, "arguments": arguments}


def _assistant_turn(output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The answer's output items as the chat messages a continuation's prompt shows."""
    text = "".join(p["text"] for item in output if item["type"] == "message" for p in item["content"])
    calls = [{"id": item["call_id"], "type": "function", "function": {"name": item["name"],
                                                                         "arguments": item["arguments"]}}
             for item in output if item["type"] == "function_call"]
    msg: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
    if calls:
        msg["tool_calls"] = calls
    return [msg]


async def _fit(ctx: ServerContext, creq: ChatCompletionRequest,
               plan: ChatPlan) -> tuple[ChatCompletionRequest, ChatPlan]:
    """truncation "auto": while the prompt leaves no room for max_output_tokens (or for one token,
    when none was asked for or a tenant's cap filled it in), the conversation's oldest messages
    are dropped (the leading system messages, the instructions among them, and the last message
    stay; a tool result goes with the call before it), as OpenAI drops input items to fit the
    context (trailing tool results keep the call they answer). Each round drops about as many tokens
    as are over, counted message by message."""
    p = plan.params
    need = 1 if p.max_tokens is None or p.max_tokens_is_cap else p.max_tokens
    limit = ctx.llm_engine.max_model_len
    messages = list(creq.messages)
    keep = next((i for i, m in enumerate(messages) if m.role not in ("system", "developer")), len(messages))
    while (over := len(plan.ids) + need - limit) > 0 and keep < _tail(messages):
        dropped = 0
        while dropped < over and keep < _tail(messages):
            dropped += len(await ctx.encode(messages[keep].text(), add_special_tokens=False)) + 4  # (+ its markup)
            del messages[keep]
            while keep < _tail(messages) and messages[keep].role == "tool":
                del messages[keep]
        creq = creq.model_copy(update={"messages": messages})
        plan = await plan_chat(ctx, creq)
    return creq, plan


def _tail(messages: list[Any]) -> int:
    """Where the messages truncation keeps start: the last one, or when the conversation ends with
    tool results, the call they answer (a result without its call is what templates refuse)."""
    i = len(messages) - 1
    while i > 0 and messages[i].role == "tool":
        i -= 1
    return i


class _Run:
    """One request's Responses-side state: its ids, its stored conversation and the response
    object's fields."""

    def __init__(self, gw: Gateway, req: ResponsesRequest, parent: StoredResponse | None,
                 turn: list[dict[str, Any]], name: str, arrival: float, temperature: float, top_p: float) -> None:
        self.gw, self.req, self.parent, self.turn = gw, req, parent, turn
        self.rid = f"resp_{uuid.uuid4().hex}"
        self.name, self.created = name, int(arrival)
        self.temperature, self.top_p = temperature, top_p
        self.store = req.store and gw.responses.enabled
        self.owner = _owner()  # (now: a stream ends after the handler, outside the request's context)
        # The gateway's extras (now, as the owner): a cascade tier writes the model that answered there
        # once it has decided, and that is the response's model, streamed and stored.
        self.extras: dict[str, Any] = EXTRAS.get() or {}

    @property
    def decides_late(self) -> bool:
        return bool(self.extras.get("_decides_late"))

    def response(self, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None,
                 error: dict[str, Any] | None = None) -> dict[str, Any]:
        req = self.req
        done = status not in ("in_progress", "queued")
        return {
            "id": self.rid, "object": "response", "created_at": self.created, "status": status,
            "completed_at": int(time.time()) if done else None, "background": False, "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "model": self.extras.get("model", self.name),
            "output": output, "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": req.previous_response_id,
            "reasoning": req.reasoning or {"effort": None, "summary": None}, "store": self.store,
            "temperature": self.temperature, "top_p": self.top_p, "text": req.text or {"format": {"type": "text"}},
            "tool_choice": req.tool_choice if req.tool_choice is not None else "auto", "tools": req.tools or [],
            "top_logprobs": req.top_logprobs, "truncation": req.truncation or "disabled", "usage": usage,
            "user": req.user, "metadata": req.metadata or {},
        }

    def keep(self, resp: dict[str, Any]) -> None:
        """Stores the finished response (store); one over the whole budget is not kept, and says so."""
        if self.store and resp["status"] in ("completed", "incomplete"):
            resp["store"] = self.gw.responses.put(self.rid, self.owner, resp, self.parent,
                                                  self.turn + _assistant_turn(resp["output"]),
                                                  input_items(self.req.input))


class _ContentLogprobs:
    """The message's logprobs (chat's format): of the tokens whose text starts in the answer's
    content, after the reasoning and before any call; taken as the content grows, so a stream's
    deltas and the unstreamed message hold the same ones."""

    def __init__(self, ctx: ServerContext, prompt_ids: list[int], skip_special_tokens: bool, k: int | None) -> None:
        self.ctx, self.k = ctx, k
        self.offsets = ctx.text_offsets(prompt_ids, skip_special_tokens) if k is not None else None
        self.next = 0  # the tokens before it are taken or dropped

    def take(self, c: CompletionOutput, start: int | None, end: int) -> list[dict[str, Any]]:
        """The logprobs of the tokens not yet taken whose text starts in [start, end) of the choice's
        text; those before start (reasoning) are dropped; start None: not known yet, none taken."""
        if self.offsets is None or start is None:
            return []
        n = len(c.token_ids)
        first = last = self.next
        for o in self.offsets.take(c.token_ids, self.next, n, len(c.text)):
            if o >= end:
                break
            if o < start:
                first += 1
            last += 1
        self.next = last
        return self.ctx.chat_logprobs(c, first, last, self.k, False) if last > first else []


class _EventWriter:
    """The Responses API's typed events for one answer streamed as chat's parts: each output item
    opens (output_item.added, content_part.added), grows (deltas) and closes (the .done events) in
    turn. The output it builds is what the same request gets unstreamed."""

    def __init__(self) -> None:
        self.seq = 0
        self.output: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None  # the item being streamed
        self.logprobs: list[dict[str, Any]] = []  # the open message's
        self.opening: Callable[[], str] | None = None  # events held until the first other one

    def event(self, kind: str, **fields: Any) -> str:
        head = ""
        if self.opening is not None:
            opening, self.opening = self.opening, None
            head = opening()
        d = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return head + f"event: {kind}\ndata: {json.dumps(d, ensure_ascii=False)}\n\n"

    def _start(self, item: dict[str, Any], part: dict[str, Any] | None) -> list[str]:
        self.open = item
        i = len(self.output)
        evs = [self.event("response.output_item.added", output_index=i,
                          item={**item, **({"content": []} if part is not None else {})})]
        if part is not None:
            evs.append(self.event("response.content_part.added", item_id=item["id"], output_index=i,
                                  content_index=0, part=part))
        return evs

    def close(self, status: str = "completed") -> list[str]:
        item, self.open = self.open, None
        if item is None:
            return []
        i = len(self.output)
        item["status"] = status
        evs = []
        if item["type"] == "message":
            part = item["content"][0]
            part["logprobs"] = self.logprobs
            evs += [self.event("response.output_text.done", item_id=item["id"], output_index=i, content_index=0,
                               text=part["text"], logprobs=self.logprobs),
                    self.event("response.content_part.done", item_id=item["id"], output_index=i, content_index=0,
                               part=part)]
            self.logprobs = []
        elif item["type"] == "reasoning":
            part = item["content"][0]
            evs += [self.event("response.reasoning_text.done", item_id=item["id"], output_index=i, content_index=0,
                               text=part["text"]),
                    self.event("response.content_part.done", item_id=item["id"], output_index=i, content_index=0,
                               part=part)]
        else:
            evs.append(self.event("response.function_call_arguments.done", item_id=item["id"], output_index=i,
                                  name=item["name"], arguments=item["arguments"]))
        evs.append(self.event("response.output_item.done", output_index=i, item=item))
        self.output.append(item)
        return evs

    def reasoning(self, delta: str) -> list[str]:
        evs = []
        if self.open is None or self.open["type"] != "reasoning":
            evs = self.close() + self._start(_reasoning("", "in_progress"), {"type": "reasoning_text", "text": ""})
        assert self.open is not None
        self.open["content"][0]["text"] += delta
        return evs + [self.event("response.reasoning_text.delta", item_id=self.open["id"],
                                 output_index=len(self.output), content_index=0, delta=delta)]

    def content(self, delta: str, logprobs: list[dict[str, Any]]) -> list[str]:
        evs = []
        if self.open is None or self.open["type"] != "message":
            evs = self.close() + self._start(_message("", "in_progress", []),
                                             {"type": "output_text", "text": "", "annotations": [], "logprobs": []})
        assert self.open is not None
        self.open["content"][0]["text"] += delta
        self.logprobs += logprobs
        return evs + [self.event("response.output_text.delta", item_id=self.open["id"],
                                 output_index=len(self.output), content_index=0, delta=delta, logprobs=logprobs)]

    def file_search(self, call: dict[str, Any]) -> list[str]:
        """The search, done before the answer: its item's events all at once."""
        i, item_id = len(self.output), call["id"]
        evs = [self.event("response.output_item.added", output_index=i, item={**call, "status": "in_progress"})]
        evs += [self.event(f"response.file_search_call.{stage}", output_index=i, item_id=item_id)
                for stage in ("in_progress", "searching", "completed")]
        evs.append(self.event("response.output_item.done", output_index=i, item=call))
        self.output.append(call)
        return evs

    def call(self, delta: dict[str, Any]) -> list[str]:
        """A chat tool-call delta: a call's header (its id and name) or more of its arguments."""
        evs = []
        if "id" in delta:
            evs = self.close() + self._start(_function_call(delta["id"], delta["function"]["name"], "",
                                                            "in_progress"), None)
        args = delta["function"].get("arguments") or ""
        if args and self.open is not None and self.open["type"] == "function_call":
            self.open["arguments"] += args
            evs.append(self.event("response.function_call_arguments.delta", item_id=self.open["id"],
                                  output_index=len(self.output), delta=args))
        return evs


def register(app: FastAPI, gw: Gateway) -> None:
    def conversation(req: ResponsesRequest) -> StoredResponse | None:
        if req.previous_response_id is None:
            return None
        parent = gw.responses.get(req.previous_response_id, _owner())
        if parent is None:
            raise _ResponsesError(
                400, f"Previous response with id '{req.previous_response_id}' not found. (Responses are kept in this "
                f"server's memory, up to --responses-store-mb: it may have been deleted or evicted.)",
                param="previous_response_id", code="previous_response_not_found")
        return parent

    def precheck(req: ResponsesRequest) -> None:
        """The body's own checks, before the model is waited for (and its conversation, looked up
        once: it must not be evicted while the request waits)."""
        try:
            req._parent = conversation(req)
            req._turn = input_messages(req.input)
            req._chat = chat_request(req, list(req._parent.history) if req._parent else [], req._turn)
            _checked(req._chat)
            req._search = FileSearch(req.tools, req.tool_choice, "file_search_call.results" in (req.include or ()),
                                     _bad)
        except APIError as e:
            raise _renamed(e) from None

    @app.post("/v1/responses", openapi_extra=body(ResponsesRequest))
    @gw.route
    async def create_response(request: Request) -> Response:
        try:
            ctx, req, arrival = await gw.open_request(request, ResponsesRequest, generation=True, precheck=precheck,
                                                      prepare=lambda r: r._search.run(gw, _query(r._turn), request,
                                                                                      r.cache_salt))
            # (again: a tenant's max_tokens cap may have set max_output_tokens since)
            creq = chat_request(req, list(req._parent.history) if req._parent else [], req._turn)
            search: FileSearch = req._search
            creq, plan = await plan_searched(ctx, creq, search, req.max_output_tokens)
            if req.truncation == "auto":
                creq, plan = await _fit(ctx, creq, plan)
            run = _Run(gw, req, req._parent, req._turn, ctx.name, arrival, plan.params.temperature, plan.params.top_p)
            group = await ctx.submit([(run.rid, ctx.prompt_dict(plan.text, plan.ids, creq.cache_salt), plan.params)],
                                     creq.priority, arrival)
        except APIError as e:
            raise _renamed(e) from None
        engine, params, k = ctx.engine, plan.params, plan.k

        if req.stream:
            async def events() -> AsyncIterator[str]:
                w = _EventWriter()

                def opening() -> str:
                    return (w.event("response.created", response=run.response("in_progress", [], None))
                            + w.event("response.in_progress", response=run.response("in_progress", [], None)))

                if run.decides_late:  # a cascade: sent with its first answer, once it knows which model answers
                    w.opening = opening
                else:
                    yield w.event("response.created", response=run.response("in_progress", [], None))
                    yield w.event("response.in_progress", response=run.response("in_progress", [], None))
                if search.call is not None:
                    yield "".join(w.file_search(search.call))
                states: dict[tuple[str, int], ChoiceState] = {}
                answer = AnswerStream(plan.tools, plan.rparser)
                lps = _ContentLogprobs(ctx, plan.ids, params.skip_special_tokens, k)
                cached: dict[str, int] = {}
                computes: dict[str, Any] = {}
                status, last, sent = "cancelled", None, 0  # sent: the content's characters streamed
                try:
                    async for _, c, d in ctx.choice_deltas(group, params, states, cached, computes):
                        think, content, calls, reason = answer.feed(c.text[: d.text_start + len(d.text)], d.text,
                                                                    d.finish_reason)
                        evs = []
                        last = c
                        if think:
                            evs += w.reasoning(think)
                        if content:
                            sent += len(content)
                            rs = answer.reasoning
                            start = 0 if rs is None else rs.content_from
                            evs += w.content(content, lps.take(c, start, (start or 0) + sent))
                        for call in calls:
                            evs += w.call(call)
                        if c.finished():
                            status = _status(finish_reason(c))
                            if w.open is None and all(o["type"] == "file_search_call" for o in w.output):
                                # an empty answer is an empty message
                                evs += w.content("", [])
                            evs += w.close("incomplete" if status == "incomplete" else "completed")
                        if evs:
                            yield "".join(evs)
                except StreamFailed as e:
                    err = engine_api_error(e.message, e.status)  # (the code an unstreamed response has)
                    msg = err.message
                    yield w.event("error", code=err.code, message=msg, param=None)
                    failed = run.response("failed", w.output, None, {"code": "server_error", "message": msg})
                    yield w.event("response.failed", response=failed)
                    return
                if status == "cancelled":  # (the engine ended it without a finish reason: aborted)
                    failed = run.response("failed", w.output, None,
                                          {"code": "server_error", "message": "the request was aborted"})
                    yield w.event("response.failed", response=failed)
                    return
                usage = None if last is None else _usage(
                    ctx, plan.ids, last, cached.get(run.rid, 0), _reasoning_end(plan.rparser, last.text), lps.offsets,
                    params.skip_special_tokens, sum_compute(computes.values()))
                final = run.response(status, w.output, usage)
                run.keep(final)
                yield w.event("response.completed" if status == "completed" else "response.incomplete", response=final)

            return sse_response(events(), lambda: engine.release(group))

        async def collect() -> Response:
            out = (await collect_finished(engine, group))[run.rid]
            if out.error is not None:
                return error_response(ctx.engine_error(out))
            c = out.outputs[0]
            status = _status(finish_reason(c))
            if status == "cancelled":  # (the engine ended it without a finish reason: aborted)
                return error_response(APIError(500, "the request was aborted", code="engine_error"))
            thought, content, calls, reason = answer_parts(plan.tools, plan.rparser, c.text, finish_reason(c))
            start = _reasoning_end(plan.rparser, c.text)
            lps = _ContentLogprobs(ctx, plan.ids, params.skip_special_tokens, k)
            output: list[dict[str, Any]] = [search.call] if search.call is not None else []
            if thought:
                output.append(_reasoning(thought, "completed"))
            if content or not (thought or calls):
                output.append(_message(content or "", "completed", lps.take(c, start, start + len(content or ""))))
            output += [_function_call(t["id"], t["function"]["name"], t["function"]["arguments"], "completed")
                       for t in calls]
            if status == "incomplete" and output:
                output[-1]["status"] = "incomplete"
            usage = _usage(ctx, plan.ids, c, out.num_cached_tokens, start, lps.offsets, params.skip_special_tokens,
                           out.compute)
            resp = run.response(status, output, usage)
            run.keep(resp)
            return JSONResponse(resp)

        return await unless_disconnected(request, collect())

    def stored(request: Request, response_id: str) -> StoredResponse:
        tenant = gw.check_auth(request)
        e = gw.responses.get(response_id, tenant.name if tenant is not None else None)
        if e is None:
            raise APIError(404, f"No response found with id '{response_id}'.", param="response_id",
                           code="response_not_found")
        return e

    @app.post("/v1/responses/input_tokens", openapi_extra=body(ResponsesRequest))
    @gw.route
    async def count_input_tokens(request: Request) -> Response:
        """The prompt tokens a request would have (OpenAI's input_tokens.count): its instructions,
        conversation, input and tools as the chat template shows them. Nothing is loaded to count."""
        tenant = gw.check_auth(request)
        tags = REQUEST_TAGS.get()
        if tenant is not None and tags is not None:  # (its stored responses are the ones it may continue)
            tags["tenant"] = tenant.name
        try:
            ctx, req, _ = await gw.open_request(request, ResponsesRequest, auth=False, precheck=precheck)
            gw.check_model(req.model, tenant)  # (a tenant counts only against the models it may use)
            ids = await ctx.encode(ctx.chat_prompt(req._chat), add_special_tokens=False)
        except APIError as e:
            raise _renamed(e) from None
        return JSONResponse({"object": "response.input_tokens", "input_tokens": len(ids)})

    @app.post("/v1/responses/{rest:path}", include_in_schema=False)
    async def not_served(rest: str) -> Response:
        raise APIError(404, f"POST /v1/responses/{rest} is not served here (tokenmill serves create, retrieve, "
                       f"delete, input_items and input_tokens)", code="not_found")

    @app.get("/v1/responses/{response_id}/input_items")
    async def list_input_items(request: Request, response_id: str, order: str = "desc", limit: str = "20",
                               after: str | None = None) -> Response:
        """A stored response's input items (its request's own), a page at a time, as OpenAI lists them."""
        items = stored(request, response_id).input_items
        if order not in ("asc", "desc"):
            raise APIError(400, f"order: must be 'asc' or 'desc', got {order!r}", param="order")
        n = int(limit) if limit.isascii() and limit.isdigit() else 0
        if not 1 <= n <= 100:
            raise APIError(400, f"limit: must be an integer in [1, 100], got {limit!r}", param="limit")
        limit = n  # type: ignore[assignment]
        items = items if order == "asc" else items[::-1]
        if after is not None:
            at = next((i for i, x in enumerate(items) if x["id"] == after), None)
            if at is None:
                raise APIError(400, f"after: no input item {after!r} in this response", param="after")
            items = items[at + 1:]
        page = items[:limit]
        return JSONResponse({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                             "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit})

    @app.get("/v1/responses/{response_id}")
    async def retrieve_response(request: Request, response_id: str) -> Response:
        return JSONResponse(stored(request, response_id).response)

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(request: Request, response_id: str) -> Response:
        e = stored(request, response_id)
        gw.responses.delete(response_id, e.owner)
        return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})
