"""The Triton kernels (attention; the fused RMSNorm, RoPE, SiLU * up; the sampler's) compiled for an H100/H200
(sm_90) with no GPU here (issue 16).

Under Triton's interpreter a kernel that spills registers passes every test; on the GPU it runs
slowly. tokenmill/attention/triton_aot.py compiles the launches the backend makes, with its
arguments specialised as Triton's JIT would, and reads ptxas's report. It runs in a subprocess:
the other kernel tests set TRITON_INTERPRET=1, under which kernels cannot be compiled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia.compiler")

SMEM_PER_BLOCK = 227 * 1024  # the most shared memory one block may use on sm_90


def _report(*args: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "tokenmill.attention.triton_aot", "--json", *args],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.stdout.strip(), proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_kernels_compile_for_sm90_without_spills():
    rows = _report("--shape", "llama3-8b", "--shape", "qwen2.5-0.5b")
    kernels = {(r["shape"], r["dtype"], r["kernel"]) for r in rows}
    # every shape, dtype and kernel compiled (4 attention, 5 elementwise), and the sampler's kernel once
    assert len(kernels) == 2 * 3 * 9 + 1
    for r in rows:
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert 0 < r["registers"] <= 255 and r["shared_bytes"] <= SMEM_PER_BLOCK, r


def test_the_report_sees_spills():
    """A tiling too large for the registers (128 float32 keys on 4 warps at head size 128) is reported."""
    rows = _report("--shape", "llama3-8b", "--dtype", "float32", "--decode-tiling", "128x4")
    decode = [r for r in rows if r["kernel"].startswith("paged_decode")]
    assert decode and all(r["spill_stores"] > 0 for r in decode), decode
