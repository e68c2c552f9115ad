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
