"""The offline API: LLM(model).generate(prompts, sampling_params), as in vLLM."""

from __future__ import annotations

import os
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from typing import Any

from tokenmill.config import EngineConfig
from tokenmill.engine.detokenizer import safe_stream_end
from tokenmill.engine.llm_engine import LLMEngine, batch_params, cache_salt
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams

PromptType = str | dict[str, Any] | list[int]


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
        fields = set(EngineConfig.__dataclass_fields__) - {"model"}
        unknown = set(kwargs) - fields
        if unknown:
            raise TypeError(f"LLM() got unknown settings {sorted(unknown)}; known: {sorted(fields)}")
        self.config = EngineConfig(model=model or default_model_path(), **kwargs)
        self.engine = LLMEngine(self.config)
        self._latest: dict[str, RequestOutput] = {}  # newest unread output per request

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def chat_prompt(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> dict[str, Any]:
        """One conversation rendered with the tokenizer's chat template, as a token-id prompt."""
        tok = self.engine.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise ValueError("messages: this model's tokenizer has no chat template")
        text = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
        return {"prompt": text, "prompt_token_ids": tok.encode(text, add_special_tokens=False)}

    def chat(self, messages: list[dict[str, str]] | list[list[dict[str, str]]],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
             use_tqdm: bool = False) -> list[RequestOutput]:
        """Like generate, for one conversation or a list of them (chat template applied)."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        return self.generate([self.chat_prompt(c) for c in convs], sampling_params,  # type: ignore[arg-type]
                             use_tqdm=use_tqdm)

    def stream(self, prompt: PromptType, sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Yields the text of one sample piece by piece as it is generated. Closing the iterator
        early aborts the request."""
        params = sampling_params or SamplingParams()
        if params.n != 1:
            raise ValueError("n: stream() produces one sample; use n=1")
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

    def _step(self) -> None:
        """One engine step; each request's newest output is kept until its caller reads it, so
        interleaved stream() and generate() calls never lose each other's outputs."""
        if not self.engine.has_unfinished_requests():
            raise RuntimeError("the engine has no unfinished requests but outputs are missing")
        for out in self.engine.step():
            self._latest[out.request_id] = out

    def embed(self, prompts: PromptType | Seq[PromptType], *, use_tqdm: bool = False) -> list[RequestOutput]:
        """Embeddings of an embedding model (`task="embed"`): each output's `.embedding` is the
        L2-normalized final hidden state of its prompt's last token."""
        if self.engine.task != "embed":
            raise ValueError(f"task: {self.engine.config.model} runs as a generative model; load it with "
                             f"task='embed' to embed")
        return self._run(prompts, SamplingParams(max_tokens=1, temperature=0, _prompt_only=True), None, use_tqdm)

    def generate(
        self,
        prompts: PromptType | Seq[PromptType],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        *,
        priority: Seq[int] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generates for every prompt in one continuous batch; outputs come back in prompt order.

        Every request is validated before any is queued, so a bad one raises ValueError and
        leaves the engine as it was.
        """
        if self.engine.task == "embed":
            raise ValueError(f"task: {self.engine.config.model} runs as an embedding model; use embed()")
        return self._run(prompts, sampling_params, priority, use_tqdm)

    def _run(self, prompts: PromptType | Seq[PromptType],
             sampling_params: SamplingParams | Seq[SamplingParams] | None, priority: Seq[int] | None,
             use_tqdm: bool) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts)
        ):
            prompts = [prompts]
        prompts = list(prompts)
        params = batch_params(sampling_params, len(prompts))
        prios = list(priority) if priority is not None else [0] * len(prompts)
        if len(prios) != len(prompts):
            raise ValueError(f"priority: {len(prios)} given for {len(prompts)} prompts")
        engine = self.engine
        tokenized = []
        for p, sp in zip(prompts, params):
            text, token_ids = engine.tokenize(p)
            engine.check_request(token_ids, sp)
            salt = cache_salt(p)
            tokenized.append({"prompt": text, "prompt_token_ids": token_ids,
                              **({"cache_salt": salt} if salt is not None else {})})

        ids = []
        try:
            for p, sp, prio in zip(tokenized, params, prios):
                ids.append(engine.add_request(p, sp, priority=prio))
            done: dict[str, RequestOutput] = {}
            pending = set(ids)
            bar = _progress(len(ids)) if use_tqdm else None
            while pending:
                self._step()
                for rid in list(pending):
                    out = self._latest.get(rid)
                    if out is None:
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
        return [done[r] for r in ids]


def _progress(total: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="generate", unit="req")
