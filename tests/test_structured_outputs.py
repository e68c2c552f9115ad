"""Structured outputs (llguidance): JSON schemas, regexes, choices and grammars constrain sampled
decoding on a tiny random model, in the engine and through a real server with the openai client,
streamed and not, with speculative decoding, and bad constraints are 400s naming the problem."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest
import torch

from tests.server_utils import ServerProcess
from tokenmill import LLM, SamplingParams
from tokenmill.structured import StructuredOutputsParams, apply_bitmask, gbnf_to_lark

_name = {"type": "string", "minLength": 1, "maxLength": 8}
_int = {"type": "integer", "minimum": -50, "maximum": 50}
# 20 schemas: nested objects, arrays, enums, numbers, required and optional fields, $defs, anyOf.
SCHEMAS = [
    {"type": "object", "properties": {"name": _name, "age": _int}, "required": ["name", "age"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {"type": "object", "properties": {"x": {"type": "number", "minimum": 0, "maximum": 1}}, "required": ["x"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": _name, "maxItems": 3}}, "required": ["tags"]},
    {"type": "object", "properties": {"p": {"type": "object", "properties": {"q": _int, "r": {"type": "boolean"}},
                                            "required": ["q", "r"], "additionalProperties": False}},
     "required": ["p"], "additionalProperties": False},
    {"type": "array", "items": _int, "minItems": 1, "maxItems": 5},
    {"type": "object", "properties": {"a": _int, "b": _name, "c": {"type": "boolean"}}, "required": ["a"],
     "additionalProperties": False},
    {"type": "object", "properties": {"v": {"anyOf": [_int, {"type": "null"}]}}, "required": ["v"]},
    {"type": "object", "properties": {"kind": {"const": "point"}, "xy": {"type": "array", "items": _int,
                                                                         "minItems": 2, "maxItems": 2}},
     "required": ["kind", "xy"], "additionalProperties": False},
    {"$defs": {"item": {"type": "object", "properties": {"id": _int, "label": _name}, "required": ["id", "label"],
                        "additionalProperties": False}},
     "type": "object", "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "maxItems": 3}},
     "required": ["items"], "additionalProperties": False},
    {"type": "object", "properties": {"level": {"type": "integer", "enum": [1, 2, 3]}}, "required": ["level"]},
    {"type": "string", "enum": ["alpha", "beta", "gamma"]},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
     "required": ["code"], "additionalProperties": False},
    {"type": "object", "properties": {"matrix": {"type": "array", "maxItems": 3,
                                                 "items": {"type": "array", "items": _int, "maxItems": 3}}},
     "required": ["matrix"], "additionalProperties": False},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "name": _name, "email": {"type": "string", "format": "email", "maxLength": 20},
        "roles": {"type": "array", "items": {"enum": ["admin", "dev", "ops"]}, "maxItems": 3}},
        "required": ["name", "roles"], "additionalProperties": False}}, "required": ["user"],
     "additionalProperties": False},
    {"type": "object", "properties": {"price": {"type": "number", "exclusiveMinimum": 0, "maximum": 1000},
                                      "currency": {"enum": ["EUR", "USD"]}}, "required": ["price", "currency"]},
    {"type": "object", "properties": {"shape": {"oneOf": [
        {"type": "object", "properties": {"circle": _int}, "required": ["circle"], "additionalProperties": False},
        {"type": "object", "properties": {"square": _int}, "required": ["square"], "additionalProperties": False}]}},
     "required": ["shape"], "additionalProperties": False},
    {"type": "object", "properties": {"n": {"type": "integer", "minimum": 10, "maximum": 99}, "note": _name},
     "required": ["n"], "additionalProperties": False},
    {"type": "object", "properties": {"date": {"type": "string", "format": "date"},
                                      "flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 4}},
     "required": ["date", "flags"], "additionalProperties": False},
]


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("so") / "server.log"
    s = ServerProcess(model_dir, "--max-model-len", "1024", "--kv-cache-memory", "0.0625",
                      log_path=str(log))
    yield s
    s.stop()


def _messages(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Give me JSON number {i}."}]


def test_twenty_schemas_sampled(client, model_name):
    for i, schema in enumerate(SCHEMAS):
        r = client.chat.completions.create(
            model=model_name, messages=_messages(i), temperature=1.0, max_tokens=400, seed=i,
            response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}})
        c = r.choices[0]
        assert c.finish_reason == "stop", (i, c.message.content)
        jsonschema.validate(json.loads(c.message.content), schema)


def test_twenty_schemas_streamed(client, model_name):
    for i, schema in enumerate(SCHEMAS):
        stream = client.chat.completions.create(
            model=model_name, messages=_messages(i), temperature=1.0, max_tokens=400, seed=100 + i, stream=True,
            response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}})
        text, reasons = "", []
        for chunk in stream:
            for ch in chunk.choices:
                text += ch.delta.content or ""
                reasons.append(ch.finish_reason)
        assert reasons[-1] == "stop", (i, text)
        jsonschema.validate(json.loads(text), schema)


def test_all_of_stays_satisfiable(client, model_name):
    schema = {"allOf": [{"type": "object", "properties": {"a": _int}, "required": ["a"]},
                        {"type": "object", "properties": {"b": {"type": "boolean"}}, "required": ["b"]}]}
    r = client.chat.completions.create(model=model_name, messages=_messages(0), temperature=1.0, max_tokens=200,
                                       response_format={"type": "json_schema", "json_schema": {"name": "x",
                                                                                               "schema": schema}})
    # Accepted (closing each branch would have made it unsatisfiable, a 400); the object stays open
    # to other keys, which a random model may wander into until max_tokens.
    c = r.choices[0]
    assert c.message.content.startswith("{")
    if c.finish_reason == "stop":
        jsonschema.validate(json.loads(c.message.content), schema)


def test_grammar_failing_mid_stream_is_an_error_event(client, model_name):
    stream = client.chat.completions.create(model=model_name, messages=_messages(0), max_tokens=20, stream=True,
                                            extra_body={"guided_grammar": 'start: "a" b\nb: "c" b'})
    with pytest.raises(openai.APIError) as e:
        for _ in stream:
            pass
    assert "failed while decoding" in str(e.value)


def test_json_object_and_n(client, model_name):
    r = client.chat.completions.create(model=model_name, messages=_messages(0), temperature=1.0, n=3,
                                       max_tokens=600, response_format={"type": "json_object"})
    for c in r.choices:
        if c.finish_reason == "stop":  # a free-form object may legitimately run to max_tokens
            assert isinstance(json.loads(c.message.content), dict)
        else:
            assert c.message.content.startswith("{")


def test_vllm_fields_on_completions(client, model_name):
    out = client.completions.create(model=model_name, prompt="Hello", max_tokens=30, temperature=1.0, n=4,
                                    extra_body={"guided_regex": r"[0-9]{3}-[a-z]{2}"})
    assert all(re.fullmatch(r"[0-9]{3}-[a-z]{2}", c.text) for c in out.choices)
    out = client.completions.create(model=model_name, prompt="Hello", max_tokens=30, temperature=1.0, n=4,
                                    extra_body={"guided_choice": ["yes", "no", "maybe so"]})
    assert all(c.text in ("yes", "no", "maybe so") and c.finish_reason == "stop" for c in out.choices)
    out = client.completions.create(model=model_name, prompt="Hello", max_tokens=40, temperature=1.0, n=2,
                                    extra_body={"structured_outputs": {"grammar": 'root ::= "(" [a-c]+ ")"'}})
    assert all(re.fullmatch(r"\([a-c]+\)", c.text) for c in out.choices)
    schema = {"type": "object", "properties": {"k": _int}, "required": ["k"], "additionalProperties": False}
    out = client.completions.create(model=model_name, prompt="Hello", max_tokens=40, temperature=1.0,
                                    extra_body={"guided_json": json.dumps(schema)})
    jsonschema.validate(json.loads(out.choices[0].text), schema)
    out = client.completions.create(model=model_name, prompt="Hello", max_tokens=40, temperature=1.0,
                                    extra_body={"structured_outputs": {"json": schema}})
    jsonschema.validate(json.loads(out.choices[0].text), schema)


@pytest.mark.parametrize("body,needle", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "strin"}}}}}}, "Invalid type: strin"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}}, "not"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "json_schema.schema"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"guided_regex": "(("}, "unclosed group"),
    ({"guided_grammar": "start: foo"}, "unknown name"),
    ({"guided_json": "{not json"}, "not valid JSON"),
    ({"guided_choice": []}, "non-empty"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "only one output constraint"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "exactly one"),
    ({"structured_outputs": {}}, "exactly one"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": False}}}, "admits no value"),
    ({"guided_json": "null"}, "must be a JSON object"),
    ({"guided_json": "0"}, "must be a JSON object"),
    # Compiles, then exceeds the parser's limits after the first token: still a 400, not a 500.
    ({"guided_grammar": 'start: "a" b\nb: "c" b'}, "failed while decoding"),
])
def test_bad_constraints_are_400s(client, model_name, body, needle):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model_name, messages=_messages(0), max_tokens=5, extra_body=body)
    assert needle in e.value.message, e.value.message
    # The server keeps serving.
    assert client.chat.completions.create(model=model_name, messages=_messages(0), max_tokens=2).choices


# -- the engine ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine_llm(model_dir):
    return LLM(model_dir, kv_cache_memory_bytes=8 * 2**20, seed=0)


def test_grammar_finishes_without_eos_and_beats_min_tokens(engine_llm):
    so = StructuredOutputsParams(choice=["yes", "no"])
    out = engine_llm.generate(["Hi"] * 4, SamplingParams(temperature=1.0, max_tokens=20, min_tokens=10,
                                                          structured_outputs=so))
    for o in out:
        c = o.outputs[0]
        assert c.text in ("yes", "no") and c.finish_reason == "stop"


def test_grammar_completed_by_the_last_allowed_token_is_a_stop(engine_llm):
    """A constraint completed exactly on the max_tokens-th token: the output is whole ("stop"), not cut."""
    so = StructuredOutputsParams(choice=["hello world, again"])
    free = engine_llm.generate("Hi", SamplingParams(temperature=0, structured_outputs=so))[0].outputs[0]
    n = len(free.token_ids)
    assert free.text == "hello world, again" and free.finish_reason == "stop" and n > 1
    exact = engine_llm.generate("Hi", SamplingParams(temperature=0, max_tokens=n, structured_outputs=so))[0].outputs[0]
    assert exact.text == free.text and exact.finish_reason == "stop"
    cut = engine_llm.generate("Hi", SamplingParams(temperature=0, max_tokens=n - 1, structured_outputs=so))
    assert cut[0].outputs[0].finish_reason == "length"


def test_same_schema_compiles_once(engine_llm):
    so = StructuredOutputsParams(json=SCHEMAS[0])
    g1 = engine_llm.engine.grammars.compile(so)
    g2 = engine_llm.engine.grammars.compile(StructuredOutputsParams(json=json.dumps(SCHEMAS[0])))
    assert g1 is g2


def test_constrained_and_free_rows_share_a_batch(engine_llm):
    """Each row keeps its own constraint: free rows match a run without any constrained neighbour."""
    free = SamplingParams(temperature=0.0, max_tokens=12)
    alone = [o.outputs[0].token_ids for o in engine_llm.generate(["Hello world", "The quick"], free)]
    mixed = engine_llm.generate(
        ["Hello world", "Hi", "The quick", "Hey"],
        [free, SamplingParams(temperature=1.0, max_tokens=40, structured_outputs=StructuredOutputsParams(
            regex=r"[a-z]{5}")), free,
         SamplingParams(temperature=0.0, max_tokens=40, structured_outputs=StructuredOutputsParams(json=SCHEMAS[2]))])
    assert [mixed[0].outputs[0].token_ids, mixed[2].outputs[0].token_ids] == alone
    assert re.fullmatch(r"[a-z]{5}", mixed[1].outputs[0].text)
    jsonschema.validate(json.loads(mixed[3].outputs[0].text), SCHEMAS[2])


@pytest.mark.parametrize("spec", ["ngram", "draft_model"])
def test_speculative_decoding_keeps_the_constraint(model_dir, spec):
    """Greedy constrained decoding gives the same tokens with and without speculation."""
    cfg = ({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
           if spec == "ngram" else {"method": "draft_model", "model": model_dir, "num_speculative_tokens": 3})
    prompts = ['{"tags": ["a", "a", "a"', "The quick brown fox jumps over the lazy dog. The quick"]
    schema = {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b"]},
                                                        "maxItems": 12}}, "required": ["tags"]}
    params = [SamplingParams(temperature=0.0, max_tokens=80, structured_outputs=StructuredOutputsParams(json=schema)),
              SamplingParams(temperature=0.0, max_tokens=30, structured_outputs=StructuredOutputsParams(
                  regex=r"( [a-z]+){1,8}\."))]
    base = LLM(model_dir, kv_cache_memory_bytes=8 * 2**20).generate(prompts, params)
    spec_llm = LLM(model_dir, kv_cache_memory_bytes=8 * 2**20, speculative_config=cfg)
    got = spec_llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in base]
    jsonschema.validate(json.loads(got[0].outputs[0].text), schema)
    assert spec_llm.engine.spec_stats.num_draft_tokens > 0
    # Sampled: every output still matches.
    sampled = spec_llm.generate(prompts, [SamplingParams(temperature=1.0, max_tokens=80, seed=3,
                                                         structured_outputs=p.structured_outputs) for p in params])
    jsonschema.validate(json.loads(sampled[0].outputs[0].text), schema)
    assert re.fullmatch(r"( [a-z]+){1,8}\.", sampled[1].outputs[0].text)


def test_apply_bitmask_matches_reference():
    torch.manual_seed(0)
    logits = torch.randn(5, 77)
    allowed = torch.rand(2, 77) < 0.3
    words = torch.zeros(2, 3, dtype=torch.int64)
    for r in range(2):
        for t in allowed[r].nonzero()[:, 0].tolist():
            words[r, t // 32] |= 1 << (t % 32)
    bitmask = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # bit 31: a negative int32
    out = apply_bitmask(logits, bitmask, [1, 3])
    ref = logits.clone()
    ref[1][~allowed[0]] = float("-inf")
    ref[3][~allowed[1]] = float("-inf")
    assert torch.equal(out, ref)
    assert torch.equal(logits[0], out[0])  # the input is untouched


def test_gbnf_to_lark():
    lark = gbnf_to_lark('root ::= item-list\n# a comment\nitem-list ::= "[" [0-9]+ (\n  "," [0-9]+ )* "]"\n')
    assert lark == 'start : item_list\nitem_list : "[" /[0-9]/+ ( "," /[0-9]/+ )* "]"'


def test_close_objects():
    from tokenmill.structured import close_objects

    s = {"type": "object", "properties": {"properties": {"type": "object", "properties": {"a": {}}},
                                          "open": {"type": "object", "properties": {}, "additionalProperties": True}},
         "$defs": {"d": {"properties": {"x": {}}}}, "anyOf": [{"properties": {}}], "items": {"properties": {}}}
    c = close_objects(s)
    assert c["additionalProperties"] is False
    assert c["properties"]["properties"]["additionalProperties"] is False
    assert "additionalProperties" not in c["properties"]["properties"]["properties"]  # a mapping, not a schema
    assert c["properties"]["open"]["additionalProperties"] is True
    assert c["$defs"]["d"]["additionalProperties"] is False
    assert c["anyOf"][0]["additionalProperties"] is False and c["items"]["additionalProperties"] is False
    assert "additionalProperties" not in s  # the input is untouched
    assert close_objects({"type": "object"}) == {"type": "object"}  # json_object stays open
