"""`tokenmill bench`'s own plumbing, without servers or models: strict --json output, flags checked
before anything runs, SIGTERM running the cleanup, and the figures' edge cases (nothing measured,
no interactive requests, a policy that completed nothing)."""

from __future__ import annotations

import json
import math
import os
import signal
import time
from types import SimpleNamespace

import pytest

from tokenmill.bench import check_json_path, jsonable, write_json
from tokenmill.cli import main


def _strict(text: str):
    """json.loads that refuses NaN and Infinity, as strict parsers (JavaScript, jq, Go) do."""
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(autouse=True)
def _no_gc_freeze(monkeypatch):
    monkeypatch.setenv("TOKENMILL_GC_FREEZE", "0")  # (main's bench would freeze the test process's heap)


# -- --json ------------------------------------------------------------------------------------------
def test_write_json_is_strict_at_every_level(tmp_path):
    from tokenmill.bench.serve_load import RequestResult, summarize

    obj = {"a": math.nan, "b": [math.inf, {"c": -math.inf, "d": (1.5, math.nan)}], "e": 2, "f": None}
    assert jsonable(obj) == {"a": None, "b": ["inf", {"c": "-inf", "d": [1.5, None]}], "e": 2, "f": None}
    path = tmp_path / "out.json"
    # every request failed: nothing measured (NaN percentiles), an unlimited rate (inf)
    s = summarize([RequestResult(error="boom")] * 2, 1.0, {}, math.inf)
    s["offered_rate"] = math.inf
    write_json(str(path), [s])
    back = _strict(path.read_text())[0]
    assert back["ttft_ms"] == {"mean": None, "median": None, "p90": None, "p99": None}
    assert back["request_rate"] == back["offered_rate"] == "inf" and back["failed"] == 2


def test_json_path_is_checked_before_the_run(tmp_path, capsys):
    with pytest.raises(ValueError, match="--json: cannot write"):
        check_json_path(str(tmp_path))
    with pytest.raises(ValueError, match="--json: cannot write .*No such file"):
        check_json_path(str(tmp_path / "missing" / "x.json"))
    keep = tmp_path / "old.json"
    keep.write_text("[1]")
    check_json_path(str(keep))
    assert keep.read_text() == "[1]"  # not truncated
    check_json_path(str(tmp_path / "new.json"))
    assert not (tmp_path / "new.json").exists()  # no empty file left behind
    # Through the command line: a one-line error, exit 2, before the model is even looked for.
    assert main(["bench", "latency", "--model", str(tmp_path / "nomodel"), "--json", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --json: cannot write") and err.count("\n") == 1


# -- flags checked before anything loads -------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["throughput", "--num-prompts", "0"], "--num-prompts must be >= 1"),
    (["throughput", "--decode-tokens", "1"], "--decode-tokens must be >= 2"),
    (["throughput", "--dtype", "foo"], "--dtype: 'foo' is not a floating-point torch dtype"),
    (["throughput", "--hf-batch-sizes", "-2"], "--hf-batch-sizes: every value must be >= 1, got -2"),
    (["throughput", "--hf-batch-sizes", "0,8"], "--hf-batch-sizes: every value must be >= 1, got 0"),
    (["throughput", "--hf-batch-sizes", "x"], "--hf-batch-sizes: expected comma-separated integers"),
    (["throughput", "--input-len", "8", "4"], "--input-len: MAX (4) is below MIN (8)"),
    (["latency", "--model", "m", "--decode-tokens", "1"], "--decode-tokens must be >= 2"),
    (["latency", "--model", "m", "--repeats", "0"], "--repeats must be >= 1"),
    (["spec-decode", "--max-tokens", "1"], "--max-tokens must be >= 2"),
    (["spec-decode", "--num-prompts", "0"], "--num-prompts must be >= 1"),
    (["structured", "--steps", "0"], "--steps must be >= 1"),
    (["structured", "--rounds", "0"], "--rounds must be >= 1"),
    (["attention", "--batch-sizes", "0"], "--batch-sizes: every value must be >= 1"),
    (["attention", "--context-lens", "0"], "--context-lens: every value must be >= 1"),
    (["attention", "--repeats", "0"], "--repeats must be >= 1"),
    (["slo", "--simulate", "--step-model", "0.01,0,0,0", "--capacity-requests", "0"],
     "--capacity-requests must be >= 1"),
    (["slo", "--interactive-share", "1.5"], "--interactive-share must be in [0, 1]"),
    (["slo", "--batch-len", "96"], "--batch-len: expected PROMPT,OUTPUT"),
    (["fleet", "--overhead-rounds", "0"], "--overhead-rounds must be >= 1"),
    (["fleet", "--parts", "kv", "--num-prompts", "0"], "--num-prompts must be >= 1"),
    (["server-overhead", "--concurrency", "0"], "--concurrency must be >= 1"),
    (["prefix-cache", "--num-prompts", "0"], "--num-prompts must be >= 1"),
    (["serve", "--random-output-len", "0"], "--random-output-len must be >= 1"),
    (["serve", "--dataset", "file", "--dataset-path", "/"], "--dataset-path: cannot read /"),
])
def test_bad_counts_are_one_line_errors(argv, message, capsys):
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_empty_prompt_file_and_bad_dataset_lines(tmp_path, capsys):
    from tokenmill.bench.datasets import file_requests

    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert main(["bench", "spec-decode", "--prompt-file", str(empty)]) == 2
    assert "--prompt-file: no prompts in" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "output_len": 4, "prompt_len": [3]}\n')
    with pytest.raises(ValueError, match="line 1 of .*prompt_len"):
        file_requests(str(bad))
    with pytest.raises(ValueError, match="--dataset-path: cannot read"):
        file_requests(str(tmp_path))


# -- SIGTERM -------------------------------------------------------------------------------------------
def test_sigterm_runs_the_cleanup():
    from tokenmill.cli import _sigterm_exits

    before = signal.getsignal(signal.SIGTERM)
    cleaned = []
    with pytest.raises(SystemExit) as e:
        with _sigterm_exits():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(100):  # (the handler runs at the next bytecode)
                    time.sleep(0.01)
            finally:
                cleaned.append(True)
    assert e.value.code == 128 + signal.SIGTERM and cleaned == [True]
    assert signal.getsignal(signal.SIGTERM) == before


# -- figures with nothing in them ----------------------------------------------------------------------
def test_reports_print_n_a_for_missing_figures():
    from tokenmill.bench import fleet, slo
    from tokenmill.bench.slo_sim import Workload, format_simulation, simulate

    sim = simulate((0.01, 0.0001, 0.0001, 0.00001), Workload(interactive_share=0.0), duration=3.0,
                   capacity_requests=4)
    assert sim["fcfs"]["interactive_attainment"] is None
    assert "n/a" in format_simulation(sim)
    with pytest.raises(ValueError, match="capacity_requests"):
        simulate((0.01, 0.0001, 0.0001, 0.00001), Workload(), capacity_requests=0)

    none = {"interactive_attainment": None, "interactive_met": 0, "interactive_requests": 0,
            "interactive_ttft_ms": {}, "interactive_tpot_ms": {}, "batch_output_tokens_per_s": 1.0,
            "batch_requests_finished": 1, "batch_requests_sent": 1}
    report = slo.format_report({"offered_requests_per_s": 1.0, "args": {"load": 2.0, "target_factor": 3.0},
                                "capacity": {"requests_per_s": 0.5}, "targets": {"ttft_ms": 1.0, "tpot_ms": 1.0},
                                "fcfs": none, "slo": none})
    assert "n/a" in report

    # bench fleet: a policy whose run completed nothing (percentile_summary gives {})
    ok = {"ttft_ms": {"p50": 10.0, "p90": 20.0}, "request_throughput": 2.0, "output_throughput": 9.0,
          "replica_hit_rate": [0.5, None]}
    failed = {"ttft_ms": {}, "request_throughput": 0.0, "output_throughput": 0.0, "replica_hit_rate": [None, None]}
    kv = {"round_robin": failed, "kv_aware": ok,
          "ttft_p50_ratio_rr_over_kv": fleet._ratio(None, 10.0),
          "throughput_ratio_kv_over_rr": fleet._ratio(2.0, 0.0)}
    assert kv["ttft_p50_ratio_rr_over_kv"] is None and kv["throughput_ratio_kv_over_rr"] is None
    assert "n/a" in fleet.format_report({"kv": kv})


# -- bench latency against llama-bench -----------------------------------------------------------------
def test_latency_ratio_uses_the_mean_step(monkeypatch, capsys):
    from tokenmill.bench import latency

    ours = {"prefill_s": 0.5, "prefill_tok_s": 1000.0, "decode_tok_s": 100.0, "decode_step_ms": 10.0,
            "decode_mean_tok_s": 80.0, "decode_mean_step_ms": 12.5, "bytes_per_token": 10**8,
            "bandwidth_gb_s": 10.0, "weight_bytes_per_token": 10**8, "weight_bandwidth_gb_s": 10.0,
            "weight_bytes": 10**8}
    monkeypatch.setattr(latency, "copy_bandwidth", lambda device: 2e10)
    monkeypatch.setattr(latency, "read_bandwidth", lambda device: 4e10)
    monkeypatch.setattr(latency, "_tokenmill", lambda args: dict(ours))
    monkeypatch.setattr(latency, "_llama_bench", lambda args: {"prefill_tok_s": 500.0, "prefill_s": 1.0,
                                                               "decode_tok_s": 40.0, "type": "llama"})
    args = SimpleNamespace(llama_bench="llama-bench", gguf="m.gguf", device="cpu", prompt_len=512, decode_tokens=128,
                           repeats=1, threads=None, dtype="float32", quantization=None, json=None)
    res = latency.run(args)
    assert res["ratio"]["decode"] == 2.0  # 80 (tokenmill's mean step) / 40 (llama-bench's average)
    assert res["ratio"]["decode_median_step"] == 2.5 and res["ratio"]["prefill"] == 2.0
    assert "decode 2.00x (tokenmill's mean step" in capsys.readouterr().out
