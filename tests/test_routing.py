"""Model tiers' route policies on synthetic inputs (tokenmill/routing.py): rules in order, the
cascade's confidence metrics and early escalation, and models.yaml validation naming the field."""

from __future__ import annotations

import pytest

from tokenmill.routing import CascadeMonitor, CascadePolicy, Rule, RulesPolicy, confidence, policy_from_dict

MODELS = {"small", "strong", "coder"}


def test_rules_first_match_wins_else_default():
    p = RulesPolicy([Rule("coder", keywords=["def ", "Traceback"]), Rule("strong", min_prompt_tokens=100),
                     Rule("small", max_max_tokens=32, pattern=r"^What is \d+")], default="strong")
    assert p.route("Why does this Traceback happen?", 500, 10)[0] == "coder"  # first rule, though the 2nd holds
    assert p.route("a long essay", 100, 10) == ("strong", {"policy": "rules", "rule": 1, "model": "strong"})
    assert p.route("What is 2 + 3?", 12, 16)[0] == "small"
    assert p.route("What is 2 + 3?", 12, 64) == ("strong", {"policy": "rules", "rule": None, "model": "strong"})
    assert p.route("What is 2 + 3?", 12, None)[0] == "strong"  # no max_tokens: a max_max_tokens rule cannot hold


def test_a_backtracking_pattern_is_no_match_not_a_stall():
    p = RulesPolicy([Rule("small", pattern=r"(a+)+$")], default="strong")
    assert p.route("a" * 40 + "b", 10, 10)[0] == "strong"


def test_confidence_metrics():
    lps = [-0.1] * 20 + [-2.0] * 4 + [-0.1] * 20
    assert confidence(lps, "mean") == pytest.approx(sum(lps) / len(lps))
    assert confidence(lps, "min") == -2.0
    assert confidence(lps, "lowest_window", window=4) == pytest.approx(-2.0)
    assert confidence(lps, "lowest_window", window=8) == pytest.approx((4 * -2.0 + 4 * -0.1) / 8)
    assert confidence([], "mean") is None
    with pytest.raises(ValueError, match="^metric:"):
        confidence([-1.0], "median")


def test_cascade_escalates_early_on_a_weak_window_and_keeps_a_confident_answer():
    pol = CascadePolicy("small", "strong", threshold=-1.0, metric="lowest_window", window=4)
    m = CascadeMonitor(pol)
    assert not m.observe([-0.1] * 10)
    assert not m.observe([-3.0])  # the last window: (3 * -0.1 - 3) / 4 = -0.825, above -1
    assert m.observe([-3.0]) and m.escalated_at == 12  # (2 * -0.1 - 6) / 4 = -1.55: no later token lifts it
    m2 = CascadeMonitor(pol)
    assert m2.observe([-0.1] * 10 + [-3.0, -3.0, -3.0, -3.0]) is True and m2.escalated_at == 12
    model, acct = m2.finish()
    assert model == "strong" and acct["escalated"] and acct["escalated_at_token"] == 12
    m3 = CascadeMonitor(pol)
    m3.observe([-0.2] * 30)
    model, acct = m3.finish()
    assert model == "small" and not acct["escalated"] and acct["confidence"] == pytest.approx(-0.2)
    assert acct["small_tokens"] == 30 and acct["escalated_at_token"] is None


def test_cascade_mean_decides_at_the_end_and_no_answer_escalates():
    pol = CascadePolicy("small", "strong", threshold=-0.5, metric="mean")
    m = CascadeMonitor(pol)
    assert not m.observe([-5.0])  # the mean may still recover: no early decision
    m.observe([-0.01] * 20)
    assert m.finish()[0] == "small"
    assert CascadeMonitor(pol).finish()[0] == "strong"  # an empty answer is no evidence
    m = CascadeMonitor(CascadePolicy("small", "strong", threshold=-4.0, metric="min"))
    assert not m.observe([-0.1, -3.9]) and m.observe([-4.5]) and m.escalated_at == 3


@pytest.mark.parametrize("d,field", [
    ({"policy": "majority"}, "policy"),
    ({"policy": "cascade", "small": "tiny", "strong": "strong", "threshold": -1}, "small"),
    ({"policy": "cascade", "small": "small", "strong": "strong", "threshold": 0.5}, "threshold"),
    ({"policy": "cascade", "small": "small", "strong": "strong", "threshold": -1, "metric": "p50"}, "metric"),
    ({"policy": "cascade", "small": "small", "strong": "strong", "threshold": -1, "window": 0}, "window"),
    ({"policy": "cascade", "small": "small", "strong": "strong", "threshold": -1, "beams": 2}, "beams"),
    ({"policy": "rules", "default": "nope"}, "default"),
    ({"policy": "rules", "default": "small", "rules": [{"model": "nope"}]}, r"rules\[0\]\.model"),
    ({"policy": "rules", "default": "small", "rules": [{"model": "coder", "pattern": "(open"}]},
     r"rules\[0\]\.pattern"),
    ({"policy": "rules", "default": "small", "rules": [{"model": "coder", "lenght": 3}]}, r"rules\[0\]"),
    ({"policy": "rules", "default": "small", "rules": [{"model": "coder", "max_prompt_tokens": -1}]},
     r"rules\[0\]\.max_prompt_tokens"),
    ({"policy": "rules", "default": "small", "rules": [{"model": "coder", "keywords": "def"}]},
     r"rules\[0\]\.keywords"),
])
def test_bad_policies_name_the_field(d, field):
    with pytest.raises(ValueError, match=rf"^route\.{field}:"):
        policy_from_dict(d, MODELS)


def test_good_policies_load():
    c = policy_from_dict({"policy": "cascade", "small": "small", "strong": "strong", "threshold": -0.7}, MODELS)
    assert c == CascadePolicy("small", "strong", -0.7, "lowest_window", 16)
    rules = [{"model": "coder", "keywords": ["def "]}, {"model": "small", "max_prompt_tokens": 64}]
    r = policy_from_dict({"policy": "rules", "default": "strong", "rules": rules}, MODELS)
    assert [x.model for x in r.rules] == ["coder", "small"] and r.default == "strong"


def test_surprise_adds_up_unlikely_tokens_and_escalates_once_it_cannot_recover():
    lps = [-0.1, -0.05, -1.3, -0.2, -2.3]
    assert confidence(lps, "surprise", margin=-0.3) == pytest.approx(-1.0 + -2.0)
    assert confidence(lps, "surprise", margin=-0.05) == pytest.approx(-0.05 - 1.25 - 0.15 - 2.25)
    m = CascadeMonitor(CascadePolicy("small", "strong", threshold=-2.5, metric="surprise", margin=-0.3))
    assert not m.observe(lps[:4])  # -1.0 so far: likely tokens add nothing, so it may still pass
    assert m.observe(lps[4:]) and m.escalated_at == 5
    model, account = m.finish()
    assert model == "strong" and account["confidence"] == pytest.approx(-3.0)
    sure = CascadeMonitor(CascadePolicy("small", "strong", threshold=-2.5, metric="surprise"))
    sure.observe([-0.01] * 500)  # a long answer of likely tokens stays sure
    assert sure.finish()[0] == "small"
    assert policy_from_dict({"policy": "cascade", "small": "small", "strong": "strong", "threshold": -3,
                             "metric": "surprise", "margin": -0.5}, {"small", "strong"}).margin == -0.5
    with pytest.raises(ValueError, match=r"^route\.margin"):
        policy_from_dict({"policy": "cascade", "small": "small", "strong": "strong", "threshold": -3,
                          "margin": 0.5}, {"small", "strong"})
