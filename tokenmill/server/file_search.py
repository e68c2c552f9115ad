"""The file_search tool, for the Responses API (as OpenAI's) and chat completions (tokenmill's:
the same tool in chat's `tools`): the server searches the tool's vector stores with the latest
user message before the model runs, and the excerpts join the prompt.

The model is not asked whether to search: small models call tools poorly, and one retrieval per
turn is what RAG needs (tool_choice "none" skips it). The excerpts go in as the chat template's
`documents` where the template (one template text) takes them, else before the user's message; as
many as leave the answer room (plan_searched in routes/chat.py), best first or in the files' order
(excerpt_order).
The search shows as a `file_search_call` (the Responses API's output item; an extra field of a
chat answer), with its results when asked for. Not here: a model-issued query, annotations
citing the files.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from fastapi import Request

from tokenmill.server.context import REQUEST_TAGS
from tokenmill.server.errors import APIError
from tokenmill.server.retrieval import expired

RANKERS = (None, "auto", "default-2024-11-15", "none")


class FileSearch:
    def __init__(self, tools: list[dict[str, Any]] | None, tool_choice: Any, show_results: bool,
                 bad: Callable[[str, str], APIError]) -> None:
        """tools: the request's (a ValueError-like 400 from bad(param, message) for a bad one)."""
        found = [(i, t) for i, t in enumerate(tools or []) if isinstance(t, dict) and t.get("type") == "file_search"]
        self.bad = bad
        self.tool: dict[str, Any] | None = None
        self.call: dict[str, Any] | None = None  # the file_search_call, once searched
        self.results: list[dict[str, Any]] = []
        self.show_results = show_results
        self.order = "score"  # the excerpts' order in the prompt (set by run: the tool's, else the server's)
        self.present = bool(found)  # (the request names the tool; tool_choice "none" may still skip it)
        if not found or tool_choice == "none":
            return
        if len(found) > 1:
            raise bad("tools", "holds more than one file_search tool")
        i, t = found[0]
        self.where = where = f"tools[{i}]"
        ids = t.get("vector_store_ids")
        if not isinstance(ids, list) or not 1 <= len(ids) <= 16 or not all(isinstance(x, str) for x in ids):
            raise bad(f"{where}.vector_store_ids", "must be a list of 1 to 16 vector store ids")
        k = t.get("max_num_results")
        k = 10 if k is None else k
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 50:
            raise bad(f"{where}.max_num_results", f"must be an integer in [1, 50], got {k!r}")
        ro = t.get("ranking_options") or {}
        if not isinstance(ro, dict):
            raise bad(f"{where}.ranking_options", "must be an object")
        threshold = ro.get("score_threshold")
        if threshold is not None and (not isinstance(threshold, (int, float)) or isinstance(threshold, bool)
                                      or not 0 <= threshold <= 1):
            raise bad(f"{where}.ranking_options.score_threshold", f"must be a number in [0, 1], got {threshold!r}")
        ranker = ro.get("ranker")
        if ranker not in RANKERS:
            raise bad(f"{where}.ranking_options.ranker", f"must be 'auto', 'default-2024-11-15' or 'none', "
                      f"got {ranker!r}")
        order = t.get("excerpt_order")
        if order not in (None, "score", "document"):
            raise bad(f"{where}.excerpt_order", f"must be 'score' or 'document', got {order!r}")
        self.tool = {"ids": list(dict.fromkeys(ids)), "k": k, "filters": t.get("filters"), "threshold": threshold,
                     "ranker": ranker, "order": order}

    @staticmethod
    def other_tools(tools: list[dict[str, Any]] | None, tool_choice: Any) -> tuple[list[dict[str, Any]] | None, Any]:
        """The request's tools and tool_choice for the model: without file_search, which the server runs."""
        if not tools or not any(isinstance(t, dict) and t.get("type") == "file_search" for t in tools):
            return tools, tool_choice
        rest = [t for t in tools if not (isinstance(t, dict) and t.get("type") == "file_search")] or None
        if isinstance(tool_choice, dict) and tool_choice.get("type") == "file_search":
            tool_choice = "auto" if rest else None
        elif rest is None and isinstance(tool_choice, dict):  # (a function, and no function to call)
            raise APIError(400, "tool_choice: names a function, but the only tool is file_search (which the server "
                           "runs before the model)", param="tool_choice")
        elif rest is None and tool_choice == "required":  # (the search is the tool that runs)
            tool_choice = None
        return rest, tool_choice

    async def run(self, gw: Any, query: str | None, request: Request, salt: str | None = None) -> None:
        """Searches, with query (the latest user message; None: nothing new to search for). Run
        before the request's model is taken: the embedding model may need the room."""
        if self.tool is None or query is None or not query.strip():
            return
        tags = REQUEST_TAGS.get()
        owner, rag = (tags.get("tenant") if tags else None), gw.retrieval
        stores = []
        for vs_id in self.tool["ids"]:
            vs = await rag.call("get", "vector_store", vs_id, owner)
            param = f"{self.where}.vector_store_ids"
            if vs is None:
                e = self.bad(param, f"no vector store {vs_id!r}")
                e.status, e.code, e.type = 404, "not_found", "not_found_error"
                raise e
            if expired(vs):
                raise self.bad(param, f"the vector store {vs_id} has expired")
            stores.append(vs)
        try:
            self.results = await rag.search(owner, stores, [query], self.tool["k"], self.tool["filters"],
                                            self.tool["threshold"], request, where=f"{self.where}.filters",
                                            ranker=self.tool["ranker"], salt=salt)
        except APIError as e:
            if e.param is None or not e.param.startswith(self.where):
                raise
            err = self.bad(e.param, "")  # (the API's own error class, with the search's message)
            err.message = e.message
            raise err from None
        self.order = self.tool["order"] or rag.excerpt_order
        for vs in stores:  # (in use: a store expiring after inactivity stays)
            await rag.touch(vs)
        shown = [{k: r[k] for k in ("file_id", "filename", "score", "text", "attributes")} for r in self.results]
        self.call = {"id": f"fs_{uuid.uuid4().hex}", "type": "file_search_call", "status": "completed",
                     "queries": [query], "results": shown if self.show_results else None}

    def excerpts(self, n: int) -> list[dict[str, Any]]:
        """The best n results in the prompt's order: best first ("score"), or as the files hold
        them ("document": by store, file and place in the file). The document order makes the
        prompt the same for every question that finds the same excerpts, whatever their scores,
        so the prefix cache serves their KV again (docs/benchmarks/rag.md measures it)."""
        best = self.results[:n]
        if self.order == "document":
            best = sorted(best, key=lambda r: (r["vector_store_id"], r["file_id"], r["index"]))
        return best

    def documents(self, tokenizer: Any, n: int, template: str | None = None) -> list[dict[str, str]] | None:
        """The best n excerpts as the chat template's documents, where it takes them (template: the
        request's own, which replaces the tokenizer's)."""
        template = template if template is not None else getattr(tokenizer, "chat_template", None)
        if n == 0 or not (isinstance(template, str) and "documents" in template):
            return None
        return [{"title": r["filename"], "text": r["text"]} for r in self.excerpts(n)]

    def with_excerpts(self, message: str, n: int) -> str:
        """The user's message with the best n excerpts before it."""
        if n == 0:
            return message
        excerpts = "\n\n".join(f"[{i + 1}] {r['filename']}\n{r['text']}" for i, r in enumerate(self.excerpts(n)))
        return f"Excerpts from the files searched for this message (file_search):\n\n{excerpts}\n\nMessage:\n{message}"
