"""tokenmill on Ray Serve (tokenmill/ray.py): a local Ray cluster on 127.0.0.1 only, tokenmill replicas
of a tiny model behind the router ingress, driven through Serve's HTTP proxy with the official openai client;
autoscaling on the replicas' queue depth. Skipped without the `ray` extra."""

from __future__ import annotations

import json
import os
import secrets
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tokenmill import SamplingParams
from tokenmill import ray as rs
from tokenmill.server.serve import free_port

PROMPTS = ["Hello world! How are you", "The quick brown fox", "def fib(n):", "Café crème", "Stop here. STOP."]
FLAGS = ["--kv-cache-memory", "0.0625", "--max-num-batched-tokens", "256", "--shutdown-timeout", "5",
         "--num-cpus-per-replica", "1", "--log-level", "warning"]
APP = "tokenmill"
pytestmark = [
    # ray.serve's own config models under pydantic 2.x; autoscaling's metrics_interval_s still works but warns.
    pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The `metrics_interval_s` field:DeprecationWarning"),
]


@pytest.fixture(scope="module")
def ray_env():
    """(ray, whether its cluster will be on 127.0.0.1 only): the environment is set before ray is first
    imported, as the loopback switch is read at import; if something imported ray earlier, it is too late."""
    added = {"RAY_AUTH_TOKEN": secrets.token_hex(32),  # token auth as Ray's default, without writing ~/.ray
             **rs.LEAN_RAY_ENV, **rs.LOOPBACK_RAY_ENV}
    added = {k: v for k, v in added.items() if k not in os.environ}
    os.environ.update(added)
    loopback = "ray" not in sys.modules
    yield pytest.importorskip("ray", reason="ray[serve] is in the `ray` extra"), loopback
    for k in added:
        os.environ.pop(k, None)


@pytest.fixture(scope="module")
def serve_url(ray_env):
    from ray import serve

    rs.init_local_ray(num_cpus=4, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray_env[0].shutdown()


@pytest.fixture
def deploy(serve_url):
    """deploy(*flags) runs the app with `python -m tokenmill.ray`'s flags; deleted after the test."""
    from ray import serve

    def run(*flags: str):
        args = rs.build_parser().parse_args(list(flags))
        return serve.run(rs.build_app(rs.groups_from_args(args), rs.router_config_from_args(args)), name=APP,
                         route_prefix="/")

    yield run
    serve.delete(APP)


@pytest.fixture(scope="module")
def local_host(ray_env) -> str:
    """Where the replicas listen: http://127.0.0.1:PORT, or the outward IP when ray came first."""
    return "http://127.0.0.1:" if ray_env[1] else "http://"


def _client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_two_replicas_greedy_through_the_ingress(deploy, serve_url, local_host, model_dir, model_name, llm):
    fleet = rs.wait_for_fleet(deploy("--model", model_dir, *FLAGS, "--replicas", "2"), 2, timeout=120)
    assert len(fleet) == 2 and all(u.startswith(local_host) for u in fleet)

    params = SamplingParams(max_tokens=16, temperature=0)
    expected = [o.outputs[0].text for o in llm.generate(PROMPTS, params)]
    client = _client(serve_url)

    def complete(prompt: str) -> str:
        return client.completions.create(model=model_name, prompt=prompt, max_tokens=16, temperature=0).choices[0].text

    with ThreadPoolExecutor(4) as ex:  # concurrent, so both replicas and the router's balancing take part
        assert list(ex.map(complete, PROMPTS * 2)) == expected * 2

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    want = llm.chat(messages, params)[0].outputs[0].text
    got = client.chat.completions.create(model=model_name, messages=messages, max_tokens=16, temperature=0)
    assert got.choices[0].message.content == want
    stream = client.chat.completions.create(model=model_name, messages=messages, max_tokens=16, temperature=0,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want

    # Each replica is a full tokenmill server with the same weights; together they served everything above.
    served = 0
    for url in fleet:
        assert _client(url).completions.create(model=model_name, prompt=PROMPTS[0], max_tokens=16,
                                               temperature=0).choices[0].text == expected[0]
        served += _requests_served(url)
    assert served == 2 * len(PROMPTS) + 2 + len(fleet)


def _requests_served(url: str) -> int:
    text = httpx.get(url + "/metrics").text
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("tokenmill:request_success_total{")))


def test_autoscaling_on_queue_depth(deploy, serve_url, local_host, model_dir, model_name):
    """One replica, a target of one sequence per replica: sustained load adds the second replica, which
    the ingress then routes to; once the load stops it goes again."""
    fast = {"metrics_interval_s": 0.5, "look_back_period_s": 2.0, "upscale_delay_s": 0.0, "downscale_delay_s": 2.0}
    handle = deploy("--model", model_dir, *FLAGS, "--replicas", "1", "--min-replicas", "1", "--max-replicas", "2",
                    "--target-requests-per-replica", "1", "--autoscaling-config", json.dumps(fast))
    (first,) = rs.wait_for_fleet(handle, 1, timeout=120)

    stop = threading.Event()
    client = _client(serve_url)

    def load() -> None:
        while not stop.is_set():
            client.completions.create(model=model_name, prompt="The quick brown fox", max_tokens=64, temperature=0,
                                      extra_body={"ignore_eos": True})

    with ThreadPoolExecutor(3) as ex:
        futures = [ex.submit(load) for _ in range(3)]
        try:
            fleet = rs.wait_for_fleet(handle, 2, timeout=90)
        finally:
            stop.set()
        for f in futures:
            f.result()
    (second,) = set(fleet) - {first}
    assert second.startswith(local_host)
    (last,) = rs.wait_for_fleet(handle, 1, timeout=60)  # idle: back to min_replicas
    out = client.completions.create(model=model_name, prompt="Hello", max_tokens=4, temperature=0)
    assert out.choices[0].finish_reason in ("length", "stop") and last in (first, second)


def test_policy_from_queue_depth_and_kv_usage(ray_env):
    """QueueKVAutoscalingPolicy on its own: replicas needed by queue depth or by KV usage, whichever is more."""
    from ray.serve.config import AutoscalingContext

    def ctx(running: list[float], waiting: list[float], kv: list[float], current: int = 2) -> AutoscalingContext:
        ids = [f"r{i}" for i in range(len(running))]
        metrics = {rs.METRIC_RUNNING: dict(zip(ids, running)), rs.METRIC_WAITING: dict(zip(ids, waiting)),
                   rs.METRIC_KV_USAGE: dict(zip(ids, kv))} if running else {}
        return AutoscalingContext(
            deployment_id=None, deployment_name="TokenmillReplica", app_name=APP, current_num_replicas=current,
            target_num_replicas=current, running_replicas=ids, total_num_requests=0.0, total_queued_requests=0.0,
            aggregated_metrics=metrics, raw_metrics=None, capacity_adjusted_min_replicas=1,
            capacity_adjusted_max_replicas=8, policy_state={}, last_scale_up_time=None, last_scale_down_time=None,
            current_time=0.0, config=None)

    policy = rs.QueueKVAutoscalingPolicy(target_requests_per_replica=8, target_kv_usage=0.5)
    assert policy(ctx([8, 8], [8, 8], [0.1, 0.1]))[0] == 4  # 32 sequences / 8 per replica
    assert policy(ctx([1, 1], [0, 0], [0.9, 0.6]))[0] == 3  # KV 1.5 in all / 0.5 per replica
    assert policy(ctx([0, 1], [0, 0], [0.0, 0.05]))[0] < 1  # idle: Serve rounds up and keeps min_replicas
    assert policy(ctx([], [], [], current=3))[0] == 3  # no reports yet: hold
    with pytest.raises(ValueError):
        rs.QueueKVAutoscalingPolicy(target_kv_usage=1.5)


def test_a_replica_that_cannot_listen_stops_its_engines(model_dir, monkeypatch):
    """InProcessServer (a replica's server; no Ray needed): when its port cannot be bound after the
    model has loaded, the model pool is stopped before the error goes up, so the process that
    lives on holds no engine threads."""
    import socket

    from tokenmill.server.pool import ModelPool

    stopped = []
    stop = ModelPool.stop
    monkeypatch.setattr(ModelPool, "stop", lambda self, *a, **k: (stopped.append(self), stop(self, *a, **k)))
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        args = rs.build_parser().parse_args(["--model", model_dir, *FLAGS])
        with pytest.raises(ValueError, match="already in use"):
            rs.InProcessServer(args, host="127.0.0.1", port=taken.getsockname()[1])
    finally:
        taken.close()
    assert len(stopped) == 1 and not stopped[0].is_running


def test_tenants_reach_the_ingress_router_with_an_operator_key(model_dir, tmp_path):
    """`serve --ray --tenants FILE`: the replicas get the file with the rest of the flags, the ingress
    router gets the tenants (keys, salts, fleet-wide limits) and, without --api-key, the key the
    replicas show their KV events to (with tenants, the operator's only): one made for both."""
    import yaml

    from tokenmill.ops.tenants import hash_key

    path = tmp_path / "tenants.yaml"
    path.write_text(yaml.safe_dump({"tenants": [{"name": "acme", "keys_sha256": [hash_key("k")]}]}))
    for given in ([], ["--api-key", "operator"]):
        args = rs.build_parser().parse_args(["--model", model_dir, "--replicas", "2", "--tenants", str(path), *given])
        (group,) = rs.groups_from_args(args)
        config = rs.router_config_from_args(args)
        assert [t.name for t in config["tenants"].tenants] == ["acme"]
        assert group.args.tenants == str(path) and config["replica_api_key"] == group.args.api_key
        assert (group.args.api_key == "operator") if given else (len(group.args.api_key) > 30)
    args = rs.build_parser().parse_args(["--model", model_dir, "--replicas", "2"])  # no tenants: no key made
    assert rs.router_config_from_args(args) == {"policy": args.router_policy, "max_body_bytes": args.max_body_size}
    assert not rs.groups_from_args(args)[0].args.api_key


@pytest.mark.parametrize("flags,message", [
    (["--model", "/nonexistent"], "is not a folder"),
    (["--max-body-size", "0"], "--max-body-size"),
    (["--max-queue", "0"], "--max-queue"),
    (["--min-replicas", "1", "--max-replicas", "2", "--target-kv-usage", "5"], "--target-kv-usage"),
    (["--min-replicas", "1", "--max-replicas", "2", "--target-requests-per-replica", "0"],
     "--target-requests-per-replica"),
    (["--min-replicas", "2", "--max-replicas", "1"], "--min-replicas 2 is above --max-replicas 1"),
    (["--replica-resources", "{nope"], "--replica-resources: not valid JSON"),
    (["--autoscaling-config", "[1]"], "--autoscaling-config: a JSON object"),
    (["--num-cpus-per-replica", "-1"], "--num-cpus-per-replica"),
])
def test_serve_ray_checks_its_flags_before_starting_a_cluster(model_dir, monkeypatch, flags, message):
    """A mistake is a one-line error before Ray starts (a traceback after 40 s of Serve retrying a
    replica before; a bad autoscaling target, a Serve controller logging tracebacks forever)."""
    monkeypatch.setattr(rs, "init_local_ray", lambda *a, **k: pytest.fail("a cluster was started"))
    args = rs.build_parser().parse_args(["--model", model_dir, *FLAGS, *flags, "--port", str(free_port())])
    with pytest.raises(ValueError, match=message):
        rs.run_ray(args)


def test_serve_ray_refuses_a_taken_port_and_resources_its_cluster_lacks(model_dir, monkeypatch):
    import socket

    monkeypatch.setattr(rs, "init_local_ray", lambda *a, **k: pytest.fail("a cluster was started"))
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        args = rs.build_parser().parse_args(["--model", model_dir, *FLAGS, "--port", str(taken.getsockname()[1])])
        with pytest.raises(ValueError, match="already in use"):
            rs.run_ray(args)
    finally:
        taken.close()
    args = rs.build_parser().parse_args(["--model", model_dir, *FLAGS, "--replicas", "3",
                                         "--replica-resources", '{"h100": 1}'])
    groups = rs.groups_from_args(args)
    with pytest.raises(ValueError, match="need 3 CPU and the local Ray cluster has 2: lower --replicas"):
        rs._check_resources(groups, {"CPU": 2.0, "h100": 8.0})
    with pytest.raises(ValueError, match="need 3 h100 .* --replica-resources"):
        rs._check_resources(groups, {"CPU": 4.0, "h100": 2.0})
    rs._check_resources(groups, {"CPU": 3.0, "h100": 3.0})
