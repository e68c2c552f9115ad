"""The live dashboard (GET /dashboard) in a real headless Chromium against a live server under load,
its JSON feed and its auth, and the Grafana dashboard in deploy/grafana.

The browser is Debian's chromium driven by Playwright (the `browser` extra): no browser download.
Locally a missing browser skips the browser test; in CI (CI set) it fails.
Set TOKENMILL_DASHBOARD_SCREENSHOT=docs/dashboard.png to write the README's screenshot.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import os
import re
import shutil
import threading
import time

import httpx
import openai
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge

from tests.server_utils import ROOT, ServerProcess
from tokenmill.server.routes.dashboard import snapshot

CI = bool(os.environ.get("CI"))
ADMIN_KEY = "dashboard-test-admin-key"
# Two tenants, so the tenant charts and table have rows: acme's requests carry its SLO class.
TENANT_KEYS = {"acme": "sk-acme-dashboard", "globex": "sk-globex-dashboard"}
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
GRAFANA = os.path.join(ROOT, "deploy", "grafana", "tokenmill.json")
PAGE_JS = os.path.join(ROOT, "tokenmill", "server", "static", "dashboard.js")

# Every chart must show data under load on the test's server (tenants, SLO traffic, energy and cost).
MODEL_CHARTS = ("tokens", "requests", "ttft", "tpot", "queue", "cache")  # one series per model
CORE_CHARTS = ("tokens", "requests", "ttft", "tpot", "queue", "cache", "slo_attainment", "slo_rates", "goodput",
               "power", "cost", "tenant_power", "tenant_cost")
SLO = {"ttft_ms": 5000, "tpot_ms": 1000}
PREFIX = "The quick brown fox jumps over the lazy dog. " * 3  # shared by every prompt: prefix-cache hits


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    # A small KV cache and batch, so that under load the cache is visibly used and requests queue.
    log = str(tmp_path_factory.mktemp("dashboard") / "server.log")
    tenants = tmp_path_factory.mktemp("tenants") / "tenants.yaml"
    tenants.write_text(
        "slo_classes:\n  interactive: {ttft_ms: 5000, tpot_ms: 1000}\n  batch: {}\n"
        "tenants:\n"
        + "".join(f"  - name: {name}\n    keys_sha256: [{hashlib.sha256(key.encode()).hexdigest()}]\n"
                  f"    slo_class: {'interactive' if name == 'acme' else 'batch'}\n"
                  for name, key in TENANT_KEYS.items()))
    srv = ServerProcess(model_dir, "--admin-api-key", ADMIN_KEY, "--kv-cache-memory", "0.002", "--max-num-seqs", "4",
                        "--max-model-len", "256", "--tenants", str(tenants), "--scheduling-policy", "slo",
                        "--price-per-device-hour", "2.5", "--price-per-kwh", "0.3", log_path=log)
    yield srv
    assert srv.stop() == 0


class Load:
    """Clients sending completions in background threads until stopped (more than --max-num-seqs, so
    some wait; prompts share a prefix, so the prefix cache hits); every request must succeed."""

    def __init__(self, base_url: str, model: str, threads: int = 6) -> None:
        self.clients = [openai.OpenAI(base_url=base_url + "/v1", api_key=key, max_retries=0, timeout=60)
                        for key in TENANT_KEYS.values()]
        self.model = model
        self.stop_event = threading.Event()
        self.done = 0
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, worker: int) -> None:
        i = 0
        while not self.stop_event.is_set():
            i += 1
            # Every third request carries (loose) latency targets: SLO traffic for the SLO charts.
            extra = {"ignore_eos": True, **({"slo": SLO} if (i + worker) % 3 == 0 else {})}
            try:
                self.clients[worker % 2].completions.create(
                    model=self.model, prompt=f"{PREFIX}Client {worker}, request {i}:",
                    max_tokens=16 + (7 * i + worker) % 48, temperature=0.8, extra_body=extra)
                self.done += 1
            except Exception as e:  # noqa: BLE001 (reported by the test)
                self.errors.append(repr(e))
                return

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(60)


def missing(why: str):
    if CI:  # CI installs the browser extra and chromium (.ci/run): a missing one must fail there
        pytest.fail(why)
    pytest.skip(why)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright is not installed (pip install -e '.[browser]')")
    path = os.environ.get("TOKENMILL_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(path):
        missing(f"no Chromium at {path} (apt-get install chromium, or set TOKENMILL_CHROMIUM)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


CHARTS_JS = """() => Object.fromEntries(Object.entries(window.tokenmillDashboard.charts).map(([id, c]) => [id, {
    labels: c.plot ? c.plot.series.slice(1).map(s => s.label) : [],
    xs: c.plot ? Array.from(c.plot.data[0]) : [],
    ys: c.plot ? c.plot.data.slice(1).map(a => Array.from(a)) : [],
    canvas: c.plot ? [c.plot.ctx.canvas.width, c.plot.ctx.canvas.height] : [0, 0],
    note: c.note.textContent}]))"""

# Pixels of the plot's canvas drawn in a series' colour (uPlot draws on the canvas: data in its arrays
# alone would not show that anything was drawn).
INKED_JS = """(id) => {
    const c = window.tokenmillDashboard.charts[id];
    const ctx = c.plot.ctx, {width, height} = ctx.canvas;
    const px = ctx.getImageData(0, 0, width, height).data;
    const colors = c.plot.series.slice(1).map(s => s._stroke || s.stroke).map(h => [1, 3, 5].map(
        i => parseInt(String(h).slice(i, i + 2), 16)));
    let n = 0;
    for (let i = 0; i < px.length; i += 4) {
        if (colors.some(([r, g, b]) => Math.abs(px[i] - r) + Math.abs(px[i + 1] - g) + Math.abs(px[i + 2] - b) < 60
                        && px[i + 3] > 128)) n++;
    }
    return n;
}"""


def values(chart: dict) -> list[float]:
    return [v for ys in chart["ys"] for v in ys if v is not None]


def test_dashboard_live_in_chromium(server, browser, model_name, tmp_path):
    console: list[str] = []
    failed: list[str] = []
    with Load(server.base_url, model_name) as load:
        deadline = time.monotonic() + 60
        while load.done < 6 and not load.errors and time.monotonic() < deadline:
            time.sleep(0.2)
        page = browser.new_page(viewport={"width": 1500, "height": 1000})
        page.on("console", lambda m: m.type in ("error", "warning") and console.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: console.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: failed.append(f"{r.url}: {r.failure}"))
        page.on("response", lambda r: r.status >= 400 and failed.append(f"{r.url}: {r.status}"))
        page.goto(f"{server.base_url}/dashboard#key={ADMIN_KEY}")
        # Percentiles need requests finished between two polls of the window: several polls under load.
        page.wait_for_function("window.tokenmillDashboard && window.tokenmillDashboard.polls >= 8", timeout=60_000)
        first = page.evaluate(CHARTS_JS)
        data = page.evaluate("window.tokenmillDashboard.last")
        polls = page.evaluate("window.tokenmillDashboard.polls")
        page.wait_for_function(f"window.tokenmillDashboard.polls >= {polls + 2}", timeout=30_000)
        second = page.evaluate(CHARTS_JS)
        data2 = page.evaluate("window.tokenmillDashboard.last")
        inked = {cid: page.evaluate(INKED_JS, cid) for cid in CORE_CHARTS}
        models_rows = page.locator("#models-table tbody tr").all_inner_texts()
        shot = tmp_path / "dashboard.png"
        page.screenshot(path=str(shot), full_page=True)
        if os.environ.get("TOKENMILL_DASHBOARD_SCREENSHOT"):
            page.screenshot(path=os.environ["TOKENMILL_DASHBOARD_SCREENSHOT"], full_page=True)
        page.close()
    assert not load.errors, load.errors[:3]
    assert not console, console
    assert not failed, failed

    for cid in CORE_CHARTS:
        c = second[cid]
        assert c["canvas"][0] > 0 and c["canvas"][1] > 0, cid
        assert c["labels"], cid
        if cid in MODEL_CHARTS:
            assert any(model_name in label for label in c["labels"]), (cid, c["labels"])
        assert any(v > 0 for v in values(c)), (cid, c)
        assert inked[cid] > 20, (cid, inked[cid], "series data but nothing drawn")
        assert not c["note"], (cid, c["note"])
    for cid, labels in (("tokens", ("generated", "prompt")), ("queue", ("running",)), ("cache", ("KV usage",)),
                        ("ttft", ("p50", "p95", "p99"))):
        for want in labels:
            i = next(i for i, lab in enumerate(second[cid]["labels"]) if lab.startswith(want))
            assert any(v for v in second[cid]["ys"][i] if v is not None), (cid, want, second[cid])
    # p50 <= p95 <= p99 at every point where all three exist
    for p50, p95, p99 in zip(*second["ttft"]["ys"][:3]):
        if None not in (p50, p95, p99):
            assert p50 <= p95 + 1e-9 and p95 <= p99 + 1e-9
    assert max(values(second["cache"])) <= 100

    # Live: more points, a later time, counters moved on.
    assert second["tokens"]["xs"][-1] > first["tokens"]["xs"][-1]
    assert len(second["tokens"]["xs"]) > len(first["tokens"]["xs"])
    gen = "tokenmill:generation_tokens_total"
    assert data2["series"][gen][0]["value"] > data["series"][gen][0]["value"]
    assert any(row.startswith(model_name) for row in models_rows), models_rows

    # The tenants' series: both tenants in the tenant charts.
    for cid in ("tenant_power", "tenant_cost"):
        assert {lab.split(" · ")[-1] for lab in second[cid]["labels"]} >= set(TENANT_KEYS), second[cid]["labels"]

    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one


def with_pending_series(data: dict, k: int, model: str) -> dict:
    """The server's real data plus the series the other parts add, growing with k (the poll number)."""
    def add(name: str, kind: str, samples: list[tuple[dict, float]]) -> None:
        data["series"].setdefault(name, []).extend({"labels": labels, "value": v} for labels, v in samples)
        data["types"][name] = kind

    tenants = ("initech", "umbrella")
    add("tokenmill:slo_attained_total", "counter", [
        ({"model_name": model, "tenant": "initech", "slo_class": "gold"}, 5.0 * k),
        ({"model_name": model, "tenant": "umbrella", "slo_class": "bronze"}, 3.0 * k)])
    add("tokenmill:slo_missed_total", "counter", [
        ({"model_name": model, "tenant": "initech", "slo_class": "gold", "reason": "ttft"}, 1.0 * k)])
    add("tokenmill:goodput", "gauge", [({"model_name": model, "slo_class": "gold"}, 4.0),
                                       ({"model_name": model, "slo_class": "bronze"}, 3.0)])
    add("tokenmill:engine_energy_joules_total", "counter", [({"model_name": model, "source": "rapl"}, 30.0 * k)])
    for i, t in enumerate(tenants):
        labels = {"model_name": model, "tenant": t}
        add("tokenmill:request_energy_joules_total", "counter", [(labels, (10.0 + i) * k)])
        add("tokenmill:request_cost_usd_total", "counter", [(labels, 0.001 * (1 + i) * k)])
        add("tokenmill:request_success_total", "counter", [({**labels, "finished_reason": "stop"}, 2.0 * k)])
        add("tokenmill:tenant_requests_in_flight", "gauge", [({"tenant": t}, 2.0 + i)])
        add("tokenmill:tenant_rejected_requests_total", "counter", [({"tenant": t, "limit": "requests_per_minute"},
                                                                     float(i * k))])
    return data


def test_dashboard_draws_the_other_parts_series(server, browser, model_name):
    """The SLO, energy, cost and tenant charts and the tenants table, fed the series the tenants, SLO
    and energy parts add (the real /dashboard/data with those series added in the browser's route)."""
    calls = []

    def feed(route):
        calls.append(1)
        real = route.fetch()
        route.fulfill(status=200, json=with_pending_series(real.json(), len(calls), model_name))

    console: list[str] = []
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    page.on("console", lambda m: m.type in ("error", "warning") and console.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: console.append(f"page error: {e}"))
    page.route("**/dashboard/data", feed)
    page.goto(f"{server.base_url}/dashboard#key={ADMIN_KEY}")
    page.wait_for_function("window.tokenmillDashboard && window.tokenmillDashboard.polls >= 4", timeout=30_000)
    charts = page.evaluate(CHARTS_JS)
    tenants = page.locator("#tenants-table tbody tr").all_inner_texts()
    page.close()
    assert not console, console
    for cid in set(CORE_CHARTS) - set(MODEL_CHARTS):
        assert any(v > 0 for v in values(charts[cid])) and not charts[cid]["note"], (cid, charts[cid])
    att = charts["slo_attainment"]
    # the injected classes (the live server's own have their own series)
    got = {label: [v for v in ys if v is not None][-1] for label, ys in zip(att["labels"], att["ys"])
           if label.endswith(("gold", "bronze"))}
    assert got == {"attained · gold": pytest.approx(500 / 6), "attained · bronze": pytest.approx(100)}
    assert {lab.split(" · ")[1] for lab in charts["tenant_cost"]["labels"]} >= {"initech", "umbrella"}
    assert any("rapl" in lab for lab in charts["power"]["labels"])
    # tenant, requests/s, tokens/s, in flight, rejected, SLO attained, energy (Wh), cost ($)
    rows = {r.split("\t")[0]: r.split("\t") for r in tenants}
    assert set(rows) >= {"initech", "umbrella"}, tenants  # beside the live server's own tenants
    assert rows["initech"][3] == "2.00" and rows["umbrella"][3] == "3.00"
    assert rows["initech"][5] == "83.33 %" and rows["umbrella"][5] == "100 %"
    assert float(rows["umbrella"][4]) > 0 and float(rows["initech"][7]) > 0


def test_dashboard_behind_a_router(browser):
    """A router's /dashboard/data (every replica's samples, with a `replica` label): the page sums the
    replicas (a mean for KV usage, a fraction), follows each one's counters apart (one restarting
    makes no spike, nor one missing from a poll), and a cascade's escalations are not the tenant's
    requests. The page is served from the package through the browser's route: no server."""
    static = os.path.join(ROOT, "tokenmill", "server", "static")
    types = {"tokenmill:generation_tokens_total": "counter", "tokenmill:request_success_total": "counter",
             "tokenmill:kv_cache_usage_perc": "gauge", "tokenmill:num_requests_running": "gauge"}
    polls = []

    def data(k: int) -> dict:
        series: dict[str, list] = {name: [] for name in types}
        reps = [("http://a", 0.2)] + ([("http://b", 0.6)] if k != 10 else [])  # b missed the 10th poll
        for rep, kv in reps:
            model = {"model_name": "m", "replica": rep}
            labels = {**model, "tenant": "acme"}
            restarted = rep == "http://b" and k >= 6  # b restarts at the 6th poll: its counters from 0
            series["tokenmill:generation_tokens_total"].append({"labels": labels,
                                                                "value": 20.0 * (k - 6 if restarted else k)})
            for reason, per_s in (("stop", 1.0), ("escalated", 5.0)):
                series["tokenmill:request_success_total"].append(
                    {"labels": {**labels, "finished_reason": reason}, "value": per_s * (k - 6 if restarted else k)})
            series["tokenmill:kv_cache_usage_perc"].append({"labels": model, "value": kv})
            series["tokenmill:num_requests_running"].append({"labels": model, "value": 2.0})
        return {"time": 1000.0 + k, "series": series, "types": types, "replicas": [r for r, _ in reps]}

    def serve(route):
        path = route.request.url.split("dash.test", 1)[1].split("#")[0]
        if path == "/dashboard":
            with open(os.path.join(static, "dashboard.html"), encoding="utf-8") as f:
                return route.fulfill(status=200, body=f.read(), content_type="text/html")
        if path == "/dashboard/data":
            polls.append(1)
            return route.fulfill(status=200, json=data(len(polls)))
        name = path.removeprefix("/dashboard/static/")
        kind = "text/css" if name.endswith(".css") else "text/javascript"
        with open(os.path.join(static, name), "rb") as f:
            return route.fulfill(status=200, body=f.read(), content_type=kind)

    console: list[str] = []
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    page.on("pageerror", lambda e: console.append(f"page error: {e}"))
    page.route("http://dash.test/**", serve)
    page.goto("http://dash.test/dashboard#interval=0.5")
    page.wait_for_function("window.tokenmillDashboard && window.tokenmillDashboard.polls >= 16", timeout=30_000)
    charts = page.evaluate(CHARTS_JS)
    tenants = page.locator("#tenants-table tbody tr").all_inner_texts()
    models = page.locator("#models-table tbody tr").all_inner_texts()
    page.close()
    assert not console, console
    tokens = dict(zip(charts["tokens"]["labels"], charts["tokens"]["ys"]))
    generated = [v for v in tokens["generated · m"] if v is not None]
    assert generated[-1] == pytest.approx(40.0) and max(generated) <= 40.0 + 1e-9, generated  # no spike
    kv = dict(zip(charts["cache"]["labels"], charts["cache"]["ys"]))["KV usage · m"]
    assert [v for v in kv if v is not None][-1] == pytest.approx(40.0)  # the mean of 20 % and 60 %
    rows = {r.split("\t")[0]: r.split("\t") for r in tenants}
    assert rows["acme"][1] == "2.00", rows  # requests/s: 1 per replica, the escalations left out
    assert models and models[0].split("\t")[2] == "4.00", models  # running: both replicas'


def test_dashboard_asks_for_the_key(server, browser):
    page = browser.new_page()
    page.goto(f"{server.base_url}/dashboard")
    page.wait_for_function("document.getElementById('status').textContent.includes('admin key')", timeout=15_000)
    assert page.evaluate("window.tokenmillDashboard.polls") == 0
    page.close()


def test_quantiles_as_prometheus(server, browser):
    """The page's histogram_quantile against values worked out by Prometheus' rule."""
    page = browser.new_page()
    page.goto(f"{server.base_url}/dashboard#key={ADMIN_KEY}")
    page.wait_for_function("!!(window.tokenmillDashboard && window.tokenmillDashboard.quantile)")
    cases = [
        (0.5, [(0.1, 2), (0.5, 6), (1.0, 8), (math.inf, 8)], 0.3),
        (0.99, [(0.1, 2), (0.5, 6), (1.0, 8), (math.inf, 8)], 0.5 + 0.5 * (0.99 * 8 - 6) / 2),
        (0.9, [(0.1, 1), (math.inf, 3)], 0.1),  # in the +Inf bucket: the top finite bound
        (0.5, [(0.1, 0), (math.inf, 0)], None),  # nothing observed in the window
        (0.25, [(0.01, 4), (math.inf, 4)], 0.0025),  # the first bucket interpolates from 0
    ]
    for q, buckets, want in cases:
        js = [[("Infinity" if math.isinf(le) else le), n] for le, n in buckets]
        got = page.evaluate("([q, b]) => window.tokenmillDashboard.quantile(q, b.map(([le, n]) => "
                            "[le === 'Infinity' ? Infinity : le, n]))", [q, js])
        assert (got is None and want is None) or got == pytest.approx(want), (q, buckets, got, want)
    page.close()


def test_dashboard_data_and_auth(server):
    page = httpx.get(server.base_url + "/dashboard", timeout=10)  # the page holds no data: no key needed
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for asset in re.findall(r'(?:src|href)="(dashboard/static/[^"]+)"', page.text):
        r = httpx.get(f"{server.base_url}/{asset}", timeout=10)
        assert r.status_code == 200 and len(r.content) > 100, asset
    assert "uPlot" in httpx.get(server.base_url + "/dashboard/static/uPlot.iife.min.js", timeout=10).text
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.get(server.base_url + "/dashboard/data", headers=headers, timeout=10)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.get(server.base_url + "/dashboard/data", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)
    assert r.status_code == 200
    data = r.json()
    assert abs(data["time"] - time.time()) < 60
    assert "tokenmill:num_requests_running" in data["series"]
    # every sample of /metrics is in the JSON, with the same value (gauges may move in between: skip them)
    prom = {}
    for key, value in server.metrics().items():
        name, _, rest = key.partition("{")
        prom[(name, frozenset(re.findall(r'(\w+)="([^"]*)"', rest)))] = value
    counted = 0
    for name, samples in data["series"].items():
        assert name.startswith("tokenmill:")
        for s in samples:
            assert set(s) == {"labels", "value"}
            if data["types"][name] in ("counter", "histogram"):
                key = (name, frozenset(s["labels"].items()))
                assert key in prom and prom[key] >= s["value"], key
                counted += 1
    assert counted > 20


def test_snapshot_json_safe():
    """Only tokenmill: series; a NaN gauge is null, so the JSON stays valid for the browser."""
    r = CollectorRegistry()
    Gauge("tokenmill:g", "", ["model_name"], registry=r).labels("m").set(math.nan)
    Counter("tokenmill:c", "", registry=r).inc(2)
    Counter("other", "", registry=r).inc()
    snap = snapshot(r)
    assert snap["series"]["tokenmill:g"] == [{"labels": {"model_name": "m"}, "value": None}]
    assert snap["series"]["tokenmill:c_total"] == [{"labels": {}, "value": 2.0}]
    assert snap["types"]["tokenmill:c_total"] == "counter"
    assert not any(n.startswith("other") for n in snap["series"])
    json.dumps(snap, allow_nan=False)


def exported_names(server, model_name) -> tuple[set[str], set[str]]:
    """Sample names and label names on /metrics once requests have finished (histograms appear then)."""
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key=TENANT_KEYS["acme"], max_retries=0, timeout=60)
    # one request that cannot meet its target (demoted): slo_missed appears with its first miss
    client.completions.create(model=model_name, prompt=PREFIX, max_tokens=2, extra_body={"slo": {"ttft_ms": 0.001}})
    for stream in (False, True):
        out = client.completions.create(model=model_name, prompt=PREFIX, max_tokens=4, stream=stream)
        if stream:
            list(out)
    names, labels = set(), set()
    for key in server.metrics():
        name, _, rest = key.partition("{")
        names.add(name)
        labels.update(re.findall(r'(\w+)="', rest))
    return names, labels


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """Metric names and label names an expression uses (by (...) clauses and selectors)."""
    names = set(re.findall(r"tokenmill:[A-Za-z0-9_:]+", expr))
    labels = set()
    for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        labels.update(x.strip() for x in group.split(",") if x.strip())
    labels.update(re.findall(r"[{,]\s*(\w+)\s*(?:=~|!~|!=|=)", expr))
    return names, labels


def grafana_panels(dash: dict) -> list[dict]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def test_grafana_dashboard(server, model_name):
    with open(GRAFANA) as f:
        dash = json.load(f)
    assert [i["name"] for i in dash["__inputs"]] == ["DS_PROMETHEUS"]
    assert dash["__inputs"][0]["pluginId"] == "prometheus"
    names, labels = exported_names(server, model_name)
    known_names = names
    known_labels = labels | {"le"}
    panels = grafana_panels(dash)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    used = set()
    graphs = [p for p in panels if p["type"] != "row"]
    assert len(graphs) >= 12
    for p in graphs:
        assert p["title"] and set(p["gridPos"]) == {"h", "w", "x", "y"}, p["title"]
        assert p["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            expr = t["expr"]
            assert t["datasource"]["uid"] == "${DS_PROMETHEUS}"
            assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
            n, lab = promql_names(expr)
            assert n, (p["title"], expr)
            assert n <= known_names, (p["title"], n - known_names)
            assert lab <= known_labels, (p["title"], lab - known_labels)
            for hist in re.findall(r"histogram_quantile\([^,]+,\s*sum by \(([^)]*)\)", expr):
                assert "le" in hist, expr
            used |= n
    for v in dash["templating"]["list"]:
        assert v["datasource"]["uid"] == "${DS_PROMETHEUS}"
        n, _ = promql_names(v["query"]["query"])
        assert n <= known_names, v
    # The page and Grafana show the same series; both only use series the server exports.
    with open(PAGE_JS) as f:
        js = f.read()
    page_names = set(re.findall(r'M \+ "([a-z_]+)"', js))
    page_names = {"tokenmill:" + n for n in page_names}
    for hist in ("tokenmill:time_to_first_token_seconds", "tokenmill:time_per_output_token_seconds"):
        page_names.discard(hist)
        page_names.add(hist + "_bucket")
    assert len(page_names) >= 15
    assert page_names <= known_names, page_names - known_names
    assert page_names - {"tokenmill:model_state"} <= used, page_names - used


def test_static_files_are_package_data():
    """Every asset the page loads ships in the wheel and sdist (pyproject's package-data globs)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        globs = tomllib.load(f)["tool"]["setuptools"]["package-data"]["tokenmill"]
    static = os.path.join(ROOT, "tokenmill", "server", "static")
    for name in os.listdir(static):
        assert any(fnmatch.fnmatch(f"server/static/{name}", g) for g in globs), name
    for name in ("dashboard.html", "dashboard.js", "dashboard.css"):  # nothing from a CDN
        with open(os.path.join(static, name)) as f:
            text = f.read()
        assert "http://" not in text and "https://" not in text, name
