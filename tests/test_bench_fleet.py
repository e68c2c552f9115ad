"""`tokenmill bench fleet` end to end at a tiny size: real replicas and routers; the failover part
kills a replica under 12 concurrent streams, and none may fail or differ from the undisturbed run."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.server_utils import ROOT


def test_bench_fleet_small(model_dir, tmp_path):
    # The kill comes early (15% of the tokens): a tiny model's replica may otherwise have generated all its
    # streams' tokens into the router's buffers before it dies, and nothing would move.
    out = tmp_path / "fleet.json"
    cmd = [sys.executable, "-m", "tokenmill.cli", "bench", "fleet", "--model", model_dir, "--parts", "kv,failover",
           "--num-prompts", "16", "--num-prefixes", "4", "--prefix-len", "96", "--question-len", "8",
           "--output-len", "4", "--max-concurrency", "4", "--max-model-len", "256", "--failover-requests", "12",
           "--failover-output-len", "48", "--kill-at", "0.15", "--json", str(out), "--log-dir", str(tmp_path / "logs")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "TTFT p50 round_robin / kv_aware" in r.stdout and "failover: 0 failed of 12" in r.stdout
    d = json.loads(out.read_text())
    for policy in ("round_robin", "kv_aware"):
        s = d["kv"][policy]
        assert s["completed"] == 16 and len(s["replica_hit_rate"]) == 2
    f = d["failover"]
    assert f["with_kill"]["failed"] == 0 and f["identical_outputs"] == 12
    assert f["missing_tokens"] == f["extra_tokens"] == 0 and f["moved_requests"] >= 1
