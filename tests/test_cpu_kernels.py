"""tokenmill's CPU kernels against PyTorch references, and the engine with and without them."""

import math

import pytest
import torch
import torch.nn.functional as F

from tests.models import make_model
from tokenmill import LLM, SamplingParams
from tokenmill.kernels import cpu_ops
from tokenmill.model.linear import _float32_gemm, can_prepack, linear, prepack_weight, quantize_rows_int8


def _has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return all(f" {x}" in flags for x in ("avx512f", "avx512bw", "avx512vl"))


def test_kernels_build_where_avx512_exists():
    # CI and the dev machine have AVX-512: a broken build must fail here, not fall back silently.
    if _has_avx512():
        assert cpu_ops() is not None
    else:
        pytest.skip("no AVX-512 on this CPU: the kernels are not used")


ops = cpu_ops()
needs_ops = pytest.mark.skipif(ops is None, reason="tokenmill CPU kernels unavailable here")


@needs_ops
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("k", [64, 100, 576])
def test_linear_matches_torch(wdtype, xdtype, m, k):
    g = torch.Generator().manual_seed(m * 1000 + k)
    n = 37
    w = torch.randn(n, k, generator=g)
    scale = None
    if wdtype is torch.int8:
        w, scale = quantize_rows_int8(w)
        ref_w = w.double() * scale.double()[:, None]
    else:
        w = w.to(wdtype)
        ref_w = w.double()
    x = torch.randn(m, k, generator=g).to(xdtype)
    bias = torch.randn(n, generator=g)
    out = ops.linear(x, w, scale, bias)
    assert out.dtype == xdtype and out.shape == (m, n)
    ref = x.double() @ ref_w.T + bias.double()
    tol = 1e-4 if xdtype is torch.float32 else 2e-2  # bfloat16 output rounding
    torch.testing.assert_close(out.double(), ref, atol=tol * math.sqrt(k), rtol=tol)
    no_bias = ops.linear(x, w, scale)
    torch.testing.assert_close(no_bias.double(), ref - bias.double(), atol=tol * math.sqrt(k), rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [9, 32, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_prepacked_linear_matches_torch(dtype, m, bias):
    """Rows above the kernel's limit multiply against the oneDNN-prepacked copy (here of 2w, to see
    which weight was used), non-contiguous input included; at or below it, the plain weight."""
    from tokenmill.model.linear import KERNEL_MAX_ROWS

    w0 = torch.randn(70, 96, generator=torch.Generator().manual_seed(m)).to(dtype)
    if not can_prepack(w0):
        pytest.skip("no oneDNN path for this dtype here")
    b = torch.randn(70).to(dtype) if bias else None
    packed = prepack_weight(2 * w0)
    assert packed.is_mkldnn
    x = torch.randn(m, 2 * 96).to(dtype)[:, ::2]  # a strided view, as a narrowed activation is
    assert not x.is_contiguous()
    out = linear(x, w0, None, b, packed)
    assert out.dtype == dtype and out.shape == (m, 70)
    # (bfloat16 on a CPU without it natively: a weight this small is multiplied in float32, plain)
    used = w0.double() if _float32_gemm(x, w0) else 2 * w0.double()
    ref = x.double() @ used.T + (b.double() if bias else 0)
    tol = 1e-4 if dtype is torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), ref, atol=tol * math.sqrt(96), rtol=tol)
    few = x[: KERNEL_MAX_ROWS[dtype]]
    plain = few.double() @ w0.double().T + (b.double() if bias else 0)
    torch.testing.assert_close(linear(few, w0, None, b, packed).double(), plain, atol=tol * math.sqrt(96), rtol=tol)


@needs_ops
def test_linear_rejects_bad_shapes():
    with pytest.raises(RuntimeError, match="shapes"):
        ops.linear(torch.randn(1, 8), torch.randn(4, 9))
    with pytest.raises(RuntimeError, match="scale"):
        ops.linear(torch.randn(1, 8), torch.zeros(4, 8, dtype=torch.int8), torch.ones(3))


def _reference_attention(q, k_cache, v_cache, tables, seq_lens, qsl, scale, window):
    """Row by row in float64, straight from the definition."""
    t, h, d = q.shape
    bs, kvh = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros(t, h, d, dtype=torch.float64)
    for b in range(len(seq_lens)):
        length = int(seq_lens[b])
        slots = [int(tables[b][p // bs]) * bs + p % bs for p in range(length)]
        keys = k_cache.reshape(-1, kvh, d)[slots].double()
        vals = v_cache.reshape(-1, kvh, d)[slots].double()
        q_len = int(qsl[b + 1] - qsl[b])
        for i in range(q_len):
            row = int(qsl[b]) + i
            pos = length - q_len + i
            lo = max(0, pos + 1 - window) if window else 0
            for head in range(h):
                kv = head // (h // kvh)
                s = (keys[lo : pos + 1, kv] @ q[row, head].double()) * scale
                out[row, head] = torch.softmax(s, 0) @ vals[lo : pos + 1, kv]
    return out


@needs_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("head_dim", [64, 40, 48, 128])
def test_paged_attention_matches_reference(dtype, window, head_dim):
    g = torch.Generator().manual_seed(head_dim + window)
    heads, kv_heads, bs, num_blocks = 8, 2, 16, 40
    k_cache = torch.randn(num_blocks, bs, kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, bs, kv_heads, head_dim, generator=g).to(dtype)
    q_lens = [1, 1, 1, 3, 16]
    seq_lens = [1, 37, 200, 19, 16]
    perm = torch.randperm(num_blocks, generator=g).tolist()  # blocks scattered over the cache
    tables, used = [], 0
    for n in seq_lens:
        nb = -(-n // bs)
        tables.append(perm[used : used + nb])
        used += nb
    max_blocks = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables])
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist())
    q = torch.randn(int(qsl[-1]), heads, head_dim, generator=g).to(dtype)
    scale = head_dim**-0.5
    out = ops.paged_attention(q, k_cache, v_cache, block_tables, torch.tensor(seq_lens), qsl, scale, window)
    ref = _reference_attention(q, k_cache, v_cache, tables, seq_lens, qsl, scale, window)
    tol = 1e-5 if dtype is torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


@needs_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_elementwise_ops_match_torch(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 96, generator=g).to(dtype)
    w = torch.randn(96, generator=g).to(dtype)
    h = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype is torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-6), w * h.to(dtype), **tol)

    gate_up = torch.randn(5, 2 * 48, generator=g).to(dtype)
    torch.testing.assert_close(ops.silu_mul(gate_up), F.silu(gate_up[:, :48]) * gate_up[:, 48:], **tol)
    # The vectorized path's masked tail (50 = 3 x 16 + 2) and the saturated ends of the sigmoid.
    gate = torch.cat([torch.tensor([[-100.0, -30.0, -1e-3, 0.0, 1e-3, 30.0, 100.0]]).expand(3, 7),
                      20 * torch.randn(3, 43, generator=g)], dim=1)
    gate_up = torch.cat([gate, torch.randn(3, 50, generator=g)], dim=1).to(dtype)
    ref = F.silu(gate_up[:, :50].double()).to(dtype).double() * gate_up[:, 50:].double()
    tol = dict(atol=1e-6, rtol=1e-6) if dtype is torch.float32 else dict(atol=1e-2, rtol=8e-3)
    torch.testing.assert_close(ops.silu_mul(gate_up).double(), ref, **tol)

    # RoPE in place on a strided view (q and k inside a fused qkv row), as the model calls it.
    qkv = torch.randn(5, 3 * 4 * 32, generator=g).to(dtype)
    qk = qkv[:, : 2 * 4 * 32].view(5, 8, 32)
    cos, sin = torch.randn(5, 32, generator=g), torch.randn(5, 32, generator=g)
    c, s = cos.to(dtype)[:, None], sin.to(dtype)[:, None]
    ref = qk * c + torch.cat((-qk[..., 16:], qk[..., :16]), -1) * s
    untouched = qkv[:, 2 * 4 * 32 :].clone()
    ops.rope_(qk, cos, sin)
    torch.testing.assert_close(qk, ref, **tol)
    assert torch.equal(qkv[:, 2 * 4 * 32 :], untouched)


def test_long_and_short_sequences_batched_equal_each_alone(tmp_path):
    """One 2,000-token prompt and 31 short ones in one batch: every output equals its run alone,
    with the kernels and with PyTorch's backend (which pads decodes to the longest)."""
    path = make_model(str(tmp_path / "m"), "llama", max_position_embeddings=4096)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 500, (2000,), generator=g).tolist()]
    lengths = torch.randint(3, 40, (31,), generator=g).tolist()
    prompts += [torch.randint(3, 500, (n,), generator=g).tolist() for n in lengths]
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    results = {}
    for backend in ("cpu", "torch"):
        llm = LLM(path, max_model_len=2100, kv_cache_memory_bytes=64 * 2**20, attention_backend=backend,
                  max_num_batched_tokens=2048, max_num_seqs=32)
        together = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], sp)]
        alone = [llm.generate({"prompt_token_ids": p}, sp)[0].outputs[0].token_ids for p in prompts]
        assert together == alone, backend
        results[backend] = together
    assert results["cpu"] == results["torch"]


@needs_ops
def test_paged_attention_propagates_nan():
    """A NaN in a key or the query reaches the output (the vectorized exp must not clamp it away)."""
    g = torch.Generator().manual_seed(0)
    k_cache = torch.randn(4, 16, 1, 64, generator=g)
    v_cache = torch.randn(4, 16, 1, 64, generator=g)
    q = torch.randn(1, 2, 64, generator=g)
    args = (torch.tensor([[0, 1]]), torch.tensor([20]), torch.tensor([0, 1]), 0.125, 0)
    assert not ops.paged_attention(q, k_cache, v_cache, *args).isnan().any()
    k_bad = k_cache.clone()
    k_bad[0, 3, 0, 5] = float("nan")
    assert ops.paged_attention(q, k_bad, v_cache, *args).isnan().all()
    q_bad = q.clone()
    q_bad[0, 0, 0] = float("nan")
    assert ops.paged_attention(q_bad, k_cache, v_cache, *args)[0, 0].isnan().all()
    with pytest.raises(RuntimeError, match="more query rows than context"):
        ops.paged_attention(torch.randn(3, 2, 64), k_cache, v_cache, torch.tensor([[0, 1]]), torch.tensor([2]),
                            torch.tensor([0, 3]), 0.125, 0)


@needs_ops
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("dtype,quantization,prepack", [("float32", None, True), ("float32", None, False),
                                                         ("bfloat16", None, True), ("bfloat16", None, False),
                                                         ("float32", "int8", None)])
def test_fused_decoder_equals_module_path(tmp_path, arch, dtype, quantization, prepack):
    """The C++ decoder (cpu_ops.Decoder) and the Python modules give bit-identical hidden states and
    KV caches: a prefill step of short chunks (35 rows: the prepacked GEMM where there is one), then
    decodes beside a 3-row chunk (speculative verification's shape), past a sliding window for Mistral."""
    from tokenmill.engine.model_runner import build_batch

    overrides = {"sliding_window": 8} if arch == "mistral" else {}
    path = make_model(str(tmp_path / "m"), arch, tokenizer=False, **overrides)
    llm = LLM(path, dtype=dtype, quantization=quantization, max_model_len=128, kv_cache_memory_bytes=8 * 2**20,
              prepack_weights=prepack)
    runner = llm.engine.runner
    model, bs = runner.model, runner.block_size
    packed = model.layers[0].mlp.gate_up_proj.packed is not None
    assert packed == (bool(prepack) and can_prepack(model.layers[0].mlp.gate_up_proj.weight))
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, 500, (30,), generator=g).tolist() for _ in range(3)]
    tables = [[1, 2], [3, 4], [5, 6]]
    steps = [
        [(ids[0][:12], 0, tables[0]), (ids[1][:9], 0, tables[1]), (ids[2][:14], 0, tables[2])],
        [(ids[0][12:13], 12, tables[0]), (ids[2][14:15], 14, tables[2]), (ids[1][9:12], 9, tables[1])],
        [(ids[0][13:14], 13, tables[0]), (ids[1][12:13], 12, tables[1]), (ids[2][15:27], 15, tables[2])],
    ]

    def run(fused: bool):
        model.use_fused = fused
        caches = [torch.zeros_like(c) for c in runner.kv_caches]
        hidden = []
        with torch.inference_mode():
            for chunks in steps:
                input_ids, positions, meta = build_batch(chunks, bs, runner.device)
                hidden.append(model(input_ids, positions, caches, meta))
        return hidden, caches

    results = {fused: run(fused) for fused in (True, False)}
    assert model._fused is not None  # the fused run did go through the C++ decoder
    for a, b in zip(results[True][0], results[False][0]):
        assert torch.equal(a, b)
    for a, b in zip(results[True][1], results[False][1]):
        assert torch.equal(a, b)
    o_proj = model.layers[0].self_attn.o_proj
    # (bfloat16 without native support: a weight this small goes to float32 from the plain copy)
    if packed and not _float32_gemm(torch.empty(35, 1, dtype=o_proj.weight.dtype), o_proj.weight):
        # both paths multiply the 35-row step against the prepacked copy, not the plain weight
        o_proj.packed = prepack_weight(2 * o_proj.weight)
        model.reset_fused()
        doctored = {fused: run(fused)[0] for fused in (True, False)}
        assert torch.equal(doctored[True][0], doctored[False][0])
        assert not torch.allclose(doctored[True][0], results[True][0][0])


def test_bfloat16_matmuls_run_in_float32_where_the_cpu_has_no_bfloat16(monkeypatch):
    """Without AVX512-BF16 or AMX a bfloat16 GEMM is emulated, 3-5x slower than float32's: above the
    kernel's rows linear() converts the operands and rounds once, but a large weight (an LM head) only
    from FLOAT32_GEMM_ROWS rows: converting it costs more than the emulated GEMM saves below."""
    import torch.nn.functional as F

    from tokenmill.model import linear as lin

    x, w, b = torch.randn(32, 64).bfloat16(), torch.randn(48, 64).bfloat16(), torch.randn(48).bfloat16()
    monkeypatch.setattr(lin, "native_bf16", lambda: False)
    assert torch.equal(lin.linear(x, w, bias=b), F.linear(x.float(), w.float(), b.float()).bfloat16())
    # A large weight (an LM head) at a few rows: converting it costs more than the emulated GEMM saves.
    big = torch.randn(lin.FLOAT32_GEMM_MAX_WEIGHT // 64 + 1, 64).bfloat16()
    few, many = x[:16], torch.randn(lin.FLOAT32_GEMM_ROWS, 64).bfloat16()
    assert torch.equal(lin.linear(few, big), F.linear(few, big))
    assert torch.equal(lin.linear(many, big), F.linear(many.float(), big.float()).bfloat16())
