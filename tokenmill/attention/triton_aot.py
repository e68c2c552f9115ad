"""Compile the Triton kernels for a GPU ahead of time, with no GPU here (issue 16): attention,
gpu_ops' fused RMSNorm, RoPE and SiLU * up, and the sampler's kernel for wide nuclei.

A kernel that spills registers to local memory runs slowly on the GPU but passes every test under
Triton's interpreter, which compiles nothing. This module compiles the launches the `triton`
backend makes (`KernelLaunch`: the same arguments, constexprs and warps) for a CUDA target
(sm_90: H100/H200) with Triton's own compiler and the ptxas bundled in its wheel, then reads
registers, spilled bytes and shared memory from ptxas's report. Argument specialisation follows
Triton's JIT: an integer equal to 1 becomes a constant, integers and tensor addresses divisible by
16 get the divisibility hint, except the parameters marked do_not_specialize.

    python -m tokenmill.attention.triton_aot [--arch 90] [--json]

prints one line per kernel and model shape; tests/test_triton_compile.py asserts no spills. It
runs in a process of its own: Triton's interpreter (TRITON_INTERPRET=1, which the CPU tests set)
makes kernels that cannot be compiled.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

import torch

# (name, query heads, KV heads, head size) of the model families tokenmill serves.
SHAPES = [
    ("llama3-8b", 32, 8, 128),
    ("qwen2.5-0.5b", 14, 2, 64),
    ("qwen2.5-7b", 28, 4, 128),
    ("llama2-7b (MHA)", 32, 32, 128),
]
# Their MLPs' intermediate sizes (silu_mul's rows).
INTERMEDIATE = {"llama3-8b": 14336, "qwen2.5-0.5b": 4864, "qwen2.5-7b": 18944, "llama2-7b (MHA)": 11008}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64",
          torch.int32: "i32", torch.float64: "fp64", torch.uint8: "u8"}


@dataclass
class KernelResources:
    kernel: str
    shape: str
    dtype: str
    num_warps: int
    registers: int
    spill_stores: int  # bytes a thread spills to local memory
    spill_loads: int
    shared_bytes: int


def _signature(launch) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for triton.compile, from the launch's values as the JIT sees them."""
    fn = launch.kernel
    names = fn.arg_names
    marked = fn.kwargs.get("do_not_specialize") if hasattr(fn, "kwargs") else fn.do_not_specialize  # (interpreted)
    dns = {names[i] if isinstance(i, int) else i for i in marked or ()}
    sig: dict[str, str] = {}
    consts = dict(launch.constants)
    attrs: dict[tuple[int, ...], list] = {}
    for i, (name, value) in enumerate(zip(names, launch.args)):
        if isinstance(value, torch.Tensor):
            sig[name] = "*" + _TYPES[value.dtype]
            if value.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            sig[name] = "fp32"
        elif isinstance(value, int):
            sig[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if name not in dns and value == 1:
                consts[name] = 1
            elif name not in dns and value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            raise TypeError(f"{fn.__name__}: argument {name} of type {type(value).__name__}")
    for name in consts:
        sig[name] = "constexpr"
    return {n: sig[n] for n in names}, consts, attrs


def compile_launch(launch, arch: int = 90) -> tuple[int, int, int, int]:
    """(registers, spill store bytes, spill load bytes, shared bytes) of the launch's kernel compiled
    for sm_<arch>."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    sig, consts, attrs = _signature(launch)
    compiled = triton.compile(ASTSource(launch.kernel, sig, consts, attrs), target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": launch.num_warps, **launch.options})
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as d:
        ptx = os.path.join(d, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        report = subprocess.run([get_ptxas(arch).path, f"-arch=sm_{arch}{suffix}", "-v", ptx, "-o",
                                 os.path.join(d, "k.cubin")], capture_output=True, text=True, check=True).stderr
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    regs = re.search(r"Used (\d+) registers", report)
    if spills is None or regs is None:
        raise RuntimeError(f"unexpected ptxas report:\n{report}")
    return int(regs[1]), int(spills[1]), int(spills[2]), compiled.metadata.shared


def backend_launches(heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, block_size: int = 16
                     ) -> list[tuple[str, object]]:
    """(label, launch) for every kernel the backend launches for a model of this shape: paged_decode
    with one split and with 16 (and the combine), and the prefill kernel. On small CPU tensors: only
    their dtypes, strides and alignment matter."""
    from tokenmill.attention.triton_backend import TritonAttentionBackend
    from tokenmill.engine.model_runner import build_batch

    backend = TritonAttentionBackend(heads, kv_heads, head_dim, head_dim**-0.5)
    num_blocks = 8
    chunks = [([0], 40, [1, 2, 3]), ([0] * 20, 0, [4, 5])]
    _, _, meta = build_batch(chunks, block_size, torch.device("cpu"))
    q = torch.zeros(meta.num_tokens, heads, head_dim, dtype=dtype)
    cache = torch.zeros(2, num_blocks, block_size, kv_heads, head_dim, dtype=dtype)
    out = torch.empty_like(q)
    k_cache, v_cache = cache[0], cache[1]
    one = backend.decode_launches(q, k_cache, v_cache, out, meta, 1, None, splits=1)
    split = backend.decode_launches(q, k_cache, v_cache, out, meta, 1, None, splits=backend.MAX_SPLITS)
    prefill = backend.prefill_launch(q, k_cache, v_cache, out, meta, 1, 1, 20, None)
    return [("paged_decode", one[0]), (f"paged_decode/{backend.MAX_SPLITS} splits", split[0]),
            ("combine_splits", split[1]), ("paged_attention", prefill)]


def elementwise_launches(heads: int, kv_heads: int, head_dim: int, intermediate: int, dtype: torch.dtype
                         ) -> list[tuple[str, object]]:
    """(label, launch) of gpu_ops' kernels at a model's shape: RMSNorm over the hidden size, alone
    and after the residual sum, RoPE on q and k as one view of the qkv projection (alone, and
    writing k and v into a KV cache), SiLU * up."""
    from tokenmill import gpu_ops

    hidden, t = heads * head_dim, 3
    x = torch.zeros(t, hidden, dtype=dtype)
    qkv = torch.zeros(t, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
    qk = qkv[:, : (heads + kv_heads) * head_dim].view(t, heads + kv_heads, head_dim)
    cos = torch.zeros(t, head_dim)
    v = qkv[:, (heads + kv_heads) * head_dim :].view(t, kv_heads, head_dim)
    cache = torch.zeros(2, 4, 16, kv_heads, head_dim, dtype=dtype)
    slots = torch.zeros(t, dtype=torch.long)
    gate_up = torch.zeros(t, 2 * intermediate, dtype=dtype)
    w = torch.ones(hidden, dtype=dtype)
    return [("rms_norm", gpu_ops.rms_norm_launch(x, w, 1e-6, torch.empty_like(x))),
            ("add_rms_norm", gpu_ops.add_rms_norm_launch(x, x.clone(), w, 1e-6, torch.empty_like(x),
                                                         torch.empty_like(x))),
            ("rope", gpu_ops.rope_launch(qk, cos, cos.clone())),
            ("rope_cache", gpu_ops.rope_launch(qk, cos, cos.clone(), (v, cache[0], cache[1], slots), heads)),
            ("silu_mul", gpu_ops.silu_mul_launch(gate_up, torch.empty(t, intermediate, dtype=dtype)))]


def report(arch: int = 90, shapes: list[tuple[str, int, int, int]] | None = None,
           dtypes: list[str] | None = None) -> list[KernelResources]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("triton_aot: unset TRITON_INTERPRET (interpreted kernels do not compile)")
    rows = []
    for name, heads, kv_heads, head_dim in shapes or SHAPES:
        for dt in dtypes or list(DTYPES):
            launches = backend_launches(heads, kv_heads, head_dim, DTYPES[dt]) + elementwise_launches(
                heads, kv_heads, head_dim, INTERMEDIATE[name], DTYPES[dt])
            for label, launch in launches:
                regs, stores, loads, shared = compile_launch(launch, arch)
                rows.append(KernelResources(label, name, dt, launch.num_warps, regs, stores, loads, shared))
    launch = sampler_launch()  # (float32 logits, whatever the model's dtype)
    regs, stores, loads, shared = compile_launch(launch, arch)
    rows.append(KernelResources("wide_sample", "vocab 152064", "float32", launch.num_warps, regs, stores, loads,
                                shared))
    return rows


def sampler_launch(vocab: int = 152064, rows: int = 256):
    """The sampler's kernel for rows whose kept tokens reach past the candidates (sample/triton_sample.py)."""
    from tokenmill.sample.triton_sample import example_launch

    return example_launch(vocab, rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10 (90: H100/H200)")
    ap.add_argument("--shape", action="append", help="only these shapes (names from SHAPES)")
    ap.add_argument("--dtype", action="append", choices=list(DTYPES))
    ap.add_argument("--decode-tiling", metavar="KEYSxWARPS", help="paged_decode's tiling for every dtype "
                    "instead of the backend's (e.g. 32x8)")
    ap.add_argument("--json", action="store_true", help="one JSON list on stdout")
    args = ap.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # (Triton 3.9 warns when it is unset)
    if args.decode_tiling:
        from tokenmill.attention.triton_backend import DecodeTiling, TritonAttentionBackend

        TritonAttentionBackend.DECODE_16BIT = TritonAttentionBackend.DECODE_FLOAT32 = DecodeTiling.parse(
            args.decode_tiling)
    shapes = [s for s in SHAPES if args.shape is None or s[0] in args.shape]
    rows = report(args.arch, shapes, args.dtype)
    if args.json:
        print(json.dumps([asdict(r) for r in rows]))
    else:
        import triton

        print(f"triton {triton.__version__}, sm_{args.arch}")
        for r in rows:
            print(f"{r.shape:16} {r.dtype:9} {r.kernel:26} warps {r.num_warps}  registers {r.registers:3}  "
                  f"spills {r.spill_stores}/{r.spill_loads} B  shared {r.shared_bytes} B")
    return 1 if any(r.spill_stores for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
