"""Run the discriminability metrics of ``probe.metrics`` on one encoder over one probe set.

Shared by ``emf probe`` and the ``DiscriminabilityProbe`` callback: each caption is encoded once
(duplicates removed), token features are kept zero-padded so that token-level metrics can read them,
and pooled features are the masked mean of the tokens (the paper's pooling, whatever the encoder's
own ``pooled`` output is).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from emf_lightning.probe import metrics as P
from emf_lightning.probe.sets import ProbeSet

# Token-level anisotropy / effective rank use at most this many token vectors (a fixed random subset)
# so the SVD stays cheap on 2 CPU cores; the estimate is stable well below this size.
MAX_TOKENS_FOR_SPECTRUM = 8192


class FeaturesLike(Protocol):
    """Anything with TextFeatures' ``tokens`` [B, L, D] and ``mask`` [B, L] (``encoders.base.TextFeatures``)."""

    tokens: Tensor
    mask: Tensor


EncodeFn = Callable[[list[str]], FeaturesLike]


@dataclass
class EncodedCaptions:
    """Token features of unique captions, right-padded with zeros to a common length."""

    captions: list[str]
    tokens: Tensor  # [U, L, D] float32, zero where mask is False
    mask: Tensor  # [U, L] bool

    def __post_init__(self) -> None:
        self._row = {c: i for i, c in enumerate(self.captions)}
        self.pooled = P.masked_mean(self.tokens, self.mask)

    def rows(self, captions: Sequence[str]) -> Tensor:
        """Row indices of ``captions`` (each must have been encoded)."""
        return torch.tensor([self._row[c] for c in captions], dtype=torch.long)


def encode_captions(encode: EncodeFn, captions: Sequence[str], batch_size: int = 64) -> EncodedCaptions:
    """Encode the unique entries of ``captions`` in batches; returns float32 CPU tensors."""
    unique = list(dict.fromkeys(captions))
    if not unique:
        raise ValueError("encode_captions: no captions to encode")
    tokens: list[Tensor] = []
    masks: list[Tensor] = []
    with torch.no_grad():
        for start in range(0, len(unique), batch_size):
            batch = unique[start : start + batch_size]
            out = encode(batch)
            if out.tokens.shape[0] != len(batch):
                raise ValueError(f"encoder returned {out.tokens.shape[0]} rows for {len(batch)} captions")
            mask = out.mask.bool().cpu()
            # Zero padded positions ourselves: the probe must not depend on what an encoder leaves there.
            tokens.append(out.tokens.detach().float().cpu() * mask.unsqueeze(-1))
            masks.append(mask)
    length = max(t.shape[1] for t in tokens)
    tok = torch.cat([torch.nn.functional.pad(t, (0, 0, 0, length - t.shape[1])) for t in tokens])
    msk = torch.cat([torch.nn.functional.pad(m, (0, length - m.shape[1])) for m in masks])
    return EncodedCaptions(unique, tok, msk)


def standardizer(reference: Tensor) -> Callable[[Tensor], Tensor]:
    """A map that shifts each channel by the mean of ``reference`` [N, D] and divides it by the reference's
    standard deviation (float64 out); channels constant over the reference map to 0."""
    x = reference.double()
    mean = x.mean(dim=0, keepdim=True)
    std = x.std(dim=0, keepdim=True) if x.shape[0] > 1 else torch.ones_like(mean)
    return lambda features: (features.double() - mean) / std.clamp_min(1e-12)


def standardize(features: Tensor) -> Tensor:
    """Each channel of ``features`` [N, D] shifted to mean 0 and scaled to unit standard deviation over the
    N rows (float64); constant channels become 0."""
    return standardizer(features)(features)


@dataclass
class ProbeResult:
    """Metrics of one encoder on one probe set, plus the pair cosines behind the histogram."""

    metrics: dict[str, float]
    same_scene_cosines: Tensor
    different_scene_cosines: Tensor


def evaluate_probe(probe: ProbeSet, encode: EncodeFn, k: int = 2, batch_size: int = 64, seed: int = 0) -> ProbeResult:
    """Encode every caption of ``probe`` with ``encode`` and compute all probe metrics.

    Metric names (flat, ``/``-separated, ready for a Lightning logger): ``retrieval/*``
    (see :func:`probe.retrieval_discriminability`), ``same_scene_auc``, their counterparts on per-channel
    standardised features ``retrieval_standardized/{relevance_at_k,exact_precision_at_k}`` and
    ``same_scene_auc_standardized``, ``disentanglement/{pooled,pooled_standardized,token}``,
    ``minimal_pairs/{accuracy,margin}[/<kind>]`` and ``minimal_pairs_token/...``,
    ``wording/{retrieval_at_1,auc}`` (unseen wordings against canonical captions), ``anisotropy/{pooled,token}``,
    ``effective_rank/{pooled,token}``. Parts the probe set lacks are absent.
    """
    enc = encode_captions(encode, probe.all_captions(), batch_size)
    return evaluate_encoded(probe, enc, k=k, seed=seed)


def evaluate_encoded(probe: ProbeSet, enc: EncodedCaptions, k: int = 2, seed: int = 0) -> ProbeResult:
    """:func:`evaluate_probe` on captions already encoded (lets the callback reuse one encoding twice)."""
    metrics: dict[str, float] = {}
    pool = enc.pooled[enc.rows(probe.captions)]
    sims = P.cosine_matrix(pool)
    same_cos = torch.empty(0, dtype=torch.float64)
    diff_cos = torch.empty(0, dtype=torch.float64)
    if probe.relevance is not None:
        r = P.retrieval_discriminability(pool, probe.relevance, k=k, same_scene=probe.same_scene)
        metrics.update({f"retrieval/{name}": v for name, v in r.items()})
        same = probe.same_scene if probe.same_scene is not None else probe.relevance >= 1
        same_cos, diff_cos = P.split_pair_similarities(sims, same)
        if same_cos.numel() and diff_cos.numel():
            metrics["same_scene_auc"] = P.same_scene_auc(sims, same)
        # The same after standardising each channel over the pool (z-score). A few channels with a large
        # shared offset or scale (an LLM's "rogue dimensions") dominate raw cosines without carrying content,
        # and a per-channel affine map (what the trained connector's first Linear can learn) removes them.
        # Raw vs standardised tells "information absent" from "information hidden by a few channels".
        z = standardizer(pool)(pool)
        rz = P.retrieval_discriminability(z, probe.relevance, k=k, same_scene=probe.same_scene)
        metrics["retrieval_standardized/relevance_at_k"] = rz["relevance_at_k"]
        metrics["retrieval_standardized/exact_precision_at_k"] = rz["exact_precision_at_k"]
        if same_cos.numel() and diff_cos.numel():
            metrics["same_scene_auc_standardized"] = P.same_scene_auc(P.cosine_matrix(z), same)

    if probe.reduced:
        full_rows = enc.rows(probe.full)
        red_rows = enc.rows(probe.reduced)
        owner = torch.as_tensor(probe.reduced_owner, dtype=torch.long)
        metrics["disentanglement/pooled"] = P.disentanglement(enc.pooled[full_rows], enc.pooled[red_rows], owner)
        # With channels standardised over the retrieval pool: a shared offset no longer makes every pair close.
        z_of = standardizer(pool)
        metrics["disentanglement/pooled_standardized"] = P.disentanglement(
            z_of(enc.pooled[full_rows]), z_of(enc.pooled[red_rows]), owner
        )
        metrics["disentanglement/token"] = P.token_disentanglement(
            enc.tokens[full_rows], enc.mask[full_rows], enc.tokens[red_rows], enc.mask[red_rows], owner
        )

    if probe.anchors:
        a, p, q = enc.rows(probe.anchors), enc.rows(probe.paraphrases), enc.rows(probe.perturbed)
        para = P.paired_cosine(enc.pooled[a], enc.pooled[p])
        pert = P.paired_cosine(enc.pooled[a], enc.pooled[q])
        for name, v in P.minimal_pair_discrimination(para, pert, probe.kinds).items():
            metrics[f"minimal_pairs/{name}"] = v
        para_t = P.token_alignment(enc.tokens[a], enc.mask[a], enc.tokens[p], enc.mask[p])
        pert_t = P.token_alignment(enc.tokens[a], enc.mask[a], enc.tokens[q], enc.mask[q])
        for name, v in P.minimal_pair_discrimination(para_t, pert_t, probe.kinds).items():
            metrics[f"minimal_pairs_token/{name}"] = v

    if probe.reworded:
        # Wording robustness: a prompt worded as users write it must land nearest the canonical caption of a scene
        # with its colour and shape, among all scenes' canonical captions.
        sims = P.cosine_matrix(enc.pooled[enc.rows(probe.reworded)], enc.pooled[enc.rows(probe.gallery)])
        match = probe.reworded_match
        metrics["wording/retrieval_at_1"] = float(match[torch.arange(len(match)), sims.argmax(1)].float().mean())
        if (~match).any() and match.any():
            metrics["wording/auc"] = P.pair_auc(sims.flatten(), match.flatten())

    metrics["anisotropy/pooled"] = P.anisotropy(pool)
    metrics["effective_rank/pooled"] = P.effective_rank(pool)
    token_vectors = enc.tokens[enc.rows(probe.captions)][enc.mask[enc.rows(probe.captions)]]
    if token_vectors.shape[0] > MAX_TOKENS_FOR_SPECTRUM:
        g = torch.Generator().manual_seed(seed)
        token_vectors = token_vectors[torch.randperm(token_vectors.shape[0], generator=g)[:MAX_TOKENS_FOR_SPECTRUM]]
    if token_vectors.shape[0] >= 2:
        metrics["anisotropy/token"] = P.anisotropy(token_vectors)
        metrics["effective_rank/token"] = P.effective_rank(token_vectors)
    return ProbeResult(metrics, same_cos, diff_cos)
