"""The start-up heap is frozen before the first engine, and engines stay collectable (engine/gc_heap.py).

Each case runs in a fresh interpreter: the freeze happens once per process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

SCRIPT = r"""
import gc, json, sys, weakref
try:
    import triton  # noqa: F401  (as on a GPU: its nanobind objects report leaks when never collected)
except ImportError:
    pass
from tokenmill import LLM, SamplingParams

before = [[i] for i in range(1000)]  # alive before the first engine: frozen with the rest
llm = LLM(sys.argv[1], kv_cache_memory_bytes=4 * 2**20, seed=0)
llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=4))
engine = llm.engine
tracked = [id(o) for o in gc.get_objects()]  # (frozen objects are not listed)
report = {"frozen": gc.get_freeze_count(), "engine_collectable": id(engine) in tracked,
          "early_frozen": id(before[0]) not in tracked}
t = __import__("time").perf_counter()
gc.collect()
report["full_collection_ms"] = (__import__("time").perf_counter() - t) * 1e3
# An engine in a reference cycle (as the pool's engines are) is reclaimed by a collection.
engine.cycle = engine
ref = weakref.ref(engine)
del llm, engine
gc.collect()
report["engine_freed"] = ref() is None
# A second engine in the same process freezes nothing more.
n = gc.get_freeze_count()
LLM(sys.argv[1], kv_cache_memory_bytes=4 * 2**20, seed=0)
report["second_froze"] = gc.get_freeze_count() != n
print(json.dumps(report))
"""


def _run(model_dir: str, env: dict[str, str]) -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, model_dir], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env}, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_the_start_up_heap_is_frozen_before_the_first_engine(model_dir):
    report, stderr = _run(model_dir, {"TOKENMILL_GC_FREEZE": "1"})
    assert report["frozen"] > 50_000  # torch's and transformers' objects, at least
    assert report["early_frozen"]
    assert report["engine_collectable"], "the engine was frozen: the pool could never reclaim a dropped one"
    assert report["engine_freed"]
    assert not report["second_froze"]
    assert report["full_collection_ms"] < 100
    # Unfrozen at exit: C extensions (triton's nanobind) report no leaked objects.
    assert "leaked" not in stderr, stderr[-2000:]


def test_the_freeze_can_be_turned_off(model_dir):
    report, _ = _run(model_dir, {"TOKENMILL_GC_FREEZE": "0"})
    assert report["frozen"] == 0 and not report["early_frozen"]
    assert report["engine_collectable"] and report["engine_freed"]
