"""The fleet simulator (bench/disagg_sim.py) and `tokenmill bench disagg`.

A single request's simulated latencies equal the step-time model's arithmetic, step by step, for
a colocated replica and through a prefill worker (its chunks, the transfer, the decode worker's
last block); under load the layouts behave as their mechanics say; and the bench runs end to end
on real servers with a tiny model, its measured figures beside the prediction.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.server_utils import ROOT
from tokenmill.bench.disagg_sim import Layout, SimWorkload, TransferModel, simulate_fleet
from tokenmill.engine.slo import SLOTarget

COEF = (0.02, 0.0004, 0.0002, 0.000002)
MNBT = 512


def _step(new: int, context: int, sampled: bool) -> float:
    attn = new * (context + (new + 1) / 2) / 1024
    return COEF[0] + COEF[1] * new + COEF[2] * sampled + COEF[3] * attn


def _alone(layout: Layout, prompt: int, out: int, transfer: TransferModel) -> dict:
    wl = SimWorkload(prompt, out, 1.0, 1.0)
    return simulate_fleet(COEF, layout, wl, SLOTarget(), transfer, mnbt=MNBT, requests=[("x", prompt, out, 0.0)])


def test_layout_parse():
    assert Layout.parse("2") == Layout(2) and Layout.parse("1p3d") == Layout(3, 1)
    assert Layout.parse("2P1D:always") == Layout(1, 2, "always") and Layout(1, 2, "always").name == "2P+1D (always)"
    for bad in ("x", "1p", "2:always", "p1d"):
        with pytest.raises(ValueError):
            Layout.parse(bad)


def test_one_request_takes_the_step_models_time():
    transfer = TransferModel(0.005, 1e8, 4096, import_bytes_per_s=1e9)
    prompt, out = 1000, 5
    # Colocated: the prompt in two chunks (512, then 488 with its first token), then 4 decode steps.
    want_ttft = _step(512, 0, False) + _step(488, 512, True)
    want_tpot = sum(_step(1, prompt + k, True) for k in range(out - 1)) / (out - 1)
    got = _alone(Layout(1), prompt, out, transfer)
    assert got["ttft_ms"]["p50"] == pytest.approx(want_ttft * 1000, rel=1e-9)
    assert got["tpot_ms"]["p50"] == pytest.approx(want_tpot * 1000, rel=1e-9)
    # Through a prefill worker: its two chunks, the transfer of the prompt's KV, then the decode
    # worker writes the 62 blocks into its cache (the transfer's measured time includes that), then
    # computes only the last block's 8 tokens.
    want = want_ttft + transfer.seconds(prompt) + _step(8, 992, True)
    got = _alone(Layout(1, 1, "always"), prompt, out, transfer)
    assert got["remote_prefills"] == 1
    assert got["ttft_ms"]["p50"] == pytest.approx(want * 1000, rel=1e-9)
    assert got["tpot_ms"]["p50"] == pytest.approx(want_tpot * 1000, rel=1e-9)
    # auto: an idle decode worker prefills itself (the router's own rule)
    assert _alone(Layout(1, 1, "auto"), prompt, out, transfer)["remote_prefills"] == 0


def test_under_load_prefill_workers_keep_decodes_fast():
    transfer = TransferModel(0.005, 1e9, 4096)
    wl = SimWorkload(1024, 64, rate=2.0, duration=40.0, seed=1)
    slo = SLOTarget(3.0, 0.03)
    colo = simulate_fleet(COEF, Layout(2), wl, slo, transfer, mnbt=MNBT)
    disagg = simulate_fleet(COEF, Layout(1, 1, "always"), wl, slo, transfer, mnbt=MNBT)
    assert colo["requests"] == disagg["requests"] == len(wl.requests()) > 50
    assert colo["finished"] == disagg["finished"] == colo["requests"]
    assert disagg["remote_prefills"] == disagg["requests"]
    # Prefills no longer stall the decode worker's steps: its TPOT stays near one decode step's...
    assert disagg["tpot_ms"]["p90"] < 0.6 * colo["tpot_ms"]["p90"]
    # ...while one prefill worker does all the prompts two replicas shared: TTFT grows.
    assert disagg["ttft_ms"]["p50"] > colo["ttft_ms"]["p50"]
    # The same inputs give the same figures.
    assert simulate_fleet(COEF, Layout(2), wl, slo, transfer, mnbt=MNBT) == colo


def test_bench_disagg_runs_on_real_servers(model_dir, tmp_path):
    out = tmp_path / "disagg.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tokenmill.cli", "bench", "disagg", "--model", model_dir, "--layouts", "1",
         "--measure", "1p1d:always", "--rate", "4", "--duration", "3", "--prompt-len", "96", "--output-len", "6",
         "--step-model", ",".join(map(str, COEF)), "--transfer-latency-ms", "5", "--transfer-mbps", "500",
         "--kv-cache-memory", "0.02", "--disagg-min-tokens", "32", "--json", str(out),
         "--log-dir", str(tmp_path / "logs")],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "measured vs predicted" in proc.stdout
    res = json.loads(out.read_text())
    assert [s["layout"] for s in res["predicted"]] == ["1 colocated", "1P+1D (always)"]
    (m,) = res["measured"]
    assert m["layout"] == "1P+1D (always)" and m["errors"] == 0
    assert m["finished"] == m["requests"] == res["workload"]["requests"] > 0
    assert m["remote_prefills"] == m["requests"]  # every prompt (96 tokens >= the 32 asked) went remote
    assert m["transfers"] == m["requests"] and m["transfer_failures"] == 0  # and its KV moved
