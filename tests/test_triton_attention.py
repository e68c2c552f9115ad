"""The Triton paged-attention backend against the torch backend (issue 16).

On a machine without a GPU the kernel runs under Triton's interpreter (TRITON_INTERPRET=1, set
here before triton is imported), so its indexing, masking and online softmax are checked in CI;
on a GPU the same tests compile it. Mixed batches: decodes, prompt chunks with no context and
chunks after cached context, with GQA, sliding windows and a head size that is not a power of two.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from tokenmill.attention import get_attention_backend  # noqa: E402
from tokenmill.attention import triton_backend as _triton_backend  # noqa: E402, F401  (registers "triton")
from tokenmill.attention.triton_backend import DecodeTiling  # noqa: E402
from tokenmill.engine.model_runner import build_batch  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BS = 16


def _step(rng: random.Random, kinds: list[str], num_blocks: int) -> list[tuple[list[int], int, list[int]]]:
    """Chunks (ids, first position, block table), decodes first, each sequence on its own blocks."""
    free = list(range(1, num_blocks))
    rng.shuffle(free)
    chunks = []
    for kind in sorted(kinds, key=lambda k: k != "decode"):
        if kind == "decode":
            start, n = rng.randint(0, 90), 1
        elif kind == "prompt":
            start, n = 0, rng.randint(2, 40)
        else:  # a chunk after cached context
            start, n = rng.randint(1, 70), rng.randint(2, 35)
        blocks = -(-(start + n) // BS)
        chunks.append(([0] * n, start, [free.pop() for _ in range(blocks)]))
    return chunks


@pytest.mark.parametrize("kernel_prefill", [True, False], ids=["kernel-prefill", "sdpa-prefill"])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 64), (8, 2, 48), (6, 1, 32)])
@pytest.mark.parametrize("window", [None, 8, 37])
def test_triton_matches_torch_on_mixed_batches(heads, kv_heads, head_dim, window, kernel_prefill):
    """The kernel on every row (kernel_prefill) and as the backend runs it (paged_decode for decodes;
    prefill chunks by paged_attention when one has cached context or a window, else SDPA's)."""
    rng = random.Random(f"{heads}-{kv_heads}-{head_dim}-{window}")
    torch.manual_seed(0)
    scale = head_dim ** -0.5
    num_blocks = 128
    for trial in range(3):
        kinds = [rng.choice(["decode", "prompt", "context"]) for _ in range(rng.randint(1, 6))]
        if trial == 0:
            kinds = ["decode", "decode", "prompt", "context"]
        elif trial == 1:
            kinds = ["decode", "prompt", "prompt"]  # (fresh chunks only: SDPA's, without a window)
        chunks = _step(rng, kinds, num_blocks)
        _, _, meta = build_batch(chunks, BS, DEVICE)
        t = meta.num_tokens
        q = torch.randn(t, heads, head_dim, device=DEVICE)
        k = torch.randn(t, kv_heads, head_dim, device=DEVICE)
        v = torch.randn(t, kv_heads, head_dim, device=DEVICE)
        cache = torch.randn(2, num_blocks, BS, kv_heads, head_dim, device=DEVICE)
        outs, caches = {}, {}
        for name in ("torch", "triton"):
            backend = get_attention_backend(name)(heads, kv_heads, head_dim, scale)
            backend.kernel_prefill = kernel_prefill
            c = cache.clone()
            _, _, meta = build_batch(chunks, BS, DEVICE)  # fresh scratch per backend
            outs[name] = backend.forward(q, k, v, c, meta, window)
            caches[name] = c
        assert torch.equal(caches["torch"], caches["triton"])  # this step's k and v in the same slots
        torch.testing.assert_close(outs["triton"], outs["torch"], atol=2e-5, rtol=2e-5), kinds


def test_chunks_after_cached_context_never_take_sdpa(monkeypatch):
    """A prefill chunk after cached context (or under a window) goes to paged_attention: SDPA
    would need a mask, which on CUDA with GQA runs its math kernel (the whole score matrix in
    float32). Fresh causal chunks alone keep SDPA's flash kernel."""
    from tokenmill.attention import torch_backend

    calls = []
    sdpa = torch_backend.F.scaled_dot_product_attention

    def recording(*a, **k):
        calls.append("mask" if k.get("attn_mask") is not None else "causal")
        return sdpa(*a, **k)

    monkeypatch.setattr(torch_backend.F, "scaled_dot_product_attention", recording)
    backend = get_attention_backend("triton")(8, 2, 32, 32 ** -0.5)
    cache = torch.randn(2, 16, BS, 2, 32, device=DEVICE)
    for chunks, window, want in [([([0], 20, [0, 1]), ([0] * 5, 0, [2])], None, ["causal"]),
                                 ([([0], 20, [0, 1]), ([0] * 5, 9, [2])], None, []),
                                 ([([0] * 5, 0, [2])], 3, [])]:
        calls.clear()
        _, _, meta = build_batch(chunks, BS, DEVICE)
        x = torch.randn(meta.num_tokens, 8, 32, device=DEVICE)
        kv = torch.randn(meta.num_tokens, 2, 32, device=DEVICE)
        backend.forward(x, kv, kv, cache, meta, window)
        assert calls == want, (chunks, window, calls)


def test_triton_needs_a_power_of_two_block_size():
    chunks = [([0], 5, [3])]
    _, _, meta = build_batch(chunks, 8, DEVICE)
    backend = get_attention_backend("triton")(2, 2, 16, 0.25)
    x = torch.randn(1, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="block_size"):
        backend.forward(x, x, x, torch.zeros(2, 8, 8, 2, 16, device=DEVICE), meta)


@pytest.fixture
def kernel_specs(monkeypatch) -> dict[tuple, set]:
    """Every kernel launch from here on, as {(kernel, constexprs): {JIT specialisations}}: the
    compiled variants a GPU would need (tokenmill/attention/triton_aot.py's reading of the arguments)."""
    from tokenmill.attention.triton_aot import _signature
    from tokenmill.attention.triton_backend import KernelLaunch

    specs: dict[tuple, set] = {}
    launch = KernelLaunch.launch

    def recording(self):
        sig, consts, attrs = _signature(self)
        specs.setdefault((self.kernel.__name__, tuple(sorted(self.constants.items()))), set()).add(
            (tuple(sig.items()), tuple(sorted(consts)), tuple(sorted(attrs))))
        launch(self)

    monkeypatch.setattr(KernelLaunch, "launch", recording)
    return specs


def test_engine_with_the_triton_backend_generates_what_torch_does(model_dir, kernel_specs):
    """The whole engine on attention_backend="triton" (chunked prefill with a small token budget,
    batched decodes): greedy tokens equal the torch backend's. With the kernel prefill, the step's
    inputs packed as on a GPU: every launch of a kernel with the same constexprs has the same JIT
    specialisation (alignment, divisibility), however the step's lengths and block-table width
    vary, so that a GPU compiles each variant once, not mid-serving."""
    from tokenmill import LLM, SamplingParams

    prompts = ["Hello world", "The quick brown fox jumps over the lazy dog " * 3, "def fib(n):"]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    got = {}
    for name in ("torch", "triton", "triton-kernel-prefill"):
        llm = LLM(model_dir, attention_backend=name.split("-")[0], kv_cache_memory_bytes=4 * 2**20,
                  max_num_batched_tokens=24, device=DEVICE.type, cuda_graphs="off")
        llm.engine.runner.attn_backend.kernel_prefill = name.endswith("prefill")
        if name.endswith("prefill"):
            kernel_specs.clear()
            llm.engine.runner.batch.staging._pack = True  # one buffer of views, as on a GPU
        got[name] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    llm.generate(["Hi"], params)  # alone: steps whose block tables are one block wide
    assert {"paged_decode", "paged_attention"} <= {k[0] for k in kernel_specs}, kernel_specs
    for key, variants in kernel_specs.items():
        assert len(variants) == 1, (key, variants)
    assert got["triton"] == got["torch"] == got["triton-kernel-prefill"]


@pytest.mark.parametrize("draft", [False, True], ids=["alone", "with-draft-model"])
def test_warm_up_compiles_every_variant_that_serving_launches(model_dir, kernel_specs, tmp_path, draft):
    """ModelRunner.compile_decode_variants (a GPU runs it at start-up and after a park) launches
    every kernel variant, constexprs and JIT specialisation, that serving then launches: decodes
    split 1 to 4 ways (here: 8 programs over 2 KV heads), the combine, the prefill kernel (prompts
    chunked by the token budget: chunks after cached context), in eager mixed steps with their
    inputs packed as on a GPU; with a draft model of other head
    counts and head size, its variants too. Nothing is compiled mid-serving."""
    from tests.models import make_model
    from tokenmill import LLM, SamplingParams

    spec = None
    if draft:
        d = make_model(str(tmp_path / "draft"), "llama", seed=11, tokenizer=False, hidden_size=64,
                       intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
        spec = {"method": "draft_model", "model": d, "num_speculative_tokens": 3}
    llm = LLM(model_dir, attention_backend="triton", kv_cache_memory_bytes=4 * 2**20, max_model_len=256,
              max_num_batched_tokens=24, device=DEVICE.type, cuda_graphs="off", speculative_config=spec)
    runner = llm.engine.runner
    backends = [runner.attn_backend] + ([runner.drafter.backend] if draft else [])
    for b in backends:
        b.target_programs = 8  # (a GPU's SMs would split more ways)
    runner.batch.staging._pack = True
    if draft:
        runner.drafter.staging._pack = True  # its passes' inputs packed as on a GPU too
    kernel_specs.clear()
    assert runner.compile_decode_variants() == [1, 2, 4]
    warmed = {(k, v) for k, vs in kernel_specs.items() for v in vs}
    kernel_specs.clear()
    rng = random.Random(3)
    vocab = llm.engine.model_config.vocab_size
    prompts = [{"prompt_token_ids": [rng.randrange(3, vocab) for _ in range(n)]} for n in (3, 40, 90, 7, 150)]
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    served = {(k, v) for k, vs in kernel_specs.items() for v in vs}
    assert {dict(k[1]).get("SPLITS") for k, _ in served if k[0] == "paged_decode"} == {1, 2, 4}
    if draft:  # the draft model's decodes are variants of their own (2 query heads over 1 KV head, 32 wide)
        assert len({k for k, _ in served if k[0] == "paged_decode"}) > 3
    assert served <= warmed, served - warmed


@pytest.mark.parametrize("dtype,block_n", [(torch.float32, 32), (torch.float16, 32), (torch.bfloat16, 32),
                                           (torch.float32, 64), (torch.float16, 64)])
@pytest.mark.parametrize("heads,kv_heads,head_dim,window,bs", [(8, 2, 64, None, 16), (64, 2, 32, 50, 16),
                                                               (4, 4, 80, None, 64), (6, 3, 32, 50, 32)])
def test_decode_kernel_over_splits_and_dtypes(heads, kv_heads, head_dim, window, bs, dtype, block_n):
    """paged_decode alone (a decode-only step) with its context split 1 to 16 ways, long and short
    contexts in one batch, GQA groups up to 32 query heads (over two KV heads), blocks shorter and
    longer than the kernel's key tiles (of both sizes a tiling may choose), windows that start on
    either side of a tile's edge, float32 exactly and 16-bit models (their tensor-core path; bfloat16
    computes in float32 under the interpreter) within rounding."""
    rng = random.Random(f"{heads}{dtype}")
    torch.manual_seed(1)
    num_blocks = 2400 // bs
    free = list(range(1, num_blocks))
    rng.shuffle(free)
    lens = [1, 2, 15, 16, 17, 63, 300, 700]
    if window:  # context - window one before, at and after a multiple of 32 and of 64 keys
        lens += [window + 64 + d for d in (-1, 0, 1)] + [window + 96 + d for d in (-1, 0, 1)]
    chunks = [([0], n - 1, [free.pop() for _ in range(-(-n // bs))]) for n in lens]
    q = torch.randn(len(lens), heads, head_dim, device=DEVICE).to(dtype)
    k = torch.randn(len(lens), kv_heads, head_dim, device=DEVICE).to(dtype)
    v = torch.randn(len(lens), kv_heads, head_dim, device=DEVICE).to(dtype)
    cache = torch.randn(2, num_blocks, bs, kv_heads, head_dim, device=DEVICE).to(dtype)
    ref_cache = cache.clone()
    _, _, meta = build_batch(chunks, bs, DEVICE)
    ref = get_attention_backend("torch")(heads, kv_heads, head_dim, head_dim ** -0.5).forward(
        q, k, v, ref_cache, meta, window)
    seen = set()
    for target in (1, 64, 10_000):
        backend = get_attention_backend("triton")(heads, kv_heads, head_dim, head_dim ** -0.5)
        backend.target_programs = target
        backend.DECODE_16BIT = backend.DECODE_FLOAT32 = DecodeTiling(block_n=block_n, num_warps=4)
        _, _, meta = build_batch(chunks, bs, DEVICE)
        tile = backend.decode_tiling(q.dtype).block_n
        seen.add(backend.num_splits(meta, len(lens), tile, q.device))
        c = cache.clone()
        out = backend.forward(q, k, v, c, meta, window)
        assert torch.equal(c, ref_cache)
        tol = 2e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    # 700 tokens: 22 tiles of 32 keys (capped at 16 splits) or 11 of 64 (a power of two: 8).
    assert 1 in seen and max(seen) == (16 if tile == 32 else 8)
