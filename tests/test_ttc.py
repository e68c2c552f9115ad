"""Test-time compute (tokenmill.ttc): the vote, tie-break, early-stop, pruning and budget rules on
synthetic paths, without a model; then whole requests through the real engine."""

from __future__ import annotations

import random

import numpy as np
import pytest

from tokenmill.ttc import (
    TTCParams,
    TTCRun,
    extract_answer,
    lowest_window_mean,
    percentile,
    vote,
    vote_settled,
)

PATTERN = r"The answer is (-?\d+)"


# -- the rules ---------------------------------------------------------------------------------
def test_extract_answer():
    assert extract_answer("x\nThe answer is 12.\nThe answer is -7.", PATTERN) == "-7"  # the last match
    assert extract_answer("The answer is 12.", r"answer is \d+") == "answer is 12"  # no group: the match
    assert extract_answer("no answer here", PATTERN) is None
    assert extract_answer("step one\n  42  \n\n", None) == "42"  # no pattern: the last non-empty line
    assert extract_answer(" \n", None) is None
    assert extract_answer("b", "(a)|b") == "b"  # the group took no part: the match


def test_vote_and_tie_break():
    assert vote([("1", -0.5), ("2", -0.1), ("1", -0.9)]) == ("1", {"1": 2, "2": 1})
    # 2-2: the answer whose paths are more likely on average wins.
    assert vote([("1", -0.5), ("2", -0.1), ("1", -0.9), ("2", -0.3)])[0] == "2"
    assert vote([("1", -0.05), ("2", -0.1), ("1", -0.9), ("2", -0.3)])[0] == "2"  # mean -0.475 vs -0.2
    assert vote([]) == (None, {})


@pytest.mark.parametrize("counts,undecided,settled", [
    ({"a": 5}, 4, True), ({"a": 5}, 5, False), ({"a": 5, "b": 2}, 2, True), ({"a": 5, "b": 2}, 3, False),
    ({}, 0, False), ({"a": 1, "b": 1}, 0, False),  # a tie is never settled by counts
])
def test_vote_settled(counts, undecided, settled):
    assert vote_settled(counts, undecided) is settled


def test_lowest_window_mean_and_percentile():
    rng = random.Random(0)
    for _ in range(200):
        lps = [-rng.expovariate(2) for _ in range(rng.randint(1, 60))]
        w = rng.randint(1, 20)
        expect = (min(np.convolve(lps, np.ones(w) / w, mode="valid")) if len(lps) > w else float(np.mean(lps)))
        assert lowest_window_mean(lps, w) == pytest.approx(expect)
        assert percentile(lps, w * 5) == pytest.approx(np.percentile(lps, w * 5))


# -- a run on synthetic paths ------------------------------------------------------------------
def _drive(run: TTCRun, paths: dict[int, tuple[str, list[float]]], chunk: int = 3) -> list[int]:
    """Runs `run` as an engine would: launched paths make `chunk` tokens a step (their logprobs
    from `paths`), finishing with their text; returns the paths the run stopped."""
    progress: dict[int, int] = {}
    stopped: list[int] = []
    late: list[int] = []
    while not run.done:
        while (launch := run.launch()) is not None:
            for pid in launch.path_ids:
                progress[pid] = 0
                assert launch.max_tokens >= 1
        for pid in [p for p, k in progress.items() if run.paths[p].state == "running"]:
            text, lps = paths[pid]
            lps = lps[: run.paths[pid].max_tokens]
            k = progress[pid]
            new = lps[k : k + chunk]
            progress[pid] = k + len(new)
            done = progress[pid] >= len(lps)
            reason = ("stop" if len(lps) == len(paths[pid][1]) else "length") if done else None
            run.observe(pid, text if done else "", list(range(progress[pid])), new, reason)
        for pid in late:  # stopped last step, they ran one more step before the abort landed
            k = progress[pid]
            new = paths[pid][1][: run.paths[pid].max_tokens][k : k + chunk]
            progress[pid] = k + len(new)
            run.observe(pid, "", list(range(progress[pid])), new, "abort")
        late = run.stops()  # after the step, as the engine drivers ask
        stopped += late
    return stopped


def _path(answer: str, n: int = 12, lp: float = -0.2) -> tuple[str, list[float]]:
    return f"work\nThe answer is {answer}.", [lp] * n


def test_self_consistency_without_early_stop_runs_every_path():
    paths = {i: _path(a) for i, a in enumerate("7 7 3 7 3 9".split())}
    paths[5] = ("no answer at all", [-0.1] * 12)
    run = TTCRun(TTCParams(n=6, answer_pattern=PATTERN), "q", 10, 100)
    assert _drive(run, paths) == []
    r = run.result()
    assert r["answer"] == "7" and r["votes"] == {"7": 3, "3": 2} and r["vote_share"] == pytest.approx(0.6)
    assert r["paths_started"] == r["paths_finished"] == 6 and r["tokens"] == {"prompt": 10, "generated": 72,
                                                                              "total": 82}
    assert run.paths[r["winner_path"]].answer == "7"


def test_early_stop_launches_no_more_once_the_vote_is_settled():
    # Four in flight, of different lengths, all answering 7 (one answers 3).
    paths = {i: _path("7" if i != 1 else "3", n=6 + 5 * (i % 4)) for i in range(16)}
    run = TTCRun(TTCParams(n=16, answer_pattern=PATTERN, early_stop=True, wave=4, prune_percentile=None),
                 "q", 10, 100)
    stopped = _drive(run, paths)
    r = run.result()
    assert r["answer"] == "7" and r["paths_started"] < 16 and stopped
    # Settled: the leader's votes exceed the runner-up's plus every path stopped or never launched...
    assert r["votes"]["7"] > r["votes"]["3"] + r["paths_stopped_early"] + 16 - r["paths_started"]
    # ...and not a step later: one path fewer would not have settled it.
    assert r["votes"]["7"] - 1 <= r["votes"]["3"] + r["paths_stopped_early"] + 16 - r["paths_started"] + 3
    assert r["paths_stopped_early"] == len(stopped) and r["tokens_saved_estimate"] > 0
    assert r["tokens"]["generated"] < sum(len(lps) for _, lps in paths.values())


def test_consensus_stops_once_the_warmup_votes_agree():
    """DeepConf's adaptive rule: 4 of 4 agreeing is enough at consensus 0.95 (the strict rule would
    wait for 10 votes here); a split warmup goes on."""
    paths = {i: _path("7" if i % 5 else "3") for i in range(16)}  # path 0 (and 5, 10, 15) answer 3
    run = TTCRun(TTCParams(n=16, answer_pattern=PATTERN, early_stop=True, wave=4, prune_percentile=None,
                           consensus=0.75), "q", 10, 100)
    _drive(run, paths)
    r = run.result()
    assert r["settled_by"] == "consensus" and r["answer"] == "7" and r["paths_started"] == 4
    assert r["votes"] == {"7": 3, "3": 1}
    run = TTCRun(TTCParams(n=16, answer_pattern=PATTERN, early_stop=True, wave=4, prune_percentile=None,
                           consensus=0.95), "q", 10, 100)
    _drive(run, paths)
    r = run.result()  # 3 of 4 is short of 0.95: it goes on until the strict rule or a later consensus
    assert r["paths_started"] > 4 and r["answer"] == "7"


def test_pruning_below_the_warmup_threshold():
    rng = random.Random(1)
    paths = {i: _path("5" if i != 2 else "8", lp=-0.2 - 0.01 * rng.random()) for i in range(8)}
    for i in (4, 6):  # a confident start, then a stretch of doubt
        paths[i] = ("work\nThe answer is 6.", [-0.2] * 6 + [-3.0] * 6)
    run = TTCRun(TTCParams(n=8, answer_pattern=PATTERN, early_stop=True, wave=4, warmup=4, window=4,
                           prune_percentile=0), "q", 10, 100)
    stopped = _drive(run, paths, chunk=1)
    assert {4, 6} <= set(stopped) and run.paths[4].state == run.paths[6].state == "pruned"
    r = run.result()
    assert r["paths_pruned"] >= 2 and "6" not in r["votes"] and r["prune_threshold"] == pytest.approx(
        min(lowest_window_mean(paths[i][1], 4) for i in range(4)))


def test_best_of_n_by_mean_logprob_and_by_a_scorer():
    paths = {0: ("a", [-1.0] * 5), 1: ("b", [-0.1] * 5), 2: ("c", [-0.5] * 5)}
    run = TTCRun(TTCParams(strategy="best_of_n", n=3), "q", 4, 50)
    _drive(run, paths)
    assert run.winner().text == "b" and run.result()["scores"][1] == pytest.approx(-0.1)
    run = TTCRun(TTCParams(strategy="best_of_n", n=3, scorer=lambda prompt, text: float(text == "c")), "q", 4, 50)
    _drive(run, paths)
    assert run.winner().text == "c"


@pytest.mark.parametrize("seed", range(20))
def test_budget_is_hard(seed):
    """Whatever the paths do, generated tokens never exceed max_total_tokens - prompt."""
    rng = random.Random(seed)
    n, prompt = rng.randint(1, 16), rng.randint(1, 50)
    budget = rng.randint(prompt + 1, prompt + 400)
    paths = {i: _path(str(rng.randint(0, 2)), n=rng.randint(1, 80)) for i in range(n)}
    run = TTCRun(TTCParams(n=n, answer_pattern=PATTERN, max_total_tokens=budget, early_stop=rng.random() < 0.5),
                 "q", prompt, rng.choice([None, 30, 200]), max_model_len=1000)
    _drive(run, paths, chunk=rng.randint(1, 5))
    r = run.result()
    assert r["tokens"]["total"] <= budget  # stopped paths' last tokens included
    assert all(p.closed for p in run.paths) and all(p.tokens <= p.max_tokens for p in run.paths)


@pytest.mark.parametrize("d,field", [
    ({"strategy": "majority"}, "strategy"), ({"n": 0}, "n"), ({"n": 10_000}, "n"), ({"n": True}, "n"),
    ({"answer_pattern": "(unclosed"}, "answer_pattern"), ({"max_total_tokens": 0}, "max_total_tokens"),
    ({"early_stop": "yes"}, "early_stop"), ({"wave": 99, "n": 4}, "wave"),
    ({"prune_percentile": 120}, "prune_percentile"), ({"window": 0}, "window"), ({"beams": 2}, "beams"),
    ({"consensus": 0.5, "early_stop": True}, "consensus"), ({"consensus": 0.9}, "consensus"),
    ({"strategy": "beam_search", "early_stop": True}, "early_stop"), ({"length_penalty": "x"}, "length_penalty"),
])
def test_bad_params_name_the_field(d, field):
    with pytest.raises(ValueError, match=rf"^test_time_compute\.{field}:"):
        TTCParams.from_dict(d).validate()


def test_budget_below_one_path():
    with pytest.raises(ValueError, match=r"^test_time_compute\.max_total_tokens:"):
        TTCRun(TTCParams(max_total_tokens=10), "q", prompt_tokens=10, max_tokens=5)


# -- whole requests through the real engine ----------------------------------------------------
@pytest.fixture(scope="module")
def ttc_llm(model_dir):
    from tokenmill import LLM

    return LLM(model_dir, kv_cache_memory_bytes=8 * 2**20, max_num_batched_tokens=256, seed=0)


def _computed(llm) -> int:
    return llm.engine.stats()["prompt_tokens_computed"]


def test_paths_share_one_prefill_and_free_every_block(ttc_llm):
    from tokenmill import SamplingParams

    eng = ttc_llm.engine
    prompt = "The quick brown fox jumps over the lazy dog. " * 3
    n_prompt = len(eng.tokenize(prompt)[1])
    before = _computed(ttc_llm)
    eng.reset_prefix_cache()
    # A path ends at its first space (or votes nothing at max_tokens): its answer is its one word.
    out = ttc_llm.generate(prompt, SamplingParams(temperature=1.0, max_tokens=24, seed=3, stop=[" "]),
                           test_time_compute={"n": 8})[0]
    acct = out.test_time_compute
    assert _computed(ttc_llm) - before == n_prompt  # one prefill, forked to the 8 paths
    assert acct["paths_started"] == acct["paths_finished"] == 8 and len(out.outputs) == 1
    assert acct["tokens"]["prompt"] == n_prompt and 8 <= acct["tokens"]["generated"] <= 8 * 24
    assert out.outputs[0].text and sum(acct["votes"].values()) >= 1
    assert eng.block_manager.usage == 0 and not eng.has_unfinished_requests()

    # Early stopping launches paths a few at a time; later ones reuse the cached prompt blocks,
    # recomputing at most the last, partial one.
    eng.reset_prefix_cache()
    before = _computed(ttc_llm)
    out = ttc_llm.generate(prompt, SamplingParams(temperature=1.0, max_tokens=24, seed=3),
                           test_time_compute={"n": 8, "early_stop": True, "wave": 2, "window": 4})[0]
    launches = out.test_time_compute["launches"]
    assert launches > 1
    assert _computed(ttc_llm) - before == n_prompt + (launches - 1) * (n_prompt % eng.config.block_size)
    assert eng.block_manager.usage == 0 and not eng.has_unfinished_requests()


def test_a_settled_vote_launches_no_more(ttc_llm):
    """Greedy paths all agree: once the vote is settled no more paths are launched."""
    from tokenmill import SamplingParams

    out = ttc_llm.generate("Once upon a time", SamplingParams(temperature=0.0, max_tokens=40, stop=[" "]),
                           test_time_compute={"n": 12, "early_stop": True, "wave": 4, "prune_percentile": None})[0]
    acct = out.test_time_compute
    assert acct["paths_started"] == 8 and acct["votes"] == {acct["answer"]: 8}  # 8 > 0 running + 4 unlaunched
    assert acct["vote_share"] == 1.0 and acct["tokens_saved_estimate"] > 0
    assert ttc_llm.engine.block_manager.usage == 0


def test_abort_one_sample_frees_its_blocks(ttc_llm):
    from tokenmill import SamplingParams

    eng = ttc_llm.engine
    rid = eng.add_request("A pruned path", SamplingParams(n=3, max_tokens=30, ignore_eos=True, temperature=1.0))
    for _ in range(4):
        eng.step()
    used = eng.block_manager.num_used_blocks
    assert eng.abort_seq(rid, 1) is None and eng.block_manager.num_used_blocks < used
    assert eng.abort_seq(rid, 1) is None and eng.abort_seq("nope", 0) is None
    while eng.has_unfinished_requests():
        outs = eng.step()
    out = next(o for o in outs if o.request_id == rid)
    assert [c.finish_reason for c in out.outputs] == ["length", "abort", "length"]
    assert len(out.outputs[1].token_ids) < 30 and eng.block_manager.usage == 0
    # Aborting the last running sample finishes the request.
    rid = eng.add_request("x", SamplingParams(n=2, max_tokens=30, ignore_eos=True))
    eng.step()
    assert eng.abort_seq(rid, 0) is None
    out = eng.abort_seq(rid, 1)
    assert out.finished and [c.finish_reason for c in out.outputs] == ["abort", "abort"]
    assert eng.block_manager.usage == 0 and not eng.has_unfinished_requests()


def test_no_max_tokens_runs_to_the_context(ttc_llm):
    from tokenmill import SamplingParams

    out = ttc_llm.generate("Hi", SamplingParams(max_tokens=None, temperature=1.0, seed=0, stop=[" "]),
                           test_time_compute={"n": 3, "max_total_tokens": 100_000})[0]
    assert out.test_time_compute["paths_started"] == 3
    out = ttc_llm.generate("Hi", SamplingParams(max_tokens=5, seed=2**64 - 1), test_time_compute={"n": 3})[0]
    assert out.test_time_compute["paths_started"] == 3


@pytest.mark.parametrize("budget", [60, 150])
def test_the_budget_holds_in_the_engine(ttc_llm, budget):
    from tokenmill import SamplingParams

    prompt = "Count with me: one two three"
    out = ttc_llm.generate(prompt, SamplingParams(temperature=1.0, max_tokens=64, seed=1),
                           test_time_compute={"n": 6, "max_total_tokens": budget, "early_stop": True})[0]
    assert out.test_time_compute["tokens"]["total"] <= budget
    with pytest.raises(ValueError, match="max_total_tokens"):
        ttc_llm.generate(prompt, SamplingParams(max_tokens=8), test_time_compute={"max_total_tokens": 3})
    with pytest.raises(ValueError, match=r"^n:"):
        ttc_llm.generate(prompt, SamplingParams(n=2), test_time_compute={"n": 4})
    for kw in ({"logprobs": 1}, {"prompt_logprobs": 0}):  # (dropped from the output before, as the server refuses)
        with pytest.raises(ValueError, match=rf"^{next(iter(kw))}: cannot be combined with test_time_compute"):
            ttc_llm.generate(prompt, SamplingParams(**kw), test_time_compute={"n": 4})


def test_bench_ttc_runs_every_strategy_and_plots(model_dir, tmp_path):
    """A smoke run of `tokenmill bench ttc` (tiny random model: the figures are noise, the
    report's shape is what is checked)."""
    import json

    from tokenmill.bench.ttc import run
    from tokenmill.cli import build_parser

    args = build_parser().parse_args(["bench", "ttc", "--model", model_dir, "--questions", "2", "--n", "2",
                                      "--max-tokens", "8", "--timed", "1", "--beams", "2",
                                      "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png")])
    out = run(args)
    for name in ("greedy", "self_consistency@2", "early_stop@2", "early_stop+consensus@2", "best_of_n@2",
                 "beam_search@2"):
        assert 0 <= out[name]["accuracy"] <= 1 and out[name]["generated_tokens"] > 0
    assert [c["k"] for c in out["self_consistency_curve"]] == [1, 2]
    assert out["prefill"]["prompt_tokens_computed"] == out["prefill"]["prompt_tokens"]
    assert json.loads((tmp_path / "r.json").read_text())["n"] == 2 and (tmp_path / "r.png").stat().st_size > 0


def test_offline_runs_report_their_prefix_cache_hit(ttc_llm):
    """num_cached_tokens of a run is its first launch's hit, as the server's usage reports it (it
    was always 0 offline)."""
    from tokenmill import SamplingParams

    prompt = {"prompt_token_ids": list(range(7, 47))}  # 40 tokens: two full blocks the cache keeps
    sp = SamplingParams(max_tokens=4, temperature=0.9, seed=5, ignore_eos=True)
    ttc_llm.generate(prompt, sp)
    out = ttc_llm.generate(prompt, sp, test_time_compute={"strategy": "self_consistency", "n": 3})[0]
    assert out.num_cached_tokens == 32
