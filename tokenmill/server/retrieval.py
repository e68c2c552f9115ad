"""The server's side of RAG: vector stores filled with a served embedding model, and searched.

A file added to a vector store is cut into chunks (rag/chunking.py) with the embedding model's
tokenizer, embedded by that model through the model pool (as /v1/embeddings would, a batch of
chunks at a time, each batch under its own lease so a long file never pins the model), and its
vectors go to the store (rag/store.py). This runs in the background, as OpenAI's does: the file is
`in_progress` until done, then `completed`, `failed` (with `last_error`) or `cancelled`. A search
embeds its query with the store's embedding model and returns the nearest chunks. Searches made for
a generation request (the Responses API's file_search tool) run before its own model is taken, so
one request never holds two models' leases at once (which could wait on each other's swap).

Which model embeds: --rag-embedding-model, else the one served model with task embed; a vector
store records its model (and may name another served embedding model, `embedding_model`), since
its vectors are comparable only with that model's. --rag-reranker names a served reranker (a
one-label classifier, as /rerank serves) that reorders each search's nearest chunks: the two-stage
retrieval (a cheap embedding search, then a cross-encoder over a few candidates) RAG stacks use.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import Request

from tokenmill.rag.chunking import Chunking, chunk_text
from tokenmill.rag.filters import to_qdrant
from tokenmill.rag.store import RagStore
from tokenmill.sampling_params import pooling_params
from tokenmill.scoring import pair_ids
from tokenmill.server.context import ADMISSION, REQUEST_TAGS
from tokenmill.server.errors import APIError
from tokenmill.server.streaming import collect_finished

logger = logging.getLogger("tokenmill.server")

EMBED_BATCH = 64  # chunks per embedding batch (and per lease of the embedding model)


def rerank_pool(k: int) -> int:
    """How many nearest chunks a reranker reorders for k results: enough that it can bring up what
    the embedding ranked low, few enough that a search stays one short batch."""
    return min(100, max(4 * k, 20))


class Retrieval:
    def __init__(self, gw: Any, location: str | None = None, api_key: str | None = None,
                 embedding_model: str | None = None, reranker: str | None = None,
                 excerpt_order: str = "score") -> None:
        self.gw = gw
        self.excerpt_order = excerpt_order  # file_search's default: "score" or "document" (file_search.py)
        self.location, self.api_key = location, api_key
        self.embedding_model = embedding_model
        self.reranker = reranker  # a served reranker that reorders every search's nearest chunks
        self._store: RagStore | None = None
        self._call_lock = asyncio.Lock()
        self._open_lock = asyncio.Lock()
        self.tasks: dict[str, asyncio.Task] = {}  # "<vs id>/<file id>": its ingestion

    # -- the store ------------------------------------------------------------------------------
    def _open(self) -> RagStore:
        store = RagStore(self.location, self.api_key)
        # A folder's in-progress files were left by a server that stopped (nothing else uses the
        # folder); a Qdrant server's are left as they are: another replica may be embedding them.
        if self.location is not None and not self.location.startswith(("http://", "https://")):
            store.fail_in_progress("the server stopped while embedding this file")
        return store

    async def ready(self) -> RagStore:
        """The store, opened (off the event loop) at startup or first use: in memory when no
        --vector-store was given. Without qdrant-client, a 501 that says what to install."""
        if self._store is None:
            async with self._open_lock:
                if self._store is None:
                    try:
                        self._store = await asyncio.to_thread(self._open)
                    except ValueError as e:
                        raise APIError(501, str(e), code="not_installed", headers={"x-should-retry": "false"}) from None
        return self._store

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """store.method(...) off the event loop, one call at a time."""
        fn = getattr(await self.ready(), method)
        async with self._call_lock:
            return await asyncio.to_thread(fn, *args, **kwargs)

    async def aclose(self) -> None:
        """At shutdown: ingestions stopped (their files end cancelled, or failed at the next start
        of a folder store), then the store closed."""
        tasks = list(self.tasks.values())
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=10)
        if self._store is not None:
            async with self._call_lock:
                await asyncio.to_thread(self._store.close)

    async def touch(self, vs: dict[str, Any]) -> None:
        """A store in use: its last_active_at (and the expiry anchored on it) move on; only those
        fields are written, from what is stored (a rename or an expiry change made meanwhile stays)."""
        await self.call("touch", vs["id"], int(time.time()))

    # -- the embedding model --------------------------------------------------------------------
    def embedder(self, requested: str | None, tenant: Any = None) -> str:
        """The served embedding model a new vector store uses (a 400 naming what is wrong)."""
        gw = self.gw
        if requested is not None:
            name = gw.check_model(requested, tenant)
            if name in gw.tiers:
                raise APIError(400, f"embedding_model: `{name}` is a tier; name an embedding model",
                               param="embedding_model")
            gw._check_task(name, False, ("embed",))
            return name
        if self.embedding_model is not None:
            gw.check_model(self.embedding_model, tenant)  # (a tenant may use only its models)
            gw._check_task(self.embedding_model, False, ("embed",))
            return self.embedding_model
        found = [n for n in gw.pool.entries if gw.task_of(n) == "embed" and (tenant is None or tenant.allows(n))]
        if len(found) == 1:
            return found[0]
        if not found:
            raise APIError(400, "vector stores need an embedding model, and this server serves none" + (
                " that this key may use" if tenant is not None and tenant.models is not None else
                ": serve one beside the generative model (--model repeated, or --models)"), code="no_embedding_model")
        raise APIError(400, f"several embedding models are served ({', '.join(found)}): name one with "
                       f"`embedding_model`, or start the server with --rag-embedding-model", param="embedding_model")

    def prompts(self, name: str) -> tuple[str, str]:
        """The embedding model's (query, document) prompts from its sentence-transformers config
        (`prompts` of config_sentence_transformers.json, which is how Qwen3-Embedding ships its query
        instruction, and e5 its "query: " / "passage: "), as sentence-transformers applies them with
        prompt_name "query" and "document" (or "passage"); none where the folder names none."""
        path = os.path.join(self.gw.pool.entries[name].spec.config.model, "config_sentence_transformers.json")
        try:
            with open(path) as f:
                prompts = json.load(f).get("prompts") or {}
        except (OSError, ValueError, AttributeError):
            return "", ""
        if not isinstance(prompts, dict):
            return "", ""
        query = prompts.get("query")
        doc = prompts.get("document", prompts.get("passage"))
        return (query if isinstance(query, str) else ""), (doc if isinstance(doc, str) else "")

    async def _with_model(self, name: str, fn: Callable[[Any], Any], request: Request | None = None) -> Any:
        from tokenmill.server.gateway import pool_api_error
        from tokenmill.server.pool import PoolError

        if name not in self.gw.pool.entries:  # (a kept store whose model this server no longer serves)
            raise APIError(400, f"the vector store's embedding model `{name}` is not served here: serve it to "
                           f"search or fill this store", code="embedding_model_not_served")
        try:
            ctx, _ = await self.gw.pool_acquire(name, request)
        except PoolError as e:
            raise pool_api_error(e) from None
        try:
            return await fn(ctx)
        finally:
            self.gw.pool.release(name)

    @staticmethod
    async def _pooled(ctx: Any, prompts: list[list[int]], param: str, salt: str | None = None) -> list[Any]:
        """The prompts run as one pooling group on ctx's model: their outputs, in order (salt: the
        request's cache_salt, whose prefix-cache namespace its retrieval shares)."""
        token = ADMISSION.set(None)  # (a retrieval step is not the tenant's generation: no token reservation)
        try:
            params = pooling_params(None)
            rid = f"rag-{uuid.uuid4().hex}"
            reqs = [(f"{rid}-{i}", ctx.prompt_dict(None, ids, salt), params) for i, ids in enumerate(prompts)]
            group = await ctx.submit(reqs, 0, time.time(), max_seqs=len(reqs), param=param)
            final = await collect_finished(ctx.engine, group)
            outs = [final[r] for r, _, _ in reqs]
            for o in outs:
                if o.error is not None or o.pooled is None:
                    raise ctx.engine_error(o)
            return outs
        finally:
            ADMISSION.reset(token)

    async def embed(self, name: str, texts: list[str], request: Request | None = None,
                    param: str = "query", salt: str | None = None) -> list[list[float]]:
        """The texts' embeddings by the served model `name` (each cut to its context)."""

        async def run(ctx: Any) -> list[list[float]]:
            limit = ctx.llm_engine.max_model_len
            prompts = [(await ctx.encode(t, param=param))[:limit] or [0] for t in texts]
            return [list(o.embedding) for o in await self._pooled(ctx, prompts, param, salt)]

        return await self._with_model(name, run, request)

    async def rerank(self, queries: list[str], texts: list[str], request: Request | None = None,
                     salt: str | None = None) -> list[float]:
        """Each text's relevance by the reranker (its best over the queries): the reranker reads a
        (query, text) pair as /rerank does, the tokenizer's pair encoding cut to its context."""
        name = self.reranker
        assert name is not None

        async def run(ctx: Any) -> list[float]:
            limit = ctx.llm_engine.max_model_len

            def encode() -> list[list[int]]:
                return [pair_ids(ctx.tokenizer, q, t, limit) for q in queries for t in texts]

            async with ctx.tokenize_lock:
                prompts = await asyncio.to_thread(encode)
            probs = [(o.probs or [0.0])[0] for o in await self._pooled(ctx, prompts, "query", salt)]
            n = len(texts)
            return [max(probs[q * n + i] for q in range(len(queries))) for i in range(n)]

        return await self._with_model(name, run, request)

    async def chunks(self, name: str, text: str, chunking: Chunking, prompt: str = "") -> tuple[list[str], Chunking]:
        """text cut with the embedding model's tokenizer into chunks that fit it (after prompt)."""

        async def run(ctx: Any) -> tuple[list[str], Chunking]:
            if ctx.tokenizer is None:
                raise ValueError(f"the embedding model `{name}` has no tokenizer")
            async with ctx.tokenize_lock:
                reserve = 16 + len(ctx.tokenizer.encode(prompt, add_special_tokens=False))  # (and special tokens)
                fitted = chunking.fitted(max(1, ctx.llm_engine.max_model_len - reserve))
                return await asyncio.to_thread(chunk_text, ctx.tokenizer, text, fitted), fitted

        return await self._with_model(name, run)

    def check_chunking(self, name: str, chunking: Chunking, param: str, prompt: str = "") -> None:
        """A 400 for a static chunk size the embedding model cannot read after the store's document
        prompt (counted as its bytes, which no byte-level tokenizer's tokens outnumber, so a size
        accepted here never fails later)."""
        from tokenmill.server.pool import configured_max_model_len

        entry = self.gw.pool.entries.get(name)
        limit = configured_max_model_len(entry.spec.config) if entry is not None else None
        if limit is None:
            return
        try:
            chunking.fitted(max(1, limit - 16 - len(prompt.encode())))
        except ValueError as e:
            raise APIError(400, str(e).replace("chunking_strategy", param, 1), param=param) from None

    # -- ingestion ------------------------------------------------------------------------------
    def cancel_ingests(self, vs_id: str, file_id: str | None = None) -> None:
        """Stops embedding a store's file (every file, without file_id)."""
        for key, task in list(self.tasks.items()):
            if key == f"{vs_id}/{file_id}" or (file_id is None and key.startswith(f"{vs_id}/")):
                task.cancel()

    async def cancel_ingest(self, vs_id: str, file_id: str) -> None:
        """Stops embedding a file and waits until its status says so."""
        task = self.tasks.get(f"{vs_id}/{file_id}")
        if task is not None:
            task.cancel()
            await asyncio.wait({task}, timeout=10)

    def start_ingest(self, owner: str | None, vs: dict[str, Any], vsf: dict[str, Any], chunking: Chunking) -> None:
        key = f"{vs['id']}/{vsf['id']}"
        old = self.tasks.pop(key, None)
        if old is not None:
            old.cancel()
        task = asyncio.get_running_loop().create_task(self._ingest(owner, vs, vsf, chunking))
        self.tasks[key] = task
        task.add_done_callback(lambda t: self.tasks.pop(key, None) if self.tasks.get(key) is t else None)

    async def _ingest(self, owner: str | None, vs: dict[str, Any], vsf: dict[str, Any], chunking: Chunking) -> None:
        ADMISSION.set(None)  # (this task's own context: the request that started it has ended)
        REQUEST_TAGS.set({"tenant": owner} if owner is not None else {})
        vs_id, file_id = vs["id"], vsf["id"]
        error: dict[str, str] | None = None
        usage = 0
        try:
            f = await self.call("get", "file", file_id, owner)
            data = await self.call("get_data", file_id)
            if f is None or data is None:
                raise _FileError("invalid_file", f"the file {file_id} has been deleted")
            text = file_text(data, f.get("filename", ""))
            model = vs["embedding_model"]
            pieces, fitted = await self.chunks(model, text, chunking, vs.get("document_prompt", ""))
            vsf["chunking_strategy"] = fitted.as_object()
            await self.call("delete_file_chunks", vs_id, file_id)  # (a file added again replaces its chunks)
            attrs = vsf.get("attributes") or {}
            for at in range(0, len(pieces), EMBED_BATCH):
                batch = pieces[at:at + EMBED_BATCH]
                vectors = await self.embed(model, [vs.get("document_prompt", "") + t for t in batch], param="file")
                payloads = [{"text": t, "filename": f.get("filename", ""), "attributes": attrs} for t in batch]
                await self.call("add_chunks", vs_id, file_id, vectors, payloads, at)
            # Attributes changed while this ran reached the chunks there were then: the later ones now.
            current = await self.call("get", "vector_store.file", f"{vs_id}/{file_id}", owner)
            if current is not None and current.get("_run") == vsf["_run"] and current.get("attributes") != attrs:
                await self.call("set_file_attributes", vs_id, file_id, current.get("attributes") or {})
            usage = len(text.encode())  # (the file's text once: overlapping chunks hold some of it twice)
            status = "completed"
        except asyncio.CancelledError:
            status = "cancelled"
        except _FileError as e:
            status, error = "failed", {"code": e.code, "message": e.message}
        except ValueError as e:  # (a chunk size the embedding model cannot read, after its prompt)
            status, error = "failed", {"code": "server_error", "message": str(e)}
        except APIError as e:
            status, error = "failed", {"code": "server_error", "message": e.message}
        except Exception as e:  # (the file is marked failed; the server goes on)
            logger.exception("embedding file %s into %s failed", file_id, vs_id)
            status, error = "failed", {"code": "server_error", "message": f"{type(e).__name__}: {e}"}
        if status != "completed":  # (a file that did not complete has no chunks to find)
            with contextlib.suppress(Exception):
                await asyncio.shield(self.call("delete_file_chunks", vs_id, file_id))
        # Written unless the file or its store was deleted, or the file added again, meanwhile (deleting
        # cancels this task); only the fields this run decides (a concurrent attributes update stays).
        fields = {"status": status, "usage_bytes": usage if status == "completed" else 0,
                  "chunking_strategy": vsf["chunking_strategy"]}
        if error is not None:
            fields["last_error"] = error
        await asyncio.shield(self.call("update", "vector_store.file", f"{vs_id}/{file_id}", fields,
                                       only_if={"_run": vsf["_run"]}))

    # -- search ---------------------------------------------------------------------------------
    async def search(self, owner: str | None, stores: list[dict[str, Any]], queries: list[str], k: int,
                     filters: Any = None, threshold: float | None = None, request: Request | None = None,
                     where: str = "filters", ranker: str | None = None,
                     salt: str | None = None) -> list[dict[str, Any]]:
        """The k chunks most relevant to the queries over the stores, best first: {file_id,
        filename, score, text, attributes, vector_store_id, index (the chunk's in its file)}. A
        chunk found by several queries counts once, at its best score. With a reranker
        (--rag-reranker, unless ranker is "none"), the nearest rerank_pool(k) chunks by cosine
        similarity are reordered by the reranker, whose relevance (in [0, 1]) is then the score
        that threshold applies to."""
        try:
            flt = to_qdrant(filters, where) if filters is not None else None
        except ValueError as e:
            raise APIError(400, str(e), param=where) from None
        if self.reranker is not None and ranker != "none" and self._may_use(self.reranker, owner):
            found = await self._nearest(stores, queries, rerank_pool(k), flt, None, request, salt)
            if not found:
                return []
            scores = await self.rerank(queries, [r["text"] for r in found], request, salt)
            ranked = sorted(zip(scores, range(len(found)), found), key=lambda x: (-x[0], x[1]))
            return [{**r, "score": s} for s, _, r in ranked if threshold is None or s >= threshold][:k]
        return await self._nearest(stores, queries, k, flt, threshold, request, salt)

    def _may_use(self, model: str, owner: str | None) -> bool:
        """Whether a tenant (owner; None: no tenants) may use a model: a tenant kept off the
        reranker gets the embedding's ranking."""
        tenants = self.gw.tenants
        state = tenants.states.get(owner) if tenants is not None and owner is not None else None
        return state is None or state.tenant.allows(model)

    async def _nearest(self, stores: list[dict[str, Any]], queries: list[str], k: int, flt: Any,
                       threshold: float | None, request: Request | None,
                       salt: str | None = None) -> list[dict[str, Any]]:
        """The k chunks nearest the queries by cosine similarity, best first."""
        best: dict[tuple[str, str, int], tuple[float, dict[str, Any]]] = {}
        by_model: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for vs in stores:
            by_model.setdefault((vs["embedding_model"], vs.get("query_prompt", "")), []).append(vs)
        for (model, prompt), group in by_model.items():
            vectors = await self.embed(model, [prompt + q for q in queries], request, salt=salt)
            for vs in group:
                for v in vectors:
                    for score, p in await self.call("search", vs["id"], v, k, flt, threshold):
                        key = (vs["id"], p["file_id"], p["index"])
                        if key not in best or best[key][0] < score:
                            best[key] = (score, {**p, "vector_store_id": vs["id"]})
        ranked = sorted(best.values(), key=lambda x: -x[0])[:k]
        return [{"file_id": p["file_id"], "filename": p.get("filename", ""), "score": s, "text": p["text"],
                 "attributes": p.get("attributes") or {}, "vector_store_id": p["vector_store_id"],
                 "index": p["index"]}
                for s, p in ranked]


def expired(vs: dict[str, Any]) -> bool:
    """Whether a vector store has expired (expires_after, counted from its last use)."""
    return vs.get("expires_at") is not None and time.time() >= vs["expires_at"]


class _FileError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def file_text(data: bytes, filename: str) -> str:
    """A file's text: UTF-8 (or UTF-16 with its byte-order mark); other files are refused, since
    only text is embedded here (send a PDF's or a document's text)."""
    if data.startswith(b"%PDF"):
        raise _FileError("unsupported_file", f"{filename or 'the file'} is a PDF: only text files are embedded "
                         f"here (send its text)")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            pass
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise _FileError("unsupported_file", f"{filename or 'the file'} is not UTF-8 text: only text files "
                         f"(.txt, .md, .json, .html, code, ...) are embedded here") from None
    if "\x00" in text:
        raise _FileError("unsupported_file", f"{filename or 'the file'} is binary: only text files are embedded here")
    if not text.strip():
        raise _FileError("invalid_file", f"{filename or 'the file'} has no text")
    return text
