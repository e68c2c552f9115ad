"""The Responses API with real clients, unchanged, against a real `tokenmill serve`: langchain-openai's
ChatOpenAI with use_responses_api (invoke, stream, tools with a tool result, structured output,
previous_response_id) and the OpenAI Agents SDK (a function tool called with valid arguments, a
streamed run, a run continued from its last response). The model is a tiny random one whose chat
template shows tools in the Hermes format, so answers are gibberish: what is checked is that the
clients' calls work end to end."""

from __future__ import annotations

import asyncio
import json
import os

import pytest
from pydantic import BaseModel, Field

if os.environ.get("CI"):  # CI installs the `clients` extra: a missing client must fail there, not skip
    import agents
    import langchain_openai
else:
    langchain_openai = pytest.importorskip("langchain_openai", reason="langchain-openai is in the `clients` extra")
    agents = pytest.importorskip("agents", reason="openai-agents is in the `clients` extra")

from tests.models import TOOLS_CHAT_TEMPLATE, make_model  # noqa: E402
from tests.server_utils import ServerProcess  # noqa: E402

# A random model's text rarely ends by itself: an "e" ends it (OpenAI's clients take an answer cut by
# max_output_tokens, status "incomplete", as a failure).
STOP = {"stop": ["e"], "seed": 1}


class Person(BaseModel):
    name: str = Field(max_length=10)
    age: int = Field(ge=0, le=120)


class get_weather(BaseModel):  # noqa: N801 (a tool's name as the model sees it)
    """The weather forecast for a city."""

    city: str = Field(min_length=1, max_length=12)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("responses_clients")
    model = make_model(str(d / "rc-model"), chat_template=TOOLS_CHAT_TEMPLATE)
    s = ServerProcess(model, "--kv-cache-memory", "0.0625", log_path=str(d / "server.log"))
    yield s
    assert s.stop() == 0


def chat(server, **kw):
    kw = {"temperature": 1.0, "max_tokens": 60, "max_retries": 0, "timeout": 60, **kw}
    return langchain_openai.ChatOpenAI(base_url=server.base_url + "/v1", api_key="unused", model="rc-model",
                                       use_responses_api=True, **kw)


def test_langchain_chat_openai_with_the_responses_api(server):
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage

    llm = chat(server, extra_body=STOP)
    msg = llm.invoke("Hello")
    assert msg.response_metadata["id"].startswith("resp_") and msg.usage_metadata["input_tokens"] > 0
    streamed = None
    for chunk in llm.stream("Hello"):
        streamed = chunk if streamed is None else streamed + chunk
    assert streamed is not None and streamed.text == msg.text  # (the same seed: the same answer)
    # Tools: a required call whose arguments validate, then the tool's result sent back.
    tools = chat(server).bind_tools([get_weather], tool_choice="any")
    call = tools.invoke("Weather in Oslo?").tool_calls[0]
    assert call["name"] == "get_weather" and get_weather.model_validate(call["args"])
    streamed = None
    for chunk in tools.stream("Weather in Rome?"):
        streamed = chunk if streamed is None else streamed + chunk
    assert streamed.tool_calls and get_weather.model_validate(streamed.tool_calls[0]["args"])
    answer = chat(server, extra_body=STOP).bind_tools([get_weather]).invoke([
        HumanMessage("Weather in Oslo?"), AIMessage("", tool_calls=[call]),
        ToolMessage("sunny", tool_call_id=call["id"])])
    assert isinstance(answer.text, str)
    person = chat(server, max_tokens=200).with_structured_output(Person, method="json_schema").invoke("Alice, 30")
    assert isinstance(person, Person)
    # A conversation continued from its last response: only the new message is sent.
    follow = chat(server, use_previous_response_id=True, extra_body=STOP)
    first = follow.invoke([HumanMessage("Hi")])
    second = follow.invoke([HumanMessage("Hi"), first, HumanMessage("And then?")])
    assert second.usage_metadata["input_tokens"] > first.usage_metadata["input_tokens"]


def test_openai_agents_sdk_runs_a_tool_and_continues(server):
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    agents.set_tracing_disabled(True)
    called: list[str] = []

    async def weather(ctx, args: str) -> str:
        called.append(get_weather.model_validate(json.loads(args)).city)
        return "sunny"

    tool = agents.FunctionTool(name="get_weather", description="The weather in a city.", on_invoke_tool=weather,
                               params_json_schema=get_weather.model_json_schema(), strict_json_schema=False)
    model = agents.OpenAIResponsesModel(model="rc-model", openai_client=client)

    def agent(**settings) -> agents.Agent:
        return agents.Agent(name="assistant", instructions="Be brief.", model=model, tools=[tool],
                            tool_use_behavior="stop_on_first_tool",
                            model_settings=agents.ModelSettings(max_tokens=200, temperature=1.0,
                                                                parallel_tool_calls=False, **settings))

    async def main() -> None:
        result = await agents.Runner.run(agent(tool_choice="required", extra_body={"seed": 1}), "Weather in Paris?")
        assert len(called) == 1 and result.final_output == "sunny"
        streamed = agents.Runner.run_streamed(agent(tool_choice="required", extra_body={"seed": 2}), "Weather?")
        kinds = {e.data.type async for e in streamed.stream_events() if e.type == "raw_response_event"}
        assert len(called) == 2 and {"response.created", "response.completed"} <= kinds
        plain = agents.Agent(name="assistant", model=model,
                             model_settings=agents.ModelSettings(max_tokens=60, extra_body=STOP))
        first = await agents.Runner.run(plain, "Hello")
        again = await agents.Runner.run(plain, "More?", previous_response_id=first.last_response_id)
        assert again.last_response_id != first.last_response_id
        assert again.raw_responses[0].usage.input_tokens > first.raw_responses[0].usage.input_tokens
        await client.close()

    asyncio.run(main())
