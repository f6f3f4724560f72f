"""The vectorised CLR aggregator against the plain-Python reference."""

import pytest
import torch

from vibeperf.clr import clr_aggregate
from vibeperf.reference import clr_aggregate_reference


def _random_case(q, k, m, num_answers, binary, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, num_answers, (q, k), generator=g)
    v = torch.randint(0, 2, (q, k, m), generator=g).double() if binary else torch.rand(q, k, m, generator=g).double()
    return ids, v


@pytest.mark.parametrize(
    "q, k, m, answers, binary",
    [(64, 32, 5, 4, True), (50, 32, 5, 32, False), (40, 7, 3, 3, True), (30, 1, 5, 1, True), (25, 16, 1, 2, True)],
    ids=["Q64-K32-M5-binary", "Q50-K32-M5-prob", "K7-M3", "K1", "M1"],
)
def test_matches_reference(q, k, m, answers, binary):
    ids, v = _random_case(q, k, m, answers, binary, seed=q + k)
    out = clr_aggregate(ids, v)
    ref_chosen, ref_scores = clr_aggregate_reference(ids, v)
    assert torch.equal(out.chosen, ref_chosen)
    for qi, scores in enumerate(ref_scores):
        for cid, s in scores.items():
            assert out.scores[qi, cid].item() == pytest.approx(s, rel=1e-12, abs=1e-15)


def test_four_of_five_valid_claims():
    out = clr_aggregate(torch.tensor([[0]]), torch.tensor([[[1.0, 1, 1, 1, 0]]]))
    assert out.reliability.item() == pytest.approx(0.32768, abs=1e-15)


def test_ties_larger_cluster_then_first_seen():
    v_one, v_zero = [1.0] * 5, [0.0] * 5
    # cluster 2: one member with r=1; cluster 0: two members with r=0.5+0.5 -> equal scores, cluster 0 larger
    half = [1.0] * 5
    ids = torch.tensor([[2, 0, 0]])
    v = torch.tensor([[v_one, half, v_zero]])
    v[0, 1] = torch.tensor([0.5**0.2] * 5)  # mean^5 = 0.5
    v[0, 2] = torch.tensor([0.5**0.2] * 5)
    assert clr_aggregate(ids, v).chosen.item() == 0
    assert clr_aggregate_reference(ids, v)[0].item() == 0
    # equal score and size: the cluster seen first wins, whatever its id
    ids = torch.tensor([[3, 1]])
    v = torch.tensor([[v_one, v_one]])
    assert clr_aggregate(ids, v, num_clusters=4).chosen.item() == 3
    assert clr_aggregate_reference(ids, v)[0].item() == 3


def test_all_zero_reliabilities_fall_back_to_the_largest_cluster():
    ids = torch.tensor([[1, 0, 0, 2]])
    v = torch.zeros(1, 4, 5)
    assert clr_aggregate(ids, v).chosen.item() == 0
    assert clr_aggregate_reference(ids, v)[0].item() == 0


def test_bad_shapes():
    with pytest.raises(ValueError, match="need cluster_ids"):
        clr_aggregate(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4, 5))
