"""Structured outputs: decoding constrained by a JSON schema, a regex, a choice or a grammar.

The grammar engine is llguidance (Microsoft's, Rust, MIT). Why it over xgrammar: a pip wheel
with no dependencies (xgrammar needs triton and a torch of its own choosing, which would pull a
CUDA torch into CPU installs), masks computed lazily from the token trie in ~0.1 ms per row on
this CPU with no per-schema compile step worth caching (~1 ms), and the widest JSON-schema
coverage of the two (it is what OpenAI's and Azure's structured outputs were measured against;
unsupported keywords such as `not` are reported by name, never silently ignored).

How it fits the engine:
- A request's StructuredOutputsParams compile once to a CompiledGrammar (cached by spec); the
  server does that on a worker thread with a time limit, so a huge schema never stalls the
  engine thread, and an invalid one is a 400 naming the problem.
- Each sequence of the request gets its own matcher (a cheap copy of the compiled one).
- Before sampling, the runner fills one bitmask row per constrained row (allowed tokens), and
  the sampler sets every other logit to -inf (apply_bitmask): constrained and free rows share
  one batched sampling pass.
- After a token is accepted the engine advances the sequence's matcher; a grammar that can
  produce nothing more finishes the sequence (finish_reason "stop").
- Speculative decoding: each draft position gets the mask of the state after the drafts before
  it, so verification never accepts a token the grammar forbids.
"""

from __future__ import annotations

import json
import re
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


class GrammarError(ValueError):
    """A constraint that compiled but failed while decoding (too complex for the parser's limits)."""


# Compiled grammars kept per engine (specs repeat: the same schema across many requests).
CACHE_SIZE = 256


@dataclass
class StructuredOutputsParams:
    """vLLM's StructuredOutputsParams: exactly one of the constraints."""

    json: str | dict | None = None  # a JSON schema (object or its text)
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # Lark (llguidance's syntax) or GBNF (`root ::= ...`)
    json_object: bool | None = None  # any JSON object
    # JSON is generated with the separators most training data has (", " and ": ", no newlines)
    # unless this is True. Weak or random models given free whitespace can spend every token on it.
    whitespace_flexible: bool = False
    # vLLM's: True forbids the whitespace JSON may hold, which the default above already does (so the
    # two may not both be True)
    disable_any_whitespace: bool = False
    # Set by whoever compiled it (the server, off the engine thread), so the engine need not.
    _compiled: Any = field(default=None, repr=False, compare=False)

    def kind(self) -> tuple[str, Any]:
        """(kind, spec) of the one constraint given; ValueError when none or several are."""
        if self.disable_any_whitespace and self.whitespace_flexible:
            raise ValueError("disable_any_whitespace and whitespace_flexible contradict each other")
        given = [(k, getattr(self, k)) for k in ("json", "regex", "choice", "grammar", "json_object")
                 if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            names = ", ".join(k for k, _ in given) or "none"
            raise ValueError(f"exactly one of json, regex, choice, grammar or json_object must be given "
                             f"(got {names})")
        return given[0]

    def key(self) -> str:
        kind, spec = self.kind()
        if kind == "json":
            try:  # the same schema as text or as an object is one cache entry
                spec = json.dumps(_parsed(spec), sort_keys=True)
            except ValueError:
                pass  # invalid: compile() says so
        return json.dumps([kind, spec, self.whitespace_flexible])

    def lark_or_schema(self) -> str:
        """llguidance's grammar text for this constraint; ValueError naming what is wrong."""
        from llguidance import LLMatcher

        kind, spec = self.kind()
        defaults: dict[str, Any] = {"whitespace_flexible": self.whitespace_flexible}
        if not self.whitespace_flexible:
            defaults.update(item_separator=", ", key_separator=": ")
        if kind == "json" or kind == "json_object":
            spec = {"type": "object"} if kind == "json_object" else _parsed(spec)
            if not isinstance(spec, (dict, bool)):
                raise ValueError("invalid JSON schema: must be a JSON object (or a boolean)")
            spec = close_objects(spec)
            return LLMatcher.grammar_from_json_schema(json.dumps(spec), defaults=defaults)
        if kind == "regex":
            if not isinstance(spec, str):
                raise ValueError("invalid regex: must be a string")
            return LLMatcher.grammar_from_regex(spec)
        if kind == "choice":
            if (not isinstance(spec, list) or not spec or not all(isinstance(c, str) for c in spec)):
                raise ValueError("invalid choice: must be a non-empty list of strings")
            return LLMatcher.grammar_from_regex("|".join(f"({re.escape(c)})" for c in spec))
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError("invalid grammar: must be a non-empty string")
        return LLMatcher.grammar_from_lark(gbnf_to_lark(spec) if "::=" in spec else spec)


def _parsed(spec: Any) -> Any:
    """A JSON schema given as text, parsed; one given as an object, as it is."""
    if not isinstance(spec, str):
        return spec
    try:
        return json.loads(spec)
    except ValueError as e:
        raise ValueError(f"invalid JSON schema: not valid JSON: {e}") from None


_WHAT = {"json": "JSON schema", "json_object": "JSON object format", "regex": "regex", "choice": "choice",
         "grammar": "grammar"}


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_ONE = ("items", "additionalItems", "additionalProperties", "unevaluatedItems", "unevaluatedProperties",
               "propertyNames", "contains", "not", "if", "then", "else")


def close_objects(schema: Any, in_all_of: bool = False) -> Any:
    """A copy of schema in which an object that lists `properties` and says nothing about other
    keys admits no other keys (vLLM's default, xgrammar's strict mode; what OpenAI requires): a
    model is never led into inventing keys. `additionalProperties: true` keeps them open."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for k in _SCHEMA_MAPS:
        if isinstance(out.get(k), dict):
            out[k] = {name: close_objects(v) for name, v in out[k].items()}
    for k in _SCHEMA_LISTS:
        if isinstance(out.get(k), list):
            # allOf branches each see only part of the object: closing one would forbid the others' keys.
            out[k] = [close_objects(v, in_all_of=k == "allOf") for v in out[k]]
    for k in _SCHEMA_ONE:
        if isinstance(out.get(k), list):
            out[k] = [close_objects(v) for v in out[k]]
        elif isinstance(out.get(k), dict):
            out[k] = close_objects(out[k])
    if ("properties" in out and not in_all_of and "allOf" not in out and "additionalProperties" not in out
            and "patternProperties" not in out and "unevaluatedProperties" not in out):
        out["additionalProperties"] = False
    return out


class CompiledGrammar:
    """One compiled constraint; matcher() gives each sequence its own state."""

    def __init__(self, template: Any) -> None:
        self._template = template

    def matcher(self) -> Any:
        return self._template.deep_copy()


class GrammarCompiler:
    """Compiles StructuredOutputsParams against one tokenizer, with an LRU cache. Thread-safe:
    the server compiles on worker threads while the engine thread looks up the same cache."""

    def __init__(self, load_tokenizer: Callable[[], Any], vocab_size: int, eos_token_ids: tuple[int, ...]) -> None:
        self._load_tokenizer = load_tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self._ll_tokenizer: Any = None
        self._lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()  # held while building (a second); the cache's lock is not
        self._cache: OrderedDict[str, CompiledGrammar] = OrderedDict()

    def _tokenizer(self) -> Any:
        with self._tokenizer_lock:
            if self._ll_tokenizer is None:
                hf_tokenizer = self._load_tokenizer()
                if hf_tokenizer is None:
                    raise ValueError("structured_outputs: this model folder has no tokenizer to build masks from")
                import llguidance.hf

                # Every id the model can emit gets a mask bit (the model's vocabulary may be padded
                # past the tokenizer's); any of the model's end-of-sequence ids ends a finished grammar.
                self._ll_tokenizer = llguidance.hf.from_tokenizer(
                    hf_tokenizer, n_vocab=self.vocab_size, eos_token=self.eos_token_ids or None)
            return self._ll_tokenizer

    def cached(self, so: StructuredOutputsParams) -> CompiledGrammar | None:
        with self._lock:
            return self._cache.get(so.key())

    def compile(self, so: StructuredOutputsParams) -> CompiledGrammar:
        key = so.key()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        from llguidance import LLMatcher

        what = _WHAT[so.kind()[0]]
        grammar = so.lark_or_schema()
        is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
        if is_error:
            raise ValueError(f"invalid {what}: {'; '.join(m.strip() for m in messages) or 'rejected'}")
        template = LLMatcher(self._tokenizer(), grammar)
        # The first mask builds the lexer: a grammar too complex for the parser's limits fails here,
        # on the compiling thread, rather than in the engine's step.
        probe = template.deep_copy()
        fill_bitmask([(probe, [])], self.vocab_size)
        if template.is_error() or probe.is_error():
            raise ValueError(f"invalid {what}: {(template.get_error() or probe.get_error()).strip()}")
        compiled = CompiledGrammar(template)
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled


# -- masks ------------------------------------------------------------------------------------
_executor: Any = None


def fill_bitmask(rows: list[tuple[Any, list[int]]], vocab_size: int) -> torch.Tensor:
    """An int32 bitmask of allowed tokens, ceil(V / 32) words a row: for each (matcher, drafts)
    in order, one row at the matcher's state and, for speculative decoding, one more after each
    draft (the matcher is left as it was). Rows past a draft the grammar forbids are never used
    (verification rejects that draft); they allow everything, so that no row is all -inf."""
    global _executor
    import llguidance.torch as lt

    if _executor is None:
        _executor = lt.LLExecutor()
    firsts, r = [], 0
    for _, drafts in rows:
        firsts.append(r)
        r += 1 + len(drafts)
    bitmask = torch.zeros(r, (vocab_size + 31) // 32, dtype=torch.int32)
    plain = [(m, r0) for (m, d), r0 in zip(rows, firsts) if not d]
    if plain:
        lt.fill_next_token_bitmask_par(_executor, plain, bitmask)
    drafted = [(m, r0, d) for (m, d), r0 in zip(rows, firsts) if d]
    if drafted:
        lt.fill_next_token_bitmask_par_with_draft_tokens(_executor, drafted, bitmask)
        bitmask[(bitmask == 0).all(dim=1)] = -1
    return bitmask


def ids_bitmask(ids: list[int], vocab_size: int) -> torch.Tensor:
    """A bitmask row (fill_bitmask's layout) allowing exactly these token ids."""
    words = np.zeros((vocab_size + 31) // 32, np.uint32)
    a = np.asarray(ids, np.int64)
    np.bitwise_or.at(words, a // 32, (np.uint32(1) << (a % 32).astype(np.uint32)))
    return torch.from_numpy(words.view(np.int32))


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int, device: torch.device) -> torch.Tensor:
    """The bitmask as a bool [rows, vocab_size] on device: bit b of word w is token 32 w + b."""
    if device.type == "cpu" and bitmask.device.type == "cpu" and sys.byteorder == "little":
        # numpy's unpackbits is one vectorized pass (0.3 ms for 32 x 49K); the shift-and-compare
        # below builds int32 intermediates 32x the mask's size (6 ms).
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")
        return torch.from_numpy(bits[:, :vocab_size]).view(torch.bool)
    words = bitmask.to(device)
    shifts = torch.arange(32, dtype=torch.int32, device=device)  # (made there: a copy would wait for the device)
    return (((words[:, :, None] >> shifts) & 1) != 0).view(len(bitmask), -1)[:, :vocab_size]


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int],
                  index: torch.Tensor | None = None) -> torch.Tensor:
    """A copy of logits with every token that the masks forbid set to -inf (bitmask row i
    belongs to logits row rows[i]; index: rows on logits' device, when the caller staged it)."""
    allowed = allowed_tokens(bitmask, logits.shape[1], logits.device)
    if rows == list(range(logits.shape[0])):  # every row constrained: one pass
        return logits.masked_fill(~allowed, float("-inf"))
    idx = index if index is not None else torch.tensor(rows, dtype=torch.long, device=logits.device)
    return logits.index_copy(0, idx, logits.index_select(0, idx).masked_fill(~allowed, float("-inf")))


# -- GBNF -------------------------------------------------------------------------------------
_GBNF_TOKEN = re.compile(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|#[^\n]*|::=|[A-Za-z_][A-Za-z0-9_-]*|\s+|.',
                         re.S)


def gbnf_to_lark(text: str) -> str:
    """llama.cpp's GBNF (`root ::= "a" [0-9]+ rule-name`) as llguidance Lark: `::=` becomes
    `:`, the root rule `start`, character classes regexes, dashes in names underscores."""
    out = []
    for tok in _GBNF_TOKEN.findall(text):
        if tok == "::=":
            out.append(":")
        elif tok.startswith("#"):
            continue
        elif tok.startswith("["):
            out.append("/" + tok.replace("/", "\\/") + "/")
        elif tok[0].isalpha() or tok[0] == "_":
            name = tok.replace("-", "_")
            out.append("start" if name == "root" else ("root_" if name == "start" else name.lower()))
        else:
            out.append(tok)
    # A GBNF rule may span lines; each Lark rule goes on one line.
    rules: list[str] = []
    rule_start = re.compile(r"^\s*[a-z_][a-z0-9_]*\s*:")
    for line in "".join(out).splitlines():
        if not line.strip():
            continue
        if rule_start.match(line) or not rules:
            rules.append(line.strip())
        else:
            rules[-1] += " " + line.strip()
    return "\n".join(rules)
