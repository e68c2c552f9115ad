"""The Responses API's stored responses (store: true, OpenAI's default): what previous_response_id
continues from and GET/DELETE /v1/responses/{id} read.

They are kept in this process's memory, least recently used first out, under a byte budget
(--responses-store-mb). Each entry holds its whole conversation (the chat messages up to and
including its answer), sharing the message objects of the response it continued, so a deleted
or evicted parent never breaks a child; the budget charges each entry its whole conversation, an
over-count that bounds the real memory however conversations branch. A tenant's responses are
its own: another tenant's id is not found.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any


@dataclass
class StoredResponse:
    owner: str | None  # the tenant that made it (None without tenants)
    response: dict[str, Any]  # the response object, as it was returned
    history: tuple[dict[str, Any], ...]  # the conversation through this response, as chat messages
    history_bytes: int  # (the JSON size of history)
    cost: int  # what it is charged against the budget
    input_items: list[dict[str, Any]] = field(default_factory=list)  # its request's input, as items


def _size(obj: Any) -> int:
    return len(json.dumps(obj, ensure_ascii=False))


class ResponseStore:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.used = 0
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, rid: str, owner: str | None) -> StoredResponse | None:
        e = self._entries.get(rid)
        if e is None or e.owner != owner:
            return None
        self._entries.move_to_end(rid)
        return e

    def put(self, rid: str, owner: str | None, response: dict[str, Any],
            parent: StoredResponse | None, turn: list[dict[str, Any]],
            input_items: list[dict[str, Any]] | None = None) -> bool:
        """Keeps a response whose conversation is parent's (None: a new one) plus turn (this
        request's input and the answer; input_items: that input as the API's items). False when it
        alone is over the budget."""
        history_bytes = (parent.history_bytes if parent is not None else 0) + _size(turn)
        cost = history_bytes + _size(response) + _size(input_items or [])
        if not self.enabled or cost > self.max_bytes:
            return False
        history = (parent.history if parent is not None else ()) + tuple(turn)
        self.delete(rid, owner)
        self._entries[rid] = StoredResponse(owner, response, history, history_bytes, cost, list(input_items or []))
        self.used += cost
        while self.used > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.used -= old.cost
        return True

    def delete(self, rid: str, owner: str | None) -> bool:
        e = self._entries.get(rid)
        if e is None or e.owner != owner:
            return False
        del self._entries[rid]
        self.used -= e.cost
        return True
