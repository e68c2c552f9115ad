"""`tokenmill serve` with an injected engine fault: any step that includes a request seeded
666 raises, as a kernel bug triggered by one request's input would. Used by test_server.py to
check that such a request fails alone and the server keeps serving the others. With
TOKENMILL_FAULT_UNPARK=NAME, bringing back the parked model in folder NAME fails; with
TOKENMILL_FAULT_PARK=NAME, parking it fails once the server runs (test_model_pool.py); with
TOKENMILL_FAULT_DIE_SEED=N, the process dies (as a crash would) at the first step of a request
seeded N, before its first token (test_fleet.py); with TOKENMILL_FAULT_SLOW_SEED=N, every step
that includes a request seeded N first sleeps TOKENMILL_FAULT_SLOW_S seconds (default 0.05): a
request that stays in flight long enough for a test to act meanwhile (test_tenants.py); with
TOKENMILL_FAULT_TRACE_THREADS=PATH, it appends to PATH the thread each model is built on and
first stepped on (test_model_pool.py; a file of its own, since the log interleaves threads' lines);
with TOKENMILL_FAULT_DIE_AFTER_SSE=TEXT, the process dies right after writing a chat stream's first
SSE message that holds TEXT (test_fleet.py)."""

import os
import sys
import time

from tokenmill.engine.model_runner import ModelRunner

POISON_SEED = 666
_launch = ModelRunner.launch  # (every step starts there, synchronous or async)


# None when unset: a default such as -1 is a seed a request may carry (the fuzz tests sent one,
# and the server died on it).
DIE_SEED = int(os.environ["TOKENMILL_FAULT_DIE_SEED"]) if "TOKENMILL_FAULT_DIE_SEED" in os.environ else None
SLOW_SEED = int(os.environ["TOKENMILL_FAULT_SLOW_SEED"]) if "TOKENMILL_FAULT_SLOW_SEED" in os.environ else None
SLOW_S = float(os.environ.get("TOKENMILL_FAULT_SLOW_S", "0.05"))


def _faulty_launch(self, sched, *args, **kwargs):
    if SLOW_SEED is not None and any(s.seq.params.seed == SLOW_SEED for s in sched.scheduled):
        time.sleep(SLOW_S)
    if any(s.seq.params.seed == POISON_SEED for s in sched.scheduled):
        raise RuntimeError("injected fault")
    if DIE_SEED is not None and any(s.seq.params.seed == DIE_SEED for s in sched.scheduled):
        os._exit(9)
    return _launch(self, sched, *args, **kwargs)


ModelRunner.launch = _faulty_launch

if os.environ.get("TOKENMILL_FAULT_UNPARK"):  # bringing back this model (a folder name) fails: no memory
    _allocate = ModelRunner.allocate_kv_cache

    def _faulty_allocate(self, num_blocks=None):
        if num_blocks is not None and os.path.basename(self.config.model) == os.environ["TOKENMILL_FAULT_UNPARK"]:
            raise MemoryError("injected: no memory for the KV cache")
        return _allocate(self, num_blocks)

    ModelRunner.allocate_kv_cache = _faulty_allocate

if os.environ.get("TOKENMILL_FAULT_PARK"):  # parking this model fails (no pinned host memory for its weights)
    from tokenmill.engine.llm_engine import LLMEngine

    _park = LLMEngine.park

    def _faulty_park(self, offload_weights=None):
        if os.path.basename(self.config.model) == os.environ["TOKENMILL_FAULT_PARK"] and _started():
            raise RuntimeError("injected: no pinned memory for the weights")
        return _park(self, offload_weights)

    def _started() -> bool:  # startup may park to settle which models are active; the fault is for later
        f = sys._getframe()
        while f is not None:  # the pool's startup (_load_initial) runs on the engine thread too
            if f.f_code.co_name == "_load_initial":
                return False
            f = f.f_back
        return True

    LLMEngine.park = _faulty_park

if os.environ.get("TOKENMILL_FAULT_TRACE_THREADS"):
    import threading

    from tokenmill.engine.llm_engine import LLMEngine
    from tokenmill.server.pool import ModelPool

    _build, _step = ModelPool._build, LLMEngine.step
    _stepped: set[int] = set()
    _trace_lock = threading.Lock()

    def _trace(line: str) -> None:
        with _trace_lock, open(os.environ["TOKENMILL_FAULT_TRACE_THREADS"], "a") as f:
            f.write(line + "\n")

    def _traced_build(self, spec):
        _trace(f"build {os.path.basename(spec.config.model)} on {threading.current_thread().name}")
        return _build(self, spec)

    def _traced_step(self):
        if id(self) not in _stepped:
            _stepped.add(id(self))
            _trace(f"step {os.path.basename(self.config.model)} on {threading.current_thread().name}")
        return _step(self)

    ModelPool._build, LLMEngine.step = _traced_build, _traced_step

if os.environ.get("TOKENMILL_FAULT_DIE_AFTER_SSE"):  # dies once an SSE write holding this text has gone out
    from tokenmill.server.routes import chat

    _sse_response, _marker = chat.sse_response, os.environ["TOKENMILL_FAULT_DIE_AFTER_SSE"]

    def _dying_sse_response(events, release):
        async def dying():
            async for event in events:
                yield event
                if _marker in event:  # (resumed once the server has written the event)
                    os._exit(9)
        return _sse_response(dying(), release)

    chat.sse_response = _dying_sse_response

if __name__ == "__main__":
    from tokenmill.cli import main

    sys.exit(main(sys.argv[1:]))
