"""schemathesis, driven by the server's own /openapi.json: generated requests to every route,
valid and invalid bodies alike, never get a 5xx and never hang."""

from __future__ import annotations

import os

import pytest

if os.environ.get("CI"):  # CI installs the `clients` extra: a missing schemathesis must fail there
    import schemathesis
else:
    schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the `clients` extra")

from hypothesis import HealthCheck, given, settings  # noqa: E402

from tests.server_utils import ServerProcess  # noqa: E402


@pytest.fixture(scope="module")
def api(model_dir, tmp_path_factory):
    # A short context and a small queue bound what a generated request can cost (n x max_tokens).
    log = str(tmp_path_factory.mktemp("schemathesis") / "server.log")
    srv = ServerProcess(model_dir, "--kv-cache-memory", "0.0625", "--max-model-len", "96", "--max-queue", "64",
                        log_path=log)
    yield srv
    assert srv.stop() == 0


def test_no_server_errors(api):
    """Each operation gets 50 generated cases (derandomized, so a failure reproduces)."""
    schema = schemathesis.openapi.from_url(api.base_url + "/openapi.json")
    schema.config.update(base_url=api.base_url)
    operations = [r.ok() for r in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/tokenize"}
    for op in operations:

        @given(case=op.as_strategy())
        @settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def call(case):
            # A hang fails as a timeout. /v1/kv_events never ends (its events come at once, then a heartbeat a
            # second) and schemathesis reads an event stream until the timeout passes in total: 5 s of it suffice.
            response = case.call(timeout=5 if case.operation.path == "/v1/kv_events" else 60)
            assert response.status_code < 500, (case.as_curl_command(), response.status_code, response.text[:500])

        call()
