"""The offline API: LLM(model).generate(prompts, sampling_params), as in vLLM."""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable, Iterator
from collections.abc import Sequence as Seq
from typing import Any

from tokenmill.config import EngineConfig
from tokenmill.engine.detokenizer import safe_stream_end, token_string
from tokenmill.engine.llm_engine import LLMEngine, batch_params, cache_salt, request_tags
from tokenmill.outputs import (
    BeamSearchOutput,
    BeamSearchSequence,
    ClassificationOutput,
    ClassificationRequestOutput,
    CompletionOutput,
    EmbeddingOutput,
    EmbeddingRequestOutput,
    RequestOutput,
    ScoringOutput,
    ScoringRequestOutput,
)
from tokenmill.sampling_params import MAX_LOGPROBS, BeamSearchParams, SamplingParams, pooling_params
from tokenmill.ttc import Launch, TTCParams, TTCRun, launch_params

PromptType = str | dict[str, Any] | list[int]
ScoreText = str | list[int]
_TASK_NAMES = {"generate": "a generative model", "embed": "an embedding model", "classify": "a classifier"}


# vLLM's LLM() settings that scripts pass and that have nothing to change here at these values (one local
# folder, one device, no swap: preemption recomputes); taken and dropped, any other value refused.
_VLLM_NO_OPS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "disable_log_stats": (lambda v: isinstance(v, bool), "a bool (LLM() logs no stats)"),
    "swap_space": (lambda v: isinstance(v, (int, float)) and v >= 0, "a size >= 0 (nothing is swapped)"),
    "max_seq_len_to_capture": (lambda v: isinstance(v, int), "an integer (CUDA graphs cover every decode)"),
    "disable_custom_all_reduce": (lambda v: isinstance(v, bool), "a bool (one device)"),
    "tokenizer_mode": (lambda v: v == "auto", "'auto'"),
    "kv_cache_dtype": (lambda v: v == "auto", "'auto' (the model's dtype)"),
    "enable_chunked_prefill": (lambda v: v in (None, True), "True (prefill is always chunked)"),
    "max_logprobs": (lambda v: isinstance(v, int) and 0 <= v <= MAX_LOGPROBS, f"0 to {MAX_LOGPROBS}"),
    "pipeline_parallel_size": (lambda v: v == 1, "1"),
    "data_parallel_size": (lambda v: v == 1, "1 (run replicas behind `tokenmill router`)"),
    "distributed_executor_backend": (lambda v: v in (None, "mp", "uni"), "None, 'mp' or 'uni' (one process)"),
    "cpu_offload_gb": (lambda v: v == 0, "0"),
    "skip_tokenizer_init": (lambda v: v is False, "False"),
    "revision": (lambda v: v is None, "None (a local folder)"),
    "tokenizer_revision": (lambda v: v is None, "None (a local folder)"),
    "download_dir": (lambda v: v is None, "None (nothing is downloaded)"),
    "hf_token": (lambda v: v is None, "None (nothing is downloaded)"),
    "hf_overrides": (lambda v: not v, "None or {}"),
}


def default_model_path() -> str:
    """The demo model shipped inside the package (see the demo-model issue)."""
    return os.path.join(os.path.dirname(__file__), "demo_model")


class LLM:
    """Loads a Hugging Face checkpoint folder and generates with continuous batching.

    Engine settings are keyword arguments: dtype, device, max_model_len, block_size,
    max_num_seqs, max_num_batched_tokens, kv_cache_memory_bytes, seed, ...
    (see EngineConfig).
    """

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        # vLLM's LLM() settings that code passes as it moves over
        if kwargs.pop("enforce_eager", False):
            kwargs["cuda_graphs"] = "off"
        kwargs.pop("trust_remote_code", None)  # (no model code is ever run from a folder here)
        if "seed" in kwargs and kwargs["seed"] is None:  # vLLM's former default: unseeded, a new seed each run
            kwargs["seed"] = int.from_bytes(os.urandom(4), "little")
        tp = kwargs.pop("tensor_parallel_size", 1)
        if tp != 1:
            raise ValueError(f"tensor_parallel_size: one device per engine here, got {tp}; run several "
                             f"replicas behind `tokenmill router` instead")
        for name, (ok, what) in _VLLM_NO_OPS.items():
            if name in kwargs and not ok(kwargs.pop(name)):
                raise ValueError(f"{name}: only {what} here (the value that changes nothing in vLLM's terms)")
        fields = set(EngineConfig.__dataclass_fields__) - {"model"}
        unknown = set(kwargs) - fields
        if unknown:
            raise TypeError(f"LLM() got unknown settings {sorted(unknown)}; known: {sorted(fields)}")
        self.config = EngineConfig(model=model or default_model_path(), **kwargs)
        self.engine = LLMEngine(self.config)
        self._latest: dict[str, RequestOutput] = {}  # newest unread output per request

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """What a call without sampling_params samples with, as vLLM's: the model's
        generation_config.json settings (EngineConfig.generation_config), else SamplingParams()."""
        d = self.engine.default_sampling
        return SamplingParams(**d, _defaulted=tuple(d.items()))

    def reset_prefix_cache(self) -> bool:
        """vLLM's: forgets every cached prefix (LLMEngine.reset_prefix_cache)."""
        self.engine.reset_prefix_cache()
        return True

    def beam_search(self, prompts: Seq[PromptType], params: BeamSearchParams, lora_request: None = None,
                    use_tqdm: bool = False, concurrency_limit: int | None = None) -> list[BeamSearchOutput]:
        """vLLM's LLM.beam_search over tokenmill's beam search (SamplingParams.use_beam_search):
        each output's `.sequences` are the beam_width best beams, best first, whose `tokens` and
        `text` hold the prompt and the output as vLLM's do. As vLLM's, the search runs to max_tokens
        ("never" stops early); finished beams are scored by their output length (transformers' rule).
        concurrency_limit: how many prompts search at once (all by default)."""
        _no_lora(lora_request)
        sp = SamplingParams(n=params.beam_width, use_beam_search=True, max_tokens=params.max_tokens,
                            ignore_eos=params.ignore_eos, length_penalty=params.length_penalty,
                            include_stop_str_in_output=params.include_stop_str_in_output, early_stopping="never",
                            logprobs=min(2 * params.beam_width, MAX_LOGPROBS))  # (vLLM's: each step's 2w candidates)
        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        step = concurrency_limit or len(prompts) or 1
        outs = [o for i in range(0, len(prompts), step) for o in self.generate(prompts[i:i + step], sp,
                                                                                 use_tqdm=use_tqdm)]
        tok, eos = self.engine.tokenizer, set(self.engine.eos_token_ids)

        def beam(prompt: list[int], c: CompletionOutput) -> BeamSearchSequence:
            out, stop = list(c.token_ids), c.stop_reason
            if c.finish_reason == "stop" and out and out[-1] in eos and not params.ignore_eos:
                stop = out[-1]  # (vLLM's: the EOS it stopped at, in the tokens only when asked for)
                if not params.include_stop_str_in_output:
                    out = out[:-1]
            ids = prompt + out
            return BeamSearchSequence(tokens=ids, logprobs=c.logprobs or [], cum_logprob=c.cumulative_logprob or 0.0,
                                      text=tok.decode(ids) if tok is not None else None,
                                      finish_reason=c.finish_reason, stop_reason=stop)

        return [BeamSearchOutput([beam(o.prompt_token_ids, c) for c in o.outputs]) for o in outs]

    def chat_prompt(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, *,
                    tools: list[dict[str, Any]] | None = None, continue_final_message: bool = False,
                    chat_template_kwargs: dict[str, Any] | None = None,
                    chat_template: str | None = None) -> dict[str, Any]:
        """One conversation rendered with the tokenizer's chat template, as a token-id prompt. The
        messages are read as vLLM's LLM.chat reads them (tools.loose_messages: OpenAI text parts,
        tool calls with JSON-string arguments, any role or extra key); ValueError naming the field."""
        from tokenmill.server.tools import loose_messages, render_chat

        tok = self.engine.tokenizer
        text = render_chat(tok, loose_messages(messages), add_generation_prompt, tools, continue_final_message,
                           chat_template_kwargs, chat_template=chat_template)
        return {"prompt": text, "prompt_token_ids": tok.encode(text, add_special_tokens=False)}

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
             use_tqdm: bool = False, lora_request: None = None, chat_template: str | None = None,
             chat_template_content_format: str = "auto", add_generation_prompt: bool = True,
             continue_final_message: bool = False, tools: list[dict[str, Any]] | None = None,
             chat_template_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        """Like generate, for one conversation or a list of them (chat template applied, or
        chat_template in its place; the arguments, in their order, as vLLM's LLM.chat takes them).
        Content is rendered as a string (text parts joined): chat_template_content_format "auto" or
        "string"."""
        _no_lora(lora_request)
        if chat_template_content_format not in ("auto", "string"):
            raise ValueError(f"chat_template_content_format: 'auto' or 'string' (text parts are joined into a "
                             f"string), got {chat_template_content_format!r}")
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.chat_prompt(c, add_generation_prompt, tools=tools,  # type: ignore[arg-type]
                                    continue_final_message=continue_final_message,
                                    chat_template_kwargs=chat_template_kwargs, chat_template=chat_template)
                   for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)  # type: ignore[arg-type]

    def stream(self, prompt: PromptType, sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Yields the text of one sample piece by piece as it is generated. Closing the iterator
        early aborts the request."""
        params = sampling_params or self.get_default_sampling_params()
        if params.n != 1:
            raise ValueError("n: stream() produces one sample; use n=1")
        if not params.detokenize:
            raise ValueError("detokenize: stream() yields text; set detokenize=True")
        engine = self.engine
        rid = engine.add_request(prompt, params)
        emitted, finished = 0, False
        try:
            while not finished:
                out = self._latest.pop(rid, None)
                if out is None:
                    self._step()
                    continue
                if out.error is not None:
                    raise RuntimeError(f"request {rid} failed in the engine: {out.error}")
                c = out.outputs[0]
                finished = out.finished
                end = safe_stream_end(c.text, params.stop or [], finished, emitted)
                if end > emitted:
                    yield c.text[emitted:end]
                    emitted = end
        finally:
            self._latest.pop(rid, None)
            if not finished:
                engine.abort_request(rid)

    def _step(self) -> list[RequestOutput]:
        """One engine step; each request's newest output is kept until its caller reads it, so
        interleaved stream() and generate() calls never lose each other's outputs."""
        if not self.engine.has_unfinished_requests():
            raise RuntimeError("the engine has no unfinished requests but outputs are missing")
        outs = self.engine.step()
        for out in outs:
            self._latest[out.request_id] = out
        return outs

    def embed(self, prompts: PromptType | Seq[PromptType], *, use_tqdm: bool = False,
              truncate_prompt_tokens: int | None = None, lora_request: None = None) -> list[EmbeddingRequestOutput]:
        """Embeddings of an embedding model (`task="embed"`): each output's `.outputs.embedding` (as
        vLLM's; also `.embedding`) is the L2-normalized final hidden state of its prompt's last token
        (of its last truncate_prompt_tokens tokens, -1: max_model_len of them, when given)."""
        outs = self._pool("embed", "; load it with task='embed' to embed", prompts, truncate_prompt_tokens, use_tqdm,
                          lora_request)
        return [EmbeddingRequestOutput(o.request_id, o.prompt_token_ids, EmbeddingOutput(o.embedding))  # type: ignore[arg-type]
                for o in outs]

    def classify(self, prompts: PromptType | Seq[PromptType], *, use_tqdm: bool = False,
                 truncate_prompt_tokens: int | None = None,
                 lora_request: None = None) -> list[ClassificationRequestOutput]:
        """A classifier's (`task="classify"`) label probabilities for each prompt, in `.outputs.probs`
        (as vLLM's; also `.probs`; `model_config.labels` names them): its head on the prompt's last
        token, then a sigmoid for one label, a softmax for several."""
        outs = self._pool("classify", ", not a classifier", prompts, truncate_prompt_tokens, use_tqdm, lora_request)
        return [ClassificationRequestOutput(o.request_id, o.prompt_token_ids, ClassificationOutput(o.probs))  # type: ignore[arg-type]
                for o in outs]

    def _pool(self, task: str, otherwise: str, prompts: PromptType | Seq[PromptType],
              truncate_prompt_tokens: int | None, use_tqdm: bool, lora_request: Any) -> list[RequestOutput]:
        """A pooling model's outputs for the prompts (embed, classify); a ValueError ending in
        `otherwise` when the engine runs another task."""
        _no_lora(lora_request)
        if self.engine.task != task:
            raise ValueError(f"task: {self.engine.config.model} runs as {_TASK_NAMES[self.engine.task]}{otherwise}")
        return self._run(prompts, pooling_params(truncate_prompt_tokens), None, use_tqdm)

    def score(self, data_1: ScoreText | Seq[ScoreText], data_2: ScoreText | Seq[ScoreText], *,
              use_tqdm: bool = False, truncate_prompt_tokens: int | None = None,
              lora_request: None = None) -> list[ScoringRequestOutput]:
        """vLLM's LLM.score: one text against each of several, or pairs in order; each output's
        `.outputs.score` is the pair's relevance: the cosine similarity of an embedding model's
        embeddings, or a one-label classifier's (a reranker's) probability for the pair read as one
        prompt (tokenmill.scoring)."""
        from tokenmill.scoring import check_scorer, cosine, pair_ids, pair_indices

        _no_lora(lora_request)
        eng = self.engine
        check_scorer(eng.task, len(eng.model_config.labels), eng.config.model)
        pooling_params(truncate_prompt_tokens).validate()
        one = [data_1] if _score_text(data_1) else list(data_1)  # type: ignore[arg-type]
        two = [data_2] if _score_text(data_2) else list(data_2)  # type: ignore[arg-type]
        pairs = pair_indices(len(one), len(two), ("data_1", "data_2"))
        if eng.task == "embed":
            vecs = [o.embedding for o in self.embed([_prompt(x) for x in one + two], use_tqdm=use_tqdm,
                                                    truncate_prompt_tokens=truncate_prompt_tokens)]
            outs = [(vecs[i], vecs[len(one) + j]) for i, j in pairs]
            return [ScoringRequestOutput(str(k), [], ScoringOutput(cosine(u, v))) for k, (u, v) in enumerate(outs)]
        k = truncate_prompt_tokens
        limit = eng.max_model_len if k == -1 else k
        prompts = [{"prompt_token_ids": pair_ids(eng.tokenizer, one[i], two[j], limit)} for i, j in pairs]
        return [ScoringRequestOutput(o.request_id, o.prompt_token_ids, ScoringOutput(o.probs[0]))
                for o in self.classify(prompts, use_tqdm=use_tqdm)]  # type: ignore[arg-type]

    def generate(
        self,
        prompts: PromptType | Seq[PromptType],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        *,
        priority: Seq[int] | None = None,
        use_tqdm: bool = False,
        lora_request: None = None,
        test_time_compute: TTCParams | dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Generates for every prompt in one continuous batch; outputs come back in prompt order.

        Every request is validated before any is queued, so a bad one raises ValueError and
        leaves the engine as it was.

        With test_time_compute (tokenmill.ttc.TTCParams or its dict), each prompt runs many
        reasoning paths and its output holds the winning path alone (index 0), with the run's
        account in `.test_time_compute`.
        """
        _no_lora(lora_request)
        if self.engine.task != "generate":
            raise ValueError(f"task: {self.engine.config.model} runs as {_TASK_NAMES[self.engine.task]}; use "
                             f"{'embed' if self.engine.task == 'embed' else 'classify or score'}()")
        if test_time_compute is not None:
            return self._run_ttc(prompts, sampling_params, test_time_compute, priority)
        return self._run(prompts, sampling_params, priority, use_tqdm)

    def _run_ttc(self, prompts: PromptType | Seq[PromptType],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None,
                 ttc: TTCParams | dict[str, Any], priority: Seq[int] | None) -> list[RequestOutput]:
        """Every prompt's paths in one continuous batch, each prompt's strategy steering its own."""
        engine = self.engine
        prepared = self._prepare(prompts, sampling_params, priority)
        prios = [prio for _, _, prio in prepared]
        runs: list[tuple[TTCRun, dict[str, Any], SamplingParams]] = []
        for prompt, sp, _ in prepared:
            tp = ttc if isinstance(ttc, TTCParams) else TTCParams.from_dict(ttc)
            if not sp.detokenize:
                raise ValueError("detokenize: test_time_compute reads the paths' answers from their text; set "
                                 "detokenize=True")
            for name, bad in (("n", sp.n != 1), ("logprobs", sp.logprobs is not None),
                              ("prompt_logprobs", sp.prompt_logprobs is not None)):
                if bad:  # (as the server's 400: they were dropped from the output without a word)
                    raise ValueError(f"{name}: cannot be combined with test_time_compute (its paths are set by "
                                     f"test_time_compute.n, and one answer comes back)")
            token_ids = prompt["prompt_token_ids"]
            runs.append((TTCRun(tp, prompt["prompt"] or "", len(token_ids), sp.max_tokens, engine.max_model_len),
                         prompt, sp))
        where: dict[tuple[str, int], tuple[int, int]] = {}  # (engine request, sample) -> (run, path)
        path_at: dict[tuple[int, int], tuple[str, int]] = {}  # the other way
        live: dict[str, int] = {}  # engine request -> its run
        first_rid: dict[int, str] = {}  # run -> its first launch's request (whose prompt the cache may hold)
        cached = [0] * len(runs)  # each run's prefix-cache hit, as the server reports it

        def add(r: int, launch: Launch) -> None:
            run, prompt, sp = runs[r]
            rid = engine.add_request(prompt, launch_params(sp, run, launch), priority=prios[r])
            live[rid] = r
            first_rid.setdefault(r, rid)
            for i, pid in enumerate(launch.path_ids):
                where[(rid, i)] = (r, pid)
                path_at[(r, pid)] = (rid, i)

        # Every prompt's first launch is checked before any is queued: a beam search whose beams the
        # cache cannot hold fails here, not after the prompts before it have started.
        first = [run.launch() for run, _, _ in runs]
        for (run, prompt, sp), launch in zip(runs, first):
            if launch is not None:
                engine.check_request(prompt["prompt_token_ids"], launch_params(sp, run, launch))
        try:
            for r, launch in enumerate(first):
                if launch is not None:
                    add(r, launch)
            while True:
                for r, (run, _, _) in enumerate(runs):
                    while (launch := run.launch()) is not None:
                        add(r, launch)
                if all(run.done for run, _, _ in runs):
                    break
                self._step()
                for rid in list(live):
                    out = self._latest.pop(rid, None)
                    if out is None:
                        continue
                    if out.error is not None:
                        raise RuntimeError(f"request {rid} failed in the engine: {out.error}")
                    if first_rid.get(live[rid]) == rid:
                        cached[live[rid]] = max(cached[live[rid]], out.num_cached_tokens)
                    self._observe(runs, out, where)
                    if out.finished:
                        del live[rid]
                for r, (run, _, _) in enumerate(runs):
                    for pid in run.stops():  # pruned paths, or all of them once the vote is settled
                        rid, i = path_at[(r, pid)]
                        out = engine.abort_seq(rid, i) if rid in live else None
                        if out is not None:
                            self._observe(runs, out, where)
                            del live[rid]
        except BaseException:
            for rid in live:
                engine.abort_request(rid)
                self._latest.pop(rid, None)
            raise
        return [self._ttc_output(run, prompt, hit) for (run, prompt, _), hit in zip(runs, cached)]

    def _prepare(self, prompts: PromptType | Seq[PromptType],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None,
                 priority: Seq[int] | None) -> list[tuple[dict[str, Any], SamplingParams, int]]:
        """(tokenized prompt, params, priority) for every prompt, all checked before any is queued."""
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, list) and prompts and all(isinstance(t, numbers.Integral) for t in prompts)
        ):
            prompts = [prompts]
        prompts = list(prompts)
        params = batch_params(self.get_default_sampling_params() if sampling_params is None else sampling_params,
                              len(prompts))
        prios = list(priority) if priority is not None else [0] * len(prompts)
        if len(prios) != len(prompts):
            raise ValueError(f"priority: {len(prios)} given for {len(prompts)} prompts")
        out = []
        for p, sp, prio in zip(prompts, params, prios):
            text, token_ids = self.engine.tokenize(p)
            token_ids, text = self.engine.truncate_prompt(token_ids, sp, text)
            self.engine.check_request(token_ids, sp)
            salt = cache_salt(p)
            tenant, slo = request_tags(p)
            tags = {k: v for k, v in (("cache_salt", salt), ("tenant", tenant), ("slo", slo)) if v is not None}
            out.append(({"prompt": text, "prompt_token_ids": token_ids, **tags}, sp, prio))
        return out

    def _run(self, prompts: PromptType | Seq[PromptType],
             sampling_params: SamplingParams | Seq[SamplingParams] | None, priority: Seq[int] | None,
             use_tqdm: bool) -> list[RequestOutput]:
        engine = self.engine
        prepared = self._prepare(prompts, sampling_params, priority)
        ids = []
        try:
            for p, sp, prio in prepared:
                ids.append(engine.add_request(p, sp, priority=prio, final_only=True))
            done: dict[str, RequestOutput] = {}
            pending = set(ids)
            bar = _progress(len(ids)) if use_tqdm else None
            while pending:
                for out in self._step():
                    rid = out.request_id
                    if rid not in pending:
                        continue
                    if out.error is not None:
                        raise RuntimeError(f"request {rid} failed in the engine: {out.error}")
                    if out.finished:
                        done[rid] = self._latest.pop(rid)
                        pending.discard(rid)
                        if bar is not None:
                            bar.update(1)
            if bar is not None:
                bar.close()
        except BaseException:
            for rid in ids:
                engine.abort_request(rid)
                self._latest.pop(rid, None)
            raise
        outs = [done[r] for r in ids]
        if engine.tokenizer is not None:
            _name_logprobs(engine.tokenizer, outs)
        return outs


    @staticmethod
    def _observe(runs: list[Any], out: RequestOutput, where: dict[tuple[str, int], tuple[int, int]]) -> None:
        """Feeds an engine output's samples to their runs."""
        for c in out.outputs:
            r, pid = where[(out.request_id, c.index)]
            runs[r][0].observe_output(pid, c)

    def _ttc_output(self, run: TTCRun, prompt: dict[str, Any], cached_tokens: int) -> RequestOutput:
        """The winning path as the request's one output, with the run's account."""
        win = run.winner()
        account = run.result()
        text = win.text if win is not None else ""
        return RequestOutput(
            request_id=f"ttc-{id(run)}", prompt=prompt["prompt"], prompt_token_ids=prompt["prompt_token_ids"],
            prompt_logprobs=None, finished=True, test_time_compute=account, num_cached_tokens=cached_tokens,
            outputs=[CompletionOutput(index=0, text=text, token_ids=list(win.token_ids) if win is not None else [],
                                      cumulative_logprob=sum(win.logprobs) if win is not None else None,
                                      logprobs=None, finish_reason=win.finish_reason if win is not None else "length")])


def _name_logprobs(tokenizer: Any, outs: list[RequestOutput]) -> None:
    """Fills each Logprob's decoded_token, as vLLM's LLM does (the server writes its own strings,
    so the engine does not spend a decode per entry on them)."""
    names: dict[int, str] = {}
    for out in outs:
        for entries in [out.prompt_logprobs or [], *(c.logprobs or [] for c in out.outputs)]:
            for pos in entries:
                for t, lp in (pos or {}).items():
                    if t not in names:
                        names[t] = token_string(tokenizer, t)
                    lp.decoded_token = names[t]


def _no_lora(lora_request: Any) -> None:
    """vLLM's lora_request: None (what code passes without adapters) is taken; there are no adapters."""
    if lora_request is not None and not (isinstance(lora_request, (list, tuple))
                                         and all(r is None for r in lora_request)):
        raise ValueError("lora_request: LoRA adapters are not supported; merge the adapter into the weights")


def _progress(total: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="generate", unit="req")


def _score_text(x: Any) -> bool:
    """One text to score (a string, or one list of token ids), not a list of them."""
    return isinstance(x, str) or (isinstance(x, list) and bool(x) and all(isinstance(t, numbers.Integral) for t in x))


def _prompt(x: ScoreText) -> PromptType:
    return x if isinstance(x, str) else {"prompt_token_ids": list(x)}
