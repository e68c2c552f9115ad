"""Prefill/decode disaggregation: KV moved between engines, servers and through the fleet router.

Engine level: a prefill engine holds a prompt's KV, exports it, a decode engine imports it into its
prefix cache, and its outputs (greedy and seeded, with logprobs) equal a cold engine's; payloads
from another model, of another shape, with NaN or garbage are refused and change nothing; holds
expire, are capped and go with a parked model; a full cache takes a prefix of the payload.
Server and router level, with real processes and the openai client: a router with a prefill
worker gives the same answers as a cold replica while the decode replica computes only the last
block; `auto` prefills locally on an idle replica and remotely on a busy one; a decode replica
that refuses the import falls back to a local prefill; the routes' errors are clear.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
import uuid

import httpx
import openai
import pytest
import torch

from tests.models import make_model
from tests.server_utils import ROOT, ServerProcess
from tests.test_fleet import router_metrics, wait_fleet
from tokenmill import LLM, SamplingParams
from tokenmill.config import ModelConfig
from tokenmill.engine import kv_transfer
from tokenmill.router.cli import check_replica_url
from tokenmill.router.disagg import DisaggConfig, decide, prefill_body, prefill_path
from tokenmill.router.policy import Candidate

BLOCK = 16


def _kv_bytes(path: str, blocks: int) -> int:
    mc = ModelConfig.from_pretrained(path)
    return blocks * 2 * mc.num_layers * BLOCK * mc.num_kv_heads * mc.head_dim * 4


def _llm(path: str, blocks: int = 64, **kw) -> LLM:
    return LLM(path, kv_cache_memory_bytes=_kv_bytes(path, blocks), max_model_len=256, block_size=BLOCK, seed=0,
               **kw)


def _prefill(llm: LLM, prompt: list[int], tid: str = "t", salt: str | None = None, hold: float = 30.0) -> None:
    p = {"prompt_token_ids": prompt, "kv_hold": (tid, hold)}
    if salt is not None:
        p["cache_salt"] = salt
    llm.engine.add_request(p, SamplingParams(max_tokens=1), request_id=f"prefill-{tid}")
    while llm.engine.has_unfinished_requests():
        llm.engine.step()


def _roundtrip(payload: kv_transfer.KVPayload) -> kv_transfer.KVPayload:
    return kv_transfer.decode(kv_transfer.encode(payload))


def _moved(prefill: LLM, decode: LLM, tid: str, prompt) -> None:
    """prompt prefilled on prefill and its KV moved into decode, held there as h<tid>."""
    _prefill(prefill, list(prompt), tid=tid)
    decode.engine.import_kv(_roundtrip(prefill.engine.export_kv(tid)), hold=(f"h{tid}", 30.0))


def _same(got, want, where: str) -> None:
    assert got.token_ids == want.token_ids, where
    for pos, (a, b) in enumerate(zip(got.logprobs, want.logprobs)):
        assert a.keys() == b.keys(), f"{where}: top tokens at {pos}"
        for t in a:
            assert a[t].logprob == pytest.approx(b[t].logprob, abs=1e-5), f"{where}: logprob at {pos}"


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def arch_dir(request, tmp_path_factory):
    extra = {"sliding_window": 40} if request.param == "mistral" else {}
    return make_model(str(tmp_path_factory.mktemp(f"kvt-{request.param}")), request.param, seed=3, tokenizer=False,
                      max_position_embeddings=256, **extra)


def test_moved_kv_gives_the_cold_engines_outputs(arch_dir):
    prefill, decode, cold = _llm(arch_dir), _llm(arch_dir), _llm(arch_dir, enable_prefix_caching=False)
    rng = random.Random(5)
    shared = [rng.randrange(3, 500) for _ in range(40)]
    for i, n in enumerate((100, 37, 16, 150)):
        prompt = shared + [rng.randrange(3, 500) for _ in range(n)]
        _prefill(prefill, prompt, tid=f"t{i}")
        assert f"t{i}" in prefill.engine.kv_holds
        payload = _roundtrip(prefill.engine.export_kv(f"t{i}"))
        assert f"t{i}" not in prefill.engine.kv_holds and payload.num_blocks == len(prompt) // BLOCK
        got = decode.engine.import_kv(payload)
        # (the shared 40 tokens, 2 blocks, were imported with the first prompt)
        assert got["imported"] + got["present"] == payload.num_blocks and (i == 0 or got["present"] >= 2)
        for sp in (SamplingParams(max_tokens=12, temperature=0, logprobs=3, ignore_eos=True),
                   SamplingParams(max_tokens=12, temperature=0.9, top_k=40, seed=11 + i, logprobs=3)):
            out = decode.generate({"prompt_token_ids": prompt}, sp)[0]
            ref = cold.generate({"prompt_token_ids": prompt}, sp)[0]
            _same(out.outputs[0], ref.outputs[0], f"prompt {i}")
            assert out.num_cached_tokens == (len(prompt) - 1) // BLOCK * BLOCK  # all but the last block's part
    for llm in (prefill, decode):
        bm = llm.engine.block_manager
        bm.check_invariants([])
        assert bm.num_free_blocks == bm.num_blocks  # nothing held, nothing leaked


def test_skip_blocks_sends_only_what_the_decoder_lacks(model_dir):
    prefill, decode = _llm(model_dir), _llm(model_dir)
    prompt = list(range(10, 110))  # 6 full blocks
    decode.generate({"prompt_token_ids": prompt[:50]}, SamplingParams(max_tokens=1))  # caches 3 blocks
    _prefill(prefill, prompt)
    payload = prefill.engine.export_kv("t", skip_blocks=3)
    assert payload.num_blocks == 3 and len(payload.prefix_keys) == 3
    got = decode.engine.import_kv(_roundtrip(payload))
    assert got == {"blocks": 3, "imported": 3, "present": 0, "reachable_blocks": 6}
    out = decode.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=1))[0]
    assert out.num_cached_tokens == 96


def test_an_import_never_evicts_the_prefix_it_continues(model_dir):
    # A cache full of cached blocks whose least recently used are the prefix the payload continues:
    # the payload's fresh blocks must evict other blocks, never those.
    prefill, decode = _llm(model_dir), _llm(model_dir, blocks=16)
    prompt = list(range(10, 90))  # 5 full blocks
    bm = decode.engine.block_manager

    def fill() -> None:
        decode.engine.reset_prefix_cache()
        decode.generate({"prompt_token_ids": prompt[:32]}, SamplingParams(max_tokens=1))  # blocks 0-1, oldest
        for k in range(2):  # 14 more, every block cached
            decode.generate({"prompt_token_ids": [300 + k] * 112}, SamplingParams(max_tokens=1))
        assert bm.num_free_blocks == 16 and not bm._free

    for skip in (0, 2):  # the prefix in the payload (present), or only its keys (skip_blocks)
        fill()
        _prefill(prefill, prompt)
        payload = _roundtrip(prefill.engine.export_kv("t", skip_blocks=skip))
        got = decode.engine.import_kv(payload)
        assert got["reachable_blocks"] == 5 and got["imported"] == 3, got
        bm.check_invariants([])
        out = decode.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=1))[0]
        assert out.num_cached_tokens == 64


def test_bad_payloads_are_refused_and_change_nothing(model_dir, tmp_path):
    prefill, decode = _llm(model_dir), _llm(model_dir)
    prompt = list(range(10, 90))
    _prefill(prefill, prompt)
    good = prefill.engine.export_kv("t")
    other = make_model(str(tmp_path / "other"), "llama", seed=9)  # same shapes, other weights
    _prefill(stranger := _llm(other), prompt)
    foreign = stranger.engine.export_kv("t")
    assert foreign.kv.shape == good.kv.shape and foreign.fingerprint != good.fingerprint
    nan = kv_transfer.KVPayload(good.keys, good.kv.clone(), None, good.fingerprint, BLOCK)
    nan.kv[0, 0, 1, 3, 0, 0] = float("nan")
    short = kv_transfer.KVPayload(good.keys, good.kv[:, :, :, :8].contiguous(), None, good.fingerprint, BLOCK)
    cases = {"another model": foreign, "NaN": nan, "a shape": short,
             "a block size": kv_transfer.KVPayload(good.keys, good.kv, None, good.fingerprint, 32),
             "a draft model's KV": kv_transfer.KVPayload(good.keys, good.kv, good.kv.clone(), good.fingerprint,
                                                          BLOCK)}
    bm = decode.engine.block_manager
    for what, payload in cases.items():
        with pytest.raises(kv_transfer.KVTransferError):
            decode.engine.import_kv(_roundtrip(payload))
        assert bm.num_free_blocks == bm.num_blocks and bm.num_cached_free_blocks == 0, what
    data = kv_transfer.encode(good)
    for bad in (b"", b"garbage", data[:100], data[:-7], b"\xff" * 8 + data[8:]):
        with pytest.raises(kv_transfer.KVTransferError):
            kv_transfer.decode(bad)
    bm.check_invariants([])
    # Keys name a prompt and its salt: KV moved under one salt is not found under another.
    _prefill(prefill, prompt, tid="salted", salt="tenant-a")
    decode.engine.import_kv(_roundtrip(prefill.engine.export_kv("salted")))
    out = decode.generate({"prompt_token_ids": prompt, "cache_salt": "tenant-b"}, SamplingParams(max_tokens=1))[0]
    assert out.num_cached_tokens == 0


def test_an_import_is_held_for_its_request(model_dir):
    prefill, decode = _llm(model_dir), _llm(model_dir, blocks=16)
    prompt = list(range(10, 90))  # 5 full blocks
    _prefill(prefill, prompt)
    engine, bm = decode.engine, decode.engine.block_manager
    got = engine.import_kv(_roundtrip(prefill.engine.export_kv("t")), hold=("h", 30.0))
    assert got["reachable_blocks"] == 5 and bm.num_used_blocks == 5  # held: no allocation evicts them
    for k in range(3):  # other prompts that fill the rest of the cache
        decode.generate({"prompt_token_ids": [400 + k] * 48}, SamplingParams(max_tokens=1))
    engine.add_request({"prompt_token_ids": prompt, "kv_release": "h"}, SamplingParams(max_tokens=1),
                       request_id="released")
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert [o.num_cached_tokens for o in outs if o.request_id == "released" and o.finished] == [64]
    assert "h" not in engine.kv_holds and bm.num_used_blocks == 0  # let go as its request ended
    bm.check_invariants([])
    _prefill(prefill, prompt)
    engine.import_kv(_roundtrip(prefill.engine.export_kv("t")), hold=("h2", 30.0))
    assert engine.expire_kv_holds(time.monotonic() + 31) == 1 and bm.num_used_blocks == 0  # or as it expires


def _admitted_at_once(engine, prompt: list[int], rid: str) -> None:
    engine.add_request({"prompt_token_ids": prompt}, SamplingParams(max_tokens=1), request_id=rid)
    for _ in range(6):
        if not engine.has_unfinished_requests():
            break
        engine.step()
    assert not engine.has_unfinished_requests(), "the prompt waited for the holds"


def test_holds_give_way_to_requests_that_need_their_blocks(model_dir):
    """A hold is KV kept in case: a prompt that needs its blocks is admitted at once (not after the
    holds expire; they may be holds of the requests queued behind it), and a running sequence that
    grows into them takes them before anything is preempted. The oldest hold goes first."""
    prefill, decode = _llm(model_dir), _llm(model_dir, blocks=16)
    engine, bm = decode.engine, decode.engine.block_manager
    first, second = list(range(10, 90)), list(range(90, 138))  # 5 and 3 full blocks
    for tid, prompt in (("a", first), ("b", second)):
        _moved(prefill, decode, tid, prompt)
    assert list(engine.kv_holds) == ["ha", "hb"] and bm.num_free_blocks == 8
    _admitted_at_once(engine, list(range(200, 392)), "long")  # 12 full blocks and one for its token: 13 > 8 free
    assert list(engine.kv_holds) == ["hb"] and engine.kv_holds_reclaimed == 1  # (the oldest, enough)
    bm.check_invariants([engine.kv_holds["hb"][0]])
    _moved(prefill, decode, "a", first)
    assert bm.num_free_blocks == 8
    engine.add_request({"prompt_token_ids": list(range(400, 448))},  # 3 blocks, growing to 9
                       SamplingParams(max_tokens=90, ignore_eos=True), request_id="grows")
    for _ in range(120):
        if not engine.has_unfinished_requests():
            break
        engine.step()
    # (the older hold b went; a's was not needed)
    assert engine.scheduler.num_preemptions == 0 and list(engine.kv_holds) == ["ha"] and engine.kv_holds_reclaimed == 2
    bm.check_invariants([engine.kv_holds["ha"][0]])
    # Holds go only when that makes room: a prompt that would not fit even without them keeps them all.
    _moved(prefill, decode, "b", second)
    engine.add_request({"prompt_token_ids": list(range(440, 504))}, SamplingParams(max_tokens=100, ignore_eos=True),
                       request_id="runs")  # 5 blocks in use: 3 free, 8 held
    engine.step()
    engine.add_request({"prompt_token_ids": list(range(200, 392))}, SamplingParams(max_tokens=1),
                       request_id="waits")  # 13 blocks
    engine.step()
    assert list(engine.kv_holds) == ["ha", "hb"] and engine.kv_holds_reclaimed == 2
    engine.abort_request("runs")  # now it fits with one of them gone
    engine.step()
    assert list(engine.kv_holds) == ["hb"] and engine.kv_holds_reclaimed == 3
    while engine.has_unfinished_requests():
        engine.step()
    # One prompt imported twice: neither hold alone frees a block, both together free five.
    engine.release_kv_hold("hb")
    for tid in ("a", "a2"):
        _moved(prefill, decode, tid, first)
    _moved(prefill, decode, "b", second)  # (the newest)
    assert list(engine.kv_holds) == ["ha", "ha2", "hb"] and bm.num_free_blocks == 8
    _admitted_at_once(engine, list(range(20, 196)), "twice")  # 11 full blocks and one for its token: 12 > 8 free
    assert list(engine.kv_holds) == ["hb"] and engine.kv_holds_reclaimed == 5  # (hb was not needed)
    bm.check_invariants([engine.kv_holds["hb"][0]])
    # A prefill's own hold is spared for a moment: the router is about to take it.
    _prefill(decode, first, tid="mine")
    decode.engine.add_request({"prompt_token_ids": list(range(300, 492))}, SamplingParams(max_tokens=1),
                              request_id="next")
    decode.engine.step()
    assert "mine" in engine.kv_holds
    engine._export_holds["mine"] = 0.0  # (its grace over)
    decode.engine.step()
    assert "mine" not in engine.kv_holds


def test_the_fingerprint_tells_checkpoints_apart(model_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    def fp(folder: str, **kw) -> str:
        return kv_transfer.fingerprint(folder, torch.float32, None, BLOCK, **kw)

    same = shutil.copytree(model_dir, tmp_path / "same")
    assert fp(str(same)) == fp(model_dir)  # (contents, not paths)
    tweaked = shutil.copytree(model_dir, tmp_path / "tweaked")
    (weights,) = [p for p in os.listdir(tweaked) if p.endswith(".safetensors")]
    tensors = load_file(str(tweaked / weights))
    name = next(k for k in sorted(tensors) if "post_attention_layernorm" in k)  # one small tensor of many
    tensors[name] = tensors[name] * 1.01
    save_file(tensors, str(tweaked / weights), metadata={"format": "pt"})
    assert fp(str(tweaked)) != fp(model_dir)
    assert fp(model_dir, load_format="dummy", seed="0/cpu") != fp(model_dir)
    assert fp(model_dir, load_format="dummy", seed="0/cpu") != fp(model_dir, load_format="dummy", seed="0/cuda")
    assert fp(model_dir) != kv_transfer.fingerprint(model_dir, torch.bfloat16, None, BLOCK)
    assert fp(model_dir) != kv_transfer.fingerprint(model_dir, torch.float32, "int8", BLOCK)


def test_holds_expire_are_capped_and_go_with_parking(model_dir):
    llm = _llm(model_dir, blocks=24)
    engine, bm = llm.engine, llm.engine.block_manager
    _prefill(llm, list(range(10, 60)), tid="a")  # 4 blocks
    assert bm.num_used_blocks == 4
    assert engine.expire_kv_holds(time.monotonic() + 31) == 1 and bm.num_used_blocks == 0
    assert engine.export_kv("a") is None
    for i in range(4):  # 4 blocks each: holds beyond half the cache (12 blocks) let the oldest go
        _prefill(llm, [100 + i] * 60, tid=f"h{i}")
    assert list(engine.kv_holds) == ["h1", "h2", "h3"] and bm.num_used_blocks == 12
    stats = engine.stats()
    assert (stats["kv_holds"], stats["kv_held_blocks"], stats["kv_holds_expired"], stats["kv_holds_capped"],
            stats["kv_holds_reclaimed"]) == (3, 12, 1, 1, 0)
    engine.add_request({"prompt_token_ids": list(range(5, 40)), "kv_hold": ("x", 30.0)}, SamplingParams(max_tokens=50),
                       request_id="aborted")
    engine.step()
    engine.abort_request("aborted")  # an aborted prefill holds nothing
    assert "x" not in engine.kv_holds
    engine.park()
    assert not engine.kv_holds
    engine.unpark()
    assert bm.num_used_blocks == 0
    bm.check_invariants([])
    with pytest.raises(ValueError, match="kv_hold"):
        engine.add_request({"prompt_token_ids": [5, 6], "kv_hold": ("y", 0)}, SamplingParams(max_tokens=1))


def test_the_hold_cap_counts_blocks(model_dir):
    """Holds take at most half the cache counted in blocks: a hold whose blocks a newer one pins too
    frees nothing by going, so it stays; the oldest hold that pins blocks of its own goes."""
    prefill, decode = _llm(model_dir), _llm(model_dir, blocks=24)  # (a cap of 12 blocks)
    engine = decode.engine
    for tid, prompt in (("x", range(10, 75)), ("y", range(100, 165)), ("w", range(200, 265)),
                        ("z", range(10, 91))):  # 4, 4, 4 and 5 full blocks, z's first 4 x's
        _moved(prefill, decode, tid, prompt)
    assert list(engine.kv_holds) == ["hx", "hw", "hz"] and engine.block_manager.num_used_blocks == 9
    engine.block_manager.check_invariants([h for h, _ in engine.kv_holds.values()])
    for tid in list(engine.kv_holds):
        engine.release_kv_hold(tid)
    assert not engine._held_blocks and engine.block_manager.num_used_blocks == 0
    # One prompt held twice pins its blocks once, but neither hold alone frees them: over the cap, both go.
    for tid, prompt in (("a", range(10, 139)), ("b", range(10, 139)), ("c", range(300, 429))):  # 8 blocks each
        _moved(prefill, decode, tid, prompt)
    assert list(engine.kv_holds) == ["hc"] and engine.block_manager.num_used_blocks == 8
    # ...but never one the new hold pins whole (a's blocks are the new t's first four).
    decode = _llm(model_dir, blocks=32)  # (a cap of 16)
    engine = decode.engine
    for tid, prompt in (("a", range(10, 75)), ("x1", range(100, 261)), ("x2", range(100, 261)),
                        ("t", range(10, 139))):  # 4, 10, 10 and 8 blocks: 18 > 16
        _moved(prefill, decode, tid, prompt)
    assert list(engine.kv_holds) == ["ha", "ht"] and engine.block_manager.num_used_blocks == 8


def test_a_full_cache_takes_a_prefix_of_the_payload(model_dir):
    prefill, decode = _llm(model_dir), _llm(model_dir, blocks=16)
    prompt = list(range(10, 200))  # 11 full blocks
    _prefill(prefill, prompt)
    payload = _roundtrip(prefill.engine.export_kv("t"))
    engine = decode.engine
    engine.add_request({"prompt_token_ids": list(range(300, 400))}, SamplingParams(max_tokens=100, ignore_eos=True),
                       request_id="busy")
    engine.step()  # 100 tokens: 7 blocks in use
    free = engine.block_manager.num_free_blocks
    assert free < 11
    got = engine.import_kv(payload)
    assert got == {"blocks": 11, "imported": free, "present": 0, "reachable_blocks": free}
    engine.abort_request("busy")
    out = decode.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=1))[0]
    assert out.num_cached_tokens == free * BLOCK
    engine.block_manager.check_invariants([])


def test_decide_and_prefill_body():
    cfg = DisaggConfig(min_tokens=100, max_queue_tokens=1000)
    busy = Candidate("d", running=3)
    workers = [Candidate("p0", queued_prefill=500), Candidate("p1", queued_prefill=100, cached_tokens=0),
               Candidate("p2", queued_prefill=0, cached_tokens=300)]
    assert decide(cfg, 400, busy, workers) == (2, "remote")  # the least work for this prompt (prefix-aware)
    assert decide(cfg, 400, Candidate("d", cached_tokens=350, running=3), workers) == (None, "short")
    assert decide(cfg, 400, Candidate("d"), workers) == (None, "idle")
    assert decide(DisaggConfig(policy="always", min_tokens=100), 400, Candidate("d"), workers)[1] == "remote"
    assert decide(cfg, 400, busy, [Candidate("p", queued_prefill=5000)]) == (None, "prefill_busy")
    assert decide(cfg, 400, busy, []) == (None, "no_prefill_worker")
    assert decide(DisaggConfig(policy="never"), 400, busy, workers) == (None, "never")
    assert prefill_body("chat", {"messages": [], "tools": [{"type": "file_search", "vector_store_ids": ["v"]}]}) \
        is None  # (the decode replica searches its own store)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True, "n": 2, "max_tokens": 50,
            "min_tokens": 5, "response_format": {"type": "json_object"}, "tools": [{"type": "function"}],
            "cache_salt": "s"}
    pb = prefill_body("chat", body)
    assert pb == {"model": "m", "messages": body["messages"], "tools": body["tools"], "cache_salt": "s",
                  "max_tokens": 1, "stream": False, "kv_transfer_params": {"do_remote_decode": True}}
    for endpoint, b in (("completions", {"prompt": ["a", "b"]}), ("completions", {"prompt": "a", "echo": True,
                        "logprobs": 1}), ("chat", {"messages": [], "resume_token_ids": [1]}),
                        ("responses", {"input": "x"}), ("chat", {"messages": [], "prompt_logprobs": 1})):
        assert prefill_body(endpoint, b) is None, b
    assert prefill_body("completions", {"prompt": [1, 2, 3]})["max_tokens"] == 1
    # A Responses request: a completion of its rendered prompt's ids, unless it continues or searches.
    resp = {"model": "m", "input": "x", "instructions": "y", "max_output_tokens": 9, "stream": True, "cache_salt": "s",
            "priority": 2, "text": {"format": {"type": "json_object"}}, "tools": [{"type": "function", "name": "f"}]}
    assert prefill_body("responses", resp, [5, 6, 7]) == {
        "model": "m", "cache_salt": "s", "priority": 2, "prompt": [5, 6, 7], "max_tokens": 1, "stream": False,
        "kv_transfer_params": {"do_remote_decode": True}}
    assert prefill_path("responses") == prefill_path("ollama") == "/v1/completions" and prefill_path("chat") is None
    # An Ollama request is read as the OpenAI request a replica runs it as; a load request or one it
    # refuses stays Ollama's (not hashed: the replica answers it).
    from tokenmill.router.router import _ollama_as_openai

    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}], "options": {"temperature": 0, "foo": 1}}
    assert _ollama_as_openai("/api/chat", chat) == ("chat", {"model": "m", "temperature": 0, "messages": [
        {"role": "user", "content": "x"}]})
    assert _ollama_as_openai("/api/generate", {"model": "m", "prompt": "x", "raw": True})[0] == "completions"
    for path, b in (("/api/chat", {"model": "m", "messages": []}), ("/api/chat", {"model": "m", "messages": "x"}),
                    ("/api/generate", {"model": "m", "prompt": "x", "top_logprobs": 50}), ("/api/embed", chat)):
        assert _ollama_as_openai(path, b) == ("ollama", b)
    for b in ({**resp, "previous_response_id": "resp_1"}, {**resp, "truncation": "auto"},
              {**resp, "tools": [{"type": "file_search", "vector_store_ids": ["v"]}]}):
        assert prefill_body("responses", b, [5, 6, 7]) is None, b
    check_replica_url("http://[::1]:8001/", "--prefill")
    for url in ("http://h:1/x?", "http://h:1#", "http://u:p@h:1", "h:1", "http://h:1/a,b", "http://h:1/a b",
                "http://h:1[::1]:80"):  # (a replica would
        # refuse to pull from these; a comma separates --kv-transfer-sources)
        with pytest.raises(ValueError, match="--prefill"):
            check_replica_url(url, "--prefill")


# -- servers and the router ------------------------------------------------------------------
KEY = "operator-key"
KV_KEY = "the-fleets-kv-key"
SERVE = ("--kv-cache-memory", "0.02", "--log-level", "warning", "--api-key", KEY)
KV = ("--kv-transfer", "--kv-transfer-key", KV_KEY)


@pytest.fixture(scope="module")
def fleet(model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("disagg")
    env = {"OMP_NUM_THREADS": "1"}
    procs: dict[str, ServerProcess] = {}
    try:
        procs["prefill"] = ServerProcess(model_dir, *SERVE, *KV, log_path=str(d / "prefill.log"), env=env)
        # (pulls from the prefill worker, named otherwise, and from an address where nothing listens only)
        sources = f"{procs['prefill'].base_url.upper()}/,http://127.0.0.1:9"
        procs["decode"] = ServerProcess(model_dir, *SERVE, *KV, "--kv-transfer-sources", sources,
                                        log_path=str(d / "decode.log"), env=env)
        procs["plain"] = ServerProcess(model_dir, *SERVE, log_path=str(d / "plain.log"), env=env)
        for name, decoder, policy, mode in (("always", "decode", "always", "pull"), ("auto", "decode", "auto", "pull"),
                                            ("fallback", "plain", "always", "pull"),
                                            ("relay", "decode", "always", "relay")):
            procs[name] = ServerProcess(None, "--replica", procs[decoder].base_url, "--prefill",
                                        procs["prefill"].base_url, "--disagg-policy", policy, "--disagg-min-tokens",
                                        "32", "--replica-api-key", KEY, "--kv-transfer-key", KV_KEY,
                                        "--health-interval", "0.2", "--kv-transfer-mode", mode,
                                        log_path=str(d / f"router-{name}.log"), command="router")
            wait_fleet(procs[name], [procs[decoder].base_url, procs["prefill"].base_url])
        yield procs
    finally:
        for p in procs.values():
            p.stop()


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _remote(router: ServerProcess, where: str = "remote", reason: str = "remote") -> float:
    return router_metrics(router.base_url).get(
        f'tokenmill_router:prefill_decisions_total{{reason="{reason}",where="{where}"}}', 0.0)


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "omega", "kappa"]) for _ in range(words))


def test_disaggregated_answers_equal_a_cold_replicas(fleet):
    router, decode = fleet["always"], fleet["decode"]
    via, direct = _client(router.base_url), _client(decode.base_url)
    model = direct.models.list().data[0].id
    rng = random.Random(3)
    before = _remote(router)
    for i in range(4):
        prompt = _text(rng, 60 + 17 * i)
        cold_salt = uuid.uuid4().hex  # another salt: the decode replica computes the prompt cold
        kw = dict(model=model, max_tokens=12, logprobs=2)
        kw.update(temperature=0) if i % 2 == 0 else kw.update(temperature=0.9, seed=40 + i)
        got = via.completions.create(prompt=prompt, **kw)
        want = direct.completions.create(prompt=prompt, extra_body={"cache_salt": cold_salt}, **kw)
        assert got.choices[0].text == want.choices[0].text
        assert got.choices[0].logprobs.token_logprobs == pytest.approx(want.choices[0].logprobs.token_logprobs,
                                                                       abs=1e-5)
        n = got.usage.prompt_tokens
        assert got.usage.prompt_tokens_details.cached_tokens == (n - 1) // BLOCK * BLOCK
        assert want.usage.prompt_tokens_details.cached_tokens == 0
        messages = [{"role": "user", "content": prompt + " chat"}]
        stream = via.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0,
                                             stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0
        ref = direct.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0,
                                             extra_body={"cache_salt": cold_salt})
        assert text == ref.choices[0].message.content
        if i < 2:  # The Responses API: prefilled as its prompt's token ids, the whole prompt a cache hit.
            kwr: dict = dict(model=model, input="responses: " + prompt, max_output_tokens=8, temperature=0,
                             store=False, **({"instructions": "Be brief."} if i else {}))
            if i:
                events = list(via.responses.create(stream=True, **kwr))
                r = events[-1].response  # type: ignore[union-attr]
            else:
                r = via.responses.create(**kwr)
            n = r.usage.input_tokens
            assert r.usage.input_tokens_details.cached_tokens == (n - 1) // BLOCK * BLOCK, r.usage
            assert r.output_text == direct.responses.create(extra_body={"cache_salt": cold_salt}, **kwr).output_text
    # Ollama's routes: read as the OpenAI request they run as, prefilled as its prompt's token ids.
    auth = {"authorization": f"Bearer {KEY}"}
    for path, extra in (("/api/chat", {"messages": [{"role": "user", "content": "ollama: " + _text(rng, 70)}]}),
                        ("/api/generate", {"prompt": "generate: " + _text(rng, 70), "stream": True})):
        body = {"model": model, "options": {"temperature": 0, "num_predict": 8}, "stream": False, **extra}
        answers = []
        hits = decode.metric("tokenmill:prefix_cache_hits_total")
        for url in (router.base_url, fleet["plain"].base_url):  # (plain: never saw these prompts)
            r = httpx.post(url + path, json=body, headers=auth, timeout=120)
            assert r.status_code == 200, r.text
            parts = [json.loads(line) for line in r.text.splitlines() if line.strip()]
            answers.append("".join(p.get("response") or p.get("message", {}).get("content", "") for p in parts))
            if url == router.base_url:  # the whole prompt a hit on the replica: the router's render was its
                n = parts[-1]["prompt_eval_count"]
                assert decode.metric("tokenmill:prefix_cache_hits_total") - hits == (n - 1) // BLOCK * BLOCK, path
        assert answers[0] == answers[1] and answers[0], (path, answers)
    assert _remote(router) - before == 12
    assert not any("kv_transfer_failures" in k for k in router_metrics(router.base_url))
    m = router_metrics(router.base_url)
    assert m["tokenmill_router:kv_transfer_bytes_total"] > 0 and m["tokenmill_router:kv_transfer_blocks_total"] > 0
    # Every hold was taken: the prefill worker's cache has nothing in use; the decode replica's
    # import holds were let go as their requests ended.
    assert fleet["prefill"].metric("tokenmill:kv_cache_usage_perc") == 0
    assert fleet["decode"].metric("tokenmill:kv_cache_usage_perc") == 0


def test_auto_prefills_locally_when_idle_and_remotely_when_decoding(fleet):
    router = fleet["auto"]
    client = _client(router.base_url)
    model = client.models.list().data[0].id
    rng = random.Random(8)
    idle = _remote(router, "local", "idle")
    client.completions.create(model=model, prompt=_text(rng, 80), max_tokens=4)
    assert _remote(router, "local", "idle") == idle + 1
    # Busy: streams decoding on the replica, each past its first token (the router's own ledger counts
    # them as decoding until they end: 1000 tokens each, seconds of work, far longer than the checks).
    streams = [client.completions.create(model=model, prompt=f"keep decoding {k}", max_tokens=1000, temperature=0,
                                         stream=True, extra_body={"ignore_eos": True}) for k in range(4)]
    try:
        for st in streams:
            next(iter(st))
        remote, short = _remote(router), _remote(router, "local", "short")  # (the busy requests were short)
        client.completions.create(model=model, prompt="short", max_tokens=4)
        out = client.completions.create(model=model, prompt=_text(rng, 90), max_tokens=4)
        assert _remote(router) == remote + 1
        assert _remote(router, "local", "short") == short + 1
        assert out.usage.prompt_tokens_details.cached_tokens > 0
    finally:
        for st in streams:
            for _ in st:
                pass


def _same_as_cold(router: ServerProcess, replica: ServerProcess, seed: int, words: int):
    """A greedy completion through router, checked against replica computing the prompt cold."""
    client = _client(router.base_url)
    model = client.models.list().data[0].id
    prompt = _text(random.Random(seed), words)
    got = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
    want = _client(replica.base_url).completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0,
                                                        extra_body={"cache_salt": "cold"})
    assert got.choices[0].text == want.choices[0].text
    return got


def test_a_failed_transfer_falls_back_to_a_local_prefill(fleet):
    router = fleet["fallback"]
    _same_as_cold(router, fleet["plain"], 4, 70)
    m = router_metrics(router.base_url)
    assert m['tokenmill_router:kv_transfer_failures_total{stage="pull"}'] >= 1
    # The replica refused before it asked for the KV: the router released the worker's hold itself.
    assert fleet["prefill"].metric("tokenmill:kv_cache_usage_perc") == 0


def test_a_hung_prefill_worker_is_given_up_on_at_once(fleet, model_dir, tmp_path):
    """A prefill worker that stops answering (SIGSTOP: neither its prefill nor its health checks)
    is given up on when its checks find it hung, well before --disagg-timeout: the replica
    prefills locally and the answer is the cold one."""
    import signal

    # (the fleet's decode replica would refuse to pull from this worker, which is not among its
    # --kv-transfer-sources: no matter, the worker never gets past the prefill)
    worker = ServerProcess(model_dir, *SERVE, *KV, log_path=str(tmp_path / "worker.log"), env={"OMP_NUM_THREADS": "1"})
    router = None
    try:
        router = ServerProcess(None, "--replica", fleet["decode"].base_url, "--prefill", worker.base_url,
                               "--disagg-policy", "always", "--disagg-min-tokens", "32", "--replica-api-key", KEY,
                               "--kv-transfer-key", KV_KEY, "--health-interval", "0.2", "--health-timeout", "2",
                               log_path=str(tmp_path / "router.log"), command="router")
        wait_fleet(router, [fleet["decode"].base_url, worker.base_url])
        via = _client(router.base_url)
        model = _client(worker.base_url).models.list().data[0].id
        via.completions.create(model=model, prompt="warm", max_tokens=1)  # (the router's tokenizer loaded)
        prompt = _text(random.Random(11), 80)
        # Stopped just before the request: it goes there (the next check fails 2 s later), and hangs.
        worker.signal(signal.SIGSTOP)
        t0 = time.monotonic()
        got = via.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
        assert time.monotonic() - t0 < 30, "waited for --disagg-timeout (60 s)"
        want = _client(fleet["plain"].base_url).completions.create(model=model, prompt=prompt, max_tokens=8,
                                                                   temperature=0)
        assert got.choices[0].text == want.choices[0].text
        m = router_metrics(router.base_url)
        assert m.get('tokenmill_router:kv_transfer_failures_total{stage="prefill"}') == 1, m
    finally:
        worker.signal(signal.SIGCONT)
        if router is not None:
            router.stop()
        worker.stop()


def test_relay_mode_moves_the_kv_through_the_router(fleet):
    router = fleet["relay"]
    got = _same_as_cold(router, fleet["decode"], 5, 75)
    n = got.usage.prompt_tokens
    assert got.usage.prompt_tokens_details.cached_tokens == (n - 1) // BLOCK * BLOCK
    m = router_metrics(router.base_url)
    assert m["tokenmill_router:kv_transfer_bytes_total"] > 0 and _remote(router) == 1


def test_kv_transfer_routes_answer_clearly(fleet, model_dir, tmp_path):
    p, d, plain = fleet["prefill"].base_url, fleet["decode"].base_url, fleet["plain"].base_url
    auth = {"authorization": f"Bearer {KEY}"}  # a client's key: generation, never KV transfer
    kv = {"authorization": f"Bearer {KV_KEY}"}
    body = {"prompt": "one two three " * 20, "max_tokens": 1}
    prefill = {**body, "kv_transfer_params": {"do_remote_decode": True}}
    fleet_header = {**auth, "x-tokenmill-kv-transfer-key": KV_KEY}
    r = httpx.post(plain + "/v1/completions", json=prefill, headers=fleet_header)
    assert r.status_code == 400 and "--kv-transfer" in r.json()["error"]["message"]
    r = httpx.get(plain + "/v1/kv_transfer/x", headers=kv)
    assert r.status_code == 404 and r.json()["error"]["code"] == "kv_transfer_disabled"
    # A client cannot make holds, not even with the server's API key, nor through the router.
    r = httpx.post(p + "/v1/completions", json=prefill, headers=auth)
    assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied"
    r = httpx.post(fleet["always"].base_url + "/v1/completions", json=prefill, headers=fleet_header)
    assert r.status_code == 403  # (the router forwards no such header)
    for path in ("/v1/kv_transfer", "/v1/kv_transfer/x"):
        assert httpx.post(fleet["always"].base_url + path, headers=kv).status_code == 404  # not relayed
    assert httpx.delete(fleet["always"].base_url + "/v1/kv_transfer/x", headers=kv).status_code == 404
    for bad in ({**prefill, "stream": True}, {**prefill, "n": 2}, {**prefill, "prompt": ["a", "b"]},
                {**body, "kv_transfer_params": {"do_remote_decode": False}},
                {**body, "kv_transfer_params": {"do_remote_decode": True, "remote_host": "x"}}):
        r = httpx.post(p + "/v1/completions", json=bad, headers=fleet_header)
        assert r.status_code == 400 and r.json()["error"]["param"] == "kv_transfer_params", bad
    r = httpx.post(p + "/v1/chat/completions", headers=fleet_header, json={
        "messages": [{"role": "user", "content": "hi"}], "kv_transfer_params": {"do_remote_decode": True},
        "tools": [{"type": "file_search", "vector_store_ids": ["vs_x"]}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "kv_transfer_params"
    r = httpx.post(p + "/v1/responses", json={"input": "hi", "kv_transfer_params": {"do_remote_decode": True}},
                   headers=fleet_header)
    assert r.status_code == 400
    tid = httpx.post(p + "/v1/completions", json=prefill, headers=fleet_header).json()["kv_transfer_params"][
        "transfer_id"]
    for wrong in ({}, auth, {"authorization": "Bearer nope"}):
        r = httpx.get(f"{p}/v1/kv_transfer/{tid}", headers=wrong)
        assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied"
    assert httpx.get(f"{p}/v1/kv_transfer/{tid}?skip_blocks=-1", headers=kv).status_code == 400
    data = httpx.get(f"{p}/v1/kv_transfer/{tid}", headers=kv)
    assert data.status_code == 200 and int(data.headers["x-kv-blocks"]) > 0
    again = httpx.get(f"{p}/v1/kv_transfer/{tid}", headers=kv)
    assert again.status_code == 404 and again.json()["error"]["code"] == "kv_transfer_not_found"
    assert httpx.post(d + "/v1/kv_transfer", content=data.content, headers=auth).status_code == 403
    for content in (b"garbage", data.content[:-5]):
        r = httpx.post(d + "/v1/kv_transfer", content=content, headers=kv)
        assert r.status_code == 400 and r.json()["error"]["code"] == "kv_transfer_mismatch"
    huge = httpx.post(d + "/v1/kv_transfer", content=b"\0" * (64 * 2**20), headers=kv)  # > its whole KV cache
    assert huge.status_code == 413
    # KV of another checkpoint (same shapes): refused by its fingerprint
    other = make_model(str(tmp_path / "other"), "llama", seed=9)
    llm = _llm(other)
    _prefill(llm, list(range(10, 90)))
    foreign = kv_transfer.encode(llm.engine.export_kv("t"))
    r = httpx.post(d + "/v1/kv_transfer", content=foreign, headers=kv)
    assert r.status_code == 400 and "another model" in r.json()["error"]["message"]
    ok = httpx.post(d + "/v1/kv_transfer", content=data.content, headers=kv)
    assert ok.status_code == 200 and ok.json()["object"] == "kv_transfer.import"
    # A request that fails before it runs lets go of the hold kept for it (not after --kv-hold-timeout).
    hold = ok.json()["hold_id"]
    assert hold and fleet["decode"].metric("tokenmill:kv_cache_usage_perc") > 0
    model = httpx.get(d + "/v1/models", headers=auth).json()["data"][0]["id"]
    for path, refused in (("/v1/completions", {**body, "max_tokens": 10**6}),
                          ("/api/chat", {"model": model, "messages": [{"role": "user", "content": "hi"}],
                                         "logprobs": True, "top_logprobs": 50})):  # (refused by Ollama's route)
        if path != "/v1/completions":
            hold = httpx.post(d + "/v1/kv_transfer", content=data.content, headers=kv).json()["hold_id"]
            assert hold and fleet["decode"].metric("tokenmill:kv_cache_usage_perc") > 0
        r = httpx.post(d + path, json=refused,
                       headers={**auth, "x-tokenmill-kv-release": hold, "x-tokenmill-kv-transfer-key": KV_KEY})
        assert r.status_code == 400, r.text
        deadline = time.monotonic() + 10
        while fleet["decode"].metric("tokenmill:kv_cache_usage_perc") > 0:
            assert time.monotonic() < deadline, f"the hold was kept ({path})"
            time.sleep(0.1)
    # A pull: the replica GETs the payload from the worker itself.
    def held() -> str:
        return httpx.post(p + "/v1/completions", json=prefill, headers=fleet_header).json()["kv_transfer_params"][
            "transfer_id"]

    tid = held()
    for bad, param in (({"source": "ftp://x", "transfer_id": tid}, "source"),
                       ({"source": p + "?a=1", "transfer_id": tid}, "source"),
                       ({"source": p + "/x?", "transfer_id": tid}, "source"),  # (an empty query, too)
                       ({"source": p + "#", "transfer_id": tid}, "source"),
                       ({"source": "http://u:pw@" + p.split("://")[1], "transfer_id": tid}, "source"),
                       ({"source": "http://[::1", "transfer_id": tid}, "source"),
                       ({"source": p + "/a\tb", "transfer_id": tid}, "source"),
                       ({"source": p + "[::1]:80", "transfer_id": tid}, "source"),  # (urllib: [::1]'s; httpx: none)
                       ({"source": p + "/a,b", "transfer_id": tid}, "source"),
                       ({"source": p, "transfer_id": ".."}, "transfer_id"),
                       ({"source": p, "transfer_id": "../models"}, "transfer_id"),
                       ({"source": p, "transfer_id": tid, "skip_blocks": -1}, "skip_blocks"),
                       ({"source": p, "transfer_id": tid, "extra": 1}, "extra")):
        r = httpx.post(d + "/v1/kv_transfer", json=bad, headers=kv)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, bad
    for body in (b"[1", b"[" * 60000):
        assert httpx.post(d + "/v1/kv_transfer", content=body, headers={**kv, "content-type": "Application/JSON"}
                          ).status_code == 400
    assert httpx.post(d + "/v1/kv_transfer", json={"source": p, "transfer_id": tid}, headers=auth).status_code == 403
    for source, transfer in ((p, "kvx-" + "0" * 32), ("http://127.0.0.1:9", tid)):
        r = httpx.post(d + "/v1/kv_transfer", json={"source": source, "transfer_id": transfer}, headers=kv)
        assert r.status_code == 502 and r.json()["error"]["code"] == "kv_transfer_source_failed", source
    # Only its --kv-transfer-sources: another port, host or path is refused before anything is sent.
    port = int(p.rsplit(":", 1)[1])
    for source in (f"http://127.0.0.1:{port + 1}", f"http://localhost:{port}", p + "/v2", "https" + p[4:]):
        r = httpx.post(d + "/v1/kv_transfer", json={"source": source, "transfer_id": tid}, headers=kv)
        assert r.status_code == 403 and r.json()["error"]["code"] == "kv_transfer_source_not_allowed", source
    pulled = httpx.post(d + "/v1/kv_transfer", json={"source": p + "/", "transfer_id": tid}, headers=kv)
    assert pulled.status_code == 200 and pulled.json()["bytes"] > 0 and pulled.json()["blocks"] > 0
    assert httpx.get(f"{p}/v1/kv_transfer/{tid}", headers=kv).status_code == 404  # (taken)
    # A hold given up on is released unread.
    tid = held()
    worker = fleet["prefill"]
    assert worker.metric("tokenmill:kv_holds") == 1 and worker.metric("tokenmill:kv_held_blocks") > 0
    assert httpx.delete(f"{p}/v1/kv_transfer/{tid}", headers=auth).status_code == 403
    assert httpx.delete(f"{p}/v1/kv_transfer/{tid}", headers=kv).json()["released"] is True
    r = httpx.delete(f"{p}/v1/kv_transfer/{tid}", headers=kv)
    assert r.status_code == 404 and r.json()["error"]["code"] == "kv_transfer_not_found"
    assert fleet["prefill"].metric("tokenmill:kv_cache_usage_perc") == 0
    assert worker.metric("tokenmill:kv_holds") == 0 and worker.metric("tokenmill:kv_held_blocks") == 0


def test_a_router_starts_prefill_workers_and_replicas_that_pull_from_them_only(model_dir, model_name, tmp_path):
    """`tokenmill router --replicas 1 --prefill-replicas 1`: the replica it starts gets the prefill
    worker's URL as its --kv-transfer-sources, and a long prompt is prefilled there and pulled."""
    logs = tmp_path / "logs"
    router = ServerProcess(model_dir, "--replicas", "1", "--prefill-replicas", "1", "--replica-threads", "1",
                           "--replica-log-dir", str(logs), "--disagg-policy", "always", "--disagg-min-tokens", "32",
                           "--kv-transfer-key", KV_KEY, "--health-interval", "0.2", "--kv-cache-memory", "0.02",
                           log_path=str(tmp_path / "router.log"), command="router")
    try:
        started = [line for line in open(tmp_path / "router.log") if "starting replica" in line]
        (decode_cmd,) = [line.split() for line in started if "--kv-transfer-sources" in line]
        (worker,) = [line.split() for line in started if "--kv-transfer-sources" not in line]
        source = decode_cmd[decode_cmd.index("--kv-transfer-sources") + 1]
        assert source == f"http://127.0.0.1:{worker[worker.index('--port') + 1]}"
        replica = f"http://127.0.0.1:{decode_cmd[decode_cmd.index('--port') + 1]}"
        wait_fleet(router, [replica, source])
        kv = {"authorization": f"Bearer {KV_KEY}"}
        r = httpx.post(replica + "/v1/kv_transfer", json={"source": "http://127.0.0.1:9", "transfer_id":
                                                          "kvx-" + "0" * 32}, headers=kv)
        assert r.status_code == 403 and r.json()["error"]["code"] == "kv_transfer_source_not_allowed", r.text
        c = openai.OpenAI(base_url=router.base_url + "/v1", api_key="x", max_retries=0, timeout=120)
        r = c.completions.create(model=model_name, prompt="a long prompt " * 30, max_tokens=4, temperature=0)
        assert r.usage.completion_tokens == 4
        assert _remote(router) == 1
        assert not any(k.startswith("tokenmill_router:kv_transfer_failures_total") for k in router_metrics(
            router.base_url))
    finally:
        assert router.stop() == 0


def test_kv_transfer_needs_its_key(model_dir):
    proc = subprocess.run([sys.executable, "-m", "tokenmill.cli", "serve", "--model", model_dir, "--kv-transfer"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={k: v for k, v in os.environ.items() if k != "TOKENMILL_KV_TRANSFER_KEY"})
    assert proc.returncode != 0 and "--kv-transfer-key" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "tokenmill.cli", "router", "--replica", "http://127.0.0.1:9",
                           "--prefill", "http://127.0.0.1:10"], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={k: v for k, v in os.environ.items() if k != "TOKENMILL_KV_TRANSFER_KEY"})
    assert proc.returncode != 0 and "--kv-transfer-key" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "tokenmill.cli", "serve", "--model", model_dir, "--kv-transfer",
                           "--kv-transfer-key", KV_KEY, "--kv-transfer-sources", "http://a:1,http://u@b:2"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode != 0 and "--kv-transfer-sources" in proc.stderr and "'http://u@b:2'" in proc.stderr
