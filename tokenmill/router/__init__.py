"""The fleet router: one OpenAI-compatible endpoint over many tokenmill replicas, with exact
KV-aware routing from their KV events, health checks and failover that resumes streams.
`tokenmill router` runs it (cli.py); `Router(...).app` is its ASGI app."""

from tokenmill.router.policy import POLICIES, KVAwareWeights
from tokenmill.router.router import Router, RouterConfig

__all__ = ["POLICIES", "KVAwareWeights", "Router", "RouterConfig"]
