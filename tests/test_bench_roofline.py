"""The machine limits benchmarks compare with (tokenmill/bench/roofline.py), and `bench latency`
and `bench throughput` setting their figures beside them: achieved bandwidth and MFU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.server_utils import ROOT
from tokenmill.bench.datasets import token_id_requests
from tokenmill.bench.roofline import copy_bandwidth, matmul_flops, read_bandwidth


def test_limits_are_measured_on_the_cpu():
    for bw in (copy_bandwidth("cpu", nbytes=64 * 2**20, repeats=2), read_bandwidth("cpu", nbytes=64 * 2**20,
                                                                                   repeats=2)):
        assert 1e8 < bw < 1e13  # 0.1 GB/s .. 10 TB/s: bytes per second, not bits or GB
    assert 1e7 < matmul_flops("cpu", n=256, repeats=2) < 1e15


def _bench(args: list[str], tmp_path) -> dict:
    out = tmp_path / "out.json"
    r = subprocess.run([sys.executable, "-m", "tokenmill.cli", "bench", *args, "--json", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return {"stdout": r.stdout, **json.loads(out.read_text())}


def test_bench_throughput_compares_with_transformers_on_the_same_requests(model_dir, tmp_path):
    """Every transformers batch size runs the same requests (here 3 of the 6, spread over them), and
    the ratio is tokenmill's throughput on those same requests, not on the whole workload."""
    d = _bench(["throughput", "--model", model_dir, "--num-prompts", "6", "--input-len", "8", "20",
                "--output-len", "2", "6", "--hf-batch-sizes", "1,2", "--hf-max-requests", "3", "--decode-tokens", "2",
                "--max-num-seqs", "4"], tmp_path)
    equal = d["tokenmill_on_transformers_requests"]
    assert d["transformers_requests"] == 3 and d["num_prompts"] == 6
    assert d["transformers_bs1"]["output_tokens"] == d["transformers_bs2"]["output_tokens"] == equal["output_tokens"]
    assert d["tokenmill"]["output_tokens"] > equal["output_tokens"]
    assert d["ratio"] == equal["output_tok_s"] / d["transformers_best"]["output_tok_s"]
    assert d["args"]["hf_max_requests"] == 3


def test_bench_throughput_reports_mfu_from_the_model_flops_of_its_run(model_dir, tmp_path):
    n, lin, lout = 6, (20, 60), (4, 12)
    d = _bench(["throughput", "--model", model_dir, "--num-prompts", str(n), "--input-len", *map(str, lin),
                "--output-len", *map(str, lout), "--hf-batch-sizes", "", "--decode-tokens", "4",
                "--max-num-seqs", "4", "--peak-tflops", "2", "--async-ab", "1", "--ab-top-p", "0.9"], tmp_path)
    tm = d["tokenmill"]
    ab = d["async_ab"]  # (on a CPU nothing overlaps: the A/B only has to run both ways)
    assert d["async_scheduling"] is False and len(ab["on_tok_s"]) == len(ab["off_tok_s"]) == 1
    assert "async scheduling: on" in d["stdout"]
    assert d["async_ab_top_p"]["sampling"] == {"temperature": 1.0, "top_p": 0.9}
    assert "async scheduling (temperature 1, top_p 0.9): on" in d["stdout"]
    assert tm["preemptions"] == 0
    assert tm["device_wait_s"] is None  # (reported under async scheduling on a GPU only)
    # Every prompt token and every generated token but the last goes through the model once; every
    # generated token is one row through the LM head; attention over a sequence of L tokens is L^2/2
    # pairs whatever the chunking.
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    h, layers, heads = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or h // heads
    kvh = cfg.get("num_key_value_heads") or heads
    per_token = 2 * layers * (h * heads * hd + 2 * h * kvh * hd + heads * hd * h + 3 * h * cfg["intermediate_size"])
    want = 0.0
    for r in token_id_requests(n, lin, lout, cfg["vocab_size"], 0):
        fed = len(r.prompt) + r.output_len - 1
        want += per_token * fed + 4 * heads * hd * layers * fed * fed / 2 + 2 * h * cfg["vocab_size"] * r.output_len
    assert abs(tm["flops"] - want) <= 1e-6 * want, (tm["flops"], want)
    assert abs(tm["flops_per_s"] - tm["flops"] / tm["seconds"]) <= 1e-9 * tm["flops_per_s"]
    assert abs(tm["mfu"] - tm["flops_per_s"] / (d["matmul_tflops"] * 1e12)) <= 1e-9 * tm["mfu"]
    assert abs(tm["mfu_of_spec_peak"] - tm["flops_per_s"] / 2e12) <= 1e-9 * tm["mfu_of_spec_peak"]
    assert abs(tm["of_copy_bandwidth"] - d["weight_bytes"] * tm["steps_per_s"] / (d["copy_bandwidth_gb_s"] * 1e9)) \
        <= 1e-9 * tm["of_copy_bandwidth"]
    assert "MFU" in d["stdout"] and "of copy bandwidth" in d["stdout"]


def test_bench_latency_sets_decode_bandwidth_beside_the_measured_copy_bandwidth(model_dir, tmp_path):
    d = _bench(["latency", "--model", model_dir, "--prompt-len", "32", "--decode-tokens", "8", "--repeats", "1"],
               tmp_path)
    tm = d["tokenmill"]
    assert abs(tm["bandwidth_gb_s"] - tm["bytes_per_token"] / (tm["decode_step_ms"] / 1e3) / 1e9) \
        <= 1e-9 * tm["bandwidth_gb_s"]
    assert abs(tm["of_copy_bandwidth"] - tm["bandwidth_gb_s"] / d["copy_bandwidth_gb_s"]) <= 1e-9
    assert abs(tm["of_read_bandwidth"] - tm["bandwidth_gb_s"] / d["read_bandwidth_gb_s"]) <= 1e-9
    assert "of copy bandwidth" in d["stdout"]


def test_bench_attention_times_backends_and_tilings_against_the_read_bandwidth(tmp_path):
    """bench attention on the CPU with Triton's interpreter: the torch baseline and each tiling of
    the triton backend, with their bytes over time and their agreement with the baseline; the
    small case rotates over copies of its KV cache (3 of 60 KiB for --rotate-mib 0.15)."""
    import os

    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = tmp_path / "att.json"
    r = subprocess.run([sys.executable, "-m", "tokenmill.cli", "bench", "attention", "--shape", "smollm-135m",
                        "--dtype", "float32", "--device", "cpu", "--batch-sizes", "1,3", "--context-lens", "40",
                        "--tilings", "32x4,64x8", "--repeats", "1", "--rotate-mib", "0.15", "--json", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    d = json.loads(out.read_text())
    assert [(x["batch"], x["backend"], x["tiling"]) for x in d["rows"]] == [
        (b, name, t) for b in (1, 3) for name, t in [("torch", None), ("triton", "32x4"), ("triton", "64x8")]]
    for x in d["rows"]:
        # 3 KV heads x 64 x 2 (K and V) x 4 bytes per token of context, over the time
        kv = x["batch"] * 40 * 3 * 64 * 2 * 4
        assert x["gb_s"] == pytest.approx(kv / (x["microseconds"] * 1e-6) / 1e9, rel=1e-6)
        assert x["fraction_of_read_bw"] == pytest.approx(x["gb_s"] / d["read_bandwidth_gb_s"], rel=1e-6)
        assert x["max_abs_diff"] < 1e-4
        assert x["copies"] == {1: 3, 3: 1}[x["batch"]]


def test_bench_attention_goes_on_after_a_case_runs_out_of_memory(tmp_path, monkeypatch):
    """A backend out of device memory on one case (the torch baseline's math attention at a large
    batch and context) is a row saying so; the other cases still run, and the JSON is written as
    rows come (a device session's time may end mid-run)."""
    import argparse

    from tokenmill.attention.torch_backend import TorchAttentionBackend
    from tokenmill.bench import attention

    forward = TorchAttentionBackend.forward

    def short_of_memory(self, q, *a, **k):
        if q.shape[0] == 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return forward(self, q, *a, **k)

    monkeypatch.setattr(TorchAttentionBackend, "forward", short_of_memory)
    p = argparse.ArgumentParser()
    attention.add_arguments(p)
    out = tmp_path / "att.json"
    args = p.parse_args(["--shape", "smollm-135m", "--dtype", "float32", "--device", "cpu", "--batch-sizes", "1,3,2",
                         "--context-lens", "40", "--repeats", "1", "--rotate-mib", "0", "--json", str(out)])
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # (the torch backend alone)
    res = attention.run(args)
    assert [(x["batch"], x.get("error")) for x in res["rows"]] == [(1, None), (3, "out of memory"), (2, None)]
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(res["rows"]))
