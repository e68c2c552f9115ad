"""OpenAI's attribute filters (vector store search, the file_search tool) as Qdrant filters.

A comparison filter is {"type": "eq"|"ne"|"gt"|"gte"|"lt"|"lte"|"in"|"nin", "key", "value"}; a
compound one {"type": "and"|"or", "filters": [...]}, nested as deep as MAX_DEPTH. Attributes are
kept under the chunk's payload key `attributes`. A malformed filter is a ValueError naming where.
"""

from __future__ import annotations

import math
from typing import Any

MAX_DEPTH = 8
_COMPARE = ("eq", "ne", "gt", "gte", "lt", "lte", "in", "nin")


def to_qdrant(f: Any, where: str = "filters") -> Any:
    """The filter as a Qdrant Filter."""
    from qdrant_client import models as m

    cond = _condition(f, where, 0)
    return cond if isinstance(cond, m.Filter) else m.Filter(must=[cond])


def _condition(f: Any, where: str, depth: int) -> Any:
    from qdrant_client import models as m

    if not isinstance(f, dict):
        raise ValueError(f"{where}: must be an object with a type")
    kind = f.get("type")
    if kind in ("and", "or"):
        subs = f.get("filters")
        if not isinstance(subs, list) or not subs:
            raise ValueError(f"{where}.filters: must be a non-empty list of filters")
        if depth >= MAX_DEPTH:
            raise ValueError(f"{where}: filters nest at most {MAX_DEPTH} deep")
        conds = [_condition(s, f"{where}.filters[{i}]", depth + 1) for i, s in enumerate(subs)]
        return m.Filter(must=conds) if kind == "and" else m.Filter(should=conds)
    if kind not in _COMPARE:
        raise ValueError(f"{where}.type: must be one of {', '.join(_COMPARE + ('and', 'or'))}, got {kind!r}")
    key, value = f.get("key"), f.get("value")
    if not isinstance(key, str) or not key:
        raise ValueError(f"{where}.key: must be a non-empty string")
    field = f"attributes.{key}"
    if kind in ("in", "nin"):
        if not isinstance(value, list) or not value or not all(_scalar(v) for v in value):
            raise ValueError(f"{where}.value: must be a non-empty list of strings, finite numbers or booleans")
        cond = m.Filter(should=[_equals(m, field, v) for v in value])
        return cond if kind == "in" else m.Filter(must_not=[cond])
    if not _scalar(value):
        raise ValueError(f"{where}.value: must be a string, a finite number or a boolean")
    if kind in ("eq", "ne"):
        cond = _equals(m, field, value)
        return cond if kind == "eq" else m.Filter(must_not=[cond])
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}.value: {kind} compares numbers, got {value!r}")
    return m.FieldCondition(key=field, range=m.Range(**{kind: value}))


def _scalar(v: Any) -> bool:
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, int) and not isinstance(v, bool):
        return -2**63 <= v < 2**63
    return isinstance(v, (str, bool))


def _equals(m: Any, field: str, v: Any) -> Any:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        # (a number as a range: MatchValue never matches a float payload, and 3 must find 3.0)
        return m.FieldCondition(key=field, range=m.Range(gte=v, lte=v))
    return m.FieldCondition(key=field, match=m.MatchValue(value=v))
