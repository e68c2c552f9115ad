"""The demo model shipped in the package: loads with no arguments, does its arithmetic, writes
English, matches transformers, and is what `tokenmill serve` serves by default."""

from __future__ import annotations

import importlib.util
import os
import re

import openai
import pytest

from tests.server_utils import ROOT, ServerProcess
from tokenmill import LLM, SamplingParams
from tokenmill.demo import evaluate, parse_answer
from tokenmill.llm import default_model_path

DEMO = default_model_path()


@pytest.fixture(scope="module")
def demo():
    return LLM(kv_cache_memory_bytes=32 * 2**20)


def test_ships_inside_the_package_and_is_small():
    files = os.listdir(DEMO)
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert f in files
    size = sum(os.path.getsize(os.path.join(DEMO, f)) for f in files)
    assert size <= 30 * 2**20
    import json

    with open(os.path.join(DEMO, "tokenizer_config.json")) as f:
        assert "chat_template" in json.load(f)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DEMO)
    text = tok.apply_chat_template([{"role": "user", "content": "What is 1 + 2?"}], add_generation_prompt=True,
                                   tokenize=False)
    assert text.endswith("<|assistant|>\n")


def test_answers_with_worked_steps(demo):
    out = demo.chat([{"role": "user", "content": "What is 123 + 456?"}],
                    SamplingParams(max_tokens=160, temperature=0))[0].outputs[0]
    assert out.text.startswith("Let's add digit by digit.")
    assert "Ones: 3 + 6 = 9, write 9." in out.text
    assert re.search(r"The answer is -?\d+\.$", out.text)
    assert out.finish_reason == "stop"


def test_held_out_accuracy(demo):
    result = evaluate(demo, 40)
    assert result["total"] == 40
    assert result["accuracy"] >= 0.6, result


def test_continues_english_with_real_words(demo):
    spec = importlib.util.spec_from_file_location("train_demo_model", os.path.join(ROOT, "scripts",
                                                                                 "train_demo_model.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    words = set()
    for name in dir(script):
        value = getattr(script, name)
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            for phrase in value:
                words.update(re.findall(r"[a-z]+", phrase.lower()))
    for fn in (script._sentence, script._fix, script.english_paragraph):  # words inside the templates
        words.update(re.findall(r"[a-z]+", repr(fn.__code__.co_consts).lower()))
    text = demo.generate("The weather today is", SamplingParams(max_tokens=24, temperature=0))[0].outputs[0].text
    found = re.findall(r"[A-Za-z]+", text)
    assert len(found) >= 8, text
    unknown = [w for w in found if w.lower() not in words]
    assert not unknown, (text, unknown)


def test_matches_transformers(demo):
    from tests.models import hf_greedy, hf_model

    prompt = demo.chat_prompt([{"role": "user", "content": "What is 902 - 458?"}])["prompt_token_ids"]
    ours = demo.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=60, temperature=0,
                                                                     ignore_eos=True))[0].outputs[0].token_ids
    assert ours == hf_greedy(hf_model(DEMO), prompt, 60)


def test_serve_without_a_model_serves_the_demo(tmp_path):
    srv = ServerProcess(None, "--kv-cache-memory", "0.03", log_path=str(tmp_path / "server.log"))
    try:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == ["tokenmill-demo"]
        r = client.chat.completions.create(model="tokenmill-demo", temperature=0, max_tokens=160,
                                           messages=[{"role": "user", "content": "What is 123 + 456?"}])
        text = r.choices[0].message.content
        assert "Ones:" in text and parse_answer(text) is not None
        assert text.rstrip().endswith(f"The answer is {parse_answer(text)}.")
    finally:
        assert srv.stop() == 0


def test_training_script_is_reproducible(tmp_path):
    """Two short runs with the same seed write identical weights (the full run is the same code
    with --steps 4500)."""
    import subprocess
    import sys

    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "train_demo_model.py"), "--out", str(out),
                        "--steps", "3", "--hidden", "32", "--layers", "1", "--heads", "2", "--batch", "2",
                        "--seq-len", "64", "--threads", "1"], check=True, capture_output=True, timeout=600)
        outs.append((out / "model.safetensors").read_bytes())
        assert (out / "tokenizer_config.json").exists()
    assert outs[0] == outs[1]
    tuned = LLM(str(tmp_path / "a"), kv_cache_memory_bytes=2**20)
    assert tuned.chat([{"role": "user", "content": "What is 1 + 2?"}], SamplingParams(max_tokens=3))[0].outputs


def test_chain_task_answers_are_right_by_every_method():
    """The reasoning family's task: every worked step and every answer checks out, by every method;
    the held-out test and validation chains are disjoint from each other."""
    import random

    from tokenmill.demo import (
        CHAIN_METHODS,
        chain_answer,
        chain_methods,
        chain_questions,
        chain_split,
        chain_value,
        random_chain,
    )

    rng = random.Random(0)
    for _ in range(500):
        nums, ops = random_chain(rng)
        value = chain_value(nums, ops)
        assert 0 <= value <= 9999 and len(nums) in (3, 4)
        texts = {m: chain_answer(nums, ops, m) for m in CHAIN_METHODS}
        for text in texts.values():
            assert parse_answer(text) == value
            for line in text.splitlines():
                if m := re.fullmatch(r"So (\d+) ([+-]) (\d+) = (\d+)\.", line):
                    a, op, b, r = m.groups()
                    assert int(r) == (int(a) + int(b) if op == "+" else int(a) - int(b))
        methods = chain_methods(nums, ops)  # the methods that take different steps for this chain
        assert methods[0] == "in_order" and len(methods) >= 2 - (len(nums) == 2)
        steps = {m: [x for x in texts[m].splitlines()[1:] if x.startswith("Step")] for m in methods}
        assert len({tuple(v) for v in steps.values()}) == len(methods)
    test, val = chain_questions(50, split=0), chain_questions(50, split=1)
    assert all(chain_split(n) == 0 for n, _ in test) and all(chain_split(n) == 1 for n, _ in val)


def test_reasoning_demo_model_works_its_chains():
    """The reasoning family's base model ships in the package and shows its work on held-out
    chains (its accuracy is a benchmark figure, docs/benchmarks/test_time_compute.md: here only
    that it is the trained model, not noise)."""
    from tokenmill.bench.ttc import default_model
    from tokenmill.demo import _CHAIN_HEADERS, chain_methods, chain_question, chain_questions, chain_value

    llm = LLM(default_model(), dtype="float32", kv_cache_memory_bytes=32 * 2**20)
    qs = chain_questions(10, split=0)
    prompts = [llm.chat_prompt([{"role": "user", "content": chain_question(n, o)}]) for n, o in qs]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=512))
    right = sum(parse_answer(o.outputs[0].text) == chain_value(n, ops) for (n, ops), o in zip(qs, outs))
    assert right >= 4
    for (n, ops), o in zip(qs, outs):  # each answer follows one of the methods it was taught
        assert o.outputs[0].text.splitlines()[0] in {_CHAIN_HEADERS[m] for m in chain_methods(n, ops)}


def test_small_reasoning_model_is_a_faithful_draft():
    """chain_small ships beside chain with the same tokenizer, is the smaller of the two, and as
    chain's speculative draft leaves chain's greedy output unchanged."""
    from tokenmill.bench.ttc import default_model
    from tokenmill.demo import chain_question, chain_questions

    base = default_model()
    small = os.path.join(os.path.dirname(base), "chain_small")
    with open(os.path.join(base, "tokenizer.json")) as a, open(os.path.join(small, "tokenizer.json")) as b:
        assert a.read() == b.read()
    assert os.path.getsize(os.path.join(small, "model.safetensors")) < os.path.getsize(
        os.path.join(base, "model.safetensors")) / 3
    plain = LLM(base, dtype="float32", kv_cache_memory_bytes=32 * 2**20)
    spec = LLM(base, dtype="float32", kv_cache_memory_bytes=32 * 2**20,
               speculative_config={"method": "draft_model", "model": small, "num_speculative_tokens": 4})
    prompts = [plain.chat_prompt([{"role": "user", "content": chain_question(n, o)}])
               for n, o in chain_questions(3, split=0)]
    sp = SamplingParams(temperature=0, max_tokens=512)
    assert [o.outputs[0].token_ids for o in spec.generate(prompts, sp)] == [
        o.outputs[0].token_ids for o in plain.generate(prompts, sp)]
    assert spec.engine.stats()["spec_decode_num_accepted_tokens"] > 0
