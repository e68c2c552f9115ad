"""The live dashboard: GET /dashboard (a static page), GET /dashboard/data (every `tokenmill:` series
of the server's Prometheus registry as JSON, behind the admin key when one is set) and the page's
assets under /dashboard/static, shipped in the package (tokenmill/server/static: the page, its
script and the vendored uPlot charting library; nothing is fetched from elsewhere).

The page holds no data: it polls /dashboard/data every second and computes rates and windowed
percentiles (from histogram bucket deltas) itself, the way PromQL's rate() and histogram_quantile()
do on a Prometheus server, so the JSON is only the registry's current samples.

`tokenmill router` serves the same page (register_page) and its own /dashboard/data: every replica's
snapshot, merged (merge_snapshots) with a `replica` label on each sample, so the page follows each
replica's counters apart and sums them, rather than seeing one replica's after another's.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse
from starlette.staticfiles import StaticFiles

if TYPE_CHECKING:
    from tokenmill.server.gateway import Gateway

PREFIX = "tokenmill:"
STATIC = Path(__file__).resolve().parent.parent / "static"  # package data (pyproject.toml)


def snapshot(registry: Any) -> dict[str, Any]:
    """{"time", "series": {sample name: [{"labels", "value"}]}, "types": {sample name: family type}}.

    Sample names are those of /metrics (counters end in _total, histograms come as _bucket, _sum
    and _count), so the page and a Grafana dashboard name the same series. A value that is not
    finite (a gauge's NaN) is null: JSON has no NaN."""
    series: dict[str, list[dict[str, Any]]] = {}
    types: dict[str, str] = {}
    for family in registry.collect():
        if not family.name.startswith(PREFIX):
            continue
        for s in family.samples:
            if not s.name.startswith(PREFIX):
                continue
            value = float(s.value)
            series.setdefault(s.name, []).append({"labels": dict(s.labels),
                                                  "value": value if math.isfinite(value) else None})
            types[s.name] = family.type
    return {"time": time.time(), "series": series, "types": types}


def merge_snapshots(snaps: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Several servers' snapshots (by their url) as one: each sample labelled `replica` with its
    server's url, the time now (the page's rates are over the merged polls' times), and the
    replicas it holds (the page counts no increase for one the poll before lacked)."""
    series: dict[str, list[dict[str, Any]]] = {}
    types: dict[str, str] = {}
    for url, snap in snaps.items():
        for name, samples in (snap.get("series") or {}).items():
            out = series.setdefault(name, [])
            for s in samples:
                out.append({"labels": {**s.get("labels", {}), "replica": url}, "value": s.get("value")})
        types.update(snap.get("types") or {})
    return {"time": time.time(), "series": series, "types": types, "replicas": list(snaps)}


def register_page(app: FastAPI) -> None:
    """GET /dashboard and its assets (a server's and a router's)."""
    page = (STATIC / "dashboard.html").read_text(encoding="utf-8")

    @app.get("/dashboard", include_in_schema=False)
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    app.mount("/dashboard/static", StaticFiles(directory=STATIC), name="dashboard-static")


def register(app: FastAPI, gw: Gateway) -> None:
    @app.get("/dashboard/data")
    async def dashboard_data(request: Request) -> dict[str, Any]:
        """The current value of every `tokenmill:` series (what /metrics shows), as JSON."""
        gw.check_admin(request)
        return snapshot(gw.metrics.registry)

    register_page(app)
