"""Beam search, step for step as transformers' `generate(num_beams=w)` does it.

A beam-search request runs its n = w sequences ("slots") in lockstep on shared KV. Each step
every slot computes its next-token log-probabilities and, instead of sampling, hands the top
candidates to `BeamSearch.select`, which picks the w best continuations over all slots.
The engine then re-seats them: a slot whose beam has one continuation appends the token in
place; a beam with several continuations is forked onto slots whose beams have none
(`BlockManager.fork`: the blocks are shared and a partly filled last block is copied on
write), so the prompt and every common prefix stay in the cache once.

The rules are transformers' (generation/utils.py `_beam_search`, 4.5x/5.x), reproduced so that
the same weights give the same tokens:
- scores are float32 sums of log_softmax of the raw logits (no temperature or penalties);
- at the first step only beam 0 counts (the others start at -1e9);
- each step keeps the top max(2, 1 + number of stop tokens) * w candidates; those ending in a
  stop token (or reaching max_tokens) among the top w become finished hypotheses scored
  sum / generated_length ** length_penalty; the best w others run on;
- the search ends when the best running beam can no longer beat the worst of w finished
  hypotheses (the `early_stopping` heuristics False / True / "never"), or every candidate hit a
  stop. The result is the w best finished hypotheses, best first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tokenmill.outputs import Logprob, PositionLogprobs

_NEG = -1.0e9  # transformers' "impossible" score


@dataclass
class Hypothesis:
    tokens: list[int]  # output tokens, ending with the stop token when one ended it
    score: float  # cumulative_logprob / len(tokens) ** length_penalty
    cumulative_logprob: float
    logprobs: list[PositionLogprobs] | None
    stopped: bool  # ended by a stop token (else by the length limit)


@dataclass
class Continuation:
    slot: int  # where the beam runs next
    parent: int  # the slot whose beam it extends
    token: int
    entry: PositionLogprobs | None  # the token's logprobs entry, when the request asked for logprobs


# (output tokens, logprob entries or None, cumulative logprob) of the beam in a slot
History = Callable[[int], tuple[list[int], list[PositionLogprobs] | None, float]]


class BeamSearch:
    def __init__(self, width: int, length_penalty: float = 1.0, early_stopping: bool | str = False,
                 stop_ids: tuple[int, ...] = (), max_new_tokens: int = 16, min_tokens: int = 0,
                 num_logprobs: int | None = None) -> None:
        self.width = width
        self.length_penalty = float(length_penalty)
        self.early_stopping = early_stopping
        self.stop_ids = frozenset(stop_ids)
        self.max_new_tokens = max_new_tokens
        self.min_tokens = min_tokens
        self.num_logprobs = num_logprobs
        self.keep = max(2, 1 + len(self.stop_ids)) * width  # candidates kept per step
        # Each slot's row of candidates: enough to keep `keep` after dropping banned stop tokens.
        self.num_candidates = max(self.keep + len(self.stop_ids), num_logprobs or 0)
        self.scores = torch.full((width,), _NEG, dtype=torch.float32)  # running beams, by slot
        self.scores[0] = 0.0
        self.finished: list[Hypothesis] = []  # best first, at most width
        self.improvable = True  # transformers' is_early_stop_heuristic_unsatisfied
        self.generated = 0  # tokens in every running beam
        self.done = False

    def select(self, rows: list[tuple[list[int], list[float]]], history: History,
               at_limit: bool = False) -> list[Continuation]:
        """One step. rows[slot]: that beam's candidate token ids and log-probabilities, best first
        (at least `num_candidates` where the vocabulary allows). at_limit: this token is the last
        one the context allows. Returns where each running beam goes next (empty once done)."""
        w, keep = self.width, self.keep
        banned = self.stop_ids if self.generated < self.min_tokens else frozenset()
        ids = torch.full((w, keep), -1, dtype=torch.long)
        vals = torch.full((w, keep), float("-inf"), dtype=torch.float32)
        ranks: list[dict[int, int]] = []

        def entry(parent: int, token: int) -> PositionLogprobs | None:
            return self._entry(rows[parent], ranks[parent], token)

        def finish(j: int) -> None:  # candidate j becomes a finished hypothesis
            out, entries, _ = history(parents[j])
            self.finished.append(Hypothesis(out + [tokens[j]], float(norm[j]), float(top_vals[j]),
                                            None if entries is None else entries + [entry(parents[j], tokens[j])],
                                            tokens[j] in self.stop_ids))

        for slot, (row_ids, row_vals) in enumerate(rows):
            kept = [(t, v) for t, v in zip(row_ids, row_vals) if t not in banned][:keep]
            if kept:
                ids[slot, : len(kept)] = torch.tensor([t for t, _ in kept])
                vals[slot, : len(kept)] = torch.tensor([v for _, v in kept], dtype=torch.float32)
            ranks.append({t: r for r, t in enumerate(row_ids, 1)})
        acc = (vals + self.scores[:, None]).flatten()
        top_vals, top_idx = acc.topk(keep)
        parents = (top_idx // keep).tolist()
        tokens = ids.flatten()[top_idx].tolist()
        last = at_limit or self.generated + 1 >= self.max_new_tokens
        hit = torch.tensor([last or t in self.stop_ids or t < 0 for t in tokens])

        # Finished hypotheses: stopping candidates among the top w, unless the search is settled.
        gen_len = self.generated + 1
        norm = top_vals / (gen_len**self.length_penalty)
        full = len(self.finished) == w
        added: set[int] = set()
        if self.improvable and not (full and self.early_stopping is True):
            added = {j for j in range(w) if hit[j] and tokens[j] >= 0 and float(top_vals[j]) > _NEG / 2}
        # Running beams: the best w candidates that did not stop.
        running = top_vals + hit.to(torch.float32) * _NEG
        order = running.topk(w).indices.tolist()
        self.generated += 1
        best = float(running[order[0]])
        for j in sorted(added):
            finish(j)
        self.finished.sort(key=lambda h: -h.score)  # stable: earlier hypotheses win ties
        del self.finished[w:]
        self._update_improvable(best)
        self.done = (not self.improvable or (len(self.finished) == w and self.early_stopping is True)
                     or bool(hit.all()))
        if self.done:
            # Fewer than w finished hypotheses only in degenerate searches: the best candidates fill in.
            for j in order + list(range(keep)):
                if len(self.finished) >= w:
                    break
                if j not in added and tokens[j] >= 0 and float(top_vals[j]) > _NEG / 2:
                    added.add(j)
                    finish(j)
            self.finished.sort(key=lambda h: -h.score)
            return []
        conts = self._seat([(parents[j], tokens[j]) for j in order])
        self.scores = torch.empty(w, dtype=torch.float32)
        for c, j in zip(conts, order):
            self.scores[c.slot] = running[j]
            c.entry = entry(c.parent, c.token)
        return conts

    def _update_improvable(self, best_running: float) -> None:
        """transformers' _check_early_stop_heuristic: can the best running beam still beat the worst
        of w finished hypotheses? (Sticky: once no, the search ends.)"""
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            length = self.max_new_tokens
        else:
            length = self.generated
        best = torch.tensor(best_running, dtype=torch.float32) / (length**self.length_penalty)
        worst = min(h.score for h in self.finished) if len(self.finished) == self.width else _NEG
        self.improvable = self.improvable and float(best) > worst

    def _seat(self, beams: list[tuple[int, int]]) -> list[Continuation]:
        """Slots for the new beams: a parent's first continuation stays in the parent's slot, the
        others take slots whose beams ended (so only those are forked)."""
        taken: set[int] = set()
        conts: list[Continuation | None] = [None] * len(beams)
        for i, (parent, token) in enumerate(beams):
            if parent not in taken:
                taken.add(parent)
                conts[i] = Continuation(parent, parent, token, None)
        free = [s for s in range(self.width) if s not in taken]
        for i, (parent, token) in enumerate(beams):
            if conts[i] is None:
                conts[i] = Continuation(free.pop(0), parent, token, None)
        return [c for c in conts if c is not None]

    def _entry(self, row: tuple[list[int], list[float]], ranks: dict[int, int], token: int) -> PositionLogprobs | None:
        k = self.num_logprobs
        if k is None:
            return None
        ids, vals = row
        entry = {t: Logprob(v, r) for r, (t, v) in enumerate(zip(ids[:k], vals[:k]), 1)}
        entry[token] = Logprob(vals[ranks[token] - 1], ranks[token])
        return entry
