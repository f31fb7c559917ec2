"""Prompts as users write them: rewordings of a shapes-world scene that the caption grammar never produces.

The training grammar (``shapes.captions``) always states size, colour and shape, with an article, in lower
case, without punctuation ("a large red circle", "there is a big disk in red"). People write "red circle",
"RED CIRCLE", "please draw a red circle.", "a circle that is red". Each *family* below is one such habit;
every family keeps the scene's facts (a colour the judge can check, the shape) and may drop the size, which
the judge does not score for single objects.

Families are split once, here, before any experiment:

* ``DEV_FAMILIES`` may be used for training (caption augmentation) and for tuning decisions;
* ``FINAL_FAMILIES`` are the final test: never seen in training and never used to choose a setting. They
  include words outside the training vocabulary (fillers, colour and shape words the grammar never uses).

Only single-object scenes are reworded (the ``colors`` and ``single_object`` categories, the demo's held-out
prompts); :func:`reword` returns None for other scenes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from emf_lightning.shapes.captions import SHAPE_WORDS, SIZE_WORDS, with_article

Obj = Mapping[str, Any]


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _shape(obj: Obj, rng: np.random.Generator) -> str:
    return _pick(rng, [singular for singular, _ in SHAPE_WORDS[obj["shape"]]])


def _size(obj: Obj, rng: np.random.Generator) -> str:
    return _pick(rng, SIZE_WORDS[obj["size"]])


def _grammar(obj: Obj, rng: np.random.Generator) -> str:
    """A noun phrase as the training grammar writes it: 'a large red circle'."""
    return with_article(f"{_size(obj, rng)} {obj['color']} {_shape(obj, rng)}")


# Words the caption grammar never uses: fillers, styles and requests a user adds, and out-of-vocabulary synonyms
# of the shapes (the judge checks the shape, so they must mean the same thing).
_FILLERS = ("glossy", "flat", "simple", "plain", "bright", "solid", "neat", "clean")
_STYLES = (
    "in flat vector style",
    "as a minimalist icon",
    "with sharp edges",
    "in the middle of the frame",
    "centred on a dark canvas",
    "as clip art",
)
_OOV_SHAPES = {
    "circle": ("disc", "round shape", "ball"),
    "square": ("block", "square tile", "box shape"),
    "triangle": ("three-sided shape", "triangular shape", "wedge shape"),
    "diamond": ("lozenge", "rhomb", "diamond shape"),
}


@dataclass(frozen=True)
class Family:
    """One habit of wording: its name, its split and how it writes a single object."""

    name: str
    split: str  # "dev" or "final"
    write: Callable[[Obj, np.random.Generator], str]


FAMILIES: tuple[Family, ...] = (
    # ---- dev: may train and tune
    Family("no_size", "dev", lambda o, g: with_article(f"{o['color']} {_shape(o, g)}")),
    Family("bare", "dev", lambda o, g: f"{o['color']} {_shape(o, g)}"),
    Family("upper", "dev", lambda o, g: _grammar(o, g).upper()),
    Family("sentence", "dev", lambda o, g: _grammar(o, g).capitalize() + _pick(g, (".", "!", "."))),
    Family(
        "request", "dev", lambda o, g: _pick(g, ("please draw ", "draw ", "generate ", "show me ")) + _grammar(o, g)
    ),
    Family("relative_clause", "dev", lambda o, g: with_article(f"{_shape(o, g)} that is {o['color']}")),
    Family(
        "trailing_detail", "dev", lambda o, g: _grammar(o, g) + _pick(g, (", centered", ", high quality", " on black"))
    ),
    # ---- final: never trained on, never used to choose a setting
    Family("bare_upper", "final", lambda o, g: f"{o['color']} {_shape(o, g)}".upper()),
    Family("colour_suffix", "final", lambda o, g: with_article(f"{_shape(o, g)}, coloured {o['color']}")),
    Family("comma_list", "final", lambda o, g: f"{_shape(o, g)}, {o['color']}, {_size(o, g)}"),
    Family(
        "chatty",
        "final",
        lambda o, g: (
            _pick(g, ("hey, can you make me ", "i would like ", "could you paint "))
            + with_article(f"{o['color']} {_shape(o, g)}")
            + _pick(g, ("?", " please", "!"))
        ),
    ),
    Family(
        "oov_fillers",
        "final",
        lambda o, g: with_article(f"{_pick(g, _FILLERS)} {o['color']} {_shape(o, g)}") + " " + _pick(g, _STYLES),
    ),
    Family("oov_shape", "final", lambda o, g: with_article(f"{o['color']} {_pick(g, _OOV_SHAPES[o['shape']])}")),
)
DEV_FAMILIES = tuple(f.name for f in FAMILIES if f.split == "dev")
FINAL_FAMILIES = tuple(f.name for f in FAMILIES if f.split == "final")
_BY_NAME = {f.name: f for f in FAMILIES}


def families(split: str = "final") -> tuple[str, ...]:
    """Family names of ``split`` ("dev", "final" or "all")."""
    if split == "all":
        return DEV_FAMILIES + FINAL_FAMILIES
    if split not in ("dev", "final"):
        raise ValueError(f"split must be 'dev', 'final' or 'all', got {split!r}")
    return DEV_FAMILIES if split == "dev" else FINAL_FAMILIES


def reword(spec: Mapping[str, Any], family: str, rng: np.random.Generator) -> str | None:
    """The scene in the wording of ``family``, or None when the scene is not a single object."""
    if family not in _BY_NAME:
        raise ValueError(f"unknown wording family {family!r}; known: {', '.join(_BY_NAME)}")
    objects = spec.get("objects") or []
    if len(objects) != 1:
        return None
    return _BY_NAME[family].write(objects[0], rng)


def reword_all(specs: Sequence[Mapping[str, Any]], split: str = "final", seed: int = 0) -> list[str | None]:
    """One rewording per scene, the families of ``split`` in turn (scene i gets family i mod n), deterministic."""
    names = families(split)
    rng = np.random.default_rng(seed)
    return [reword(spec, names[i % len(names)], rng) for i, spec in enumerate(specs)]
