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
parallel_tool_calls false: at most one call (auto returns the first the model wrote, as vLLM does).

CallParser reads a choice's text as it grows, once in all (a tolerant, resumable scan of possibly
unfinished JSON, in which markers inside strings are text); ToolStream sends what is new, as OpenAI
streams calls, and parse_calls gives the unstreamed response by the same final rule.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass
from typing import Any

from tokenmill.server.streaming import held_back
from tokenmill.structured import StructuredOutputsParams

PARSERS = ("hermes", "llama3_json", "mistral")
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")  # fullmatch: "$" would let a trailing newline in


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
    parallel: bool = True  # parallel_tool_calls; false: at most one call (auto: the first, as vLLM returns)

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
            if not isinstance(name, str) or not _NAME.fullmatch(name):
                raise ValueError(f"tools[{i}].function.name: must be 1-64 letters, digits, '_', '-' or '.'")
            params = f.get("parameters", {"type": "object", "properties": {}})
            if not isinstance(params, dict):
                raise ValueError(f"tools[{i}].function.parameters: must be a JSON schema object")
            for key in ("$defs", "definitions"):  # (_hoist_defs reads them as mappings)
                if not isinstance(params.get(key, {}), dict):
                    raise ValueError(f"tools[{i}].function.parameters.{key}: must be an object")
            if name in funcs:
                raise ValueError(f"tools[{i}].function.name: {name!r} appears twice")
            # Arguments are an object: a schema that leaves the type open ({} for a function
            # without parameters) would let a constrained call write any JSON value.
            funcs[name] = params if "type" in params else {**params, "type": "object"}
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
        elif choice == "auto" and parser is None:  # the calls could not be found in the text (vLLM: a 400 too)
            raise ValueError("tool_choice: 'auto' (the default with tools) needs a tool-call parser, and this "
                             "model's chat template shows no tool-call format; start the server with "
                             f"--tool-call-parser ({'|'.join(PARSERS)}), or use tool_choice 'required', "
                             "a named function or 'none'")
        setup = cls(tools=template_tools(tools), mode=choice,
                    parser=parser, named=named, names=frozenset(funcs), parallel=parallel is not False)
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


def template_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Tools as the chat template gets them (each {"type": "function", "function": ...}, whatever
    order or omissions the client sent); a fleet router renders prompts with the same."""
    if not tools:
        return None
    return [{"type": "function", "function": t["function"]} for t in tools]


# apply_chat_template's arguments in transformers (a tokenizer wrapping it may hide them behind **kwargs)
_TEMPLATE_ARGS = {"conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
                  "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
                  "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"}


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                tools: list[dict[str, Any]] | None = None, continue_final_message: bool = False,
                chat_template_kwargs: dict[str, Any] | None = None, *,
                documents: list[dict[str, Any]] | None = None, chat_template: str | None = None) -> str:
    """A conversation (as template_messages makes it) as the prompt text its chat template makes:
    what the chat endpoint, /tokenize, a fleet router (to hash it) and LLM.chat all render, as
    vLLM does. continue_final_message leaves the last message open for the model to go on;
    chat_template_kwargs reach the template (Qwen3's {"enable_thinking": false}); documents too, as
    the `documents` variable of RAG templates (Command-R's, Granite's); chat_template replaces the
    tokenizer's. ValueError naming the field at fault."""
    import inspect

    if tokenizer is None:
        raise ValueError("messages: this model has no tokenizer; use completions with token ids")
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError("messages: this model's tokenizer has no chat template; use completions with a prompt "
                         "(or start the server with --chat-template)")
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message: cannot be combined with add_generation_prompt; set "
                         "add_generation_prompt to false")
    for i, t in enumerate(tools or []):
        if not isinstance(t, dict) or not isinstance(t.get("function"), dict):
            raise ValueError(f"tools[{i}]: must be {{'type': 'function', 'function': {{...}}}}")
    kwargs = dict(chat_template_kwargs or {})
    # (apply_chat_template's own arguments are the request's to set, not the template's)
    own = {n for n, p in inspect.signature(tokenizer.apply_chat_template).parameters.items()
           if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)} | _TEMPLATE_ARGS
    clash = sorted(set(kwargs) & own)
    if clash:
        raise ValueError(f"chat_template_kwargs: {clash[0]!r} is a request field of its own, not a template variable")
    template = chat_template if chat_template is not None else tokenizer.chat_template
    if not isinstance(template, str):  # named templates: the one apply_chat_template will pick
        try:
            template = tokenizer.get_chat_template(None, template_tools(tools))
        except Exception:  # (it raises its own error again below)
            template = ""
    if "developer" not in template:  # OpenAI's newer name for system, to a template that knows only that
        messages = [{**m, "role": "system"} if m.get("role") == "developer" else m for m in messages]
    try:
        if documents is not None:
            kwargs["documents"] = documents
        if chat_template is not None:
            kwargs["chat_template"] = chat_template
        return tokenizer.apply_chat_template(messages, tools=template_tools(tools),
                                             add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message, tokenize=False, **kwargs)
    except Exception as e:  # a template may raise on role orders it does not accept
        raise ValueError(f"messages: the chat template rejected the conversation: {e}") from None


def loose_messages(messages: list[Any]) -> list[dict[str, Any]]:
    """Offline (LLM.chat) messages as templates expect them, read as vLLM's LLM.chat reads them:
    any role and any extra key (reasoning_content, ...) go through; text content parts are joined;
    a tool call's arguments given as a JSON string are parsed. ValueError naming the message."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"messages[{i}]: must be a dict with a 'role'")
        d = dict(m)
        content = d.get("content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"messages[{i}].content[{j}]: only text parts ({{'type': 'text', 'text': "
                                     f"...}}) are supported")
                texts.append(part["text"])
            d["content"] = "".join(texts)
        elif content is not None and not isinstance(content, str):
            raise ValueError(f"messages[{i}].content: a string or a list of text parts")
        calls = d.get("tool_calls")
        if isinstance(calls, list):
            fixed = []
            for c in calls:
                f = c.get("function") if isinstance(c, dict) else None
                if isinstance(f, dict) and isinstance(f.get("arguments"), str):
                    try:
                        c = {**c, "function": {**f, "arguments": json.loads(f["arguments"])}}
                    except ValueError:
                        pass
                fixed.append(c)
            d["tool_calls"] = fixed
        out.append(d)
    return out


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
_IN_STRING = re.compile(r'["\\]')  # what ends a run of plain characters inside a JSON string
_NESTED = re.compile(r'["{}\[\]<]')  # what matters below the top level of an object


class ObjectScan:
    """The JSON object starting at text[start] ('{'), read as far as the text goes and resumed
    where it stopped when more text arrives, so a streamed call is read once in all. It tracks
    strings and nesting and where each top-level value lies, not full JSON validity. A '<' outside
    strings (a closing tag after a malformed object) ends it as broken."""

    def __init__(self, start: int) -> None:
        self.start = start
        self.j = start  # the next character to read
        self.depth = 0
        self.in_str = self.esc = False
        self.str_start = 0
        self.pending: str | None = None  # a key waiting for its ':'
        self.key: str | None = None  # the key whose value is being read
        self.vstart: int | None = None
        self.fields: dict[str, tuple[int, int]] = {}  # finished top-level values (a repeated key's first)
        self.end: int | None = None  # the index after the closing brace
        self.broken = False

    def span(self, key: str) -> tuple[int, int | None] | None:
        """Where key's value lies: (start, end), or (start, None) while it is being written."""
        if key in self.fields:
            return self.fields[key]
        if key == self.key and self.vstart is not None and self.end is None:  # (or where it broke)
            return self.vstart, None
        return None

    def _end_scalar(self, text: str, at: int) -> None:
        if self.key is not None and self.vstart is not None:
            e = at
            while e > self.vstart and text[e - 1].isspace():
                e -= 1
            self.fields.setdefault(self.key, (self.vstart, e))
        self.key = None

    def advance(self, text: str) -> None:
        j, n = self.j, len(text)
        while j < n and self.end is None and not self.broken:
            if self.in_str:
                if self.esc:
                    self.esc = False
                    j += 1
                    continue
                m = _IN_STRING.search(text, j)
                if m is None:
                    j = n
                    break
                j = m.start()
                if text[j] == "\\":
                    self.esc = True
                else:
                    self.in_str = False
                    if self.depth == 1:
                        if self.key is None:
                            try:
                                self.pending = json.loads(text[self.str_start : j + 1], strict=False)
                            except ValueError:
                                self.pending = text[self.str_start + 1 : j]
                        elif self.vstart == self.str_start:
                            self.fields.setdefault(self.key, (self.vstart, j + 1))
                            self.key = None
                j += 1
                continue
            if self.depth > 1:  # inside a value: only strings and brackets matter
                m = _NESTED.search(text, j)
                if m is None:
                    j = n
                    break
                j = m.start()
            c = text[j]
            if c == '"':
                self.in_str, self.str_start = True, j
                if self.depth == 1 and self.key is not None and self.vstart is None:
                    self.vstart = j
            elif c in "{[":
                if self.depth == 1 and self.key is not None and self.vstart is None:
                    self.vstart = j
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if (self.depth == 1 and self.key is not None and self.vstart is not None
                        and text[self.vstart] in "{["):
                    self.fields.setdefault(self.key, (self.vstart, j + 1))
                    self.key = None
                if self.depth == 0:
                    self._end_scalar(text, j)
                    self.end = j + 1
            elif c == "<":
                self.broken = True
                break
            elif self.depth == 1:
                if c == ":" and self.pending is not None:
                    self.key, self.pending, self.vstart = self.pending, None, None
                elif c == ",":
                    self._end_scalar(text, j)
                elif not c.isspace() and self.key is not None and self.vstart is None:
                    self.vstart = j
            j += 1
        self.j = j


@dataclass
class CallScan:
    """One call as far as the text goes. Its arguments are a span of the text, or fixed."""

    name: str | None = None
    args_key: str | None = None
    args_start: int | None = None
    args_end: int | None = None  # None while the arguments are being written
    fixed: str | None = None  # arguments that are not in the text ("{}" for a call without any)
    done: bool = False  # the call is complete
    ok: bool = True  # nothing malformed was met
    name_read: bool = False
    normalized: str | None = None  # the finished arguments as sent (see view_args), once computed

    @property
    def args_done(self) -> bool:
        return self.fixed is not None or self.args_end is not None

    def args(self, text: str) -> str | None:
        if self.fixed is not None:
            return self.fixed
        if self.args_start is None:
            return None
        return text[self.args_start : self.args_end if self.args_end is not None else len(text)]

    def view_args(self, text: str) -> str:
        """The arguments as streamed and as a call cut short returns them: finished ones as JSON
        (a JSON string holding an object decoded), unfinished ones as written so far; control
        characters inside strings escaped either way (see escape_controls)."""
        if not self.args_done:
            return _strict(self.args(text) or "")
        if self.normalized is None:
            self.normalized = _arguments(self, text) or _strict(self.args(text) or "")
        return self.normalized


_CONTROL = re.compile(r"[\x00-\x1f]")
_IN_STRING_OR_CONTROL = re.compile(r'["\\\x00-\x1f]')
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}


def escape_controls(s: str, state: tuple[bool, bool] = (False, False)) -> tuple[str, tuple[bool, bool]]:
    """A piece of JSON text with the raw control characters inside its strings escaped: models
    write raw newlines in strings (code, text), which strict JSON parsers (json.loads, JSON.parse)
    reject. state: (inside a string, after a backslash) where the piece starts; the state where
    it ends comes back, so a growing text is escaped piece by piece, each character once, and
    the pieces join to the whole text's escape."""
    in_str, esc = state
    out: list[str] = []
    i, n = 0, len(s)
    while i < n:
        if esc:  # the escaped character, whatever it is
            out.append(s[i])
            esc, i = False, i + 1
        elif not in_str:
            j = s.find('"', i)
            if j < 0:
                out.append(s[i:])
                break
            out.append(s[i : j + 1])
            in_str, i = True, j + 1
        else:
            m = _IN_STRING_OR_CONTROL.search(s, i)
            if m is None:
                out.append(s[i:])
                break
            j = m.start()
            c = s[j]
            out.append(s[i:j])
            if c == '"':
                in_str = False
            elif c == "\\":
                esc = True
            else:
                c = _SHORT_ESCAPES.get(c) or f"\\u{ord(c):04x}"
            out.append(c)
            i = j + 1
    return "".join(out), (in_str, esc)


def _strict(s: str) -> str:
    return escape_controls(s)[0] if _CONTROL.search(s) else s


def _is_object(s: str) -> bool:
    try:
        return isinstance(json.loads(s, strict=False), dict)
    except ValueError:
        return False


@dataclass
class Scan:
    content: int  # the content is text[:content]: what is safe to send as content
    calls: list[CallScan]


_MARK = {"hermes": "<tool_call>", "mistral": "[TOOL_CALLS]"}
_HERMES_TAG = re.compile(r"</?tool_call>")
_MISTRAL_TAG = re.compile(r"\[ARGS\]|\[TOOL_CALLS\]")
_PYTHON_TAG = "<|python_tag|>"
_START = {"hermes": "seek", "mistral": "seek", "llama3_json": "l3", "array": "seq", "arguments": "args"}


def _skip(text: str, i: int, chars: str = "") -> int:
    while i < len(text) and (text[i].isspace() or text[i] in chars):
        i += 1
    return i


class CallParser:
    """The content and calls of a growing text written in one format: a parser's name, "array"
    (tool_choice required) or "arguments" (a named function). feed() gets the whole text so far
    and reads only what is new, so a stream is read in linear time; markers inside JSON strings
    are text. A small state machine: seek a format's marker, read the calls' objects, and so on."""

    def __init__(self, fmt: str) -> None:
        if fmt not in _START:
            raise ValueError(f"unknown tool-call format {fmt!r}")
        self.fmt = fmt
        self.state = _START[fmt]
        self.pos = self.search = 0  # where the state reads from; where a marker search resumes
        self.calls: list[CallScan] = []
        self.content_end: int | None = None  # where the calls begin, once a marker is found
        self.obj: ObjectScan | None = None
        self.after = ""  # the state after the current object
        self.junk = False  # hermes: text between an object and its closing tag
        self.tagged = False  # llama3_json: <|python_tag|> was seen
        self.finished = False

    def feed(self, text: str, final: bool) -> Scan:
        while self._step(text, final):
            pass
        if final and not self.finished:
            self.finished = True
            self._finish(text)
        return Scan(self._content(text, final), self._visible())

    def _go(self, state: str, pos: int) -> bool:
        self.state, self.pos, self.search = state, pos, pos
        return True

    def _object(self, i: int, after: str, name: str | None = None) -> bool:
        """Reads a call's object from text[i]; with a name, the object is the call's arguments."""
        self.obj, self.after = ObjectScan(i), after
        self.calls.append(CallScan(name=name, args_start=i if name is not None else None))
        return self._go("obj", i)

    def _step(self, text: str, final: bool) -> bool:
        """Reads on from the current state; False when it must wait for more text."""
        st, n = self.state, len(text)
        if st == "seek":  # hermes, mistral: look for the format's opening marker
            mark = _MARK[self.fmt]
            i = text.find(mark, self.search)
            if i < 0:
                self.search = max(self.search, n - len(mark) + 1)
                return False
            if self.content_end is None:
                self.content_end = i
            return self._go("open" if self.fmt == "hermes" else "mstart", i + len(mark))
        if st == "open":  # hermes, after <tool_call>
            i = self.pos = _skip(text, self.pos)  # (kept: whitespace is read once, however it streams)
            if i == n:
                return False
            if text[i] == "{":
                return self._object(i, "close")
            self.calls.append(CallScan(done=True, ok=False))
            return self._go("close", i)
        if st == "obj":
            obj, call = self.obj, self.calls[-1]
            assert obj is not None
            obj.advance(text)
            whole = call.args_start == obj.start  # mistral's name[ARGS]{...}: the object is the arguments
            if not whole and not call.name_read and "name" in obj.fields:
                call.name_read = True
                try:
                    name = json.loads(text[slice(*obj.fields["name"])], strict=False)
                except ValueError:
                    name = None
                call.name, call.ok = (name, call.ok) if isinstance(name, str) else (None, False)
            if not whole and call.args_end is None:
                # The arguments are the first of these keys in the text, read as far as they go.
                spans = [(sp[0], k, sp) for k in ((call.args_key,) if call.args_key else ("arguments", "parameters"))
                         if (sp := obj.span(k)) is not None]
                if spans:
                    _, call.args_key, (call.args_start, call.args_end) = min(spans)
            if obj.end is None and not obj.broken:
                return False
            end = obj.end if obj.end is not None else obj.j
            if whole:
                call.args_end = end
            elif call.args_start is not None and call.args_end is None:  # broken inside the arguments
                call.args_end = end
            call.done = True
            # A closed object must be JSON (one parse per call): brackets that only balance are not.
            call.ok = call.ok and obj.end is not None and _is_object(text[obj.start : obj.end])
            if call.args_start is None and call.ok:
                call.fixed = "{}"
            self.obj = None
            return self._go(self.after, end)
        if st == "close":  # hermes: after a call's object, up to </tool_call> (or the next <tool_call>)
            m = _HERMES_TAG.search(text, self.search)
            stop = m.start() if m else max(self.search, n - len("</tool_call>") + 1)
            self.junk = self.junk or bool(text[self.search : stop].strip())
            self.search = stop
            if m is None:
                return False
            if self.junk and self.calls:
                self.calls[-1].ok = False
            self.junk = False
            return self._go("seek" if m.group() == "</tool_call>" else "open", m.end())
        if st == "mstart":  # mistral, after [TOOL_CALLS]: a JSON array or object, or name[ARGS]{...}
            i = self.pos = _skip(text, self.pos)
            if i == n:
                return False
            if text[i] == "[":  # an array, unless it is a marker (a call without a name)
                head = text[i : i + len("[TOOL_CALLS]")]
                if any(m.startswith(head) for m in ("[ARGS]", "[TOOL_CALLS]")) and not final:
                    return False  # could still be either
                if not any(head.startswith(m) for m in ("[ARGS]", "[TOOL_CALLS]")):
                    return self._go("seq", i)
            return self._go("seq" if text[i] == "{" else "mname", i)
        if st == "mname":
            m = _MISTRAL_TAG.search(text, self.search)
            if m is None:
                self.search = max(self.search, n - len("[TOOL_CALLS]") + 1)
                return False
            name = text[self.pos : m.start()].strip()
            if m.group() == "[ARGS]":
                self.calls.append(CallScan(name=name))
                return self._go("margs", m.end())
            if name:  # a call without arguments
                self.calls.append(CallScan(name=name, fixed="{}", done=True))
            return self._go("mstart", m.end())
        if st == "margs":
            i = self.pos = _skip(text, self.pos)
            if i == n:
                return False
            if text[i] == "{":
                return self._object(i, "seek", self.calls.pop().name)
            self.calls[-1].done, self.calls[-1].ok = True, False
            return self._go("seek", i)
        if st == "seq":  # objects separated by whitespace, ',' or ';' (opened by '[' in an array)
            i = _skip(text, self.pos, ",;[")
            if i == n:
                self.pos = i
                return False
            if text[i] == "{":
                return self._object(i, "seq")
            return self._go("seek" if self.fmt == "mistral" else "end", i)
        if st == "l3":  # llama3_json: an optional <|python_tag|>, then JSON or plain text
            i = self.pos = _skip(text, self.pos)
            if not self.tagged:
                if text.startswith(_PYTHON_TAG, i):
                    self.tagged = True
                    return self._go("l3", i + len(_PYTHON_TAG))
                if n - i < len(_PYTHON_TAG) and _PYTHON_TAG.startswith(text[i:]) and not final:
                    return False
            if i == n:
                return False
            return self._go("seq" if text[i] == "{" else "plain", i)
        if st == "args":  # a named function: the whole text is the arguments
            if not self.calls:
                self.calls.append(CallScan(args_start=0))
            return False
        return False  # "end", "plain": nothing more to read

    def _finish(self, text: str) -> None:
        """The text ended: what was waiting for more is settled."""
        if self.state == "args":
            self.calls[-1].args_end, self.calls[-1].done = len(text), True
        elif self.state == "mname":
            name = text[self.pos :].strip()
            if name:
                self.calls.append(CallScan(name=name, fixed="{}", done=True))
        elif self.state == "close":
            if self.calls and (self.junk or text[self.search :].strip()):
                self.calls[-1].ok = False
        elif self.state == "margs" and self.calls:
            self.calls[-1].done, self.calls[-1].ok = True, False

    def _llama_plain(self, final: bool) -> bool:
        """llama3_json text that is an answer, not calls: plain text, or JSON that names no tool."""
        return self.state == "plain" or (final and not any(c.name for c in self.calls))

    def _content(self, text: str, final: bool) -> int:
        if self.fmt in ("array", "arguments"):
            return 0
        if self.fmt == "llama3_json":
            if self._llama_plain(final):
                return len(text) if final or self.state == "plain" else 0
            return 0
        if self.content_end is not None:
            return self.content_end
        return len(text) if final else len(text) - held_back(text, _MARK[self.fmt])

    def _visible(self) -> list[CallScan]:
        if self.fmt == "llama3_json" and self._llama_plain(self.finished):
            return []
        return self.calls


# -- responses ----------------------------------------------------------------------------------
def _arguments(call: CallScan, text: str) -> str | None:
    """The call's arguments as a JSON text, or None when they are not a JSON object."""
    args = call.args(text)
    if args is None:
        args = "{}"
    try:
        args = _strict(args)  # control characters inside strings are common
        value = json.loads(args)
        if isinstance(value, str):  # some models write the arguments as a JSON string
            args = _strict(value)
            value = json.loads(args)
    except ValueError:
        return None
    return args if isinstance(value, dict) else None


def final_calls(setup: ToolSetup, scan: Scan, text: str, complete: bool) -> tuple[int, list[tuple[str, str]]]:
    """(content length, [(name, arguments)]) of a finished choice; the content is text[:length].
    complete: the choice ended by itself ("stop"); then every call must be whole, to a declared
    function, with object arguments, else all the text is content. A choice cut short (length)
    keeps the calls begun with a declared name, arguments as far as they go, as OpenAI returns a
    call cut by max_tokens."""
    named = setup.text_format == "arguments"
    calls = []
    for c in scan.calls:
        name = setup.named if named else c.name
        if name is None or name not in setup.names:
            if complete:
                return len(text), []
            break
        if complete and not (c.done and c.ok and _arguments(c, text) is not None):
            return len(text), []
        calls.append((name, c.view_args(text)))
    if not calls:
        return len(text), []
    return scan.content, calls if setup.parallel else calls[:1]


def parse_calls(setup: ToolSetup, text: str, complete: bool = True) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool_calls) of a finished choice (see final_calls)."""
    fmt = setup.text_format
    if fmt is None:
        return text, []
    content, calls = final_calls(setup, CallParser(fmt).feed(text, final=True), text, complete)
    if not calls:
        return text, []
    return (text[:content] or None), [
        {"id": call_id(setup.parser), "type": "function", "function": {"name": n, "arguments": a}}
        for n, a in calls]


@dataclass
class _Sent:
    id: str
    name: str
    args: int = 0  # characters of arguments sent
    closed: bool = False  # the call is complete and all of it was sent
    raw: int = 0  # characters of the text's growing arguments read (escaped, they are what was sent)
    state: tuple[bool, bool] = (False, False)  # escape_controls' state after them

    def grow(self, text: str, start: int) -> str:
        """What is new in arguments still being written at text[start:], control characters escaped."""
        new, self.state = escape_controls(text[start + self.raw :], self.state)
        self.raw = len(text) - start
        return new


class ToolStream:
    """One streamed choice: turns its growing text into content and tool-call deltas, as OpenAI
    streams them (a call's first delta: index, id, type, name and empty arguments; then argument
    text). The last feed decides as parse_calls does, so a stream reassembles to the response the
    same request gets unstreamed; the one exception is a call whose name was sent and whose text
    then turns out malformed, which a stream cannot take back."""

    def __init__(self, setup: ToolSetup) -> None:
        self.setup = setup
        self.parser = CallParser(setup.text_format) if setup.text_format else None
        self.content_sent = 0
        self.sent: list[_Sent] = []
        self.open_from = 0  # calls before this one are closed: all of them was sent

    def feed(self, text: str, final: bool, complete: bool = True) -> tuple[str, list[dict[str, Any]]]:
        """(new content, new tool_calls delta entries) for the choice's whole text so far. With
        final, complete says whether the choice ended by itself (see final_calls)."""
        if self.parser is None:
            new, self.content_sent = text[self.content_sent:], len(text)
            return new, []
        s = self.parser.feed(text, final)
        deltas: list[dict[str, Any]] = []
        if final:
            content, calls = final_calls(self.setup, s, text, complete)
            if self.sent and not calls:  # announced calls turned out malformed: finish them as written
                content, calls = s.content, [(self.sent[i].name, c.view_args(text))
                                             for i, c in enumerate(s.calls[: len(self.sent)])]
            for i, (name, args) in enumerate(calls):
                if i >= self.open_from:
                    self._send(deltas, i, name, lambda st, a=args: a[st.args:], True)
        else:
            content = s.content
            for i in range(self.open_from, len(s.calls) if self.setup.parallel else min(len(s.calls), 1)):
                c = s.calls[i]
                name = self.setup.named if self.setup.text_format == "arguments" else c.name
                if name is None or name not in self.setup.names:
                    break  # calls stream in order; this one's name is still being written (or is no tool's)
                if c.args_done:
                    args = c.view_args(text)
                    self._send(deltas, i, name, lambda st, a=args: a[st.args:], c.done)
                elif c.args_start is not None and text.startswith("{", c.args_start):
                    # Object arguments stream as they grow; a string or scalar waits until complete.
                    s0 = c.args_start
                    self._send(deltas, i, name, lambda st, s0=s0: st.grow(text, s0), False)
                else:
                    self._send(deltas, i, name, lambda st: "", False)
        new = text[self.content_sent:content] if content > self.content_sent else ""
        self.content_sent = max(self.content_sent, content)
        return new, deltas

    def _send(self, deltas: list[dict[str, Any]], i: int, name: str, rest: Any, closed: bool) -> None:
        """Appends call i's header (once) and its arguments after those already sent (rest: what
        follows them, given the call's _Sent)."""
        if i == len(self.sent):
            self.sent.append(_Sent(call_id(self.setup.parser), name))
            deltas.append({"index": i, "id": self.sent[i].id, "type": "function",
                           "function": {"name": name, "arguments": ""}})
        st = self.sent[i]
        new = rest(st)
        if new:
            deltas.append({"index": i, "function": {"arguments": new}})
            st.args += len(new)
        st.closed = closed
        while self.open_from < len(self.sent) and self.sent[self.open_from].closed:
            self.open_from += 1

    @property
    def called(self) -> bool:
        return bool(self.sent)
