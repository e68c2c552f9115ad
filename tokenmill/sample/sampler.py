"""Batched sampling with per-row parameters: every request in a batch keeps its own settings.

Order, as in vLLM: min_tokens masking and penalties on the raw logits, then temperature,
min-p, top-k and top-p, then sampling. Sampling inverts each row's CDF at one uniform draw,
taken from the request's own generator when it has a seed, so a seeded request's tokens do
not depend on its batch neighbours. Logprobs are those of the raw model distribution (vLLM's
default).

Cost follows what is asked: greedy rows take an argmax; sampling is a softmax, a cumulative
sum and a binary search per row (no random number per vocabulary entry: drawing one
exponential per entry cost 1 ms a row for a 49K vocabulary); min-p, top-k and top-p look at
the top candidates only (a partial top-k, not a sort of the vocabulary), draw among them when
the row's kept tokens all lie there, and take the whole row only when they reach past them (a
nearly flat distribution): sorted on a CPU, drawn by sample/triton_sample.py's kernel on a GPU.
Min-p compares in log space (a logit below the row's largest plus log(min_p)), which is the
probability test without a softmax over the vocabulary.

The metadata is built from parameter columns (engine/input_batch.py's SamplingColumns): which
parameters a batch uses is decided on the host, so the sampler takes no device round trip to
find out, and only rows that need it (a seed, bans, biases, penalties, a grammar) are visited
in Python.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from tokenmill.engine.input_batch import (
    USES_FREQUENCY,
    USES_GREEDY,
    USES_LOGPROBS,
    USES_MIN_P,
    USES_PRESENCE,
    USES_REPETITION,
    USES_SPECIAL,
    USES_TOP_K,
    USES_TOP_P,
    SamplingColumns,
)
from tokenmill.engine.sequence import Sequence
from tokenmill.structured import apply_bitmask


@dataclass
class SamplingMetadata:
    temperature: torch.Tensor | None  # [B] float (None when all_greedy); rows with greedy[i] use argmax
    greedy: torch.Tensor | None  # [B] bool, None when no row (or every row) is greedy
    all_greedy: bool
    top_k: torch.Tensor | None  # [B] long, vocab size where disabled
    top_p: torch.Tensor | None  # [B] float
    min_p: torch.Tensor | None  # [B] float
    repetition_penalty: torch.Tensor | None  # [B] float
    presence_penalty: torch.Tensor | None
    frequency_penalty: torch.Tensor | None
    output_counts: torch.Tensor | None  # [B, V] float: how often each token was generated
    seen_mask: torch.Tensor | None  # [B, V] bool: token appears in prompt or output (repetition)
    generators: dict[int, torch.Generator]
    max_logprobs: int | None  # largest top-k of logprobs asked for in this batch, None if none
    # Per-row work as flat indices into the [B, V] logits (row * V + token), on the device:
    banned: torch.Tensor | None = None  # tokens of rows that may not end yet (min_tokens)
    bias_at: torch.Tensor | None = None  # logit_bias: where, and the values added (bias)
    bias: torch.Tensor | None = None
    forced_rows: torch.Tensor | None = None  # rows a reasoning budget allows one token (forced_at)
    forced_at: torch.Tensor | None = None
    # Structured outputs: allowed-token bitmasks (int32, 32 tokens a word) of the rows listed
    # (mask_index: mask_rows on the device, when staged)
    bitmask: torch.Tensor | None = None
    mask_rows: list[int] | None = None
    mask_index: torch.Tensor | None = None
    max_top_k: int | None = None  # the largest top_k of a row with one (known on the host), None: unknown
    top_p_alone: bool = True  # some row has top_p but no top_k (False only when known on the host)
    # Rows sampled with temperature alone in a batch that has top-k/top-p rows (known on the host);
    # None: found on the device
    plain_rows: torch.Tensor | None = None

    @classmethod
    def from_sequences(cls, seqs: list[Sequence], vocab_size: int, device: torch.device,
                       bitmask: torch.Tensor | None = None, mask_rows: list[int] | None = None) -> SamplingMetadata:
        return cls.from_columns(SamplingColumns.of(seqs), seqs, vocab_size, device, bitmask=bitmask,
                                mask_rows=mask_rows)

    @classmethod
    def from_columns(cls, cols: SamplingColumns, seqs: list[Sequence], vocab_size: int, device: torch.device,
                     stage: Callable[[list[np.ndarray]], list[torch.Tensor]] | None = None,
                     bitmask: torch.Tensor | None = None, mask_rows: list[int] | None = None) -> SamplingMetadata:
        """The metadata of rows whose parameters are `cols` (seqs: each row's sequence; bitmask: the
        grammar masks of rows mask_rows, on the host). Which parameters are in use is decided on the
        host from the columns' USES_* bits; everything the device needs, per-row work included
        (bans, biases, penalty counts, masks), reaches it in one copy (`stage`), so that building
        the metadata never waits for the device (a tensor made from a list is a copy that waits for
        the work queued before it, which under async scheduling is the forward in flight). Only rows
        marked special are visited one by one."""
        b = len(seqs)
        some = int(np.bitwise_or.reduce(cols.uses)) if b else 0
        every = int(np.bitwise_and.reduce(cols.uses)) if b else USES_GREEDY
        all_greedy = bool(every & USES_GREEDY)
        names: list[str] = []
        arrays: list[np.ndarray] = []

        def column(name: str, values: np.ndarray) -> None:
            names.append(name)
            arrays.append(values)

        def flat(rows: list[int] | np.ndarray, tokens: list[int] | np.ndarray) -> np.ndarray:
            return np.asarray(rows, np.int64) * vocab_size + np.asarray(tokens, np.int64)

        max_top_k = None
        top_k = cols.top_k
        if not all_greedy:
            column("temperature", cols.temperature)
            if some & USES_GREEDY:
                column("greedy", cols.greedy)
            if some & USES_TOP_K:
                top_k = np.where(top_k < vocab_size, top_k, 0)  # 0: none (a top_k past the vocabulary is none)
                if top_k.any():
                    column("top_k", np.where(top_k > 0, top_k, vocab_size))
                    max_top_k = int(top_k.max())
            if some & USES_TOP_P:
                column("top_p", cols.top_p)
            if some & USES_MIN_P:
                column("min_p", cols.min_p)
            if some & (USES_TOP_K | USES_TOP_P | USES_MIN_P):
                filtered = (top_k > 0) | ((cols.uses & (USES_TOP_P | USES_MIN_P)) != 0) | cols.greedy
                column("plain_rows", np.flatnonzero(~filtered).astype(np.int64))
        for bit, name in ((USES_REPETITION, "repetition_penalty"), (USES_PRESENCE, "presence_penalty"),
                          (USES_FREQUENCY, "frequency_penalty")):
            if some & bit:
                column(name, getattr(cols, name))
        if some & (USES_PRESENCE | USES_FREQUENCY):  # each row's output tokens, counted on the device
            rows = cols.rows_with(USES_PRESENCE | USES_FREQUENCY)
            outs = [seqs[i].output_token_ids for i in rows]
            column("counts_at", flat(np.repeat(rows, [len(o) for o in outs]),
                                     np.fromiter(chain.from_iterable(outs), np.int64)))
        if some & USES_REPETITION:  # every token of the row, prompt (converted once a request) and output
            rows = cols.rows_with(USES_REPETITION)
            parts = []
            for i in rows:
                s = seqs[i]
                req = s.request
                if req.prompt_array is None:
                    req.prompt_array = np.asarray(req.prompt_token_ids, np.int64)
                parts += [req.prompt_array[: s.num_prompt_tokens], np.asarray(s.output_token_ids, np.int64)]
            column("seen_at", flat(np.repeat(rows, [len(seqs[i].token_ids) for i in rows]), np.concatenate(parts)))

        masks = dict(zip(mask_rows, bitmask.numpy().view(np.uint32))) if bitmask is not None else {}
        gens: dict[int, torch.Generator] = {}
        ban_rows: list[int] = []
        ban_ids: list[int] = []
        bias_rows: list[int] = []
        bias_ids: list[int] = []
        bias_vals: list[float] = []
        forced_rows: list[int] = []
        forced_ids: list[int] = []
        for i in (cols.rows_with(USES_SPECIAL) if some & USES_SPECIAL else []):
            s = seqs[i]
            p = s.params
            banned: list[int] = []
            if s.num_output_tokens < p.min_tokens:
                ids = [t for t in (*p.stop_token_ids, *(() if p.ignore_eos else p._eos_token_ids)) if t < vocab_size]
                if ids and i in masks and not _allows_more(masks[i], ids):
                    ids = []  # the grammar's only way on is to end: it wins over min_tokens
                banned += ids
            if p._bad_words_token_ids:
                ids = _bad_word_ends(s, p._bad_words_token_ids)
                if ids and i in masks and not _allows_more(masks[i], banned + ids):
                    ids = []  # the grammar (or allowed_token_ids) allows nothing else: it wins
                banned += ids
            ban_rows += [i] * len(banned)
            ban_ids += banned
            if p.logit_bias:
                bias_rows += [i] * len(p.logit_bias)
                bias_ids += p.logit_bias
                bias_vals += p.logit_bias.values()
            if s.forced and s.forced[0] < vocab_size:
                forced_rows.append(i)
                forced_ids.append(s.forced[0])
            if s.generator is not None:
                gens[i] = s.generator
        if ban_rows:
            column("banned", flat(ban_rows, ban_ids))
        if bias_rows:
            column("bias_at", flat(bias_rows, bias_ids))
            column("bias", np.asarray(bias_vals, np.float32))
        if forced_rows:
            column("forced_rows", np.asarray(forced_rows, np.int64))
            column("forced_at", flat(forced_rows, forced_ids))
        if bitmask is not None:
            column("mask_index", np.asarray(mask_rows, np.int64))
            if device.type != "cpu":  # (a CPU reads the host's bitmask directly)
                column("bitmask", bitmask.numpy())

        if not arrays:
            tensors = []
        elif stage is None:
            tensors = [torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in arrays]
        else:
            tensors = stage(arrays)
        t = dict(zip(names, tensors))
        counts = seen = None
        if "counts_at" in t:
            at = t["counts_at"]
            counts = torch.zeros(b * vocab_size, dtype=torch.float32, device=device)
            counts = counts.index_add_(0, at, torch.ones(at.shape, device=device)).view(b, vocab_size)
        if "seen_at" in t:
            seen = torch.zeros(b * vocab_size, dtype=torch.bool, device=device)
            seen = seen.index_fill_(0, t["seen_at"], True).view(b, vocab_size)
        want = int(cols.logprobs.max()) if some & USES_LOGPROBS else -1
        return cls(
            temperature=t.get("temperature"),
            greedy=t.get("greedy"),
            all_greedy=all_greedy,
            top_k=t.get("top_k"),
            top_p=t.get("top_p"),
            min_p=t.get("min_p"),
            repetition_penalty=t.get("repetition_penalty"),
            presence_penalty=t.get("presence_penalty"),
            frequency_penalty=t.get("frequency_penalty"),
            output_counts=counts,
            seen_mask=seen,
            generators=gens,
            max_logprobs=want if want >= 0 else None,
            banned=t.get("banned"),
            bias_at=t.get("bias_at"),
            bias=t.get("bias"),
            forced_rows=t.get("forced_rows"),
            forced_at=t.get("forced_at"),
            bitmask=t.get("bitmask", bitmask),
            mask_rows=mask_rows if bitmask is not None else None,
            mask_index=t.get("mask_index"),
            max_top_k=max_top_k,
            top_p_alone=bool(some & USES_TOP_P) and bool((((cols.uses & USES_TOP_P) != 0) & (top_k == 0)).any()),
            plain_rows=t.get("plain_rows"),
        )


@dataclass
class SamplerOutput:
    token_ids: list[int]
    tokens: torch.Tensor | None = None  # the same, on the device
    # Present when some row asked for logprobs: the sampled token's logprob and rank,
    # and the top max_logprobs (ids, logprobs) of every row.
    sampled_logprobs: list[float] | None = None
    sampled_ranks: list[int] | None = None
    topk_ids: list[list[int]] | None = None
    topk_logprobs: list[list[float]] | None = None


def topk_logprobs(logprobs: torch.Tensor, k: int) -> tuple[list[list[int]], list[list[float]]]:
    if k == 0:
        return [[] for _ in range(logprobs.shape[0])], [[] for _ in range(logprobs.shape[0])]
    vals, ids = logprobs.topk(k, dim=-1)
    return ids.tolist(), vals.tolist()


def token_logprobs(logprobs: torch.Tensor, tokens: torch.Tensor) -> tuple[list[float], list[int]]:
    """Logprob of each row's chosen token and its rank (1 = most likely)."""
    chosen = logprobs.gather(1, tokens[:, None])
    ranks = (logprobs > chosen).sum(-1) + 1
    return chosen[:, 0].tolist(), ranks.tolist()


class Sampler:
    def __call__(self, logits: torch.Tensor, md: SamplingMetadata) -> SamplerOutput:
        logits = logits.float()
        raw_logprobs = torch.log_softmax(logits, dim=-1) if md.max_logprobs is not None else None
        tokens = self.tokens(logits, md)
        out = SamplerOutput(token_ids=tokens.tolist(), tokens=tokens)
        if raw_logprobs is not None:
            out.sampled_logprobs, out.sampled_ranks = token_logprobs(raw_logprobs, tokens)
            out.topk_ids, out.topk_logprobs = topk_logprobs(raw_logprobs, md.max_logprobs)
        return out

    def tokens(self, logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
        """The sampled token of every row, on the device (int64). With metadata built from columns,
        nothing here waits for the device on a GPU (rows whose kept tokens reach past the candidates
        go to triton_sample's kernel); a CPU finds such rows first."""
        logits = self._constrain(logits.float(), md)
        if md.all_greedy:
            return logits.argmax(dim=-1)
        tokens = self._sample(logits, md)
        if md.greedy is not None:
            tokens = torch.where(md.greedy, logits.argmax(dim=-1), tokens)
        return tokens

    def distribution(self, logits: torch.Tensor, md: SamplingMetadata) -> tuple[list[int], torch.Tensor | None]:
        """Each row's greedy token and, unless every row is greedy, the distribution sampling draws
        from (after temperature, min-p, top-k and top-p) as probabilities: what speculative
        decoding verifies drafts against."""
        logits = self._constrain(logits.float(), md)
        argmax = logits.argmax(dim=-1).tolist()
        if md.all_greedy:
            return argmax, None
        return argmax, torch.softmax(self._filter(logits, md), dim=-1)

    def _constrain(self, logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
        """Grammar masks, logit_bias, min_tokens bans, then penalties, on float32 logits (a copy
        when anything changes; a bias on a masked token leaves it -inf, so the order of the first
        two does not matter). Nothing here waits for the device."""
        if md.bitmask is not None:
            logits = apply_bitmask(logits, md.bitmask, md.mask_rows, md.mask_index)  # (a copy)
        elif md.bias_at is not None or md.banned is not None or md.forced_rows is not None:
            logits = logits.clone()
        if md.bias_at is not None:
            logits.view(-1).index_add_(0, md.bias_at, md.bias)
        if md.banned is not None:  # (rows whose grammar allows nothing else have none: from_columns)
            logits.view(-1).index_fill_(0, md.banned, float("-inf"))
        if md.forced_rows is not None:  # a reasoning budget closing its section: one token allowed
            logits.index_fill_(0, md.forced_rows, float("-inf"))  # (after bans: the closing tag wins over min_tokens)
            logits.view(-1).index_fill_(0, md.forced_at, 0.0)
        return self._apply_penalties(logits, md)

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
        if md.repetition_penalty is not None:
            # Hugging Face / vLLM definition: over prompt and output tokens, divide positive
            # logits by the penalty and multiply negative ones.
            pen = md.repetition_penalty[:, None]
            penalised = torch.where(logits > 0, logits / pen, logits * pen)
            logits = torch.where(md.seen_mask, penalised, logits)
        if md.frequency_penalty is not None:
            logits = logits - md.frequency_penalty[:, None] * md.output_counts
        if md.presence_penalty is not None:
            logits = logits - md.presence_penalty[:, None] * (md.output_counts > 0).float()
        return logits

    @staticmethod
    def _sample(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
        """A token for every row (greedy rows' are replaced by the caller). A row with min-p, top-k or
        top-p whose kept tokens all lie within a partial top-k of candidates (a small k, the nucleus
        or min-p floor of a peaked distribution: most rows) draws among the candidates alone, so
        temperature, the filters, the softmax and the CDF touch c entries rather than the
        vocabulary. The candidates are put in token-id order first, so that a draw picks the token
        the whole masked row would give (up to rounding): which path a row takes changes nothing,
        but for ties at the edge of a nucleus wider than the candidates, which the GPU kernel keeps
        all of (a sort, some)."""
        if md.top_k is None and md.top_p is None and md.min_p is None:
            return sample_rows(torch.softmax(Sampler._filter(logits, md), dim=-1), md.generators)
        u = draws(logits.shape[0], md.generators, logits.device)
        temp = md.temperature[:, None]
        kk, limited, pp, nucleus = _filter_rows(logits, md.top_k, md.top_p)
        vals, idx, covered = _candidates(logits, kk, limited, md.top_p, nucleus,
                                         -1 if md.top_k is None else md.max_top_k, temp, md.top_p_alone, md.min_p)
        idx, order = idx.sort(dim=-1)
        vals = vals.gather(1, order)
        tokens = idx.gather(1, sample_rows(torch.softmax(vals, dim=-1), u=u)[:, None])[:, 0]
        plain = ~limited & ~nucleus  # temperature alone: the whole row
        if md.min_p is not None:
            plain &= md.min_p <= 0
        wide = ~covered & ~plain  # a nucleus, a floor or a tie wider than the candidates: the whole row
        if md.greedy is not None:
            plain &= ~md.greedy
            wide &= ~md.greedy
        # Plain rows are known on the host when the metadata was built from columns. Which rows are
        # wide only the device knows: on a GPU a kernel draws them without asking (asking would make
        # the host wait for the step), elsewhere they are found and sorted.
        plain_rows = md.plain_rows if md.plain_rows is not None else plain.nonzero()[:, 0]
        on_gpu = (logits.is_cuda if WIDE_KERNEL is None else WIDE_KERNEL) and has_triton()
        if on_gpu:
            from tokenmill.sample.triton_sample import wide_sample_

            log_min_p = (torch.log(md.min_p) if md.min_p is not None
                         else torch.full_like(md.temperature, float("-inf")))
            wide_sample_(logits.contiguous(), md.temperature, kk, pp, log_min_p, wide, u, tokens)
        for rows, sort in ((plain_rows, False),) + (() if on_gpu else ((wide.nonzero()[:, 0], True),)):
            if rows.numel():
                sub = logits[rows] / temp[rows]
                if sort:
                    if md.min_p is not None:
                        sub = _min_p(sub, md.min_p[rows])
                    f = (limited | nucleus)[rows]  # (a floor alone needs no sort)
                    if bool(f.any()):
                        sub[f] = _top_k_top_p_sorted(sub[f], kk[rows][f], pp[rows][f])
                tokens.index_copy_(0, rows, sample_rows(torch.softmax(sub, dim=-1), u=u[rows]))
        return tokens

    @staticmethod
    def _filter(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
        logits = logits / md.temperature[:, None]
        if md.min_p is not None:
            logits = _min_p(logits, md.min_p)
        if md.top_k is not None or md.top_p is not None:
            logits = _top_k_top_p(logits, md.top_k, md.top_p)
        return logits


def _min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Masks the tokens less likely than min_p times the most likely one: in log space, those below
    the row's largest logit plus log(min_p) (-inf where min_p is 0: nothing masked)."""
    floor = logits.max(dim=-1, keepdim=True).values + torch.log(min_p)[:, None]
    return logits.masked_fill(logits < floor, float("-inf"))


def _bad_word_ends(seq: Sequence, words: tuple[tuple[int, ...], ...]) -> list[int]:
    """The last tokens of the bad words whose other tokens the output ends with (vLLM's rule: only
    output tokens count, the prompt's do not)."""
    tokens, n_out = seq.token_ids, seq.num_output_tokens
    ends = []
    for w in words:
        k = len(w) - 1
        if k <= n_out and (k == 0 or tuple(tokens[len(tokens) - k:]) == w[:-1]):
            ends.append(w[-1])
    return ends


def _allows_more(words: np.ndarray, ids: list[int]) -> bool:
    """Whether a grammar's bitmask row (uint32 words) allows a token besides ids."""
    words = words.copy()
    for t in ids:
        if t // 32 < len(words):
            words[t // 32] &= ~np.uint32(1 << (t % 32))
    return bool(words.any())


# Rows whose kept tokens reach past the candidates go to triton_sample's kernel: None, on CUDA
# (tests set True to run it interpreted on a CPU).
WIDE_KERNEL: bool | None = None


@functools.cache
def has_triton() -> bool:
    """Whether Triton is installed (triton_sample's kernel is then used on CUDA)."""
    return importlib.util.find_spec("triton") is not None


def draws(b: int, generators: dict[int, torch.Generator] | None, device: torch.device) -> torch.Tensor:
    """One uniform float64 draw per row [b, 1]; rows listed in generators draw from their own
    (one draw per sampled token, which is what skip_draws replays)."""
    u = torch.rand(b, 1, device=device, dtype=torch.float64)
    for row, gen in (generators or {}).items():
        u[row] = torch.rand(1, device=device, generator=gen, dtype=torch.float64)
    return u


def sample_rows(probs: torch.Tensor, generators: dict[int, torch.Generator] | None = None,
                block: int = 1024, u: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row of probs [B, V] (rows need not be normalized) by inverting the CDF at a
    uniform draw; rows listed in generators draw from their own generator.

    The CDF is summed in float64 (a float32 running sum over a large vocabulary stops growing
    for the smallest entries: with 152K tokens, 18K of them could never be drawn), two-level so
    that it stays cheap: float64 sums of blocks of `block` entries pick the block, then one
    block's running sum picks the token (well under 1 ms for 32 rows of 49K; a flat float64 cumsum
    takes 11).
    """
    b, vocab = probs.shape
    dev = probs.device
    if u is None:  # (tests pass their own draws)
        u = draws(b, generators, dev)
    pad = (-vocab) % block
    blocks = (torch.nn.functional.pad(probs, (0, pad)) if pad else probs).reshape(b, -1, block)
    nb = blocks.shape[1]
    csum = blocks.sum(dim=-1).double().cumsum(dim=-1)  # float32 block sums pick the block
    x = u * csum[:, -1:]
    bi = torch.searchsorted(csum, x, right=True).clamp_(max=nb - 1)
    before = torch.where(bi > 0, csum.gather(1, (bi - 1).clamp(min=0)), torch.zeros_like(x))
    within = blocks[torch.arange(b, device=dev), bi[:, 0]].cumsum(dim=-1, dtype=torch.float64)
    # Where x falls within the block's float32 sum, mapped onto its float64 running sum: the two
    # differ by rounding, which must not all land on the block's last entry.
    xin = (x - before) / (csum.gather(1, bi) - before) * within[:, -1:]
    j = torch.searchsorted(within, xin, right=True).clamp_(max=block - 1)
    idx = (bi * block + j)[:, 0].clamp_(max=vocab - 1)
    # Rounding can land on a zero-probability entry at the very end: take the row's mode instead.
    zero = probs.gather(1, idx[:, None])[:, 0] <= 0
    if probs.device.type != "cpu" or bool(zero.any()):  # (on a GPU without asking it: the host would wait)
        idx = torch.where(zero, probs.argmax(dim=-1), idx)
    return idx


# Top-k/top-p first look at this many candidates per row (more when a row's top_k is larger).
_CANDIDATES = 256


def _filter_rows(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's top_k (the vocabulary size where none) and whether it limits, its top_p (1 where
    none) and whether it forms a nucleus."""
    b, vocab = logits.shape
    kk = top_k if top_k is not None else torch.full((b,), vocab, device=logits.device)
    pp = top_p if top_p is not None else torch.ones(b, device=logits.device)
    return kk, kk < vocab, pp, pp < 1.0


def _candidates(logits: torch.Tensor, kk: torch.Tensor, limited: torch.Tensor, top_p: torch.Tensor | None,
                nucleus: torch.Tensor, max_top_k: int | None = None, temp: torch.Tensor | None = None,
                top_p_alone: bool = True, min_p: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's top candidates (values descending, divided by temp when given; their token ids)
    masked to its min_p (when given), then to its top_k (ties with the k-th kept) and then to its
    top_p nucleus, and whether the row's kept tokens all lie among them (covered). max_top_k (-1: no
    row has one), when the host knows it, saves a device sync; top_p_alone=False says no row has
    top_p without top_k (no whole-row logsumexp)."""
    vocab = logits.shape[1]
    if max_top_k is None:
        max_top_k = int(kk[limited].max()) if bool(limited.any()) else -1
    c = min(vocab, max(_CANDIDATES, max_top_k + 1))
    vals, idx = logits.topk(c, dim=-1)  # descending; a temperature keeps the order
    if temp is not None:
        vals = vals / temp
    cut = torch.zeros_like(limited)
    floor = None
    if min_p is not None:
        # A min-p row is done within the candidates when the last of them is already below its floor.
        floor = vals[:, :1] + torch.log(min_p)[:, None]
        cut = (min_p > 0) & ((vals[:, -1] < floor[:, 0]) | (c == vocab))
        vals = vals.masked_fill(vals < floor, float("-inf"))
    kth = vals.gather(1, (kk.clamp(max=c) - 1)[:, None])
    vals = torch.where(limited[:, None] & (vals < kth), float("-inf"), vals)
    # A top-k row is done within the candidates unless its k-th value ties past them.
    # (a k-th value of -inf, a grammar allowing fewer than k tokens: every allowed one is a candidate)
    covered = limited & ((kth[:, 0] > vals[:, -1]) | torch.isneginf(kth[:, 0]) | (c == vocab))
    if top_p is not None:
        # Probabilities within the top-k when a row has one, else over the whole vocabulary (above
        # the row's min-p floor).
        lse = vals.logsumexp(dim=-1)
        if top_p_alone:
            full = logits if temp is None else logits / temp
            if floor is not None:
                full = full.masked_fill(full < floor, float("-inf"))
            lse = torch.where(limited, lse, full.logsumexp(dim=-1))
        probs = (vals - lse[:, None]).exp()
        before = probs.cumsum(dim=-1) - probs  # mass of the more likely candidates
        vals = vals.masked_fill(nucleus[:, None] & (before >= top_p[:, None]), float("-inf"))
        # A row without top-k is done when the nucleus ends within the candidates.
        covered |= ~limited & nucleus & (probs.sum(dim=-1) >= top_p)
    return vals, idx, covered | cut


def _top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """Masks all but each row's top_k logits (ties with the k-th kept), then all but the smallest
    set of most likely tokens whose probability reaches top_p (within the top_k when both are
    set). Rows whose answer lies within a partial top-k of candidates are done there; the rest
    (a nucleus or a tie wider than the candidates) sort the whole row."""
    kk, limited, pp, nucleus = _filter_rows(logits, top_k, top_p)
    unfiltered = ~limited & ~nucleus
    if bool(unfiltered.all()):
        return logits
    vals, idx, covered = _candidates(logits, kk, limited, top_p, nucleus, -1 if top_k is None else None)
    out = torch.full_like(logits, float("-inf")).scatter_(1, idx, vals)
    out = torch.where(unfiltered[:, None], logits, out)
    rest = (~covered & ~unfiltered).nonzero()[:, 0]
    if rest.numel():
        out[rest] = _top_k_top_p_sorted(logits[rest], kk[rest], pp[rest])
    return out


def _top_k_top_p_sorted(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The same by sorting whole rows: for nuclei or ties wider than the candidates, which only
    nearly flat rows have."""
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    vocab = logits.shape[-1]
    # Keep the k largest (and ties): in ascending order they sit at positions >= vocab - k.
    kth = sorted_logits.gather(1, (vocab - top_k.clamp(max=vocab))[:, None])
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    drop = (cum <= (1 - top_p[:, None])) & (top_p[:, None] < 1.0)
    drop[:, -1] = False  # always keep the most likely token
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
