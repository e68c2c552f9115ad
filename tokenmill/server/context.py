"""What every route does with the model it serves: one ServerContext per model of the pool.

Its methods are the steps the route families have in common once a request has its model (see
gateway.py for the steps before: body, auth, admission, which model): tokenizing, chat
templates, handing requests to the engine (with its errors as OpenAI-style ones), streaming a
group's choices, and the logprob formats of both generation endpoints.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from tokenmill.engine.detokenizer import IncrementalDetokenizer, safe_stream_end, token_string
from tokenmill.engine.llm_engine import load_tokenizer
from tokenmill.engine.slo import SLOAdmissionError
from tokenmill.ops.tenants import Admission, LimitExceeded, RequestTooLarge, tenant_salt
from tokenmill.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.async_engine import AsyncEngine, EngineStoppedError, QueueFullError
from tokenmill.server.errors import APIError, bad_request, error_body, limit_error
from tokenmill.server.metrics import ServerMetrics
from tokenmill.server.streaming import SSE_DONE, ChoiceState, StreamFailed, raw_token_bytes, sse, top
from tokenmill.server.tools import infer_parser, render_chat, template_messages
from tokenmill.structured import StructuredOutputsParams

logger = logging.getLogger("tokenmill.server")

# The tags of the request being handled (gateway.py sets them): its "tenant" and "slo" (an SLOTarget).
REQUEST_TAGS: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("tokenmill_tags", default=None)
# The tenant admission of the request being handled (gateway.py admits it, submit reserves its tokens).
ADMISSION: contextvars.ContextVar[Admission | None] = contextvars.ContextVar("tokenmill_admission", default=None)


# Sequences one HTTP request may start (prompts x n): a small body must not queue millions.
MAX_SEQS_PER_REQUEST = 256
# A grammar (JSON schema, regex, ...) that takes longer to compile is refused with a 400.
GRAMMAR_COMPILE_TIMEOUT_S = 10.0


@dataclass
class ServerSettings:
    """One served model's settings on the HTTP side."""

    served_model_name: str
    model_path: str
    retry_after_s: int = 1  # the Retry-After of a 429 (queue full)
    tool_call_parser: str = "auto"  # a name in tools.PARSERS, or inferred from the chat template
    reasoning_parser: str | None = None  # a name in reasoning.REASONING_PARSERS: `reasoning` apart from content
    trust_request_chat_template: bool = False  # a request's own chat_template is rendered (vLLM's flag)



def engine_api_error(message: str, status: int) -> APIError:
    """An engine's failure of a request (RequestOutput.error, or a stream's StreamFailed) as the
    client gets it, the same whether the response is streamed (an error event) or not."""
    if status == 400:
        return APIError(400, message, code="invalid_constraint")
    if status == 503:  # a cascade's strong model could not be brought back
        return APIError(503, message, code="model_unavailable", headers={"Retry-After": "5"})
    return APIError(500, f"the engine failed this request: {message}", code="engine_error")


class ServerContext:
    """One model's side of the HTTP server: its engine, tokenizer and the request steps that use them."""

    def __init__(self, engine: AsyncEngine, settings: ServerSettings, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.settings = settings
        self.llm_engine = engine.engine
        # The HTTP side gets its own tokenizer instance: the engine thread decodes with the engine's
        # at the same time, and a Rust tokenizer object should not be shared across threads.
        cfg = self.llm_engine.config
        self.tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, cfg.chat_template)
        self.vocab = self.llm_engine.model_config.vocab_size
        self.name = settings.served_model_name
        self.metrics = metrics
        name = self.name
        engine.on_output = lambda out: metrics.observe(out, name)
        self.tokenize_lock = asyncio.Lock()
        # Grammars compile here, never on the event loop or the engine thread.
        self.grammar_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="grammar")
        parser = settings.tool_call_parser
        self.tool_parser = (infer_parser(getattr(self.tokenizer, "chat_template", None)) if parser == "auto"
                            else parser)
        logger.info("%s: tool calls: %s", name, f"{self.tool_parser} format" if self.tool_parser else
                    "no parser (the chat template shows no tool-call format; tool_choice 'auto' is refused, "
                    "--tool-call-parser sets one)")

    @staticmethod
    def constraint(req: Any) -> tuple[StructuredOutputsParams, str] | None:
        """The request's response_format / structured_outputs / guided_* constraint and its field;
        a 400 when they are malformed or contradict each other."""
        try:
            return req.structured()
        except ValueError as e:
            raise bad_request(e) from None

    async def constrain(self, params: SamplingParams, found: tuple[StructuredOutputsParams, str] | None) -> None:
        """Sets params' structured output to `found` (a constraint and its field), compiled now, off
        the loop and with a time limit, so that the engine need not; a bad or too complex
        constraint is a 400 naming its field."""
        if found is None:
            return
        so, param = found
        params.structured_outputs = so
        grammars = self.llm_engine.grammars
        loop = asyncio.get_running_loop()
        try:
            so._compiled = grammars.cached(so) or await asyncio.wait_for(
                loop.run_in_executor(self.grammar_pool, grammars.compile, so), GRAMMAR_COMPILE_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise APIError(400, f"{param}: the constraint took longer than {GRAMMAR_COMPILE_TIMEOUT_S:g} s to "
                           f"compile; simplify it", param=param) from None
        except ValueError as e:
            raise APIError(400, f"{param}: {e}", param=param) from None

    async def prompts(self, p: str | list[str] | list[int] | list[list[int]],
                      param: str = "prompt") -> list[tuple[str | None, list[int]]]:
        """(text, token ids) of each prompt given as OpenAI allows it: a string, strings, token ids
        or lists of token ids (text None for ids)."""
        if isinstance(p, str):
            return [(p, await self.encode(p, param=param))]
        if p and all(isinstance(x, str) for x in p):
            return [(x, await self.encode(x, param=param)) for x in p]  # type: ignore[misc]
        if p and all(isinstance(x, int) for x in p):
            return [(None, list(p))]  # type: ignore[arg-type]
        if p:
            return [(None, list(x)) for x in p]  # type: ignore[union-attr]
        raise APIError(400, f"{param}: the {param} list is empty", param=param)

    # -- tokens ---------------------------------------------------------------------------------
    def encode_now(self, text: str, add_special_tokens: bool = True, param: str = "prompt") -> list[int]:
        if self.tokenizer is None:
            raise APIError(400, f"{param}: this model has no tokenizer; send token ids", param=param)
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    async def encode(self, text: str, add_special_tokens: bool = True, param: str = "prompt") -> list[int]:
        # Long texts take milliseconds to tokenize: do that off the event loop, one at a time
        # (and never while a short one runs on the loop, so the tokenizer has one user at a time).
        if len(text) < 4096 and not self.tokenize_lock.locked():
            return self.encode_now(text, add_special_tokens, param)
        async with self.tokenize_lock:
            return await asyncio.to_thread(self.encode_now, text, add_special_tokens, param)

    def chat_prompt(self, req: Any, tools: list[dict[str, Any]] | None = None) -> str:
        """The prompt text of a chat or /tokenize request's messages (render_chat)."""
        template = getattr(req, "chat_template", None)
        if template is not None and not self.settings.trust_request_chat_template:
            raise APIError(400, "chat_template: this server renders only its own chat templates; start it with "
                           "--trust-request-chat-template to accept a request's", param="chat_template")
        try:
            return render_chat(self.tokenizer, template_messages(req.messages), req.add_generation_prompt,
                               tools if tools is not None else getattr(req, "tools", None),
                               req.continue_final_message, req.chat_template_kwargs,
                               documents=getattr(req, "documents", None), chat_template=template)
        except ValueError as e:
            raise bad_request(e) from None

    def token_bytes(self, tid: int, s: str) -> list[int]:
        """The token's own bytes: for a piece of a UTF-8 character, not the encoding of U+FFFD."""
        if self.tokenizer is None or "\ufffd" not in self.tokenizer.decode([tid]):
            return list(s.encode("utf-8"))
        return list(raw_token_bytes(s))

    def token_str(self, tid: int, as_id: bool = False) -> str:
        if as_id or self.tokenizer is None:
            return f"token_id:{tid}"
        return token_string(self.tokenizer, tid)

    # -- the engine -----------------------------------------------------------------------------
    def prompt_dict(self, text: str | None, ids: list[int], cache_salt: str | None,
                    resume: list[int] | None = None) -> dict[str, Any]:
        """The engine's prompt, with the request's tags (REQUEST_TAGS: its tenant and SLO targets).
        A tenant is mixed into the cache salt, so tenants never share prefix-cache blocks."""
        d: dict[str, Any] = {"prompt": text, "prompt_token_ids": ids}
        tags = REQUEST_TAGS.get()
        tenant = tags.get("tenant") if tags else None
        if tenant is not None:
            d["tenant"] = tenant
            cache_salt = tenant_salt(tenant, cache_salt)
        if tags and tags.get("slo") is not None:
            d["slo"] = tags["slo"]
        if cache_salt is not None:
            d["cache_salt"] = cache_salt
        if resume:
            d["resume_token_ids"] = resume
        if tags and tags.get("kv_hold") is not None:
            d["kv_hold"] = tags["kv_hold"]
        if tags and tags.get("kv_release") is not None:
            d["kv_release"] = tags["kv_release"]
        return d

    def sampling_params(self, req: Any, max_tokens: int | None, logprobs: int | None,
                        prompt_logprobs: int | None = None) -> SamplingParams:
        """The request's SamplingParams, with this model's defaults for what it leaves out. A
        max_tokens the server filled in (a tenant's cap, Gateway.cap_max_tokens, or the model's
        default) is an upper bound, and the lower of the two applies."""
        try:
            params = req.sampling_params(max_tokens, logprobs, prompt_logprobs, self.llm_engine.default_sampling)
        except ValueError as e:
            raise bad_request(e) from None
        tags = REQUEST_TAGS.get()
        if tags is not None and tags.get("max_tokens_is_cap"):
            default = self.llm_engine.default_sampling.get("max_tokens")
            if default is not None and params.max_tokens is not None and default < params.max_tokens:
                params.max_tokens = default
            params._max_tokens_is_cap = True
        return params

    async def submit(self, requests: list[tuple[str, dict, SamplingParams]], priority: int, arrival: float,
                     max_seqs: int = MAX_SEQS_PER_REQUEST, param: str = "prompt", group: Any = None,
                     reserve_tokens: int | None = None):
        """Queues the requests (into group, when given: more of an admitted request's work).

        A tenant's request (ADMISSION, or the group's) runs at no lower priority than its tenant's,
        and its tokens are reserved here, where the prompts are known, with no await between the
        check and the reservation: prompt plus the most it may generate (reserve_tokens when the
        caller knows better: a test-time-compute run's paths); its outputs settle the count."""
        try:
            requests[0][2].validate(self.vocab)  # every prompt shares these params; n is checked before counting
        except ValueError as e:
            raise bad_request(e) from None
        tags = REQUEST_TAGS.get()
        if tags is not None and tags.get("max_tokens_is_cap"):
            for r in requests:
                r[2]._max_tokens_is_cap = True
        seqs = sum(r[2].n for r in requests)
        if seqs > max_seqs:
            raise APIError(400, f"{param}: {len(requests)} prompts x n={requests[0][2].n} = {seqs} sequences; "
                           f"at most {max_seqs} per request", param=param)
        adm = ADMISSION.get() if group is None else getattr(group, "admission", None)
        rids = [r[0] for r in requests]
        if adm is not None:
            priority = max(priority, adm.tenant.priority)  # vLLM's convention: a larger value runs later
            if group is None:
                prompt_tokens = sum(len(r[1]["prompt_token_ids"]) for r in requests)
                need = reserve_tokens if reserve_tokens is not None else prompt_tokens + sum(
                    self.max_new_tokens(len(r[1]["prompt_token_ids"]), r[2]) for r in requests)
                try:
                    adm.reserve(prompt_tokens, need)
                except LimitExceeded as e:
                    raise limit_error(e) from None
                except RequestTooLarge as e:
                    raise APIError(400, str(e), param="max_tokens", code="request_too_large") from None
            adm.track(rids, counts_output=not requests[0][2]._prompt_only)
        try:
            added = await self.engine.add_requests(requests, priority=priority, arrival_time=arrival, group=group)
        except BaseException as e:
            if adm is not None:  # nothing of it runs: it used nothing
                adm.untrack(rids)
                if group is None:
                    adm.cancel_reservation()
            if isinstance(e, ValueError):
                raise bad_request(e) from None
            if isinstance(e, SLOAdmissionError):
                tags = REQUEST_TAGS.get() or {}
                slo = tags.get("slo")
                self.metrics.observe_slo_rejected(self.name, tags.get("tenant"),
                                                  slo.slo_class if slo else "custom")
                raise APIError(429, str(e), param="slo", code="slo_unattainable",
                               headers={"Retry-After": str(self.settings.retry_after_s)}) from None
            if isinstance(e, QueueFullError):
                raise APIError(429, f"too many requests waiting: {e}", code="queue_full",
                               headers={"Retry-After": str(self.settings.retry_after_s)}) from None
            if isinstance(e, EngineStoppedError):
                raise APIError(503, str(e), headers={"Retry-After": "5"}) from None
            raise
        if adm is not None and group is None:
            added.admission = adm  # later work joining the group (test-time compute) finds it there
        return added

    def max_new_tokens(self, prompt_len: int, params: SamplingParams) -> int:
        """The most tokens one prompt's request may generate: n samples of max_tokens (the rest of
        the context when it sets none); none for a prompt that is only scored or embedded."""
        if params._prompt_only:
            return 0
        per = params.max_tokens if params.max_tokens is not None else self.llm_engine.max_model_len - prompt_len
        return params.n * max(per, 0)

    def engine_error(self, out: RequestOutput) -> APIError:
        return engine_api_error(out.error or "", out.error_status)

    async def choice_deltas(self, group, params: SamplingParams, states: dict[tuple[str, int], ChoiceState],
                            cached: dict[str, int], computes: dict[str, Any] | None = None):
        """(request output, choice, delta) for every streamable change; StreamFailed on an engine error.
        cached collects each request's prefix-cache hit (known once it is scheduled), computes its
        latest compute account (the final usage sums them)."""
        async for batch in self.engine.stream(group):
            for out in batch:
                if out.error is not None:
                    raise StreamFailed(out.error, out.error_status)
                cached[out.request_id] = out.num_cached_tokens
                if computes is not None and out.compute is not None:
                    computes[out.request_id] = out.compute
                for c in out.outputs:
                    delta = states.setdefault((out.request_id, c.index), ChoiceState()).advance(c, params)
                    if delta is not None:
                        yield out, c, delta

    def check_resume(self, req: Any, params: SamplingParams, prompts: int = 1) -> None:
        """A 400 when a request's resume_token_ids cannot be honoured."""
        if req.resume_token_ids is None:
            return
        for name, bad in (("stream", not req.stream), ("n", params.n != 1), ("prompt", prompts != 1),
                          ("use_beam_search", params.use_beam_search),
                          ("test_time_compute", req.test_time_compute is not None)):
            if bad:
                raise APIError(400, f"resume_token_ids: resumes one streamed choice; not with this {name}",
                               param="resume_token_ids")

    def resumed_state(self, prompt_ids: list[int], resume: list[int] | None,
                      params: SamplingParams) -> tuple[ChoiceState, str]:
        """The stream state after the resumed tokens, as the first server left it, and their text:
        the same incremental decoding the engine does, so the next chunk starts where its last ended."""
        state = ChoiceState()
        if not resume:
            return state, ""
        state.tokens = len(resume)
        if self.tokenizer is None:  # no text at all (token ids only)
            return state, ""
        det = IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens, params.stop or [],
                                     params.include_stop_str_in_output)
        for i, t in enumerate(resume):  # stop strings count after min_tokens, as LLMEngine._check_stop has it
            det.add_token(t, check_stop=i + 1 > params.min_tokens)
        state.text = safe_stream_end(det.text, params.stop or [], False, 0)
        return state, det.text[: state.text]

    def stream_failed(self, e: StreamFailed) -> list[str]:
        return self.stream_error(engine_api_error(e.message, e.status))

    def stream_error(self, err: APIError) -> list[str]:
        """The events that end a stream that failed after it started (its status is sent already)."""
        return [sse(error_body(err.status, err.message, err.param, err.type, err.code)), SSE_DONE]

    # -- logprob formats ------------------------------------------------------------------------
    def text_offsets(self, context_ids: list[int], skip_special_tokens: bool) -> TextOffsets:
        return TextOffsets(self.tokenizer, context_ids, skip_special_tokens)

    def completion_logprobs(self, c: CompletionOutput, start: int, end: int, k: int, offsets: list[int],
                            as_ids: bool) -> dict[str, Any]:
        """offsets: where each token's text starts (TextOffsets), clamped to the text sent so far."""
        tokens, lps, tops = [], [], []
        for tid, entry in zip(c.token_ids[start:end], (c.logprobs or [])[start:end]):
            tokens.append(self.token_str(tid, as_ids))
            lps.append(entry[tid].logprob)
            tops.append({self.token_str(t, as_ids): lp.logprob for t, lp in top(entry, k, tid)})
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def echo_logprobs(self, ids: list[int], entries: list[PositionLogprobs | None], k: int,
                      as_ids: bool, text: str, from_text: bool) -> dict[str, Any]:
        """The prompt's part of an echoed completion's logprobs, as OpenAI returned it: the first
        token's logprob and top_logprobs null (nothing precedes it). text: the prompt as echoed
        (from_text: the client's own string; else the ids decoded)."""
        tokens, lps, tops = [], [], []
        for i, tid in enumerate(ids):
            entry = entries[i] if i < len(entries) else None
            tokens.append(self.token_str(tid, as_ids))
            lps.append(None if entry is None else entry[tid].logprob)
            tops.append(None if entry is None
                        else {self.token_str(t, as_ids): lp.logprob for t, lp in top(entry, k, tid)})
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops,
                "text_offset": self._echo_offsets(ids, text, from_text)}

    def _echo_offsets(self, ids: list[int], text: str, from_text: bool) -> list[int]:
        """An echoed prompt's offsets. The client's string holds the special tokens written in it
        ("<|im_start|>") but not those the tokenizer added (BOS): decoded with special tokens, the
        added leading ones are left out when that gives back the string."""
        lead = 0
        if from_text and self.tokenizer is not None:
            lead = next((k for k in (0, 1, 2) if k < len(ids) and
                         self.tokenizer.decode(ids[k:], skip_special_tokens=False) == text), None)
            if lead is None:  # (a string the decode does not give back: special tokens left out)
                return self.text_offsets([], True).take(ids, 0, len(ids), len(text))
        return [0] * lead + self.text_offsets([], False).take(ids[lead:], 0, len(ids) - lead, len(text))

    def vllm_prompt_logprobs(self, ids: list[int], entries: list[PositionLogprobs | None],
                             k: int) -> list[dict[str, Any] | None]:
        """vLLM's prompt_logprobs: per position None (the first) or {token id: {logprob, rank,
        decoded_token}} for the top k and the prompt's own token."""
        result: list[dict[str, Any] | None] = []
        for i, tid in enumerate(ids):
            entry = entries[i] if i < len(entries) else None
            result.append(None if entry is None else {
                str(t): {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": self.token_str(t)}
                for t, lp in top(entry, k, tid)})
        return result

    def chat_logprobs(self, c: CompletionOutput, start: int, end: int, k: int, as_ids: bool) -> list[dict[str, Any]]:
        def item(t: int, logprob: float) -> dict[str, Any]:
            s = self.token_str(t)  # with return_tokens_as_token_ids the bytes stay the token's own (as vLLM does)
            return {"token": f"token_id:{t}" if as_ids else s, "logprob": logprob, "bytes": self.token_bytes(t, s)}

        content = []
        for tid, entry in zip(c.token_ids[start:end], (c.logprobs or [])[start:end]):
            d = item(tid, entry[tid].logprob)
            d["top_logprobs"] = [item(t, lp.logprob) for t, lp in top(entry, k, None)]
            content.append(d)
        return content


class TextOffsets:
    """Where each token's text starts in a choice's text (completions' text_offset). The tokens are
    decoded as the engine's detokenizer decodes them, so a token holding part of a character starts
    where that character does, and a token's offset does not depend on how its string is shown
    (a vocabulary piece, "token_id:N"). Streamed, one per choice: the same offsets in chunks."""

    def __init__(self, tokenizer: Any, context_ids: list[int], skip_special_tokens: bool) -> None:
        self.det = (None if tokenizer is None else
                    IncrementalDetokenizer(tokenizer, context_ids, skip_special_tokens, []))
        self.offsets: list[int] = []
        self.end = 0  # where the text decoded so far ends

    def take(self, ids: list[int], start: int, end: int, text_len: int) -> list[int]:
        """The offsets of ids[start:end] (ids: every token of the choice so far), at most text_len:
        the text sent so far (a stop string cut, text held back)."""
        det = self.det
        for t in ids[len(self.offsets):end]:
            self.offsets.append(self.end)
            if det is not None:
                det.add_token(t, check_stop=False)
                self.end = len(det.text) + len(det.pending_text())
        return [min(o, text_len) for o in self.offsets[start:end]]
