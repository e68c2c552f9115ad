"""Test-time compute as one request: many reasoning paths over one prompt, voted on or scored,
stopped early once the outcome is settled, within a hard token budget.

This module is the strategy's logic with no engine in it (`TTCRun`, a state machine fed each
path's progress; it answers which paths to launch and which to stop), so its rules are tested on
synthetic paths. `tokenmill.llm.LLM.generate(..., test_time_compute=...)` drives it over the
engine; every path is one of the engine's samples of the same prompt, so the prompt's KV is
computed once and shared (sample forks within a launch, the prefix cache across launches).

Strategies
- self_consistency: paths sampled; each finished path's answer is taken by `answer_pattern`
  (its first group, else the match; the last match in the text) or else its last non-empty
  line; the majority wins, ties broken by the answers' mean token logprob.
- best_of_n: paths scored by their mean token logprob (or a `scorer`, e.g. a reward or verifier
  model served beside this one: any callable (prompt text, path text) -> float); the best wins.
- beam_search: n beams in one engine request (engine/beam.py: transformers' beam search on
  forked KV blocks), scored by cumulative logprob / length ** length_penalty; the best wins.

Early stopping (early_stop=True), from self-consistency with confidence (DeepConf, Fu et al. 2025):
- paths launch a few at a time (`wave` in flight), so unlaunched paths can be saved;
- once the vote can no longer change (the leader's count exceeds the runner-up's plus every
  path that could still vote), nothing more is launched and running paths stop;
- with `consensus` set (DeepConf's adaptive sampling, e.g. 0.95), likewise once `warmup` paths
  have voted and the leading answer holds at least that share of the votes: not a proof that
  the vote can no longer change but a bet that it will not, which saves far more;
- a path's confidence is the lowest mean token logprob over a sliding window of `window`
  tokens; once `warmup` paths have finished, a path whose running confidence falls below the
  `prune_percentile` percentile of theirs is pruned (it stops and does not vote).

Budget: max_total_tokens counts the prompt once plus every path's output. It is hard: each path
launches with max_tokens no larger than its share of what is left, so the sum of what paths may
generate never exceeds it; a path that finishes early leaves its unused share to later ones.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import regex  # the `re` syntax with a match timeout: answer_pattern comes from clients

from tokenmill.sampling_params import SamplingParams
from tokenmill.stats import percentile

STRATEGIES = ("self_consistency", "best_of_n", "beam_search")
MAX_PATHS = 64  # paths per request: each is a sequence with its own KV


@dataclass
class TTCParams:
    strategy: str = "self_consistency"
    n: int = 8
    answer_pattern: str | None = None
    max_total_tokens: int | None = None  # the prompt once plus every path's output
    early_stop: bool = False
    wave: int | None = None  # paths in flight at once with early_stop (default: n // 4, at least 2)
    warmup: int | None = None  # finished paths that set the pruning threshold (default: wave, at least 4)
    prune_percentile: float | None = 10.0  # None: no pruning
    window: int = 16  # tokens per window of a path's confidence
    consensus: float | None = None  # early_stop: also stop once the leader holds this share of >= warmup votes
    length_penalty: float = 1.0  # beam_search only
    scorer: Callable[[str, str], float] | None = field(default=None, repr=False)  # best_of_n only

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TTCParams:
        """ValueError naming the field at fault (as test_time_compute.<field>)."""
        if not isinstance(d, dict):
            raise ValueError("test_time_compute: must be an object")
        known = {f for f in cls.__dataclass_fields__ if f != "scorer"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"test_time_compute.{unknown[0]}: unknown field (known: {', '.join(sorted(known))})")
        return cls(**d)

    def validate(self, max_paths: int = MAX_PATHS) -> None:
        def bad(f: str, msg: str) -> ValueError:
            return ValueError(f"test_time_compute.{f}: {msg}")

        if self.strategy not in STRATEGIES:
            raise bad("strategy", f"must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if not isinstance(self.n, int) or isinstance(self.n, bool) or not 1 <= self.n <= max_paths:
            raise bad("n", f"must be an integer in [1, {max_paths}], got {self.n!r}")
        if self.answer_pattern is not None:
            if not isinstance(self.answer_pattern, str):
                raise bad("answer_pattern", "must be a regular expression (a string)")
            try:
                regex.compile(self.answer_pattern)
            except (regex.error, ValueError) as e:
                raise bad("answer_pattern", f"invalid regular expression: {e}") from None
        if self.max_total_tokens is not None and (
                not isinstance(self.max_total_tokens, int) or isinstance(self.max_total_tokens, bool)
                or self.max_total_tokens < 1):
            raise bad("max_total_tokens", f"must be a positive integer, got {self.max_total_tokens!r}")
        if not isinstance(self.early_stop, bool):
            raise bad("early_stop", "must be a boolean")
        for f in ("wave", "warmup"):
            v = getattr(self, f)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= self.n):
                raise bad(f, f"must be an integer in [1, n={self.n}], got {v!r}")
        if self.prune_percentile is not None and (
                not isinstance(self.prune_percentile, (int, float)) or isinstance(self.prune_percentile, bool)
                or not 0 <= self.prune_percentile <= 100):
            raise bad("prune_percentile", f"must be a number in [0, 100] or null, got {self.prune_percentile!r}")
        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 1:
            raise bad("window", f"must be a positive integer, got {self.window!r}")
        if self.consensus is not None:
            if (not isinstance(self.consensus, (int, float)) or isinstance(self.consensus, bool)
                    or not 0.5 < self.consensus <= 1):
                raise bad("consensus", f"must be a number in (0.5, 1] or null, got {self.consensus!r}")
            if not self.early_stop:
                raise bad("consensus", "needs early_stop: true")
        if (not isinstance(self.length_penalty, (int, float)) or isinstance(self.length_penalty, bool)
                or not -10 <= self.length_penalty <= 10):
            raise bad("length_penalty", f"must be a number in [-10, 10], got {self.length_penalty!r}")
        if self.strategy == "beam_search" and self.early_stop:
            raise bad("early_stop", "beam_search stops by its own rule (the beams' scores); "
                      "early_stop is for self_consistency and best_of_n")

    def check_budget(self, prompt_tokens: int) -> None:
        """A budget that cannot fit the prompt and one token of one path is refused."""
        if self.max_total_tokens is not None and self.max_total_tokens < prompt_tokens + 1:
            raise ValueError(f"test_time_compute.max_total_tokens: {self.max_total_tokens} cannot hold the "
                             f"prompt ({prompt_tokens} tokens) and one generated token")

    @property
    def wave_size(self) -> int:
        if not self.early_stop:
            return self.n
        return self.wave or min(self.n, max(2, self.n // 4))

    @property
    def warmup_size(self) -> int:
        """Finished paths that set the pruning threshold: a percentile of fewer is mostly noise."""
        return self.warmup or min(self.n, max(4, self.wave_size))


# -- the rules, on plain values ----------------------------------------------------------------
ANSWER_TIMEOUT_S = 0.1  # a pattern that backtracks longer than this on one path finds no answer


def extract_answer(text: str, pattern: str | None) -> str | None:
    """The answer a path gives: the last match of pattern (its first group when it has one and
    it took part in the match), or the last non-empty line; None when there is none."""
    if pattern is not None:
        last = None
        try:
            for m in regex.finditer(pattern, text, timeout=ANSWER_TIMEOUT_S):
                last = m
        except TimeoutError:
            return None
        if last is None:
            return None
        g = last.group(1) if last.re.groups else None
        return (g if g is not None else last.group(0)).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else None


def mean_logprob(logprobs: list[float]) -> float:
    return sum(logprobs) / len(logprobs) if logprobs else -math.inf


def vote(answers: list[tuple[str, float]]) -> tuple[str | None, dict[str, int]]:
    """(winner, votes per answer) for paths' (answer, mean token logprob); ties are broken by the
    higher mean of the tied answers' paths' mean logprobs."""
    counts: dict[str, int] = {}
    scores: dict[str, list[float]] = {}
    for a, lp in answers:
        counts[a] = counts.get(a, 0) + 1
        scores.setdefault(a, []).append(lp)
    if not counts:
        return None, counts
    best = max(counts.values())
    tied = [a for a, c in counts.items() if c == best]
    winner = max(tied, key=lambda a: sum(scores[a]) / len(scores[a]))
    return winner, dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def vote_settled(counts: dict[str, int], undecided: int) -> bool:
    """Whether the leader stays the leader whatever the `undecided` paths still to vote say."""
    top = sorted(counts.values(), reverse=True) + [0, 0]
    return top[0] > top[1] + undecided


def lowest_window_mean(logprobs: list[float], window: int) -> float | None:
    """A path's confidence: the lowest mean logprob over any `window` consecutive tokens (over all
    of them when it is shorter); None for no tokens."""
    if not logprobs:
        return None
    if len(logprobs) <= window:
        return sum(logprobs) / len(logprobs)
    s = sum(logprobs[:window])
    low = s
    for i in range(window, len(logprobs)):
        s += logprobs[i] - logprobs[i - window]
        low = min(low, s)
    return low / window


@dataclass
class WindowLow:
    """lowest_window_mean kept as tokens arrive: the running sum of the last `window` logprobs and
    the lowest full window's mean so far (None before the first full window)."""

    window: int
    low: float | None = None
    _sum: float = 0.0

    def add(self, logprobs: list[float]) -> None:
        """Takes in logprobs[-1], just appended to the list it follows."""
        w = self.window
        self._sum += logprobs[-1]
        if len(logprobs) > w:
            self._sum -= logprobs[-w - 1]
        if len(logprobs) >= w:
            mean = self._sum / w
            self.low = mean if self.low is None else min(self.low, mean)


# -- one request's run -------------------------------------------------------------------------
@dataclass
class Path:
    id: int
    max_tokens: int
    lows: WindowLow  # its running confidence
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # the sampled tokens'
    state: str = "running"  # running | finished | pruned | stopped
    closed: bool = False  # the engine reported its end (a stopped path may run a little longer)
    finish_reason: str | None = None
    answer: str | None = None
    score: float | None = None

    @property
    def low(self) -> float | None:
        """The lowest full window's mean logprob so far."""
        return self.lows.low

    @property
    def tokens(self) -> int:
        return len(self.logprobs)

    def confidence(self, window: int) -> float | None:
        if self.tokens < window:
            return None if self.state == "running" else lowest_window_mean(self.logprobs, window)
        return self.low


@dataclass
class Launch:
    """Paths to start now, as one engine request with n = len(path_ids)."""

    path_ids: list[int]
    max_tokens: int


class TTCRun:
    """One request's strategy, fed each path's progress (observe), asked what to start (launch)
    and what to stop (stops). Finished when done is true; result() then gives the outcome."""

    def __init__(self, params: TTCParams, prompt: str, prompt_tokens: int, max_tokens: int | None,
                 max_model_len: int | None = None) -> None:
        """max_tokens: each path's own limit (None: up to max_model_len)."""
        params.validate()
        params.check_budget(prompt_tokens)
        self.p = params
        self.prompt = prompt
        self.prompt_tokens = prompt_tokens
        limits = [x for x in (max_tokens, None if max_model_len is None else max_model_len - prompt_tokens)
                  if x is not None]
        if not limits or min(limits) < 1:
            raise ValueError("max_tokens: a path needs a positive max_tokens or room left in the context")
        self.max_tokens = min(limits)
        self.paths: list[Path] = []
        self.threshold: float | None = None
        self.settled = False
        self.settled_by: str | None = None  # "vote" (it can no longer change) or "consensus"
        self.launches = 0  # engine requests made (each path of one shares its prompt's prefill)
        self.t0 = time.time()

    # -- what to do next
    @property
    def budget(self) -> int | None:
        """Tokens the paths may generate in all."""
        return None if self.p.max_total_tokens is None else self.p.max_total_tokens - self.prompt_tokens

    def seed(self, seed: int | None, launch: Launch) -> int | None:
        """A launch's seed: the engine seeds sample i with seed + i, so paths get seed + path id."""
        return None if seed is None else (seed + launch.path_ids[0]) % 2**64

    def launch(self) -> Launch | None:
        """Paths to start now, or None."""
        if self.settled:
            return None
        running = sum(p.state == "running" for p in self.paths)
        k = min(self.p.wave_size - running, self.p.n - len(self.paths))
        if k <= 0:
            return None
        cap = self.max_tokens
        if self.budget is not None:
            # Reserved: what unclosed paths may still generate (a stopped one runs until its abort
            # lands); the rest is shared by every path to come.
            spent = sum(p.tokens if p.closed else p.max_tokens for p in self.paths)
            share = (self.budget - spent) // (self.p.n - len(self.paths))
            if share < 1:
                k = min(k, self.budget - spent)  # one token each for as many as it can hold
                share = 1
            cap = min(cap, share)
            if k <= 0:
                return None
        ids = list(range(len(self.paths), len(self.paths) + k))
        self.paths += [Path(i, cap, WindowLow(self.p.window)) for i in ids]
        self.launches += 1
        return Launch(ids, cap)

    def stops(self) -> list[int]:
        """Running paths to stop now: pruned, or all of them once the vote is settled. Asked after
        each step's progress has been observed (so paths that finished in it all count)."""
        if not self.p.early_stop:
            return []
        out = []
        running = [p for p in self.paths if p.state == "running"]
        if self.threshold is not None:
            for p in running:
                if p.low is not None and p.low < self.threshold:
                    p.state = "pruned"
                    out.append(p.id)
        if self.p.strategy == "self_consistency" and not self.settled:
            counts = self.votes()
            undecided = sum(p.state == "running" for p in self.paths) + self.p.n - len(self.paths)
            rule = ("vote" if counts and vote_settled(counts, undecided)
                    else "consensus" if counts and self._consensus(counts) else None)
            if rule is not None:
                self.settled, self.settled_by = True, rule
                for p in self.paths:
                    if p.state == "running":
                        p.state = "stopped"
                        out.append(p.id)
        return out

    def _consensus(self, counts: dict[str, int]) -> bool:
        voted = sum(counts.values())
        return (self.p.consensus is not None and voted >= self.p.warmup_size
                and max(counts.values()) >= self.p.consensus * voted)

    @property
    def done(self) -> bool:
        if not all(p.closed for p in self.paths):
            return False
        return self.settled or len(self.paths) >= self.p.n or self._budget_spent()

    def _budget_spent(self) -> bool:
        return self.budget is not None and sum(p.tokens for p in self.paths) >= self.budget

    # -- what happened
    def observe(self, path_id: int, text: str, token_ids: list[int], new_logprobs: list[float],
                finish_reason: str | None) -> None:
        """A path's text and tokens so far, the logprobs of its tokens since the last call, and
        its finish reason once it has finished."""
        path = self.paths[path_id]
        if path.closed:
            return
        if path.state != "running":  # stopped here, still running in the engine: its tokens count
            path.logprobs += new_logprobs
            path.closed = finish_reason is not None
            return
        path.text, path.token_ids = text, token_ids
        for lp in new_logprobs:
            path.logprobs.append(lp)
            path.lows.add(path.logprobs)
        if finish_reason is not None:
            path.finish_reason, path.closed = finish_reason, True
            path.state = "finished" if finish_reason != "abort" else "stopped"
            if path.state == "finished":
                self._finished(path)

    def observe_output(self, path_id: int, c: Any) -> None:
        """observe() from an engine CompletionOutput of the path (a full snapshot, with the sampled
        tokens' logprobs): the logprobs past those the path already holds are new."""
        k = self.paths[path_id].tokens
        new = [e[t].logprob for e, t in zip((c.logprobs or [])[k:], c.token_ids[k:])]
        self.observe(path_id, c.text, c.token_ids, new, c.finish_reason)

    def _finished(self, path: Path) -> None:
        if self.p.strategy == "self_consistency" or self.p.answer_pattern is not None:
            # A path cut by max_tokens did not reach its answer: it does not vote.
            path.answer = extract_answer(path.text, self.p.answer_pattern) if path.finish_reason == "stop" else None
        if self.p.strategy == "best_of_n":
            path.score = (self.p.scorer(self.prompt, path.text) if self.p.scorer is not None
                          else mean_logprob(path.logprobs))
        elif self.p.strategy == "beam_search" and path.logprobs:
            path.score = sum(path.logprobs) / len(path.logprobs) ** self.p.length_penalty
        if self.p.early_stop and self.p.prune_percentile is not None and self.threshold is None:
            warm = self.p.warmup_size
            conf = [c for p in self.paths if p.state == "finished" and (c := p.confidence(self.p.window)) is not None]
            if len(conf) >= warm:
                self.threshold = percentile(conf, self.p.prune_percentile)

    def votes(self) -> dict[str, int]:
        return vote([(p.answer, mean_logprob(p.logprobs)) for p in self.paths
                     if p.state == "finished" and p.answer is not None])[1]

    # -- the outcome
    def winner(self) -> Path | None:
        done = [p for p in self.paths if p.state == "finished"]
        if self.p.strategy == "beam_search":  # the engine returns the beams best first
            return min(done, key=lambda p: p.id) if done else None
        if self.p.strategy == "best_of_n":
            # Paths that ended by themselves first: one cut by max_tokens is unfinished work.
            scored = ([p for p in done if p.score is not None and p.finish_reason == "stop"]
                      or [p for p in done if p.score is not None])
            return max(scored, key=lambda p: p.score) if scored else None
        answer, _ = vote([(p.answer, mean_logprob(p.logprobs)) for p in done if p.answer is not None])
        if answer is None:  # no path gave an answer: the most likely finished path
            return max(done, key=lambda p: mean_logprob(p.logprobs)) if done else None
        return max((p for p in done if p.answer == answer), key=lambda p: mean_logprob(p.logprobs))

    def result(self) -> dict[str, Any]:
        win = self.winner()
        votes = self.votes()
        voted = sum(votes.values())
        finished = [p for p in self.paths if p.state == "finished"]
        generated = sum(p.tokens for p in self.paths)
        mean_len = sum(p.tokens for p in finished) / len(finished) if finished else 0.0
        saved = (self.p.n - len(self.paths)) * mean_len + sum(
            max(0.0, mean_len - p.tokens) for p in self.paths if p.state in ("pruned", "stopped"))
        out: dict[str, Any] = {
            "strategy": self.p.strategy,
            "paths_started": len(self.paths),
            "launches": self.launches,
            "paths_finished": len(finished),
            "paths_stopped_early": sum(p.state == "stopped" for p in self.paths),
            "paths_pruned": sum(p.state == "pruned" for p in self.paths),
            "answer": win.answer if win is not None else None,
            "winner_path": win.id if win is not None else None,
            "tokens": {"prompt": self.prompt_tokens, "generated": generated,
                       "total": self.prompt_tokens + generated},
            "tokens_saved_estimate": round(saved),
            "wall_time_s": round(time.time() - self.t0, 4),
        }
        if self.p.strategy == "self_consistency":
            out["votes"] = votes
            out["vote_share"] = (votes.get(win.answer, 0) / voted) if win is not None and voted else 0.0
        else:
            out["scores"] = {p.id: p.score for p in finished}
        if self.threshold is not None:
            out["prune_threshold"] = self.threshold
        if self.settled_by is not None:
            out["settled_by"] = self.settled_by
        out["paths"] = [{"state": p.state, "tokens": p.tokens, "answer": p.answer, "finish_reason": p.finish_reason,
                         "mean_logprob": round(mean_logprob(p.logprobs), 4) if p.logprobs else None}
                        for p in self.paths]
        return out


def launch_params(params: SamplingParams, run: TTCRun, launch: Launch) -> SamplingParams:
    """The request's sampling params for one launch: its paths, its cap (min_tokens within it: the
    budget wins), the sampled token's logprob (the paths' confidence), a seed per path."""
    beam = run.p.strategy == "beam_search"
    return replace(params, n=len(launch.path_ids), max_tokens=launch.max_tokens,
                   min_tokens=min(params.min_tokens, launch.max_tokens),
                   logprobs=params.logprobs if params.logprobs is not None else 0, seed=run.seed(params.seed, launch),
                   use_beam_search=beam, length_penalty=run.p.length_penalty if beam else params.length_penalty)
