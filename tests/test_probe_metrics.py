"""Probe metrics on constructed embeddings whose answers are computed by hand."""

import math
import re

import pytest
import torch

from emf_lightning.probe import metrics as P


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


def _mann_whitney_auc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """Reference AUC: Mann-Whitney U from average ranks of the pooled sample (ties count one half)."""
    values = torch.cat([pos, neg]).double()
    uniq, inverse = torch.unique(values, return_inverse=True)
    order = values.argsort()
    ranks = torch.empty_like(values)
    ranks[order] = torch.arange(1, values.numel() + 1, dtype=values.dtype)
    rank_sum = torch.zeros_like(uniq).index_add_(0, inverse, ranks)
    count = torch.zeros_like(uniq).index_add_(0, inverse, torch.ones_like(ranks))
    u = (rank_sum / count)[inverse][: pos.numel()].sum() - pos.numel() * (pos.numel() + 1) / 2
    return float(u / (pos.numel() * neg.numel()))


@pytest.mark.parametrize("decimals", [1, 2, 6])
def test_same_scene_auc_equals_the_rank_statistic_on_tied_and_negative_cosines(decimals):
    g = torch.Generator().manual_seed(decimals)
    feats = torch.randn(40, 6, generator=g, dtype=torch.float64)
    sims = P.cosine_matrix(feats)
    sims = torch.round(sims * 10**decimals) / 10**decimals  # negatives included
    same = torch.rand(40, 40, generator=g) < 0.2
    same = same | same.T
    pos, neg = P.split_pair_similarities(sims, same)
    assert (neg < 0).any()
    if decimals < 6:  # coarse rounding: ties across the two groups
        assert len(torch.unique(torch.cat([pos, neg]))) < len(torch.unique(pos)) + len(torch.unique(neg))
    assert P.same_scene_auc(sims, same) == pytest.approx(_mann_whitney_auc(pos, neg), abs=1e-6)


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


# ---------------------------------------------------------------- probe sets and the evaluation runner

from collections import Counter  # noqa: E402
from types import SimpleNamespace  # noqa: E402

from emf_lightning.probe import sets as S  # noqa: E402
from emf_lightning.probe.evaluation import encode_captions, evaluate_probe  # noqa: E402


def _obj(shape, color, size="small", x=0.5, y=0.5):
    return {"shape": shape, "color": color, "size": size, "x": x, "y": y}


def test_scene_relevance_counts_bindings_and_relations():
    a = {"objects": [_obj("circle", "red"), _obj("square", "blue")], "relations": [{"a": 0, "rel": "left of", "b": 1}]}
    # The same statement from the other side ("blue square right of red circle") matches fully.
    a_inv = {
        "objects": [_obj("square", "blue", x=0.9), _obj("circle", "red", x=0.1)],
        "relations": [{"a": 0, "rel": "right of", "b": 1}],
    }
    assert S.scene_relevance(S.scene_items(a), S.scene_items(a_inv)) == 1.0
    # Swapped colours: no binding matches, and the relation is between other bindings.
    swapped = {
        "objects": [_obj("circle", "blue"), _obj("square", "red")],
        "relations": [{"a": 0, "rel": "left of", "b": 1}],
    }
    assert S.scene_relevance(S.scene_items(a), S.scene_items(swapped)) == 0.0
    # Reversed relation: both bindings match, the relation does not -> 2 of 3 items.
    rev = {"objects": a["objects"], "relations": [{"a": 0, "rel": "right of", "b": 1}]}
    assert S.scene_relevance(S.scene_items(a), S.scene_items(rev)) == pytest.approx(2 / 3)
    # Three identical objects vs four: 3 of max(3, 4).
    three = {"objects": [_obj("diamond", "white")] * 3}
    four = {"objects": [_obj("diamond", "white")] * 4}
    assert S.scene_relevance(S.scene_items(three), S.scene_items(four)) == pytest.approx(3 / 4)


def test_spec_relevance_matrix_matches_pairwise_function():
    specs = S.sample_specs(12, seed=3)
    mat = S.spec_relevance_matrix(specs)
    for i in range(12):
        for j in range(12):
            assert float(mat[i, j]) == pytest.approx(
                S.scene_relevance(S.scene_items(specs[i]), S.scene_items(specs[j]))
            )
    assert torch.equal(mat, mat.T)


def test_shapes_probe_set_structure_and_determinism():
    probe = S.shapes_probe_set(n=24, group=2, seed=5, n_pairs=6, n_reduce=4)
    again = S.shapes_probe_set(n=24, group=2, seed=5, n_pairs=6, n_reduce=4)
    assert probe.captions == again.captions and probe.perturbed == again.perturbed
    assert len(probe.captions) == 24
    # Captions come in pairs of the same scene.
    for i in range(0, 24, 2):
        assert probe.captions[i] != probe.captions[i + 1]
        assert bool(probe.same_scene[i, i + 1])
    assert set(probe.kinds) <= set(S.PERTURBATION_KINDS)
    assert Counter(probe.kinds)["color"] == 6  # every scene has a colour edit
    assert all(a != q for a, q in zip(probe.anchors, probe.perturbed))
    assert max(probe.reduced_owner) == len(probe.full) - 1 <= 3


def test_reduce_caption_cuts_at_clause_boundaries():
    assert S.reduce_caption("A dog with a red ball on the grass.") == ["A dog with a red ball", "A dog"]
    assert S.reduce_caption("two cats") == []


def _word_encoder(dim: int = 16):
    """A deterministic bag-of-words stand-in: one fixed random vector per word, one token per word."""
    import zlib

    def encode(captions):
        rows = [
            [torch.randn(dim, generator=torch.Generator().manual_seed(zlib.crc32(w.encode()))) for w in c.split()]
            for c in captions
        ]
        length = max(len(r) for r in rows)
        tokens = torch.zeros(len(rows), length, dim)
        mask = torch.zeros(len(rows), length, dtype=torch.bool)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = torch.stack(r)
            mask[i, : len(r)] = True
        return SimpleNamespace(tokens=tokens, mask=mask, pooled=tokens.sum(1))

    return encode


def test_standardize_removes_rogue_channel():
    from emf_lightning.probe.evaluation import standardize

    g = torch.Generator().manual_seed(0)
    content = torch.randn(200, 4, generator=g, dtype=torch.float64)
    rogue = torch.cat([content, 100 + 10 * torch.randn(200, 1, generator=g, dtype=torch.float64)], dim=1)
    z = standardize(rogue)
    assert torch.allclose(z.mean(0), torch.zeros(5, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(z.std(0), torch.ones(5, dtype=torch.float64))
    # Raw cosines are all near 1 (the rogue channel dominates); standardised ones follow the content.
    assert P.anisotropy(rogue) > 0.98
    assert abs(P.anisotropy(z)) < 0.05
    assert torch.equal(standardize(torch.ones(3, 2)), torch.zeros(3, 2, dtype=torch.float64))


def test_encode_captions_dedupes_and_pads():
    enc = encode_captions(_word_encoder(), ["a b", "c", "a b", "d e f"], batch_size=2)
    assert enc.captions == ["a b", "c", "d e f"]
    assert enc.tokens.shape == (3, 3, 16)
    assert enc.mask.sum(1).tolist() == [2, 1, 3]
    assert enc.rows(["d e f", "a b"]).tolist() == [2, 0]
    assert torch.all(enc.tokens[1, 1:] == 0)


def test_evaluate_probe_oracle_encoder_is_ideal():
    # An encoder that embeds the scene itself (one-hot of the exact statement) retrieves perfectly and
    # separates same- from different-scene pairs perfectly.
    probe = S.shapes_probe_set(n=30, group=2, seed=1, n_pairs=5, n_reduce=5)
    scene_of = {}
    for i, c in enumerate(probe.captions):
        scene_of.setdefault(c, int(torch.nonzero(probe.same_scene[i])[0]))

    def oracle(captions):
        ids = torch.tensor([scene_of.get(c, len(probe.captions)) for c in captions])
        one_hot = torch.nn.functional.one_hot(ids, len(probe.captions) + 1).float()
        return SimpleNamespace(
            tokens=one_hot[:, None, :], mask=torch.ones(len(captions), 1, dtype=torch.bool), pooled=one_hot
        )

    m = evaluate_probe(probe, oracle, k=1).metrics
    assert m["retrieval/relevance_at_k"] == pytest.approx(m["retrieval/ideal_relevance_at_k"])
    assert m["retrieval/exact_precision_at_k"] == 1.0
    assert m["same_scene_auc"] == 1.0
    # Standardising channels keeps an oracle perfect.
    assert m["retrieval_standardized/exact_precision_at_k"] == 1.0
    assert m["same_scene_auc_standardized"] == 1.0


def test_evaluate_probe_word_encoder_reports_every_family():
    probe = S.shapes_probe_set(n=20, group=2, seed=2, n_pairs=4, n_reduce=4)
    res = evaluate_probe(probe, _word_encoder(), k=2)
    m = res.metrics
    for key in (
        "retrieval/relevance_at_k",
        "same_scene_auc",
        "same_scene_auc_standardized",
        "retrieval_standardized/relevance_at_k",
        "disentanglement/pooled",
        "disentanglement/pooled_standardized",
        "disentanglement/token",
        "minimal_pairs/accuracy",
        "minimal_pairs_token/accuracy",
        "minimal_pairs/accuracy/color",
        "anisotropy/pooled",
        "anisotropy/token",
        "effective_rank/pooled",
        "effective_rank/token",
    ):
        assert key in m and math.isfinite(m[key]), key
    n_same = int(torch.triu(probe.same_scene, 1).sum())
    assert res.same_scene_cosines.numel() == n_same
    assert res.different_scene_cosines.numel() == 20 * 19 // 2 - n_same
    # Minimal pairs share all but one or two words, paraphrases change several: a bag of words is fooled.
    assert m["minimal_pairs/accuracy"] < 0.5


# ---------------------------------------------------------------- image embedders (relevance on shards)

from emf_lightning.probe.image_embedders import build_image_embedder  # noqa: E402
from emf_lightning.utils.weights import MissingWeightsError  # noqa: E402


def test_pixel_embedder_ignores_brightness_offset_and_sees_layout():
    import numpy as np

    left = np.zeros((1, 16, 16, 3), np.uint8)
    left[:, :, :8] = 200
    right = left[:, :, ::-1].copy()
    embed = build_image_embedder("pixels")
    a, b, a_bright = embed(left), embed(right), embed(np.clip(left.astype(int) + 40, 0, 255).astype(np.uint8))
    assert a.shape == (1, 768)
    assert float(P.paired_cosine(a, a_bright)) == pytest.approx(1.0, abs=1e-6)  # centring removes the offset
    assert float(P.paired_cosine(a, b)) == pytest.approx(-1.0, abs=1e-6)


@pytest.mark.slow  # builds a 22M-parameter ViT twice
def test_dinov2_embedder_missing_weights_and_local_file_round_trip(tmp_path, monkeypatch):
    import numpy as np
    from safetensors.torch import save_file

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(MissingWeightsError, match="timm/vit_small_patch14_dinov2.lvd142m"):
        build_image_embedder("dinov2")
    random_model = build_image_embedder("dinov2", pretrained=False)
    images = np.random.default_rng(0).integers(0, 255, (2, 20, 20, 3), dtype=np.uint8)
    expected = random_model(images)
    assert expected.shape == (2, 384)
    path = tmp_path / "dinov2.safetensors"
    save_file({k: v.contiguous() for k, v in random_model.model.state_dict().items()}, str(path))
    loaded = build_image_embedder("dinov2", weights=str(path))
    assert torch.allclose(loaded(images), expected, atol=1e-5)


def test_wording_robustness_oracle_is_perfect_and_a_shuffled_encoder_is_not():
    # The probe's wording score: a prompt in an unseen wording must land nearest a canonical caption of a scene
    # with its colour and shape. An encoder that reads (colour, shape) from any wording is perfect; one that
    # maps each reworded prompt to a wrong colour is not.
    probe = S.shapes_probe_set(n=60, group=2, seed=3, n_pairs=0, n_reduce=0, mix={"colors": 2, "two_objects": 1})
    assert probe.reworded and probe.gallery and probe.reworded_match.shape == (len(probe.reworded), len(probe.gallery))
    colours = ["red", "green", "blue", "yellow", "cyan", "magenta", "white", "orange"]
    shapes = {
        "circle": ("circle", "disk", "disc", "round", "ball", "dot"),
        "square": ("square", "box", "block", "tile"),
        "triangle": ("triangle", "triangular", "three-sided", "wedge"),
    }

    def reader(shift: int):
        def encode(captions):
            rows = []
            for c in captions:
                c = c.lower()
                words_in = set(re.findall(r"[a-z-]+", c))  # whole words: "centred" and "coloured" hold no colour
                colour = next((i for i, name in enumerate(colours) if name in words_in), 0)
                shape = next((i for i, (_, words) in enumerate(shapes.items()) if words_in & set(words)), 0)
                is_reworded = c not in [g.lower() for g in probe.gallery]
                rows.append(3 * ((colour + (shift if is_reworded else 0)) % 8) + shape + 1 if " and " not in c else 0)
            one_hot = torch.nn.functional.one_hot(torch.tensor(rows), 25).float()
            return SimpleNamespace(
                tokens=one_hot[:, None], mask=torch.ones(len(rows), 1, dtype=torch.bool), pooled=one_hot
            )

        return encode

    perfect = evaluate_probe(probe, reader(0), k=1).metrics
    assert perfect["wording/retrieval_at_1"] == 1.0 and perfect["wording/auc"] == 1.0
    wrong = evaluate_probe(probe, reader(1), k=1).metrics
    assert wrong["wording/retrieval_at_1"] == 0.0 and wrong["wording/auc"] < 0.6
