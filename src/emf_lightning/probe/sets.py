"""Probe sets: the captions the discriminability probe encodes, and what each of them depicts.

A ``ProbeSet`` has up to three parts, each feeding one family of metrics in ``probe.metrics``:

- a retrieval pool (``captions``) with a relevance matrix saying how much caption j depicts what caption i
  describes, and which pairs depict exactly the same scene;
- sentence reductions (``full`` -> ``reduced``) for disentanglement;
- minimal pairs (``anchors`` / ``paraphrases`` / ``perturbed``, with the edit ``kinds``);
- wording robustness: single-object scenes prompted in wordings the caption grammar never writes
  (``reworded``, ``shapes.wordings``) against the canonical captions (``gallery``) of the pool's scenes, with
  ``reworded_match`` [R, G] saying which gallery captions name the same colour and shape (what ShapesEval judges).

Two builders: ``shapes_probe_set`` (the synthetic shapes world; relevance is exact, from scene specs) and
``shard_probe_set`` (WebDataset shards; relevance from scene specs when the shards carry them, else from
image features of a pluggable image encoder).
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from emf_lightning.data.health import SkipCounter
from emf_lightning.data.pipeline import caption_text, iter_shards
from emf_lightning.data.transforms import open_rgb
from emf_lightning.shapes.scene import scene_spec_or_none

log = logging.getLogger(__name__)

PERTURBATION_KINDS = ("color", "shape", "swap_binding", "relation", "count")
SPEC_RELEVANCE = "scene spec: shared (shape, colour, size) bindings and relations"


@dataclass
class ProbeSet:
    """Captions to encode and the ground truth each metric scores them against."""

    name: str
    captions: list[str]
    relevance: Tensor | None = None  # [N, N] float in [0, 1]
    same_scene: Tensor | None = None  # [N, N] bool
    relevance_source: str = ""  # how relevance was obtained, shown next to the numbers
    full: list[str] = field(default_factory=list)
    reduced: list[str] = field(default_factory=list)
    reduced_owner: list[int] = field(default_factory=list)  # index into ``full``
    anchors: list[str] = field(default_factory=list)
    paraphrases: list[str] = field(default_factory=list)
    perturbed: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    reworded: list[str] = field(default_factory=list)
    gallery: list[str] = field(default_factory=list)
    reworded_match: Tensor | None = None  # [len(reworded), len(gallery)] bool
    notes: list[str] = field(default_factory=list)  # skipped parts and why

    def all_captions(self) -> list[str]:
        """Every caption any metric needs, first occurrence order, duplicates removed."""
        parts = (self.captions, self.full, self.reduced, self.anchors, self.paraphrases, self.perturbed)
        parts += (self.gallery, self.reworded)
        return list(dict.fromkeys(c for part in parts for c in part))

    def add_reductions(self, full: str, reductions: list[str]) -> None:
        """``full`` and its shorter versions (nothing when there are none)."""
        if reductions:
            self.full.append(full)
            self.reduced += reductions
            self.reduced_owner += [len(self.full) - 1] * len(reductions)

    def summary(self) -> dict[str, object]:
        """Sizes and provenance, for the JSON report."""
        return {
            "name": self.name,
            "retrieval_captions": len(self.captions),
            "relevance_source": self.relevance_source,
            "reductions": len(self.reduced),
            "minimal_pairs": len(self.anchors),
            "reworded": len(self.reworded),
            "kinds": dict(Counter(self.kinds)),
            "notes": self.notes,
        }


# ---------------------------------------------------------------- scene-spec relevance


def _binding(obj: dict) -> tuple:
    return (obj.get("shape"), obj.get("color"), obj.get("size"))


_CANONICAL_RELATION = {"right of": "left of", "below": "above"}


def _relation_item(rel: object, objects: Sequence[dict]) -> tuple:
    """A relation ``{"a", "rel", "b"}`` as (name, binding of a, binding of b), in a canonical direction."""
    if not isinstance(rel, dict) or not {"a", "rel", "b"} <= rel.keys():
        raise ValueError(f"relation {rel!r} is not of the form {{'a': index, 'rel': name, 'b': index}}")
    a, name, b = int(rel["a"]), rel["rel"], int(rel["b"])
    if not (0 <= a < len(objects) and 0 <= b < len(objects)):
        raise ValueError(f"relation {rel!r} points outside the {len(objects)} objects")
    # "B right of A" states the same as "A left of B": keep one direction so both match.
    if name in _CANONICAL_RELATION:
        name, a, b = _CANONICAL_RELATION[name], b, a
    return ("relation", name, _binding(objects[a]), _binding(objects[b]))


def scene_items(spec: dict) -> Counter:
    """What a scene depicts, as a multiset: one (shape, colour, size) binding per object, one item per
    relation between bindings. Positions are left out: captions state them only through relations."""
    objects = spec.get("objects", [])
    items = Counter(("object",) + _binding(o) for o in objects)
    items.update(_relation_item(r, objects) for r in spec.get("relations", []))
    return items


def scene_relevance(a: Counter, b: Counter) -> float:
    """Multiset overlap of two scenes' items over the larger of the two: 1.0 exactly when they depict the
    same bindings and relations; extra or missing objects lower it symmetrically."""
    denom = max(sum(a.values()), sum(b.values()))
    return sum((a & b).values()) / denom if denom else 1.0


def spec_relevance_matrix(specs: Sequence[dict]) -> Tensor:
    """``[N, N]`` :func:`scene_relevance` of every pair of scene specs, vectorised: each scene becomes a
    count vector over the items seen, and the multiset overlap is the sum of element-wise minima."""
    items = [scene_items(s) for s in specs]
    vocab: dict[tuple, int] = {}
    for c in items:
        for item in c:
            vocab.setdefault(item, len(vocab))
    counts = torch.zeros(len(items), max(len(vocab), 1), dtype=torch.float64)
    for i, c in enumerate(items):
        for item, m in c.items():
            counts[i, vocab[item]] = m
    # Identical scenes give identical rows: compute on the distinct rows, then expand.
    uniq, inverse = torch.unique(counts, dim=0, return_inverse=True)
    sizes = uniq.sum(dim=1)
    small = torch.empty(len(uniq), len(uniq), dtype=torch.float64)
    chunk = max(1, 2_000_000 // (len(uniq) * uniq.shape[1]))  # bounds the [chunk, U, V] temporary
    for start in range(0, len(uniq), chunk):
        block = uniq[start : start + chunk]
        overlap = torch.minimum(block[:, None, :], uniq[None, :, :]).sum(dim=2)
        denom = torch.maximum(sizes[start : start + chunk, None], sizes[None, :])
        small[start : start + chunk] = torch.where(denom > 0, overlap / denom.clamp_min(1), torch.ones_like(overlap))
    return small[inverse][:, inverse]


# ---------------------------------------------------------------- shapes world


def sample_specs(n: int, seed: int, split: str = "test", mix: dict[str, float] | None = None) -> list[dict]:
    """The scene specs of the first ``n`` samples of ``ShapesWorld(seed, split=split, mix=mix)`` (no rendering),
    so the probe reads the same scenes a model is trained or evaluated on."""
    from emf_lightning.shapes import ShapesWorld

    world = ShapesWorld(seed=seed, split=split, mix=mix, size=n)
    return [world.spec(i) for i in range(n)]


def shapes_probe_set(
    n: int = 1000,
    group: int = 2,
    seed: int = 0,
    split: str = "test",
    n_pairs: int | None = None,
    n_reduce: int | None = None,
    mix: dict[str, float] | None = None,
    wordings: str | None = "final",
) -> ProbeSet:
    """Probe set from the shapes world.

    - Retrieval: ``n // group`` scenes with ``group`` distinct captions each (the canonical caption, then
      random paraphrases), so every query has ``group - 1`` captions of its own scene in the pool, plus any
      other scene that happens to be identical in what captions state.
    - Reductions (``reduced_captions``) of the canonical caption of the first ``n_reduce`` scenes.
    - Minimal pairs for the first ``n_pairs`` scenes: anchor = canonical caption, paraphrase = another
      phrasing of the same scene, perturbed = canonical caption of the scene with one edit, for every edit
      kind that applies to the scene. Both the anchor and the perturbed caption use the canonical template,
      so the edit changes one or two words while the paraphrase changes the wording: the encoder must weigh
      content over form to score.
    - Wording robustness (``wordings``: a ``shapes.wordings`` split, None = off): every single-object scene
      reworded once (the split's families in turn), the gallery = the canonical caption of every scene.
    """
    from emf_lightning.shapes import SceneError, describe, paraphrases, perturb, reduced_captions

    if group < 1 or n < 2 * group:
        raise ValueError(f"need group >= 1 and n >= 2 * group; got n={n}, group={group}")
    rng = np.random.default_rng([seed, 1])  # a stream apart from the scene draws
    n_scenes = n // group
    specs = sample_specs(n_scenes, seed, split, mix)
    captions, cap_specs = [], []
    for spec in specs:
        variants = list(dict.fromkeys([describe(spec), *paraphrases(spec, group + 1, rng)]))[:group]
        captions += variants
        cap_specs += [spec] * len(variants)
    relevance = spec_relevance_matrix(cap_specs)
    probe = ProbeSet(
        name=f"shapes/{split}",
        captions=captions,
        relevance=relevance,
        same_scene=relevance >= 1.0,
        relevance_source=SPEC_RELEVANCE,
    )

    for spec in specs[: n_scenes if n_reduce is None else n_reduce]:
        full = describe(spec)
        probe.add_reductions(full, [r for r in reduced_captions(spec) if r != full])

    if wordings is not None:
        from emf_lightning.shapes.wordings import reword_all

        probe.gallery = [describe(spec) for spec in specs]
        reworded = reword_all(specs, wordings, seed=seed)
        what = [_judged(spec) for spec in specs]
        rows = [i for i, caption in enumerate(reworded) if caption is not None]
        probe.reworded = [reworded[i] for i in rows]
        probe.reworded_match = torch.tensor([[what[i] == w for w in what] for i in rows], dtype=torch.bool)

    not_applicable: Counter = Counter()
    for spec in specs[: n_scenes if n_pairs is None else n_pairs]:
        anchor = describe(spec)
        paraphrase = next((p for p in paraphrases(spec, 2, rng) if p != anchor), None)
        if paraphrase is None:
            not_applicable["no paraphrase"] += 1
            continue
        for kind in PERTURBATION_KINDS:
            try:
                changed = perturb(spec, kind, rng)
            except SceneError:  # this edit does not apply (e.g. a count edit on two objects)
                not_applicable[kind] += 1
                continue
            probe.anchors.append(anchor)
            probe.paraphrases.append(paraphrase)
            probe.perturbed.append(describe(changed))
            probe.kinds.append(kind)
    if not_applicable:
        probe.notes.append(
            "minimal-pair edits that did not apply (scene count): "
            + ", ".join(f"{k} {v}" for k, v in sorted(not_applicable.items()))
        )
    return probe


def _judged(spec: dict) -> tuple | None:
    """What ShapesEval checks of a single-object scene (its colour and shape); None for other scenes."""
    objects = spec.get("objects") or []
    return (objects[0]["color"], objects[0]["shape"]) if len(objects) == 1 else None


# ---------------------------------------------------------------- shards

_CLAUSE = re.compile(r",\s+|\s+(?=(?:and|with|while|on|in|at|near|next to|under|behind|beside|holding|of)\s)")


def reduce_caption(caption: str, min_words: int = 2) -> list[str]:
    """Shorter versions of a free-form caption, each ending at a clause or prepositional boundary
    ("a dog with a red ball on the grass" -> "a dog with a red ball", "a dog"). Longest first."""
    caption = caption.strip().rstrip(".")
    cuts = [m.start() for m in _CLAUSE.finditer(caption)]
    out = []
    for cut in reversed(cuts):
        head = caption[:cut].strip(" ,")
        if len(head.split()) >= min_words and head not in out:
            out.append(head)
    return out


def read_shard_samples(shards: str | Sequence[str], n: int) -> tuple[list[dict], Counter]:
    """Up to ``n`` samples ``{"key", "captions", "spec", "image"}`` from WebDataset shards, and a count of
    problems met on the way.

    Read by the data module's reader with its caption rule (``data.pipeline.iter_shards``, ``caption_text``).
    Each ``.txt`` line is one caption of the sample's image (several lines = paraphrases). Samples without
    a caption, or whose .txt is not UTF-8, are skipped; an unreadable image or spec drops only that part
    (``None``). Every problem (damaged shards included) is counted and logged once per kind.
    """
    samples, skipped, counter = [], Counter(), SkipCounter("probe shards")
    for raw in iter_shards(shards, counter):
        if len(samples) >= n:
            break
        try:
            captions = [c.strip() for c in caption_text(raw).splitlines() if c.strip()]
        except UnicodeDecodeError:
            skipped["caption not UTF-8: skipped"] += 1
            continue
        if not captions:
            skipped["sample without caption: skipped"] += 1
            continue
        spec = None
        if "json" in raw:
            try:
                # other datasets' .json (img2dataset's url/width/...) is metadata: relevance from images then
                spec = scene_spec_or_none(json.loads(raw["json"]))
            except (ValueError, UnicodeDecodeError):
                skipped["unreadable .json spec: ignored"] += 1
        image = None
        img_key = next((k for k in ("png", "jpg", "jpeg", "webp") if k in raw), None)
        if img_key is not None:
            try:
                image = np.asarray(open_rgb(raw[img_key]), dtype=np.uint8)  # the data module's decode
            except Exception:  # noqa: BLE001 - PIL raises many types; one bad image must not stop the probe
                skipped["unreadable image: caption kept"] += 1
        samples.append({"key": raw.get("__key__", ""), "captions": captions, "spec": spec, "image": image})
    skipped.update(counter.drain())
    for reason, count in skipped.items():
        log.warning("probe shards: %d x %s", count, reason)
    return samples, skipped


def shard_probe_set(
    shards: str | Sequence[str],
    n: int = 1000,
    image_encoder: str | None = "dinov2",
    image_weights: str | None = None,
    resolution: int = 224,
) -> ProbeSet:
    """Probe set from WebDataset shards: up to ``n`` retrieval captions (all captions of a sample are one
    scene). Relevance: from scene specs when every sample has one (shapes-world shards), else the cosine of
    image features (clamped to [0, 1]) from ``image_encoder``; if its weights are absent, relevance falls back
    to "same image" only and a note says so. Reductions come from :func:`reduce_caption`."""
    from emf_lightning.probe.image_embedders import build_image_embedder
    from emf_lightning.utils.weights import MissingWeightsError

    samples, skipped = read_shard_samples(shards, n)
    captions, owner = [], []
    for i, s in enumerate(samples):
        for c in s["captions"]:
            if len(captions) < n:
                captions.append(c)
                owner.append(i)
    if len(captions) < 3:
        raise ValueError(f"shards {shards!r} gave only {len(captions)} captions; the probe needs at least 3")
    owner_t = torch.tensor(owner)
    same = owner_t[:, None] == owner_t[None, :]
    probe = ProbeSet(name=f"shards:{shards if isinstance(shards, str) else ','.join(shards)}", captions=captions)
    if skipped:
        probe.notes.append("shard problems: " + ", ".join(f"{v} x {k}" for k, v in sorted(skipped.items())))
    used = sorted(set(owner))
    if all(samples[i]["spec"] is not None for i in used):
        probe.relevance = spec_relevance_matrix([samples[i]["spec"] for i in owner])
        probe.same_scene = probe.relevance >= 1.0
        probe.relevance_source = SPEC_RELEVANCE
    else:
        probe.same_scene = same
        reason = ""
        if image_encoder is None:
            reason = "no image encoder chosen"
        elif any(samples[i]["image"] is None for i in used):
            reason = "some samples have no readable image"
        else:
            try:
                embed = build_image_embedder(image_encoder, weights=image_weights)
                images = _stack_resized([samples[i]["image"] for i in used], resolution)
                feats = embed(images)
                sims = torch.nn.functional.normalize(feats.double(), dim=1)
                img_rel = (sims @ sims.T).clamp(0, 1)
                pos = {s: j for j, s in enumerate(used)}
                rows = torch.tensor([pos[o] for o in owner])
                probe.relevance = img_rel[rows][:, rows].masked_fill(same, 1.0)
                probe.relevance_source = f"image features ({image_encoder}) cosine, clamped to [0, 1]"
            except MissingWeightsError as err:
                reason = str(err)
        if probe.relevance is None:
            probe.relevance = same.double()
            probe.relevance_source = "same image only (image-feature relevance skipped)"
            probe.notes.append(f"image-feature relevance skipped: {reason}")
    for i in used:
        probe.add_reductions(samples[i]["captions"][0], reduce_caption(samples[i]["captions"][0]))
    probe.notes.append("minimal pairs need scene specs and the shapes world's perturbations; not built from shards")
    return probe


def _stack_resized(images: Iterable[np.ndarray], size: int) -> np.ndarray:
    """Square-resize uint8 images so they stack into one [B, size, size, 3] array."""
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC)) for im in images])
