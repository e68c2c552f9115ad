"""Benchmarks (`tokenmill bench ...`)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any


def write_json(path: str | None, obj: Any) -> None:
    """Writes a benchmark's figures to path (the --json flag), if one was given."""
    if path:
        with open(path, "w") as f:
            json.dump(obj, f, indent=2)


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
