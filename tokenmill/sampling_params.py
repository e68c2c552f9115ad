"""SamplingParams: how one request turns logits into tokens, with vLLM's names and defaults."""

from __future__ import annotations

import copy
import enum
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from tokenmill.structured import StructuredOutputsParams

# Samples per request: each is a sequence with its own KV, so n is bounded.
MAX_N = 128
# Top logprobs per position (vLLM's default max_logprobs): each costs a decode and an object per token.
MAX_LOGPROBS = 20
# Stop strings are searched in every new token's text and stop ids looked up per token, on the
# engine's thread, which every request shares: one request's hundreds of thousands would slow
# everyone's tokens (30x measured). OpenAI takes 4 strings; these bounds leave room for any real use.
MAX_STOP_STRINGS = 128
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024
# logit_bias is applied every step from per-row lists: a whole vocabulary's (152K) added 15 ms to
# every step of the batch (4x on a small model). OpenAI takes at most 300 entries.
MAX_LOGIT_BIAS = 1024


class RequestOutputKind(enum.Enum):
    """vLLM's: what each streamed output holds. LLM.generate returns every request once finished
    whatever a request asks (vLLM's LLM sets FINAL_ONLY itself), so offline it changes nothing."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    # vLLM's; fast tokenizers (all tokenmill loads) decode without it, as in vLLM's fast detokenizer
    spaces_between_special_tokens: bool = True
    # vLLM's: False leaves each output's text empty (token ids only) and skips the decoding
    detokenize: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE  # (see RequestOutputKind)
    # vLLM's: arbitrary data for custom sampling code and plugins; nothing here reads it
    extra_args: dict[str, Any] | None = None
    include_stop_str_in_output: bool = False
    # token id -> a value in [-100, 100] added to its logit (OpenAI's logit_bias)
    logit_bias: dict[int, float] | None = None
    # Constrained decoding: a JSON schema, regex, choice or grammar the output must match.
    structured_outputs: StructuredOutputsParams | None = None
    # Reasoning budget: tokens a <think> section may hold; then the engine closes it (writes
    # </think>) and the model answers. The section is open when the prompt ends inside one or the
    # model writes <think>.
    max_reasoning_tokens: int | None = None
    # Beam search (vLLM's extra fields, transformers' rules): the n sequences are the beams and all
    # n come back, best first. Deterministic: temperature, top_p, top_k, min_p and seed do not apply.
    use_beam_search: bool = False
    length_penalty: float = 1.0  # a finished beam scores cumulative_logprob / length ** length_penalty
    early_stopping: bool | str = False  # transformers' early_stopping: False, True or "never"
    # vLLM's: keep the prompt's last k tokens (-1: as many as max_model_len holds), dropping its start
    truncate_prompt_tokens: int | None = None
    # vLLM's: the only tokens that may be sampled (a mask applied with a grammar's, as structured outputs')
    allowed_token_ids: list[int] | None = None
    # vLLM's: words the output may not contain. Each is tokenized as it would start the text and as
    # it would follow a space; a step whose output ends with all but the last token of one bans that
    # last token (so a word of one token is never sampled).
    bad_words: list[str] | None = None
    # Filled in by the engine: the model's end-of-sequence ids, and bad_words' token sequences.
    _eos_token_ids: tuple[int, ...] = field(default=(), repr=False)
    _bad_words_token_ids: tuple[tuple[int, ...], ...] = field(default=(), repr=False)
    # Scoring or embedding a prompt (echo with max_tokens 0, /v1/embeddings): the one token these
    # run with is thrown away, so the prompt may fill the whole context.
    _prompt_only: bool = field(default=False, repr=False)
    # max_tokens is a cap the server filled in (a tenant's), not the client's: a prompt that leaves
    # less room gets what room there is instead of a 400
    _max_tokens_is_cap: bool = field(default=False, repr=False)
    # The fields filled in from the model's defaults (generation_config.json), with the values they
    # got: a field still holding its value is the model's default, not the caller's choice.
    _defaulted: tuple[tuple[str, Any], ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = [_plain(t) for t in (self.stop_token_ids if self.stop_token_ids is not None else [])]
        if isinstance(self.bad_words, (list, tuple)):
            self.bad_words = list(self.bad_words)
        if isinstance(self.allowed_token_ids, (list, tuple)) or hasattr(self.allowed_token_ids, "tolist"):
            # (a copy: a caller reusing its list cannot change what a queued request may sample)
            self.allowed_token_ids = [_plain(t) for t in list(self.allowed_token_ids)]
        for f in _NUMBERS:  # numpy's scalars as Python's (vLLM takes them; validate() checks Python's)
            setattr(self, f, _plain(getattr(self, f)))
        if self.top_k == -1:
            self.top_k = 0
        if self.seed == -1:  # (as vLLM: what UIs send for "random")
            self.seed = None

    def validate(self, vocab_size: int | None = None) -> None:
        """Raises ValueError naming the parameter at fault."""

        def bad(param: str, msg: str) -> ValueError:
            return ValueError(f"{param}: {msg}")

        if not isinstance(self.n, int) or not 1 <= self.n <= MAX_N:
            raise bad("n", f"must be an integer in [1, {MAX_N}], got {self.n!r}")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise bad("temperature", f"must be >= 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", f"must be -1, 0 (disabled) or a positive integer, got {self.top_k!r}")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", f"must be in [0, 1], got {self.min_p!r}")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", f"must be > 0, got {self.repetition_penalty!r}")
        if not _is_number(self.presence_penalty) or not -2 <= self.presence_penalty <= 2:
            raise bad("presence_penalty", f"must be in [-2, 2], got {self.presence_penalty!r}")
        if not _is_number(self.frequency_penalty) or not -2 <= self.frequency_penalty <= 2:
            raise bad("frequency_penalty", f"must be in [-2, 2], got {self.frequency_penalty!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not -(2**63) <= self.seed < 2**64):
            raise bad("seed", f"must be a 64-bit integer, got {self.seed!r}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise bad("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad("min_tokens", f"must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise bad("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise bad("stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} ids, got {len(self.stop_token_ids)}")
        if self.stop and not self.detokenize:
            raise bad("stop", "stop strings need the text: set detokenize=True (or use stop_token_ids)")
        if self.max_reasoning_tokens is not None and not self.detokenize:
            raise bad("max_reasoning_tokens", "a reasoning budget reads the text for </think>: set detokenize=True")
        for name in ("detokenize", "spaces_between_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, f"must be true or false, got {getattr(self, name)!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise bad("stop", f"stop strings must be non-empty strings, got {s!r}")
            if len(s) > MAX_STOP_STRING_CHARS:
                raise bad("stop", f"a stop string may hold at most {MAX_STOP_STRING_CHARS} characters, got {len(s)}")
        for t in self.stop_token_ids:
            if not isinstance(t, int) or t < 0 or (vocab_size is not None and t >= vocab_size):
                raise bad("stop_token_ids", f"{t!r} is not a token id of this model")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or not 0 <= v <= MAX_LOGPROBS):
                raise bad(name, f"must be an integer in [0, {MAX_LOGPROBS}], got {v!r}")
        if self.logit_bias and len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise bad("logit_bias", f"at most {MAX_LOGIT_BIAS} tokens, got {len(self.logit_bias)}")
        for t, v in (self.logit_bias or {}).items():
            if not isinstance(t, int) or t < 0 or (vocab_size is not None and t >= vocab_size):
                raise bad("logit_bias", f"{t!r} is not a token id of this model")
            if not _is_number(v) or not -100 <= v <= 100:
                raise bad("logit_bias", f"bias of token {t} must be in [-100, 100], got {v!r}")
        if self.max_reasoning_tokens is not None:
            if (not isinstance(self.max_reasoning_tokens, int) or isinstance(self.max_reasoning_tokens, bool)
                    or self.max_reasoning_tokens < 0):
                raise bad("max_reasoning_tokens", f"must be an integer >= 0, got {self.max_reasoning_tokens!r}")
            if self.structured_outputs is not None:
                raise bad("max_reasoning_tokens", "cannot be combined with structured outputs (the closing tag "
                          "it writes is outside the grammar)")
        if not isinstance(self.use_beam_search, bool):
            raise bad("use_beam_search", f"must be a boolean, got {self.use_beam_search!r}")
        if not _is_number(self.length_penalty) or not -10 <= self.length_penalty <= 10:
            # length ** penalty must stay a float for any length the context allows
            raise bad("length_penalty", f"must be a number in [-10, 10], got {self.length_penalty!r}")
        allowed = self.allowed_token_ids
        if allowed is not None:
            if not isinstance(allowed, list) or not allowed:
                raise bad("allowed_token_ids", "must be a non-empty list of token ids")
            bad_ids = [t for t in allowed if isinstance(t, bool) or not isinstance(t, int) or t < 0
                       or (vocab_size is not None and t >= vocab_size)]
            if bad_ids:
                raise bad("allowed_token_ids", f"{bad_ids[:5]} are not token ids of the vocabulary"
                          + (f" [0, {vocab_size})" if vocab_size is not None else ""))
        words = self.bad_words
        if words is not None:
            if not isinstance(words, list) or any(not isinstance(w, str) or not w.strip() for w in words):
                raise bad("bad_words", "must be a list of non-empty strings")
            if len(words) > MAX_STOP_STRINGS:
                raise bad("bad_words", f"at most {MAX_STOP_STRINGS} words, got {len(words)}")
            if any(len(w) > MAX_STOP_STRING_CHARS for w in words):
                raise bad("bad_words", f"a word may hold at most {MAX_STOP_STRING_CHARS} characters")
        k = self.truncate_prompt_tokens
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or (k < 1 and k != -1)):
            raise bad("truncate_prompt_tokens", f"must be -1 (max_model_len) or an integer >= 1, got {k!r}")
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise bad("early_stopping", f"must be true, false or \"never\", got {self.early_stopping!r}")
        if self.use_beam_search:
            self._validate_beam_search()
        if self.structured_outputs is not None:
            if not isinstance(self.structured_outputs, StructuredOutputsParams):
                raise bad("structured_outputs", "must be a StructuredOutputsParams")
            try:
                self.structured_outputs.kind()
            except ValueError as e:
                raise bad("structured_outputs", str(e)) from None

    def clone(self) -> SamplingParams:
        """vLLM's: a deep copy, to change without touching this one."""
        return copy.deepcopy(self)

    def is_model_default(self, name: str) -> bool:
        """Whether the field holds the value the model's defaults gave it (not the caller's)."""
        return any(n == name and getattr(self, n) == v for n, v in self._defaulted)

    @property
    def max_tokens_is_cap(self) -> bool:
        """max_tokens is an upper bound the server or the model filled in, not the caller's: a
        prompt that leaves less room gets that room instead of a refusal."""
        return self._max_tokens_is_cap or self.is_model_default("max_tokens")

    def _validate_beam_search(self) -> None:
        # Beam scores are the model's own log-probabilities (as in transformers and vLLM); what
        # would change them, or needs a per-beam text state, is refused rather than ignored. A
        # model's default penalty is dropped instead (LLMEngine.add_request): as in vLLM, beams
        # take the defaults of temperature and max_tokens alone.
        changed = [name for name, default in (("repetition_penalty", 1.0), ("presence_penalty", 0.0),
                                              ("frequency_penalty", 0.0))
                   if getattr(self, name) != default and not self.is_model_default(name)]
        changed += [name for name in ("logit_bias", "structured_outputs", "max_reasoning_tokens", "stop",
                                      "allowed_token_ids", "bad_words")
                    if getattr(self, name) not in (None, [], {})]
        if changed:
            raise ValueError(f"{changed[0]}: not supported with use_beam_search")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5


@dataclass
class BeamSearchParams:
    """vLLM's LLM.beam_search parameters. The search is tokenmill's beam search (use_beam_search):
    deterministic, so temperature does not apply (vLLM's scores are raw logprobs too)."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False


_NUMBERS = ("n", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
            "frequency_penalty", "seed", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs",
            "max_reasoning_tokens", "length_penalty", "truncate_prompt_tokens")


def pooling_params(truncate_prompt_tokens: int | None = None) -> SamplingParams:
    """A pooling request's (an embedding, a classification, a pair's score): its prompt only."""
    return SamplingParams(max_tokens=1, temperature=0, _prompt_only=True, truncate_prompt_tokens=truncate_prompt_tokens)


def _plain(v: object) -> object:
    """A numpy integer or floating scalar as a Python int or float; anything else as it is."""
    if isinstance(v, (bool, int, float)) or v is None:
        return v
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        return float(v)
    return v


def _is_number(v: object) -> bool:
    """A finite int or float (not a bool; not an int too large for a float)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False
