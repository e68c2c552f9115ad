"""What `generate` returns, with vLLM's names: RequestOutput holding one CompletionOutput per sample."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Logprob:
    logprob: float
    rank: int  # 1 = most likely token
    decoded_token: str | None = None


# One entry per position: token id -> Logprob (the sampled or prompt token plus the top-k).
PositionLogprobs = dict[int, Logprob]


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_generated_tokens: int = 0  # by this engine: a resumed stream's handed-over tokens are not counted
    # resume_token_ids: tokens another engine generated, handed over (a fleet router's failover). They
    # are outputs (usage counts them) but not this engine's work (generation_tokens_total, TPOT).
    num_resumed_tokens: int = 0

    @property
    def time_in_queue(self) -> float | None:
        if self.first_scheduled_time is None:
            return None
        return self.first_scheduled_time - self.arrival_time

    @property
    def ttft(self) -> float | None:
        """Time to first token, from arrival."""
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def mean_tpot(self) -> float | None:
        """Mean time per output token after the first."""
        if self.first_token_time is None or self.finished_time is None or self.num_generated_tokens < 2:
            return None
        return (self.finished_time - self.first_token_time) / (self.num_generated_tokens - 1)

    @property
    def e2e_latency(self) -> float | None:
        if self.finished_time is None:
            return None
        return self.finished_time - self.arrival_time


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[PositionLogprobs] | None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" | None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[PositionLogprobs | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(0.0))
    error: str | None = None  # set when the engine failed this request (finish_reason "error")
    error_status: int = 500  # 400 when the request's own input caused it (a grammar that fails mid-way)
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    embedding: list[float] | None = None  # an embedding model's pooled, normalized prompt vector
    probs: list[float] | None = None  # a classifier's label probabilities for the prompt (task "classify")
    test_time_compute: dict[str, Any] | None = None  # a test-time-compute request's account (tokenmill.ttc)
    tenant: str | None = None  # the tenant that sent it (the server's --tenants)
    slo: Any = None  # its SLOTarget (tokenmill.engine.slo), when it has targets
    slo_demoted: bool = False  # admission found its TTFT target unreachable and ran it as best effort
    # Part of a request its caller counts (test-time compute's launches: the server counts the request
    # once, at its end): metrics count its tokens, not it (nor its prompt) as a request.
    uncounted: bool = False
    prompt_only: bool = False  # scoring or embedding: its one generated token is nobody's output
    compute: dict[str, Any] | None = None  # device seconds, FLOPs, energy, cost so far (tokenmill.ops.energy)

    @property
    def pooled(self) -> list[float] | None:
        """A pooling model's result: the embedding or the label probabilities."""
        return self.embedding if self.embedding is not None else self.probs


@dataclass
class EmbeddingOutput:
    embedding: list[float]  # the pooled, L2-normalized prompt vector

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass
class ClassificationOutput:
    probs: list[float]  # the label probabilities

    @property
    def num_classes(self) -> int:
        return len(self.probs)


@dataclass
class EmbeddingRequestOutput:
    """LLM.embed's result for one prompt, shaped as vLLM's (`.outputs.embedding`)."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: EmbeddingOutput
    finished: bool = True

    @property
    def embedding(self) -> list[float]:
        return self.outputs.embedding


@dataclass
class ClassificationRequestOutput:
    """LLM.classify's result for one prompt, shaped as vLLM's (`.outputs.probs`)."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: ClassificationOutput
    finished: bool = True

    @property
    def probs(self) -> list[float]:
        return self.outputs.probs


@dataclass
class ScoringOutput:
    score: float  # the pair's relevance: a cosine similarity, or a reranker's probability


@dataclass
class ScoringRequestOutput:
    """One pair's score, shaped as vLLM's (`.outputs.score`)."""

    request_id: str
    prompt_token_ids: list[int]  # the pair's prompt (a reranker's); empty for an embedding model's
    outputs: ScoringOutput


@dataclass
class BeamSearchSequence:
    """One beam of LLM.beam_search, as vLLM's: `tokens` and `text` hold the prompt and the output."""

    tokens: list[int]
    logprobs: list[PositionLogprobs]
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    lora_request: None = None


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]  # best first
