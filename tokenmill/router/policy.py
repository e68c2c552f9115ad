"""Where a request goes: round_robin, least_loaded, or kv_aware (the default).

Every policy picks among the replicas that are up (health checks pass) and serve the model.
Each candidate is described by a `Candidate`: its load as the router knows it (its own ledger of
requests sent, exact and immediate) and as the replica last reported it on its event stream
(which also counts other clients' traffic), and, for kv_aware, how much of the prompt its prefix
cache holds.

kv_aware estimates the prefill work, in tokens, each replica would do before this request's first
token, and picks the least:

    cost = (prompt_tokens - cached_tokens)        the part of the prompt it must compute
         + queued_prefill_tokens                  prompt tokens of requests ahead of it, not yet computed
         + decode_weight * running                each running sequence slows every step
         + kv_full_penalty * prompt_tokens        when its KV cache is (almost) full: it would preempt

cached_tokens comes from the replica's KV events (exact), counting prefixes of requests already
sent there (pending); a replica whose event stream is not in sync counts 0 (load only) until it
resyncs. Ties go to the replica with fewer requests in flight, then in turn. `decode_weight` (how
many prompt tokens one running sequence is worth) and the KV thresholds are tunable
(`--kv-decode-weight`, `--kv-full`); the defaults suit CPU and GPU engines alike, where a step's
cost grows with its tokens and a running decode costs about as much as a few dozen prefill tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

POLICIES = ("kv_aware", "least_loaded", "round_robin")


@dataclass
class KVAwareWeights:
    decode_weight: float = 32.0  # prompt tokens of prefill one running sequence is worth
    kv_full: float = 0.95  # KV cache usage from which a replica would preempt
    kv_full_penalty: float = 1.0  # times the prompt's tokens, added to a replica that full


@dataclass
class Candidate:
    name: str
    inflight: int = 0  # requests the router has in flight there
    queued_prefill: int = 0  # uncached prompt tokens of the router's requests not yet at their first token
    running: int = 0  # sequences running (the larger of the router's count and the replica's report)
    waiting: int = 0  # reported waiting sequences
    kv_usage: float = 0.0  # reported, 0..1
    cached_tokens: int = 0  # prompt tokens its prefix cache holds (kv_aware; 0 while its KV events are out of sync)


def kv_aware_cost(c: Candidate, prompt_tokens: int, w: KVAwareWeights) -> float:
    cost = max(0, prompt_tokens - c.cached_tokens) + c.queued_prefill + w.decode_weight * c.running
    if c.kv_usage >= w.kv_full:
        cost += w.kv_full_penalty * prompt_tokens
    return cost


def load_key(c: Candidate) -> tuple[float, ...]:
    """least_loaded's order: requests in flight or waiting, then KV usage."""
    return (max(c.inflight, c.running + c.waiting), c.kv_usage)


class Chooser:
    def __init__(self, policy: str, weights: KVAwareWeights | None = None) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy: one of {', '.join(POLICIES)}, got {policy!r}")
        self.policy = policy
        self.weights = weights or KVAwareWeights()
        self._turn = 0

    def choose(self, candidates: list[Candidate], prompt_tokens: int = 0) -> tuple[int, str]:
        """The index of the chosen candidate and why ("prefix", "load", "turn", "only")."""
        if not candidates:
            raise ValueError("no candidates")
        self._turn += 1
        if len(candidates) == 1:
            return 0, "only"
        n = len(candidates)
        # Ties are broken in turn, from a position that moves with every request.
        order = [(self._turn + i) % n for i in range(n)]
        if self.policy == "round_robin":
            return order[0], "turn"
        if self.policy == "least_loaded":
            return min(order, key=lambda i: load_key(candidates[i])), "load"
        w = self.weights
        best = min(order, key=lambda i: (kv_aware_cost(candidates[i], prompt_tokens, w), candidates[i].inflight))
        reason = "prefix" if candidates[best].cached_tokens > 0 else "load"
        return best, reason
