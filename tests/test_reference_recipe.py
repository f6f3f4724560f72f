"""Recipe references (Long2Short, pass@k, learning potential, CLR) against hand-worked values and brute force."""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from fractions import Fraction

import numpy as np
import pytest
import torch

from vibeperf.reference import clr_aggregate_reference, clr_reliability, learning_potential, long2short_shift, pass_at_k


def loop_long2short(rewards, lengths, groups, lam=0.2, threshold=1.0):
    members = defaultdict(list)
    for i, g in enumerate(groups):
        if rewards[i] >= threshold:
            members[g].append(i)
    out = list(rewards)
    for correct in members.values():
        if len(correct) < 2 or len({lengths[i] for i in correct}) == 1:
            continue
        s = {i: 1.0 / lengths[i] for i in correct}
        s_bar = sum(s.values()) / len(correct)
        scale = max(abs(v - s_bar) for v in s.values())
        for i in correct:
            out[i] = rewards[i] + lam * (s[i] - s_bar) / scale
    return out


L2S_CASES = [
    # s = 1/L = [1, 1/2, 1/4] (scale-free), s_bar = 7/12, deviations 5/12, -1/12, -4/12, max 5/12:
    # shifts 0.2 * [1, -1/5, -4/5] = [0.2, -0.04, -0.16]; the wrong answer keeps 0.
    ("hand-3-correct", [1.0, 1.0, 1.0, 0.0], [100, 200, 400, 300], [0, 0, 0, 0], 0.2, [1.2, 0.96, 0.84, 0.0]),
    # Two correct: s_bar halfway, so the shorter gains lam and the longer loses lam.
    ("two-correct", [1.0, 0.0, 1.0], [10, 5, 30], [0, 0, 0], 0.2, [1.2, 0.0, 0.8]),
    ("one-correct", [1.0, 0.0, 0.0], [10, 5, 30], [0, 0, 0], 0.2, [1.0, 0.0, 0.0]),
    ("none-correct", [0.0, 0.5, 0.0], [10, 5, 30], [0, 0, 0], 0.2, [0.0, 0.5, 0.0]),
    ("equal-lengths", [1.0, 1.0, 1.0, 0.0], [3, 3, 3, 7], [0, 0, 0, 0], 0.2, [1.0, 1.0, 1.0, 0.0]),
    # Ten times 1/3 summed and divided by 10 is not 1/3 in fp64: the rule must look at the lengths themselves.
    ("equal-lengths-rounding", [1.0] * 10 + [0.0], [3] * 10 + [5], [0] * 11, 0.2, [1.0] * 10 + [0.0]),
    (
        "two-groups-lam-0.5",
        [1.0, 1.0, 0.0, 1.0, 1.0],
        [4, 2, 9, 6, 6],
        [1, 1, 1, 0, 0],
        0.5,
        [0.5, 1.5, 0.0, 1.0, 1.0],
    ),
]


@pytest.mark.parametrize("rewards,lengths,groups,lam,want", [c[1:] for c in L2S_CASES], ids=[c[0] for c in L2S_CASES])
def test_long2short_by_hand(rewards, lengths, groups, lam, want):
    got = long2short_shift(
        torch.tensor(rewards, dtype=torch.float64), torch.tensor(lengths), torch.tensor(groups), lam=lam
    )
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-15)
    torch.testing.assert_close(got.tolist(), loop_long2short(rewards, lengths, groups, lam), rtol=0, atol=1e-15)


@pytest.mark.parametrize("seed", range(4), ids=[f"seed{s}" for s in range(4)])
def test_long2short_properties_random(seed):
    gen = torch.Generator().manual_seed(seed)
    groups = torch.randint(0, 6, (40,), generator=gen)
    rewards = (torch.rand(40, generator=gen) < 0.6).float()
    rewards[::7] = 0.5
    lengths = torch.randint(1, 50, (40,), generator=gen)
    got = long2short_shift(rewards, lengths, groups)
    assert got.dtype == torch.float32
    want = loop_long2short(rewards.tolist(), lengths.tolist(), groups.tolist())
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32))
    correct = rewards >= 1
    assert torch.equal(got[~correct], rewards[~correct])
    got64 = long2short_shift(rewards.double(), lengths, groups)
    for g in groups.unique():
        in_c = correct & (groups == g)
        assert abs(float((got64 - rewards.double())[in_c].sum())) < 1e-12
        if in_c.sum() >= 2 and lengths[in_c].unique().numel() > 1:
            assert float((got64 - rewards.double())[in_c].abs().max()) == pytest.approx(0.2, abs=1e-15)


def test_long2short_threshold_and_bad_lengths():
    got = long2short_shift(torch.tensor([0.9, 0.95, 0.1]), torch.tensor([10, 20, 5]), torch.zeros(3, dtype=torch.int64))
    assert torch.equal(got, torch.tensor([0.9, 0.95, 0.1]))
    got = long2short_shift(
        torch.tensor([0.9, 0.95, 0.1]),
        torch.tensor([10, 20, 5]),
        torch.zeros(3, dtype=torch.int64),
        correct_threshold=0.9,
    )
    torch.testing.assert_close(got, torch.tensor([1.1, 0.75, 0.1]))
    with pytest.raises(ValueError, match="lengths"):
        long2short_shift(torch.tensor([1.0, 1.0]), torch.tensor([0, 3]), torch.zeros(2, dtype=torch.int64))


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of the k-subsets of n samples (the first c correct) that hold at least one correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


PASS_TRIPLES = [(n, c, k) for n in range(1, 8) for c in range(n + 1) for k in range(1, n + 1)]


def test_pass_at_k_matches_enumeration():
    want = np.array([brute_pass_at_k(*t) for t in PASS_TRIPLES])
    got_scalar = np.array([pass_at_k(*t) for t in PASS_TRIPLES])
    n, c, k = (np.array(x) for x in zip(*PASS_TRIPLES))
    got_vec = pass_at_k(n, c, k)
    assert isinstance(got_vec, np.ndarray) and got_vec.dtype == np.float64 and got_vec.shape == (len(PASS_TRIPLES),)
    np.testing.assert_allclose(got_scalar, want, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(got_vec, want, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize(
    "n,c,k",
    [(200, 1, 1), (200, 1, 10), (200, 5, 100), (200, 100, 10), (1000, 3, 7), (1024, 512, 1), (64, 60, 5)],
    ids=lambda v: str(v),
)
def test_pass_at_k_large_n_exact_fraction(n, c, k):
    want = float(1 - Fraction(math.comb(n - c, k), math.comb(n, k)))
    assert pass_at_k(n, c, k) == pytest.approx(want, rel=1e-12)
    assert pass_at_k([n], [c], k)[0] == pytest.approx(want, rel=1e-12)


def test_pass_at_k_broadcasts_and_raises():
    got = pass_at_k(16, [0, 1, 16], [[1], [4]])
    assert got.shape == (2, 3)
    np.testing.assert_allclose(got, [[0.0, 1 / 16, 1.0], [0.0, 4 / 16, 1.0]], rtol=1e-13)
    assert isinstance(pass_at_k(np.int64(4), 2, 2), float)
    for args in [(3, 1, 4), ([3, 5], [1, 1], 4)]:
        with pytest.raises(ValueError, match="k <= n"):
            pass_at_k(*args)
    for args in [(3, 4, 1), (3, -1, 1), (3, 1, 0)]:
        with pytest.raises(ValueError):
            pass_at_k(*args)


LP_CASES = [
    # seq 0: -(-1 - 3) / 2 = 2; seq 1: -(-0.5 - 0.5 - 2) / 3 = 1.
    ("hand", [-1.0, -3.0, -0.5, -0.5, -2.0], [0, 0, 1, 1, 1], None, None, [2.0, 1.0]),
    ("interleaved", [-1.0, -0.5, -3.0, -0.5, -2.0], [0, 1, 0, 1, 1], None, None, [2.0, 1.0]),
    ("mask", [-1.0, -3.0, -0.5, -9.0, -2.0], [0, 0, 1, 1, 1], [True, True, True, False, True], None, [2.0, 1.25]),
    ("empty-seq", [-1.0, -3.0, -2.0], [0, 0, 2], None, 4, [2.0, 0.0, 2.0, 0.0]),
]


@pytest.mark.parametrize("logp,seq,mask,num,want", [c[1:] for c in LP_CASES], ids=[c[0] for c in LP_CASES])
def test_learning_potential(logp, seq, mask, num, want):
    mask_t = None if mask is None else torch.tensor(mask)
    got = learning_potential(torch.tensor(logp), torch.tensor(seq), num_sequences=num, mask=mask_t)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor(want))
    got64 = learning_potential(
        torch.tensor(logp, dtype=torch.float64), torch.tensor(seq), num_sequences=num, mask=mask_t
    )
    torch.testing.assert_close(got64, torch.tensor(want, dtype=torch.float64), rtol=1e-15, atol=0)


def test_clr_reliability():
    four_of_five = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    assert clr_reliability(four_of_five).item() == pytest.approx(0.32768, rel=1e-14)  # 0.8 ** 5
    verdicts = torch.stack([four_of_five, torch.ones(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)])
    torch.testing.assert_close(clr_reliability(verdicts), torch.tensor([0.32768, 1.0, 0.0], dtype=torch.float64))
    batched = clr_reliability(torch.stack([verdicts, verdicts.flip(0)]).float())
    assert batched.shape == (2, 3) and batched.dtype == torch.float32
    torch.testing.assert_close(batched[1], torch.tensor([0.0, 1.0, 0.32768]))
    probs = torch.tensor([[0.5, 0.9, 1.0]])  # mean 0.8, M = 3
    torch.testing.assert_close(clr_reliability(probs), torch.tensor([0.8**3]))


ONE, HALF, ZERO = [1.0, 1.0], [1.0, 0.0], [0.0, 0.0]  # M = 2 verdicts: r = 1, 0.25, 0 (exact in binary)
CLR_CASES = [
    # Cluster 0: two trajectories with 3 of 5 claims, 2 * 0.6^5 = 0.15552; cluster 1: one perfect, 1.0.
    ("score-beats-size", [0, 0, 1], [[1, 1, 1, 0, 0], [0, 1, 1, 0, 1], [1] * 5], 1, {0: 0.15552, 1: 1.0}),
    ("equal-score-larger-wins", [0, 1, 1, 1, 1], [ONE, HALF, HALF, HALF, HALF], 1, {0: 1.0, 1: 1.0}),
    ("equal-score-size-first-seen", [3, 1, 3, 1], [ONE, ONE, ONE, ONE], 3, {3: 2.0, 1: 2.0}),
    ("first-seen-not-smallest-id", [5, 2, 9], [HALF, HALF, ZERO], 5, {5: 0.25, 2: 0.25, 9: 0.0}),
    ("all-zero-larger-wins", [2, 0, 0, 1], [ZERO] * 4, 0, {2: 0.0, 0: 0.0, 1: 0.0}),
    ("all-zero-distinct-first", [4, 3, 2], [ZERO] * 3, 4, {4: 0.0, 3: 0.0, 2: 0.0}),
    ("single-trajectory", [7], [HALF], 7, {7: 0.25}),
    ("probabilities", [0, 1, 0], [[0.9, 0.7], [1.0, 0.9], [0.1, 0.3]], 1, {0: 0.64 + 0.04, 1: 0.9025}),
]


@pytest.mark.parametrize("ids,verdicts,want,scores", [c[1:] for c in CLR_CASES], ids=[c[0] for c in CLR_CASES])
def test_clr_aggregate_by_hand(ids, verdicts, want, scores):
    chosen, got_scores = clr_aggregate_reference(torch.tensor([ids]), torch.tensor([verdicts], dtype=torch.float64))
    assert chosen.dtype == torch.int64 and chosen.tolist() == [want]
    assert list(got_scores[0]) == list(scores)  # first-seen order
    assert got_scores[0] == pytest.approx(scores, rel=1e-12)


def test_clr_aggregate_batched_against_sorting():
    # M = 2 binary verdicts make every score a multiple of 0.25, so ties are frequent and exact.
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 4, (64, 8), generator=gen)
    verdicts = torch.randint(0, 2, (64, 8, 2), generator=gen).float()
    chosen, scores = clr_aggregate_reference(ids, verdicts)
    r = clr_reliability(verdicts.double())
    for q in range(64):
        row = ids[q].tolist()
        score = {g: float(r[q][ids[q] == g].sum()) for g in set(row)}
        ranked = sorted(score, key=lambda g: (-score[g], -row.count(g), row.index(g)))
        assert chosen[q].item() == ranked[0]
        assert scores[q] == score


def test_clr_aggregate_bad_inputs():
    with pytest.raises(ValueError, match=">= 0"):
        clr_aggregate_reference(torch.tensor([[0, -1]]), torch.ones(1, 2, 3))
    with pytest.raises(ValueError, match="Q, K"):
        clr_aggregate_reference(torch.tensor([0, 1]), torch.ones(2, 3))
