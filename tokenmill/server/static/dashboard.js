// The live dashboard: polls dashboard/data (the server's `tokenmill:` series as JSON) every second and
// draws the charts with uPlot. Rates and windowed percentiles are computed here from successive
// polls, as Prometheus' rate() and histogram_quantile() would: a counter's increase over the window
// divided by its length; a histogram's bucket increases over the window, interpolated linearly
// within the bucket that holds the quantile. A metric the server does not export (no tenants, no
// SLO traffic yet, no energy accounting) leaves its chart empty with a note. Behind `tokenmill router`
// every sample also carries a `replica` label: each replica's counters are followed apart (a restart
// resets one of them only) and summed over by the `by` labels, as for several models of one server.
"use strict";
(() => {
  const RATE_WINDOW = 5; // seconds: throughput, power, cost rates
  const WINDOW = 30; // seconds: percentiles, hit rate, attainment
  const HISTORY = 300; // points kept per chart
  const hash = new URLSearchParams(location.hash.slice(1));
  const KEY = hash.get("key");
  const INTERVAL = Math.min(10, Math.max(0.5, Number(hash.get("interval")) || 1)); // seconds between polls

  const M = "tokenmill:";
  const N = {
    prompt: M + "prompt_tokens_total",
    generation: M + "generation_tokens_total",
    success: M + "request_success_total",
    ttft: M + "time_to_first_token_seconds",
    tpot: M + "time_per_output_token_seconds",
    running: M + "num_requests_running",
    waiting: M + "num_requests_waiting",
    kv: M + "kv_cache_usage_perc",
    queries: M + "prefix_cache_queries_total",
    hits: M + "prefix_cache_hits_total",
    state: M + "model_state",
    attained: M + "slo_attained_total",
    missed: M + "slo_missed_total",
    goodput: M + "goodput",
    energy: M + "request_energy_joules_total",
    engineEnergy: M + "engine_energy_joules_total",
    cost: M + "request_cost_usd_total",
    rejected: M + "tenant_rejected_requests_total",
    inFlight: M + "tenant_requests_in_flight",
  };
  const MODEL = ["model_name"];
  const TENANT = ["tenant"];
  const CLASS = ["slo_class"];
  const quantiles = (metric) => [0.5, 0.95, 0.99].map((q) => ({ kind: "quantile", metric, q, by: MODEL, label: `p${q * 100}` }));

  // One card per chart; each line expands to one series per value of its `by` labels.
  const CHARTS = [
    { id: "tokens", title: "Throughput: tokens/s", needs: [N.generation, N.prompt], lines: [
      { kind: "rate", metric: N.generation, by: MODEL, label: "generated" },
      { kind: "rate", metric: N.prompt, by: MODEL, label: "prompt" }] },
    { id: "requests", title: "Throughput: requests/s (finished)", needs: [N.success], lines: [
      { kind: "rate", metric: N.success, by: MODEL, label: "requests" }] },
    { id: "ttft", title: "Time to first token (s)", needs: [N.ttft + "_bucket"], idle: `no request finished in the last ${WINDOW} s`,
      lines: quantiles(N.ttft) },
    { id: "tpot", title: "Time per output token (s)", needs: [N.tpot + "_bucket"], idle: `no request finished in the last ${WINDOW} s`,
      lines: quantiles(N.tpot) },
    { id: "queue", title: "Queue: sequences", needs: [N.running, N.waiting], lines: [
      { kind: "gauge", metric: N.running, by: MODEL, label: "running" },
      { kind: "gauge", metric: N.waiting, by: MODEL, label: "waiting" }] },
    { id: "cache", title: "KV cache usage and prefix-cache hit rate (%)", needs: [N.kv, N.queries], range: [0, 100], lines: [
      { kind: "gauge", metric: N.kv, by: MODEL, label: "KV usage", scale: 100, mean: true }, // (over replicas)
      { kind: "ratio", num: [N.hits], den: [N.queries], by: MODEL, label: "prefix hits", scale: 100 }] },
    { id: "slo_attainment", title: "SLO attainment (%)", needs: [N.attained, N.missed], range: [0, 100],
      absent: "no SLO traffic yet: requests with targets (a tenant's SLO class or the slo field) fill it",
      lines: [{ kind: "ratio", num: [N.attained], den: [N.attained, N.missed], by: CLASS, label: "attained", scale: 100 }] },
    { id: "slo_rates", title: "SLO: attained and missed requests/s", needs: [N.attained, N.missed],
      absent: "no SLO traffic yet", lines: [
        { kind: "rate", metric: N.attained, by: CLASS, label: "attained" },
        { kind: "rate", metric: N.missed, by: CLASS, label: "missed" }] },
    { id: "goodput", title: "Goodput: requests/s that met their targets", needs: [N.goodput],
      absent: "no SLO traffic yet", lines: [{ kind: "gauge", metric: N.goodput, by: ["model_name", "slo_class"], label: "goodput" }] },
    { id: "power", title: "Power (W): attributed to requests and measured", needs: [N.energy, N.engineEnergy],
      absent: "this server does not account energy", lines: [
        { kind: "rate", metric: N.energy, by: MODEL, label: "requests" },
        { kind: "rate", metric: N.engineEnergy, by: ["model_name", "source"], label: "measured" }] },
    { id: "cost", title: "Cost by model ($/hour)", needs: [N.cost], absent: "this server does not account cost",
      lines: [{ kind: "rate", metric: N.cost, by: MODEL, label: "cost", scale: 3600 }] },
    { id: "tenant_power", title: "Power by tenant (W)", needs: [N.energy], absent: "this server does not account energy",
      lines: [{ kind: "rate", metric: N.energy, by: TENANT, label: "power" }] },
    { id: "tenant_cost", title: "Cost by tenant ($/hour)", needs: [N.cost], absent: "this server does not account cost",
      lines: [{ kind: "rate", metric: N.cost, by: TENANT, label: "cost", scale: 3600 }] },
  ];

  const COLORS = ["#3b6fd8", "#e2663a", "#2a9d61", "#9b4dca", "#d4a017", "#1aa5b8", "#c2407a", "#6b7a8f", "#7fb03a", "#a0522d"];

  function fmt(v) {
    if (v == null || !Number.isFinite(v)) return "–";
    const a = Math.abs(v);
    if (a === 0) return "0";
    if (a >= 100) return v.toFixed(0);
    if (a >= 1) return v.toFixed(2);
    return v.toPrecision(3);
  }

  function lastOf(values) {
    for (let i = values.length - 1; i >= 0; i--) if (values[i] != null) return values[i];
    return null;
  }

  // ---- the series of one poll --------------------------------------------------------------------
  const samples = (snap, name) => (snap && snap.series[name]) || [];
  const has = (snap, name) => samples(snap, name).length > 0;
  const groupKey = (labels, by) => by.map((l) => labels[l] ?? "").join("\u0001");
  const sampleKey = (labels) => JSON.stringify(Object.keys(labels).sort().map((k) => [k, labels[k]]));

  // A gauge summed (or averaged: `mean`, for a fraction such as KV usage) by `by`.
  function sumBy(snap, name, by, mean) {
    const out = new Map();
    for (const s of samples(snap, name)) {
      if (s.value == null) continue;
      const k = groupKey(s.labels, by);
      const g = out.get(k) || { labels: s.labels, value: 0, n: 0 };
      g.value += s.value;
      g.n += 1;
      out.set(k, g);
    }
    if (mean) for (const g of out.values()) g.value /= g.n;
    return out;
  }

  // A counter's increase between two polls, summed by `by` (and `le` for buckets). A series the base
  // poll lacks started at 0 since (prometheus_client creates labelled series at 0); a decrease is a
  // restart, so the whole current value is the increase (rate()'s reset rule). `keep`: which samples
  // count (all by default).
  function increase(cur, base, name, by, keep) {
    const before = new Map(samples(base, name).map((s) => [sampleKey(s.labels), s.value]));
    // Behind a router: a replica the base poll lacks (down then, or new) has no increase yet; its
    // whole counter would read as one (the reset rule), a spike of everything it ever did.
    const known = cur && cur.replicas && base && base.replicas ? new Set(base.replicas) : null;
    const out = new Map();
    for (const s of samples(cur, name)) {
      if (s.value == null || (keep && !keep(s.labels))) continue;
      if (known && s.labels.replica !== undefined && !known.has(s.labels.replica)) continue;
      const b = before.get(sampleKey(s.labels)) ?? 0;
      const d = s.value >= b ? s.value - b : s.value;
      const k = groupKey(s.labels, by);
      const g = out.get(k) || { labels: s.labels, value: 0 };
      g.value += d;
      out.set(k, g);
    }
    return out;
  }

  // histogram_quantile over bucket increases: [(le, cumulative count)] sorted by le.
  function quantile(q, buckets) {
    buckets.sort((a, b) => a[0] - b[0]);
    const total = buckets.length ? buckets[buckets.length - 1][1] : 0;
    if (!(total > 0)) return null;
    const rank = q * total;
    let prevLe = 0;
    let prevCount = 0;
    for (const [le, count] of buckets) {
      if (count >= rank) {
        if (le === Infinity) return prevLe; // the top finite bound, as Prometheus answers
        if (count === prevCount) return le;
        return prevLe + ((le - prevLe) * (rank - prevCount)) / (count - prevCount);
      }
      prevLe = le;
      prevCount = count;
    }
    return prevLe;
  }

  const snaps = []; // the polls within the longest window (and one before it)

  function baseFor(window) {
    const cur = snaps[snaps.length - 1];
    let base = snaps[0];
    for (const s of snaps) if (s.time <= cur.time - window) base = s;
    return base === cur ? null : base;
  }

  // One line's values: Map(group key -> {labels, value}).
  function evaluate(line) {
    const cur = snaps[snaps.length - 1];
    const scale = line.scale ?? 1;
    const scaled = (m) => { for (const g of m.values()) if (g.value != null) g.value *= scale; return m; };
    if (line.kind === "gauge") return scaled(sumBy(cur, line.metric, line.by, line.mean));
    if (line.kind === "rate") {
      const base = baseFor(RATE_WINDOW);
      if (!base) return new Map();
      const inc = increase(cur, base, line.metric, line.by, line.keep);
      for (const g of inc.values()) g.value /= cur.time - base.time;
      return scaled(inc);
    }
    const base = baseFor(WINDOW);
    if (!base) return new Map();
    if (line.kind === "quantile") {
      const inc = increase(cur, base, line.metric + "_bucket", [...line.by, "le"]);
      const groups = new Map();
      for (const g of inc.values()) {
        const k = groupKey(g.labels, line.by);
        if (!groups.has(k)) groups.set(k, { labels: g.labels, buckets: [] });
        groups.get(k).buckets.push([g.labels.le === "+Inf" ? Infinity : Number(g.labels.le), g.value]);
      }
      const out = new Map();
      for (const [k, g] of groups) out.set(k, { labels: g.labels, value: quantile(line.q, g.buckets) });
      return out;
    }
    if (line.kind === "ratio") {
      const add = (names) => {
        const out = new Map();
        for (const name of names) {
          for (const [k, g] of increase(cur, base, name, line.by)) {
            const o = out.get(k) || { labels: g.labels, value: 0 };
            o.value += g.value;
            out.set(k, o);
          }
        }
        return out;
      };
      const num = add(line.num);
      const out = new Map();
      for (const [k, d] of add(line.den)) {
        const n = num.get(k);
        out.set(k, { labels: d.labels, value: d.value > 0 ? ((n ? n.value : 0) / d.value) * scale : null });
      }
      return out;
    }
    throw new Error(`unknown line kind ${line.kind}`);
  }

  // ---- charts ------------------------------------------------------------------------------------
  class Chart {
    constructor(spec, parent) {
      this.spec = spec;
      const card = document.createElement("div");
      card.className = "card";
      card.id = "chart-" + spec.id;
      const h = document.createElement("h2");
      h.textContent = spec.title;
      this.el = document.createElement("div");
      this.note = document.createElement("p");
      this.note.className = "note";
      card.append(h, this.el, this.note);
      parent.append(card);
      this.keys = []; // series keys, in the order of the plot's series
      this.labels = new Map(); // key -> legend label
      this.xs = [];
      this.ys = new Map(); // key -> values aligned with xs
      this.plot = null;
    }

    push(time) {
      const values = new Map();
      for (const line of this.spec.lines) {
        for (const [k, g] of evaluate(line)) {
          const parts = line.by.map((l) => g.labels[l]).filter((v) => v);
          const key = line.label + "\u0002" + k;
          values.set(key, g.value);
          if (!this.labels.has(key)) this.labels.set(key, [line.label, ...parts].join(" · "));
        }
      }
      this.xs.push(time);
      for (const [key, v] of values) {
        if (!this.ys.has(key)) {
          this.ys.set(key, new Array(this.xs.length - 1).fill(null));
          this.keys.push(key);
          this.destroy(); // new series: rebuilt below with it
        }
      }
      for (const [key, ys] of this.ys) ys.push(values.has(key) ? values.get(key) : null);
      if (this.xs.length > HISTORY) {
        this.xs.shift();
        for (const ys of this.ys.values()) ys.shift();
      }
      this.render();
      this.setNote(values);
    }

    data() {
      return [this.xs, ...this.keys.map((k) => this.ys.get(k))];
    }

    render() {
      if (this.plot) {
        this.plot.setData(this.data());
        return;
      }
      const range = this.spec.range;
      this.plot = new uPlot({
        width: this.width(),
        height: 190,
        series: [
          { value: (u, t, si, idx) => { t = idx == null ? lastOf(u.data[0]) : t; return t == null ? "–" : new Date(t * 1000).toLocaleTimeString(); } },
          ...this.keys.map((k, i) => ({
            label: this.labels.get(k), stroke: COLORS[i % COLORS.length], width: 1.5,
            value: (u, v, si, idx) => fmt(idx == null ? lastOf(u.data[si]) : v), // no cursor: the latest value
          })),
        ],
        scales: {
          x: { time: true },
          y: { range: range ? () => range : (u, min, max) => [0, max > 0 ? max * 1.1 : 1] },
        },
        axes: [{}, { size: 56, values: (u, vals) => vals.map((v) => (v == null ? "" : String(+v.toPrecision(4)))) }],
        cursor: { drag: { x: false, y: false } },
      }, this.data(), this.el);
    }

    destroy() {
      if (this.plot) this.plot.destroy();
      this.plot = null;
    }

    width() {
      return Math.max(280, this.el.clientWidth || this.el.parentElement.clientWidth - 20);
    }

    setNote(values) {
      const last = snaps[snaps.length - 1];
      if (!this.spec.needs.some((n) => has(last, n))) {
        this.note.textContent = this.spec.absent || `not exported by this server: ${this.spec.needs.join(", ")}`;
      } else if (![...values.values()].some((v) => v != null)) {
        this.note.textContent = this.spec.idle || "no data yet";
      } else {
        this.note.textContent = "";
      }
    }

    // For tests and the curious: whether any series holds a value, and a non-zero one.
    summary() {
      const vals = this.keys.flatMap((k) => this.ys.get(k)).filter((v) => v != null);
      return { series: this.keys.map((k) => this.labels.get(k)), points: this.xs.length, values: vals.length,
               nonzero: vals.filter((v) => v !== 0).length, note: this.note.textContent };
    }
  }

  // ---- tables ------------------------------------------------------------------------------------
  function fillTable(id, rows) {
    const body = document.querySelector(`#${id} tbody`);
    body.replaceChildren(...rows.map((cells) => {
      const tr = document.createElement("tr");
      for (const c of cells) {
        const td = document.createElement("td");
        td.textContent = typeof c === "number" || c == null ? fmt(c) : c;
        tr.append(td);
      }
      return tr;
    }));
  }

  const valueOf = (m, k) => (m.has(k) ? m.get(k).value : null);
  const rateOf = (metric, by, keep) => evaluate({ kind: "rate", metric, by, keep, label: "" });
  // A cascade's escalation ends its small model's request as "escalated": the strong model's answer
  // is the tenant's request, counted when it finishes.
  const notEscalated = (labels) => labels.finished_reason !== "escalated";
  const wh = (m, k) => (m.has(k) ? m.get(k).value / 3600 : null);

  function updateTables() {
    const cur = snaps[snaps.length - 1];
    const models = new Set([...sumBy(cur, N.running, MODEL).keys(), ...sumBy(cur, N.state, MODEL).keys()]);
    const modelState = new Map();
    for (const s of samples(cur, N.state)) if (s.value === 1) modelState.set(s.labels.model_name, s.labels.state);
    const [running, waiting, requests] = [N.running, N.waiting, N.success].map((n) => sumBy(cur, n, MODEL));
    const [energy, cost] = [N.energy, N.cost].map((n) => sumBy(cur, n, MODEL));
    const tokens = rateOf(N.generation, MODEL);
    fillTable("models-table", [...models].sort().map((m) => [m, modelState.get(m) || "–", valueOf(running, m),
      valueOf(waiting, m), valueOf(requests, m), valueOf(tokens, m), wh(energy, m), valueOf(cost, m)]));

    const tenants = new Set();
    for (const name of [N.success, N.inFlight, N.rejected, N.attained, N.missed, N.energy, N.cost]) {
      for (const s of samples(cur, name)) if (s.labels.tenant) tenants.add(s.labels.tenant);
    }
    const [tEnergy, tCost, tInFlight, tRejected] = [N.energy, N.cost, N.inFlight, N.rejected].map((n) => sumBy(cur, n, TENANT));
    const tRequests = rateOf(N.success, TENANT, notEscalated);
    const tTokens = rateOf(N.generation, TENANT);
    const attainment = evaluate({ kind: "ratio", num: [N.attained], den: [N.attained, N.missed], by: TENANT, label: "", scale: 100 });
    fillTable("tenants-table", [...tenants].sort().map((t) => [t, valueOf(tRequests, t), valueOf(tTokens, t),
      valueOf(tInFlight, t), valueOf(tRejected, t),
      attainment.has(t) && attainment.get(t).value != null ? fmt(attainment.get(t).value) + " %" : "–",
      wh(tEnergy, t), valueOf(tCost, t)]));
    document.getElementById("tenants-note").textContent = tenants.size ? ""
      : "no tenant label on this server's metrics (it comes with --tenants)";
  }

  // ---- polling -----------------------------------------------------------------------------------
  const state = { polls: 0, charts: {}, last: null, errors: [], quantile };
  window.tokenmillDashboard = state;
  const grid = document.getElementById("charts");
  for (const spec of CHARTS) state.charts[spec.id] = new Chart(spec, grid);
  document.getElementById("window").textContent = WINDOW;
  document.getElementById("rate-window").textContent = RATE_WINDOW;
  const status = document.getElementById("status");

  function setStatus(text, error) {
    status.textContent = text;
    status.classList.toggle("error", !!error);
  }

  function ingest(data) {
    snaps.push(data);
    while (snaps.length > 2 && snaps[1].time <= data.time - WINDOW - 2 * INTERVAL) snaps.shift();
    state.last = data;
    for (const chart of Object.values(state.charts)) chart.push(data.time);
    updateTables();
    state.polls += 1;
  }

  async function pollOnce() {
    let r;
    try {
      r = await fetch("dashboard/data", { headers: KEY ? { Authorization: `Bearer ${KEY}` } : {}, cache: "no-store" });
    } catch (e) { // the network: the server is down or restarting
      setStatus(`no answer from the server (${e.message}); retrying`, true);
      return;
    }
    if (r.status === 401) {
      setStatus("the admin key is missing or wrong: open /dashboard#key=YOUR_ADMIN_KEY", true);
    } else if (!r.ok) {
      setStatus(`dashboard/data answered ${r.status}`, true);
    } else {
      ingest(await r.json());
      setStatus(`updated ${new Date().toLocaleTimeString()}`, false);
    }
  }

  async function poll() {
    const started = performance.now();
    try {
      await pollOnce();
    } catch (e) { // a bug here, not the network: say so on the page and in the console
      state.errors.push(String(e));
      setStatus(`dashboard error: ${e.message}`, true);
      console.error(e);
    } finally {
      setTimeout(poll, Math.max(0, INTERVAL * 1000 - (performance.now() - started)));
    }
  }

  window.addEventListener("resize", () => {
    for (const c of Object.values(state.charts)) if (c.plot) c.plot.setSize({ width: c.width(), height: 190 });
  });
  window.addEventListener("hashchange", () => location.reload()); // a new key or interval
  poll();
})();
