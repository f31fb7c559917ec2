"""Captions written from a shapes-world spec: a canonical one, paraphrases, and reduced versions.

Every paraphrase states the same facts (each object's size, colour and shape; the stated relation or the
count); phrasings vary word order, synonyms ("circle"/"disk"/"round dot", "big"/"large", "left of"/"to the
left of") and which object a relation starts from ("a red circle left of a blue square" = "a blue square
right of a red circle"). Colour words are never substituted: they are what attribute binding is about.

Each scene's phrasings form a finite space (a product of slot choices); paraphrases are drawn without
replacement from it, so they are distinct and deterministic for a given rng.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from emf_lightning.shapes.scene import INVERSE_RELATION, validate_spec

SHAPE_WORDS: dict[str, list[tuple[str, str]]] = {  # (singular, plural); the first is canonical
    "circle": [("circle", "circles"), ("disk", "disks"), ("round dot", "round dots")],
    "square": [("square", "squares"), ("box", "boxes")],
    "triangle": [("triangle", "triangles")],
    "diamond": [("diamond", "diamonds"), ("rhombus", "rhombuses")],
}
SIZE_WORDS: dict[str, list[str]] = {"small": ["small", "little"], "large": ["large", "big"]}
RELATION_WORDS: dict[str, list[str]] = {
    "left of": ["to the left of", "left of", "on the left of"],
    "right of": ["to the right of", "right of", "on the right of"],
    "above": ["above", "over"],
    "below": ["below", "under", "beneath"],
}
COUNT_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}

_SINGLE_TEMPLATES = ("{A}", "a picture of {A}", "an image of {A}", "{A} on a black background", "there is {A}")
_PAIR_TEMPLATES = (
    "{A} and {B}",
    "{B} and {A}",
    "{A} together with {B}",
    "{A} as well as {B}",
    "a picture of {A} and {B}",
)
# (template, uses the inverse relation word)
_RELATION_TEMPLATES = (
    ("{A} {rel} {B}", False),
    ("{A} is {rel} {B}", False),
    ("{B} {rel} {A}", True),
    ("{B} is {rel} {A}", True),
    ("{B} with {A} {rel} it", False),
)
_COUNT_TEMPLATES = ("{G}", "exactly {G}", "a picture of {G}", "{G} on a black background", "there are {G}")


def with_article(phrase: str) -> str:
    """'orange circle' -> 'an orange circle'; 'red circle' -> 'a red circle'."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def noun_phrases(obj: Mapping[str, Any], size: bool = True, color: bool = True) -> list[str]:
    """All phrasings of one object with its article, canonical first ('a large red circle', ...)."""
    sizes = SIZE_WORDS[obj["size"]] if size else [""]
    colour = obj["color"] if color else ""
    out = []
    for form, size_word, (noun, _) in itertools.product((0, 1), sizes, SHAPE_WORDS[obj["shape"]]):
        if form == 0:
            words = [size_word, colour, noun]
        elif color:  # "a large circle in red": only meaningful when the colour is stated
            words = [size_word, noun, "in", colour]
        else:
            continue
        out.append(with_article(" ".join(w for w in words if w)))
    return out


def group_phrases(obj: Mapping[str, Any], count: int | None, size: bool = True, color: bool = True) -> list[str]:
    """Phrasings of a group of identical objects: 'two small red circles'; count=None omits the number."""
    if count is not None and count not in COUNT_WORDS:
        raise ValueError(f"no count word for {count}")
    number = COUNT_WORDS[count] if count is not None else ""
    sizes = SIZE_WORDS[obj["size"]] if size else [""]
    colour = obj["color"] if color else ""
    return [
        " ".join(w for w in (number, size_word, colour, plural) if w)
        for size_word, (_, plural) in itertools.product(sizes, SHAPE_WORDS[obj["shape"]])
    ]


def _phrase_space(spec: Mapping[str, Any]) -> tuple[list[int], Callable[[Sequence[int]], str]]:
    """(radix of each slot, decoder from slot indices to a caption). Index (0, 0, ...) is canonical."""
    objects, category = spec["objects"], spec["category"]
    if category == "counting":
        groups = group_phrases(objects[0], len(objects))
        return [len(_COUNT_TEMPLATES), len(groups)], lambda k: _COUNT_TEMPLATES[k[0]].format(G=groups[k[1]])
    if len(objects) == 1:
        nps = noun_phrases(objects[0])
        return [len(_SINGLE_TEMPLATES), len(nps)], lambda k: _SINGLE_TEMPLATES[k[0]].format(A=nps[k[1]])
    if len(objects) != 2:
        raise ValueError(f"a '{category}' scene with {len(objects)} objects has no caption grammar")
    np_a, np_b = noun_phrases(objects[0]), noun_phrases(objects[1])
    if spec.get("relations"):
        rel = spec["relations"][0]
        if (rel["a"], rel["b"]) == (1, 0):  # normalise so that A is always the relation's subject
            np_a, np_b = np_b, np_a
        choices = [
            (template, word)
            for template, inverse in _RELATION_TEMPLATES
            for word in RELATION_WORDS[INVERSE_RELATION[rel["rel"]] if inverse else rel["rel"]]
        ]

        def decode(k: Sequence[int]) -> str:
            template, word = choices[k[0]]
            return template.format(A=np_a[k[1]], B=np_b[k[2]], rel=word)

        return [len(choices), len(np_a), len(np_b)], decode
    return (
        [len(_PAIR_TEMPLATES), len(np_a), len(np_b)],
        lambda k: _PAIR_TEMPLATES[k[0]].format(A=np_a[k[1]], B=np_b[k[2]]),
    )


def _unravel(index: int, radices: Sequence[int]) -> list[int]:
    out = []
    for r in reversed(radices):
        index, k = divmod(index, r)
        out.append(k)
    return out[::-1]


def paraphrases(spec: Mapping[str, Any], n: int, rng: np.random.Generator) -> list[str]:
    """``n`` distinct captions of the scene drawn at random from its phrasing space (fewer if fewer exist)."""
    validate_spec(spec)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    radices, decode = _phrase_space(spec)
    total = int(np.prod(radices))
    picks = rng.choice(total, size=min(n, total), replace=False)
    out: list[str] = []
    for idx in picks:
        caption = decode(_unravel(int(idx), radices))
        if caption not in out:  # distinct slot choices could in principle spell the same words
            out.append(caption)
    return out


def describe(spec: Mapping[str, Any], rng: np.random.Generator | None = None) -> str:
    """The canonical caption ('a large red circle to the left of a small blue square'), or a random
    paraphrase when ``rng`` is given."""
    validate_spec(spec)
    if rng is not None:
        return paraphrases(spec, 1, rng)[0]
    radices, decode = _phrase_space(spec)
    return decode([0] * len(radices))


def reduced_captions(spec: Mapping[str, Any]) -> list[str]:
    """The canonical caption with parts removed, for the disentanglement test, in this order:
    without size words; without the relation (position scenes) or the number (counting scenes); each
    object alone (two-object scenes); without colour words. Duplicates and the full caption are dropped."""
    validate_spec(spec)
    objects, category = spec["objects"], spec["category"]
    full = describe(spec)
    out: list[str] = []
    if category == "counting":
        n = len(objects)
        out += [group_phrases(objects[0], n, size=False)[0], group_phrases(objects[0], None)[0]]
        out.append(group_phrases(objects[0], n, color=False)[0])
    elif len(objects) == 1:
        out += [noun_phrases(objects[0], size=False)[0], noun_phrases(objects[0], color=False)[0]]
    else:
        a, b = objects[0], objects[1]
        rels = spec.get("relations") or []
        if rels:
            rel = rels[0]
            subj, obj = (a, b) if (rel["a"], rel["b"]) == (0, 1) else (b, a)
            word = RELATION_WORDS[rel["rel"]][0]

            def join(x: str, y: str) -> str:
                return f"{x} {word} {y}"

        else:
            subj, obj = a, b

            def join(x: str, y: str) -> str:
                return f"{x} and {y}"

        out.append(join(noun_phrases(subj, size=False)[0], noun_phrases(obj, size=False)[0]))
        if rels:
            out.append(f"{noun_phrases(subj)[0]} and {noun_phrases(obj)[0]}")
        out += [noun_phrases(subj)[0], noun_phrases(obj)[0]]
        out.append(join(noun_phrases(subj, color=False)[0], noun_phrases(obj, color=False)[0]))
    seen = {full}
    result = []
    for caption in out:
        if caption not in seen:
            seen.add(caption)
            result.append(caption)
    return result
