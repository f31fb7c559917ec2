"""The shapes world: an offline, deterministic, compositional text-to-image dataset with exact ground truth.

``ShapesWorld(seed, resolution, split, mix)[i]`` is a pure function of (seed, split, i): it seeds
``np.random.default_rng([seed, split_id, i])``, so random access works in any DataLoader worker and on any
node. The vocabulary, scene categories and held-out pairs live in ``scene``; rendering in ``render``;
captions in ``captions``. ``shapes_samples`` turns a world into shard samples (``emf shards shapes``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from torch.utils.data import Dataset

from emf_lightning.data.shards import ShardSample
from emf_lightning.shapes.captions import describe, paraphrases
from emf_lightning.shapes.render import render
from emf_lightning.shapes.scene import ALL_SHAPES, COLORS, HELDOUT_PAIRS, SHAPES, SPLITS, normalise_mix, sample_scene
from emf_lightning.shapes.wordings import DEV_FAMILIES, reword


@dataclass
class ShapesSample:
    """One scene: its image, a caption, its paraphrases (caption included), the JSON spec and a unique key."""

    image: np.ndarray  # uint8 [H, W, 3]
    caption: str
    captions: list[str]
    spec: dict[str, Any]
    key: str


class ShapesWorld(Dataset):
    """A map-style dataset of ``size`` shapes scenes.

    Args:
        seed: world seed; (seed, split, index) fully determines a sample.
        resolution: image side in pixels (32 default; 64, 128, 256 work).
        split: ``train``, ``val``, ``test`` (never contain a held-out colour-shape pair, separate random
            streams) or ``heldout`` (every scene contains at least one pair of ``heldout``).
        mix: category -> weight (e.g. ``{"single_object": 2, "colors": 2, "two_objects": 1}``); ``None``
            is uniform over all six categories.
        size: ``len(world)``.
        n_captions: paraphrases drawn per sample (fewer if the scene has fewer phrasings).
        caption_mode: ``random`` (``caption`` is the first paraphrase) or ``canonical`` (``describe(spec)``).
        heldout: the held-out (colour, shape) pairs.
        shapes: the shapes scenes use (default SHAPES; ALL_SHAPES adds the diamond, for 64 px and up).
        supersample: antialiasing factor of the renderer.
        reworded_captions: also add this many rewordings of a single-object scene to ``captions``, in the
            ``shapes.wordings`` *dev* families (prompts as users write them; the final test's families are never
            used for training).
    """

    def __init__(
        self,
        seed: int = 0,
        resolution: int = 32,
        split: str = "train",
        mix: Mapping[str, float] | None = None,
        size: int = 10_000,
        n_captions: int = 4,
        caption_mode: Literal["random", "canonical"] = "random",
        heldout: Sequence[tuple[str, str]] = HELDOUT_PAIRS,
        shapes: Sequence[str] = SHAPES,
        supersample: int = 4,
        reworded_captions: int = 0,
    ):
        if split not in SPLITS:
            raise ValueError(f"unknown split '{split}' (known: {', '.join(SPLITS)})")
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        if n_captions < 1:
            raise ValueError(f"n_captions must be >= 1, got {n_captions}")
        if reworded_captions < 0:
            raise ValueError(f"reworded_captions must be >= 0, got {reworded_captions}")
        if caption_mode not in ("random", "canonical"):
            raise ValueError(f"caption_mode must be 'random' or 'canonical', got '{caption_mode}'")
        if int(seed) < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed}")
        self.seed, self.resolution, self.split, self.size = int(seed), int(resolution), split, int(size)
        self.n_captions, self.caption_mode, self.supersample = n_captions, caption_mode, supersample
        self.reworded_captions = int(reworded_captions)
        unknown = [s for s in shapes if s not in ALL_SHAPES]
        if unknown or not shapes:
            raise ValueError(f"shapes must be a non-empty subset of {ALL_SHAPES}, got {list(shapes)}")
        self.shapes = tuple(shapes)
        self.heldout = tuple(tuple(p) for p in heldout)
        for colour, shape in self.heldout:
            if colour not in COLORS or shape not in self.shapes:
                raise ValueError(f"held-out pair ({colour!r}, {shape!r}) is not a (colour, shape) of this world")
        self.categories, self.probabilities = normalise_mix(mix)

    def __len__(self) -> int:
        return self.size

    def rng(self, index: int) -> np.random.Generator:
        """The generator that sample ``index`` draws from (independent streams per seed, split, index)."""
        return np.random.default_rng([self.seed, SPLITS[self.split], index])

    def spec(self, index: int) -> dict[str, Any]:
        """The scene spec of sample ``index`` without rendering it."""
        return self._spec(self._index(index), self.rng(self._index(index)))

    def _index(self, index: int) -> int:
        i = int(index)
        if i < 0:
            i += self.size
        if not 0 <= i < self.size:
            raise IndexError(f"index {index} out of range for a ShapesWorld of size {self.size}")
        return i

    def _spec(self, i: int, rng: np.random.Generator) -> dict[str, Any]:
        category = self.categories[int(rng.choice(len(self.categories), p=self.probabilities))]
        return sample_scene(rng, category, self.split, self.heldout, self.shapes)

    def __getitem__(self, index: int) -> ShapesSample:
        i = self._index(index)
        rng = self.rng(i)
        spec = self._spec(i, rng)
        captions = paraphrases(spec, self.n_captions, rng)
        caption = describe(spec) if self.caption_mode == "canonical" else captions[0]
        if self.reworded_captions:  # training augmentation: only the dev families, never the final test's
            families = [DEV_FAMILIES[int(k)] for k in rng.choice(len(DEV_FAMILIES), self.reworded_captions, False)]
            captions += [c for c in (reword(spec, f, rng) for f in families) if c is not None and c not in captions]
        image = render(spec, self.resolution, self.supersample)
        key = f"{self.split}-{self.seed}-{i:08d}"
        return ShapesSample(image=image, caption=caption, captions=captions, spec=spec, key=key)

    def __repr__(self) -> str:
        mix = dict(zip(self.categories, np.round(self.probabilities, 3).tolist()))
        return (
            f"ShapesWorld(seed={self.seed}, resolution={self.resolution}, split='{self.split}', "
            f"size={self.size}, mix={mix})"
        )


def shapes_samples(world: ShapesWorld, n: int | None = None, start: int = 0) -> Iterator[ShardSample]:
    """Samples ``start .. start+n-1`` of a shapes world as shard samples; ``n=None``: all of it."""
    stop = len(world) if n is None else start + n
    for i in range(start, stop):
        s = world[i]
        yield ShardSample(
            key=s.key,
            image=np.asarray(s.image, dtype=np.uint8),
            caption=s.caption,
            captions=list(s.captions or [s.caption]),
            meta=dict(s.spec),
        )
