"""Benchmarks (`tokenmill bench ...`)."""

from __future__ import annotations

import json
from typing import Any


def write_json(path: str | None, obj: Any) -> None:
    """Writes a benchmark's figures to path (the --json flag), if one was given."""
    if path:
        with open(path, "w") as f:
            json.dump(obj, f, indent=2)
