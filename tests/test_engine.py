"""The offline API end to end on a tiny random Llama with a byte-level BPE tokenizer."""

import pytest
import torch

from tests.models import hf_model, make_model
from tokenmill import LLM, SamplingParams

PROMPTS = ["The quick brown fox", "Hello world! How", "def fib(n):", "Café crème"]


def _tokens(llm, prompt, **kw):
    return llm.generate(prompt, SamplingParams(**kw))[0].outputs[0]


def test_string_and_token_prompts_agree(llm):
    tok = llm.get_tokenizer()
    a = llm.generate(PROMPTS[0], SamplingParams(max_tokens=8, temperature=0))[0]
    b = llm.generate({"prompt_token_ids": tok.encode(PROMPTS[0])}, SamplingParams(max_tokens=8, temperature=0))[0]
    assert a.prompt == PROMPTS[0]
    assert a.prompt_token_ids == b.prompt_token_ids
    assert a.outputs[0].token_ids == b.outputs[0].token_ids


def test_output_order_and_per_prompt_params(llm):
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (3, 7, 1, 5)]
    outs = llm.generate(PROMPTS, params)
    assert [o.prompt for o in outs] == PROMPTS
    assert [len(o.outputs[0].token_ids) for o in outs] == [3, 7, 1, 5]
    assert all(o.outputs[0].finish_reason == "length" for o in outs)


def test_text_is_the_detokenized_output(llm):
    tok = llm.get_tokenizer()
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=40, temperature=1.0, seed=3, ignore_eos=True))
    for o in outs:
        c = o.outputs[0]
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)


def test_seed_reproducible_across_batch_compositions(llm):
    p = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=42, ignore_eos=True)
    alone = llm.generate(PROMPTS[1], p)[0].outputs[0].token_ids
    mixed = llm.generate(
        PROMPTS + [PROMPTS[1]],
        [SamplingParams(max_tokens=20, temperature=1.0, ignore_eos=True), p,
         SamplingParams(max_tokens=5, temperature=0), SamplingParams(max_tokens=9, top_k=4, seed=1), p],
    )
    assert mixed[1].outputs[0].token_ids == alone
    assert mixed[4].outputs[0].token_ids == alone
    unseeded = [llm.generate(PROMPTS[1], SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True))[0]
                .outputs[0].token_ids for _ in range(2)]
    assert unseeded[0] != unseeded[1]


def test_seed_reproducible_across_preemption(model_dir):
    from tokenmill import LLM

    small = LLM(model_dir, max_model_len=256, max_num_batched_tokens=32, kv_cache_memory_bytes=16 * 2**13)  # 16 blocks
    p = SamplingParams(max_tokens=60, temperature=1.0, seed=7, ignore_eos=True)
    alone = small.generate(PROMPTS[2], p)[0].outputs[0].token_ids
    outs = small.generate([PROMPTS[2]] * 6, p)
    assert small.engine.scheduler.num_preemptions > 0
    assert all(o.outputs[0].token_ids == alone for o in outs)


def test_n_samples(llm):
    out = llm.generate(PROMPTS[0], SamplingParams(n=3, max_tokens=10, temperature=1.0, seed=5, ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    seqs = [c.token_ids for c in out.outputs]
    assert len({tuple(s) for s in seqs}) > 1
    again = llm.generate(PROMPTS[0], SamplingParams(n=3, max_tokens=10, temperature=1.0, seed=5, ignore_eos=True))
    assert [c.token_ids for c in again[0].outputs] == seqs


def test_stop_strings_cut_exactly(llm):
    base = _tokens(llm, PROMPTS[0], max_tokens=40, temperature=0, ignore_eos=True)
    text = base.text
    assert len(text) > 12
    stop = text[6:9]
    cut = text.find(stop)
    out = _tokens(llm, PROMPTS[0], max_tokens=40, temperature=0, ignore_eos=True, stop=[stop, "\x00never"])
    assert out.text == text[:cut]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    inc = _tokens(llm, PROMPTS[0], max_tokens=40, temperature=0, ignore_eos=True, stop=stop,
                  include_stop_str_in_output=True)
    assert inc.text == text[: cut + len(stop)]


def test_stop_token_ids_and_eos(llm):
    base = _tokens(llm, PROMPTS[3], max_tokens=20, temperature=0, ignore_eos=True).token_ids
    stop_id = base[4]
    out = _tokens(llm, PROMPTS[3], max_tokens=20, temperature=0, ignore_eos=True, stop_token_ids=[stop_id])
    assert out.token_ids == base[: base.index(stop_id) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id

    engine = llm.engine
    saved = engine.eos_token_ids
    engine.eos_token_ids = (stop_id,)
    try:
        out = _tokens(llm, PROMPTS[3], max_tokens=20, temperature=0)
        assert out.token_ids == base[: base.index(stop_id) + 1] and out.finish_reason == "stop"
        assert out.stop_reason is None
        ignored = _tokens(llm, PROMPTS[3], max_tokens=20, temperature=0, ignore_eos=True)
        assert ignored.token_ids == base and ignored.finish_reason == "length"
        first = base.index(stop_id)
        late = _tokens(llm, PROMPTS[3], max_tokens=20, temperature=0, min_tokens=first + 2)
        assert len(late.token_ids) >= first + 2
    finally:
        engine.eos_token_ids = saved


@pytest.mark.parametrize("rows", [256, 2], ids=["whole-chunk", "rows-at-a-time"])
def test_logprobs_match_transformers(llm, model_dir, rows, monkeypatch):
    import tokenmill.engine.model_runner as mr

    monkeypatch.setattr(mr, "PROMPT_LOGPROB_ROWS", rows)  # (prompt logprobs' logits, a few rows at a time)
    tok = llm.get_tokenizer()
    ids = tok.encode(PROMPTS[0])
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=6, temperature=0, logprobs=3, prompt_logprobs=2,
                                                  ignore_eos=True))[0]
    c = out.outputs[0]
    full = ids + c.token_ids
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(model_dir)(torch.tensor([full])).logits[0].float(), -1)
    assert len(c.logprobs) == 6
    total = 0.0
    for i, (t, entry) in enumerate(zip(c.token_ids, c.logprobs)):
        row = ref[len(ids) - 1 + i]
        assert entry[t].logprob == pytest.approx(float(row[t]), abs=1e-4)
        assert entry[t].rank == 1
        assert set(entry) >= set(row.topk(3).indices.tolist())
        total += entry[t].logprob
    assert c.cumulative_logprob == pytest.approx(total, abs=1e-4)
    assert out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == len(ids)
    for pos in range(1, len(ids)):
        entry = out.prompt_logprobs[pos]
        assert entry[ids[pos]].logprob == pytest.approx(float(ref[pos - 1, ids[pos]]), abs=1e-4)
        assert len(entry) in (2, 3)


def test_prompt_logprobs_with_chunked_prefill(model_dir):
    from tokenmill import LLM

    chunky = LLM(model_dir, max_num_batched_tokens=7, kv_cache_memory_bytes=4 * 2**20)
    ids = list(range(5, 45))
    out = chunky.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=2, prompt_logprobs=0))[0]
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(model_dir)(torch.tensor([ids])).logits[0], -1)
    assert len(out.prompt_logprobs) == len(ids)
    for pos in range(1, len(ids)):
        assert out.prompt_logprobs[pos][ids[pos]].logprob == pytest.approx(float(ref[pos - 1, ids[pos]]), abs=1e-4)


def test_metrics(llm):
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0]
    m = out.metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time
    assert m.ttft >= 0 and m.mean_tpot >= 0 and m.num_generated_tokens == 5
    assert m.e2e_latency >= m.ttft


@pytest.mark.parametrize(
    "prompt,kwargs,param",
    [
        ("", {}, "prompt"),
        ({"prompt_token_ids": []}, {}, "prompt"),
        ("hi", {"max_tokens": -1}, "max_tokens"),
        ("hi", {"temperature": -1.0}, "temperature"),
        ("hi", {"top_p": 0.0}, "top_p"),
        ("hi", {"top_p": 1.01}, "top_p"),
        ("hi", {"max_tokens": 5000}, "max_tokens"),
        ({"prompt_token_ids": [1, 99999]}, {}, "prompt_token_ids"),
        ("hi", {"stop_token_ids": [10**9]}, "stop_token_ids"),
    ],
)
def test_bad_input_raises_and_leaves_engine_usable(llm, prompt, kwargs, param):
    engine = llm.engine
    free = engine.block_manager.num_free_blocks
    with pytest.raises(ValueError, match=f"^{param}"):
        llm.generate(["A fine prompt", prompt], SamplingParams(**kwargs))
    assert not engine.has_unfinished_requests() and engine.num_unfinished_requests == 0
    assert engine.block_manager.num_free_blocks == free
    assert len(llm.generate("still works", SamplingParams(max_tokens=2))[0].outputs[0].token_ids) >= 1


def test_abort_frees_blocks_at_any_moment(llm):
    engine = llm.engine
    free = engine.block_manager.num_free_blocks
    ids = [engine.add_request(p, SamplingParams(max_tokens=30, ignore_eos=True)) for p in PROMPTS]
    engine.step()
    engine.step()
    assert engine.block_manager.num_free_blocks < free
    out = engine.abort_request(ids[1])
    assert out.finished and out.outputs[0].finish_reason == "abort"
    for rid in ids:
        engine.abort_request(rid)
    assert engine.block_manager.num_free_blocks == free
    assert not engine.has_unfinished_requests()
    assert not engine.requests and not engine._seq_by_id  # nothing of the request is kept


def test_priority_runs_first(model_dir):
    from tokenmill import LLM

    one = LLM(model_dir, max_num_seqs=1, kv_cache_memory_bytes=4 * 2**20)
    outs = one.generate(PROMPTS[:3], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True),
                        priority=[5, 0, -3])
    order = sorted(outs, key=lambda o: o.metrics.first_scheduled_time)
    assert [o.prompt for o in order] == [PROMPTS[2], PROMPTS[1], PROMPTS[0]]


def test_stream_and_generate_interleave(llm):
    """A paused stream() and a generate() share the engine: neither loses the other's outputs."""
    greedy = SamplingParams(max_tokens=20, temperature=0)
    want = llm.generate("Hello world", greedy)[0].outputs[0].text
    a = llm.stream("Hello world", greedy)
    first = next(a)
    short = "".join(llm.stream("Hello world", SamplingParams(max_tokens=5, temperature=0)))
    mid = llm.generate(["The quick", "Hello world"], greedy)[1].outputs[0].text
    assert first + "".join(a) == want == mid
    assert want.startswith(short)
    assert not llm.engine.has_unfinished_requests() and not llm._latest


def test_stop_token_text_is_not_in_the_output(llm):
    """EOS or a stop_token_ids hit ends the text before that token (vLLM's behaviour); the id stays
    in token_ids, and include_stop_str_in_output keeps the text."""
    base = _tokens(llm, PROMPTS[0], max_tokens=12, temperature=0, ignore_eos=True, skip_special_tokens=False)
    stop_id = base.token_ids[5]
    first = base.token_ids.index(stop_id)
    want = llm.engine.tokenizer.decode(base.token_ids[:first], skip_special_tokens=False)
    out = _tokens(llm, PROMPTS[0], max_tokens=12, temperature=0, ignore_eos=True, stop_token_ids=[stop_id],
                  skip_special_tokens=False)
    assert out.token_ids == base.token_ids[: first + 1]
    assert out.text == want
    kept = _tokens(llm, PROMPTS[0], max_tokens=12, temperature=0, ignore_eos=True, stop_token_ids=[stop_id],
                   skip_special_tokens=False, include_stop_str_in_output=True)
    assert kept.text == llm.engine.tokenizer.decode(base.token_ids[: first + 1], skip_special_tokens=False)
    engine = llm.engine
    saved = engine.eos_token_ids
    engine.eos_token_ids = (stop_id,)
    try:
        eos = _tokens(llm, PROMPTS[0], max_tokens=12, temperature=0, skip_special_tokens=False)
        assert eos.token_ids == base.token_ids[: first + 1] and eos.text == want
    finally:
        engine.eos_token_ids = saved


def test_llm_chat_reads_messages_as_the_chat_endpoint_does(tmp_path):
    """LLM.chat takes OpenAI content parts, an assistant's tool calls with JSON-string arguments,
    tools, continue_final_message and chat_template_kwargs, as vLLM's does; a bad message is a
    ValueError naming it (content parts went into the prompt as a Python list's repr)."""
    from tests.models import TOOLS_CHAT_TEMPLATE

    template = TOOLS_CHAT_TEMPLATE + "{% if enable_thinking is defined and not enable_thinking %}/no_think{% endif %}"
    llm = LLM(make_model(str(tmp_path / "m"), "llama", chat_template=template), kv_cache_memory_bytes=8 * 2**20)
    plain = llm.chat_prompt([{"role": "user", "content": "Hi there"}])["prompt"]
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}]
    assert llm.chat_prompt(parts)["prompt"] == plain
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    text = llm.chat_prompt([{"role": "user", "content": "Hi"}, {"role": "assistant", "tool_calls": [call]},
                            {"role": "tool", "tool_call_id": "c1", "content": "2"}], tools=tools)["prompt"]
    assert '<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>' in text and "Tools:" in text
    assert llm.chat_prompt(parts, chat_template_kwargs={"enable_thinking": False})["prompt"] == plain + "/no_think"
    going = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Well, the"}]
    assert llm.chat_prompt(going, False, continue_final_message=True)["prompt"].endswith("assistant\nWell, the")
    sp = SamplingParams(temperature=0, max_tokens=4)
    assert (llm.chat(going, sp, add_generation_prompt=False, continue_final_message=True)[0].prompt
            .endswith("Well, the"))
    # As vLLM's LLM.chat (and as it was here): any role, extra keys, arguments as an object, no call id.
    loose = [{"role": "ipython", "content": "x", "reasoning_content": "r"},
             {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": {"x": 1}}}]}]
    assert '"arguments": {"x": 1}' in llm.chat_prompt(loose)["prompt"]
    # OpenAI's developer role is the system role to a template that does not know it (it was dropped),
    # a template among named ones too.
    dev = [{"role": "developer", "content": "Be brief"}]
    assert llm.chat_prompt(dev)["prompt"].startswith("<s>system\nBe brief")
    tok = llm.get_tokenizer()
    tok.chat_template = {"default": tok.chat_template, "other": "{{ messages }}"}
    assert llm.chat_prompt(dev)["prompt"].startswith("<s>system\nBe brief")
    tok.chat_template = tok.chat_template["default"]
    for bad, match in [([{"content": "x"}], r"^messages\[0\]: must be a dict with a 'role'"),
                       ([{"role": "user", "content": [{"type": "image_url"}]}], r"^messages\[0\]\.content\[0\]"),
                       (going, "^continue_final_message: cannot be combined with add_generation_prompt")]:
        with pytest.raises(ValueError, match=match):
            llm.chat(bad, sp, continue_final_message=bad is going)
    for clash in ("tools", "conversation", "tokenize"):  # (apply_chat_template's own arguments)
        with pytest.raises(ValueError, match=f"^chat_template_kwargs: '{clash}' is a request field"):
            llm.chat(parts, sp, chat_template_kwargs={clash: []})


def test_offline_inputs_as_vllm_takes_them(llm):
    """numpy ids and numbers are taken (a numpy prompt was refused as "outside the vocabulary",
    numpy settings as invalid); a dict for sampling_params is a TypeError that says so; logprobs
    carry decoded_token offline, as in vLLM."""
    import numpy as np

    sp = SamplingParams(temperature=np.float32(0.0), max_tokens=np.int64(4), top_k=np.int32(5), logprobs=np.int64(1),
                        prompt_logprobs=1, stop_token_ids=[np.int64(3)], ignore_eos=True)
    assert type(sp.max_tokens) is int and type(sp.temperature) is float and sp.stop_token_ids == [3]
    assert SamplingParams(seed=-1).seed is None  # (vLLM's: -1 is "random", what UIs send)
    want = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(temperature=0, max_tokens=4, top_k=5,
                                                                       stop_token_ids=[3], ignore_eos=True))
    out = llm.generate({"prompt_token_ids": np.array([5, 6, 7])}, sp)[0]
    assert out.outputs[0].token_ids == want[0].outputs[0].token_ids
    tok = llm.get_tokenizer()
    for pos in [*out.outputs[0].logprobs, *out.prompt_logprobs[1:]]:
        assert all(lp.decoded_token is not None for lp in pos.values())
    t = out.outputs[0].token_ids[0]
    assert out.outputs[0].logprobs[0][t].decoded_token == tok.decode([t])
    with pytest.raises(TypeError, match="sampling_params: a SamplingParams or a list of them, got dict"):
        llm.generate(["a", "b"], {"temperature": 0, "max_tokens": 2})
    with pytest.raises(ValueError, match="not token ids"):
        llm.generate({"prompt_token_ids": [5, True]})


def test_the_models_generation_config_gives_the_default_sampling(tmp_path):
    """As vLLM's --generation-config auto: settings in generation_config.json are the defaults of a
    call without sampling_params (offline) or a request that leaves them out; "vllm" ignores them."""
    import json
    import os

    path = make_model(str(tmp_path / "m"), "llama")
    with open(os.path.join(path, "generation_config.json")) as f:
        gen = json.load(f)
    gen.update(top_k=1, temperature=0.7, max_new_tokens=5, do_sample=True)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump(gen, f)
    llm = LLM(path, kv_cache_memory_bytes=8 * 2**20)
    d = llm.get_default_sampling_params()
    assert (d.top_k, d.temperature, d.max_tokens, d.top_p) == (1, 0.7, 5, 1.0)
    greedy = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(temperature=0, max_tokens=5,
                                                                           ignore_eos=True))[0].outputs[0]
    out = llm.generate({"prompt_token_ids": [5, 6, 7]})[0].outputs[0]  # top_k 1: greedy, 5 tokens
    assert out.token_ids == greedy.token_ids[: len(out.token_ids)] and len(out.token_ids) <= 5
    # A default max_tokens is an upper bound, as the room a prompt leaves; a default penalty stays out
    # of beam search, which refuses penalties (as vLLM: beams take temperature and max_tokens alone).
    gen.update(max_new_tokens=100, repetition_penalty=1.2)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump(gen, f)
    short = LLM(path, kv_cache_memory_bytes=8 * 2**20, max_model_len=64)
    assert len(short.generate({"prompt_token_ids": list(range(5, 45))})[0].outputs[0].token_ids) <= 24
    beams = short.generate({"prompt_token_ids": [5, 6, 7]}, test_time_compute={"strategy": "beam_search", "n": 2})
    assert beams[0].outputs[0].token_ids
    plain = LLM(path, kv_cache_memory_bytes=8 * 2**20, generation_config="vllm")
    assert plain.get_default_sampling_params() == SamplingParams()
    with pytest.raises(ValueError, match="^generation_config: 'auto'"):
        LLM(path, generation_config=str(tmp_path / "nowhere"))
    gen["top_p"] = 7
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump(gen, f)
    with pytest.raises(ValueError, match="^generation_config: .*top_p"):
        LLM(path, kv_cache_memory_bytes=8 * 2**20)


def test_vllm_llm_settings_and_text_prompt_dicts(tmp_path, llm):
    """vLLM's {"prompt": text} dict and LLM(enforce_eager=..., trust_remote_code=...,
    tensor_parallel_size=1) are taken as code moving over passes them."""
    sp = SamplingParams(temperature=0, max_tokens=4)
    want = llm.generate("Hello world", sp)[0].outputs[0].token_ids
    assert llm.generate({"prompt": "Hello world", "cache_salt": "a"}, sp)[0].outputs[0].token_ids == want
    with pytest.raises(ValueError, match="^prompt: a dict prompt needs"):
        llm.generate({"prompt": 5}, sp)
    eager = LLM(llm.config.model, enforce_eager=True, trust_remote_code=True, tensor_parallel_size=1,
                kv_cache_memory_bytes=8 * 2**20)
    assert eager.config.cuda_graphs == "off"
    with pytest.raises(ValueError, match="^tensor_parallel_size"):
        LLM(llm.config.model, tensor_parallel_size=2)


def test_model_defaults_stay_defaults_only_while_unchanged(tmp_path):
    """A field the model's defaults filled in counts as the model's only while it holds that value
    (vLLM's pattern: get_default_sampling_params(), then set fields): a penalty the caller sets is
    refused with beam search, a max_tokens the caller sets is not a cap; beam search sized by the
    room a default cap leaves (it was refused for the whole default)."""
    import dataclasses
    import json
    import os

    path = make_model(str(tmp_path / "m"), "llama")
    with open(os.path.join(path, "generation_config.json")) as f:
        gen = json.load(f)
    gen.update(max_new_tokens=1000, repetition_penalty=1.2)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump(gen, f)
    llm = LLM(path, kv_cache_memory_bytes=1 * 2**20, max_model_len=64)
    sp = llm.get_default_sampling_params()
    sp.use_beam_search, sp.n = True, 4
    assert llm.generate({"prompt_token_ids": [5, 6, 7]}, sp)[0].outputs[0].token_ids  # room: 61 tokens
    with pytest.raises(ValueError, match="^repetition_penalty: not supported with use_beam_search"):
        llm.generate({"prompt_token_ids": [5, 6, 7]}, dataclasses.replace(sp, repetition_penalty=1.5))
    mine = llm.get_default_sampling_params()
    mine.max_tokens = 100
    with pytest.raises(ValueError, match="^max_tokens: prompt"):
        llm.generate({"prompt_token_ids": [5, 6, 7]}, mine)


def test_vllm_offline_code_moves_over(llm):
    """vLLM offline code as written for vLLM: its other SamplingParams fields, lora_request=None,
    TokensPrompt, LLM.chat's chat_template, LLM.beam_search with BeamSearchParams,
    reset_prefix_cache and LLM() settings that change nothing here (each was a TypeError or an
    AttributeError)."""
    from tokenmill import BeamSearchParams, TokensPrompt
    from tokenmill.sampling_params import RequestOutputKind

    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    want = llm.generate({"prompt_token_ids": [5, 6, 7]}, sp)[0].outputs[0]
    vllm_sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, spaces_between_special_tokens=False,
                             output_kind=RequestOutputKind.FINAL_ONLY, extra_args={"plugin": 1})
    (out,) = llm.generate(TokensPrompt(prompt_token_ids=[5, 6, 7]), vllm_sp, lora_request=None)
    assert out.outputs[0].token_ids == want.token_ids and out.outputs[0].text == want.text
    # detokenize=False: token ids only, as vLLM's (and stop strings need the text)
    bare = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, detokenize=False))
    assert bare[0].outputs[0].token_ids == want.token_ids and bare[0].outputs[0].text == ""
    with pytest.raises(ValueError, match="^stop: stop strings need the text"):
        llm.generate("Hi", SamplingParams(stop=["x"], detokenize=False))
    with pytest.raises(ValueError, match="^lora_request"):
        llm.generate("Hi", sp, lora_request=object())
    mine = vllm_sp.clone()
    mine.extra_args["plugin"] = 2
    assert vllm_sp.extra_args == {"plugin": 1}
    from tokenmill.sampling_params import StructuredOutputsParams

    so = StructuredOutputsParams(choice=["yes", "no"], disable_any_whitespace=True)
    assert llm.generate("Hi", SamplingParams(max_tokens=4, structured_outputs=so))[0].outputs[0].text in ("yes", "no")

    msgs = [{"role": "user", "content": "hi"}]
    chat = llm.chat(msgs, sp, False, None, "{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert chat[0].prompt == "[hi]"
    assert llm.chat(msgs, sp, chat_template_content_format="string")[0].prompt.startswith("<s>user\nhi")

    params = BeamSearchParams(beam_width=2, max_tokens=5, ignore_eos=True)
    (beams,) = llm.beam_search([{"prompt_token_ids": [5, 6, 7]}], params)
    ref = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(
        n=2, use_beam_search=True, max_tokens=5, ignore_eos=True, early_stopping="never", logprobs=4))[0]
    assert [s.tokens for s in beams.sequences] == [[5, 6, 7] + c.token_ids for c in ref.outputs]
    tok = llm.get_tokenizer()
    best = beams.sequences[0]
    assert best.text == tok.decode(best.tokens) and best.cum_logprob == ref.outputs[0].cumulative_logprob
    assert len(best.logprobs) == 5 and best.finish_reason == "length"
    assert llm.reset_prefix_cache() is True

    eager = LLM(llm.config.model, kv_cache_memory_bytes=8 * 2**20, disable_log_stats=True, swap_space=4,
                tokenizer_mode="auto", kv_cache_dtype="auto", enable_chunked_prefill=True, max_logprobs=20,
                pipeline_parallel_size=1, distributed_executor_backend="mp", revision=None, download_dir=None,
                seed=None)
    assert eager.generate({"prompt_token_ids": [5, 6, 7]}, sp)[0].outputs[0].token_ids == want.token_ids
    with pytest.raises(ValueError, match="^kv_cache_dtype: only 'auto'"):
        LLM(llm.config.model, kv_cache_dtype="fp8")


def test_beam_search_leaves_the_eos_out_unless_asked(tmp_path):
    """vLLM's LLM.beam_search: a beam that stopped at EOS has it as stop_reason, and in its tokens
    and text only with include_stop_str_in_output."""
    import json
    import shutil

    from tokenmill import BeamSearchParams

    src = make_model(str(tmp_path / "m"), "llama")
    first = LLM(src, kv_cache_memory_bytes=4 * 2**20).generate({"prompt_token_ids": [5, 6, 7]},
                                                               SamplingParams(max_tokens=1, temperature=0))
    eos = first[0].outputs[0].token_ids[0]  # (the greedy first token: made the EOS, beams end at once)
    path = str(tmp_path / "eos")
    shutil.copytree(src, path)
    with open(f"{path}/config.json") as f:
        cfg = json.load(f)
    cfg["eos_token_id"] = eos
    with open(f"{path}/config.json", "w") as f:
        json.dump(cfg, f)
    llm = LLM(path, kv_cache_memory_bytes=4 * 2**20)
    for keep in (False, True):
        out = llm.beam_search([{"prompt_token_ids": [5, 6, 7]}], BeamSearchParams(
            beam_width=2, max_tokens=4, length_penalty=0.0, include_stop_str_in_output=keep))[0].sequences
        ended = [s for s in out if s.finish_reason == "stop"]
        assert ended and all(s.stop_reason == eos for s in ended)
        assert all((s.tokens[-1] == eos) == keep for s in ended)


def test_detokenize_false_refuses_what_needs_the_text():
    for kw in ({"max_reasoning_tokens": 4}, {"stop": ["x"]}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            SamplingParams(detokenize=False, **kw).validate()
    with pytest.raises(ValueError, match="detokenize: must be true or false"):
        SamplingParams(detokenize="no").validate()
