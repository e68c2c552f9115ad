"""Keeping the garbage collector's full passes short while a server runs.

A process that serves a model holds a few hundred thousand long-lived objects before any engine
exists (torch, transformers, the server's modules): ~410,000 in a tiny model's process. Every
full (generation 2) collection walks all of them, about 190 ms on this CPU, and the step loop's
surviving objects (outputs, sequences) trigger one every few thousand steps: a pause of that
length in a decode that steps every few milliseconds on a GPU (inter-token latency) and lost
throughput. vLLM freezes its heap after start-up for the same reason (`freeze_gc_heap`).

`gc.freeze` moves what is alive to a permanent generation that collections skip. Frozen objects
are still freed when their reference count drops to zero, but a frozen reference cycle is never
reclaimed, and neither is anything it references: so the heap is frozen only where what is alive
lives as long as the process, before the first engine is made, so that engines themselves stay
collectable (the model pool drops engines at run time and relies on a collection to free their
cycles and device memory):

- `tokenmill serve` and its Ray replicas (`serve.build_server_app`, before the models load; Ray
  Serve's own freeze after a replica's start-up, which would take the engines, is turned off for
  tokenmill's replicas in `tokenmill.ray`);
- `tokenmill bench`, before its first model.

The offline `LLM` leaves its caller's heap alone: an object of the caller's frozen with it that
later becomes a cycle would keep the engine it holds forever. A program that keeps one engine for
its lifetime may call `freeze_startup_heap()` itself before making it.

At exit the heap is unfrozen, so that the interpreter's last collection sees it (C extensions
otherwise report leaked objects). `TOKENMILL_GC_FREEZE=0` turns all this off.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import logging
import os
import threading

logger = logging.getLogger(__name__)

# Modules that loading a model imports lazily, big ones, imported before the freeze so that it takes
# them: torch's symbolic shapes (sympy, ~470 modules, on the first meta-device copy of the weights),
# its extension builder (setuptools: the CPU kernels), and transformers' tokenizer and loading stacks
# (~400 modules, accelerate and boto3 among them). With them a tiny model's server leaves ~10,000
# objects to full collections (3 ms) instead of ~105,000. Names another version lacks are skipped.
PRELOAD = ("torch.fx.experimental.symbolic_shapes", "torch.utils.cpp_extension",
           "transformers.models.auto.tokenization_auto", "transformers.tokenization_utils_tokenizers",
           "transformers.tokenization_utils_fast", "transformers.generation.configuration_utils",
           "transformers.core_model_loading")

_lock = threading.Lock()
_frozen = False


def freeze_startup_heap() -> bool:
    """Collects and freezes what is alive now, the first time it is called in a process (and
    unless TOKENMILL_GC_FREEZE=0); True when it froze."""
    global _frozen
    if os.environ.get("TOKENMILL_GC_FREEZE", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    with _lock:  # (two threads making the first engines at once: one freeze, before either)
        if _frozen:
            return False
        _frozen = True
        for name in PRELOAD:  # imported by every engine anyway: frozen with the rest rather than walked
            try:
                importlib.import_module(name)
            except Exception:  # (another torch: it is only a preload)
                pass
        gc.collect()  # garbage frozen now would never be reclaimed
        gc.freeze()
    atexit.register(gc.unfreeze)
    logger.debug("froze %d objects of the start-up heap", gc.get_freeze_count())
    return True
