"""Model tiers: which model of a pool answers a request (issue 13's route policies).

Plain logic with no engine or server in it, so the rules are tested on synthetic inputs; the
server's model pool drives them.

- `rules`: the first rule whose conditions all hold picks the model (prompt length in tokens,
  requested max_tokens, a regex or keywords in the prompt text); else the default model.
- `cascade`: the small model answers first; its answer's confidence, from the answer tokens'
  logprobs, decides whether the strong model answers instead. `CascadeMonitor` follows the
  answer as it is generated: with `lowest_window` (the lowest mean logprob over any `window`
  consecutive tokens, DeepConf's group confidence), `min` (the least likely token) or `surprise`
  (the sum, over the answer's tokens, of how far each logprob falls below `margin`: every
  unlikely token adds to it, likely ones add nothing) the confidence only falls, so a weak answer
  escalates as soon as it dips below the threshold, without finishing; with `mean` (the mean
  token logprob) the decision waits for the end. On the demo family's held-out chains
  `surprise` separates right from wrong answers of the small model best among those that can
  escalate early (docs/benchmarks/model_pool.md). A server
  holds the small model's stream until the decision, then streams the answer that stands.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import regex

from tokenmill.ttc import WindowLow, lowest_window_mean

METRICS = ("lowest_window", "mean", "min", "surprise")
PATTERN_TIMEOUT_S = 0.05  # a rule's regex gets this long per prompt; a timeout is no match


@dataclass
class Rule:
    model: str
    min_prompt_tokens: int | None = None
    max_prompt_tokens: int | None = None
    min_max_tokens: int | None = None  # the request's max_tokens at least this
    max_max_tokens: int | None = None
    pattern: str | None = None  # a regex searched in the prompt text
    keywords: list[str] = field(default_factory=list)  # any of them in the prompt text (case-insensitive)

    def matches(self, prompt_text: str, prompt_tokens: int, max_tokens: int | None) -> bool:
        if self.min_prompt_tokens is not None and prompt_tokens < self.min_prompt_tokens:
            return False
        if self.max_prompt_tokens is not None and prompt_tokens > self.max_prompt_tokens:
            return False
        if self.min_max_tokens is not None and (max_tokens is None or max_tokens < self.min_max_tokens):
            return False
        if self.max_max_tokens is not None and (max_tokens is None or max_tokens > self.max_max_tokens):
            return False
        if self.keywords and not any(k.lower() in prompt_text.lower() for k in self.keywords):
            return False
        if self.pattern is not None:
            try:
                if regex.search(self.pattern, prompt_text, timeout=PATTERN_TIMEOUT_S) is None:
                    return False
            except TimeoutError:
                return False
        return True


@dataclass
class RulesPolicy:
    rules: list[Rule]
    default: str

    def route(self, prompt_text: str, prompt_tokens: int, max_tokens: int | None) -> tuple[str, dict[str, Any]]:
        """(model, the routing account) for a request."""
        for i, r in enumerate(self.rules):
            if r.matches(prompt_text, prompt_tokens, max_tokens):
                return r.model, {"policy": "rules", "rule": i, "model": r.model}
        return self.default, {"policy": "rules", "rule": None, "model": self.default}


@dataclass
class CascadePolicy:
    small: str
    strong: str
    threshold: float  # a confidence (a logprob) below this escalates
    metric: str = "lowest_window"
    window: int = 16
    margin: float = -0.3  # surprise: a token's logprob below this adds the difference


def confidence(logprobs: list[float], metric: str, window: int = 16, margin: float = -0.3) -> float | None:
    """An answer's confidence from its tokens' logprobs; None for no tokens."""
    if not logprobs:
        return None
    if metric == "surprise":
        return sum(min(0.0, lp - margin) for lp in logprobs)
    if metric == "mean":
        return sum(logprobs) / len(logprobs)
    if metric == "min":
        return min(logprobs)
    if metric == "lowest_window":
        return lowest_window_mean(logprobs, window)
    raise ValueError(f"metric: one of {', '.join(METRICS)}, got {metric!r}")


class CascadeMonitor:
    """Follows the small model's answer token by token. observe() returns True once the answer
    must escalate (decided early only where the confidence can only fall); finish() gives the
    final decision and the routing account."""

    def __init__(self, policy: CascadePolicy) -> None:
        self.p = policy
        self.logprobs: list[float] = []
        self._windows = WindowLow(policy.window)
        # So far: the lowest full window's mean, the lowest token (min), the running surprise.
        self._low: float | None = None
        self.escalated = False
        self.escalated_at: int | None = None  # answer tokens seen when it escalated early

    def observe(self, new_logprobs: list[float]) -> bool:
        for lp in new_logprobs:
            self.logprobs.append(lp)
            if self.p.metric == "lowest_window":
                self._windows.add(self.logprobs)
                self._low = self._windows.low
            elif self.p.metric == "min":
                self._low = lp if self._low is None else min(self._low, lp)
            elif self.p.metric == "surprise":
                self._low = (self._low or 0.0) + min(0.0, lp - self.p.margin)
            if not self.escalated and self._low is not None and self._low < self.p.threshold:
                # below the threshold: no later token can lift it
                self.escalated, self.escalated_at = True, len(self.logprobs)
        return self.escalated

    def finish(self) -> tuple[str, dict[str, Any]]:
        """(the model whose answer stands, the routing account). An answer cut by max_tokens is
        judged like any other: the strong model would be held to the same max_tokens."""
        conf = confidence(self.logprobs, self.p.metric, self.p.window, self.p.margin)
        escalate = self.escalated or conf is None or conf < self.p.threshold
        model = self.p.strong if escalate else self.p.small
        return model, {"policy": "cascade", "model": model, "escalated": escalate, "metric": self.p.metric,
                       "confidence": None if conf is None else round(conf, 6), "threshold": self.p.threshold,
                       "small_tokens": len(self.logprobs), "escalated_at_token": self.escalated_at}


def policy_from_dict(d: dict[str, Any], models: set[str]) -> RulesPolicy | CascadePolicy:
    """A tier's route policy from its models.yaml entry; ValueError naming the field (route.<field>)
    when it is malformed or names a model the pool does not have."""
    def bad(f: str, msg: str) -> ValueError:
        return ValueError(f"route.{f}: {msg}")

    if not isinstance(d, dict):
        raise bad("policy", "must be an object")
    kind = d.get("policy")
    if kind == "cascade":
        known = {"policy", "small", "strong", "threshold", "metric", "window", "margin"}
        extra = sorted(set(d) - known)
        if extra:
            raise bad(extra[0], "unknown field")
        for f in ("small", "strong"):
            if not isinstance(d.get(f), str) or d.get(f) not in models:
                raise bad(f, f"{d.get(f)!r} is not a model of this server ({', '.join(sorted(models))})")
        if d["small"] == d["strong"]:
            raise bad("strong", f"the strong model must differ from the small one ({d['small']!r})")
        t = d.get("threshold")
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t > 0:
            raise bad("threshold", f"must be a logprob (a number <= 0), got {t!r}")
        metric = d.get("metric", "lowest_window")
        if metric not in METRICS:
            raise bad("metric", f"must be one of {', '.join(METRICS)}, got {metric!r}")
        window = d.get("window", 16)
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise bad("window", f"must be a positive integer, got {window!r}")
        margin = d.get("margin", -0.3)
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin) or margin > 0:
            raise bad("margin", f"must be a logprob (a number <= 0), got {margin!r}")
        return CascadePolicy(d["small"], d["strong"], float(t), metric, window, float(margin))
    if kind == "rules":
        extra = sorted(set(d) - {"policy", "rules", "default"})
        if extra:
            raise bad(extra[0], "unknown field")
        if not isinstance(d.get("default"), str) or d.get("default") not in models:
            raise bad("default", f"{d.get('default')!r} is not a model of this server ({', '.join(sorted(models))})")
        rules = []
        for i, r in enumerate(d.get("rules") or []):
            if not isinstance(r, dict):
                raise bad(f"rules[{i}]", "must be an object")
            try:
                rule = Rule(**r)
            except TypeError as e:
                raise bad(f"rules[{i}]", str(e)) from None
            if not isinstance(rule.model, str) or rule.model not in models:
                raise bad(f"rules[{i}].model", f"{rule.model!r} is not a model of this server")
            for f in ("min_prompt_tokens", "max_prompt_tokens", "min_max_tokens", "max_max_tokens"):
                v = getattr(rule, f)
                if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                    raise bad(f"rules[{i}].{f}", f"must be an integer >= 0, got {v!r}")
            if rule.pattern is not None:
                try:
                    regex.compile(rule.pattern)
                except (regex.error, TypeError) as e:
                    raise bad(f"rules[{i}].pattern", f"invalid regular expression: {e}") from None
            if not isinstance(rule.keywords, list) or not all(isinstance(k, str) and k for k in rule.keywords):
                raise bad(f"rules[{i}].keywords", "must be a list of non-empty strings")
            rules.append(rule)
        return RulesPolicy(rules, d["default"])
    raise bad("policy", f"must be 'cascade' or 'rules', got {kind!r}")
