"""CUDA graphs for decode-only steps (tokenmill/engine/cuda_graphs.py, issue 16).

On a GPU the engine captures the graphs (cuda_graphs="on") and replays them; on a CPU the same
static buffers, padding and spare block run without capture (cuda_graphs="padded"), with the
Triton kernel under its interpreter. Either way the tokens must be those of plain eager steps.
"""

from __future__ import annotations

import contextlib
import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from tokenmill import LLM, SamplingParams  # noqa: E402
from tokenmill.config import EngineConfig  # noqa: E402
from tokenmill.engine.cuda_graphs import default_sizes  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GRAPHS = "on" if DEVICE.type == "cuda" else "padded"
BLOCK_BYTES = 2 * 2 * 16 * 2 * 16 * 4  # k and v, 2 layers, 16 tokens, 2 KV heads of 16, float32 (tests/models.py)


def _run(model_dir: str, graphs: str, sizes: list[int] | None,
         async_scheduling: str = "off") -> tuple[dict[str, list[int]], int, int]:
    """Requests arriving over the steps, so that decode batches grow and shrink (padded up, rows left
    over from larger batches) and blocks freed by finished or preempted sequences go to others."""
    llm = LLM(model_dir, attention_backend="triton", cuda_graphs=graphs, cuda_graph_sizes=sizes, device=DEVICE.type,
              dtype="float32", max_model_len=128, max_num_seqs=6, max_num_batched_tokens=48,
              kv_cache_memory_bytes=15 * BLOCK_BYTES, enable_prefix_caching=False, async_scheduling=async_scheduling)
    eng = llm.engine
    vocab = eng.model_config.vocab_size
    rng = random.Random(0)
    # (outputs of up to 16 tokens: each step runs the interpreter; still 5 and 6 decodes at once, preemptions,
    # and over 10 graph steps)
    pending = sorted((rng.randint(0, 30), f"r{i}", [rng.randrange(3, vocab) for _ in range(rng.randint(2, 60))],
                      rng.randint(2, 16)) for i in range(14))
    out: dict[str, list[int]] = {}
    step = 0
    while pending or eng.has_unfinished_requests():
        while pending and pending[0][0] <= step:
            _, rid, prompt, n = pending.pop(0)
            eng.add_request({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True),
                            request_id=rid)
        for o in eng.step():
            if o.finished:
                out[o.request_id] = o.outputs[0].token_ids
        step += 1
    return out, eng.runner.graph_replays, eng.scheduler.num_preemptions


def test_decode_steps_through_the_graphs_generate_what_eager_steps_do(model_dir):
    eager, replays, _ = _run(model_dir, "off", None)
    assert replays == 0
    graphs, replays, preemptions = _run(model_dir, GRAPHS, [1, 2, 4])  # batches of 5 and 6 decodes run eagerly
    assert len(eager) == 14 and graphs == eager
    assert replays > 10
    assert preemptions > 0  # blocks went from one sequence to another while the graphs ran
    # Async scheduling: each graph step's input ids are the step before's tokens, copied on the
    # device into the buffer the graph reads.
    overlapped, replays, _ = _run(model_dir, GRAPHS, [1, 2, 4], "on")
    assert overlapped == eager and replays > 10


def test_graph_configuration():
    assert default_sizes(256) == [1, 2, 4] + list(range(8, 257, 8))
    assert default_sizes(6) == [1, 2, 4, 6]
    assert default_sizes(1000)[-1] == 512
    cpu = torch.device("cpu")
    assert EngineConfig(model="m").resolve_cuda_graphs(cpu, "cpu") == "off"
    assert EngineConfig(model="m", cuda_graphs="padded").resolve_cuda_graphs(cpu, "triton") == "padded"
    with pytest.raises(ValueError, match="'padded' needs the triton"):
        EngineConfig(model="m", cuda_graphs="padded").resolve_cuda_graphs(cpu, "cpu")
    assert EngineConfig(model="m").resolve_cuda_graphs(torch.device("cuda"), "triton") == "capture"
    assert EngineConfig(model="m").resolve_cuda_graphs(torch.device("cuda"), "torch") == "off"
    with pytest.raises(ValueError, match="needs a CUDA device and the triton"):
        EngineConfig(model="m", cuda_graphs="on").resolve_cuda_graphs(cpu, "triton")
    for bad in ({"cuda_graphs": "yes"}, {"cuda_graph_sizes": []}, {"cuda_graph_sizes": [0, 4]},
                {"cuda_graph_sizes": ["8"]}):
        with pytest.raises(ValueError, match="cuda_graph"):
            EngineConfig(model="m", **bad).validate()


def test_graphs_that_cannot_be_made_leave_the_engine_serving_eagerly(model_dir, monkeypatch):
    """A capture that fails (out of memory, say) is logged once and every step then runs eagerly."""
    import tokenmill.engine.model_runner as mr

    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(mr, "DecodeGraphs", broken)
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    llm = LLM(model_dir, attention_backend="triton", cuda_graphs=GRAPHS, device=DEVICE.type, dtype="float32",
              kv_cache_memory_bytes=64 * BLOCK_BYTES, max_model_len=128)
    got = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": [5, 6, 7]}, {"prompt_token_ids": [9]}],
                                                        params)]
    assert llm.engine.runner.graph_mode == "off" and calls == [1]
    ref = LLM(model_dir, attention_backend="triton", cuda_graphs="off", device=DEVICE.type, dtype="float32",
              kv_cache_memory_bytes=64 * BLOCK_BYTES, max_model_len=128)
    assert got == [o.outputs[0].token_ids for o in ref.generate([{"prompt_token_ids": [5, 6, 7]},
                                                                 {"prompt_token_ids": [9]}], params)]


def test_draft_model_passes_through_its_own_graphs(model_dir):
    """With a draft model, its single-row passes (k - 1 a step) run through its own graphs, on the
    same spare block: greedy tokens equal those of eager steps, and the drafts (the model itself)
    are all accepted (greedy output alone would not show a wrong draft), so the draft's padded rows
    touch no sequence's draft KV; its graphs are dropped and made again with the model's (a park)."""
    draft = model_dir  # the model itself: every draft is right, if the draft passes are
    rng = random.Random(1)
    prompts = [{"prompt_token_ids": [rng.randrange(3, 500) for _ in range(rng.randint(2, 40))]} for _ in range(5)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    got, accepted = {}, {}
    for graphs in ("off", GRAPHS):
        llm = LLM(model_dir, attention_backend="triton", cuda_graphs=graphs, cuda_graph_sizes=[1, 2, 4, 8],
                  device=DEVICE.type, dtype="float32", max_model_len=128, max_num_seqs=8,
                  kv_cache_memory_bytes=64 * BLOCK_BYTES, enable_prefix_caching=False,
                  speculative_config={"method": "draft_model", "model": draft, "num_speculative_tokens": 3})
        llm.engine.runner.drafter.staging._pack = True  # its passes' inputs in one buffer, as on a GPU
        got[graphs] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        stats = llm.engine.spec_stats
        accepted[graphs] = (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens)
        drafter = llm.engine.runner.drafter
        if graphs == "off":
            assert drafter.graphs is None
            continue
        assert drafter.graphs.num_replays > 5 and drafter.graphs.model is drafter.model
        llm.engine.park()
        assert drafter.graphs is None and llm.engine.runner._graphs is None
        llm.engine.unpark()
        again = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        assert again == got["off"] and drafter.graphs.num_replays > 5
    assert got[GRAPHS] == got["off"] and accepted[GRAPHS] == accepted["off"]
    assert 0 < accepted["off"][2] == accepted["off"][1]


def test_the_graphed_forward_never_reads_the_device_back(model_dir, monkeypatch):
    """What a graph records must run without the host: a capture fails on any op that waits for
    the device (item, bool, nonzero: a shape from values) or copies host data in. On a CPU nothing
    is captured, so each padded size's forward runs here under a dispatch mode that refuses those
    ops, with the model's norms, RoPE and cache write on the Triton kernels as on CUDA (the CPU would
    run its C++ ones); on CUDA under the sync debug mode too."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from tokenmill import gpu_ops
    from tokenmill.model import layers, transformer

    for mod in (layers, transformer):
        monkeypatch.setattr(mod, "elementwise_ops", lambda x: gpu_ops)
    llm = LLM(model_dir, attention_backend="triton", cuda_graphs=GRAPHS, cuda_graph_sizes=[1, 2, 4],
              device=DEVICE.type, dtype="float32", max_model_len=128, max_num_seqs=4,
              kv_cache_memory_bytes=64 * BLOCK_BYTES)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    llm.generate([{"prompt_token_ids": [5, 6, 7]}, {"prompt_token_ids": [9, 10]}], params)  # (kernels compiled)
    graphs = llm.engine.runner._graphs
    assert graphs is not None and graphs.num_replays > 0

    aten = torch.ops.aten  # (under inference mode item and bool() stay whole: aten.item, aten.is_nonzero)
    refused = (aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default, aten.equal.default,
               aten.nonzero.default, aten.masked_select.default, aten.lift_fresh.default, aten.lift_fresh_copy.default)

    class Reads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in refused:
                raise AssertionError(f"{func} in the graphed forward: a capture cannot hold it")
            if func is torch.ops.aten.index.Tensor and any(
                    i is not None and i.dtype == torch.bool for i in args[1]):
                raise AssertionError("a boolean index in the graphed forward: its shape comes from values")
            return func(*args, **(kwargs or {}))

    def refuse(*a, **k):
        raise AssertionError("torch.tensor in the graphed forward: host data copied in")

    for size in graphs.sizes:
        with monkeypatch.context() as m, contextlib.ExitStack() as stack:
            m.setattr(torch, "tensor", refuse)
            if DEVICE.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
                stack.callback(torch.cuda.set_sync_debug_mode, 0)
            stack.enter_context(Reads())
            with torch.inference_mode():
                hidden = graphs._forward(size)
        assert hidden.shape == (size, llm.engine.model_config.hidden_size)
