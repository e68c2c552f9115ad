"""Prefill/decode disaggregation: when a request's prefill goes to a prefill worker.

A fleet can hold prefill workers (`tokenmill router --prefill URL`, or `--prefill-replicas N`) beside
its replicas, which then serve as decode workers. For a chat or completion request routed to a
decode worker D, the router decides per request, from load it knows, where the prompt is computed:

- remote: a prefill worker P runs the request as a one-token prefill (`kv_transfer_params:
  {"do_remote_decode": true}`), holds the prompt's KV, and D pulls it into its prefix cache (the
  router's POST /v1/kv_transfer names P and the hold; D GETs /v1/kv_transfer/ID from P; or, with
  --kv-transfer-mode relay, the router streams it from one to the other); D then runs the request
  and computes only the prompt's last block (routes/kv_transfer.py, engine/kv_transfer.py);
- local: D computes the prompt itself, as a colocated fleet does.

Chat and completion requests are prefilled as they are; a Responses request or an Ollama one
(/api/chat, /api/generate) as a completion of the token ids the router renders for it (the OpenAI
request it becomes on the replica, as PromptHasher computes them).

Remote prefill pays a hop and a copy of the prompt's KV to keep a long prefill out of D's steps,
where it would stall every running decode (chunked prefill bounds each step, not the total). So
`auto` sends a prefill to P only when it is worth that:

    uncached  = prompt tokens D's prefix cache lacks (its KV events)      >= min_tokens
    D decodes = D has sequences running (reported or in the router's ledger)
    P's queue = uncached prompt tokens the router has sent P, not yet done <= max_queue_tokens

and otherwise prefills locally: a short prompt (the hop costs more than it saves), an idle decode
worker (nothing to stall), prefill workers behind by more than max_queue_tokens (the remote TTFT
would be worse than local interference). Among prefill workers, the one with the least work for
this prompt (uncached there plus its queue: prefix-aware, as kv_aware routing) is asked.
max_queue_tokens (4,096 by default) was chosen with the fleet simulator (bench/disagg_sim.py) on
the 2-core CPU's measured step times, over four arrival seeds (docs/benchmarks/disagg.md): it gave
at least the goodput of 1,024 and 2,048 in every layout and load simulated (1P+1D, 1P+3D, 2P+2D
near their capacity), and more in most. A larger limit helps one decode worker of small memory
(prompts kept local fill it) and hurts one prefill worker beside three decode workers (it queues
too much). A rule that compared the two sides' loads (kv_aware's cost on each, plus a margin) was
tried there too and did worse in nearly every case: it keeps a prompt local whenever the decode
worker looks less loaded, and what a local prefill costs the decodes it stalls is not in the load.
`always` sends every eligible request (min_tokens still holds; for measuring), `never` none.
A remote prefill that fails in any way (P down, hold expired, a 4xx) falls back to local: a
transfer is only ever a cache fill, so the answer does not depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokenmill.router.policy import Candidate

DISAGG_POLICIES = ("auto", "always", "never")
TRANSFER_MODES = ("pull", "relay")
# Body fields a prefill drops: they shape the answer, not the prompt (a one-token prefill needs none,
# and some would refuse max_tokens 1, as min_tokens, or cost work, as a grammar).
_ANSWER_FIELDS = ("stream", "stream_options", "n", "best_of", "use_beam_search", "length_penalty", "early_stopping",
                  "test_time_compute", "min_tokens", "max_completion_tokens", "logprobs", "top_logprobs",
                  "return_token_ids", "echo", "response_format", "structured_outputs", "guided_json",
                  "guided_regex", "guided_choice", "guided_grammar", "max_reasoning_tokens", "stop",
                  "stop_token_ids", "bad_words", "allowed_token_ids", "logit_bias", "seed")


@dataclass
class DisaggConfig:
    policy: str = "auto"
    min_tokens: int = 256  # uncached prompt tokens from which a prefill may go remote
    max_queue_tokens: int = 4096  # a prefill worker with more queued prompt tokens is not asked
    timeout_s: float = 60.0  # a remote prefill and its transfer, at most (then local)
    # pull: the decode replica GETs the KV from the prefill worker (it must reach the worker's URL as
    # the router knows it); relay: the router streams it from one to the other (the KV crosses the
    # network twice, and the router's process copies it).
    transfer: str = "pull"

    def __post_init__(self) -> None:
        if self.policy not in DISAGG_POLICIES:
            raise ValueError(f"disaggregation policy: one of {', '.join(DISAGG_POLICIES)}, got {self.policy!r}")
        if self.transfer not in TRANSFER_MODES:
            raise ValueError(f"KV transfer: one of {', '.join(TRANSFER_MODES)}, got {self.transfer!r}")
        if self.min_tokens < 0 or self.max_queue_tokens < 0 or not self.timeout_s > 0:
            raise ValueError("disaggregation: min_tokens and max_queue_tokens must be >= 0, timeout_s > 0")


def decide(cfg: DisaggConfig, prompt_tokens: int, decode: Candidate,
           prefill: list[Candidate]) -> tuple[int | None, str]:
    """The index of the prefill worker to ask, or None to prefill locally; and why."""
    if cfg.policy == "never":
        return None, "never"
    if not prefill:
        return None, "no_prefill_worker"
    uncached = max(0, prompt_tokens - decode.cached_tokens)
    if uncached < max(1, cfg.min_tokens):
        return None, "short"
    if cfg.policy == "auto" and decode.running == 0 and decode.waiting == 0:
        return None, "idle"
    best = min(range(len(prefill)), key=lambda i: (max(0, prompt_tokens - prefill[i].cached_tokens)
                                                   + prefill[i].queued_prefill, prefill[i].inflight))
    if cfg.policy == "auto" and prefill[best].queued_prefill > cfg.max_queue_tokens:
        return None, "prefill_busy"
    return best, "remote"


def left_to_compute(prompt_tokens: int, block_size: int, cached_blocks: int | None = None) -> int:
    """The prompt tokens a replica computes with cached_blocks of the prompt in its cache (None: all it
    could use): at least the last token's block, which BlockManager.match_prefix always leaves out."""
    usable = (prompt_tokens - 1) // block_size
    if cached_blocks is not None:
        usable = min(usable, cached_blocks)
    return max(0, prompt_tokens - usable * block_size)


# What a prefill of token ids (a Responses or Ollama request's) keeps: fields that shape the prompt's
# cache keys or its scheduling.
_KEPT_BY_ID_PREFILLS = ("model", "cache_salt", "priority", "slo", "user")


def prefill_path(endpoint: str) -> str | None:
    """Where a prefill for endpoint goes on a prefill worker (None: the request's own path)."""
    return "/v1/completions" if endpoint in ("responses", "ollama") else None


def prefill_body(endpoint: str, body: dict[str, Any], ids: list[int] | None = None) -> dict[str, Any] | None:
    """The prefill request sent to a prefill worker for body; None for a request that cannot be
    prefilled remotely (several prompts, a resumed stream, prompt logprobs: those compute every
    prompt position and never read the cache). A Responses or Ollama request's prefill (body: for
    Ollama, the OpenAI request it becomes) is a completion of its prompt's token ids (ids, as the
    router renders it), since a prefill answers with its kv_transfer_params; not one that
    continues a stored response (its conversation is the replica's), searches files (its excerpts
    are) or may be truncated ("auto")."""
    if body.get("resume_token_ids") or body.get("kv_transfer_params"):
        return None
    tools = body.get("tools")
    if isinstance(tools, list) and any(isinstance(t, dict) and t.get("type") == "file_search" for t in tools):
        return None  # (its excerpts come from the decode replica's own search)
    if endpoint in ("responses", "ollama"):  # (ollama: body is the OpenAI request it runs as)
        if ids is None or body.get("previous_response_id") is not None or body.get("truncation") == "auto":
            return None  # (truncation "auto": the replica may drop messages the router's render keeps)
        out = {k: body[k] for k in _KEPT_BY_ID_PREFILLS if k in body}
        out.update(prompt=list(ids), max_tokens=1, stream=False, kv_transfer_params={"do_remote_decode": True})
        return out
    if endpoint not in ("chat", "completions"):
        return None
    if body.get("prompt_logprobs") is not None or (endpoint == "completions" and body.get("echo")
                                                   and body.get("logprobs") is not None):
        return None
    if endpoint == "completions":
        p = body.get("prompt")
        if not (isinstance(p, str) or (isinstance(p, list) and p and all(isinstance(t, int) for t in p))
                or (isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)))):
            return None
    elif not isinstance(body.get("messages"), list):
        return None
    out = {k: v for k, v in body.items() if k not in _ANSWER_FIELDS}
    out.update(max_tokens=1, stream=False, kv_transfer_params={"do_remote_decode": True})
    return out
