"""Start `tokenmill serve` as a real process on 127.0.0.1 and talk to it over HTTP."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import httpx

from tokenmill.server.serve import free_port, wait_healthy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ServerProcess:
    def __init__(self, model: str | None, *args: str, log_path: str, script: str | None = None,
                 command: str = "serve", port: int | None = None, env: dict[str, str] | None = None) -> None:
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        entry = [script] if script else ["-m", "tokenmill.cli"]
        model_args = ["--model", model] if model else []  # no --model: the demo model (serve)
        cmd = [sys.executable, *entry, command, *model_args, "--port", str(self.port), *args]
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PYTHONPATH=ROOT, **(env or {}))
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self._wait_healthy()

    def _wait_healthy(self, timeout: float = 120.0) -> None:
        try:
            wait_healthy(self.proc, self.base_url, timeout, lambda: f":\n{self.log()}")
        except RuntimeError:
            self.stop()
            raise

    def log(self) -> str:
        self._log.flush()
        with open(self.log_path) as f:
            return f.read()

    def metrics(self) -> dict[str, float]:
        """Sample name (with labels) -> value, from /metrics."""
        text = httpx.get(self.base_url + "/metrics", timeout=10).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def metric(self, prefix: str) -> float:
        """The sum of the samples whose name starts with prefix (labels ignored)."""
        return sum(v for k, v in self.metrics().items() if re.split(r"[{ ]", k)[0] == prefix)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
