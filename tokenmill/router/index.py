"""What the router knows of each replica's prefix cache, and the keys of a request's prompt.

Each replica publishes its cache as KV events (server/kv_events.py): a snapshot of the cached
block keys per model, then every key stored or removed. `ReplicaIndex` mirrors them. The keys are
the engine's own (block_manager.block_hashes: chained sha256 over token ids, the cache salt in
the first block), so `PromptHasher` computes a request's keys exactly as the replica will, from
the same tokenizer and chat template: a match here is a cache hit there, not a guess.

Events only arrive once a replica has computed a prompt; requests the router has just sent are
counted as `pending` on their replica until they finish, so a burst of requests that share a new
prefix follows the first one instead of spreading before any event arrives.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tokenmill.engine.block_manager import block_hashes

logger = logging.getLogger("tokenmill.router")


@dataclass
class ModelIndex:
    block_size: int
    keys: set[bytes] = field(default_factory=set)
    seq: int = -1  # number of the last event applied
    synced: bool = False  # a snapshot arrived and no event was lost since


class ReplicaIndex:
    """One replica's cached block keys per model, from its KV event stream."""

    def __init__(self) -> None:
        self.models: dict[str, ModelIndex] = {}
        self.pending: dict[str, Counter[bytes]] = {}  # keys of requests sent and not finished

    def hello(self, models: dict[str, int]) -> None:
        """A new stream: its models and block sizes; nothing is known until their snapshots."""
        self.models = {m: ModelIndex(int(bs)) for m, bs in models.items()}

    def snapshot(self, model: str, block_size: int, seq: int, hashes: list[str]) -> None:
        self.models[model] = ModelIndex(int(block_size), {bytes.fromhex(h) for h in hashes}, seq, True)

    def apply(self, model: str, seq: int, ops: list[list[Any]]) -> bool:
        """Applies one batch of events; False when one was lost (the stream must resync)."""
        m = self.models.get(model)
        if m is None or not m.synced:
            return True  # its snapshot is still to come
        if seq != m.seq + 1:
            m.synced = False
            return False
        m.seq = seq
        for op in ops:
            if op[0] == "stored":
                m.keys.update(bytes.fromhex(h) for h in op[1])
            elif op[0] == "removed":
                m.keys.difference_update(bytes.fromhex(h) for h in op[1])
            elif op[0] == "cleared":
                m.keys.clear()
        return True

    def lost(self) -> None:
        """The stream broke: nothing here can be trusted until the next snapshot."""
        for m in self.models.values():
            m.keys.clear()
            m.synced = False

    def synced(self, model: str) -> bool:
        m = self.models.get(model)
        return m is not None and m.synced

    def block_size(self, model: str) -> int | None:
        m = self.models.get(model)
        return m.block_size if m is not None else None

    def match(self, model: str, keys: list[bytes], pending_too: bool = True) -> int:
        """How many leading blocks of a prompt this replica holds or is computing (0 when its
        stream is not in sync: load-only routing); pending_too False: holds, as its events said."""
        m = self.models.get(model)
        if m is None or not m.synced:
            return 0
        pending = self.pending.get(model, Counter()) if pending_too else Counter()
        n = 0
        for k in keys:
            if k not in m.keys and k not in pending:
                break
            n += 1
        return n

    def add_pending(self, model: str, keys: list[bytes]) -> None:
        self.pending.setdefault(model, Counter()).update(keys)

    def remove_pending(self, model: str, keys: list[bytes]) -> None:
        c = self.pending.get(model)
        if c is not None:
            c.subtract(keys)
            for k in keys:
                if c[k] <= 0:
                    del c[k]


class PromptHasher:
    """A model's prompt token ids as its server computes them (tokenizer, chat template), and
    their block keys. Loads the tokenizer on first use; None when it cannot (routing by load)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._tokenizer: Any = None
        self.failed: str | None = None
        # Requests tokenize on worker threads; the first load (and transformers' lazy imports, which
        # are not thread-safe) must happen once.
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._tokenizer is not None or self.failed is not None

    @property
    def tokenizer(self) -> Any:
        if self.loaded:
            return self._tokenizer
        with self._lock:
            if self.loaded:
                return self._tokenizer
            from tokenmill.engine.llm_engine import load_tokenizer

            try:
                tok = load_tokenizer(self.path)
            except Exception as e:  # routing still works, by load
                self.failed = f"{type(e).__name__}: {e}"
            else:
                if tok is None:
                    self.failed = "no tokenizer in the folder"
                self._tokenizer = tok
            if self.failed:
                logger.warning("router: no tokenizer from %s (%s): KV-aware routing off for it", self.path,
                               self.failed)
        return self._tokenizer

    def token_ids(self, endpoint: str, body: dict[str, Any]) -> list[int] | None:
        """The (first) prompt's token ids as the replica will prefill them (truncate_prompt_tokens
        applied), or None when the body cannot be read (the replica will answer it with its own
        error)."""
        ids = self._token_ids(endpoint, body)
        k = body.get("truncate_prompt_tokens")
        if ids is not None and isinstance(k, int) and not isinstance(k, bool) and 1 <= k < len(ids):
            ids = ids[-k:]  # (-1 is the replica's max_model_len: a prompt that long is an error anyway)
        return ids

    def _token_ids(self, endpoint: str, body: dict[str, Any]) -> list[int] | None:
        tok = self.tokenizer
        if tok is None:
            return None
        if body.get("chat_template") is not None:  # (a request's own template is the replica's to refuse or
            return None  # run, never the router's: a template can take the event loop for minutes)
        try:
            if endpoint == "chat":
                from tokenmill.server.protocol import ChatCompletionRequest
                from tokenmill.server.tools import render_chat, template_messages

                req = ChatCompletionRequest.model_validate(body)
                text = render_chat(tok, template_messages(req.messages), req.add_generation_prompt, req.tools,
                                   req.continue_final_message, req.chat_template_kwargs, documents=req.documents)
                return tok.encode(text, add_special_tokens=False)
            if endpoint == "responses":  # (as the replica runs it: the chat request it becomes)
                from tokenmill.server.protocol import ResponsesRequest
                from tokenmill.server.routes.responses import chat_request, input_messages
                from tokenmill.server.tools import render_chat, template_messages

                resp = ResponsesRequest.model_validate(body)
                if resp.previous_response_id is not None:
                    return None  # (its conversation is the replica's; the router pins it there anyway)
                req = chat_request(resp, [], input_messages(resp.input))
                text = render_chat(tok, template_messages(req.messages), req.add_generation_prompt, req.tools,
                                   req.continue_final_message, req.chat_template_kwargs)
                return tok.encode(text, add_special_tokens=False)
            p = body.get("prompt")
            if isinstance(p, list) and p and isinstance(p[0], (str, list)):
                p = p[0]  # several prompts: the first decides
            if isinstance(p, str):
                return tok.encode(p)
            if isinstance(p, list) and p and all(isinstance(t, int) for t in p):
                return list(p)
        except Exception:
            return None
        return None

    @staticmethod
    def keys(ids: list[int], block_size: int, salt: Any) -> list[bytes]:
        """The block keys the replica's cache can match: at most (len - 1) // block_size blocks
        (the last prompt token is always computed)."""
        if salt is not None and not (isinstance(salt, str) and _utf8(salt)):
            return []  # (the replica refuses such a salt: a 400, nothing to match)
        n = (len(ids) - 1) // block_size
        return block_hashes(ids[: n * block_size], block_size, salt or None)


def _utf8(s: str) -> bool:
    """Whether s encodes as UTF-8 (a lone surrogate does not: the salt's hash would raise)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
