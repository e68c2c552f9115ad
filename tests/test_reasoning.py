"""--reasoning-parser: a thinking model's <think> section as `reasoning`, apart from `content`, by
one rule whole and streamed; through a real server with the official openai client (the tiny
random model is made to think by a regex constraint)."""

from __future__ import annotations

import random

import pytest

from tests.models import CHAT_TEMPLATE, make_model
from tests.server_utils import ServerProcess
from tokenmill.server.reasoning import REASONING_PARSERS, ReasoningStream, split_reasoning

CASES = {
    "<think>\nplan</think>\n\nAnswer": {"deepseek_r1": ("\nplan", "\n\nAnswer"), "qwen3": ("\nplan", "\n\nAnswer")},
    "plan</think>Answer": {"deepseek_r1": ("plan", "Answer"), "qwen3": (None, "plan</think>Answer")},
    "<think>unfinished": {"deepseek_r1": ("unfinished", None), "qwen3": ("unfinished", None)},
    "Hello": {"deepseek_r1": ("Hello", None), "qwen3": (None, "Hello")},
    "<think></think>x": {"deepseek_r1": (None, "x"), "qwen3": (None, "x")},
    "a</think>b</think>c": {"deepseek_r1": ("a", "b</think>c"), "qwen3": (None, "a</think>b</think>c")},
    "<thin": {"deepseek_r1": ("<thin", None), "qwen3": (None, "<thin")},
    "x</thi": {"deepseek_r1": ("x</thi", None), "qwen3": (None, "x</thi")},
}


@pytest.mark.parametrize("parser", REASONING_PARSERS)
@pytest.mark.parametrize("text", list(CASES))
def test_whole_and_streamed_agree(parser, text):
    assert split_reasoning(parser, text) == CASES[text][parser]
    rng = random.Random(0)
    for _ in range(20):
        rs, r, c, i = ReasoningStream(parser), "", "", 0
        while i < len(text):
            i = min(len(text), i + rng.randint(1, 4))
            a, b = rs.feed(text[:i], i == len(text))
            r, c = r + a, c + b
        assert (r or None, c or None) == CASES[text][parser]


# DeepSeek-R1's way: the generation prompt opens the thinking section.
R1_TEMPLATE = CHAT_TEMPLATE.replace("<s>assistant\n{% endif %}", "<s>assistant\n<think>\n{% endif %}")


@pytest.fixture(scope="module")
def r1_model(tmp_path_factory):
    return make_model(str(tmp_path_factory.mktemp("r1") / "r1"), chat_template=R1_TEMPLATE)


@pytest.fixture(scope="module")
def model_name():
    return "r1"


@pytest.fixture(scope="module")
def server(r1_model, tmp_path_factory):
    s = ServerProcess(r1_model, "--kv-cache-memory", "0.0625", "--reasoning-parser", "deepseek_r1",
                      log_path=str(tmp_path_factory.mktemp("reasoning_log") / "server.log"))
    yield s
    s.stop()


def test_reasoning_apart_from_content_streamed_and_not(client, model_name):
    """The random model thinks for 6 tokens, the budget closes its section, and it answers."""
    kw = dict(model=model_name, messages=[{"role": "user", "content": "Think first."}], max_tokens=30,
              temperature=1.0, seed=3, extra_body={"max_reasoning_tokens": 6, "ignore_eos": True})
    m = client.chat.completions.create(**kw).choices[0].message
    reasoning = m.model_extra["reasoning"]
    assert reasoning and "</think>" not in reasoning and "</think>" not in m.content
    assert m.content and m.model_extra["reasoning_content"] == reasoning  # (the older name, as DeepSeek's API)
    r = c = rc = ""
    for chunk in client.chat.completions.create(**kw, stream=True):
        if chunk.choices:
            r += chunk.choices[0].delta.model_extra.get("reasoning") or ""
            rc += chunk.choices[0].delta.model_extra.get("reasoning_content") or ""
            c += chunk.choices[0].delta.content or ""
    assert (r, rc, c) == (reasoning, reasoning, m.content)


# -- the reasoning budget (max_reasoning_tokens) -----------------------------------------------
@pytest.fixture(scope="module")
def budget_llm(model_dir):
    from tokenmill import LLM

    return LLM(model_dir, kv_cache_memory_bytes=8 * 2**20, max_num_batched_tokens=256, seed=0)


@pytest.mark.parametrize("budget", [0, 1, 7])
def test_budget_closes_the_section(budget_llm, budget):
    """A prompt that opens <think>: after `budget` tokens the engine writes </think> and the
    model goes on answering; the budget is hard, with any sampling."""
    from tokenmill import SamplingParams

    eng = budget_llm.engine
    end = list(eng.think_ids[1])
    for seed in range(3):
        out = budget_llm.generate("Question: why?<think>", SamplingParams(
            max_tokens=40, ignore_eos=True, temperature=1.0, seed=seed, max_reasoning_tokens=budget,
            logprobs=1))[0].outputs[0]
        ids = out.token_ids
        i = next(i for i in range(len(ids)) if ids[i : i + len(end)] == end)
        assert i <= budget and "</think>" in out.text and len(ids) == 40  # it answered on
        assert all(lp is not None for lp in out.logprobs)  # the forced tokens' logprobs are the model's


def test_no_budget_without_a_section_and_bad_values(budget_llm):
    from tokenmill import SamplingParams

    free = budget_llm.generate("Plain prompt", SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    capped = budget_llm.generate("Plain prompt", SamplingParams(max_tokens=20, temperature=0, ignore_eos=True,
                                                                 max_reasoning_tokens=0))
    assert free[0].outputs[0].token_ids == capped[0].outputs[0].token_ids  # no <think>: nothing forced
    with pytest.raises(ValueError, match="^max_reasoning_tokens:"):
        budget_llm.generate("x", SamplingParams(max_tokens=2, max_reasoning_tokens=-1))


def test_budget_over_http(client, model_name):
    r = client.completions.create(model=model_name, prompt="Q <think>", max_tokens=30, temperature=1.0, seed=1,
                                  extra_body={"max_reasoning_tokens": 3, "ignore_eos": True})
    text = r.choices[0].text
    assert "</think>" in text


def test_tags_are_read_from_text_not_from_token_ids(budget_llm):
    """A prompt mentioning <think> mid-way or closing its section does not open one; a prompt
    ending with "<think>" after a space does; a min_tokens ban on the closing tag's first token
    does not stop the engine from closing the section."""
    from tokenmill import SamplingParams

    def gen(prompt, **kw):
        sp = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, **kw)
        return budget_llm.generate(prompt, sp)[0].outputs[0]

    for prompt in ("What is the\n<think>\ntag for? Answer:", "Q<think>plan </think>Answer:"):
        assert gen(prompt, max_reasoning_tokens=0).token_ids == gen(prompt).token_ids
    assert gen("Question: <think>", max_reasoning_tokens=0).text.startswith("</think>")
    first = budget_llm.engine.think_ids[1][0]
    out = gen("Q<think>", max_reasoning_tokens=2, min_tokens=8, stop_token_ids=[first])
    assert "</think>" in out.text and 0 not in out.token_ids  # no empty rows sampled as token 0


def test_constrained_output_is_never_reasoning(client, model_name):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}}]
    m = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "Call f"}],
                                       tools=tools, tool_choice="required", max_tokens=60, seed=1).choices[0].message
    assert m.tool_calls and m.tool_calls[0].function.name == "f" and m.model_extra.get("reasoning") is None
