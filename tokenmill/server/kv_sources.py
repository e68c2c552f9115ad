"""A KV pull's source: a prefill worker's base URL, checked and compared as httpx, which sends the
pull's GET, reads it (routes/kv_transfer.py; the router's --prefill URLs, router/cli.py)."""

from __future__ import annotations

from typing import Any

import httpx


def source_url(value: Any) -> str | None:
    """A prefill worker's base URL as given (http or https, a host, maybe a path), without a trailing
    slash; None for anything that would change where a GET goes or what it carries (a query, a
    fragment, userinfo, control characters or spaces; a comma, which separates
    --kv-transfer-sources), read as httpx, which sends the GET, reads it."""
    if not isinstance(value, str) or len(value) > 2048 or any(c in value for c in "?#@\\,") \
            or any(ord(c) <= 32 or ord(c) == 127 for c in value):
        return None
    try:
        url = httpx.URL(value)  # (as the GET reads it; source_key too)
    except (httpx.InvalidURL, ValueError):
        return None
    if url.scheme not in ("http", "https") or not url.host or url.query or url.fragment or url.userinfo \
            or url.port is not None and not 0 < url.port < 65536:
        return None
    return value.rstrip("/")


_DEFAULT_PORT = {"http": 80, "https": 443}


def source_key(url: str) -> tuple[str, str, int, str]:
    """Where a source URL's GET goes, as httpx sends it (scheme and host in any case, the default
    port written or not, a trailing slash are all one): an allow-list entry matches a pull's source
    by it. Names are compared, not addresses (localhost is not 127.0.0.1)."""
    u = httpx.URL(url)
    return (u.scheme, u.raw_host.decode("ascii").lower(), _DEFAULT_PORT[u.scheme] if u.port is None else u.port,
            u.raw_path.decode("ascii").rstrip("/"))
