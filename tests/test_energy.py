"""Energy, device time, FLOPs and cost per request (tokenmill/ops/energy.py): the meters (a fake
RAPL sysfs tree with a wraparound, a fake pynvml, the power model), the engine's attribution
(per-request shares add up to what was measured), and the server's usage.compute and metrics."""

from __future__ import annotations

import json
import os
import sys
import types

import pytest

from tokenmill import LLM, SamplingParams
from tokenmill.config import EngineConfig
from tokenmill.ops.energy import MeterUnavailable, ModelMeter, NvmlMeter, Prices, RaplMeter, open_meter

KEYS = {"device_seconds", "flops", "energy_joules", "cost_usd", "energy_source"}


# -- the fake powercap tree ----------------------------------------------------------------------------
def _zone(root, name: str, zone_name: str, value: int = 0, max_range: int | None = None) -> str:
    d = root / name
    d.mkdir()
    (d / "name").write_text(zone_name + "\n")
    (d / "energy_uj").write_text(f"{value:020d}\n")
    if max_range is not None:
        (d / "max_energy_range_uj").write_text(f"{max_range}\n")
    return str(d / "energy_uj")


def _bump(path: str, by: int, max_range: int) -> None:
    """Advances a fake counter in place (same inode, fixed width: the meter keeps the file open)."""
    with open(path, "r+") as f:
        v = int(f.read())
        f.seek(0)
        f.write(f"{(v + by) % max_range:020d}\n")


@pytest.fixture
def rapl_tree(tmp_path, monkeypatch):
    """Two packages (one with a 1 J range, so it wraps), a core subzone, psys, an mmio duplicate."""
    root = tmp_path / "powercap"
    root.mkdir()
    (root / "intel-rapl").mkdir()  # the control type: not a zone
    z = {"pkg0": _zone(root, "intel-rapl:0", "package-0", 999_000, 1_000_000),
         "pkg1": _zone(root, "intel-rapl:1", "package-1", 5, 2**40),
         "core": _zone(root, "intel-rapl:0:0", "core", 0, 2**40),
         "psys": _zone(root, "intel-rapl:2", "psys", 0, 2**40),
         "mmio": _zone(root, "intel-rapl-mmio:0", "package-0", 0, 2**40)}
    monkeypatch.setenv("TOKENMILL_RAPL_ROOT", str(root))
    return root, z


def test_rapl_reads_packages_only_and_unwraps(rapl_tree):
    root, z = rapl_tree
    m = RaplMeter(str(root))
    assert sorted(os.path.basename(os.path.dirname(x.path)) for x in m.zones) == ["intel-rapl:0", "intel-rapl:1"]
    assert m.read_joules() == 0.0
    for name, by in (("pkg0", 500), ("pkg1", 250_000), ("core", 999), ("psys", 10**6), ("mmio", 10**6)):
        _bump(z[name], by, 1_000_000 if name == "pkg0" else 2**40)
    # pkg0 went 999000 -> 999500; subzones, psys and the mmio copy are not counted again.
    assert m.read_joules() == pytest.approx(0.2505, abs=1e-12)
    _bump(z["pkg0"], 700_000, 1_000_000)  # 999500 -> 699500: the counter wrapped
    assert int(open(z["pkg0"]).read()) == 699_500
    assert m.read_joules() == pytest.approx(0.9505, abs=1e-12)
    _bump(z["pkg0"], 999_999, 1_000_000)  # almost a full turn: still read as a wrap, not a loss
    assert m.read_joules() == pytest.approx(1.950499, abs=1e-12)


def test_rapl_unreadable_is_a_clear_error(tmp_path, monkeypatch):
    root = tmp_path / "powercap"
    root.mkdir()
    d = root / "intel-rapl:0"
    d.mkdir()
    (d / "energy_uj").mkdir()  # unreadable as a counter (what a root-only file is to everyone else)
    with pytest.raises(MeterUnavailable, match="readable by root only"):
        RaplMeter(str(root))
    monkeypatch.setenv("TOKENMILL_RAPL_ROOT", str(root))
    with pytest.raises(ValueError, match="energy_source: rapl: nothing readable"):
        open_meter("rapl")
    assert open_meter("auto").source == "model"  # auto falls back on the power model
    monkeypatch.setenv("TOKENMILL_RAPL_ROOT", str(tmp_path / "absent"))
    with pytest.raises(ValueError, match="does not exist"):
        open_meter("rapl")


def test_nvml_meter_with_a_fake_pynvml(monkeypatch):
    counter = [12_345]
    fake = types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetHandleByUUID=lambda uuid: (_ for _ in ()).throw(RuntimeError("no such GPU")),
        nvmlDeviceGetHandleByIndex=lambda i: ("gpu", i),
        nvmlDeviceGetTotalEnergyConsumption=lambda h: counter[0] if h == ("gpu", 0) else 0)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    now = [0.0]
    calls = []
    energy = fake.nvmlDeviceGetTotalEnergyConsumption
    fake.nvmlDeviceGetTotalEnergyConsumption = lambda h: (calls.append(now[0]), energy(h))[1]
    m = NvmlMeter(0, clock=lambda: now[0])
    assert m.read_joules() == pytest.approx(12.345)
    counter[0] += 2_500  # mJ
    now[0] += m.update_period_s / 2 - 1e-4  # within half the counter's update period: no call, the last reading
    assert m.read_joules() == pytest.approx(12.345) and len(calls) == 2  # (the open's, the first read's)
    now[0] += 1e-4
    assert m.read_joules() == pytest.approx(14.845) and len(calls) == 3
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed
    with pytest.raises(MeterUnavailable, match="not installed"):
        NvmlMeter(0)
    with pytest.raises(ValueError, match="runs on the CPU"):
        open_meter("nvml", "cpu")


def test_power_model_meter():
    now, cpu = [100.0], [7.0]
    m = ModelMeter(idle_watts=3.0, busy_watts=5.0, cpu_clock=lambda: cpu[0], clock=lambda: now[0])
    assert m.read_joules() == 0.0
    now[0] += 2.0  # idle for 2 s
    assert m.read_joules() == pytest.approx(6.0)
    e0 = m.read_joules()
    now[0] += 0.5  # a 0.5 s step in which the process's threads ran 1.6 CPU seconds (4 threads, descheduled 20%)
    cpu[0] += 1.6
    m.note_busy(0.5)  # the CPU model counts what ran, not what the step was told
    assert m.read_joules() - e0 == pytest.approx(0.5 * 3.0 + 1.6 * 5.0)
    assert m.describe()["busy_watts_per_thread"] == 5.0
    gpu = ModelMeter(idle_watts=50.0, busy_watts=250.0, clock=lambda: now[0])
    now[0] += 1.0
    gpu.note_busy(0.25)  # a GPU is busy while a step runs
    assert gpu.read_joules() == pytest.approx(50.0 + 62.5) and gpu.unit == "gpu"


def test_config_is_checked():
    for kw, field in (({"pue": 0.9}, "pue"), ({"price_per_kwh": -1.0}, "price_per_kwh"),
                      ({"energy_source": "meter"}, "energy_source"), ({"power_watts": float("nan")}, "power_watts")):
        with pytest.raises(ValueError, match=field):
            EngineConfig(model="unused", **kw).validate()
    assert Prices(3.6, 0.5, 1.2).cost(10.0, 3.6e6) == pytest.approx(0.01 + 0.6)


def test_models_file_takes_per_model_prices(tmp_path, model_dir):
    from tokenmill.server.models_file import read_models_file

    f = tmp_path / "models.yaml"
    f.write_text(f"models:\n  - path: {model_dir}\n    price_per_device_hour: 2.5\n    pue: 1.3\n")
    (m,), _, _ = read_models_file(str(f), EngineConfig(model="", price_per_kwh=0.2))
    assert (m.config.price_per_device_hour, m.config.price_per_kwh, m.config.pue) == (2.5, 0.2, 1.3)
    f.write_text(f"models:\n  - path: {model_dir}\n    price_per_kwh: cheap\n")
    with pytest.raises(ValueError, match=r"models\[0\]\.price_per_kwh"):
        read_models_file(str(f), EngineConfig(model=""))


# -- the engine ----------------------------------------------------------------------------------------
def _prompt(i: int, n: int) -> dict:
    return {"prompt_token_ids": [(7 * i + 3 * j) % 500 + 3 for j in range(n)]}


def test_engine_attribution_adds_up_to_the_measured_total(model_dir):
    llm = LLM(model_dir, kv_cache_memory_bytes=8 * 2**20, max_num_batched_tokens=256, max_num_seqs=8, seed=0,
              enable_prefix_caching=False, price_per_device_hour=3.6, price_per_kwh=0.3, pue=1.2)
    acc = llm.engine.energy
    lens = [6, 300, 40, 150, 12, 90]
    params = [SamplingParams(max_tokens=8, ignore_eos=True, n=2 if n == 40 else 1, seed=i)
              for i, n in enumerate(lens)]
    outs = llm.generate([_prompt(i, n) for i, n in enumerate(lens)], params)
    tot = acc.totals()
    assert tot["steps"] > 0 and tot["step_joules"] > 0 and tot["energy_source"] in ("model", "rapl")
    for o in outs:
        assert set(o.compute) == KEYS and o.compute["energy_source"] == acc.source
        c = o.compute
        assert c["cost_usd"] == pytest.approx(c["device_seconds"] * 3.6 / 3600 + c["energy_joules"] * 1.2 / 3.6e6 * 0.3)
    # Every joule and second measured over the steps went to a request, and nothing else.
    assert sum(o.compute["energy_joules"] for o in outs) == pytest.approx(tot["step_joules"], rel=1e-9)
    assert sum(o.compute["device_seconds"] for o in outs) == pytest.approx(tot["step_seconds"], rel=1e-9)
    assert sum(o.compute["flops"] for o in outs) == tot["flops"]
    assert tot["attributed_joules"] == pytest.approx(tot["step_joules"], rel=1e-12)
    acc.reset()  # what a calibration's steps leave behind is forgotten; the requests keep their shares
    assert acc.totals()["step_joules"] == 0 and acc.totals()["steps"] == 0 and outs[0].compute["energy_joules"] > 0
    by_len = {len(o.prompt_token_ids): o.compute for o in outs}
    # Same outputs, in the same steps: the 300-token prompt carries far more of them than the 6-token one.
    assert by_len[300]["energy_joules"] > 2 * by_len[6]["energy_joules"]
    assert by_len[300]["device_seconds"] > 2 * by_len[6]["device_seconds"]
    assert by_len[300]["flops"] > 10 * by_len[6]["flops"]
    # n=2 sums both samples: the prompt once (its last row sampled for each), then two decodes a step.
    fm = acc.flop_model
    assert by_len[40]["flops"] == fm.chunk(40, 0, 2) + 2 * sum(fm.chunk(1, 40 + i, 1) for i in range(7))


def test_flops_follow_the_shape(model_dir):
    from tests.models import hf_model

    llm = LLM(model_dir, kv_cache_memory_bytes=8 * 2**20, seed=0, enable_prefix_caching=False)
    p, new = 40, 5
    out = llm.generate(_prompt(0, p), SamplingParams(max_tokens=new, ignore_eos=True, temperature=0))[0]
    hf = hf_model(model_dir)
    cfg = hf.config
    params = sum(t.numel() for n, t in hf.named_parameters() if t.dim() == 2 and "embed" not in n
                 and "lm_head" not in n)
    attn = 4 * cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads)
    head = 2 * cfg.hidden_size * cfg.vocab_size
    # The prefill chunk (its last row sampled), then new - 1 decodes at growing context.
    want = 2 * params * p + attn * p * p // 2 + head
    want += sum(2 * params + attn * (2 * (p + i) + 1) // 2 + head for i in range(new - 1))
    assert out.compute["flops"] == want


def test_rapl_through_the_engine_with_wraps_and_idle(model_dir, rapl_tree):
    _root, z = rapl_tree
    llm = LLM(model_dir, kv_cache_memory_bytes=8 * 2**20, max_num_batched_tokens=64, seed=0,
              energy_source="rapl", enable_prefix_caching=False)
    eng = llm.engine
    execute = eng.runner.execute
    per_step_uj = 300_000  # package 0 wraps every few steps (its range is 1 J)

    def metered(sched):
        result = execute(sched)
        _bump(z["pkg0"], per_step_uj, 1_000_000)
        return result

    eng.runner.execute = metered
    outs = llm.generate([_prompt(i, n) for i, n in enumerate((10, 100))],
                        SamplingParams(max_tokens=6, ignore_eos=True))
    tot = eng.energy.totals()
    assert tot["energy_source"] == "rapl" and all(o.compute["energy_source"] == "rapl" for o in outs)
    assert tot["step_joules"] == pytest.approx(tot["steps"] * 0.3, rel=1e-9)
    assert sum(o.compute["energy_joules"] for o in outs) == pytest.approx(tot["step_joules"], rel=1e-9)
    assert tot["idle_joules"] == pytest.approx(0.0, abs=1e-9)
    _bump(z["pkg1"], 123_456, 2**40)  # energy drawn between steps is nobody's
    assert eng.energy.idle_joules() == pytest.approx(0.123456, rel=1e-9)
    assert eng.stats()["idle_energy_joules"] == pytest.approx(0.123456, rel=1e-9)


def test_bench_energy_tiny(model_dir, tmp_path):
    from tokenmill.cli import main

    path = str(tmp_path / "energy.json")
    assert main(["bench", "energy", "--model", model_dir, "--num-requests", "3", "--input-len", "8", "40",
                 "--output-len", "4", "--max-num-seqs", "4", "--energy-source", "model", "--json", path]) == 0
    with open(path) as f:
        (r,) = json.load(f)["results"]
    assert r["output_tokens"] == 12 and r["energy_source"] == "model"
    assert r["joules_per_output_token"] > 0 and r["flops_per_output_token"] > 0
    assert r["attribution_sum_error"] < 1e-9
    lo, hi = r["bound"]["joules_per_output_token_range"]
    assert lo < r["joules_per_output_token"] < hi


# -- the server ----------------------------------------------------------------------------------------
PRICES = {"--price-per-device-hour": 7.2, "--price-per-kwh": 0.3, "--pue": 1.5}


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    from tests.server_utils import ServerProcess

    args = [x for k, v in PRICES.items() for x in (k, str(v))]
    srv = ServerProcess(model_dir, "--kv-cache-memory", "0.0625", "--max-num-batched-tokens", "256", *args,
                        log_path=str(tmp_path_factory.mktemp("energy") / "server.log"))
    yield srv
    assert srv.stop() == 0


def _check(compute: dict) -> dict:
    assert set(compute) == KEYS and compute["energy_source"] in ("model", "rapl", "nvml")
    assert compute["energy_joules"] > 0 and compute["device_seconds"] > 0 and compute["flops"] > 0
    want = (compute["device_seconds"] * PRICES["--price-per-device-hour"] / 3600
            + compute["energy_joules"] * PRICES["--pue"] / 3.6e6 * PRICES["--price-per-kwh"])
    assert compute["cost_usd"] == pytest.approx(want, rel=1e-9)
    return compute


def test_usage_compute_streamed_and_not_adds_up_to_the_metrics(server, client, model_name):
    seen = []
    # Two prompts x n=2: one usage for the four sequences.
    r = client.completions.create(model=model_name, prompt=["Hello world", "The quick brown fox jumps"], n=2,
                                  max_tokens=6, seed=1)
    seen.append(_check(r.usage.compute))
    chunks = list(client.completions.create(model=model_name, prompt=["Hello", "Stop here. STOP."], max_tokens=6,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and all(c.usage is None for c in chunks[:-1])
    seen.append(_check(chunks[-1].usage.compute))
    msgs = [{"role": "user", "content": "Say something"}]
    r = client.chat.completions.create(model=model_name, messages=msgs, max_tokens=6)
    seen.append(_check(r.usage.compute))
    chunks = list(client.chat.completions.create(model=model_name, messages=msgs, max_tokens=6, stream=True,
                                                 stream_options={"include_usage": True}))
    seen.append(_check(chunks[-1].usage.compute))
    # Scoring a prompt (echo, max_tokens 0) is compute too.
    r = client.completions.create(model=model_name, prompt="The quick brown fox", max_tokens=0, echo=True,
                                  logprobs=1)
    seen.append(_check(r.usage.compute))

    m = server.metrics()
    labels = f'{{model_name="{model_name}",tenant="default"}}'
    for key, metric in (("energy_joules", "request_energy_joules"), ("device_seconds", "request_device_seconds"),
                        ("flops", "request_flops"), ("cost_usd", "request_cost_usd")):
        assert m[f"tokenmill:{metric}_total{labels}"] == pytest.approx(sum(c[key] for c in seen), rel=1e-9)
    source = seen[0]["energy_source"]
    engine = m[f'tokenmill:engine_energy_joules_total{{model_name="{model_name}",source="{source}"}}']
    # Nothing else ran: the engine measured exactly what the responses report.
    assert engine == pytest.approx(sum(c["energy_joules"] for c in seen), rel=1e-9)
    assert m[f'tokenmill:idle_energy_joules_total{{source="{source}"}}'] >= 0

    # Test-time compute: every path's share in the one usage.
    before = server.metric("tokenmill:request_energy_joules_total")
    r = client.completions.create(model=model_name, prompt="Hello", max_tokens=4,
                                  extra_body={"test_time_compute": {"n": 3}})
    c = _check(r.usage.compute)
    assert c["energy_joules"] <= (server.metric("tokenmill:request_energy_joules_total") - before) * (1 + 1e-9)


def test_flop_model_over_arrays_equals_its_formula_with_sliding_windows():
    """FlopModel.chunks (a step's chunks at once) against the formula written out per chunk, on a
    model whose layers mix full attention and two window sizes."""
    import numpy as np

    from tokenmill.ops.energy import FlopModel

    mc = types.SimpleNamespace(hidden_size=64, head_dim=16, layer_matmul_parameters=12345, num_layers=5,
                               vocab_size=1000, num_heads=4, sliding_windows=[None, 32, None, 100, 32])
    fm = FlopModel(mc)
    rng = np.random.default_rng(0)
    new, ctx, rows = rng.integers(1, 300, 50), rng.integers(0, 500, 50), rng.integers(0, 3, 50)
    for n, c, r, got in zip(new.tolist(), ctx.tolist(), rows.tolist(), fm.chunks(new, ctx, rows).tolist()):
        span = c + n / 2
        attn = 2 * span + 2 * min(span, 32) + min(span, 100)
        assert got == int(2 * 12345 * 5 * n + 4 * 4 * 16 * attn * n + 2 * 64 * 1000 * r)
