"""`tokenmill bench slo` end to end at a tiny size: a baseline, a capacity burst, then the same
overload against a fcfs and an slo server; every request is accounted for and the server's own
counters agree that targets were judged."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.server_utils import ROOT


def test_bench_slo_small(model_dir, tmp_path):
    out = tmp_path / "slo.json"
    cmd = [sys.executable, "-m", "tokenmill.cli", "bench", "slo", "--model", model_dir, "--duration", "8",
           "--baseline-requests", "3", "--capacity-requests", "12", "--interactive-len", "24,8",
           "--batch-len", "96,24", "--max-num-seqs", "4", "--json", str(out), "--log-dir", str(tmp_path / "logs")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "interactive attainment" in r.stdout and "batch throughput loss with slo" in r.stdout
    d = json.loads(out.read_text())
    assert d["targets"]["ttft_ms"] == 3 * d["baseline"]["ttft_p50_ms"]
    assert d["offered_requests_per_s"] == 2 * d["capacity"]["requests_per_s"]
    for policy in ("fcfs", "slo"):
        s = d[policy]
        assert s["errors"] == 0, s["first_error"]
        assert s["interactive_requests"] > 0 and 0 <= s["interactive_attainment"] <= 1
        assert s["batch_output_tokens_per_s"] > 0
        judged = sum(v for k, v in s["server_counters"].items() if k.startswith("tokenmill:slo_"))
        assert judged > 0, s["server_counters"]  # the server judged targets under both policies


def test_bench_slo_simulated(tmp_path):
    """--simulate with a given step-time model: no servers, the same phases on a simulated clock.
    With the defaults' workload and a step cost that makes the TPOT target loose, slo keeps the
    interactive requests within their targets where fcfs, at 2x its capacity, does not."""
    out = tmp_path / "sim.json"
    cmd = [sys.executable, "-m", "tokenmill.cli", "bench", "slo", "--simulate", "--duration", "30", "--target-factor",
           "5", "--json", str(out), "--step-model", "0.01,0.0002,0.0001,0.000002"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "simulated" in r.stdout and "batch throughput loss with slo" in r.stdout
    d = json.loads(out.read_text())
    assert d["offered_requests_per_s"] == 2 * d["capacity"]["requests_per_s"]
    assert abs(d["targets"]["ttft_ms"] - 5 * d["baseline"]["ttft_ms"]) < 0.01
    assert d["slo"]["interactive_attainment"] >= 0.95 > 0.5 > d["fcfs"]["interactive_attainment"]
    assert d["slo"]["batch_output_tokens_per_s"] > 0.5 * d["fcfs"]["batch_output_tokens_per_s"]
    bad = subprocess.run(cmd[:-2] + ["--step-model", "1,2"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "--step-model" in bad.stderr
