"""The shapes world: scenes (``scene``), their pictures (``render``) and captions (``captions``), the dataset
and its shard source (``world``), and the exact judge of generated images (``judge``: ShapesEval)."""

from emf_lightning.shapes.captions import describe, paraphrases, reduced_captions
from emf_lightning.shapes.judge import Detection, ShapesEval
from emf_lightning.shapes.render import render
from emf_lightning.shapes.scene import (
    ALL_SHAPES,
    BACKGROUND,
    CATEGORIES,
    COLORS,
    HELDOUT_PAIRS,
    PERTURBATIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    SPLITS,
    SceneError,
    perturb,
    scene_spec_or_none,
    validate_spec,
)
from emf_lightning.shapes.world import ShapesSample, ShapesWorld, shapes_samples

__all__ = [
    "ALL_SHAPES",
    "BACKGROUND",
    "CATEGORIES",
    "COLORS",
    "HELDOUT_PAIRS",
    "PERTURBATIONS",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "Detection",
    "SceneError",
    "ShapesEval",
    "ShapesSample",
    "ShapesWorld",
    "describe",
    "paraphrases",
    "perturb",
    "reduced_captions",
    "render",
    "scene_spec_or_none",
    "shapes_samples",
    "validate_spec",
]
