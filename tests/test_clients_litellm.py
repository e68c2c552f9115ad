"""LiteLLM, unchanged, against a real `tokenmill serve` (as its `openai/` provider, the way LiteLLM
reaches vLLM): response_format from a pydantic model and as a json_schema, tools with tool_choice
required and named, streamed calls rebuilt by LiteLLM's own chunk builder, and a tool result in
the history."""

from __future__ import annotations

import json
import os

import pytest
from pydantic import BaseModel, Field

# LiteLLM fetches its model price map from GitHub at import unless told to use its bundled copy.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
if os.environ.get("CI"):  # CI installs the `clients` extra: a missing litellm must fail there, not skip
    import litellm
else:
    litellm = pytest.importorskip("litellm", reason="litellm is in the `clients` extra")

from tests.models import TOOLS_CHAT_TEMPLATE, make_model  # noqa: E402
from tests.server_utils import ServerProcess  # noqa: E402

litellm.suppress_debug_info = True


class Person(BaseModel):
    name: str = Field(max_length=10)
    age: int = Field(ge=0, le=120)
    role: str = Field(json_schema_extra={"enum": ["admin", "user"]})


WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER}}]
ASK = [{"role": "user", "content": "Weather in Oslo for 3 days?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = make_model(str(tmp_path_factory.mktemp("ll") / "ll-model"), chat_template=TOOLS_CHAT_TEMPLATE)
    s = ServerProcess(model, "--kv-cache-memory", "0.0625", log_path=str(tmp_path_factory.mktemp("ll") / "log"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def kw(server):
    return dict(model="openai/ll-model", api_base=server.base_url + "/v1", api_key="unused", temperature=1.0,
                max_tokens=300, num_retries=0, timeout=60)


def test_response_format(kw):
    for seed in range(3):
        r = litellm.completion(messages=[{"role": "user", "content": "Alice is 30, an admin."}],
                               response_format=Person, seed=seed, **kw)
        assert r.choices[0].finish_reason == "stop"
        Person.model_validate_json(r.choices[0].message.content)
    schema = {"type": "json_schema", "json_schema": {"name": "p", "schema": Person.model_json_schema(),
                                                     "strict": True}}
    r = litellm.completion(messages=[{"role": "user", "content": "Bob"}], response_format=schema, seed=7, **kw)
    Person.model_validate_json(r.choices[0].message.content)


def _args(calls) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in calls]


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_tools_streamed_and_not(kw, choice):
    for seed in range(2):
        r = litellm.completion(messages=ASK, tools=TOOLS, tool_choice=choice, seed=seed, **kw)
        msg = r.choices[0].message
        assert msg.tool_calls and all(c.id for c in msg.tool_calls)
        for name, args in _args(msg.tool_calls):
            assert name == "get_weather" and isinstance(args["city"], str) and 1 <= args["days"] <= 7
        # LiteLLM rebuilds the streamed deltas into the same calls.
        chunks = list(litellm.completion(messages=ASK, tools=TOOLS, tool_choice=choice, seed=seed, stream=True,
                                         **kw))
        rebuilt = litellm.stream_chunk_builder(chunks, messages=ASK)
        assert _args(rebuilt.choices[0].message.tool_calls) == _args(msg.tool_calls)
        if choice == "required":  # (a named call ends with "stop", which LiteLLM reports unstreamed as "tool_calls")
            assert rebuilt.choices[0].finish_reason == r.choices[0].finish_reason == "tool_calls"


def test_tool_result_round_trip(kw):
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 3}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    r = litellm.completion(messages=messages, tools=TOOLS, seed=3, **{**kw, "max_tokens": 20})
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert r.usage.prompt_tokens > 0
