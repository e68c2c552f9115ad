"""Speculative decoding: propose k tokens cheaply, verify them in one forward pass of the target.

A decode step of a sequence with drafts d1..dk runs k + 1 rows (its last token, then the
drafts) and gets logits for each. Verification walks the rows in order: draft d_j is accepted
with probability p_j(d_j) (under greedy: when it is the argmax); at the first rejection a
token is drawn from p_j with d_j taken out, and when all k are accepted a bonus token comes
from the last row. Proposals are deterministic (the n-gram lookup, or the draft model's
argmax), and for a deterministic proposal this rule gives exactly the target distribution:
P(d) = p(d), and any other x comes out with (1 - p(d)) * p(x) / (1 - p(d)) = p(x). Greedy
output is the target's own greedy output.

The KV the rejected rows wrote is simply overwritten later: the sequence's computed count
advances by the accepted drafts only (`Scheduler.accept`).

Requests whose sampling depends on the tokens before each position in ways the batch does
not track per row (repetition/presence/frequency penalties, min_tokens not yet reached), and
seeded requests (see `can_speculate`), decode without drafts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.config import SpeculativeConfig
from tokenmill.engine.input_batch import Staging
from tokenmill.engine.sequence import Sequence
from tokenmill.memory import kv_cache_tensors, release_pages
from tokenmill.sample.sampler import sample_rows


@dataclass
class SpecStats:
    num_drafts: int = 0  # verification steps with at least one draft token
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    def record(self, num_drafted: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_drafted
        self.num_accepted_tokens += num_accepted


def can_speculate(seq: Sequence) -> bool:
    """Seeded requests decode without drafts: how many drafts a step carries depends on the
    batch (budget, free blocks), and each verified row draws from the request's generator, so
    drafts would make a seeded output depend on its neighbours."""
    p = seq.params
    return (p.repetition_penalty == 1.0 and not p.presence_penalty and not p.frequency_penalty
            and seq.num_output_tokens >= p.min_tokens and p.seed is None
            and p.max_reasoning_tokens is None  # the closing tag it may force is not a draft's to guess
            and not p._bad_words_token_ids  # a ban depends on the tokens before it, drafts included
            and seq.request.beam is None)  # a beam's next token is the search's to pick, not a sample


def max_drafts(seq: Sequence, k: int, budget: int, max_model_len: int) -> int:
    """How many drafts a decode of seq may carry: k, within the step's token budget, the tokens
    max_tokens still allows after the one the step always yields, and the context length."""
    if not can_speculate(seq):
        return 0
    k = min(k, budget, max_model_len - seq.num_tokens)
    if seq.params.max_tokens is not None:
        k = min(k, seq.params.max_tokens - seq.num_output_tokens - 1)
    return max(k, 0)


class NgramIndex:
    """First position after each n-gram of a token list (min_n <= n <= max_n), grown as tokens append.

    The first occurrence is kept: for "rewrite this with one change" it sits in the prompt, where
    the continuation is longest."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n
        self.maps: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in range(min_n, max_n + 1)}
        self.indexed = 0  # n-grams ending before this position are in the maps

    def propose(self, tokens: list[int], k: int) -> list[int]:
        # Index the n-grams that have at least one token after them (all but the suffix's own).
        end = len(tokens) - 1
        for p in range(self.indexed, end):  # the n-gram ends at p, its continuation starts at p + 1
            for n, m in self.maps.items():
                if p + 1 >= n:
                    m.setdefault(tuple(tokens[p + 1 - n : p + 1]), p + 1)
        self.indexed = max(self.indexed, end)
        for n in range(min(self.max_n, len(tokens)), self.min_n - 1, -1):
            start = self.maps[n].get(tuple(tokens[-n:]))
            if start is not None:
                return tokens[start : start + k]
        return []


class NgramProposer:
    def __init__(self, cfg: SpeculativeConfig) -> None:
        self.min_n = cfg.prompt_lookup_min
        self.max_n = cfg.prompt_lookup_max

    def propose(self, seq: Sequence, k: int) -> list[int]:
        if seq.ngram_index is None:
            seq.ngram_index = NgramIndex(self.min_n, self.max_n)
        return seq.ngram_index.propose(seq.token_ids, k)


def verify(argmax: list[int], probs: torch.Tensor | None, starts: list[int], drafts: list[list[int]],
           greedy: list[bool]) -> list[tuple[list[int], int]]:
    """Rejection sampling for each sequence: (emitted tokens, drafts accepted). Sequence i's k_i
    drafts were scored by the k_i + 1 rows from starts[i]: argmax holds every row's greedy token,
    probs (unless every sequence is greedy) every row's final sampling distribution, after
    temperature, top-k/p and min-p. A greedy sequence accepts drafts while they are the argmax; a
    sampled one accepts draft j with probability p_j(d_j) and, at the first rejection, draws from
    p_j with d_j taken out (drafts are deterministic: the residual of a point mass). The sampled
    sequences are verified together: two transfers to the host a step, not two per sequence.
    Draws come from the global generator: seeded requests never carry drafts (`can_speculate`)."""
    results: list[tuple[list[int], int] | None] = [None] * len(drafts)
    sampled = []
    for i, (r0, d, g) in enumerate(zip(starts, drafts, greedy)):
        if g:
            a = 0
            while a < len(d) and argmax[r0 + a] == d[a]:
                a += 1
            results[i] = (d[:a] + [argmax[r0 + a]], a)
        else:
            sampled.append(i)
    if sampled:
        assert probs is not None
        dev = probs.device
        rows = [starts[i] + j for i in sampled for j in range(len(drafts[i]))]
        toks = [t for i in sampled for t in drafts[i]]
        p_d = probs[torch.tensor(rows, dtype=torch.long, device=dev), torch.tensor(toks, dtype=torch.long, device=dev)]
        ok = (torch.rand(len(rows), device=dev) < p_d).tolist()
        finals, holes, at = [], [], 0  # each sequence's row to draw from; (its index, the rejected draft)
        for n, i in enumerate(sampled):
            k = len(drafts[i])
            a = ok[at : at + k].index(False) if False in ok[at : at + k] else k
            at += k
            finals.append(starts[i] + a)
            if a < k:
                holes.append((n, drafts[i][a]))
        last = probs[torch.tensor(finals, dtype=torch.long, device=dev)]  # (a copy)
        if holes:
            hi, ht = zip(*holes)
            last[torch.tensor(hi, device=dev), torch.tensor(ht, device=dev)] = 0.0
        for i, r, token in zip(sampled, finals, sample_rows(last).tolist()):
            a = r - starts[i]
            results[i] = (drafts[i][:a] + [int(token)], a)
    return results  # type: ignore[return-value]


def check_draft_model(path: str, target_vocab: int, max_model_len: int, allow_long: bool,
                      target_tokenizer: str | None = None):
    """The draft model's ModelConfig; ValueError when it cannot draft for the target.

    The vocabularies may differ in size where the tokenizers are the same and the difference is
    padding: Qwen2.5's 0.5B-3B pad their embeddings to 151,936 rows, its 7B-72B to 152,064, for
    the same 151,665 tokens (vLLM and llama.cpp refuse such pairs). The draft then never proposes
    an id the target lacks, and reads the target's padding ids (never sampled by a trained model)
    as another padding id: only its drafts could change, never the output."""
    from tokenmill.config import ModelConfig

    mc = ModelConfig.from_pretrained(path)
    if mc.vocab_size != target_vocab:
        same, why = _same_tokenizer(path, target_tokenizer, min(mc.vocab_size, target_vocab))
        if not same:
            raise ValueError(f"speculative_config: the draft model's vocabulary ({mc.vocab_size} tokens) differs "
                             f"from the target's ({target_vocab}), and {why}; a draft model must share the "
                             f"tokenizer")
    mc.check_max_model_len(max_model_len, allow_long, "the draft model")
    if not mc.has_lm_head:
        raise ValueError(f"speculative_config: the draft model {path} has no LM head (a bare decoder); "
                         f"it cannot propose tokens")
    return mc


def _same_tokenizer(draft: str, target: str | None, rows: int) -> tuple[bool, str]:
    """Whether the two folders' tokenizers map the same tokens to the same ids, all below rows."""
    from transformers import AutoTokenizer

    toks = []
    for what, folder in (("the draft model's", draft), ("the target's", target)):
        try:
            toks.append(AutoTokenizer.from_pretrained(folder, local_files_only=True) if folder else None)
        except Exception:  # (transformers raises many kinds for a folder it cannot read)
            toks.append(None)
        if toks[-1] is None:
            return False, f"{what} folder has no tokenizer to compare"
    a, b = toks
    if a.get_vocab() != b.get_vocab():
        return False, "their tokenizers differ"
    if len(a) > rows:
        return False, f"the tokenizer's {len(a)} tokens do not fit in the smaller one"
    return True, ""


class DraftModel:
    """The draft_model proposer: a smaller checkpoint with the target's vocabulary, run greedily.

    Its KV cache has the target's block layout and lives in the same block ids, so it needs no
    block bookkeeping of its own (copy-on-write copies apply to both); `seq.num_draft_computed`
    says how many leading positions hold its KV. Each step it first catches up on every scheduled
    chunk's tokens (prompt chunks too, so a finished prompt has draft KV), which also yields the
    first draft of each decode from the last row, then runs k - 1 single-row passes.
    """

    def __init__(self, cfg: SpeculativeConfig, target_vocab: int, engine_config, device: torch.device,
                 dtype: torch.dtype, max_model_len: int) -> None:
        from tokenmill.attention import get_attention_backend
        from tokenmill.model import load_model

        mc = check_draft_model(cfg.model, target_vocab, max_model_len, engine_config.allow_long_max_model_len,
                               engine_config.tokenizer or engine_config.model)
        self.model_config = mc
        # Vocabularies padded to different sizes (check_draft_model): the target's ids the draft
        # lacks are read as its last (padding) row; the draft's ids the target lacks are never drafted.
        self.max_input_id = mc.vocab_size - 1 if mc.vocab_size < target_vocab else None
        self.proposable = target_vocab if mc.vocab_size > target_vocab else None
        self.device, self.dtype = device, dtype
        backend_cls = get_attention_backend(engine_config.resolve_attention_backend(device))
        self.backend = backend_cls(mc.num_heads, mc.num_kv_heads, mc.head_dim, mc.head_dim**-0.5)
        self.model = load_model(mc, self.backend, device, dtype, max_positions=max_model_len,
                                quantization=engine_config.quantization,
                                prepack=engine_config.prepack_weights)
        self.kv_caches: list[torch.Tensor] = []
        self._kv_arena: torch.Tensor | None = None  # the CPU cache's mapping
        self.graphs = None  # its DecodeGraphs, made and dropped by the model runner with the model's
        self.staging = Staging(device)  # its passes' inputs (the runner's is in use by the step)

    def kv_bytes_per_block(self, block_size: int) -> int:
        mc = self.model_config
        return 2 * mc.num_layers * block_size * mc.num_kv_heads * mc.head_dim * (torch.finfo(self.dtype).bits // 8)

    def allocate(self, num_blocks: int, block_size: int) -> None:
        """The cache, with the target's block ids (num_blocks counts the graphs' spare block). On
        CPU one mapping, as the target's cache: release() gives its pages back and keeps it."""
        mc = self.model_config
        shape = (2, num_blocks, block_size, mc.num_kv_heads, mc.head_dim)
        self.kv_caches, self._kv_arena = kv_cache_tensors(mc.num_layers, shape, self.dtype, self.device)

    def release(self) -> None:
        """Frees the cache (a parked model): on CPU only its pages, which fault back in zeroed."""
        if self._kv_arena is not None:
            release_pages(self._kv_arena)
        else:
            self.kv_caches = []

    @torch.inference_mode()
    def propose(self, scheduled: list, block_size: int) -> None:
        """Fills seq.spec_token_ids[:num_spec] for every scheduled chunk with drafts. The passes
        chain on the device: each takes the previous one's argmax as its input ids, their inputs
        are staged (one asynchronous copy each), and the drafts reach the host once, at the end,
        so that on a GPU the host prepares a pass while the one before runs."""
        from tokenmill.engine.model_runner import build_batch

        chunks = []
        for s in scheduled:
            seq = s.seq
            end = s.start + s.num_new_tokens - s.num_spec
            first = min(seq.num_draft_computed, s.start)
            chunks.append((seq.token_ids[first:end], first, seq.block_table, s))
        chunks.sort(key=lambda c: len(c[0]) != 1)
        last_rows, spec, row = [], [], 0
        for ids, first, _table, s in chunks:
            row += len(ids)
            s.seq.num_draft_computed = first + len(ids)
            if s.num_spec:
                last_rows.append(row - 1)
                spec.append(s)
        ids, pos, meta = build_batch([c[:3] for c in chunks], block_size, self.device, self.staging, last_rows)
        if self.max_input_id is not None:
            ids = ids.clamp(max=self.max_input_id)
        hidden = self._forward(ids, pos, meta)
        if not spec:
            return
        tokens = self._argmax(hidden[meta.scratch["extra"]])
        passes = [(spec, tokens)]
        for j in range(1, max(s.num_spec for s in spec)):
            prev = passes[-1][0]
            keep = [i for i, s in enumerate(prev) if s.num_spec > j]
            active = [prev[i] for i in keep]
            # The draft d_j sits at position num_tokens - 1 + j (after the last token); its id is
            # on the device (the previous pass's argmax), the host list holds a stand-in.
            batch = [([0], s.seq.num_tokens - 1 + j, s.seq.block_table) for s in active]
            whole = len(keep) == len(prev)
            _, pos, meta = build_batch(batch, block_size, self.device, self.staging, None if whole else keep)
            ids = tokens if whole else tokens[meta.scratch["extra"]]
            hidden = self._forward(ids, pos, meta)
            tokens = self._argmax(hidden)
            passes.append((active, tokens))
            for s in active:
                s.seq.num_draft_computed += 1
        drafts = torch.cat([t for _, t in passes]).tolist()  # (the one wait)
        at = 0
        for active, _ in passes:
            for s, d in zip(active, drafts[at : at + len(active)]):
                if active is spec:
                    s.seq.spec_token_ids = [d]
                else:
                    s.seq.spec_token_ids.append(d)
            at += len(active)

    def _argmax(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.model.compute_logits(hidden)
        return (logits if self.proposable is None else logits[:, : self.proposable]).argmax(-1)

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, meta) -> torch.Tensor:
        """A decode-only pass through the draft model's graph of its size (launch-bound eagerly on
        a GPU: a small model's kernels last less than their launches), any other eagerly."""
        if self.graphs is not None:
            hidden = self.graphs.forward(ids, pos, meta)
            if hidden is not None:
                return hidden
        return self.model(ids, pos, self.kv_caches, meta)
