"""langchain-openai, unchanged, against a real `tokenmill serve`: with_structured_output by all
three methods (json_schema, function_calling, json_mode) and bind_tools, on a tiny random model
whose chat template shows tools in the Hermes format."""

from __future__ import annotations

import os

import pytest
from pydantic import BaseModel, Field

if os.environ.get("CI"):  # CI installs the `clients` extra: a missing langchain-openai must fail there, not skip
    import langchain_openai
else:
    langchain_openai = pytest.importorskip("langchain_openai", reason="langchain-openai is in the `clients` extra")

from tests.models import TOOLS_CHAT_TEMPLATE, make_model  # noqa: E402
from tests.server_utils import ServerProcess  # noqa: E402


class Person(BaseModel):
    """A person mentioned in the text."""

    name: str = Field(max_length=10, description="first name")
    age: int = Field(ge=0, le=120)
    role: str = Field(json_schema_extra={"enum": ["admin", "user"]})


class get_weather(BaseModel):  # noqa: N801 (a tool's name as the model sees it)
    """The weather forecast for a city."""

    # Bounded: a random model's free strings would run to max_tokens.
    city: str = Field(max_length=12, description="the city's name")
    days: int = Field(ge=1, le=7, description="how many days ahead")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = make_model(str(tmp_path_factory.mktemp("lc") / "lc-model"), chat_template=TOOLS_CHAT_TEMPLATE)
    s = ServerProcess(model, "--kv-cache-memory", "0.0625", log_path=str(tmp_path_factory.mktemp("lc") / "log"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def chat(server):
    return langchain_openai.ChatOpenAI(base_url=server.base_url + "/v1", api_key="unused", model="lc-model",
                                       temperature=1.0, max_tokens=400, max_retries=0, timeout=60, seed=1)


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_with_structured_output(chat, method):
    for i in range(3):
        person = chat.with_structured_output(Person, method=method).invoke(f"Alice is {30 + i}, an admin.")
        assert isinstance(person, Person) and person.role in ("admin", "user")
    # A dict schema comes back as a dict, and include_raw keeps the message.
    out = chat.with_structured_output(Person.model_json_schema(), method=method, include_raw=True).invoke("Bob")
    assert out["parsing_error"] is None and Person.model_validate(out["parsed"])


def test_with_structured_output_json_mode(chat):
    # Any JSON object is valid here: logit_bias (a quote and a closing brace) keeps the random model's
    # keys short, so that its object ends well within max_tokens.
    tok = chat.bind(logit_bias={str(t): 8 for t in _token_ids(chat, ['"', "}"])})
    out = tok.with_structured_output(None, method="json_mode").invoke("Reply in JSON.")
    assert isinstance(out, dict)


def _token_ids(chat, texts: list[str]) -> list[int]:
    import httpx

    base = str(chat.openai_api_base).removesuffix("/v1")
    ids = []
    for t in texts:
        r = httpx.post(base + "/tokenize", json={"prompt": t, "add_special_tokens": False}).json()
        ids += r["tokens"]
    return ids


def test_bind_tools(chat):
    # tool_choice "any" (LangChain's name for "required") and a named tool: calls that validate.
    for choice in ("any", "get_weather"):
        msg = chat.bind_tools([get_weather], tool_choice=choice).invoke("Weather in Oslo for 3 days?")
        assert [c["name"] for c in msg.tool_calls] and all(c["name"] == "get_weather" for c in msg.tool_calls)
        for c in msg.tool_calls:
            assert isinstance(c["args"]["city"], str) and isinstance(c["args"]["days"], int)
            assert c["id"]
    # Streamed: LangChain reassembles the tool-call chunks.
    chunks = None
    for ch in chat.bind_tools([get_weather], tool_choice="any").stream("Weather in Rome?"):
        chunks = ch if chunks is None else chunks + ch
    assert chunks.tool_calls and chunks.tool_calls[0]["name"] == "get_weather"
    assert isinstance(chunks.tool_calls[0]["args"]["days"], int)
    # auto: the random model answers in text; the round trip with a tool result works too.
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage

    call = {"name": "get_weather", "args": {"city": "Oslo", "days": 3}, "id": "call_1", "type": "tool_call"}
    msg = chat.bind_tools([get_weather]).invoke([
        HumanMessage("Weather in Oslo?"), AIMessage("", tool_calls=[call]),
        ToolMessage("sunny", tool_call_id="call_1")])
    assert isinstance(msg.content, str)
