"""The start-up heap is frozen where what is alive lives as long as the process (a server, a
benchmark), before the first engine, so that engines stay collectable; the offline LLM leaves its
caller's heap alone (engine/gc_heap.py).

Each case runs in a fresh interpreter: the freeze happens once per process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tokenmill import ray as rs

PRELUDE = r"""
import gc, json, sys, weakref
try:
    import triton  # noqa: F401  (as on a GPU: its nanobind objects report leaks when never collected)
except ImportError:
    pass
"""

SERVER = PRELUDE + r"""
from tokenmill import ray as rs
before = [[i] for i in range(1000)]  # alive before the server: frozen with the rest
args = rs.build_parser().parse_args(["--model", sys.argv[1], "--kv-cache-memory", "0.01", "--log-level", "warning"])
server = rs.InProcessServer(args, host="127.0.0.1")
(entry,) = server.pool.entries.values()
engine = entry.engine
tracked = {id(o) for o in gc.get_objects()}  # (frozen objects are not listed)
report = {"frozen": gc.get_freeze_count(), "tracked": len(tracked), "early_frozen": id(before[0]) not in tracked,
          "engine_collectable": id(engine) in tracked, "pool_collectable": id(server.pool) in tracked}
t = __import__("time").perf_counter()
gc.collect()
report["full_collection_ms"] = (__import__("time").perf_counter() - t) * 1e3
server.stop()
try:  # a stopped pool says so, rather than handing out the context it let go
    __import__("asyncio").run(server.pool.acquire(entry.name))
    report["acquire_after_stop"] = "no error"
except Exception as e:
    report["acquire_after_stop"] = type(e).__name__
ref = weakref.ref(engine)
del engine, entry
gc.collect()
report["engine_freed_after_stop"] = ref() is None  # (the app's routes, cached by FastAPI, still hold the pool)
print(json.dumps(report))
"""

FAILED_START = PRELUDE + r"""
import os, shutil
from tokenmill import ray as rs
from tokenmill.engine.llm_engine import LLMEngine
broken = sys.argv[1] + "-broken"  # its config asks for layers its weights do not have: it fails to load
shutil.copytree(sys.argv[1], broken)
cfg = json.load(open(os.path.join(broken, "config.json")))
cfg["num_hidden_layers"] += 3
json.dump(cfg, open(os.path.join(broken, "config.json"), "w"))
args = rs.build_parser().parse_args(["--model", sys.argv[1], "--model", broken, "--kv-cache-memory", "0.01",
                                     "--memory-budget", "1", "--log-level", "error"])
report = {}
try:
    rs.InProcessServer(args, host="127.0.0.1")
except Exception as e:
    report["error"] = type(e).__name__
shutil.rmtree(broken)
gc.collect()
report["engines_alive"] = sum(isinstance(o, LLMEngine) for o in gc.get_objects())
print(json.dumps(report))
"""

OFFLINE = PRELUDE + r"""
from tokenmill import LLM, SamplingParams

class Evaluator:  # a caller's object in a reference cycle (a bound method kept on itself), holding an LLM
    def __init__(self, path):
        self.score = self.run
        self.llm = LLM(path, kv_cache_memory_bytes=4 * 2**20, seed=0)
    def run(self):
        return self.llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=4))

ev = Evaluator(sys.argv[1])
ev.run()
ref = weakref.ref(ev.llm.engine)
report = {"frozen": gc.get_freeze_count()}
del ev
gc.collect()
report["engine_freed"] = ref() is None
print(json.dumps(report))
"""


def _run(script: str, model_dir: str, env: dict[str, str]) -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, "-c", script, model_dir], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env}, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_a_server_freezes_its_start_up_heap_before_its_engines(model_dir):
    report, stderr = _run(SERVER, model_dir, {"TOKENMILL_GC_FREEZE": "1"})
    assert report["frozen"] > 50_000 and report["early_frozen"]  # torch's and transformers' objects, at least
    # Made after the freeze: a model the pool drops is reclaimed with its cycles and device memory.
    assert report["engine_collectable"] and report["pool_collectable"], report
    # What full collections still walk: the engine and what came after (~400,000 objects unfrozen,
    # ~190 ms a collection on this CPU; sympy, which loading a model imports, is preloaded and frozen).
    assert report["tracked"] < 0.15 * report["frozen"], report
    # Unfrozen at exit: C extensions (triton's nanobind) report no leaked objects.
    assert "leaked" not in stderr, stderr[-2000:]
    # A stopped server lets its engine go (weights, KV cache): a process may start another.
    assert report["engine_freed_after_stop"] and report["acquire_after_stop"] == "PoolError", report


def test_the_freeze_can_be_turned_off(model_dir):
    report, _ = _run(SERVER, model_dir, {"TOKENMILL_GC_FREEZE": "0"})
    assert report["frozen"] == 0 and not report["early_frozen"] and report["engine_collectable"]
    assert report["engine_freed_after_stop"], report


def test_a_failed_start_lets_the_models_it_loaded_go(model_dir, tmp_path):
    """The second model fails to load: the first, loaded already, is let go with the pool."""
    import shutil

    path = shutil.copytree(model_dir, str(tmp_path / "m"))
    report, _ = _run(FAILED_START, path, {"TOKENMILL_GC_FREEZE": "0"})
    assert report["error"] and report["engines_alive"] == 0, report


def test_the_offline_llm_leaves_its_callers_heap_alone(model_dir):
    """A caller's object frozen with the heap and later a cycle would keep its engine forever."""
    report, _ = _run(OFFLINE, model_dir, {"TOKENMILL_GC_FREEZE": "1"})
    assert report == {"frozen": 0, "engine_freed": True}


def test_ray_replicas_do_not_take_ray_serves_own_freeze():
    """Ray Serve freezes a replica's heap once it is built, engines included: tokenmill's replicas turn
    that off (they froze their own before their first engine), keeping the caller's runtime_env."""
    opts = rs.replica_actor_options({"num_cpus": 1, "runtime_env": {"env_vars": {"A": "1"}, "pip": ["x"]}})
    assert opts == {"num_cpus": 1, "runtime_env": {"env_vars": {"RAY_SERVE_FREEZE_GC_ON_STARTUP": "0", "A": "1"},
                                                   "pip": ["x"]}}
    assert rs.replica_actor_options({})["runtime_env"] == {"env_vars": {"RAY_SERVE_FREEZE_GC_ON_STARTUP": "0"}}
    # An operator who sets it keeps their choice.
    mine = rs.replica_actor_options({"runtime_env": {"env_vars": {"RAY_SERVE_FREEZE_GC_ON_STARTUP": "1"}}})
    assert mine["runtime_env"]["env_vars"]["RAY_SERVE_FREEZE_GC_ON_STARTUP"] == "1"
