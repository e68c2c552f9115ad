"""Tool calling on /v1/chat/completions: the request's tools and tool_choice, and the parsers that
find tool calls in a model's text, whole or as it streams.

tool_choice decides how calls come about:
- "auto" (the default with tools): the model writes calls in its own format, found by the parser
  chosen with --tool-call-parser or inferred from the chat template:
  - hermes: Qwen2.5 / Qwen3 and Hermes, `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
  - llama3_json: Llama 3.1-3.3, `{"name": ..., "parameters": {...}}` (after `<|python_tag|>`, `;` between calls)
  - mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}]` or `[TOOL_CALLS]name[ARGS]{...}`
- "required": decoding is constrained to a JSON array of {"name", "parameters"} objects whose
  parameters follow each tool's schema (vLLM's way), so even a weak model returns valid calls.
- a named function: decoding is constrained to that function's parameters schema; the text is
  the arguments.
- "none": tools are shown to the template, nothing is parsed.

Streaming re-scans the text so far on every delta (a tolerant scan of possibly unfinished JSON)
and sends what is new, as OpenAI does: a call's first delta carries its index, id, type, name
and empty arguments; later ones carry argument text.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass, field
from typing import Any

from tokenmill.structured import StructuredOutputsParams

PARSERS = ("hermes", "llama3_json", "mistral")
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


def infer_parser(chat_template: str | None) -> str | None:
    """The parser a chat template's tool-call format needs, when the template shows one."""
    # A tokenizer may carry several named templates (default, tool_use, ...).
    t = " ".join(chat_template.values()) if isinstance(chat_template, dict) else (chat_template or "")
    if "<tool_call>" in t:
        return "hermes"
    if "[TOOL_CALLS]" in t:
        return "mistral"
    if "<|python_tag|>" in t or "ipython" in t:
        return "llama3_json"
    return None


def call_id(parser: str | None) -> str:
    if parser == "mistral":  # Mistral's templates require 9 alphanumerics
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))
    return f"call_{secrets.token_hex(12)}"


# -- the request --------------------------------------------------------------------------------
@dataclass
class ToolSetup:
    """What a request's tools and tool_choice mean for decoding and for its response."""

    tools: list[dict[str, Any]]  # as the chat template gets them
    mode: str  # "none" | "auto" | "required" | "named"
    parser: str | None  # the text format for "auto"
    named: str | None = None
    constraint: StructuredOutputsParams | None = None
    names: frozenset[str] = frozenset()  # the declared functions: a call to anything else is text

    @classmethod
    def from_request(cls, tools: list[dict[str, Any]] | None, tool_choice: Any, parallel: bool | None,
                     parser: str | None) -> ToolSetup | None:
        """ValueError naming the field at fault for a malformed tool or choice."""
        if not tools:
            if tool_choice not in (None, "none"):
                raise ValueError("tool_choice: only allowed when tools are given")
            return None
        funcs: dict[str, dict[str, Any]] = {}
        for i, t in enumerate(tools):
            f = t.get("function") if isinstance(t, dict) else None
            if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(f, dict):
                raise ValueError(f"tools[{i}]: must be {{'type': 'function', 'function': {{...}}}}")
            name = f.get("name")
            if not isinstance(name, str) or not _NAME.match(name):
                raise ValueError(f"tools[{i}].function.name: must be 1-64 letters, digits, '_', '-' or '.'")
            params = f.get("parameters", {"type": "object", "properties": {}})
            if not isinstance(params, dict):
                raise ValueError(f"tools[{i}].function.parameters: must be a JSON schema object")
            if name in funcs:
                raise ValueError(f"tools[{i}].function.name: {name!r} appears twice")
            funcs[name] = params
        choice = "auto" if tool_choice is None else tool_choice
        named = None
        if isinstance(choice, dict):
            f = choice.get("function")
            named = f.get("name") if isinstance(f, dict) else None
            if choice.get("type") != "function" or not isinstance(named, str):
                raise ValueError("tool_choice: must be 'none', 'auto', 'required' or "
                                 "{'type': 'function', 'function': {'name': ...}}")
            if named not in funcs:
                raise ValueError(f"tool_choice: no tool named {named!r} in tools")
            choice = "named"
        elif choice not in ("none", "auto", "required"):
            raise ValueError(f"tool_choice: must be 'none', 'auto', 'required' or a named function, got {choice!r}")
        setup = cls(tools=[{"type": "function", "function": t["function"]} for t in tools], mode=choice,
                    parser=parser, named=named, names=frozenset(funcs))
        if choice == "named":
            setup.constraint = StructuredOutputsParams(json=funcs[named])
        elif choice == "required":
            defs: dict[str, Any] = {}
            one = [{"type": "object", "properties": {"name": {"const": n}, "parameters": _hoist_defs(p, n, defs)},
                    "required": ["name", "parameters"], "additionalProperties": False} for n, p in funcs.items()]
            array: dict[str, Any] = {"type": "array", "minItems": 1,
                                     "items": one[0] if len(one) == 1 else {"anyOf": one}}
            if defs:
                array["$defs"] = defs
            if parallel is False:
                array["maxItems"] = 1
            setup.constraint = StructuredOutputsParams(json=array)
        return setup

    @property
    def text_format(self) -> str | None:
        """How calls appear in the generated text: a parser's name, "array", "arguments" or None."""
        return {"auto": self.parser, "required": "array", "named": "arguments"}.get(self.mode)


def _hoist_defs(schema: dict[str, Any], tool: str, defs: dict[str, Any]) -> dict[str, Any]:
    """A tool's parameters schema nested inside the `required` array schema: its own $defs (what
    pydantic writes for nested models) move to the root under the tool's name, refs rewritten."""
    own = {**schema.get("definitions", {}), **schema.get("$defs", {})}
    if not own:
        return schema
    renames = {}
    for key in ("$defs", "definitions"):
        for k in schema.get(key, {}):
            renames[f"#/{key}/{k}"] = f"#/$defs/{tool}__{k}"

    def rewrite(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: (renames.get(x, x) if k == "$ref" and isinstance(x, str) else rewrite(x)) for k, x in v.items()}
        if isinstance(v, list):
            return [rewrite(x) for x in v]
        return v

    for k, v in own.items():
        defs[f"{tool}__{k}"] = rewrite(v)
    return rewrite({k: v for k, v in schema.items() if k not in ("$defs", "definitions")})


def template_messages(messages: list[Any]) -> list[dict[str, Any]]:
    """Chat messages as chat templates expect them: an assistant's tool-call arguments as objects
    (templates serialize them with tojson), tool results with their call id."""
    out = []
    for m in messages:
        d: dict[str, Any] = {"role": m.role, "content": m.text()}
        if m.name:
            d["name"] = m.name
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            calls = []
            for tc in m.tool_calls:
                try:
                    args = json.loads(tc.function.arguments)
                except ValueError:
                    args = tc.function.arguments
                calls.append({"id": tc.id, "type": "function",
                              "function": {"name": tc.function.name, "arguments": args}})
            d["tool_calls"] = calls
        out.append(d)
    return out


# -- scanning text that may stop anywhere -------------------------------------------------------
@dataclass
class CallScan:
    name: str | None = None
    args: str | None = None  # the arguments' text so far
    args_done: bool = False
    done: bool = False  # the whole call is complete


def scan_object(text: str, i: int) -> tuple[int | None, dict[str, tuple[int, int | None]]]:
    """Scans the JSON object starting at text[i] ('{'), which may be unfinished: (the index after
    its closing brace or None, {top-level key: (value start, value end or None while unfinished)})."""
    fields: dict[str, tuple[int, int | None]] = {}
    depth, j, n = 0, i, len(text)
    in_str = esc = False
    str_start = 0
    pending: str | None = None  # a key waiting for its ':'
    key: str | None = None  # the key whose value is being read
    vstart: int | None = None

    def end_scalar(at: int) -> None:
        nonlocal key
        if key is not None and vstart is not None:
            e = at
            while e > vstart and text[e - 1].isspace():
                e -= 1
            fields[key] = (vstart, e)
        key = None

    while j < n:
        c = text[j]
        if in_str:
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == '"':
                in_str = False
                if depth == 1:
                    if key is None:
                        try:
                            pending = json.loads(text[str_start : j + 1])
                        except ValueError:
                            pending = text[str_start + 1 : j]
                    elif vstart == str_start:
                        fields[key] = (vstart, j + 1)
                        key = None
        elif c == '"':
            in_str, str_start = True, j
            if depth == 1 and key is not None and vstart is None:
                vstart = j
        elif c in "{[":
            if depth == 1 and key is not None and vstart is None:
                vstart = j
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 1 and key is not None and vstart is not None and text[vstart] in "{[":
                fields[key] = (vstart, j + 1)
                key = None
            if depth == 0:
                end_scalar(j)
                return j + 1, fields
        elif depth == 1:
            if c == ":" and pending is not None:
                key, pending, vstart = pending, None, None
            elif c == ",":
                end_scalar(j)
            elif not c.isspace() and key is not None and vstart is None:
                vstart = j
        j += 1
    if key is not None and vstart is not None:
        fields[key] = (vstart, None)
    return None, fields


def call_from_object(text: str, i: int, args_keys: tuple[str, ...] = ("arguments", "parameters")
                     ) -> tuple[CallScan, int | None]:
    end, fields = scan_object(text, i)
    call = CallScan(done=end is not None)
    span = fields.get("name")
    if span is not None and span[1] is not None:
        try:
            name = json.loads(text[span[0] : span[1]])
            call.name = name if isinstance(name, str) else None
        except ValueError:
            pass
    for k in args_keys:
        if k in fields:
            s, e = fields[k]
            call.args, call.args_done = text[s : e if e is not None else len(text)], e is not None
            break
    else:
        if call.done:
            call.args, call.args_done = "{}", True
    return call, end


def scan_sequence(text: str, i: int) -> tuple[list[CallScan], int]:
    """Calls written as JSON objects from text[i] on, separated by whitespace, ',' or ';' (and
    opened by '[' when they form an array); stops at anything else. Returns where it stopped."""
    calls = []
    while True:
        while i < len(text) and (text[i].isspace() or text[i] in ",;["):
            i += 1
        if i >= len(text) or text[i] != "{":
            return calls, i
        call, end = call_from_object(text, i)
        calls.append(call)
        if end is None:
            return calls, len(text)
        i = end


def _held(text: str, marker: str) -> int:
    """How many trailing characters of text could start marker (held back from content)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


@dataclass
class Scan:
    content: str  # content text that is safe to send
    calls: list[CallScan]


def scan(fmt: str, text: str, final: bool) -> Scan:
    """The content and calls in `text` written in format fmt (a parser, "array" or "arguments")."""
    if fmt == "arguments":
        return Scan("", [CallScan(args=text, args_done=final, done=final)])
    if fmt == "array":
        calls, _ = scan_sequence(text, 0)
        return Scan("", calls)
    if fmt == "hermes":
        start = text.find("<tool_call>")
        if start < 0:
            return Scan(text if final else text[: len(text) - _held(text, "<tool_call>")], [])
        calls = []
        for part in text[start:].split("<tool_call>")[1:]:
            part = part.split("</tool_call>")[0]
            k = part.find("{")
            if k >= 0:
                calls.append(call_from_object(part, k)[0])
        return Scan(text[:start], calls)
    if fmt == "mistral":
        start = text.find("[TOOL_CALLS]")
        if start < 0:
            return Scan(text if final else text[: len(text) - _held(text, "[TOOL_CALLS]")], [])
        rest = text[start + len("[TOOL_CALLS]"):]
        if rest.lstrip().startswith("[") or rest.lstrip().startswith("{"):
            calls, _ = scan_sequence(rest, 0)
        else:  # [TOOL_CALLS]name[ARGS]{...}, once per call
            calls = []
            for part in rest.split("[TOOL_CALLS]"):
                name, sep, args = part.partition("[ARGS]")
                if not sep:
                    if final and name.strip():
                        calls.append(CallScan(name=name.strip(), args="{}", args_done=True, done=True))
                    continue
                k = args.find("{")
                end = scan_object(args, k)[0] if k >= 0 else None
                calls.append(CallScan(name=name.strip(), args=args[k:end] if k >= 0 else "",
                                      args_done=end is not None, done=end is not None))
        return Scan(text[:start], calls)
    if fmt == "llama3_json":
        body = text.lstrip()
        tagged = body.startswith("<|python_tag|>")
        if tagged:
            body = body[len("<|python_tag|>"):].lstrip()
        if not body:
            return Scan(text if final and not tagged else "", [])
        if not body.startswith("{"):
            if "<|python_tag|>".startswith(text.lstrip()) and not final:
                return Scan("", [])
            return Scan(text, [])
        calls, _ = scan_sequence(body, 0)
        if final and not any(c.name for c in calls):
            return Scan(text, [])  # plain JSON the model wrote as its answer
        return Scan("", calls)
    raise ValueError(f"unknown tool-call format {fmt!r}")


# -- responses ----------------------------------------------------------------------------------
def _arguments(call: CallScan) -> str | None:
    """The call's arguments as a JSON text, or None when they are not valid JSON."""
    args = call.args if call.args is not None else "{}"
    try:
        value = json.loads(args, strict=False)  # control characters inside strings are common
    except ValueError:
        return None
    if isinstance(value, str):  # some models write the arguments as a JSON string
        try:
            value, args = json.loads(value, strict=False), value
        except ValueError:
            return None
    return args if isinstance(value, dict) else None


def parse_calls(setup: ToolSetup, text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool_calls) of a finished choice. Text that does not hold well-formed calls
    stays content."""
    fmt = setup.text_format
    if fmt is None:
        return text, []
    s = scan(fmt, text, final=True)
    calls = []
    for c in s.calls:
        name = setup.named if fmt == "arguments" else c.name
        args = _arguments(c)
        if not c.done or name not in setup.names or args is None:
            return text, []
        calls.append({"id": call_id(setup.parser), "type": "function", "function": {"name": name, "arguments": args}})
    if not calls:
        return text, []
    return (s.content or None), calls


@dataclass
class _Sent:
    id: str
    name_sent: bool = False
    args: int = 0  # characters of arguments sent


@dataclass
class ToolStream:
    """One streamed choice: turns its growing text into content and tool-call deltas."""

    setup: ToolSetup
    content_sent: int = 0
    sent: list[_Sent] = field(default_factory=list)

    def feed(self, text: str, final: bool) -> tuple[str, list[dict[str, Any]]]:
        """(new content, new tool_calls delta entries) for the choice's whole text so far."""
        fmt = self.setup.text_format
        if fmt is None:
            new, self.content_sent = text[self.content_sent:], len(text)
            return new, []
        s = scan(fmt, text, final)
        content = s.content[self.content_sent:] if len(s.content) > self.content_sent else ""
        self.content_sent = max(self.content_sent, len(s.content))
        deltas = []
        for i, c in enumerate(s.calls):
            name = self.setup.named if fmt == "arguments" else c.name
            if name is None or name not in self.setup.names:
                break  # calls stream in order; this one's name is still being written (or is no tool's)
            if i == len(self.sent):
                self.sent.append(_Sent(call_id(self.setup.parser)))
            st = self.sent[i]
            args = c.args or ""
            # Object arguments stream as they grow; a string or scalar waits until complete.
            streamable = args.startswith("{") or c.args_done
            if c.args_done:
                args = _arguments(c) or args
            new_args = args[st.args:] if streamable and len(args) > st.args else ""
            if not st.name_sent:  # OpenAI's first delta of a call: its id, type, name and no arguments
                deltas.append({"index": i, "id": st.id, "type": "function",
                               "function": {"name": name, "arguments": ""}})
                st.name_sent = True
            if new_args:
                deltas.append({"index": i, "function": {"arguments": new_args}})
            st.args += len(new_args)
        return content, deltas

    @property
    def called(self) -> bool:
        return bool(self.sent)
