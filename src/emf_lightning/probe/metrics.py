"""Discriminability metrics for text representations (pure torch, no models, no I/O).

The paper (arXiv 2604.18168, §3.3) argues that a one-step generator needs text features that are
*discriminative* (different scenes far apart, paraphrases close) and *disentangled* (a shortened prompt
stays close to the full one). These functions measure that on features an encoder already produced:

- ``masked_mean``: pool token features over their mask.
- ``retrieval_discriminability`` (paper Table 1): cosine nearest neighbours among captions, scored by a
  relevance matrix that says how much two captions depict the same thing.
- ``disentanglement`` (paper Table 2): cosine between a prompt and its reductions.
- ``minimal_pair_discrimination``: is a one-attribute edit farther than a paraphrase?
- ``anisotropy`` (mean pairwise cosine) and ``effective_rank`` (Roy & Vetterli, 2007).
- ``token_alignment``: a token-level similarity (BERTScore-style greedy matching F1) so that
  disentanglement and minimal pairs can be measured on token features too, which is what the
  generator's cross-attention actually sees.
- ``same_scene_auc``: how well one cosine threshold separates same-scene from different-scene pairs.

All functions accept float tensors of any dtype and compute in float64 for stable, reproducible numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from emf_lightning.utils.model_helpers import masked_mean as pooled_mean

_EPS = 1e-12


def masked_mean(tokens: Tensor, mask: Tensor) -> Tensor:
    """Mean of token features over positions where ``mask`` is True (``utils.model_helpers.masked_mean``), with
    the probe's checks: shapes, and no empty row (it would pool to zeros and distort every metric).

    Args:
        tokens: ``[B, L, D]`` token features.
        mask: ``[B, L]`` bool, True = real token; every row needs at least one True.

    Returns:
        ``[B, D]`` pooled features, in the dtype of ``tokens``.
    """
    if tokens.dim() != 3 or mask.shape != tokens.shape[:2]:
        raise ValueError(
            f"masked_mean expects tokens [B, L, D] and mask [B, L]; got {tuple(tokens.shape)} and {tuple(mask.shape)}"
        )
    counts = mask.sum(dim=1)
    if bool((counts == 0).any()):
        raise ValueError(f"masked_mean: rows {torch.nonzero(counts == 0).flatten().tolist()} have an empty mask")
    return pooled_mean(tokens, mask)


def normalize(x: Tensor) -> Tensor:
    """Rows scaled to unit L2 norm, in float64 (zero rows stay zero rather than becoming NaN)."""
    x = x.double()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(_EPS)


def cosine_matrix(a: Tensor, b: Tensor | None = None) -> Tensor:
    """``[N, M]`` cosine similarities between rows of ``a`` ``[N, D]`` and ``b`` ``[M, D]`` (default ``a``)."""
    na = normalize(a)
    nb = na if b is None else normalize(b)
    return na @ nb.T


def paired_cosine(a: Tensor, b: Tensor) -> Tensor:
    """``[N]`` cosine between row i of ``a`` and row i of ``b``."""
    if a.shape != b.shape:
        raise ValueError(f"paired_cosine needs equal shapes; got {tuple(a.shape)} and {tuple(b.shape)}")
    return (normalize(a) * normalize(b)).sum(dim=-1)


def retrieval_discriminability(
    features: Tensor, relevance: Tensor, k: int, same_scene: Tensor | None = None
) -> dict[str, float]:
    """Paper Table 1: retrieve each caption's ``k`` cosine nearest neighbours and score what they depict.

    Args:
        features: ``[N, D]`` pooled caption features.
        relevance: ``[N, N]`` in [0, 1]; ``relevance[i, j]`` = how much caption j depicts what caption i
            describes (1 = the same scene). Need not be symmetric; the diagonal is ignored.
        k: neighbours per query (self excluded), ``1 <= k < N``.
        same_scene: optional ``[N, N]`` bool "depicts exactly the same scene"; default ``relevance >= 1``.

    Returns:
        ``relevance_at_k``: mean relevance of the retrieved neighbours (the headline number);
        ``ideal_relevance_at_k``: the best any ranking could score (mean of each row's top-k relevances);
        ``chance_relevance``: the expectation for a random ranking (mean off-diagonal relevance);
        ``normalized_relevance_at_k``: (score - chance) / (ideal - chance), 1 = perfect, 0 = random;
        ``exact_precision_at_k``: fraction of retrieved neighbours that are the same scene;
        ``ideal_exact_precision_at_k``: the best achievable value of that (limited by how many
        same-scene captions each query has).
    """
    n = features.shape[0]
    if relevance.shape != (n, n):
        raise ValueError(f"relevance must be [{n}, {n}] to match features; got {tuple(relevance.shape)}")
    if not 1 <= k < n:
        raise ValueError(f"k must satisfy 1 <= k < N = {n}; got k={k}")
    rel = relevance.double()
    exact = (rel >= 1.0) if same_scene is None else same_scene.bool()
    off_diag = ~torch.eye(n, dtype=torch.bool, device=features.device)

    sims = cosine_matrix(features).masked_fill(~off_diag, float("-inf"))
    neighbours = sims.topk(k, dim=1).indices  # [N, k]
    got = rel.gather(1, neighbours)
    ideal = rel.masked_fill(~off_diag, float("-inf")).topk(k, dim=1).values
    chance = rel[off_diag].mean()
    exact_got = exact.gather(1, neighbours).double()
    exact_ideal = (exact & off_diag).sum(dim=1).clamp(max=k).double() / k

    score, best = got.mean(), ideal.mean()
    span = best - chance
    normalized = (score - chance) / span if span > _EPS else torch.tensor(float("nan"))
    return {
        "relevance_at_k": float(score),
        "ideal_relevance_at_k": float(best),
        "chance_relevance": float(chance),
        "normalized_relevance_at_k": float(normalized),
        "exact_precision_at_k": float(exact_got.mean()),
        "ideal_exact_precision_at_k": float(exact_ideal.mean()),
    }


def disentanglement(full: Tensor, reduced: Tensor, owner: Tensor | Sequence[int]) -> float:
    """Paper Table 2: mean cosine between a prompt's pooled features and those of its reductions.

    Args:
        full: ``[N, D]`` features of the full prompts.
        reduced: ``[M, D]`` features of reduced prompts (parts of the sentence removed).
        owner: ``[M]`` index into ``full``: which full prompt each reduction came from.
    """
    owner = torch.as_tensor(owner, dtype=torch.long, device=full.device)
    if owner.shape != (reduced.shape[0],):
        raise ValueError(f"owner must have one index per reduced prompt ({reduced.shape[0]}); got {tuple(owner.shape)}")
    if reduced.shape[0] == 0:
        raise ValueError("disentanglement needs at least one reduced prompt")
    return float(paired_cosine(full[owner], reduced).mean())


def token_alignment(tokens_a: Tensor, mask_a: Tensor, tokens_b: Tensor, mask_b: Tensor) -> Tensor:
    """Token-level similarity of paired sequences: greedy-matching F1 of token cosines (as in BERTScore).

    Precision = mean over b's tokens of the best cosine to any of a's tokens, recall the other way round,
    result = harmonic mean. Chosen over a pooled cosine because cross-attention reads individual tokens:
    two captions can share a mean yet bind attributes to different tokens. Padding is excluded by the
    masks. Cosines can be negative, so when P + R <= 0 the arithmetic mean is returned instead.

    Args:
        tokens_a, tokens_b: ``[B, La, D]`` and ``[B, Lb, D]``.
        mask_a, mask_b: ``[B, La]`` and ``[B, Lb]`` bool.

    Returns:
        ``[B]`` float64 scores in [-1, 1]; identical sequences score 1.
    """
    if tokens_a.shape[0] != tokens_b.shape[0] or tokens_a.shape[-1] != tokens_b.shape[-1]:
        raise ValueError(
            f"token_alignment needs the same batch and width; got {tuple(tokens_a.shape)} and {tuple(tokens_b.shape)}"
        )
    if not bool(mask_a.any(dim=1).all() and mask_b.any(dim=1).all()):
        raise ValueError("token_alignment: every row needs at least one real token in both masks")
    sims = normalize(tokens_a) @ normalize(tokens_b).transpose(1, 2)  # [B, La, Lb]
    valid = mask_a.unsqueeze(2) & mask_b.unsqueeze(1)
    sims = sims.masked_fill(~valid, float("-inf"))
    recall = sims.max(dim=2).values.masked_fill(~mask_a, 0).sum(1) / mask_a.sum(1)
    precision = sims.max(dim=1).values.masked_fill(~mask_b, 0).sum(1) / mask_b.sum(1)
    total = precision + recall
    f1 = 2 * precision * recall / total.clamp_min(_EPS)
    return torch.where(total > _EPS, f1, total / 2)


def token_disentanglement(
    full_tokens: Tensor, full_mask: Tensor, reduced_tokens: Tensor, reduced_mask: Tensor, owner: Tensor | Sequence[int]
) -> float:
    """Token-level counterpart of :func:`disentanglement`: mean :func:`token_alignment` of each reduction
    with its full prompt."""
    owner = torch.as_tensor(owner, dtype=torch.long, device=full_tokens.device)
    if owner.shape != (reduced_tokens.shape[0],):
        raise ValueError(
            f"owner must have one index per reduced prompt ({reduced_tokens.shape[0]}); got {tuple(owner.shape)}"
        )
    return float(token_alignment(full_tokens[owner], full_mask[owner], reduced_tokens, reduced_mask).mean())


def minimal_pair_discrimination(
    anchor_to_paraphrase: Tensor, anchor_to_perturbed: Tensor, kinds: Sequence[str] | None = None
) -> dict[str, float]:
    """How often is a minimally different scene farther from the anchor than a paraphrase of the anchor?

    Works on similarities so the same function scores pooled cosines and token alignments.

    Args:
        anchor_to_paraphrase: ``[P]`` similarity of each anchor caption to a paraphrase of the same scene.
        anchor_to_perturbed: ``[P]`` similarity of the anchor to a caption of the scene with one edit
            (a colour, a shape, a swapped binding, a relation, a count).
        kinds: optional ``[P]`` edit names; adds one ``accuracy/<kind>`` entry per kind.

    Returns:
        ``accuracy``: fraction of pairs with perturbed < paraphrase (ties count one half, so a constant
        encoder scores exactly 0.5); ``margin``: mean of (paraphrase - perturbed) similarity;
        ``accuracy/<kind>`` per kind.
    """
    para = anchor_to_paraphrase.double()
    pert = anchor_to_perturbed.double()
    if para.shape != pert.shape or para.dim() != 1 or para.numel() == 0:
        raise ValueError(
            f"minimal_pair_discrimination needs two equal non-empty [P] tensors; got "
            f"{tuple(para.shape)} and {tuple(pert.shape)}"
        )
    wins = (pert < para).double() + 0.5 * (pert == para).double()
    out = {"accuracy": float(wins.mean()), "margin": float((para - pert).mean())}
    if kinds is not None:
        if len(kinds) != para.numel():
            raise ValueError(f"kinds has {len(kinds)} entries for {para.numel()} pairs")
        for kind in sorted(set(kinds)):
            sel = torch.tensor([k == kind for k in kinds], device=wins.device)
            out[f"accuracy/{kind}"] = float(wins[sel].mean())
    return out


def anisotropy(features: Tensor) -> float:
    """Mean cosine over all pairs of distinct rows of ``features`` ``[N, D]`` (N >= 2).

    Near 1 means every feature points the same way (a narrow cone, Ethayarajh 2019); near 0 means spread.
    """
    n = features.shape[0]
    if n < 2:
        raise ValueError(f"anisotropy needs at least 2 vectors; got {n}")
    # sum_{i,j} cos_ij = ||sum_i u_i||^2, so no N x N matrix is needed (token sets can be large).
    u = normalize(features)
    total = u.sum(dim=0).square().sum()
    diag = u.square().sum()
    return float((total - diag) / (n * (n - 1)))


def effective_rank(features: Tensor, center: bool = False) -> float:
    """Effective rank of ``features`` ``[N, D]`` (Roy & Vetterli, 2007): exp of the Shannon entropy of the
    singular values normalised to sum to one. Ranges from 1 (all rows parallel) to min(N, D).

    ``center=False`` (default) keeps the common mean direction, so a strongly anisotropic set counts as
    low-rank, consistent with :func:`anisotropy`; ``center=True`` measures the spread around the mean.
    """
    x = features.double()
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"effective_rank expects a non-empty [N, D] matrix; got {tuple(x.shape)}")
    if center:
        x = x - x.mean(dim=0, keepdim=True)
    s = torch.linalg.svdvals(x)
    if float(s.sum()) <= _EPS:
        raise ValueError("effective_rank is undefined for an all-zero matrix")
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def same_scene_auc(similarity: Tensor, same_scene: Tensor) -> float:
    """Probability that a random same-scene pair is more similar than a random different-scene pair
    (ROC AUC of the cosine as a same-scene detector; ties count one half). Uses each unordered pair once.
    Computed by torchmetrics' ``binary_auroc`` (exact ROC, no thresholds binning; its result is float32).

    Args:
        similarity: ``[N, N]`` symmetric similarities.
        same_scene: ``[N, N]`` bool, True where the two captions depict the same scene.
    """
    pos, neg = split_pair_similarities(similarity, same_scene)
    if pos.numel() == 0 or neg.numel() == 0:
        raise ValueError("same_scene_auc needs at least one same-scene and one different-scene pair")
    return pair_auc(torch.cat([pos, neg]), torch.cat([torch.ones(pos.numel()), torch.zeros(neg.numel())]).bool())


def pair_auc(cosines: Tensor, positive: Tensor) -> float:
    """ROC AUC of cosines as a detector of ``positive`` pairs (1-D, same length; ties count one half)."""
    from torchmetrics.functional.classification import binary_auroc

    # binary_auroc takes scores outside [0, 1] for logits and applies a sigmoid; cosines in [-1, 1] go to
    # [0, 1] by an increasing affine map instead, which keeps every comparison (and so the AUC) as it was.
    scores = ((cosines.double() + 1) / 2).clamp(0, 1)
    return float(binary_auroc(scores, positive.long().to(scores.device)))


def split_pair_similarities(similarity: Tensor, same_scene: Tensor) -> tuple[Tensor, Tensor]:
    """Upper-triangle similarities split into (same-scene pairs, different-scene pairs), both float64."""
    n = similarity.shape[0]
    if similarity.shape != (n, n) or same_scene.shape != (n, n):
        raise ValueError(
            f"need [N, N] similarity and same_scene; got {tuple(similarity.shape)} and {tuple(same_scene.shape)}"
        )
    iu = torch.triu_indices(n, n, offset=1, device=similarity.device)
    sims = similarity.double()[iu[0], iu[1]]
    same = same_scene.bool()[iu[0], iu[1]]
    return sims[same], sims[~same]
