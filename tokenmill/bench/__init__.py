"""Benchmarks (`tokenmill bench ...`)."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any


def jsonable(obj: Any) -> Any:
    """obj with its floats made valid JSON at every level: NaN (nothing measured) as null,
    infinities as the strings "inf" and "-inf" (an unlimited request rate, say)."""
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return obj
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def write_json(path: str | None, obj: Any) -> None:
    """Writes a benchmark's figures to path (the --json flag), if one was given: strict JSON
    (see jsonable), which every parser reads."""
    if path:
        text = json.dumps(jsonable(obj), indent=2, allow_nan=False)
        with open(path, "w") as f:
            f.write(text)


def check_json_path(path: str | None) -> None:
    """Fails at once (ValueError, naming the flag and the path) when --json's file cannot be
    written, rather than after the whole run: opened for append, so an existing file is left as it is."""
    if not path:
        return
    existed = os.path.exists(path)
    try:
        if os.path.isdir(path):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
        with open(path, "a"):
            pass
    except OSError as e:
        raise ValueError(f"--json: cannot write {path}: {e.strerror or e}") from None
    if not existed:
        os.remove(path)  # (nothing written yet: no empty file left behind if the run fails)


def check_at_least(flag: str, value: int | float, minimum: int | float = 1) -> None:
    """ValueError naming the flag when value < minimum (a count of zero, say): a one-line error
    (the CLI's exit 2) before anything loads, not a traceback at the end of the run."""
    if not value >= minimum:  # (NaN fails too)
        raise ValueError(f"{flag} must be >= {minimum:g}, got {value:g}")


def int_list(text: str, flag: str, minimum: int = 1) -> list[int]:
    """A comma-separated list of integers (empty items skipped), each >= minimum."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    for v in values:
        if v < minimum:
            raise ValueError(f"{flag}: every value must be >= {minimum}, got {v}")
    return values


def torch_dtype(name: str, flag: str = "--dtype"):
    """The torch dtype called name (float32, bfloat16, ...); ValueError naming the flag otherwise."""
    import torch

    dtype = getattr(torch, name, None) if name.isidentifier() else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{flag}: {name!r} is not a floating-point torch dtype (float32, bfloat16, float16)")
    return dtype


@contextlib.contextmanager
def running_server(cli_args: list[str], port: int, log_path: str, detail: Callable[[], str]) -> Iterator[str]:
    """`python -m tokenmill.cli *cli_args` (a `serve` listening on 127.0.0.1:port), its output in
    log_path; yields the base URL once /health answers (detail() says why when it does not),
    and stops the server however the block ends."""
    from tokenmill.server.serve import wait_healthy

    base = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "tokenmill.cli", *cli_args], stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            wait_healthy(proc, base, 600, detail)
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
