"""Request state: plain Python objects the scheduler, block manager and engine share.

A `Request` is what a user submitted; with n > 1 it fans out into n `Sequence`s that are
scheduled independently. A sequence only knows its tokens and how many of them have KV
in the cache (`num_computed_tokens`): prefill and decode are the same thing to the
scheduler, and a preempted sequence simply drops back to 0 computed tokens.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tokenmill.engine.slo import SLOTarget
from tokenmill.outputs import PositionLogprobs, RequestMetrics
from tokenmill.sampling_params import SamplingParams

if TYPE_CHECKING:
    from tokenmill.engine.detokenizer import IncrementalDetokenizer


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    # Sample i > 0 of an n > 1 request, waiting for sample 0 to prefill the shared prompt.
    FORK_WAITING = "fork_waiting"
    FINISHED = "finished"

    @property
    def is_finished(self) -> bool:
        return self is SeqStatus.FINISHED


_seq_counter = itertools.count()


@dataclass(eq=False)
class Sequence:
    request: Request
    index: int  # which of the request's n samples
    token_ids: list[int]  # prompt followed by output
    num_prompt_tokens: int
    seq_id: int = field(default_factory=lambda: next(_seq_counter))
    status: SeqStatus = SeqStatus.WAITING
    num_computed_tokens: int = 0
    # Async scheduling: tokens sampled by steps still in flight, not in token_ids yet. They count in
    # num_tokens (the scheduler plans the next step around them); the next step reads the last one's
    # value on the device (ModelRunner.prepare), and the engine appends them as their steps finish.
    num_pending: int = 0
    length_limit: int | None = None  # tokens at which it ends by length (Scheduler._ends, computed once)
    block_table: list[int] = field(default_factory=list)
    # Prefix cache: hashes of the full blocks of token_ids computed so far (hash-chained), and
    # how many leading blocks of block_table are already offered to the cache.
    block_hashes: list[bytes] = field(default_factory=list)
    num_registered_blocks: int = 0
    num_preemptions: int = 0
    preempted_at_tokens: int = 0  # its token count when last preempted (it has caught up once it grows)
    # Speculative decoding: the draft tokens this step verifies after the last token, how many
    # leading positions hold the draft model's KV, and the n-gram proposer's index of token_ids.
    spec_token_ids: list[int] = field(default_factory=list)
    num_draft_computed: int = 0
    ngram_index: Any = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # sampling state
    generator: Any = None  # torch.Generator for seeded requests, made by the runner
    output_logprobs: list[PositionLogprobs] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    # Reasoning budget (params.max_reasoning_tokens): inside a <think> section (None: not yet),
    # the tokens written in it, and tokens the engine writes next (the closing tag).
    thinking: bool | None = None
    reasoning_tokens: int = 0
    forced: list[int] = field(default_factory=list)
    think_from: int = 0  # where the section's text starts in the output text
    think_scan: int = 0  # the output text read for tags so far
    detokenizer: IncrementalDetokenizer | None = None
    # Beam search: this step's candidate (token ids, logprobs) for the beam in this slot; set
    # while the slot waits for the other beams, when the engine picks the next ones.
    beam_candidates: tuple[list[int], list[float]] | None = None
    matcher: Any = None  # structured outputs: this sample's grammar state (an llguidance LLMatcher)
    output_text: str = ""
    # The scheduler's order (lower runs first), set by its policy when the sequence is queued, and
    # the prompt tokens the prefix cache held then (what the slo policy predicts it need not compute).
    sched_key: tuple = ()
    queued_cached: int = 0

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def priority(self) -> int:
        return self.request.priority

    @property
    def arrival_time(self) -> float:
        return self.request.arrival_time

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) + self.num_pending

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED  # (not status.is_finished: one property less, every row, every step)

    @property
    def cache_salt(self) -> str | None:
        return self.request.cache_salt

    @property
    def uses_prefix_cache(self) -> bool:
        """Requests that ask for prompt logprobs compute their whole prompt (no cache lookups), so
        every position has its logprob; their blocks are still offered to the cache."""
        return self.request.params.prompt_logprobs is None


    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, req={self.request.request_id}, status={self.status.value}, "
                f"tokens={self.num_tokens}, computed={self.num_computed_tokens}, blocks={len(self.block_table)})")


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    priority: int = 0
    seqs: list[Sequence] = field(default_factory=list)
    metrics: RequestMetrics = field(init=False)
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    aborted: bool = False
    cache_salt: str | None = None  # only requests with the same salt share cached blocks
    num_cached_tokens: int | None = None  # prompt tokens found in the prefix cache at first admission
    pooled: list[float] | None = None  # set once a pooling model (embed, classify) has pooled the prompt
    beam: Any = None  # a BeamSearch when params.use_beam_search: its seqs are the beams' slots
    tenant: str | None = None  # who sent it (the server's tenants): metrics and accounting are kept per tenant
    slo: SLOTarget | None = None  # latency targets (the slo scheduling policy); None: best effort
    slo_demoted: SLOTarget | None = None  # the targets it came with, when admission demoted it to best effort
    # Part of a request admitted already (a dict prompt's `slo_admitted`: a cascade's escalation, a
    # test-time-compute launch after the first): no SLO admission of its own, whose budget counts
    # from the arrival and would refuse it half-way. `uncounted`: part of a request its caller
    # counts (RequestOutput.uncounted).
    slo_admitted: bool = False
    uncounted: bool = False
    compute: Any = None  # the request's share of the steps it ran in (tokenmill/ops/energy.py), when accounted
    final_only: bool = False  # step() reports it only once it has finished (LLMEngine.add_request)
    # Prefill/decode disaggregation: a finished prompt's blocks are held for a decode worker to take
    # (LLMEngine.export_kv): (transfer id, seconds).
    kv_hold: tuple[str, float] | None = None
    kv_release: str | None = None  # an imported prompt's hold (LLMEngine.import_kv), let go as this request ends
    prompt_array: Any = field(default=None, repr=False)  # prompt_token_ids as int64 numpy (repetition penalty)
    allowed_mask: Any = field(default=None, repr=False)  # allowed_token_ids as a bitmask row (made on first use)

    def __post_init__(self) -> None:
        self.metrics = RequestMetrics(arrival_time=self.arrival_time)
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]  # the first prompt token has no logprob
        self.seqs = [
            Sequence(self, i, list(self.prompt_token_ids), len(self.prompt_token_ids))
            for i in range(self.params.n)
        ]

    @property
    def is_finished(self) -> bool:
        seqs = self.seqs
        if len(seqs) == 1:  # (n = 1: no generator to make, once per request per step)
            return seqs[0].status is SeqStatus.FINISHED
        return all(s.is_finished for s in seqs)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)
