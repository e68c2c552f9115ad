"""LLMEngine: requests in, a step at a time, RequestOutputs out.

add_request validates and queues; step() asks the scheduler what to run, has the model
runner run it, then appends sampled tokens, detokenizes, applies stop conditions and
frees finished sequences. abort_request works at any moment between steps.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import numbers
import os
import time
from collections import Counter
from collections.abc import Callable
from collections.abc import Sequence as Seq
from typing import Any

import numpy as np
import torch

from tokenmill.attention import get_attention_backend
from tokenmill.config import POOLING_TASKS, EngineConfig, ModelConfig, parse_dtype
from tokenmill.engine import kv_transfer
from tokenmill.engine.beam import BeamSearch
from tokenmill.engine.block_manager import BlockManager
from tokenmill.engine.detokenizer import FinalDetokenizer, IncrementalDetokenizer
from tokenmill.engine.model_runner import Launch, ModelRunner, StepResult
from tokenmill.engine.scheduler import Scheduler, SchedulerOutput
from tokenmill.engine.sequence import Request, SeqStatus, Sequence
from tokenmill.engine.slo import SLOAdmissionError, SLOTarget, StepTimeModel, step_features
from tokenmill.engine.spec_decode import NgramProposer, SpecStats, max_drafts
from tokenmill.ops.energy import EnergyAccounting, Prices, open_meter
from tokenmill.outputs import CompletionOutput, RequestOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.structured import GrammarCompiler, GrammarError

logger = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# A prefill's KV hold is kept from requests that would reclaim its blocks this long (the router takes
# it within milliseconds of the prefill's answer; later, a hold nobody took gives way like any other).
EXPORT_GRACE_S = 2.0


def load_tokenizer(path: str, chat_template: str | None = None) -> Any | None:
    """The folder's Hugging Face tokenizer, or None when it ships none (token-id prompts only);
    chat_template (EngineConfig's, already read) replaces the folder's."""
    if not any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise ValueError(f"tokenizer: cannot load the tokenizer in {path}: {e}") from e
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


def _generation_eos(path: str) -> tuple[int, ...]:
    import json

    gen = os.path.join(path, "generation_config.json")
    if not os.path.isfile(gen):
        return ()
    try:
        with open(gen) as f:
            v = json.load(f).get("eos_token_id")
    except (OSError, ValueError):
        return ()
    if v is None:
        return ()
    return (v,) if isinstance(v, int) else tuple(v)


# generation_config.json's sampling settings and their SamplingParams names (vLLM reads the same).
_GENERATION_DEFAULTS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                        "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def generation_defaults(config: EngineConfig) -> dict[str, Any]:
    """The sampling settings a request that leaves them out gets (EngineConfig.generation_config):
    the generation_config.json's, as SamplingParams fields; ValueError for one SamplingParams refuses."""
    import json

    if config.generation_config == "vllm":
        return {}
    folder = config.model if config.generation_config == "auto" else config.generation_config
    path = os.path.join(folder, "generation_config.json")
    try:
        with open(path) as f:
            raw = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ValueError(f"generation_config: cannot read {path}: {e}") from None
    out = {ours: raw[theirs] for theirs, ours in _GENERATION_DEFAULTS.items()
           if isinstance(raw, dict) and raw.get(theirs) is not None}
    try:
        SamplingParams(**out).validate()
    except ValueError as e:
        raise ValueError(f"generation_config: {path}: {e} (generation_config 'vllm' ignores the file)") from None
    return out


def check_length(n_prompt: int, params: SamplingParams, max_model_len: int) -> None:
    """A prompt of n_prompt tokens and its max_tokens against a context length (check_request's;
    a cascade tier checks its strong model's too, before the small one runs)."""
    if params._prompt_only:
        if n_prompt > max_model_len:
            raise ValueError(f"prompt: {n_prompt} tokens exceed max_model_len={max_model_len}")
        return
    if n_prompt >= max_model_len:
        raise ValueError(f"prompt: {n_prompt} tokens leave no room in max_model_len={max_model_len}")
    if (params.max_tokens is not None and not params.max_tokens_is_cap  # (a cap: add_request takes the room)
            and n_prompt + params.max_tokens > max_model_len):
        raise ValueError(f"max_tokens: prompt ({n_prompt} tokens) plus max_tokens ({params.max_tokens}) "
                         f"exceeds the context length max_model_len={max_model_len}")


@dataclasses.dataclass
class EngineSetup:
    """What an engine's config and folders settle before any weights load (check_config)."""

    model_config: ModelConfig  # as the engine runs it (a classifier_from_token head, no LM head for pooling)
    max_model_len: int
    task: str
    default_sampling: dict[str, Any]
    tokenizer: Any  # None when not loaded (load_tokenizer_now False), or when the folder ships none


def check_config(config: EngineConfig, device: torch.device | None, load_tokenizer_now: bool = True) -> EngineSetup:
    """Every check LLMEngine makes before it loads weights, and what they read; a ValueError naming
    the setting at fault. A model pool runs it at startup for the models it does not load then.
    device: where the engine runs; None where that is not known (a Ray driver, whose nodes have the
    devices): what depends on it is left to the engine. load_tokenizer_now False: the tokenizer
    folder is only looked at, unless classifier_from_token needs its vocabulary."""
    config.validate()
    if config.dtype != "auto":
        parse_dtype(config.dtype)
    mc = ModelConfig.from_pretrained(config.model)
    mc.check_max_model_len(config.max_model_len or 0, config.allow_long_max_model_len)
    if config.tokenizer is not None and not any(
            os.path.isfile(os.path.join(config.tokenizer, f)) for f in _TOKENIZER_FILES):
        # (without this the engine ran with no tokenizer and refused every text prompt)
        raise ValueError(f"tokenizer: {config.tokenizer} holds no tokenizer (looked for "
                         f"{', '.join(_TOKENIZER_FILES)})")
    tokens = None if config.classifier_from_token is None else list(config.classifier_from_token)
    tokenizer = (load_tokenizer(config.tokenizer or config.model, config.chat_template)
                 if load_tokenizer_now or tokens is not None else None)
    default_sampling = generation_defaults(config)
    task = resolve_task(config.task, mc, config.classifier_from_token)
    pooling = task in POOLING_TASKS
    if tokens is not None:  # (the loader makes its head of the LM head's rows)
        ids = _classifier_token_ids(tokenizer, tokens, mc.vocab_size)
        # (two tokens make one label: the second's probability against the first)
        mc = dataclasses.replace(mc, has_lm_head=False, labels=tuple(tokens[1:] if len(tokens) == 2 else tokens),
                                 label_token_ids=tuple(ids), problem_type=None)
    elif pooling:  # no LM head is loaded or needed, whatever the checkpoint holds
        mc = dataclasses.replace(mc, has_lm_head=False)
    if task == "embed":  # (a classifier's head goes unused)
        mc = dataclasses.replace(mc, labels=())
    if pooling and config.speculative_config is not None:
        raise ValueError(f"speculative_config: {_POOLING_NAMES[task]} generates nothing to speculate on")
    if config.attention_backend != "auto":
        get_attention_backend(config.attention_backend)  # (a name it knows, on any device)
    if device is not None:  # (ModelRunner resolves them again: this only refuses what would fail there)
        config.resolve_cuda_graphs(device, config.resolve_attention_backend(device))
        config.resolve_async_scheduling(device, task)
    return EngineSetup(mc, config.max_model_len or mc.max_context, task, default_sampling, tokenizer)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.device = config.resolve_device()
        setup = check_config(config, self.device)
        self.config = config
        self.model_config = mc = setup.model_config
        self.dtype = config.resolve_dtype(mc, self.device)
        self.max_model_len = setup.max_model_len
        torch.manual_seed(config.seed)
        self.tokenizer = setup.tokenizer
        eos = set(mc.eos_token_ids) | set(_generation_eos(config.model))
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = tuple(sorted(eos))
        self.default_sampling = setup.default_sampling
        if self.default_sampling:
            logger.info("default sampling settings from generation_config.json (for requests that leave them "
                        "out; --generation-config vllm turns this off): %s", self.default_sampling)
        self.task = setup.task
        self.pooling = self.task in POOLING_TASKS  # (prompts are pooled into one vector each, never continued)
        # Its own tokenizer instance, loaded on first use: the server compiles on worker threads.
        self.grammars = GrammarCompiler(lambda: load_tokenizer(config.tokenizer or config.model), mc.vocab_size,
                                        self.eos_token_ids)
        self.runner = ModelRunner(mc, config, self.device, self.dtype, self.max_model_len)
        self.runner.embed = self.pooling
        if self.pooling:  # (prompts only: no decode step ever runs, so no graphs to capture and hold memory for)
            self.runner.graph_mode, self.runner.spare_blocks = "off", 0
        num_blocks = self.runner.allocate_kv_cache()
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.spec_stats = SpecStats()
        self._ngram = None
        spec = config.speculative_config
        if spec is not None and spec.method == "ngram":
            self._ngram = NgramProposer(spec)
        self.step_model = StepTimeModel()
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   propose=self._propose if spec is not None else None,
                                   policy=config.scheduling_policy, step_model=self.step_model)
        self.scheduler.draft_kv = spec is not None and spec.method == "draft_model"
        self.scheduler.max_model_len = self.max_model_len
        # Async scheduling (_step_async): the step in flight, outputs kept for the next step() (made
        # by park's drain), and the unfinished requests that need steps one at a time.
        self.async_scheduling = config.resolve_async_scheduling(self.device, self.task)
        self._inflight: Launch | None = None
        # Other engines step on this device between this one's steps (a model pool, set by its
        # DeviceLoop): a step left in flight would have their work inside its energy interval, so
        # with async scheduling each step is processed before the next engine's.
        self.shares_device = False
        self._ready: list[RequestOutput] = []
        self._sync_requests: list[Request] = []
        self._waited, self._stepped = 0.0, None  # (one step() call's wait for the device, and its step's time)
        # Called after every step that ran, with (sched, step_features: [chunks, 3], seconds): energy accounting.
        self.on_step: Callable[[SchedulerOutput, np.ndarray, float], None] | None = None
        # Energy, device time, FLOPs and cost of each request (tokenmill/ops/energy.py): it reads its meter
        # right before the model step (before_step) and after it (on_step).
        meter = open_meter(config.energy_source, str(self.device), config.power_idle_watts, config.power_watts)
        self.energy = EnergyAccounting(mc, meter, Prices(config.price_per_device_hour, config.price_per_kwh,
                                                         config.pue), self.step_model.row_costs, self.pooling)
        self.before_step: Callable[[], None] | None = self.energy.before_step
        self.on_step = self.energy.on_step
        self.requests: dict[str, Request] = {}
        # KV held for a decode worker (request id -> (a sequence holding the blocks, monotonic deadline))
        self.kv_holds: dict[str, tuple[Sequence, float]] = {}
        self.kv_holds_reclaimed = 0  # holds let go early for blocks a running or waiting request needed
        self.kv_holds_capped = 0  # holds let go for newer ones beyond half the cache
        self.kv_holds_expired = 0  # holds nobody took within their seconds
        self._export_holds: dict[str, float] = {}  # a prefill's hold -> when it may give way (monotonic)
        self._held_blocks: Counter[int] = Counter()  # block -> holds that pin it (the cap counts blocks)
        self.block_manager.reclaimable = self._reclaimable_holds
        self.block_manager.reclaim = self._reclaim_hold
        self._kv_fingerprint: str | None = None
        self._seq_by_id: dict[int, Sequence] = {}
        self._next_id = 0
        tok = self.tokenizer
        # A reasoning budget's markers, as this tokenizer writes them (one token in thinking models).
        self.think_ids = ((tuple(tok.encode(THINK_START, add_special_tokens=False)),
                           tuple(tok.encode(THINK_END, add_special_tokens=False))) if tok is not None else None)
        if config.scheduling_policy == "slo" and config.calibrate_step_model and not self.pooling:
            self.calibrate()

    def calibrate(self, budget_s: float = 5.0) -> dict[str, float]:
        """Measures the step-time model (the slo policy's prior) with synthetic requests: prefills
        of a few lengths and decode batches of a few sizes, run through the real step. Their cache
        entries and counters are forgotten afterwards. Returns the fitted coefficients."""
        import random

        rng = random.Random(0)
        vocab = self.model_config.vocab_size
        mnbt, seqs = self.config.max_num_batched_tokens, self.config.max_num_seqs
        room = self.max_model_len
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        short = min(16, room - params.max_tokens)
        if short < 1:
            return self.step_model.to_dict()  # no room for a synthetic request: learn from real steps
        plans = [(short, 1)]  # a warm-up, then the measured runs
        plans += [(n, 1) for n in (64, 256, 1024) if n <= min(mnbt, room - params.max_tokens)]
        plans += [(short, b) for b in (4, 16, 64) if b <= seqs]
        if not self.runner._warm:  # graphs and kernels first: on a GPU, seconds the budget is not for
            self.runner.warm_up()
        deadline = time.perf_counter() + budget_s
        for i, (length, batch) in enumerate(plans * 2):
            if i == 1:
                self.step_model.set_prior(tuple(self.step_model.prior))  # forget the warm-up's slow steps
            ids = [f"__calibrate-{i}-{b}" for b in range(batch)]
            for rid in ids:
                self.add_request({"prompt_token_ids": [rng.randrange(vocab) for _ in range(length)],
                                  "cache_salt": "__calibrate"}, params, request_id=rid)
            while any(rid in self.requests for rid in ids):
                self.step()
            self.drain()  # (a step in flight holds only their last rows)
            if time.perf_counter() > deadline:
                break
        self.step_model.set_prior(tuple(self.step_model.fit()))
        self.reset_prefix_cache()
        bm, sched = self.block_manager, self.scheduler
        bm.num_query_tokens = bm.num_hit_tokens = 0
        sched.num_preemptions = sched.num_prompt_tokens_computed = 0
        self.spec_stats = SpecStats()
        self.energy.reset()  # the synthetic steps are nobody's work
        logger.info("step-time model: %s", self.step_model.to_dict())
        return self.step_model.to_dict()

    # -- requests -----------------------------------------------------------------------
    def tokenize(self, prompt: str | dict | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" not in prompt:  # vLLM's TextPrompt: {"prompt": "...", ...}
                if not isinstance(prompt.get("prompt"), str):
                    raise ValueError("prompt: a dict prompt needs 'prompt_token_ids' or a 'prompt' string")
                return self.tokenize(prompt["prompt"])
            return prompt.get("prompt"), [_token_id(t) for t in prompt["prompt_token_ids"]]
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt: this model folder has no tokenizer; pass {'prompt_token_ids': [...]}")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, numbers.Integral) for t in prompt):
            return None, [_token_id(t) for t in prompt]
        raise ValueError(f"prompt: expected a string or {{'prompt_token_ids': [...]}}, got {type(prompt).__name__}")

    def truncate_prompt(self, token_ids: list[int], params: SamplingParams,
                        text: str | None = None) -> tuple[list[int], str | None]:
        """The prompt's last truncate_prompt_tokens tokens (-1: max_model_len of them), and its text
        decoded from them when it was cut (None without a tokenizer)."""
        k = params.truncate_prompt_tokens
        if k is None or not isinstance(k, int) or isinstance(k, bool) or (k < 1 and k != -1):
            return token_ids, text  # (validate() refuses a bad one)
        k = self.max_model_len if k == -1 else k
        if len(token_ids) <= k:
            return token_ids, text
        token_ids = token_ids[-k:]
        return token_ids, (self.tokenizer.decode(token_ids) if self.tokenizer is not None else None)

    def check_request(self, token_ids: list[int], params: SamplingParams) -> None:
        """Raises ValueError naming the parameter at fault; changes nothing."""
        params.validate(self.model_config.vocab_size)
        if not token_ids:
            raise ValueError("prompt: the prompt is empty (0 tokens)")
        vocab = self.model_config.vocab_size
        bad = [t for t in token_ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt_token_ids: {bad[:5]} are not token ids in the vocabulary [0, {vocab})")
        n_prompt = len(token_ids)
        check_length(n_prompt, params, self.max_model_len)
        if params._prompt_only:
            return
        if params.allowed_token_ids and params.min_tokens > 0:
            stops = {*params.stop_token_ids, *(() if params.ignore_eos else self.eos_token_ids)}
            if set(params.allowed_token_ids) <= stops:
                raise ValueError("allowed_token_ids: only end-of-sequence or stop tokens, which min_tokens forbids")
        if params.use_beam_search and params.n > 1:  # (one beam is greedy decoding: see add_request)
            self._check_beam_search(params, n_prompt)
        if params.bad_words:
            self._bad_words_ids(params.bad_words)

    def _bad_words_ids(self, words: list[str]) -> tuple[tuple[int, ...], ...]:
        if self.tokenizer is None:
            raise ValueError("bad_words: this model has no tokenizer to read them with")
        ids = bad_words_token_ids(self.tokenizer, words)
        vocab = self.model_config.vocab_size
        if any(t >= vocab for w in ids for t in w):
            raise ValueError(f"bad_words: a word's tokens are outside the model's vocabulary [0, {vocab})")
        return ids

    def add_request(self, prompt: str | dict | list[int], params: SamplingParams, request_id: str | None = None,
                    priority: int = 0, arrival_time: float | None = None, final_only: bool = False) -> str:
        """Queues a request; its id. `step()` returns an output for it after every step that changed
        it, or with final_only only once it has finished (vLLM's RequestOutputKind.FINAL_ONLY: what
        offline generation wants, sparing a snapshot per request per step)."""
        if not isinstance(priority, int):
            raise ValueError(f"priority: must be an integer, got {priority!r}")
        text, token_ids = self.tokenize(prompt)
        token_ids, text = self.truncate_prompt(token_ids, params, text)
        if isinstance(params.allowed_token_ids, list):  # (the caller's list may change once this returns)
            params = _copy_params(params)
            params.allowed_token_ids = list(params.allowed_token_ids)
        if (params.max_tokens_is_cap and params.max_tokens is not None
                and len(token_ids) + params.max_tokens > self.max_model_len):  # a cap: the room there is
            params = _copy_params(params)
            params.max_tokens = max(1, self.max_model_len - len(token_ids))
        if (params.use_beam_search and params.repetition_penalty != 1.0
                and params.is_model_default("repetition_penalty")):
            params = _copy_params(params)  # (see SamplingParams._validate_beam_search)
            params.repetition_penalty = 1.0
        self.check_request(token_ids, params)
        salt = cache_salt(prompt)
        tenant, slo = request_tags(prompt)
        if request_id is None:
            request_id = str(self._next_id)
            self._next_id += 1
        if request_id in self.requests:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        if params.max_reasoning_tokens is not None and self.think_ids is None:
            raise ValueError("max_reasoning_tokens: needs the model's tokenizer (to find <think> sections)")
        grammar = None
        if params.structured_outputs is not None:
            if self.pooling:
                raise ValueError(f"structured_outputs: {_POOLING_NAMES[self.task]} generates no text")
            so = params.structured_outputs
            grammar = so._compiled or self.grammars.compile(so)  # the server compiles off this thread
        params = _copy_params(params)
        params._eos_token_ids = self.eos_token_ids
        if params.bad_words:
            params._bad_words_token_ids = self._bad_words_ids(params.bad_words)
        if params.use_beam_search and params.n == 1:  # one beam is greedy decoding, as in transformers
            params.use_beam_search, params.temperature = False, 0.0
        admitted = isinstance(prompt, dict) and bool(prompt.get("slo_admitted"))
        uncounted = isinstance(prompt, dict) and bool(prompt.get("uncounted"))
        hold = prompt.get("kv_hold") if isinstance(prompt, dict) else None
        if hold is not None:
            if not self.config.enable_prefix_caching or self.pooling:
                raise ValueError("kv_transfer_params: KV transfer needs prefix caching and a generative model")
            tid, secs = hold
            if not isinstance(tid, str) or not isinstance(secs, (int, float)) or not 0 < secs <= 3600:
                raise ValueError(f"kv_hold: a (transfer id, seconds in (0, 3600]) pair, got {hold!r}")
        release = prompt.get("kv_release") if isinstance(prompt, dict) else None
        req = Request(request_id, text, token_ids, params, arrival_time or time.time(), priority, cache_salt=salt,
                      tenant=tenant, slo=slo, final_only=final_only, slo_admitted=admitted, uncounted=uncounted,
                      kv_hold=hold, kv_release=release if isinstance(release, str) else None)
        if params.use_beam_search:
            req.beam = self._beam_search(params, len(token_ids))
        self.requests[request_id] = req
        # The section is open when the prompt ends with <think> (a thinking model's generation prompt).
        thinking = None
        if params.max_reasoning_tokens is not None and self.tokenizer is not None:
            tail = self.tokenizer.decode(token_ids[-32:], skip_special_tokens=False)
            thinking = tail.rstrip().endswith(THINK_START)
        for seq in req.seqs:
            if thinking is not None:
                seq.thinking = thinking or None  # the prompt ends inside a <think> section, or not yet
                self._budget(seq)
            if grammar is not None:
                seq.matcher = grammar.matcher()
            if self.tokenizer is not None and req.beam is None and params.detokenize:  # (beams: once one wins)
                # Nobody reads a final-only request's text before it ends, unless stop strings or a
                # reasoning budget must watch it: then it is decoded once, at the end.
                once = final_only and not params.stop and params.max_reasoning_tokens is None
                seq.detokenizer = (FinalDetokenizer if once else IncrementalDetokenizer)(
                    self.tokenizer, token_ids, params.skip_special_tokens, params.stop,
                    params.include_stop_str_in_output)
            self._seq_by_id[seq.seq_id] = seq
        self._admit_slo(req)
        self.scheduler.add_request(req.seqs)
        if req.beam is not None and self.async_scheduling:  # its beams are re-seated between steps
            self._sync_requests.append(req)
        resume = prompt.get("resume_token_ids") if isinstance(prompt, dict) else None
        if resume:
            try:
                self._resume(req, list(resume))
            except Exception:
                self.abort_request(request_id)
                raise
        return request_id

    def _admit_slo(self, req: Request) -> None:
        """slo policy: a request whose TTFT target the queued work makes unreachable is refused
        (SLOAdmissionError) or runs as best effort (req.slo_demoted), as slo_admission says."""
        if (self.scheduler.policy != "slo" or req.slo is None or self.config.slo_admission == "off"
                or req.slo_admitted):
            return
        predicted = self.scheduler.admission_check(req.seqs[0])
        if predicted is None or req.slo.ttft_s is None:
            return
        budget = req.slo.ttft_s - (time.time() - req.arrival_time)
        if predicted <= budget:
            return
        reason = (f"slo: the predicted time to first token, {predicted * 1000:.4g} ms, exceeds the target of "
                  f"{req.slo.ttft_s * 1000:.4g} ms (work queued ahead and this prompt's prefill)")
        if self.config.slo_admission == "reject":
            self.requests.pop(req.request_id, None)
            for seq in req.seqs:
                self._seq_by_id.pop(seq.seq_id, None)
            raise SLOAdmissionError(reason)
        logger.info("request %s demoted to best effort: %s", req.request_id, reason)
        req.slo_demoted, req.slo = req.slo, None

    def _resume(self, req: Request, tokens: list[int]) -> None:
        """Continues a generation another engine began (a fleet router's failover): the tokens it
        produced become this sequence's first outputs, passed through every per-token check the
        step makes (stop conditions, the grammar, the reasoning budget), and a seeded request's
        generator skips the draws they took, so the rest is what the first engine would have made.
        The prompt and these tokens are prefilled together on the first step."""
        p = req.params
        if p.n != 1 or req.beam is not None or p._prompt_only or self.pooling:
            raise ValueError("resume_token_ids: only for one generated sequence (n=1, no beam search)")
        vocab = self.model_config.vocab_size
        bad = [t for t in tokens if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"resume_token_ids: {bad[:5]} outside the vocabulary [0, {vocab})")
        seq = req.seqs[0]
        if seq.num_tokens + len(tokens) >= self.max_model_len or (p.max_tokens is not None
                                                                   and len(tokens) >= p.max_tokens):
            raise ValueError(f"resume_token_ids: {len(tokens)} tokens leave nothing to generate "
                             f"(max_tokens={p.max_tokens}, max_model_len={self.max_model_len})")
        for i, token in enumerate(tokens):
            seq.token_ids.append(token)
            if seq.matcher is not None and not seq.matcher.consume_token(token):
                raise ValueError(f"resume_token_ids: token {i} ({token}) does not fit the output constraint")
            if p.logprobs is not None:
                seq.output_logprobs.append({})  # sent by the first engine; only later positions are reported
            self._check_stop(seq, token)
            if not seq.is_finished and p.max_reasoning_tokens is not None:
                self._reasoning(seq, token)
            if seq.is_finished or (seq.matcher is not None and seq.matcher.is_stopped()):
                raise ValueError(f"resume_token_ids: the generation already ended at token {i}")
        if p.seed is not None and p.temperature > 0:
            self.runner.skip_draws(seq, len(tokens))
        req.metrics.num_resumed_tokens = len(tokens)  # outputs, but generated elsewhere (metrics, TPOT)

    def reset_prefix_cache(self) -> None:
        """Forgets every cached prefix (for benchmarks and tests; blocks in use are unaffected)."""
        self.block_manager.reset_prefix_cache()

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stops a request wherever it is; its blocks are freed at once."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        req.aborted = True
        for seq in req.seqs:
            if not seq.is_finished:
                seq.finish_reason = "abort"
                self._finish(seq)
            self._seq_by_id.pop(seq.seq_id, None)
        req.metrics.finished_time = time.time()
        self._settle()
        return self._make_output(req, finished=True)

    def _settle(self) -> None:
        """Finishes the step in flight once nothing is left to run (every request aborted or
        failed): its rows are all dropped, and it must not linger into the engine's idle time."""
        if self._inflight is not None and not self.scheduler.has_unfinished():
            self._ready = self.drain()

    def abort_seq(self, request_id: str, index: int) -> RequestOutput | None:
        """Stops one of a request's n samples (a reasoning path pruned or no longer needed); its
        blocks are freed at once and the other samples go on. The request's final output when
        this was its last running sample, else None."""
        req = self.requests.get(request_id)
        if req is None or not 0 <= index < len(req.seqs) or req.seqs[index].is_finished:
            return None
        if req.beam is not None:  # beams run in lockstep: without one the search cannot go on
            return self.abort_request(request_id)
        seq = req.seqs[index]
        seq.finish_reason = "abort"
        self._finish(seq)
        out = self._retire(req, time.time()) if req.is_finished else None
        self._settle()
        return out

    # -- parking (a model pool's hot-swap) -----------------------------------------------
    @property
    def parked(self) -> bool:
        return self.runner.kv_released

    def park(self, offload_weights: bool | None = None) -> int:
        """Frees this model's device memory so another can run: every running sequence is preempted
        by recompute (it keeps its tokens and resumes unchanged after unpark), the KV cache and the
        prefix cache go, and on an accelerator the weights move to pinned host memory (offload_weights
        None: on any device but the CPU, where the weights already are in host memory). Requests may
        still be added and aborted while parked; step() must not run. Returns the sequences preempted."""
        if self.parked:
            return 0
        self._ready = self.drain()  # (their outputs go out with take_outputs, or the next step)
        for rid in list(self.kv_holds):  # their KV goes with the cache
            self.release_kv_hold(rid)
        # The weights first: if that fails (no pinned memory) nothing else has changed.
        if offload_weights if offload_weights is not None else self.device.type != "cpu":
            self.runner.offload_weights()
        sched = self.scheduler
        running = list(reversed(sched.running))  # lowest priority first, so waiting keeps the order
        for seq in running:
            sched._preempt(seq)
        self.block_manager.reset_prefix_cache()  # the cached blocks' KV is about to be freed
        self.runner.release_kv_cache()
        return len(running)

    def catching_up(self) -> bool:
        """Whether a preempted sequence is still recomputing what it had: parking the model now
        would throw that work away again (two models taking turns must each make progress)."""
        seqs = self.scheduler.running + self.scheduler.waiting
        return any(s.num_preemptions and s.num_tokens <= s.preempted_at_tokens for s in seqs)

    def unpark(self) -> None:
        """Brings a parked model back: weights on the device, a KV cache as large as before."""
        if not self.parked:
            return
        if self.runner.weights_offloaded:
            self.runner.restore_weights()
        self.runner.allocate_kv_cache(self.block_manager.num_blocks)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or self._inflight is not None

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.requests)

    # -- the step -----------------------------------------------------------------------
    def _propose(self, seq: Sequence, budget: int) -> int:
        """The scheduler's speculative-decoding hook: drafts for one decode (see spec_decode)."""
        k = max_drafts(seq, self.config.speculative_config.num_speculative_tokens, budget, self.max_model_len)
        if k <= 0:
            return 0
        if self._ngram is not None:
            seq.spec_token_ids = self._ngram.propose(seq, k)
            return len(seq.spec_token_ids)
        return k  # the draft model fills seq.spec_token_ids in the step itself

    def step(self) -> list[RequestOutput]:
        """Runs one batch; returns an output for every request that changed (finished or not).
        With async scheduling the batch is left running on the device and the outputs are those of
        the step before it (see _step_async)."""
        if self.async_scheduling:
            return self._step_async()
        self._waited = 0.0  # (collect's wait is inside execute here)
        t_begin = time.perf_counter()
        sched = self._schedule()
        if sched is None:
            return []
        if self.before_step is not None:
            self.before_step()
        t0 = time.perf_counter()
        try:
            result = self.runner.execute(sched)  # (collect waits for the step's last kernel)
        except Exception as e:
            return self._isolate_failure(sched, e)
        t1 = time.perf_counter()
        self._observe_step(sched, t1 - t0)
        self.scheduler.advance(sched)
        outputs = self._process(sched, result)
        self.step_model.observe_overhead(time.perf_counter() - t_begin - (t1 - t0))
        return outputs

    def _schedule(self) -> SchedulerOutput | None:
        """The next step's batch, readied to run (None when it holds nothing): freed sequences' rows
        of the runner's persistent batch released before anything takes rows (even if nothing runs),
        first-scheduled times stamped, copy-on-write of shared partial blocks done before anything
        writes."""
        sched = self.scheduler.schedule()
        if sched.freed_seq_ids:
            self.runner.batch.release(sched.freed_seq_ids)
        if sched.is_empty:
            return None
        now = time.time()
        for s in sched.scheduled:
            m = s.seq.request.metrics
            if m.first_scheduled_time is None:
                m.first_scheduled_time = now
        if sched.block_copies:
            self.runner.copy_blocks(sched.block_copies)
        return sched

    def _step_async(self) -> list[RequestOutput]:
        """Async scheduling (vLLM's --async-scheduling, SGLang's overlap scheduler): step N+1 is
        scheduled and queued on the device before step N's tokens reach the host, so the host's
        work between steps (N's stop checks and detokenizing, N+1's scheduling and inputs) runs
        while the device computes, instead of the device waiting for it.

        - Each sampled sequence counts its token as pending (Sequence.num_pending) until its step
          is processed: the scheduler plans around it, and N+1's input for it is copied from N's
          sampled tokens on the device (ModelRunner.prepare).
        - A sequence that N finishes has run one more row in N+1, whose token is dropped; one whose
          pending token surely ends it (max_tokens, the context length) gets no row (Scheduler._ends).
        - Blocks holding a pending token are offered to the prefix cache once it is known.
        - N's tokens are processed after N+1's forward is queued and before N+1 is sampled, so what
          sampling reads on the host (a grammar's state, penalties' counts, min_tokens, a reasoning
          budget's forced tokens) is as up to date as in a synchronous step.
        - Beam search re-seats its beams between steps: while a beam search is in the engine, steps
          run one at a time (_needs_sync), and so do they while other engines step on the same device
          (shares_device). Speculative decoding and embedding models never overlap
          (EngineConfig.resolve_async_scheduling)."""
        t_begin = time.perf_counter()
        self._waited = 0.0
        self._stepped = None  # device seconds of the step this call completes
        outputs, self._ready = self._ready, []
        prev, self._inflight = self._inflight, None
        overlap = not self._needs_sync() and not self.shares_device
        if prev is not None and not overlap:
            outputs += self._complete(prev)
            prev = None
        sched = self._schedule()
        if sched is None:
            return outputs + (self._complete(prev) if prev is not None else [])
        if prev is None and self.before_step is not None:
            self.before_step()
        try:
            launch = self.runner.launch(sched, prev, timed=True)
        except Exception as e:
            if prev is not None:  # its tokens first: the failed step's pending inputs are among them
                outputs += self._complete(prev)
            return outputs + self._isolate_failure(sched, e)
        if prev is not None:  # N's outputs while the device runs N+1's forward
            outputs += self._complete(prev, then=True)
        try:
            self.runner.sample(launch)
        except Exception as e:
            return outputs + self._isolate_failure(sched, e)
        self.scheduler.advance(sched)
        if overlap and self.scheduler.has_unfinished():  # (else every row is of a sequence that ended)
            for seq in launch.token_seqs:
                if seq.status is not SeqStatus.FINISHED:
                    seq.num_pending += 1
            launch.pending = True
            self._inflight = launch
        else:
            outputs += self._complete(launch)
        if self._stepped is not None:
            # The host's work beyond the device's: what a step takes on top of its device time (the
            # step-time model's overhead), zero while overlap hides it.
            host = time.perf_counter() - t_begin - self._waited
            self.step_model.observe_overhead(max(0.0, host - self._stepped))
        return outputs

    def _complete(self, launch: Launch, then: bool = False) -> list[RequestOutput]:
        """Waits for a launched step's tokens and processes them (async scheduling). then: another
        step is on the device after it, whose energy interval starts at this one's end."""
        t0 = time.perf_counter()
        result = self.runner.collect(launch)
        self._waited += time.perf_counter() - t0
        self._stepped = seconds = launch.device_seconds()
        self._observe_step(launch.sched, seconds)
        if then and self.before_step is not None:
            self.before_step()
        return self._process(launch.sched, result, pending=launch.pending)

    @property
    def waited_seconds(self) -> float:
        """How long the last step() call waited for the device's tokens (async scheduling; 0 when
        nothing was in flight). Near 0 step after step: the host's work is the bottleneck."""
        return self._waited

    def _needs_sync(self) -> bool:
        """Whether an unfinished request needs each step processed before the next is scheduled."""
        if self._sync_requests:
            self._sync_requests = [r for r in self._sync_requests if not r.is_finished]
        return bool(self._sync_requests)

    def drain(self) -> list[RequestOutput]:
        """Finishes the step in flight (async scheduling), if any: the outputs it makes and any kept
        for the next step()."""
        outputs = self.take_outputs()
        if self._inflight is not None:
            launch, self._inflight = self._inflight, None
            outputs += self._complete(launch)
        return outputs

    def take_outputs(self) -> list[RequestOutput]:
        """Outputs made outside step() (a step in flight finished by park()), for the caller to deliver."""
        outputs, self._ready = self._ready, []
        return outputs

    def _observe_step(self, sched: SchedulerOutput, seconds: float) -> None:
        """Feeds the step-time model (and the step hook: energy accounting) with what the step held."""
        rows = step_features(sched.scheduled)
        tokens, sampled, attn = rows.sum(axis=0).tolist()
        self.step_model.observe(tokens, sampled, attn, seconds)
        if self.on_step is not None:
            self.on_step(sched, rows, seconds)

    def _isolate_failure(self, sched: SchedulerOutput, error: Exception) -> list[RequestOutput]:
        """A batched step failed: rerun it one request at a time so that only the culprit fails.

        Nothing was advanced yet and every chunk keeps its blocks, so each request's part of
        the step can run alone. A batch-wide fault (say, out of memory) that recurs alone fails
        every request in the batch; the engine itself keeps serving.
        """
        groups: dict[str, list] = {}
        for s in sched.scheduled:
            if s.seq.is_finished:  # ended since it was scheduled (async scheduling): its blocks are gone
                continue
            s.forks = [f for f in s.forks if not f.is_finished]
            groups.setdefault(s.seq.request.request_id, []).append(s)
        if len({s.seq.request.request_id for s in sched.scheduled}) == 1 and groups:
            (rid,) = groups
            logger.exception("request %s failed in the model step", rid, exc_info=error)
            return [out for out in [self.fail_request(rid, error)] if out is not None]
        outputs = []
        for rid, chunks in groups.items():
            sub = SchedulerOutput(scheduled=chunks)
            try:
                result = self.runner.execute(sub)
            except Exception as e:
                logger.exception("request %s failed in the model step", rid, exc_info=e)
                out = self.fail_request(rid, e)
                if out is not None:
                    outputs.append(out)
                continue
            self.scheduler.advance(sub)
            outputs.extend(self._process(sub, result))
        return outputs

    def fail_request(self, request_id: str, error: BaseException) -> RequestOutput | None:
        """Ends a request with finish_reason "error"; its blocks are freed at once."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for seq in req.seqs:
            if not seq.is_finished:
                seq.finish_reason = "error"
                self.scheduler.finish(seq)
            self._seq_by_id.pop(seq.seq_id, None)
        req.metrics.finished_time = time.time()
        self._settle()
        out = self._make_output(req, finished=True)
        if isinstance(error, GrammarError):
            out.error, out.error_status = str(error), 400
        else:
            out.error = f"{type(error).__name__}: {error}"
        return out

    def _process(self, sched: SchedulerOutput, result: StepResult, pending: bool = False) -> list[RequestOutput]:
        """Appends a step's tokens (pending: its sampled tokens were counted as pending, async
        scheduling), applies stop conditions, and makes the outputs of the requests it changed."""
        now = time.time()
        touched: dict[str, Request] = {}
        ended: dict[str, RequestOutput] = {}  # failed, or beam searches over
        for seq_id, entries in result.prompt_logprobs.items():
            seq = self._seq_by_id.get(seq_id)
            if seq is None:  # aborted while its step was in flight (async scheduling)
                continue
            req = seq.request
            s = next(x for x in sched.scheduled if x.seq is seq)
            have = len(req.prompt_logprobs)
            skip = have - (s.start + 1)  # entries recomputed after a preemption
            req.prompt_logprobs.extend(entries[max(0, skip):])
        for seq_id, vec in result.embeddings.items():
            seq = self._seq_by_id.get(seq_id)
            if seq is None or seq.is_finished:
                continue
            seq.request.pooled = vec
            seq.finish_reason = "stop"
            self._finish(seq)
            touched[seq.request.request_id] = seq.request
        beam_reqs: dict[str, Request] = {}
        for seq_id, row in result.beams.items():
            seq = self._seq_by_id.get(seq_id)
            if seq is None or seq.is_finished:
                continue
            seq.beam_candidates = row
            beam_reqs[seq.request.request_id] = seq.request
        for req in beam_reqs.values():
            if req.metrics.first_token_time is None:
                req.metrics.first_token_time = now
            if any(s.beam_candidates is None for s in req.seqs):
                continue
            try:
                out = self._beam_step(req)
            except Exception as e:
                logger.exception("request %s failed in a beam search step", req.request_id)
                out = self.fail_request(req.request_id, e)
            if out is not None:
                ended[req.request_id] = out
        # (this loop runs for every sampled row of every step: statuses are compared directly)
        finished = SeqStatus.FINISHED
        seq_by_id = self._seq_by_id
        for seq_id, tokens in result.sampled.items():
            seq = seq_by_id.get(seq_id)
            if seq is None or seq.status is finished:  # its request failed earlier in this loop, or it ended
                continue  # before this step (async scheduling ran it one row further)
            if pending:
                seq.num_pending -= 1
            req = seq.request
            reasoning_budget = req.params.max_reasoning_tokens is not None
            # A fault in one request's bookkeeping (detokenizer, stop checks) fails only that request.
            try:
                appended = 0
                for token, entry in tokens:
                    seq.token_ids.append(token)
                    appended += 1
                    if seq.matcher is not None and not seq.matcher.consume_token(token):
                        # Masks only allow what the grammar accepts: this is the parser giving up
                        # (a grammar too complex for its limits), the request's own doing.
                        reason = (seq.matcher.get_error() or "").strip().splitlines()
                        raise GrammarError(f"structured outputs: the constraint failed while decoding"
                                           f"{': ' + reason[0][:300] if reason else ''}; simplify it")
                    if entry is not None:
                        seq.output_logprobs.append(entry)
                        seq.cumulative_logprob += entry[token].logprob
                    if req.metrics.first_token_time is None:
                        req.metrics.first_token_time = now
                    self._check_stop(seq, token)
                    if seq.status is not finished and reasoning_budget:
                        self._reasoning(seq, token)
                    if seq.status is finished:
                        break
                spec = result.spec.get(seq_id)
                if spec is not None:
                    self.spec_stats.record(*spec)
                    if not seq.is_finished:
                        self.scheduler.accept(seq, min(appended, spec[1]))
            except Exception as e:
                logger.exception("request %s failed while processing its output", req.request_id)
                touched.pop(req.request_id, None)
                out = self.fail_request(req.request_id, e)
                if out is not None:
                    ended[req.request_id] = out
                continue
            touched[req.request_id] = req
        outputs = list(ended.values())
        for req in touched.values():
            if req.is_finished:
                outputs.append(self._retire(req, now))
            elif not req.final_only:
                outputs.append(self._make_output(req, False))
        return outputs

    def _retire(self, req: Request, now: float) -> RequestOutput:
        """A request whose samples have all finished: forgotten by the engine, its final output."""
        req.metrics.finished_time = now
        self.requests.pop(req.request_id, None)
        for seq in req.seqs:
            self._seq_by_id.pop(seq.seq_id, None)
        return self._make_output(req, finished=True)

    # -- beam search --------------------------------------------------------------------
    def _beam_max_new(self, params: SamplingParams, num_prompt: int) -> int:
        room = self.max_model_len - num_prompt
        if params.max_tokens is None:
            return room
        return min(params.max_tokens, room) if params.max_tokens_is_cap else params.max_tokens

    def _check_beam_search(self, params: SamplingParams, num_prompt: int) -> None:
        max_new = self._beam_max_new(params, num_prompt)
        if params.n > self.scheduler.max_num_seqs:  # the beams run in lockstep: all at once
            raise ValueError(f"n: beam search runs its {params.n} beams at once; this engine runs at most "
                             f"max_num_seqs={self.scheduler.max_num_seqs} sequences")
        # The beams may share nothing: the cache must hold all of them at full length, or the
        # search could wait forever for blocks its own beams hold.
        bm = self.block_manager
        need = params.n * bm.blocks_needed(num_prompt + max_new)
        if need > bm.num_blocks:
            raise ValueError(f"n: beam search with {params.n} beams of up to {num_prompt + max_new} tokens needs "
                             f"{need} KV cache blocks; the cache has {bm.num_blocks} (lower n or max_tokens)")

    def _beam_search(self, params: SamplingParams, num_prompt: int) -> BeamSearch:
        """The search's state (check_request has checked that its beams fit)."""
        max_new = self._beam_max_new(params, num_prompt)
        stop = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids))
        return BeamSearch(params.n, params.length_penalty, params.early_stopping, tuple(sorted(stop)), max_new,
                          params.min_tokens, params.logprobs)

    def _beam_step(self, req: Request) -> RequestOutput | None:
        """Every beam of req has its candidates: pick the next beams and re-seat them (see
        engine/beam.py). The request's output once the search is over, else None."""
        beam, slots = req.beam, req.seqs
        want = req.params.logprobs is not None

        def history(slot: int) -> tuple[list[int], list | None, float]:
            s = slots[slot]
            return s.output_token_ids, (list(s.output_logprobs) if want else None), s.cumulative_logprob

        rows = [s.beam_candidates for s in slots]
        for s in slots:
            s.beam_candidates = None
        conts = beam.select(rows, history, at_limit=slots[0].num_tokens + 1 >= self.max_model_len)
        if beam.done:
            return self._finish_beams(req)
        bm = self.block_manager
        for c in conts:  # slots whose beam ended take a copy of a beam that continues twice
            if c.slot != c.parent:
                child, parent = slots[c.slot], slots[c.parent]
                bm.free(child)
                bm.fork(parent, child)
                child.token_ids = list(parent.token_ids)
                child.output_logprobs = list(parent.output_logprobs)
                child.num_draft_computed = parent.num_draft_computed
        for c in conts:
            seq = slots[c.slot]
            seq.token_ids.append(c.token)
            if c.entry is not None:
                seq.output_logprobs.append(c.entry)
            seq.cumulative_logprob = float(beam.scores[c.slot])
        return None

    def _finish_beams(self, req: Request) -> RequestOutput:
        """The w best finished hypotheses become the request's n outputs, best first."""
        p = req.params
        for seq, hyp in zip(req.seqs, req.beam.finished):
            seq.token_ids = seq.token_ids[: seq.num_prompt_tokens] + hyp.tokens
            seq.output_logprobs = hyp.logprobs or []
            seq.cumulative_logprob = hyp.cumulative_logprob
            last = hyp.tokens[-1]
            seq.finish_reason = "stop" if hyp.stopped else "length"
            if hyp.stopped and last in p.stop_token_ids and (p.ignore_eos or last not in self.eos_token_ids):
                seq.stop_reason = last
            if self.tokenizer is not None and p.detokenize:
                seq.detokenizer = det = IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids,
                                                               p.skip_special_tokens, [], p.include_stop_str_in_output)
                for t in hyp.tokens[:-1] if hyp.stopped and not p.include_stop_str_in_output else hyp.tokens:
                    det.add_token(t, check_stop=False)
                det.flush()
        for seq in req.seqs:
            if seq.finish_reason is None:  # more beams than finished hypotheses (a degenerate search)
                seq.finish_reason = "length"
            self.scheduler.finish(seq)
        return self._retire(req, time.time())

    def _reasoning(self, seq: Sequence, token: int) -> None:
        """A reasoning budget's bookkeeping after each token: entering and leaving <think>
        sections, counting what is written inside, closing the section when it is spent."""
        assert self.think_ids is not None
        forced = bool(seq.forced) and seq.forced[0] == token
        if forced:
            seq.forced.pop(0)
        # The tags are found in the text (their token ids depend on what precedes them), or as
        # the token itself where a tag is one (special) token the text may leave out.
        text = seq.detokenizer.text if seq.detokenizer is not None else ""
        start, end = self.think_ids
        if seq.thinking is None:
            i = text.find(THINK_START, max(0, seq.think_scan - len(THINK_START)))
            if i >= 0 or start == (token,):
                seq.thinking, seq.think_from = True, (i + len(THINK_START) if i >= 0 else len(text))
        elif seq.thinking:
            if not forced:
                seq.reasoning_tokens += 1
            if text.find(THINK_END, max(seq.think_from, seq.think_scan - len(THINK_END))) >= 0 or end == (token,):
                seq.thinking, seq.forced = False, []
        seq.think_scan = len(text)
        self._budget(seq)

    def _budget(self, seq: Sequence) -> None:
        if seq.thinking and not seq.forced and seq.reasoning_tokens >= (seq.params.max_reasoning_tokens or 0):
            assert self.think_ids is not None
            seq.forced = list(self.think_ids[1])  # the next tokens close the section

    def _check_stop(self, seq: Sequence, token: int) -> None:
        p = seq.request.params
        n_out = len(seq.token_ids) - seq.num_prompt_tokens
        # A stop token (EOS or stop_token_ids) ends the text before itself, as in vLLM; its id
        # stays in token_ids. include_stop_str_in_output keeps its text.
        if n_out >= p.min_tokens:
            if not p.ignore_eos and token in self.eos_token_ids:
                seq.finish_reason = "stop"
            elif token in p.stop_token_ids:
                seq.finish_reason, seq.stop_reason = "stop", token
            if seq.finish_reason is not None:
                if seq.detokenizer is not None and p.include_stop_str_in_output:
                    seq.detokenizer.add_token(token, check_stop=False)
                return self._finish(seq)
        if seq.detokenizer is not None:
            # Stop strings from token min_tokens + 1 on, as vLLM: the text of the first min_tokens
            # tokens cannot stop the output (EOS and stop ids are banned for them too).
            hit = seq.detokenizer.add_token(token, check_stop=n_out > p.min_tokens)
            if hit is not None:
                seq.finish_reason, seq.stop_reason = "stop", hit
                return self._finish(seq)
        if seq.matcher is not None and seq.matcher.is_stopped():
            # The grammar is complete: nothing more may follow (a "stop" even on the last token max_tokens allows).
            seq.finish_reason = "stop"
            return self._finish(seq)
        if (p.max_tokens is not None and n_out >= p.max_tokens) or len(seq.token_ids) >= self.max_model_len:
            seq.finish_reason = "length"
            return self._finish(seq)

    def _finish(self, seq: Sequence) -> None:
        if seq.detokenizer is not None and not isinstance(seq.stop_reason, str):
            # A stop string already cut the text; otherwise emit what is buffered, which may end in
            # one (not for an abort or an error, nor before min_tokens: as add_token's checks).
            check = (seq.finish_reason not in ("abort", "error")
                     and seq.num_output_tokens > seq.request.params.min_tokens)
            hit = seq.detokenizer.flush(check)
            if hit is not None:
                seq.finish_reason, seq.stop_reason = "stop", hit
        if seq.request.kv_hold is not None and seq.index == 0 and seq.finish_reason in ("stop", "length"):
            self._hold_kv(seq)
        if seq.request.kv_release is not None and seq.index == 0:
            self.release_kv_hold(seq.request.kv_release)
        self.scheduler.finish(seq)

    # -- KV transfer (prefill/decode disaggregation: engine/kv_transfer.py) ------------------
    @property
    def kv_fingerprint(self) -> str:
        """What KV from another engine must match to enter this one's cache."""
        if self._kv_fingerprint is None:
            c = self.config
            spec = c.speculative_config
            draft = spec.model if spec is not None and spec.method == "draft_model" else None
            self._kv_fingerprint = kv_transfer.fingerprint(c.model, self.dtype, c.quantization, c.block_size, draft,
                                                           c.load_format, f"{c.seed}/{self.device.type}")
        return self._kv_fingerprint

    def _hold_kv(self, seq: Sequence) -> None:
        """Keeps a finished prompt's blocks referenced for export_kv, until its hold's seconds pass.
        Holds take at most half the cache: beyond it the oldest are let go (a decode worker that
        finds none recomputes; holds must not starve the requests running here)."""
        tid, secs = seq.request.kv_hold  # type: ignore[misc]
        self.release_kv_hold(tid)
        bm = self.block_manager
        if len(seq.block_table) > bm.num_blocks // 2:  # alone over the cap: not held (the others stay)
            return
        holder = Sequence(seq.request, 0, list(seq.token_ids), seq.num_prompt_tokens)
        bm.fork(seq, holder)
        self._add_hold(tid, holder, secs)
        if tid in self.kv_holds:
            self._export_holds[tid] = time.monotonic() + EXPORT_GRACE_S

    def _add_hold(self, tid: str, holder: Sequence, secs: float) -> None:
        """Registers a hold; holds beyond half the cache (in blocks: one prompt held twice pins its
        blocks once) let the oldest others go: first those that pin a block no other hold does, then
        any the new one does not pin whole."""
        self.release_kv_hold(tid)
        self.kv_holds[tid] = (holder, time.monotonic() + float(secs))
        held = self._held_blocks
        for b in holder.block_table:
            held[b] += 1
        cap = self.block_manager.num_blocks // 2
        mine = set(holder.block_table)
        for alone in (True, False):  # (then any: holds of one prompt pin nothing alone, yet go over the cap)
            for old in list(self.kv_holds):
                if len(held) <= cap or old == tid:
                    break
                table = self.kv_holds[old][0].block_table
                if any(held[b] == 1 for b in table) or not alone and not mine.issuperset(table):
                    self.release_kv_hold(old)  # (never one the new hold pins whole: that frees nothing)
                    self.kv_holds_capped += 1

    def _reclaimable_holds(self) -> list[tuple[str, list[int]]]:
        """BlockManager.reclaimable: the holds that may give way to a request needing their blocks,
        oldest first (without it, a prompt would wait for holds to expire, maybe holds of requests
        queued behind it, and running sequences would be preempted first). A prefill's own hold is
        spared for EXPORT_GRACE_S: the router takes it within milliseconds of the answer, and letting
        it go would cost the decode replica the whole prefill."""
        now = time.monotonic()
        return [(tid, h.block_table) for tid, (h, _) in self.kv_holds.items()
                if self._export_holds.get(tid, 0.0) <= now]

    def _reclaim_hold(self, tid: str) -> None:
        if self.release_kv_hold(tid):
            self.kv_holds_reclaimed += 1

    def release_kv_hold(self, transfer_id: str) -> bool:
        self._export_holds.pop(transfer_id, None)
        entry = self.kv_holds.pop(transfer_id, None)
        if entry is None:
            return False
        held = self._held_blocks
        for b in entry[0].block_table:
            held[b] -= 1
            if not held[b]:
                del held[b]
        self.block_manager.free(entry[0])  # (its id in take_freed: no row in the runner's batch, ignored)
        return True

    def expire_kv_holds(self, now: float | None = None) -> int:
        """Lets go of holds nobody took in time; how many."""
        now = time.monotonic() if now is None else now
        expired = [rid for rid, (_, deadline) in self.kv_holds.items() if deadline <= now]
        for rid in expired:
            self.release_kv_hold(rid)
        self.kv_holds_expired += len(expired)
        return len(expired)

    def export_kv(self, transfer_id: str, skip_blocks: int = 0) -> kv_transfer.KVPayload | None:
        """The held prompt's full blocks (after the first skip_blocks, which the receiver has) with
        their keys, and the hold released; None when there is no such hold (taken, expired)."""
        entry = self.kv_holds.get(transfer_id)
        if entry is None:
            return None
        holder = entry[0]
        bm = self.block_manager
        try:
            n = min(holder.num_computed_tokens // bm.block_size, len(holder.block_table))
            bm._extend_hashes(holder, n * bm.block_size)
            n = min(n, len(holder.block_hashes))
            skip = min(max(0, skip_blocks), n)
            blocks = holder.block_table[skip:n]
            runner = self.runner
            kv = kv_transfer.gather(runner.kv_caches, blocks)
            draft = (kv_transfer.gather(runner.drafter.kv_caches, blocks)
                     if runner.drafter is not None and runner.drafter.kv_caches else None)
            return kv_transfer.KVPayload(holder.block_hashes[skip:n], kv, draft, self.kv_fingerprint, bm.block_size,
                                         prefix_keys=holder.block_hashes[:skip])
        finally:
            self.release_kv_hold(transfer_id)

    def import_kv(self, payload: kv_transfer.KVPayload, hold: tuple[str, float] | None = None) -> dict[str, int]:
        """Puts another engine's blocks into this one's prefix cache under their keys (the ones it
        lacks, as many as free blocks hold). KVTransferError when they do not fit this engine. With
        hold (id, seconds), the chain's cached blocks are held until a request carrying
        `kv_release: id` ends (or the seconds pass): under memory pressure, blocks only cached would
        be evicted by the running sequences before the request they were moved for is admitted."""
        if self.parked:
            raise kv_transfer.KVTransferError("the model is parked")
        if not self.config.enable_prefix_caching or self.pooling:
            raise kv_transfer.KVTransferError("KV transfer needs prefix caching and a generative model")
        runner, bm = self.runner, self.block_manager
        drafts = runner.drafter.kv_caches if runner.drafter is not None else []
        kv_transfer.check_fits(payload, runner.kv_caches, drafts, self.kv_fingerprint, bm.block_size)
        keys = payload.prefix_keys + payload.keys  # (the prefix the payload continues: held, not written)
        skip = len(payload.prefix_keys)
        taken, held = bm.take_imports(keys, first=skip)
        written = False
        try:
            if taken:
                idx = torch.tensor([i - skip for i, _ in taken])
                blocks = [b for _, b in taken]
                kv_transfer.scatter(runner.kv_caches, blocks, payload.kv.index_select(2, idx))
                if payload.draft_kv is not None:
                    kv_transfer.scatter(drafts, blocks, payload.draft_kv.index_select(2, idx))
            written = True
        finally:
            bm.release_imports(keys, taken, held, written)
        # How much of the chain is cached from its first block on (what a prompt with these keys finds).
        chain = bm.cached_prefix(keys)
        if hold is not None and chain and len(chain) <= bm.num_blocks // 2:
            holder = Sequence(Request(hold[0], None, [], SamplingParams(max_tokens=1), time.time()), 0, [], 0)
            for block in chain:
                bm._ref(block)
            holder.block_table = chain
            self.release_kv_hold(hold[0])
            self._add_hold(hold[0], holder, hold[1])
        return {"blocks": payload.num_blocks, "imported": len(taken),
                "present": sum(1 for k in payload.keys if k in bm._cached) - len(taken),
                "reachable_blocks": len(chain)}

    def _make_output(self, req: Request, finished: bool) -> RequestOutput:
        outs = []
        for seq in req.seqs:
            text = seq.detokenizer.text if seq.detokenizer is not None else ""
            logprobs = seq.output_logprobs if req.params.logprobs is not None else None
            outs.append(CompletionOutput(
                index=seq.index,
                text=text,
                token_ids=seq.token_ids[seq.num_prompt_tokens :],  # (a copy: the snapshot's own)
                # a beam's score is its cumulative logprob: always reported
                cumulative_logprob=seq.cumulative_logprob if logprobs is not None or req.beam is not None else None,
                logprobs=logprobs,
                finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason,
            ))
        req.metrics.num_generated_tokens = (max((s.num_output_tokens for s in req.seqs), default=0)
                                            - req.metrics.num_resumed_tokens)
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            prompt_logprobs=req.prompt_logprobs,
            outputs=outs,
            finished=finished,
            metrics=req.metrics,
            num_cached_tokens=req.num_cached_tokens or 0,
            embedding=req.pooled if self.task == "embed" else None,
            probs=req.pooled if self.task == "classify" else None,
            tenant=req.tenant,
            slo=req.slo or req.slo_demoted,
            slo_demoted=req.slo_demoted is not None,
            uncounted=req.uncounted,
            prompt_only=req.params._prompt_only,
            compute=self.energy.report(req.compute),
        )

    # -- introspection ------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        return {
            "num_requests_running": len(self.scheduler.running),
            "kv_cache_usage_perc": self.block_manager.usage,
            "num_requests_waiting": len(self.scheduler.waiting) + self.scheduler.num_fork_waiting,
            "num_preemptions": self.scheduler.num_preemptions,
            "prompt_tokens_computed": self.scheduler.num_prompt_tokens_computed,
            "prefix_cache_queries": self.block_manager.num_query_tokens,
            "prefix_cache_hits": self.block_manager.num_hit_tokens,
            "kv_cache_cached_blocks": self.block_manager.num_cached_free_blocks,
            "spec_decode_num_drafts": self.spec_stats.num_drafts,
            "spec_decode_num_draft_tokens": self.spec_stats.num_draft_tokens,
            "spec_decode_num_accepted_tokens": self.spec_stats.num_accepted_tokens,
            "energy_joules": self.energy.step_joules,  # measured over this engine's steps
            "idle_energy_joules": self.energy.idle_joules(),  # the meter's, outside every engine's steps
            "kv_holds": len(self.kv_holds),
            "kv_held_blocks": len(self._held_blocks),
            "kv_holds_reclaimed": self.kv_holds_reclaimed,
            "kv_holds_capped": self.kv_holds_capped,
            "kv_holds_expired": self.kv_holds_expired,
        }


THINK_START, THINK_END = "<think>", "</think>"


def cache_salt(prompt: str | dict | list[int]) -> str | None:
    """A dict prompt's cache_salt (vLLM's field): requests share cached blocks only with equal salts."""
    salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
    if salt is not None:
        if not isinstance(salt, str) or not salt:
            raise ValueError("cache_salt: must be a non-empty string")
        try:
            salt.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("cache_salt: must be valid Unicode (no lone surrogates)") from None
    return salt


def request_tags(prompt: str | dict | list[int]) -> tuple[str | None, SLOTarget | None]:
    """A dict prompt's `tenant` (a name, for metrics and accounting) and `slo` (an SLOTarget or
    `{"ttft_ms", "tpot_ms"}`); ValueError names what is wrong."""
    if not isinstance(prompt, dict):
        return None, None
    tenant = prompt.get("tenant")
    if tenant is not None and (not isinstance(tenant, str) or not tenant):
        raise ValueError("tenant: must be a non-empty string")
    slo = prompt.get("slo")
    if slo is not None and not isinstance(slo, SLOTarget):
        slo = SLOTarget.from_dict(slo)
    return tenant, (None if slo is None or slo.best_effort else slo)


def bad_words_token_ids(tokenizer: Any, words: list[str]) -> tuple[tuple[int, ...], ...]:
    """Each bad word's tokens as vLLM finds them: as the word starts the text, and as it follows a
    space when that spelling starts with another token of the same length (a BPE's "Ġword")."""
    out: list[tuple[int, ...]] = []
    for word in words:
        bare = tuple(tokenizer.encode(word.lstrip(), add_special_tokens=False))
        spaced = tuple(tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
        for ids in (bare, spaced) if spaced[:1] != bare[:1] and len(spaced) == len(bare) else (bare,):
            if ids and ids not in out:
                out.append(ids)
    return tuple(out)


def _copy_params(p: SamplingParams) -> SamplingParams:
    import copy

    return copy.copy(p)


def _token_id(t: Any) -> Any:
    """A numpy integer as an int (a numpy array of ids is a prompt too); the rest as it is, for
    check_request to refuse."""
    return int(t) if isinstance(t, numbers.Integral) and not isinstance(t, (int, bool)) else t


def batch_params(params: SamplingParams | Seq[SamplingParams] | None, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams() for _ in range(n)]
    if isinstance(params, SamplingParams):
        return [params] * n
    if isinstance(params, (dict, str)):
        raise TypeError(f"sampling_params: a SamplingParams or a list of them, got {type(params).__name__}")
    params = list(params)
    wrong = next((p for p in params if not isinstance(p, SamplingParams)), None)
    if wrong is not None:
        raise TypeError(f"sampling_params: a SamplingParams or a list of them, got a list holding "
                        f"{type(wrong).__name__}")
    if len(params) != n:
        raise ValueError(f"sampling_params: {len(params)} given for {n} prompts")
    return params


_POOLING_NAMES = {"embed": "an embedding model", "classify": "a classifier"}


def _classifier_token_ids(tokenizer: Any, tokens: list[str], vocab_size: int) -> list[int]:
    """classifier_from_token's tokens as ids: each must be one token of the vocabulary (as written in
    it, or as its text encodes)."""
    if tokenizer is None:
        raise ValueError("classifier_from_token: needs the model's tokenizer")
    ids = []
    for t in tokens:
        i = tokenizer.convert_tokens_to_ids(t)
        if i is None or i == tokenizer.unk_token_id or not 0 <= i < vocab_size:
            enc = tokenizer.encode(t, add_special_tokens=False)
            if len(enc) != 1 or not 0 <= enc[0] < vocab_size:
                raise ValueError(f"classifier_from_token: {t!r} is not one token of the vocabulary (it encodes "
                                 f"as {len(enc)} tokens)")
            i = enc[0]
        ids.append(int(i))
    return ids


def resolve_task(task: str, mc: ModelConfig, classifier_from_token: list[str] | None = None) -> str:
    """"auto": classify for a sequence classifier (a *ForSequenceClassification checkpoint) or a
    causal LM given classifier_from_token; embed for a bare decoder (no LM head) or a
    sentence-transformers folder, whose pooling must be last-token (the only pooling implemented);
    generate otherwise."""
    st = os.path.join(mc.path, "config_sentence_transformers.json")
    if classifier_from_token is not None:
        if mc.labels:
            raise ValueError(f"classifier_from_token: {mc.path} is a sequence classifier already (its own head "
                             f"has labels {list(mc.labels)})")
        if not mc.has_lm_head:
            raise ValueError(f"classifier_from_token: {mc.path} is a bare decoder without an LM head, whose rows "
                             f"the classifier would be made of")
        return "classify"
    if task == "auto":
        task = ("classify" if mc.labels else "embed" if (not mc.has_lm_head or os.path.isfile(st))
                else "generate")
    if task == "classify" and not mc.labels:
        raise ValueError(f"task: {mc.path} has no classification head (a *ForSequenceClassification checkpoint "
                         f"has one); a causal LM classifies with classifier_from_token (--classifier-from-token "
                         f"no,yes for a yes/no reranker)")
    if task == "generate" and mc.labels:
        raise ValueError(f"task: {mc.path} is a sequence classifier without an LM head; it can classify or embed "
                         f"(--task classify or embed)")
    if task == "generate" and not mc.has_lm_head:
        raise ValueError(f"task: {mc.path} is a bare decoder without an LM head; it can only embed (--task embed)")
    if task == "embed":
        pooling = os.path.join(mc.path, "1_Pooling", "config.json")
        if os.path.isfile(pooling):
            with open(pooling) as f:
                modes = [k for k, v in json.load(f).items() if k.startswith("pooling_mode_") and v is True]
            if modes and modes != ["pooling_mode_lasttoken"]:
                raise ValueError(f"task: {pooling} asks for {', '.join(modes)}; only last-token pooling is supported")
    return task
