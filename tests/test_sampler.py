"""The sampler's parameters, each checked against its definition on synthetic logits."""

import contextlib
import math
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tokenmill.engine.sequence import Request
from tokenmill.sample import Sampler, SamplingMetadata
from tokenmill.sampling_params import SamplingParams

V = 50
if not torch.cuda.is_available():  # (before anything imports Triton: its kernels run interpreted on a CPU)
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _seqs(params: list[SamplingParams], outputs: list[list[int]] | None = None, prompt=(1, 2, 3)):
    seqs = []
    for i, p in enumerate(params):
        p._eos_token_ids = (0,)
        s = Request(str(i), None, list(prompt), p, 0.0).seqs[0]
        if outputs:
            s.token_ids.extend(outputs[i])
        if p.seed is not None:
            s.generator = torch.Generator().manual_seed(p.seed)
        seqs.append(s)
    return seqs


def _sample(logits, params, outputs=None, prompt=(1, 2, 3)):
    seqs = _seqs(params, outputs, prompt)
    md = SamplingMetadata.from_sequences(seqs, logits.shape[1], torch.device("cpu"))
    return Sampler()(logits, md)


def _draws(logits_row, params, n=400):
    logits = logits_row.expand(n, -1).clone()
    return _sample(logits, [SamplingParams(**params) for _ in range(n)]).token_ids


@pytest.fixture
def logits():
    torch.manual_seed(0)
    return torch.randn(1, V) * 2


def test_greedy_is_argmax(logits):
    out = _sample(logits.repeat(3, 1), [SamplingParams(temperature=0)] * 3)
    assert out.token_ids == [int(logits.argmax())] * 3


def test_top_k_never_outside_k_most_likely(logits):
    allowed = set(logits[0].topk(5).indices.tolist())
    toks = _draws(logits, dict(temperature=1.5, top_k=5))
    assert set(toks) <= allowed
    assert len(set(toks)) > 1


def test_top_p_keeps_smallest_nucleus(logits):
    probs = torch.softmax(logits[0], -1)
    sorted_p, idx = probs.sort(descending=True)
    cum = sorted_p.cumsum(0)
    k = int((cum < 0.6).sum()) + 1  # smallest prefix with mass >= 0.6
    allowed = set(idx[:k].tolist())
    toks = _draws(logits, dict(temperature=1.0, top_p=0.6))
    assert set(toks) <= allowed
    assert len(set(toks)) >= min(2, k)


def test_min_p_drops_unlikely_tokens(logits):
    probs = torch.softmax(logits[0], -1)
    allowed = {i for i in range(V) if probs[i] >= 0.2 * probs.max()}
    assert set(_draws(logits, dict(temperature=1.0, min_p=0.2))) <= allowed


def test_temperature_sharpens_distribution(logits):
    cold = _draws(logits, dict(temperature=0.2))
    hot = _draws(logits, dict(temperature=5.0))
    top = int(logits.argmax())
    assert cold.count(top) > hot.count(top)
    assert len(set(hot)) > len(set(cold))


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    toks = _draws(logits, dict(temperature=1.0), n=4000)
    freq = [toks.count(i) / 4000 for i in range(3)]
    assert freq == pytest.approx([0.7, 0.2, 0.1], abs=0.03)


def test_repetition_penalty_as_defined():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5, 3.0]])
    # prompt holds 0 and 1, output holds 4: those are penalised; 2 and 3 are not.
    seqs = _seqs([SamplingParams(temperature=0, repetition_penalty=2.0)], [[4]], prompt=(0, 1))
    md = SamplingMetadata.from_sequences(seqs, 5, torch.device("cpu"))
    got = Sampler._apply_penalties(logits.clone(), md)
    assert got.tolist() == [[1.0, -4.0, 1.0, 0.5, 1.5]]
    seqs = _seqs([SamplingParams(temperature=0, repetition_penalty=4.0)], [[4]], prompt=(0, 1))
    md = SamplingMetadata.from_sequences(seqs, 5, torch.device("cpu"))
    assert Sampler()(logits, md).token_ids == [2]  # 4 would win without the penalty


def test_presence_and_frequency_penalties_as_defined():
    logits = torch.zeros(1, 5)
    seqs = _seqs([SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.25)], [[3, 3, 1]],
                 prompt=(2,))
    md = SamplingMetadata.from_sequences(seqs, 5, torch.device("cpu"))
    got = Sampler._apply_penalties(logits, md)
    # token 3 twice: 0.5 + 2 * 0.25; token 1 once: 0.5 + 0.25; prompt token 2 untouched
    assert got.tolist() == [[0.0, -0.75, 0.0, -1.0, 0.0]]


def test_min_tokens_bans_eos_and_stop_ids():
    logits = torch.tensor([[10.0, 0.0, 9.0, 1.0]])
    p = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[2])
    assert _sample(logits, [p]).token_ids == [3]
    # once min_tokens outputs exist, eos (0) is allowed again
    assert _sample(logits, [p], outputs=[[3, 3]]).token_ids == [0]


def test_seeded_rows_are_independent_of_neighbours(logits):
    p = dict(temperature=1.0, seed=1234)
    alone = _sample(logits.clone(), [SamplingParams(**p)]).token_ids
    mixed = _sample(logits.repeat(4, 1), [SamplingParams(temperature=1.0), SamplingParams(**p),
                                          SamplingParams(temperature=0.5, top_k=3), SamplingParams(**p)]).token_ids
    assert mixed[1] == alone[0] and mixed[3] == alone[0]


def test_logprobs_are_raw_log_softmax_with_ranks(logits):
    out = _sample(logits.repeat(2, 1), [SamplingParams(temperature=0, logprobs=3),
                                        SamplingParams(temperature=1.0, logprobs=1, top_k=2)])
    ref = torch.log_softmax(logits[0], -1)
    top = ref.topk(3)
    assert out.topk_ids[0] == top.indices.tolist()
    assert out.topk_logprobs[0] == pytest.approx(top.values.tolist(), abs=1e-6)
    assert out.sampled_ranks[0] == 1
    tok = out.token_ids[1]
    assert out.sampled_logprobs[1] == pytest.approx(float(ref[tok]), abs=1e-6)
    assert out.sampled_ranks[1] == int((ref > ref[tok]).sum()) + 1


def test_validation_names_the_parameter():
    cases = [
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-3), "top_k"),
        (dict(min_p=2.0), "min_p"),
        (dict(max_tokens=-1), "max_tokens"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(n=0), "n"),
        (dict(repetition_penalty=0), "repetition_penalty"),
        (dict(presence_penalty=3), "presence_penalty"),
        (dict(frequency_penalty=-3), "frequency_penalty"),
        (dict(min_tokens=5, max_tokens=2), "min_tokens"),
        (dict(stop=[""]), "stop"),
        (dict(logprobs=-1), "logprobs"),
        (dict(temperature=math.nan), "temperature"),
    ]
    for kwargs, name in cases:
        with pytest.raises(ValueError, match=f"^{name}"):
            SamplingParams(**kwargs).validate(V)
    # Bounded lists, each applied every step on the thread every request shares (a large vocabulary's ids).
    big = 151936
    for kwargs, name in [(dict(logit_bias={t: 1.0 for t in range(1025)}), "logit_bias: at most 1024"),
                         (dict(stop_token_ids=list(range(1025))), "stop_token_ids: at most 1024"),
                         (dict(stop=[str(i) for i in range(129)]), "stop: at most 128"),
                         (dict(stop=["x" * 1025]), "stop: a stop string may hold at most 1024")]:
        with pytest.raises(ValueError, match=f"^{name}"):
            SamplingParams(**kwargs).validate(big)
    SamplingParams(logit_bias={t: 1.0 for t in range(1024)}, stop_token_ids=list(range(1024)),
                   stop=[str(i) for i in range(128)]).validate(big)


def _reference_kept(row: torch.Tensor, top_k: int, top_p: float) -> set[int]:
    """Definition: the top_k most likely tokens, then the smallest prefix of them (most likely
    first) whose renormalized mass reaches top_p."""
    vals, idx = row.sort(descending=True)
    vals, idx = vals[:top_k], idx[:top_k]
    probs = torch.softmax(vals.double(), 0)
    before = probs.cumsum(0) - probs
    return set(idx[before < top_p].tolist())


def test_top_k_top_p_over_a_large_vocabulary():
    """Rows whose nucleus fits the partial top-k candidates, rows that need the whole-row sort
    (flat), a top_k above the candidate count and unfiltered rows, in one batch."""
    from tokenmill.sample.sampler import _top_k_top_p

    torch.manual_seed(1)
    vocab = 5000
    rows = [(torch.randn(vocab) * 8, 0, 0.9), (torch.randn(vocab) * 0.1, 0, 0.9), (torch.randn(vocab) * 3, 40, 1.0),
            (torch.randn(vocab) * 0.1, 300, 1.0), (torch.randn(vocab) * 0.2, 700, 0.5), (torch.randn(vocab), 0, 1.0),
            (torch.randn(vocab) * 4, 20, 0.8)]
    logits = torch.stack([r[0] for r in rows])
    top_k = torch.tensor([k or vocab for _, k, _ in rows])
    top_p = torch.tensor([p for _, _, p in rows])
    out = _top_k_top_p(logits, top_k, top_p)
    for i, (row, k, p) in enumerate(rows):
        kept = set(torch.isfinite(out[i]).nonzero()[:, 0].tolist())
        assert kept == _reference_kept(row, k or vocab, p), i
        assert torch.equal(out[i][list(kept)], row[list(kept)])
    assert len(set(torch.isfinite(out[1]).nonzero()[:, 0].tolist())) > 256  # the flat row took the sort


def test_top_k_keeps_ties_and_top_p_one_keeps_all():
    from tokenmill.sample.sampler import _CANDIDATES, _top_k_top_p

    logits = torch.tensor([[3.0, 2.0, 2.0, 2.0, 1.0, 0.0], [0.5, 0.4, 0.3, 0.2, 0.1, 0.0]])
    out = _top_k_top_p(logits, torch.tensor([2, 3]), torch.tensor([1.0, 1.0]))
    assert torch.isfinite(out[0]).tolist() == [True, True, True, True, False, False]  # ties with the 2nd kept
    assert torch.isfinite(out[1]).tolist() == [True, True, True, False, False, False]
    # A tie that runs past the partial top-k's candidates still keeps every tied token.
    vocab = 2 * _CANDIDATES + 10
    row = torch.zeros(1, vocab)
    row[0, :3] = 5.0
    out = _top_k_top_p(row, torch.tensor([5]), None)
    assert int(torch.isfinite(out).sum()) == vocab  # the 5th largest is 0.0, shared by all the rest
    # top_p=1 rows beside top_p<1 rows lose nothing, even where the float sum reaches 1 early.
    peaked = -60.0 - torch.arange(vocab, dtype=torch.float32)[None] * 1e-3
    peaked[0, 0] = 30.0
    out = _top_k_top_p(torch.cat([peaked, peaked]), torch.tensor([vocab, 300]), torch.tensor([0.5, 1.0]))
    assert int(torch.isfinite(out[0]).sum()) == 1 and int(torch.isfinite(out[1]).sum()) == 300


def test_inverse_cdf_reaches_the_smallest_tokens():
    """A float32 running sum over a large vocabulary stops growing for tiny entries; the sampler's
    CDF is float64, so a token after a mass 1e8 times larger keeps its interval of draws."""
    from tokenmill.sample.sampler import sample_rows

    vocab = 152_000
    probs = torch.full((1, vocab), 1e-12)
    probs[0, 0] = 1.0
    probs[0, -1] = 1e-8
    cum32 = probs.cumsum(-1)
    assert float(cum32[0, -1] - cum32[0, -2]) == 0.0  # float32: the last token's interval is empty
    total = float(probs.double().sum())
    for block in (1024, 7):
        u_last = torch.tensor([[1 - 0.5e-8 / total]], dtype=torch.float64)
        assert int(sample_rows(probs, block=block, u=u_last)) == vocab - 1
        assert int(sample_rows(probs, block=block, u=torch.tensor([[0.3]], dtype=torch.float64))) == 0


@pytest.mark.parametrize("block", [1, 2, 3, 1024])
def test_inverse_cdf_follows_the_distribution_across_blocks(block):
    from tokenmill.sample.sampler import sample_rows

    probs = torch.tensor([[0.1, 0.0, 0.2, 0.3, 0.0, 0.4]])
    torch.manual_seed(0)
    draws = sample_rows(probs.expand(8000, -1), block=block)
    freq = torch.bincount(draws, minlength=6).double() / 8000
    assert freq[1] == 0 and freq[4] == 0
    assert freq.tolist() == pytest.approx([0.1, 0.0, 0.2, 0.3, 0.0, 0.4], abs=0.02)


def test_inverse_cdf_interval_of_a_block_end_token_is_its_probability():
    """Each token's share of the uniform draw is its probability, including the last entry of a
    block, where float32 block sums and the float64 running sum inside the block disagree."""
    from tokenmill.sample.sampler import sample_rows

    torch.manual_seed(0)
    logits = torch.randn(20, 4096) * 2
    logits[:, 1023] = -12.0  # a small token at the end of block 0
    probs = torch.softmax(logits, -1)

    def first_u_reaching(row: torch.Tensor, token: int) -> float:
        lo, hi = 0.0, 1.0  # smallest u whose draw is >= token
        for _ in range(60):
            mid = (lo + hi) / 2
            if int(sample_rows(row, u=torch.tensor([[mid]], dtype=torch.float64))) >= token:
                hi = mid
            else:
                lo = mid
        return hi

    for r in range(probs.shape[0]):
        row = probs[r : r + 1]
        width = first_u_reaching(row, 1024) - first_u_reaching(row, 1023)
        true = float(row[0, 1023].double() / row.double().sum())
        assert width == pytest.approx(true, rel=0.01), r


# -- on a GPU, nothing waits for the device (async scheduling's overlap depends on it) ---------
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _interpreted_triton():
    return pytest.importorskip("triton")


def test_wide_row_kernel_equals_sorting_the_row():
    """triton_sample's kernel (rows whose nucleus or top-k tie reaches past the candidates) against
    the whole-row sort and the float64 inverse CDF, with the same draws: flat and peaked rows, ties at
    the k-th value, top-k with top-p, tokens a grammar masked (-inf), and rows it must leave alone."""
    _interpreted_triton()
    from tokenmill.sample.sampler import _min_p, _top_k_top_p_sorted, sample_rows
    from tokenmill.sample.triton_sample import wide_sample_

    dev = DEVICES[-1]
    g = torch.Generator().manual_seed(0)
    vocab = 3000
    rows, ks, ps = [], [], []
    for i in range(18):
        kind = i % 6
        if kind == 0:
            row, k, p = torch.randn(vocab, generator=g) * 0.01, vocab, 0.95  # flat: a nucleus of thousands
        elif kind == 1:
            row, k, p = torch.randn(vocab, generator=g) * 3, vocab, 0.999
        elif kind == 2:
            row, k, p = torch.zeros(vocab), 50, 1.0  # the 50th value ties past the candidates
            row[:400] = 5.0
        elif kind == 3:
            row, k, p = torch.randn(vocab, generator=g) * 0.5, 600, 0.7
        elif kind == 4:
            row, k, p = torch.randn(vocab, generator=g) * 0.2, vocab, 0.9
            row[torch.randperm(vocab, generator=g)[:2000]] = float("-inf")  # a grammar's mask
        else:  # -0.0 ties with +0.0 at the k-th value
            row, k, p = torch.full((vocab,), float("-inf")), 2, 1.0
            row[7], row[100], row[2000] = 1.0, 0.0, -0.0
        rows.append(row)
        ks.append(k)
        ps.append(p)
    logits = torch.stack(rows).to(dev)
    kk, pp = torch.tensor(ks, device=dev), torch.tensor(ps, device=dev)
    temp = torch.linspace(0.6, 1.4, 18, device=dev)
    u = torch.rand(18, 1, generator=g, dtype=torch.float64).to(dev)
    u[11, 0] = 0.99  # (the -0.0 row: past +0.0's and 1.0's share of the draw)
    wide = torch.ones(18, dtype=torch.bool, device=dev)
    wide[[3, 7]] = False
    tokens = torch.full((18,), -1, dtype=torch.long, device=dev)
    # A min-p floor on some rows (row 15's leaves fewer than its top_k of 600)
    mp = torch.tensor([0.0] * 12 + [0.02, 0.0, 0.05, 0.6, 0.0, 0.0], device=dev)
    wide_sample_(logits, temp, kk, pp, torch.log(mp), wide, u, tokens)
    ref = sample_rows(torch.softmax(_top_k_top_p_sorted(_min_p(logits / temp[:, None], mp), kk, pp), dim=-1), u=u)
    want = torch.where(wide, ref, -1)
    assert tokens.tolist() == want.tolist()
    assert all(torch.isfinite(logits[i, t]) for i, t in enumerate(tokens.tolist()) if t >= 0)
    assert tokens[11] == 2000


def test_wide_row_kernel_sums_the_cdf_in_float64():
    """A token after a mass 1e8 times larger keeps its share of the draws over a 152K vocabulary
    (a float32 running sum stops growing there)."""
    _interpreted_triton()
    from tokenmill.sample.triton_sample import wide_sample_

    dev = DEVICES[-1]
    vocab = 152_000
    row = torch.full((1, vocab), -60.0, device=dev)
    row[0, -3:] = torch.tensor([0.0, math.log(1e-8), math.log(1e-8)])  # (in one block of the kernel's sums)
    total = 1.0 + 2e-8
    one = torch.ones(1, device=dev)
    for u, want in (((1 + 0.5e-8) / total, vocab - 2), ((1 + 1.5e-8) / total, vocab - 1), (0.3, vocab - 3)):
        tokens = torch.zeros(1, dtype=torch.long, device=dev)
        wide_sample_(row, one, torch.full((1,), 3, device=dev), one.clone(), torch.log(one * 1e-30), one.bool(),
                     torch.tensor([[u]], dtype=torch.float64, device=dev), tokens)
        assert int(tokens) == want


def test_wide_row_kernel_draws_from_the_nucleus():
    """Many draws from one flat row: only nucleus tokens, and a spread over most of them."""
    _interpreted_triton()
    from tokenmill.sample.triton_sample import wide_sample_

    dev = DEVICES[-1]
    vocab, n = 600, 64
    row = torch.linspace(0.0, 1.0, vocab, device=dev)  # increasing: the nucleus is the tail of the ids
    probs = torch.softmax(row, 0).double()
    order = probs.argsort(descending=True)
    before = probs[order].cumsum(0) - probs[order]
    nucleus = set(order[before < 0.5].tolist())
    tokens = torch.zeros(n, dtype=torch.long, device=dev)
    wide_sample_(row.expand(n, -1).contiguous(), torch.ones(n, device=dev), torch.full((n,), vocab, device=dev),
                 torch.full((n,), 0.5, device=dev), torch.full((n,), float("-inf"), device=dev),
                 torch.ones(n, dtype=torch.bool, device=dev),
                 torch.rand(n, 1, dtype=torch.float64, device=dev), tokens)
    got = set(tokens.tolist())
    assert got <= nucleus and len(got) > n // 3


EOS = 40  # (not 0: an all -inf row's argmax is 0)


def _every_kind_of_row(device: torch.device, vocab: int, outputs: bool = True):
    """A batch with every sampling feature: greedy, plain, top-k, top-p (peaked and flat: a nucleus
    past the candidates), min-p-free seeded rows, logit_bias, min_tokens bans, penalties, a forced
    token, and grammar masks; returns (logits, sequences, bitmask, mask rows)."""
    g = torch.Generator().manual_seed(3)
    kinds = [dict(temperature=0), dict(temperature=0.9, max_reasoning_tokens=4), dict(temperature=0.8, top_k=20),
             dict(temperature=1.0, top_p=0.9), dict(temperature=1.0, top_p=0.95, seed=7),
             dict(temperature=0.7, logit_bias={5: 100.0, 9: -100.0}), dict(temperature=0, min_tokens=3),
             dict(temperature=0.9, top_p=0.8, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.4),
             dict(temperature=0, repetition_penalty=2.0), dict(temperature=0.8, top_k=5, seed=11),
             dict(temperature=1.0, min_tokens=2, stop_token_ids=[4])]
    params = [SamplingParams(**kw) for kw in kinds]
    seqs = []
    for i, p in enumerate(params):
        p._eos_token_ids = (EOS,)
        s = Request(str(i), None, [1, 2, 3, 2 + i], p, 0.0).seqs[0]
        if outputs:
            s.token_ids.extend([7, 8, 7][: i % 4])
        if p.seed is not None:
            s.generator = torch.Generator(device=device).manual_seed(p.seed)
        seqs.append(s)
    seqs[1].forced = [12]  # a reasoning budget closing its section
    logits = torch.randn(len(seqs), vocab, generator=g) * 4
    logits[4] = torch.randn(vocab, generator=g) * 0.01  # flat: its nucleus is past the candidates
    mask_rows = [2, 6]
    bitmask = torch.zeros(2, (vocab + 31) // 32, dtype=torch.int32)
    bitmask[0, :4] = -1  # tokens 0..127
    bitmask[1, EOS // 32] = 1 << (EOS % 32)  # EOS alone, which min_tokens bans: the grammar wins
    return logits.to(device), seqs, bitmask, mask_rows


def _reference_constrain(logits: torch.Tensor, seqs, bitmask: torch.Tensor, mask_rows: list[int]) -> torch.Tensor:
    """Each row's logits constrained one by one, from the definitions: logit_bias added; a grammar's
    forbidden tokens -inf; min_tokens bans (EOS and stop ids) unless the grammar allows nothing else;
    a reasoning budget's forced token alone; repetition (prompt and output tokens), frequency and
    presence penalties."""
    out = logits.double().cpu().clone()
    for i, s in enumerate(seqs):
        p, row = s.params, out[i]
        for t, v in (p.logit_bias or {}).items():
            row[t] += v
        if i in mask_rows:
            words = bitmask[mask_rows.index(i)].tolist()
            for t in range(len(row)):
                if not (words[t // 32] >> (t % 32)) & 1:
                    row[t] = float("-inf")
        if s.num_output_tokens < p.min_tokens:
            banned = row.clone()
            banned[list(p.stop_token_ids) + list(p._eos_token_ids)] = float("-inf")
            if torch.isfinite(banned).any():
                row[:] = banned
        if s.forced:
            token = s.forced[0]
            row[:] = float("-inf")
            row[token] = 0.0
        outputs = s.token_ids[s.num_prompt_tokens :]
        for t in set(s.token_ids):
            if p.repetition_penalty != 1.0:
                row[t] = row[t] / p.repetition_penalty if row[t] > 0 else row[t] * p.repetition_penalty
        for t in set(outputs):
            row[t] -= p.frequency_penalty * outputs.count(t) + p.presence_penalty
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("outputs", [True, False], ids=["outputs", "none-yet"])
def test_staged_metadata_constrains_as_defined(device, outputs):
    """Metadata whose per-row work (bans, biases, forced tokens, penalty counts, grammar masks, plain
    rows) reaches the device in the one staged copy: the constrained logits are those of the
    definitions applied row by row, and the tokens drawn those of metadata built without staging."""
    from tokenmill.engine.input_batch import SamplingColumns, Staging

    dev = torch.device(device)
    vocab = 2000
    logits, seqs, bitmask, mask_rows = _every_kind_of_row(dev, vocab, outputs)
    stage = Staging(dev)
    stage._pack = True  # (on a CPU too: the packed buffer's views)
    staged = SamplingMetadata.from_columns(SamplingColumns.of(seqs), seqs, vocab, dev, stage=stage,
                                           bitmask=bitmask, mask_rows=mask_rows)
    assert staged.plain_rows is not None and staged.plain_rows.tolist() == [1, 5, 10]
    want = _reference_constrain(logits, seqs, bitmask, mask_rows)
    torch.testing.assert_close(Sampler()._constrain(logits.float(), staged).double().cpu(), want,
                               rtol=1e-6, atol=1e-5)
    torch.manual_seed(5)
    got = Sampler().tokens(logits, staged).tolist()
    logits2, seqs, _, _ = _every_kind_of_row(dev, vocab, outputs)
    torch.manual_seed(5)
    assert got == Sampler().tokens(logits2, SamplingMetadata.from_sequences(seqs, vocab, dev, bitmask,
                                                                            mask_rows)).tolist()
    assert got[1] == 12 and got[5] == 5 and got[6] == EOS and got[2] < 128
    if not outputs:
        assert got[10] not in (4, EOS)


@pytest.mark.parametrize("device", DEVICES)
def test_sampling_never_waits_for_the_device(device, monkeypatch):
    """Building staged metadata and sampling a batch with every feature makes no copy from a host
    list (a copy that waits for the device) and reads nothing back: on a GPU the sync debug mode
    errors on any wait; on a CPU, the calls that would wait there are refused. Rows whose nucleus is
    past the candidates take the kernel (interpreted on a CPU)."""
    _interpreted_triton()
    import tokenmill.sample.sampler as sampler_mod
    from tokenmill.engine.input_batch import SamplingColumns, Staging

    dev = torch.device(device)
    vocab = 2000
    logits, seqs, bitmask, mask_rows = _every_kind_of_row(dev, vocab)
    cols = SamplingColumns.of(seqs)
    stage = Staging(dev)
    stage._pack = True
    # (on a GPU machine the kernel is compiled, for CUDA tensors only: the CPU case sorts there)
    monkeypatch.setattr(sampler_mod, "WIDE_KERNEL", dev.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")
    Sampler().tokens(logits, SamplingMetadata.from_columns(cols, seqs, vocab, dev, stage=stage, bitmask=bitmask,
                                                           mask_rows=mask_rows))  # (warm: the kernel compiles)

    def refuse(name):
        def f(*a, **k):
            raise AssertionError(f"{name}: waits for the device")
        return f

    class Reads(TorchDispatchMode):
        """Refuses the ops that read a tensor's values back to the host (item, bool, nonzero...)."""
        inside = 0  # (sample_rows' zero-probability check reads them on a CPU only)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
                        torch.ops.aten.masked_select.default, torch.ops.aten.item.default,
                        torch.ops.aten.is_nonzero.default) and not Reads.inside:  # (the last two: inference mode)
                raise AssertionError(f"{func}: reads the device's values")
            return func(*args, **(kwargs or {}))

    def sample_rows(*a, _orig=sampler_mod.sample_rows, **k):
        Reads.inside += 1
        try:
            return _orig(*a, **k)
        finally:
            Reads.inside -= 1

    with monkeypatch.context() as m, contextlib.ExitStack() as stack:
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        else:
            m.setattr(torch, "tensor", refuse("torch.tensor"))
            m.setattr(sampler_mod, "sample_rows", sample_rows)
            stack.enter_context(Reads())
        stack.enter_context(torch.inference_mode())  # (as the runner samples)
        try:
            md = SamplingMetadata.from_columns(cols, seqs, vocab, dev, stage=stage, bitmask=bitmask,
                                               mask_rows=mask_rows)
            tokens = Sampler().tokens(logits, md)
        finally:
            if dev.type == "cuda":
                torch.cuda.set_sync_debug_mode(0)
    assert tokens.shape == (len(seqs),)
    assert tokens[1].item() == 12


def test_min_p_with_top_p_keeps_the_ties_the_whole_row_filter_keeps():
    """Rows with min-p and top-p whose nucleus edge falls among 300 tied tokens (past the candidates):
    sampling keeps the tied tokens that Sampler._filter (speculative decoding's distribution) keeps,
    so both paths agree token for token."""
    from tokenmill.sample.sampler import draws, sample_rows

    vocab = 3000
    row = torch.zeros(vocab)
    row[:300] = 5.0
    logits = row.expand(16, -1).clone()

    def metadata():
        seqs = _seqs([SamplingParams(temperature=1.0, min_p=0.2, top_p=0.1, seed=i) for i in range(16)])
        return SamplingMetadata.from_sequences(seqs, vocab, torch.device("cpu"))

    got = Sampler().tokens(logits, metadata()).tolist()
    md = metadata()
    u = draws(16, md.generators, torch.device("cpu"))
    assert got == sample_rows(torch.softmax(Sampler._filter(logits, md), dim=-1), u=u).tolist()


def test_allowed_token_ids_mask_every_sampled_token(model_dir):
    """vLLM's allowed_token_ids: only those tokens are sampled, greedy or not, with speculative
    decoding's drafts verified under the same mask; a bad list or beam search is refused."""
    from tokenmill import LLM, SamplingParams

    llm = LLM(model_dir, kv_cache_memory_bytes=8 * 2**20)
    prompt = {"prompt_token_ids": [5, 6, 7, 5, 6, 7, 5, 6]}
    free = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0]
    allowed = sorted({*free.token_ids[1:], 40, 41, 42} - {free.token_ids[0]})
    for sp in (SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, allowed_token_ids=allowed),
               SamplingParams(temperature=1.0, seed=3, max_tokens=24, ignore_eos=True, allowed_token_ids=allowed,
                              logprobs=1)):
        out = llm.generate(prompt, sp)[0].outputs[0]
        assert out.token_ids and set(out.token_ids) <= set(allowed) and out.token_ids[0] != free.token_ids[0]
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, allowed_token_ids=allowed)
    want = llm.generate(prompt, greedy)[0].outputs[0].token_ids
    spec = LLM(model_dir, kv_cache_memory_bytes=8 * 2**20,
               speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    assert spec.generate(prompt, greedy)[0].outputs[0].token_ids == want
    for bad, match in [([], "non-empty"), ([10**7], "not token ids"),
                       ([True], "not token ids")]:
        with pytest.raises(ValueError, match=f"^allowed_token_ids: .*{match}"):
            llm.generate(prompt, SamplingParams(allowed_token_ids=bad))
    with pytest.raises(ValueError, match="^allowed_token_ids: not supported with use_beam_search"):
        llm.generate(prompt, SamplingParams(n=2, use_beam_search=True, allowed_token_ids=[5]))
    eos = llm.engine.eos_token_ids[0]
    with pytest.raises(ValueError, match="^allowed_token_ids: only end-of-sequence or stop tokens"):
        llm.generate(prompt, SamplingParams(min_tokens=4, allowed_token_ids=[eos]))
    # A queued request keeps the list it was given, whatever its caller does with it afterwards.
    sp = SamplingParams(max_tokens=3, ignore_eos=True, allowed_token_ids=[40, 41])
    rid = llm.engine.add_request(prompt, sp)
    sp.allowed_token_ids[:] = [300]
    done = {}
    while llm.engine.has_unfinished_requests():
        done.update({o.request_id: o for o in llm.engine.step() if o.finished})
    assert set(done[rid].outputs[0].token_ids) <= {40, 41}


def _holds(tokens: list[int], word: tuple[int, ...]) -> bool:
    return any(tuple(tokens[i:i + len(word)]) == word for i in range(len(tokens) - len(word) + 1))


def test_bad_words_never_appear_in_the_output(model_dir):
    """vLLM's bad_words: words of the greedy output, banned, appear in no output (greedy, sampled, a
    grammar's row beside); as they start the text and after a space; multi-token words are banned
    at their last token only when the rest was just written. Refused: empty words, beam search."""
    from tokenmill import LLM, SamplingParams
    from tokenmill.engine.llm_engine import bad_words_token_ids

    llm = LLM(model_dir, kv_cache_memory_bytes=8 * 2**20)
    prompt = "The quick brown fox"
    free = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0].outputs[0]
    words = [w for w in free.text.split() if len(w) > 2][:3]
    ids = bad_words_token_ids(llm.get_tokenizer(), words)
    assert any(len(w) > 1 for w in ids) and any(_holds(free.token_ids, w) for w in ids)
    for sp in (SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, bad_words=words),
               SamplingParams(temperature=1.0, seed=4, max_tokens=40, ignore_eos=True, bad_words=words)):
        out = llm.generate(prompt, sp)[0].outputs[0]
        assert len(out.token_ids) == sp.max_tokens and not any(_holds(out.token_ids, w) for w in ids), words
    greedy = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, bad_words=words)
    banned = llm.generate(prompt, greedy)[0].outputs[0].token_ids
    spec = LLM(model_dir, kv_cache_memory_bytes=8 * 2**20,
               speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    assert spec.generate(prompt, greedy)[0].outputs[0].token_ids == banned  # (such rows take no drafts)
    # A mask that allows only a bad word and EOS, before min_tokens: the bans together would leave
    # nothing, so the mask wins (the sampler emitted tokens outside it).
    one = next(w for w in ids if len(w) == 1)
    eos = llm.engine.eos_token_ids[0]
    for sp in (SamplingParams(temperature=0, max_tokens=6, min_tokens=3, allowed_token_ids=[one[0], eos],
                              bad_words=words),
               SamplingParams(temperature=1.0, seed=1, max_tokens=6, min_tokens=3, allowed_token_ids=[one[0], eos],
                              bad_words=words)):
        assert set(llm.generate(prompt, sp)[0].outputs[0].token_ids) <= {one[0], eos}
    for bad, match in [([""], "non-empty"), (["  "], "non-empty"), ("word", "list")]:
        with pytest.raises(ValueError, match=f"^bad_words: .*{match}"):
            llm.generate(prompt, SamplingParams(bad_words=bad))
    with pytest.raises(ValueError, match="^bad_words: not supported with use_beam_search"):
        llm.generate(prompt, SamplingParams(n=2, use_beam_search=True, bad_words=["x"]))


def test_allowed_token_ids_beside_and_with_a_grammar(model_dir):
    """One batch with a grammar's row, an allowed_token_ids row and a row with both: each row's mask."""
    from tokenmill import LLM, SamplingParams
    from tokenmill.structured import StructuredOutputsParams

    llm = LLM(model_dir, kv_cache_memory_bytes=8 * 2**20)
    tok = llm.get_tokenizer()
    choice = StructuredOutputsParams(choice=["yes please", "no thanks"])
    everything = list(range(llm.engine.model_config.vocab_size))
    outs = llm.generate(["Answer:", "Go on:", "Again:"], [
        SamplingParams(temperature=1.0, seed=1, max_tokens=12, structured_outputs=choice),
        SamplingParams(temperature=1.0, seed=2, max_tokens=12, ignore_eos=True, allowed_token_ids=[40, 41, 42]),
        SamplingParams(temperature=1.0, seed=3, max_tokens=12, structured_outputs=choice,
                       allowed_token_ids=everything)])
    assert outs[0].outputs[0].text in ("yes please", "no thanks")
    assert set(outs[1].outputs[0].token_ids) <= {40, 41, 42} and len(outs[1].outputs[0].token_ids) == 12
    assert outs[2].outputs[0].text in ("yes please", "no thanks") and tok is not None
