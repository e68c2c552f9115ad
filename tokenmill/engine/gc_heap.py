"""Keeping the garbage collector's full passes short while the engine runs.

A process that serves a model holds a few hundred thousand long-lived objects before any engine
exists (torch, transformers, the server's modules): ~410,000 in `LLM(...)`'s process. Every
full (generation 2) collection walks all of them, about 190 ms on this CPU, and the step loop's
surviving objects (outputs, sequences) trigger one every few thousand steps: a pause of that
length in a decode that steps every few milliseconds on a GPU (inter-token latency) and lost
throughput. vLLM freezes its heap after start-up for the same reason (`freeze_gc_heap`).

The heap is frozen (`gc.freeze`: moved to a permanent generation that collections skip) once per
process, before the first engine is made, so that engines themselves stay collectable: the model
pool drops engines at run time and relies on a collection to free their cycles and device
memory. Frozen objects are still freed when their reference count drops to zero; only a frozen
cycle is never reclaimed, and what is alive before the first engine lives as long as the process
in practice. At exit the heap is unfrozen, so that the interpreter's last collection sees it (C
extensions otherwise report leaked objects). `TOKENMILL_GC_FREEZE=0` turns this off.
"""

from __future__ import annotations

import atexit
import gc
import logging
import os

logger = logging.getLogger(__name__)

_frozen = False


def freeze_startup_heap() -> bool:
    """Collects and freezes what is alive now, the first time it is called in a process (and
    unless TOKENMILL_GC_FREEZE=0); True when it froze."""
    global _frozen
    if _frozen or os.environ.get("TOKENMILL_GC_FREEZE", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    _frozen = True
    gc.collect()  # garbage frozen now would never be reclaimed
    gc.freeze()
    atexit.register(gc.unfreeze)
    logger.debug("froze %d objects of the start-up heap", gc.get_freeze_count())
    return True
