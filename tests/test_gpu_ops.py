"""The fused RMSNorm / RoPE / SiLU * up kernels for CUDA (tokenmill/gpu_ops.py, issue 16) against
the PyTorch ops they replace, which compute as Hugging Face does. On a machine without a GPU they
run under Triton's interpreter. Every product is rounded where PyTorch rounds it, so RoPE matches
exactly (bfloat16 only on a GPU: see TRUNCATES_BF16); RMSNorm sums its squares in another order
and SiLU takes its exponential from Triton's library, so they match within rounding."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from tokenmill import gpu_ops  # noqa: E402
from tokenmill.model.layers import _rotate_half  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Triton's interpreter casts float32 to bfloat16 by truncation (a GPU rounds to nearest even), so
# there bfloat16 results may differ from PyTorch's by a unit in the last place per rounding.
TRUNCATES_BF16 = os.environ.get("TRITON_INTERPRET") == "1"


def _same(got: torch.Tensor, want: torch.Tensor) -> None:
    if got.dtype == torch.bfloat16 and TRUNCATES_BF16:
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    else:
        assert torch.equal(got, want)


def _hf_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [64, 896, 1000, 4096])
def test_rms_norm(dtype, c):
    g = torch.Generator(device=DEVICE).manual_seed(c)
    base = torch.randn(7, c + 24, generator=g, device=DEVICE).to(dtype) * 3
    x = base[:, 8 : 8 + c]  # rows of a wider tensor: a stride that is not the row length
    w = (1 + 0.1 * torch.randn(c, generator=g, device=DEVICE)).to(dtype)
    got = gpu_ops.rms_norm(x, w, 1e-6)
    # (16 bits: the row's sum in another order can round the normalised value one unit in the
    # last place the other way, and its product with the weight after it)
    tol = {torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(got, _hf_rms_norm(x, w, 1e-6), atol=tol, rtol=tol)
    assert got.shape == (7, c) and gpu_ops.rms_norm(x[:0], w, 1e-6).shape == (0, c)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [64, 896, 4096])
def test_add_rms_norm(dtype, c):
    """The residual sum (exactly x + delta) and the norm of it, in one pass."""
    g = torch.Generator(device=DEVICE).manual_seed(c + 1)
    x, delta = (torch.randn(5, c, generator=g, device=DEVICE).to(dtype) for _ in range(2))
    w = (1 + 0.1 * torch.randn(c, generator=g, device=DEVICE)).to(dtype)
    total, normed = gpu_ops.add_rms_norm(x, delta, w, 1e-5)
    _same(total, x + delta)
    tol = {torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(normed, _hf_rms_norm(x + delta, w, 1e-5), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,d", [(4, 2, 64), (14, 2, 64), (8, 8, 128), (3, 1, 80)])
def test_rope_in_place_on_the_fused_projection(dtype, heads, kv_heads, d):
    """q and k rotated as one [T, heads + kv_heads, D] view of the qkv projection (the model's
    layout: rows strided by q, k and v together), exactly as the PyTorch ops do."""
    t = 5
    g = torch.Generator(device=DEVICE).manual_seed(d + heads)
    qkv = torch.randn(t, (heads + 2 * kv_heads) * d, generator=g, device=DEVICE).to(dtype)
    pos = torch.tensor([0, 3, 17, 500, 9000], device=DEVICE)
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, device=DEVICE).float() / d))
    freqs = pos[:, None].float() * inv[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos(), emb.sin()
    qk = qkv[:, : (heads + kv_heads) * d].view(t, heads + kv_heads, d)
    want = qk * cos.to(dtype)[:, None, :] + _rotate_half(qk) * sin.to(dtype)[:, None, :]
    v_before = qkv[:, (heads + kv_heads) * d :].clone()
    gpu_ops.rope_(qk, cos, sin)
    _same(qk, want)
    assert torch.equal(qkv[:, (heads + kv_heads) * d :], v_before)  # v untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,d", [(4, 2, 64), (8, 8, 128), (0, 2, 64)])
def test_rope_writes_keys_and_values_into_the_cache(dtype, heads, kv_heads, d):
    """RoPE with the cache write (model/layers.rope_and_cache): q and k rotated in place as alone,
    each token's rotated key heads and its value heads in the cache at its slot, nothing else
    touched. heads=0: keys alone (Qwen3 rotates its normed q and k apart)."""
    t, blocks, bs = 6, 5, 16
    g = torch.Generator(device=DEVICE).manual_seed(d + heads + kv_heads)
    qkv = torch.randn(t, (heads + 2 * kv_heads) * d, generator=g, device=DEVICE).to(dtype)
    x = qkv[:, : (heads + kv_heads) * d].view(t, heads + kv_heads, d)
    v = qkv[:, (heads + kv_heads) * d :].view(t, kv_heads, d)
    pos = torch.tensor([0, 3, 17, 500, 9000, 4], device=DEVICE)
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, device=DEVICE).float() / d))
    emb = torch.cat([pos[:, None].float() * inv[None, :]] * 2, dim=-1)
    cos, sin = emb.cos(), emb.sin()
    cache = torch.randn(2, blocks, bs, kv_heads, d, generator=g, device=DEVICE).to(dtype)
    slots = torch.tensor([3, 17, 79, 40, 0, 64], device=DEVICE)
    want_x = x.clone()
    gpu_ops.rope_(want_x, cos, sin)
    want_cache = cache.clone()
    want_cache[0].view(-1, kv_heads, d)[slots] = want_x[:, heads:]
    want_cache[1].view(-1, kv_heads, d)[slots] = v
    v_before = v.clone()
    gpu_ops.rope_(x, cos, sin, (v, cache[0], cache[1], slots), heads)
    assert torch.equal(x, want_x) and torch.equal(v, v_before)
    assert torch.equal(cache, want_cache)
    with pytest.raises(ValueError, match="cache"):
        gpu_ops.rope_(x, cos, sin, (v, cache[0].to(torch.float16), cache[1], slots), heads)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [128, 1000, 4864])
def test_silu_mul(dtype, inter):
    g = torch.Generator(device=DEVICE).manual_seed(inter)
    gate_up = (torch.randn(6, 2 * inter, generator=g, device=DEVICE) * 4).to(dtype)
    got = gpu_ops.silu_mul(gate_up)
    gate, up = gate_up.split(inter, dim=-1)
    tol = {torch.float32: 1e-6, torch.bfloat16: 2e-2, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(got, F.silu(gate) * up, atol=tol, rtol=tol)


def test_bad_shapes_are_refused():
    x = torch.zeros(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="rms_norm"):
        gpu_ops.rms_norm(x, torch.zeros(4, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="rope_"):
        gpu_ops.rope_(torch.zeros(2, 1, 8, device=DEVICE), torch.zeros(2, 4, device=DEVICE),
                      torch.zeros(2, 4, device=DEVICE))
    with pytest.raises(ValueError, match="silu_mul"):
        gpu_ops.silu_mul(torch.zeros(2, 7, device=DEVICE))
    with pytest.raises(ValueError, match="add_rms_norm"):
        gpu_ops.add_rms_norm(x, torch.zeros(2, 4, device=DEVICE), torch.zeros(8, device=DEVICE), 1e-6)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_the_model_through_the_fused_kernels_matches_pytorch_ops(tmp_path, monkeypatch, arch):
    """The whole model with its norms, RoPE and activation on the Triton kernels (as on CUDA)
    against PyTorch's ops alone: the same hidden states within float32 rounding, the same greedy
    tokens. The fused path also sums each residual inside the next norm (add_rms_norm). Qwen3
    adds per-head q/k norms and RoPE on separate q and k."""
    from tests.models import make_model
    from tokenmill import LLM, SamplingParams
    from tokenmill.model import layers, transformer

    path = make_model(str(tmp_path / arch), arch, tokenizer=False)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = [{"prompt_token_ids": [5, 9, 200, 31, 7]}, {"prompt_token_ids": list(range(3, 40))}]
    outs = {}
    originals = {name: getattr(gpu_ops, name) for name in ("rope_", "add_rms_norm")}
    for fused in (False, True):
        # (the layers' choice of kernels; the matmuls and attention are the same in both runs)
        for mod in (layers, transformer):
            monkeypatch.setattr(mod, "elementwise_ops", (lambda x: gpu_ops) if fused else (lambda x: None))
        calls = []
        for name, f in originals.items():
            monkeypatch.setattr(gpu_ops, name, _counting(f, name, calls))
        llm = LLM(path, attention_backend="torch", dtype="float32", device=DEVICE.type,
                  kv_cache_memory_bytes=4 * 2**20)
        model, runner = llm.engine.runner.model, llm.engine.runner
        g = torch.Generator(device=DEVICE).manual_seed(0)
        for m in model.modules():  # norms of their own (a random checkpoint's are all ones)
            if isinstance(m, layers.RMSNorm):
                m.weight.data = 1 + 0.3 * torch.randn(m.weight.shape, generator=g, device=DEVICE)
        ids, pos, meta = runner_batch(runner, prompts[1]["prompt_token_ids"])
        with torch.inference_mode():
            hidden = model(ids, pos, runner.kv_caches, meta)
        outs[fused] = (hidden, [o.outputs[0].token_ids for o in llm.generate(prompts, params)])
        assert set(calls) == ({"rope_", "add_rms_norm"} if fused else set())
    torch.testing.assert_close(outs[True][0], outs[False][0], atol=1e-5, rtol=1e-5)
    assert outs[True][1] == outs[False][1]


def _counting(f, name: str, calls: list):
    def counted(*args):
        calls.append(name)
        return f(*args)
    return counted


def runner_batch(runner, tokens: list[int]):
    from tokenmill.engine.model_runner import build_batch

    blocks = -(-len(tokens) // runner.block_size)
    return build_batch([(tokens, 0, list(range(blocks)))], runner.block_size, runner.device)


def test_kernels_that_fail_on_the_device_fall_back_to_pytorch_ops(monkeypatch, caplog):
    """Tried once per device and dtype: where Triton cannot compile or launch them, the model runs
    PyTorch's ops (with a warning) instead of failing to start."""
    import types

    from tokenmill import kernels

    monkeypatch.setattr(kernels, "_gpu_checked", {})
    x = torch.zeros(2, 16, device=DEVICE)
    assert kernels._gpu_ops_work(gpu_ops, x)

    def broken(*a):
        raise RuntimeError("Failed to find C compiler")

    fake = types.SimpleNamespace(rms_norm=broken)
    assert not kernels._gpu_ops_work(fake, x.half())
    assert "fail" in caplog.text and "Failed to find C compiler" in caplog.text
    assert kernels._gpu_checked == {(x.device, torch.float32): True, (x.device, torch.float16): False}
