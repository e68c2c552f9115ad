"""OpenAI's Responses API (/v1/responses) through a real server with the official openai client:
the same answer as the equivalent chat request (reasoning, message, function calls), streamed as
typed events that rebuild the unstreamed response, stored responses continued with
previous_response_id, retrieved and deleted, and clear errors for what it does not run."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from openai.types.responses import Response

from tests.models import TOOLS_CHAT_TEMPLATE, make_model
from tests.server_utils import ServerProcess
from tokenmill.server.response_store import ResponseStore

# A thinking template (DeepSeek-R1's way: the generation prompt opens the section) with Hermes tool calls.
TEMPLATE = TOOLS_CHAT_TEMPLATE.replace("<s>assistant\n{% endif %}", "<s>assistant\n<think>\n{% endif %}")
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 12}},
           "required": ["city"]}
TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather in a city", "parameters": WEATHER}]
CHAT_TOOLS = [{"type": "function", "function": {k: v for k, v in TOOLS[0].items() if k != "type"}}]
# The random model thinks for 6 tokens (the budget closes its section), then answers until an "e".
SAMPLING = {"temperature": 1.0, "max_output_tokens": 60}
EXTRA = {"seed": 3, "max_reasoning_tokens": 6, "ignore_eos": True, "stop": ["e"]}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("responses")
    model = make_model(str(d / "thinker"), chat_template=TEMPLATE)
    s = ServerProcess(model, "--kv-cache-memory", "0.0625", "--reasoning-parser", "deepseek_r1",
                      log_path=str(d / "server.log"))
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def name():
    return "thinker"


def _no_ids(output: list) -> list:
    return [{k: v for k, v in o.model_dump().items() if k not in ("id", "call_id")} for o in output]


def _events(stream) -> list:
    """The stream's events, checked for what every Responses stream keeps: consecutive sequence
    numbers, and each item added, grown and done in turn."""
    events = list(stream)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    open_item = None
    for e in events[2:-1]:
        if e.type == "response.output_item.added":
            assert open_item is None
            open_item = e.item.id
        elif e.type == "response.output_item.done":
            assert e.item.id == open_item
            open_item = None
        else:
            assert e.item_id == open_item, e.type
    assert open_item is None
    return events


def test_a_response_is_the_chat_answer_whole_and_streamed(server, client, name):
    """Instructions are the system message, input the user's: the same seed gives the chat
    endpoint's reasoning and content, as output items; the stream's events rebuild them."""
    r = client.responses.create(model=name, input="Hello there", instructions="Be brief.", **SAMPLING,
                                extra_body=EXTRA)
    chat = client.chat.completions.create(
        model=name, messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}],
        max_tokens=60, temperature=1.0, **{k: v for k, v in EXTRA.items() if k == "seed"},
        extra_body={k: v for k, v in EXTRA.items() if k != "seed"})
    m = chat.choices[0].message
    assert r.status == "completed" and r.incomplete_details is None and r.id.startswith("resp_")
    assert [o.type for o in r.output] == ["reasoning", "message"]
    assert r.output[0].content[0].text == m.model_extra["reasoning"] and r.output_text == m.content
    assert r.usage.input_tokens == chat.usage.prompt_tokens and r.usage.output_tokens == chat.usage.completion_tokens
    # the six budgeted tokens and those of the closing tag, which starts in the reasoning's text
    assert 6 < r.usage.output_tokens_details.reasoning_tokens < r.usage.output_tokens
    assert (r.instructions, r.temperature, r.max_output_tokens, r.store) == ("Be brief.", 1.0, 60, True)
    raw = httpx.post(server.base_url + "/v1/responses", json={"model": name, "input": "Hi", "max_output_tokens": 8,
                                                             **EXTRA}, timeout=60).json()
    Response.model_validate(raw, strict=False)  # every field the openai types require, as they require it

    events = _events(client.responses.create(model=name, input="Hello there", instructions="Be brief.",
                                             stream=True, **SAMPLING, extra_body=EXTRA))
    final = events[-1]
    assert final.type == "response.completed" and _no_ids(final.response.output) == _no_ids(r.output)
    deltas = {"reasoning": "", "text": ""}
    for e in events:
        if e.type == "response.reasoning_text.delta":
            deltas["reasoning"] += e.delta
        elif e.type == "response.output_text.delta":
            deltas["text"] += e.delta
    assert deltas == {"reasoning": m.model_extra["reasoning"], "text": m.content}
    u = final.response.usage  # (its prompt now comes from the prefix cache)
    assert (u.input_tokens, u.output_tokens, u.output_tokens_details) == (
        r.usage.input_tokens, r.usage.output_tokens, r.usage.output_tokens_details)
    assert u.input_tokens_details.cached_tokens > 0
    with client.responses.stream(model=name, input="Hello there", instructions="Be brief.", **SAMPLING,
                                 extra_body=EXTRA) as s:  # the client's own helper
        assert s.get_final_response().output_text == m.content

    # max_output_tokens reached: incomplete, and so is the item it cut
    cut = client.responses.create(model=name, input="Hello there", max_output_tokens=3, extra_body=EXTRA)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    assert [(o.type, o.status) for o in cut.output] == [("reasoning", "incomplete")]
    # logprobs of the answer's tokens (not the reasoning's), in chat's format, the same streamed
    kw = dict(model=name, input="Hi", max_output_tokens=30, top_logprobs=2, include=["message.output_text.logprobs"],
              extra_body=EXTRA)
    lp = client.responses.create(**kw)
    logprobs = [x.model_dump() for x in lp.output[-1].content[0].logprobs]
    assert lp.output[0].type == "reasoning" and all(len(x["top_logprobs"]) == 2 for x in logprobs)
    usage = lp.usage
    assert 0 < len(logprobs) <= usage.output_tokens - usage.output_tokens_details.reasoning_tokens
    assert "".join(x["token"] for x in logprobs).startswith(lp.output_text)
    streamed = [x.model_dump() for e in client.responses.create(**kw, stream=True)
                if e.type == "response.output_text.delta" for x in e.logprobs]
    assert [(x["token"], x["logprob"]) for x in streamed] == [(x["token"], x["logprob"]) for x in logprobs]


def test_function_calls_and_a_conversation_continued(server, client, name):
    r = client.responses.create(model=name, input="Weather in Paris?", tools=TOOLS, tool_choice="required",
                                parallel_tool_calls=False, temperature=1.0, max_output_tokens=100,
                                extra_body={"seed": 1})
    assert r.status == "completed" and [o.type for o in r.output] == ["function_call"]
    call = r.output[0]
    assert call.name == "get_weather" and call.call_id.startswith("call_") and call.status == "completed"
    jsonschema.validate(json.loads(call.arguments), WEATHER)
    events = _events(client.responses.create(model=name, input="Weather in Paris?", tools=TOOLS,
                                             tool_choice="required", parallel_tool_calls=False, temperature=1.0,
                                             max_output_tokens=100, stream=True, extra_body={"seed": 1}))
    assert _no_ids(events[-1].response.output) == _no_ids(r.output)
    assert "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta") == call.arguments

    # The tool's output continues the stored conversation: the prompt is the chat prompt of the
    # whole conversation, with the tools shown again.
    nxt = client.responses.create(model=name, previous_response_id=r.id, tools=TOOLS, tool_choice="none",
                                  input=[{"type": "function_call_output", "call_id": call.call_id,
                                          "output": "sunny"}], max_output_tokens=5)
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": call.call_id, "type": "function",
                     "function": {"name": "get_weather", "arguments": call.arguments}}]},
                {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"}]
    count = httpx.post(server.base_url + "/tokenize",
                       json={"model": name, "messages": messages, "tools": CHAT_TOOLS}).json()["count"]
    assert nxt.previous_response_id == r.id and nxt.usage.input_tokens == count
    # The same conversation given as items needs no stored response.
    items = [{"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
             {"type": "function_call", "call_id": call.call_id, "name": "get_weather", "arguments": call.arguments},
             {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}]
    again = client.responses.create(model=name, input=items, tools=TOOLS, tool_choice="none", max_output_tokens=5)
    assert again.usage.input_tokens == count

    # A tool without parameters (null, as OpenAI's schema allows), a named function, and a JSON schema
    # as the text format
    bare = client.responses.create(model=name, input="x", max_output_tokens=30, tool_choice="required",
                                   tools=[{"type": "function", "name": "now", "parameters": None}])
    assert bare.output[0].type == "function_call" and json.loads(bare.output[0].arguments) == {}
    named = client.responses.create(model=name, input="x", tools=TOOLS, max_output_tokens=60,
                                    tool_choice={"type": "function", "name": "get_weather"})
    assert [o.type for o in named.output] == ["function_call"] and named.status == "completed"
    jsonschema.validate(json.loads(named.output[0].arguments), WEATHER)
    fmt = client.responses.create(model=name, input="x", max_output_tokens=60,
                                  text={"format": {"type": "json_schema", "name": "w", "schema": WEATHER}})
    jsonschema.validate(json.loads(fmt.output_text), WEATHER)


def test_truncation_auto_drops_the_oldest_turns_to_fit(client, name):
    """truncation "auto": a conversation over the context loses its oldest messages (the
    instructions and the last message stay); "disabled", the default, is a 400."""
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": "word " * 150} for i in range(9)]
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=name, input=turns, instructions="Be brief.", max_output_tokens=50)
    assert e.value.param == "input"
    r = client.responses.create(model=name, input=turns, instructions="Be brief.", max_output_tokens=50,
                                truncation="auto", extra_body={"ignore_eos": True})
    assert r.status == "incomplete" and r.usage.output_tokens == 50 and r.truncation == "auto"
    assert r.usage.input_tokens + 50 <= 1024 and r.usage.input_tokens > 500
    # A trailing tool result keeps the call it answers: when only the pair is left and it does not fit,
    # the request is refused rather than sent with a result whose call was dropped.
    pair = [{"role": "user", "content": "Hi"},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": json.dumps({"x": "word " * 900})},
            {"type": "function_call_output", "call_id": "c1", "output": "42"}]
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=name, input=pair, max_output_tokens=50, truncation="auto")
    assert e.value.param == "input"


def test_stored_responses_are_retrieved_deleted_and_can_be_left_out(server, client, name):
    r = client.responses.create(model=name, input="Hi", max_output_tokens=4, metadata={"k": "v"})
    got = client.responses.retrieve(r.id)
    assert got.model_dump() == r.model_dump() and got.metadata == {"k": "v"}
    client.responses.delete(r.id)
    for call in (lambda: client.responses.retrieve(r.id), lambda: client.responses.delete(r.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    with pytest.raises(openai.BadRequestError) as e:  # (OpenAI's answer: a 400 with this code)
        client.responses.create(model=name, input="x", previous_response_id=r.id)
    assert e.value.code == "previous_response_not_found" and e.value.param == "previous_response_id"
    # Its input items, listed back as OpenAI lists them; the input's token count without running it.
    items = [{"role": "user", "content": "Hello"}, {"type": "function_call", "call_id": "call_1", "name": "f",
                                                   "arguments": "{}"},
             {"type": "function_call_output", "call_id": "call_1", "output": "42"}]
    listed = client.responses.create(model=name, input=items, max_output_tokens=2)
    page = client.responses.input_items.list(listed.id)
    assert [x.type for x in page.data] == ["function_call_output", "function_call", "message"]  # newest first
    assert page.data[2].content[0].text == "Hello" and not page.has_more
    two = client.responses.input_items.list(listed.id, order="asc", limit=2)
    assert [x.type for x in two.data] == ["message", "function_call"] and two.has_more
    rest = client.responses.input_items.list(listed.id, order="asc", after=two.last_id)
    assert [x.type for x in rest.data] == ["function_call_output"]
    for query in ("limit=abc", "limit=0", "order=up", "after=nope"):
        r = httpx.get(f"{server.base_url}/v1/responses/{listed.id}/input_items?{query}", timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == query.split("=")[0], r.text
    counted = client.responses.input_tokens.count(model=name, input=items, instructions="Be brief.")
    with_instructions = client.responses.create(model=name, input=items, instructions="Be brief.",
                                                max_output_tokens=1)
    assert counted.input_tokens == with_instructions.usage.input_tokens
    unstored = client.responses.create(model=name, input="Hi", max_output_tokens=4, store=False)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


BAD = [
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0]"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": "x", "tools": [{"type": "function", "name": "no spaces", "parameters": {}}], "tool_choice": "required"},
     "tools[0].name"),
    ({"input": "x", "tool_choice": {"type": "function"}, "tools": TOOLS}, "tool_choice"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "n": 2}, "n"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "w"}}}, "text.format.schema"),
    ({"input": "x", "text": {"format": {"type": "json_object"}}, "tools": TOOLS, "tool_choice": "required"},
     "tool_choice"),
    ({"input": []}, "input"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id"),
    ({"input": "x", "background": True}, "background"),
    ({"input": "x", "conversation": "conv_1"}, "conversation"),
    ({"input": "x", "prompt": {"id": "pmpt_1"}}, "prompt"),
    ({"input": "x", "top_logprobs": 30}, "top_logprobs"),
    ({"input": "x", "max_output_tokens": "5"}, "max_output_tokens"),
    ({"input": "x", "max_output_tokens": 10**6}, "max_output_tokens"),
    ({"input": "x", "use_beam_search": True}, "use_beam_search"),
    ({"input": "x", "return_token_ids": True}, "return_token_ids"),
    ({"input": "x", "prompt_logprobs": 1}, "prompt_logprobs"),
    ({"input": "x", "response_format": {"type": "json_object"}}, "response_format"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": {"x": 1}}]}, "input[0].output"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "w", "schema": None}}}, "text.format.schema"),
    ({"input": "x " * 5000}, "input"),
]


@pytest.mark.parametrize("body,param", BAD, ids=[p for _, p in BAD])
def test_what_it_cannot_run_is_a_400_naming_the_field(server, name, body, param):
    r = httpx.post(server.base_url + "/v1/responses", json={"model": name, **body}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"].startswith(param), err


def test_the_store_keeps_conversations_under_its_budget_and_apart_per_tenant():
    store = ResponseStore(max_bytes=2000)
    turn = [{"role": "user", "content": "x" * 300}, {"role": "assistant", "content": "y"}]
    store.put("a", "t1", {"id": "a"}, None, turn)
    assert store.get("a", "t2") is None and not store.delete("a", "t2") and store.get("a", "t1") is not None
    b = store.put("b", "t1", {"id": "b"}, store.get("a", "t1"), turn)
    assert b and len(store.get("b", "t1").history) == 4
    store.delete("a", "t1")  # a child keeps its whole conversation
    assert len(store.get("b", "t1").history) == 4
    for i in range(10):  # each charged its whole conversation: the oldest go first
        store.put(f"c{i}", None, {"id": i}, None, turn)
        assert store.used <= 2000
    assert store.get("b", "t1") is None and store.get("c9", None) is not None
    assert not store.put("big", None, {}, None, [{"role": "user", "content": "z" * 3000}])
    assert not ResponseStore(0).put("a", None, {}, None, turn)
