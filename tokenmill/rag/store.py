"""Files, vector stores and their chunks' vectors, kept in Qdrant.

One Qdrant holds everything, so that replicas sharing a Qdrant server share their vector stores:
- `<prefix>objects`: OpenAI's objects (files, vector stores, vector store files, file batches),
  as payloads with no vector, found by kind, owner and id;
- `<prefix>file_data`: each file's bytes (base64), apart so listings never read them;
- `<prefix>chunks_<vector store id>`: a vector store's chunks, a point each (the chunk's vector;
  its text, file, position and the file's attributes as payload), cosine distance.

Why Qdrant (qdrant-client): one client API for a store inside the process (local mode: in memory,
or in a folder that survives restarts) and for a Qdrant server when the fleet scales out, with
payload filters that OpenAI's attribute filters map onto. The client is synchronous here; the
server calls it off the event loop, one call at a time (local mode is not thread-safe).

`owner` is a tenant's name (None without tenants): every lookup is by owner, so a tenant never
sees, searches or deletes another's files and stores.
"""

from __future__ import annotations

import base64
import threading
import uuid
from typing import Any

_NS = uuid.UUID("5b0f0c52-5d3e-4f7e-9a55-1f2c63a7e0d1")  # (point ids: uuid5 of an object's kind and id)
KINDS = ("file", "vector_store", "vector_store.file", "vector_store.files_batch")


def _pid(kind: str, key: str) -> str:
    return str(uuid.uuid5(_NS, f"{kind}:{key}"))


class RagStore:
    def __init__(self, location: str | None = None, api_key: str | None = None, prefix: str = "tokenmill_") -> None:
        """location: None (in memory), a folder (kept there), or a Qdrant server's http(s) URL."""
        try:
            from qdrant_client import QdrantClient
        except ImportError:
            raise ValueError("vector stores need qdrant-client: pip install 'tokenmill[rag]'") from None
        if location is None:
            self.client = QdrantClient(location=":memory:")
        elif location.startswith(("http://", "https://")):
            self.client = QdrantClient(url=location, api_key=api_key)
        else:
            self.client = QdrantClient(path=location)
        self.location = location
        self.prefix = prefix
        self.lock = threading.Lock()
        self._objects, self._data = f"{prefix}objects", f"{prefix}file_data"
        with self.lock:
            for name in (self._objects, self._data):
                if not self.client.collection_exists(name):
                    self.client.create_collection(name, vectors_config={})

    def close(self) -> None:
        with self.lock:
            self.client.close()

    # -- objects --------------------------------------------------------------------------------
    def put(self, obj: dict[str, Any], owner: str | None, **index: Any) -> None:
        """Stores (or replaces) an object; index: extra payload fields it is found by."""
        from qdrant_client import models as m

        kind = obj["object"]
        key = self._key(obj)
        payload = {"kind": kind, "key": key, "owner": owner, "obj": obj, **index}
        with self.lock:
            self.client.upsert(self._objects, points=[m.PointStruct(id=_pid(kind, key), vector={}, payload=payload)])

    def get(self, kind: str, key: str, owner: str | None) -> dict[str, Any] | None:
        with self.lock:
            got = self.client.retrieve(self._objects, ids=[_pid(kind, key)], with_payload=True)
        if not got or got[0].payload.get("owner") != owner:
            return None
        return got[0].payload["obj"]

    def find(self, kind: str, owner: str | None, **match: Any) -> list[dict[str, Any]]:
        """Every object of a kind and owner whose index fields equal match's, oldest first."""
        from qdrant_client import models as m

        conds = [m.FieldCondition(key="kind", match=m.MatchValue(value=kind))]
        conds += [m.FieldCondition(key=k, match=m.MatchValue(value=v)) for k, v in match.items()]
        conds.append(m.FieldCondition(key="owner", match=m.MatchValue(value=owner)) if owner is not None
                     else m.IsNullCondition(is_null=m.PayloadField(key="owner")))
        out = [p["obj"] for p in self._scroll(self._objects, m.Filter(must=conds))]
        out.sort(key=lambda o: (o.get("created_at", 0), o.get("_seq", 0), self._key(o)))
        return out

    def _scroll(self, collection: str, flt: Any) -> list[dict[str, Any]]:
        """The payloads of every point of a collection that the filter matches, a page at a time."""
        out: list[dict[str, Any]] = []
        offset = None
        with self.lock:
            while True:
                points, offset = self.client.scroll(collection, scroll_filter=flt, limit=1000, offset=offset,
                                                    with_payload=True)
                out += [p.payload for p in points]
                if offset is None:
                    return out

    def fail_in_progress(self, message: str) -> None:
        """Files left in_progress (by a server that stopped): failed, and what they had embedded
        dropped, so no search finds half a file."""
        from qdrant_client import models as m

        flt = m.Filter(must=[m.FieldCondition(key="kind", match=m.MatchValue(value="vector_store.file"))])
        for p in self._scroll(self._objects, flt):
            obj = p["obj"]
            if obj["status"] == "in_progress":
                self.delete_file_chunks(obj["vector_store_id"], obj["id"])
                self.update("vector_store.file", self._key(obj), {
                    "status": "failed", "usage_bytes": 0, "last_error": {"code": "server_error", "message": message}})

    def update(self, kind: str, key: str, fields: dict[str, Any], only_if: dict[str, Any] | None = None) -> bool:
        """Sets some of a stored object's fields (the others stay as they are, whoever wrote them
        since it was read); only_if: only while these fields hold these values. False when the
        object is gone (or only_if does not hold). Fields set to None are left out of `fields`
        by callers: a local Qdrant drops None from a nested update."""
        pid = _pid(kind, key)
        with self.lock:
            got = self.client.retrieve(self._objects, ids=[pid], with_payload=True)
            if not got or any(got[0].payload["obj"].get(k) != v for k, v in (only_if or {}).items()):
                return False
            self.client.set_payload(self._objects, payload=fields, points=[pid], key="obj")
        return True

    def touch(self, vs_id: str, now: int) -> None:
        """A vector store in use: last_active_at, and the expiry anchored on it from the store's
        expires_after as it is now (not as a request read it before a rename or an expiry change)."""
        pid = _pid("vector_store", vs_id)
        with self.lock:
            got = self.client.retrieve(self._objects, ids=[pid], with_payload=True)
            if not got:
                return
            fields: dict[str, Any] = {"last_active_at": now}
            after = got[0].payload["obj"].get("expires_after")
            if after is not None:
                fields["expires_at"] = now + after["days"] * 86400
            self.client.set_payload(self._objects, payload=fields, points=[pid], key="obj")

    def delete(self, kind: str, key: str) -> None:
        from qdrant_client import models as m

        with self.lock:
            self.client.delete(self._objects, points_selector=m.PointIdsList(points=[_pid(kind, key)]))

    @staticmethod
    def _key(obj: dict[str, Any]) -> str:
        if obj["object"] == "vector_store.file":  # (a file's id within its store)
            return f"{obj['vector_store_id']}/{obj['id']}"
        return obj["id"]

    # -- file bytes -----------------------------------------------------------------------------
    def put_data(self, file_id: str, data: bytes) -> None:
        from qdrant_client import models as m

        point = m.PointStruct(id=_pid("data", file_id), vector={},
                              payload={"data": base64.b64encode(data).decode("ascii")})
        with self.lock:
            self.client.upsert(self._data, points=[point])

    def get_data(self, file_id: str) -> bytes | None:
        with self.lock:
            got = self.client.retrieve(self._data, ids=[_pid("data", file_id)], with_payload=True)
        return base64.b64decode(got[0].payload["data"]) if got else None

    def delete_data(self, file_id: str) -> None:
        from qdrant_client import models as m

        with self.lock:
            self.client.delete(self._data, points_selector=m.PointIdsList(points=[_pid("data", file_id)]))

    # -- chunks ---------------------------------------------------------------------------------
    def _chunks(self, vs_id: str) -> str:
        return f"{self.prefix}chunks_{vs_id}"

    def create_chunks(self, vs_id: str, dim: int) -> None:
        from qdrant_client import models as m

        with self.lock:
            if not self.client.collection_exists(self._chunks(vs_id)):
                self.client.create_collection(self._chunks(vs_id),
                                              vectors_config=m.VectorParams(size=dim, distance=m.Distance.COSINE))

    def drop_chunks(self, vs_id: str) -> None:
        with self.lock:
            if self.client.collection_exists(self._chunks(vs_id)):
                self.client.delete_collection(self._chunks(vs_id))

    def add_chunks(self, vs_id: str, file_id: str, vectors: list[list[float]], payloads: list[dict[str, Any]],
                   first: int = 0) -> None:
        """A file's chunks first.. (payload: text, filename, attributes; file_id and index are added)."""
        from qdrant_client import models as m

        points = [m.PointStruct(id=_pid("chunk", f"{vs_id}/{file_id}/{first + i}"), vector=v,
                                payload={**p, "file_id": file_id, "index": first + i})
                  for i, (v, p) in enumerate(zip(vectors, payloads, strict=True))]
        with self.lock:
            self.client.upsert(self._chunks(vs_id), points=points)

    def _file_filter(self, file_id: str) -> Any:
        from qdrant_client import models as m

        return m.Filter(must=[m.FieldCondition(key="file_id", match=m.MatchValue(value=file_id))])

    def delete_file_chunks(self, vs_id: str, file_id: str) -> None:
        from qdrant_client import models as m

        with self.lock:
            if self.client.collection_exists(self._chunks(vs_id)):
                self.client.delete(self._chunks(vs_id),
                                   points_selector=m.FilterSelector(filter=self._file_filter(file_id)))

    def set_file_attributes(self, vs_id: str, file_id: str, attributes: dict[str, Any]) -> None:
        with self.lock:
            self.client.set_payload(self._chunks(vs_id), payload={"attributes": attributes},
                                    points=self._file_filter(file_id))

    def file_chunks(self, vs_id: str, file_id: str) -> list[dict[str, Any]]:
        """A file's chunks' payloads, in order."""
        out = self._scroll(self._chunks(vs_id), self._file_filter(file_id))
        out.sort(key=lambda p: p["index"])
        return out

    def search(self, vs_id: str, vector: list[float], limit: int, flt: Any = None,
               threshold: float | None = None) -> list[tuple[float, dict[str, Any]]]:
        """The store's nearest chunks to vector: (cosine similarity, payload), best first."""
        with self.lock:
            got = self.client.query_points(self._chunks(vs_id), query=vector, limit=limit, query_filter=flt,
                                           score_threshold=threshold, with_payload=True)
        return [(p.score, p.payload) for p in got.points]
