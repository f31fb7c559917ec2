"""Probe metrics on constructed embeddings whose answers are computed by hand."""

import math

import pytest
import torch

from emf_lightning.metrics import probe as P


def test_masked_mean_ignores_padding():
    tokens = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, -100.0]], [[5.0, 6.0], [7.0, 8.0], [9.0, 10.0]]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    assert torch.allclose(P.masked_mean(tokens, mask), torch.tensor([[2.0, 3.0], [7.0, 8.0]]))


def test_masked_mean_rejects_empty_row():
    with pytest.raises(ValueError, match=r"rows \[1\] have an empty mask"):
        P.masked_mean(torch.ones(2, 2, 3), torch.tensor([[True, False], [False, False]]))


def _clusters(n_clusters: int, per: int, dim: int, noise: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(dim)[:n_clusters] * 5
    labels = torch.arange(n_clusters).repeat_interleave(per)
    feats = centres[labels] + noise * torch.randn(len(labels), dim, generator=g)
    same = labels[:, None] == labels[None, :]
    return feats, labels, same


def test_retrieval_orthogonal_clusters_is_perfect():
    feats, labels, same = _clusters(3, 3, 8, noise=0.1)
    out = P.retrieval_discriminability(feats, same.double(), k=2)
    assert out["relevance_at_k"] == 1.0
    assert out["ideal_relevance_at_k"] == 1.0
    assert out["exact_precision_at_k"] == 1.0
    # A random ranking would find 2 same-cluster captions among the 8 others.
    assert out["chance_relevance"] == pytest.approx(2 / 8)
    assert out["normalized_relevance_at_k"] == pytest.approx(1.0)


def test_retrieval_hand_computed_partial():
    # Four captions on the unit circle at 0, 10, 80, 90 degrees: neighbours are 0<->1, 2<->3.
    ang = torch.tensor([0.0, 10.0, 80.0, 90.0]) * math.pi / 180
    feats = torch.stack([ang.cos(), ang.sin()], dim=1)
    # Relevance says 0 and 2 depict the same scene (1.0), 1 and 3 half overlap; nothing else relates.
    rel = torch.zeros(4, 4)
    rel[0, 2] = rel[2, 0] = 1.0
    rel[1, 3] = rel[3, 1] = 0.5
    out = P.retrieval_discriminability(feats, rel, k=1)
    # Retrieved: 0->1 (0), 1->0 (0), 2->3 (0), 3->2 (0): nothing relevant.
    assert out["relevance_at_k"] == 0.0
    assert out["ideal_relevance_at_k"] == pytest.approx((1 + 0.5 + 1 + 0.5) / 4)
    assert out["chance_relevance"] == pytest.approx(3.0 / 12)
    assert out["normalized_relevance_at_k"] == pytest.approx((0 - 0.25) / (0.75 - 0.25))
    assert out["exact_precision_at_k"] == 0.0
    assert out["ideal_exact_precision_at_k"] == pytest.approx(0.5)  # only 0 and 2 have an exact match
    # k=2: 0 retrieves 1 then 2 (cos 80deg > cos 90deg): relevances 0 + 1.
    out2 = P.retrieval_discriminability(feats, rel, k=2)
    # 0->{1,2}: 0+1; 1->{0,2}: 0+0; 2->{3,1}: 0+0; 3->{2,1}: 0+0.5 -> total 1.5 / 8
    assert out2["relevance_at_k"] == pytest.approx(1.5 / 8)
    assert out2["exact_precision_at_k"] == pytest.approx(1 / 8)


def test_retrieval_validates_inputs():
    with pytest.raises(ValueError, match="k must satisfy 1 <= k < N = 3; got k=3"):
        P.retrieval_discriminability(torch.randn(3, 4), torch.zeros(3, 3), k=3)
    with pytest.raises(ValueError, match=r"relevance must be \[3, 3\]"):
        P.retrieval_discriminability(torch.randn(3, 4), torch.zeros(2, 2), k=1)


def test_disentanglement_hand_computed():
    full = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    reduced = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 5.0]])
    # owner 0: cos 1/sqrt2 and 0; owner 1: cos 1.
    assert P.disentanglement(full, reduced, [0, 0, 1]) == pytest.approx((1 / math.sqrt(2) + 0 + 1) / 3)


def test_token_alignment_hand_computed_and_padding_ignored():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    garbage = torch.tensor([0.3, -7.0])
    a = torch.stack([e1, e2]).unsqueeze(0)
    b = torch.stack([e1, garbage]).unsqueeze(0)
    mask_a = torch.tensor([[True, True]])
    mask_b = torch.tensor([[True, False]])
    # recall: e1 -> 1, e2 -> 0 = 0.5; precision: e1 -> 1 = 1; F1 = 2 * 0.5 / 1.5.
    assert float(P.token_alignment(a, mask_a, b, mask_b)) == pytest.approx(2 / 3)
    assert float(P.token_alignment(a, mask_a, a, mask_a)) == pytest.approx(1.0)
    # Symmetric in its arguments.
    assert float(P.token_alignment(b, mask_b, a, mask_a)) == pytest.approx(2 / 3)


def test_token_disentanglement_matches_pairwise_alignment():
    g = torch.Generator().manual_seed(1)
    full = torch.randn(2, 4, 3, generator=g)
    full_mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    reduced = full[[0, 1, 0], :2].clone()
    red_mask = torch.ones(3, 2, dtype=torch.bool)
    expected = P.token_alignment(full[[0, 1, 0]], full_mask[[0, 1, 0]], reduced, red_mask).mean()
    assert P.token_disentanglement(full, full_mask, reduced, red_mask, [0, 1, 0]) == pytest.approx(float(expected))
    # Reductions that keep a subset of tokens have perfect precision, so F1 >= 2R/(1+R) > 0.
    assert float(expected) > 0


def test_minimal_pair_discrimination_hand_computed():
    para = torch.tensor([0.9, 0.5, 0.7, 0.2])
    pert = torch.tensor([0.1, 0.6, 0.7, 0.1])
    out = P.minimal_pair_discrimination(para, pert, ["color", "color", "shape", "swap_binding"])
    assert out["accuracy"] == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert out["margin"] == pytest.approx((0.8 - 0.1 + 0 + 0.1) / 4)
    assert out["accuracy/color"] == 0.5
    assert out["accuracy/shape"] == 0.5
    assert out["accuracy/swap_binding"] == 1.0


def test_minimal_pair_constant_encoder_is_chance():
    x = torch.full((5,), 0.3)
    assert P.minimal_pair_discrimination(x, x)["accuracy"] == 0.5


def test_anisotropy_extremes_and_brute_force():
    assert P.anisotropy(torch.tensor([[1.0, 2.0]]).repeat(5, 1)) == pytest.approx(1.0)
    assert P.anisotropy(torch.eye(4) * 3) == pytest.approx(0.0)
    assert P.anisotropy(torch.tensor([[1.0, 0.0], [-2.0, 0.0]])) == pytest.approx(-1.0)
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(2))
    c = P.cosine_matrix(x)
    brute = (c.sum() - c.diagonal().sum()) / (7 * 6)
    assert P.anisotropy(x) == pytest.approx(float(brute))


def test_effective_rank_known_values():
    assert P.effective_rank(torch.tensor([[1.0, -3.0, 2.0]]).repeat(6, 1)) == pytest.approx(1.0)
    assert P.effective_rank(torch.eye(5) * 2) == pytest.approx(5.0)
    # Singular values 3 and 1: p = (3/4, 1/4).
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert P.effective_rank(torch.diag(torch.tensor([3.0, 1.0]))) == pytest.approx(math.exp(h))
    g = torch.Generator().manual_seed(0)
    iso = P.effective_rank(torch.randn(4000, 16, generator=g))
    assert 15.5 < iso <= 16.0
    # Centering removes a shared offset that otherwise dominates the spectrum.
    shifted = torch.randn(4000, 16, generator=g) + 50.0
    assert P.effective_rank(shifted) < 2.0
    assert P.effective_rank(shifted, center=True) > 15.5


def test_same_scene_auc_hand_computed_with_ties():
    # Pairs (0,1) (0,2) (0,3) (1,2) (1,3) (2,3); same-scene: (0,1) and (2,3).
    pair_sims = {(0, 1): 0.9, (0, 2): 0.6, (0, 3): 0.1, (1, 2): 0.5, (1, 3): 0.5, (2, 3): 0.5}
    sims = torch.eye(4)
    for (i, j), s in pair_sims.items():
        sims[i, j] = sims[j, i] = s
    same = torch.eye(4, dtype=torch.bool)
    same[0, 1] = same[1, 0] = same[2, 3] = same[3, 2] = True
    # pos {0.9, 0.5}, neg {0.6, 0.1, 0.5, 0.5}: 0.9 beats all 4; 0.5 beats 0.1, ties two 0.5s, loses to 0.6.
    assert P.same_scene_auc(sims, same) == pytest.approx((4 + 1 + 0.5 + 0.5) / 8)
    pos, neg = P.split_pair_similarities(sims, same)
    assert sorted(pos.tolist()) == pytest.approx([0.5, 0.9])
    assert len(neg) == 4
