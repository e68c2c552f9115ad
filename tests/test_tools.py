"""Tool calling: tools and tool_choice through a real server with the official openai client
(required and named calls constrained by the tools' schemas, streamed deltas that reassemble to
the same calls, tool results in the history), and the hermes / llama3_json / mistral parsers on
whole and streamed text."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from tests.models import TOOLS_CHAT_TEMPLATE, make_model
from tests.server_utils import ServerProcess
from tokenmill.server.tools import ObjectScan, ToolSetup, ToolStream, infer_parser, parse_calls

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "minLength": 1, "maxLength": 12},
    "unit": {"enum": ["celsius", "fahrenheit"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 7}}, "required": ["city", "unit"]}
SEARCH = {"type": "object", "properties": {"query": {"type": "string", "maxLength": 16},
                                           "top_k": {"type": "integer", "minimum": 1, "maximum": 5}},
          "required": ["query"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "search", "description": "Web search", "parameters": SEARCH}},
]
SCHEMAS = {"get_weather": WEATHER, "search": SEARCH}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def tools_model(tmp_path_factory):
    from transformers import AutoTokenizer

    path = make_model(str(tmp_path_factory.mktemp("tools") / "hermes"), chat_template=TOOLS_CHAT_TEMPLATE)
    # As in some Hermes tokenizers, the call markers are special tokens.
    tok = AutoTokenizer.from_pretrained(path)
    tok.add_special_tokens({"additional_special_tokens": ["<tool_call>", "</tool_call>"]})
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def server(tools_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("tools_log") / "server.log"
    s = ServerProcess(tools_model, "--kv-cache-memory", "0.0625", log_path=str(log))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def name():
    return "hermes"


def _check_calls(calls) -> None:
    assert calls
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_")
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])


def _reassemble(stream) -> tuple[dict[int, dict], list[str | None], str]:
    calls: dict[int, dict] = {}
    reasons, content = [], ""
    for chunk in stream:
        for ch in chunk.choices:
            reasons.append(ch.finish_reason)
            content += ch.delta.content or ""
            for d in ch.delta.tool_calls or []:
                if d.index not in calls:  # OpenAI's first delta of a call: id, type, name, ""
                    assert d.id and d.type == "function" and d.function.name and d.function.arguments == ""
                    calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": ""}
                else:
                    assert d.id is None and d.function.name is None
                    calls[d.index]["arguments"] += d.function.arguments
    return calls, reasons, content


@pytest.mark.parametrize("seed", range(6))
def test_required_calls_validate_and_stream_the_same(client, name, seed):
    kw = dict(model=name, messages=MESSAGES, tools=TOOLS, tool_choice="required", temperature=1.0,
              max_tokens=300, seed=seed)
    r = client.chat.completions.create(**kw)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    _check_calls(c.message.tool_calls)
    calls, reasons, content = _reassemble(client.chat.completions.create(**kw, stream=True))
    assert reasons[-1] == "tool_calls" and content == ""
    assert [(v["name"], v["arguments"]) for _, v in sorted(calls.items())] == \
        [(t.function.name, t.function.arguments) for t in c.message.tool_calls]


@pytest.mark.parametrize("max_tokens", [3, 12, 25])
def test_cut_short_by_max_tokens_streams_the_same(client, name, max_tokens):
    """finish_reason length: the calls begun (arguments as far as they go) or, before any call's
    name is whole, the text as content; streamed and not alike."""
    kw = dict(model=name, messages=MESSAGES, tools=TOOLS, tool_choice="required", temperature=1.0,
              max_tokens=max_tokens, seed=1)
    c = client.chat.completions.create(**kw).choices[0]
    assert c.finish_reason == "length"
    calls, reasons, content = _reassemble(client.chat.completions.create(**kw, stream=True))
    assert reasons[-1] == "length"
    assert content == (c.message.content or "")
    assert [(v["name"], v["arguments"]) for _, v in sorted(calls.items())] == \
        [(t.function.name, t.function.arguments) for t in c.message.tool_calls or []]
    if max_tokens == 3:
        assert c.message.content and not c.message.tool_calls
    if max_tokens == 25:
        assert c.message.tool_calls and not c.message.content


def test_named_function_and_parallel_off(client, name):
    for seed in range(3):
        r = client.chat.completions.create(
            model=name, messages=MESSAGES, tools=TOOLS, temperature=1.0, max_tokens=200, seed=seed,
            tool_choice={"type": "function", "function": {"name": "search"}})
        c = r.choices[0]
        assert c.finish_reason == "stop"  # as OpenAI ends a forced function call
        assert [t.function.name for t in c.message.tool_calls] == ["search"]
        _check_calls(c.message.tool_calls)
        calls, reasons, _ = _reassemble(client.chat.completions.create(
            model=name, messages=MESSAGES, tools=TOOLS, temperature=1.0, max_tokens=200, seed=seed, stream=True,
            tool_choice={"type": "function", "function": {"name": "search"}}))
        assert reasons[-1] == "stop"
        assert calls[0]["arguments"] == c.message.tool_calls[0].function.arguments
        r = client.chat.completions.create(model=name, messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, temperature=1.0, max_tokens=300, seed=seed)
        assert len(r.choices[0].message.tool_calls) == 1


def test_required_with_defs(client, name):
    """pydantic writes nested models as $defs/$ref: they survive nesting into the required array."""
    params = {"$defs": {"Place": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
                                  "required": ["city"]}},
              "type": "object", "properties": {"where": {"$ref": "#/$defs/Place"}}, "required": ["where"]}
    tools = TOOLS + [{"type": "function", "function": {"name": "locate", "parameters": params}}]
    r = client.chat.completions.create(model=name, messages=MESSAGES, tools=tools, tool_choice="required",
                                       temperature=1.0, max_tokens=90, seed=4)
    for c in r.choices[0].message.tool_calls:
        jsonschema.validate(json.loads(c.function.arguments), {**SCHEMAS, "locate": params}[c.function.name])


def test_tool_results_in_history_and_auto(client, name, server):
    history = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"},
    ]
    plain = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=1)
    r = client.chat.completions.create(model=name, messages=history, tools=TOOLS, max_tokens=20)
    # The template got the tools and the earlier call (its arguments as an object) and result.
    assert r.usage.prompt_tokens > plain.usage.prompt_tokens + 40
    c = r.choices[0]  # auto: a random model writes no <tool_call>, so this is content
    assert c.message.tool_calls is None and isinstance(c.message.content, str)
    r = client.chat.completions.create(model=name, messages=history, tools=TOOLS, tool_choice="none", max_tokens=5)
    assert r.choices[0].message.tool_calls is None


def test_empty_parameters_still_constrain_to_an_object(client, name):
    """"parameters": {} (a function without any) constrains required and named calls to an object
    (it let them write any JSON value, which is no call: the text came back as content)."""
    tools = [{"type": "function", "function": {"name": "now", "parameters": {}}}]
    for seed in range(4):
        for choice in ("required", {"type": "function", "function": {"name": "now"}}):
            c = client.chat.completions.create(model=name, messages=MESSAGES, tools=tools, tool_choice=choice,
                                               temperature=1.0, max_tokens=40, seed=seed).choices[0]
            assert c.message.content is None and c.message.tool_calls[0].function.arguments.startswith("{")


def test_special_call_markers_reach_the_parser(client, name, tools_model):
    """auto keeps special tokens in the text, as the call markers may be ones (they were skipped
    with hermes, so its calls could never be found)."""
    from transformers import AutoTokenizer

    mark = AutoTokenizer.from_pretrained(tools_model).convert_tokens_to_ids("<tool_call>")
    kw = dict(model=name, messages=MESSAGES, tools=TOOLS, max_tokens=2, extra_body={"allowed_token_ids": [mark]})
    c = client.chat.completions.create(**kw).choices[0]
    assert c.message.content == "<tool_call><tool_call>" and c.finish_reason == "length"
    assert _reassemble(client.chat.completions.create(**kw, stream=True))[2] == "<tool_call><tool_call>"


@pytest.mark.parametrize("kw,needle", [
    ({"tool_choice": "required"}, "only allowed when tools are given"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "no tool named 'nope'"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "strin"}}}],
      "tool_choice": "required"}, "Invalid type"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "cannot be combined"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    # $defs that are no mapping (they were a 500 where required nests the tools' schemas)
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "$defs": [1]}}}],
      "tool_choice": "required"}, "tools[0].function.parameters.$defs"),
])
def test_bad_tools_are_400s(client, name, kw, needle):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=5, **kw)
    assert needle in e.value.message, e.value.message


# -- parsers ------------------------------------------------------------------------------------
CASES = [
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": '
               '"celsius"}}\n</tool_call>\n<tool_call>\n{"name": "search", "arguments": {"query": "a \\"b\\" }"}}'
               '\n</tool_call>', "Let me check.\n",
     [("get_weather", {"city": "Paris", "unit": "celsius"}), ("search", {"query": 'a "b" }'})]),
    ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "celsius"}}; '
                    '{"name": "search", "parameters": {"query": "x"}}', None,
     [("get_weather", {"city": "Oslo", "unit": "celsius"}), ("search", {"query": "x"})]),
    ("llama3_json", '{"name": "search", "parameters": {"query": "[1, {2}]"}}', None,
     [("search", {"query": "[1, {2}]"})]),
    ("mistral", '[TOOL_CALLS][{"name": "search", "arguments": {"query": "q", "top_k": 2}}, '
                '{"name": "get_weather", "arguments": {"city": "Rome", "unit": "fahrenheit"}}]', None,
     [("search", {"query": "q", "top_k": 2}), ("get_weather", {"city": "Rome", "unit": "fahrenheit"})]),
    ("mistral", 'Sure.[TOOL_CALLS]search[ARGS]{"query": "q"}[TOOL_CALLS]get_weather[ARGS]{"city": "Rome", '
                '"unit": "celsius"}', "Sure.",
     [("search", {"query": "q"}), ("get_weather", {"city": "Rome", "unit": "celsius"})]),
    # Markers inside argument strings are text.
    ("hermes", '<tool_call>\n{"name": "search", "arguments": {"query": "<tool_call>x</tool_call>"}}\n</tool_call>',
     None, [("search", {"query": "<tool_call>x</tool_call>"})]),
    ("mistral", '[TOOL_CALLS]search[ARGS]{"query": "[TOOL_CALLS]a[ARGS]"}', None,
     [("search", {"query": "[TOOL_CALLS]a[ARGS]"})]),
    ("mistral", '[TOOL_CALLS][{"name": "search", "arguments": {"query": "]}[TOOL_CALLS]"}}]', None,
     [("search", {"query": "]}[TOOL_CALLS]"})]),
    # Arguments as a JSON string, or none at all.
    ("hermes", '<tool_call>{"name": "search", "arguments": "{\\"query\\": \\"s\\"}"}</tool_call>', None,
     [("search", {"query": "s"})]),
    ("hermes", '<tool_call>{"name": "search"}</tool_call><tool_call>{"name": "search", "arguments": {}}</tool_call>',
     None, [("search", {}), ("search", {})]),
    ("mistral", "[TOOL_CALLS]search", None, [("search", {})]),
    # Raw control characters in strings (models write raw newlines) come back escaped: strict JSON.
    ("hermes", '<tool_call>{"name": "search",\n "arguments": {"query": "a\nb\tc\x01\\"\n"}}</tool_call>', None,
     [("search", {"query": 'a\nb\tc\x01"\n'})]),
    ("hermes", '<tool_call>{"name": "search", "arguments": "{\\"query\\": \\"a\\nb\\"}"}</tool_call>', None,
     [("search", {"query": "a\nb"})]),
    # Text that holds no well-formed call to a declared tool is all content, streamed too.
    ("hermes", "Hi <tool_call>oops</tool_call>", "Hi <tool_call>oops</tool_call>", []),
    ("hermes", 'A<tool_call>{"name": "nope", "arguments": {}}</tool_call>',
     'A<tool_call>{"name": "nope", "arguments": {}}</tool_call>', []),
    ("llama3_json", '{"name": "nope", "parameters": {}}', '{"name": "nope", "parameters": {}}', []),
    # The first of "arguments" / "parameters" (and of a repeated key) counts, streamed or not.
    ("hermes", '<tool_call>{"name": "search", "parameters": {"query": "p"}, "arguments": {"query": "a"}}</tool_call>',
     None, [("search", {"query": "p"})]),
    ("hermes", "No tools needed: 2 < 3.", "No tools needed: 2 < 3.", []),
    ("llama3_json", '{"answer": 42}', '{"answer": 42}', []),
    ("mistral", "Plain [text].", "Plain [text].", []),
]


@pytest.mark.parametrize("parser,text,content,expected", CASES)
def test_parsers_whole_and_streamed(parser, text, content, expected):
    setup = ToolSetup.from_request(TOOLS, None, None, parser)
    got_content, calls = parse_calls(setup, text)
    assert got_content == content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == expected
    # Streamed one character at a time, and in pieces: the same content and calls.
    for step in (1, 5):
        streamed, assembled = _stream(setup, text, step=step)
        assert [(n, json.loads(a)) for n, a in assembled.values()] == expected
        assert streamed == (content or "")


def _stream(setup, text, complete=True, step=1):
    """Feeds text to a ToolStream `step` characters at a time: (content, {index: [name, arguments]})."""
    ts = ToolStream(setup)
    content, assembled = "", {}
    for i in list(range(step, len(text), step)) + [len(text)]:
        c, deltas = ts.feed(text[:i], i == len(text), complete)
        content += c
        for d in deltas:
            if d["index"] not in assembled:
                assert d["function"]["arguments"] == "" and d["id"]
                assembled[d["index"]] = [d["function"]["name"], ""]
            else:
                assembled[d["index"]][1] += d["function"]["arguments"]
    return content, assembled


@pytest.mark.parametrize("mode,parser,text,content,expected", [
    (None, "hermes", 'Hm.<tool_call>{"name": "search", "arguments": {"query": "ab', "Hm.",
     [("search", '{"query": "ab')]),
    (None, "hermes", 'Hm.<tool_call>{"name": "sea', 'Hm.<tool_call>{"name": "sea', []),
    ("required", "hermes", '[{"name": "search", "parameters": {"query": "x"}}, {"name": "get_weather", '
     '"parameters": {"ci', None, [("search", '{"query": "x"}'), ("get_weather", '{"ci')]),
    ({"type": "function", "function": {"name": "search"}}, "hermes", '{"query": "abc', None,
     [("search", '{"query": "abc')]),
    # Finished arguments written as a JSON string are sent decoded, streamed or not.
    (None, "hermes", '<tool_call>{"name": "search", "arguments": "{\\"query\\": \\"q\\"}" ', None,
     [("search", '{"query": "q"}')]),
    (None, "llama3_json", '{"name": "search", "parameters": {"query": "a\nb', None, [("search", '{"query": "a\\nb')]),
    # Arguments of an object that breaks end where it breaks, not at the end of the text.
    (None, "hermes", 'Hi<tool_call>{"name": "search", "arguments": {"query": "x"</tool_call>\nBye', "Hi",
     [("search", '{"query": "x"')]),
])
def test_cut_short_keeps_the_calls_begun(mode, parser, text, content, expected):
    """finish_reason length: the calls begun, arguments as far as they go (as OpenAI returns them),
    streamed and not."""
    setup = ToolSetup.from_request(TOOLS, mode, None, parser)
    got, calls = parse_calls(setup, text, complete=False)
    assert got == content and [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == expected
    for step in (1, 7):
        streamed, assembled = _stream(setup, text, complete=False, step=step)
        assert streamed == (content or "") and [tuple(v) for v in assembled.values()] == expected


def test_tool_name_with_a_trailing_newline_is_refused():
    """(A regex's "$" matches before a final newline: the name passed, a 400 now.)"""
    with pytest.raises(ValueError, match=r"tools\[0\]\.function\.name"):
        ToolSetup.from_request([{"type": "function", "function": {"name": "search\n"}}], None, None, "hermes")


def test_parallel_off_keeps_the_first_call_in_auto():
    """parallel_tool_calls false with auto: the model's first call only (vLLM's rule), streamed
    and not; it was ignored, so every call came back."""
    text = ('<tool_call>{"name": "search", "arguments": {"query": "a"}}</tool_call>\n'
            '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}</tool_call>')
    mistral = '[TOOL_CALLS]search[ARGS]{"query": "a"}[TOOL_CALLS]search[ARGS]{}'
    for parser, t in [("hermes", text), ("mistral", mistral)]:
        setup = ToolSetup.from_request(TOOLS, None, False, parser)
        _, calls = parse_calls(setup, t)
        assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [("search", '{"query": "a"}')]
        for step in (1, 9):
            assert [tuple(v) for v in _stream(setup, t, step=step)[1].values()] == [("search", '{"query": "a"}')]
        assert len(parse_calls(ToolSetup.from_request(TOOLS, None, None, parser), t)[1]) == 2


def test_malformed_call_is_content_unstreamed():
    """A call whose JSON breaks is content unstreamed; a stream that already sent its name
    finishes it as written (it cannot take the name back)."""
    setup = ToolSetup.from_request(TOOLS, None, None, "hermes")
    text = '<tool_call>{"name": "search", "arguments": {"query": "x"}</tool_call>'
    assert parse_calls(setup, text) == (text, [])
    content, assembled = _stream(setup, text)
    assert content == "" and [tuple(v) for v in assembled.values()] == [("search", '{"query": "x"}')]
    for fmt, bad in [("hermes", '<tool_call>{"name": "search", "arguments": {"query": "x"}]</tool_call>'),
                     ("hermes", '<tool_call>{"name": "search", "arguments": {}} oops</tool_call>'),
                     ("mistral", "[TOOL_CALLS]search[TOOL_CALLS][ARGS]5"),
                     ("mistral", '[TOOL_CALLS][ARGS]{"query": "x"}')]:
        assert parse_calls(ToolSetup.from_request(TOOLS, None, None, fmt), bad) == (bad, []), bad


def test_long_call_streams_in_linear_time():
    """A 40K-character argument fed a character at a time: each feed reads only the new text."""
    setup = ToolSetup.from_request(TOOLS, None, None, "hermes")
    body = 'a \\" { [ <tool_call> ' * 2000
    text = '<tool_call>{"name": "search", "arguments": {"query": "' + body + '"}}</tool_call>'
    ts = ToolStream(setup)
    reads = 0
    advance = ObjectScan.advance

    def counting(self, t):
        nonlocal reads
        before = self.j
        advance(self, t)
        reads += self.j - before + 1
    ObjectScan.advance = counting
    try:
        args = ""
        for i in range(1, len(text) + 1):
            args += "".join(d["function"]["arguments"] for d in ts.feed(text[:i], i == len(text))[1])
    finally:
        ObjectScan.advance = advance
    assert json.loads(args) == {"query": 'a " { [ <tool_call> ' * 2000}
    assert reads < 2 * len(text)


@pytest.mark.parametrize("parser,text", [
    ("hermes", "<tool_call>" + "\n" * 20000 + '{"name": "search"}'),
    ("mistral", "[TOOL_CALLS]" + " " * 20000 + "search[ARGS]" + " " * 20000 + "{}"),
    ("llama3_json", " " * 20000 + "<|python_tag|>" + " " * 20000 + '{"name": "search"}'),
])
def test_whitespace_streams_in_linear_time(monkeypatch, parser, text):
    """Whitespace before a call (a model stuck on newlines) is read once, however it streams."""
    from tokenmill.server import tools

    skipped = 0
    skip = tools._skip

    def counting(t, i, chars=""):
        nonlocal skipped
        j = skip(t, i, chars)
        skipped += j - i + 1
        return j
    monkeypatch.setattr(tools, "_skip", counting)
    _, assembled = _stream(ToolSetup.from_request(TOOLS, None, None, parser), text)
    assert [n for n, _ in assembled.values()] == ["search"]
    assert skipped < 2 * len(text)


def test_object_scan_unfinished_and_resumed():
    text = '{"name": "f", "arguments": {"a": [1, "}"], "b": tr'
    o = ObjectScan(0)
    o.advance(text)
    assert o.end is None and text[slice(*o.span("name"))] == '"f"' and o.span("arguments")[1] is None
    o = ObjectScan(0)
    text = '{"x": 12 , "y": "s"}'
    for i in range(1, len(text) + 1):  # resumed a character at a time
        o.advance(text[:i])
    assert o.end == 20 and o.fields == {"x": (6, 8), "y": (16, 19)}


def test_infer_parser():
    assert infer_parser(TOOLS_CHAT_TEMPLATE) == "hermes"
    assert infer_parser("{{ '[TOOL_CALLS]' }}") == "mistral"
    assert infer_parser("{{ '<|python_tag|>' }} ipython") == "llama3_json"
    assert infer_parser("{{ messages }}") is None


def test_tokenize_counts_a_chat_prompt_with_its_tools(server, client, name):
    """/tokenize with messages and tools counts what the chat endpoint prompts (the tools were ignored)."""
    msgs = [{"role": "user", "content": "What is the weather?"}]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    n = [httpx.post(server.base_url + "/tokenize", json={"model": name, "messages": msgs, **extra}).json()["count"]
         for extra in ({}, {"tools": tools})]
    used = client.chat.completions.create(model=name, messages=msgs, tools=tools, tool_choice="none",
                                          max_tokens=1).usage.prompt_tokens
    assert n[1] > n[0] and n[1] == used
