"""The slo scheduling policy through a real server: interactive requests with targets overtake a
backlog of batch requests and meet their targets, admission refuses or demotes a request whose
target cannot be met, and the attainment counters and goodput gauge report it."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from tests.server_utils import ServerProcess

INTERACTIVE = {"ttft_ms": 2000, "tpot_ms": 1000}
PROMPT = "the quick brown fox jumps over the lazy dog " * 6


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log = str(tmp_path_factory.mktemp("slo") / "server.log")
    s = ServerProcess(model_dir, "--scheduling-policy", "slo", "--max-num-seqs", "2", "--kv-cache-memory", "0.01",
                      log_path=log)
    yield s
    s.stop()


def _samples(server: ServerProcess, name: str) -> dict[str, float]:
    return {k: v for k, v in server.metrics().items() if k.startswith(name)}


def test_interactive_requests_overtake_a_batch_backlog(server, client, model_name):
    stop = threading.Event()
    finished: list[str] = []

    def batch(i: int) -> None:
        try:
            stream = client.completions.create(model=model_name, prompt=f"{i} {PROMPT}", max_tokens=400, stream=True,
                                               extra_body={"ignore_eos": True})
            for _ in stream:
                if stop.is_set():
                    stream.close()
                    return
            finished.append(f"b{i}")
        except openai.APIError:
            pass

    threads = [threading.Thread(target=batch, args=(i,), daemon=True) for i in range(8)]
    for t in threads:
        t.start()
    try:
        deadline = time.time() + 60
        while server.metric("tokenmill:num_requests_waiting") < 4:  # 2 run, the others wait
            assert time.time() < deadline, "the batch backlog never formed"
            time.sleep(0.05)
        for j in range(3):
            t0 = time.time()
            stream = client.chat.completions.create(
                model=model_name, messages=[{"role": "user", "content": f"hi {j}"}], max_tokens=8, stream=True,
                extra_body={"slo": INTERACTIVE, "ignore_eos": True})
            first = None
            for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.time() - t0
            assert first is not None and first < INTERACTIVE["ttft_ms"] / 1000
            # it finished while the batch requests that came before it still wait
            assert server.metric("tokenmill:num_requests_waiting") >= 1
        assert len(finished) <= 2
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    attained = _samples(server, "tokenmill:slo_attained_total")
    assert sum(v for k, v in attained.items() if 'slo_class="custom"' in k) >= 3, attained
    goodput = _samples(server, "tokenmill:goodput")
    assert sum(goodput.values()) > 0, goodput


def test_unreachable_target_is_demoted_and_counted(server, client, model_name):
    out = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=4,
                                    extra_body={"slo": {"ttft_ms": 0.001}})
    assert out.choices[0].text is not None
    missed = _samples(server, "tokenmill:slo_missed_total")
    assert any('reason="demoted"' in k and v >= 1 for k, v in missed.items()), missed


@pytest.mark.parametrize("slo, message", [
    ({"ttft_ms": -5}, "slo.ttft_ms: must be a positive number"),
    ({"ttft_ms": "fast"}, "slo.ttft_ms"),
    ({"deadline": 3}, "unknown field"),
])
def test_bad_targets_are_400s(server, client, model_name, slo, message):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model_name, prompt="hi", max_tokens=2, extra_body={"slo": slo})
    assert message in e.value.message
    assert e.value.body["param"] == "slo"


def test_reject_mode_answers_429_with_the_reason(model_dir, model_name, tmp_path):
    s = ServerProcess(model_dir, "--scheduling-policy", "slo", "--slo-admission", "reject",
                      "--kv-cache-memory", "0.01", log_path=str(tmp_path / "server.log"))
    try:
        r = httpx.post(s.base_url + "/v1/completions", timeout=30, json={
            "model": model_name, "prompt": PROMPT, "max_tokens": 4, "slo": {"ttft_ms": 0.001}})
        assert r.status_code == 429, r.text
        err = r.json()["error"]
        assert err["code"] == "slo_unattainable" and "predicted time to first token" in err["message"]
        assert "retry-after" in r.headers
        ok = httpx.post(s.base_url + "/v1/completions", timeout=30, json={
            "model": model_name, "prompt": PROMPT, "max_tokens": 4, "slo": {"ttft_ms": 60000}})
        assert ok.status_code == 200, ok.text
        missed = {k: v for k, v in s.metrics().items() if k.startswith("tokenmill:slo_missed_total")}
        assert any('reason="rejected"' in k and v == 1 for k, v in missed.items()), missed
        assert s.metric("tokenmill:num_requests_running") == 0  # nothing left behind

        # Test-time compute launches its paths in waves, the later ones long after the arrival: the
        # request is admitted once, by its first launch, and counted once (it was refused half-way
        # with a 429 once the TTFT budget had gone, and each launch counted as a request).
        def totals() -> tuple[float, ...]:
            m = s.metrics()
            return tuple(sum(v for k, v in m.items() if k.startswith(name)) for name in (
                "tokenmill:slo_attained_total", "tokenmill:slo_missed_total", "tokenmill:request_success_total",
                "tokenmill:prompt_tokens_total", "tokenmill:generation_tokens_total",
                'tokenmill:request_success_total{finished_reason="length"'))

        before = totals()
        r = httpx.post(s.base_url + "/v1/completions", timeout=120, json={
            "model": model_name, "prompt": "Solve: 2+2=", "max_tokens": 60, "temperature": 1.0, "ignore_eos": True,
            "slo": {"ttft_ms": 250}, "test_time_compute": {"n": 8, "early_stop": True, "wave": 2, "warmup": 2}})
        assert r.status_code == 200, r.text
        assert r.json()["test_time_compute"]["paths_started"] > 2  # (later waves ran)
        u = r.json()["usage"]
        after = totals()
        assert after[0] + after[1] - before[0] - before[1] == 1 and after[2] - before[2] == 1, (before, after)
        assert after[5] - before[5] == 1  # (the run's outcome: paths it stopped are no client's abort)
        assert (after[3] - before[3], after[4] - before[4]) == (u["prompt_tokens"], u["completion_tokens"])
        # Scoring: the engine's one token per prompt is nobody's output, in the metrics as in usage.
        before = totals()
        r = httpx.post(s.base_url + "/v1/completions", timeout=60, json={
            "model": model_name, "prompt": ["one two three", "four five"], "max_tokens": 0, "echo": True,
            "logprobs": 1})
        assert r.status_code == 200, r.text
        assert totals()[4] == before[4] and r.json()["usage"]["completion_tokens"] == 0
        # A vote settled early stops the paths still running: the request still counts by its outcome.
        before = totals()
        r = httpx.post(s.base_url + "/v1/completions", timeout=120, json={
            "model": model_name, "prompt": "Solve: 2+2=", "max_tokens": 40, "temperature": 1.0, "seed": 0,
            "slo": {"ttft_ms": 60000}, "stop": [" ", "e", "a"], "test_time_compute": {
                "n": 8, "early_stop": True, "wave": 4, "warmup": 2, "consensus": 0.6, "answer_pattern": "^"}})
        assert r.status_code == 200, r.text
        assert any(p["state"] == "stopped" for p in r.json()["test_time_compute"]["paths"])  # (some were stopped)
        after = totals()
        assert after[0] - before[0] == 1 and after[2] - before[2] == 1, (before, after)  # attained, not an abort
    finally:
        s.stop()
