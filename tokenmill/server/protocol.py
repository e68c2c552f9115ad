"""Request bodies of the OpenAI API (plus vLLM's extra sampling fields), validated strictly.

Strict mode: a string where a number belongs is a 400 naming the field, not a silent
conversion. Unknown fields are ignored, as vLLM does, so clients that send newer OpenAI
fields keep working.
"""

from __future__ import annotations

import functools
import types
import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from tokenmill.sampling_params import SamplingParams
from tokenmill.structured import StructuredOutputsParams


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        """OpenAI's schema lets most optional fields be null, and clients generated from it (or
        passing None through) send them: a null for a field that takes no None means its default
        (n, stream, echo, the penalties, ...), as in vLLM. Fields that take None keep it."""
        if isinstance(data, dict) and any(v is None for v in data.values()):
            defaulted = _defaulted_not_nullable(cls)
            return {k: v for k, v in data.items() if v is not None or k not in defaulted}
        return data


@functools.cache
def _defaulted_not_nullable(cls: type[BaseModel]) -> frozenset[str]:
    """The keys (aliases) of a model's fields that have a default and do not take None."""

    def nullable(t: Any) -> bool:
        return t is None or t is type(None) or t is Any or (
            typing.get_origin(t) in (typing.Union, types.UnionType) and any(nullable(a) for a in typing.get_args(t)))

    return frozenset(f.alias or name for name, f in cls.model_fields.items()
                     if not f.is_required() and not nullable(f.annotation))


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: every chunk carries its choice's usage so far


class JSONSchemaFormat(_Strict):
    name: str | None = None
    description: str | None = None
    # "schema" is a BaseModel attribute: the field is read from the key "schema" through an alias.
    schema_: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputsField(_Strict):
    """vLLM's structured_outputs extra field: exactly one constraint."""

    json_: str | dict[str, Any] | bool | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    whitespace_flexible: bool = False


class TestTimeComputeField(BaseModel):
    """tokenmill's extra field: many reasoning paths, one answer (tokenmill.ttc.TTCParams)."""

    model_config = ConfigDict(strict=True, extra="forbid")
    strategy: Literal["self_consistency", "best_of_n", "beam_search"] = "self_consistency"
    n: int = 8
    answer_pattern: str | None = None
    max_total_tokens: int | None = None
    early_stop: bool = False
    wave: int | None = None
    warmup: int | None = None
    prune_percentile: float | None = 10.0
    window: int = 16
    consensus: float | None = None
    length_penalty: float = 1.0


class _SamplingFields(_Strict):
    """Fields both generation endpoints share."""

    model: str | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM's extensions, sent as extra body fields
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    priority: int = 0
    # Latency targets, {"ttft_ms": ..., "tpot_ms": ...}: the slo scheduling policy orders work by them and
    # goodput counts whether they were met; a tenant's SLO class gives them when a request does not.
    slo: dict[str, Any] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    cache_salt: str | None = None  # only requests with the same salt share prefix-cache blocks
    return_tokens_as_token_ids: bool = False  # logprob tokens as "token_id:N" (exact ids, vLLM's field)
    prompt_logprobs: int | None = None  # vLLM's: the top-k logprobs of every prompt position
    # Structured outputs: OpenAI's response_format, vLLM's structured_outputs and older guided_* fields
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsField | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    test_time_compute: TestTimeComputeField | None = None
    max_reasoning_tokens: int | None = None  # tokens a <think> section may hold; then it is closed
    # vLLM's return_token_ids: the prompt's and each choice's token ids in the response (streamed:
    # each chunk's new ids). A fleet router asks for them to resume a stream elsewhere.
    return_token_ids: bool = False
    # tokenmill's: the tokens of this (one-choice, streamed) generation that another server already
    # produced and sent; the stream goes on after them (a fleet router's failover).
    resume_token_ids: list[int] | None = None
    # vLLM's field for prefill/decode disaggregation: {"do_remote_decode": true} makes this a prefill
    # whose prompt KV a decode worker takes (routes/kv_transfer.py)
    kv_transfer_params: dict[str, Any] | None = None
    # vLLM's beam search fields: n beams, all returned best first (transformers' rules)
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False
    truncate_prompt_tokens: int | None = None  # vLLM's: keep the prompt's last k tokens (-1: max_model_len)
    allowed_token_ids: list[int] | None = None  # vLLM's: the only tokens that may be sampled
    bad_words: list[str] | None = None  # vLLM's: words the output may not contain

    def structured(self) -> tuple[StructuredOutputsParams, str] | None:
        """The request's output constraint and the field it came from; ValueError when the fields
        contradict each other or a json_schema format has no schema."""
        found: list[tuple[StructuredOutputsParams, str]] = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            found.append((StructuredOutputsParams(json_object=True), "response_format"))
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                raise ValueError("response_format: type json_schema needs json_schema.schema")
            schema = _schema(rf.json_schema.schema_, "response_format")
            found.append((StructuredOutputsParams(json=schema), "response_format"))
        so = self.structured_outputs
        if so is not None:
            found.append((StructuredOutputsParams(
                json=_schema(so.json_, "structured_outputs"), regex=so.regex, choice=so.choice, grammar=so.grammar,
                json_object=so.json_object, whitespace_flexible=so.whitespace_flexible), "structured_outputs"))
        for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar"):
            v = getattr(self, name)
            if v is not None:
                key = name.removeprefix("guided_")
                found.append((StructuredOutputsParams(**{key: _schema(v, name) if key == "json" else v}), name))
        if len(found) > 1:
            raise ValueError(f"{found[1][1]}: only one output constraint per request (also given: {found[0][1]})")
        for p, name in found:  # exactly one constraint each
            try:
                p.kind()
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
        return found[0] if found else None

    def sampling_params(self, max_tokens: int | None, logprobs: int | None,
                        prompt_logprobs: int | None = None,
                        defaults: dict[str, Any] | None = None) -> SamplingParams:
        """defaults: the model's settings (its generation_config.json) for fields the request leaves
        out; a max_tokens from them is an upper bound (a prompt that leaves less room gets that room)."""
        d = defaults or {}
        given = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p,
                 "repetition_penalty": self.repetition_penalty, "max_tokens": max_tokens}
        defaulted = tuple((k, v) for k, v in d.items() if given.get(k, 0) is None)
        bias = None
        if self.logit_bias:
            bad = [k for k in self.logit_bias if not (k.isascii() and k.isdigit())]
            if bad:
                raise ValueError(f"logit_bias: keys must be token ids (decimal integers as strings), got {bad[0]!r}")
            bias = {int(k): v for k, v in self.logit_bias.items()}
        return SamplingParams(
            logit_bias=bias,
            n=self.n,
            temperature=d.get("temperature", 1.0) if self.temperature is None else self.temperature,
            top_p=d.get("top_p", 1.0) if self.top_p is None else self.top_p,
            top_k=d.get("top_k", 0) if self.top_k is None else self.top_k,
            min_p=d.get("min_p", 0.0) if self.min_p is None else self.min_p,
            repetition_penalty=d.get("repetition_penalty", 1.0) if self.repetition_penalty is None
            else self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=self.seed,
            max_tokens=d.get("max_tokens") if max_tokens is None else max_tokens,
            min_tokens=self.min_tokens,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs if prompt_logprobs is not None else self.prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            max_reasoning_tokens=self.max_reasoning_tokens,
            use_beam_search=self.use_beam_search,
            length_penalty=self.length_penalty,
            early_stopping=self.early_stopping,
            truncate_prompt_tokens=self.truncate_prompt_tokens,
            allowed_token_ids=self.allowed_token_ids,
            bad_words=self.bad_words,
            _defaulted=defaulted,
        )


def _schema(v: Any, param: str) -> Any:
    """A schema given as JSON text, parsed (vLLM accepts both); None stays None (not given)."""
    if v is None:
        return None
    if isinstance(v, str):
        import json

        try:
            v = json.loads(v)
        except ValueError as e:
            raise ValueError(f"{param}: invalid JSON schema: not valid JSON: {e}") from None
    if v is True:
        return {}
    if v is False:
        raise ValueError(f"{param}: invalid JSON schema: false admits no value at all")
    if not isinstance(v, dict):
        raise ValueError(f"{param}: invalid JSON schema: must be a JSON object, got {type(v).__name__}")
    return v


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool result: the call it answers

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # the last message left open, for the model to go on
    chat_template_kwargs: dict[str, Any] | None = None  # the template's own variables (enable_thinking, ...)
    # vLLM's: the template's `documents` (RAG templates: Command-R's, Granite's), and a template of the
    # request's own in place of the model's (only with --trust-request-chat-template)
    documents: list[dict[str, Any]] | None = None
    chat_template: str | None = None
    _search: Any = PrivateAttr(default=None)  # its file_search tool (server/file_search.py), once checked


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None  # (a chat prompt's count includes its tools, as the template shows them)
    documents: list[dict[str, Any]] | None = None
    chat_template: str | None = None


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


class EmbeddingRequest(_Strict):
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    truncate_prompt_tokens: int | None = None  # vLLM's: embed each input's last k tokens (-1: max_model_len)


class _PoolingFields(_Strict):
    model: str | None = None
    user: str | None = None
    priority: int = 0
    truncate_prompt_tokens: int | None = None  # vLLM's: a prompt's last k tokens (-1: max_model_len); a pair's
    # prompt is truncated longest text first, as its tokenizer does


class ClassifyRequest(_PoolingFields):
    """vLLM's /classify: a classifier's label probabilities for each input."""

    input: str | list[str] | list[int] | list[list[int]]


class ScoreRequest(_PoolingFields):
    """vLLM's /score: one text against each of several, or pairs in order. The texts go by any of
    vLLM's names: text_1/text_2, queries/documents, queries/items or data_1/data_2."""

    text_1: str | list[str] | None = None
    text_2: str | list[str] | None = None
    queries: str | list[str] | None = None
    documents: str | list[str] | None = None
    items: str | list[str] | None = None
    data_1: str | list[str] | None = None
    data_2: str | list[str] | None = None

    def texts(self) -> tuple[list[str], list[str], tuple[str, str]]:
        """The two sides, each a list, and the names they came by; ValueError when a side is missing
        or given twice."""
        sides = []
        for names in (("text_1", "queries", "data_1"), ("text_2", "documents", "items", "data_2")):
            given = [n for n in names if getattr(self, n) is not None]
            if len(given) != 1:
                raise ValueError(f"{names[0]}: give exactly one of {', '.join(names)}"
                                 + (f" (got {', '.join(given)})" if given else ""))
            v = getattr(self, given[0])
            sides.append(([v] if isinstance(v, str) else v, given[0]))
        (one, n1), (two, n2) = sides
        return one, two, (n1, n2)


class RerankDocument(_Strict):
    text: str


class RerankRequest(_PoolingFields):
    """vLLM's /rerank (Cohere's and Jina's shape): documents ordered by relevance to the query."""

    query: str
    documents: list[str | RerankDocument]
    top_n: int | None = None  # the best n (None or 0: all)
    return_documents: bool = True  # (Cohere's: each result carries its document's text)


class ResponsesRequest(_SamplingFields):
    """OpenAI's Responses API (/v1/responses), with the same vLLM sampling extras as chat. The
    input items and tools are checked where they are turned into a chat request
    (server/routes/responses.py), which names the item at fault."""

    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    top_logprobs: int | None = None
    include: list[str] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None  # {"format": {"type": "text" | "json_object" | "json_schema", ...}}
    reasoning: dict[str, Any] | None = None  # (shown back; the model reasons as its template has it)
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    background: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    # Declared so that they are refused, not dropped: the Conversations API and stored prompt templates.
    conversation: Any = None
    prompt: Any = None
    # (found by the route's precheck: the stored response it continues, its input as chat messages,
    # the chat request that runs it)
    _parent: Any = PrivateAttr(default=None)
    _turn: list[dict[str, Any]] = PrivateAttr(default_factory=list)
    _chat: Any = PrivateAttr(default=None)
    _search: Any = PrivateAttr(default=None)  # its file_search tool (server/file_search.py)


# -- vector stores (OpenAI's API; tokenmill/server/routes/vector_stores.py) ------------------------
# Metadata and attributes are checked by the route (OpenAI's limits: 16 keys, ...), chunking
# strategies and filters by tokenmill/rag, which name the field at fault.
# An attribute's value: a string, a boolean, a finite number (NaN has no JSON, and would poison
# every answer showing it) or a 64-bit integer (what a Qdrant server stores).
AttributeValue = (str | bool | Annotated[int, Field(ge=-2**63, le=2**63 - 1)]
                  | Annotated[float, Field(allow_inf_nan=False)])


class ExpiresAfter(_Strict):
    anchor: Literal["last_active_at"]
    days: int = Field(ge=1, le=365)


class VectorStoreCreateRequest(_Strict):
    name: str | None = None
    description: str | None = None
    file_ids: list[str] | None = None
    chunking_strategy: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    expires_after: ExpiresAfter | None = None
    embedding_model: str | None = None  # tokenmill's: the served embedding model (else the server's default)
    # tokenmill's: text put before each query and each chunk when they are embedded (default: the
    # embedding model's sentence-transformers prompts, "query" and "document")
    query_prompt: str | None = Field(default=None, max_length=4096)
    document_prompt: str | None = Field(default=None, max_length=4096)


class VectorStoreUpdateRequest(_Strict):
    name: str | None = None
    metadata: dict[str, str] | None = None
    expires_after: ExpiresAfter | None = None


class VectorStoreFileRequest(_Strict):
    file_id: str
    attributes: dict[str, AttributeValue] | None = None
    chunking_strategy: dict[str, Any] | None = None


class VectorStoreFileUpdateRequest(_Strict):
    attributes: dict[str, AttributeValue] | None


class FileBatchRequest(_Strict):
    file_ids: list[str] | None = None
    files: list[VectorStoreFileRequest] | None = None  # (each with its own attributes and chunking)
    attributes: dict[str, AttributeValue] | None = None
    chunking_strategy: dict[str, Any] | None = None


class RankingOptions(_Strict):
    # "none": cosine similarity alone; the others: the reranker's order where --rag-reranker names one
    ranker: Literal["auto", "default-2024-11-15", "none"] | None = None
    score_threshold: float | None = Field(default=None, ge=0, le=1)


class VectorStoreSearchRequest(_Strict):
    query: str | list[str]
    max_num_results: int = Field(default=10, ge=1, le=50)
    filters: dict[str, Any] | None = None
    ranking_options: RankingOptions | None = None
    rewrite_query: bool = False  # (no query rewriting here: the query is searched as sent)
