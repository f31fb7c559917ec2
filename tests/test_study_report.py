"""The encoder study's composition report: per-category table and the probe-edit -> category rank correlations."""

from __future__ import annotations

import pytest

from helpers import load_tool

study = load_tool("encoder_study")


def run(encoder: str, position: float, color_attr: float, counting: float) -> dict:
    one_step = {"shapes_position": position, "shapes_color_attr": color_attr, "shapes_counting": counting}
    return {"encoder": encoder, "objective": "meanflow", "shapes": {1: one_step}}


def probe(relation: float, binding: float, count: float) -> dict:
    """Pooled-feature scores as given; token-level ones in the reverse order of encoders (1 - score)."""
    scores = {"relation": relation, "swap_binding": binding, "count": count}
    pooled = {f"minimal_pairs/accuracy/{e}": v for e, v in scores.items()}
    return pooled | {f"minimal_pairs_token/accuracy/{e}": 1 - v for e, v in scores.items()}


def test_each_edit_is_correlated_with_its_own_category_only():
    # relation ranks agree with position (+1); binding ranks are the reverse of color_attr (-1); count ranks
    # agree with counting except one swapped neighbour (1 - 6 * 2 / (4 * 15) = +0.8).
    runs = [run("a", 0.1, 0.4, 0.1), run("b", 0.2, 0.3, 0.3), run("c", 0.3, 0.2, 0.2), run("d", 0.4, 0.1, 0.4)]
    probes = {
        "a": probe(0.5, 0.5, 0.5),
        "b": probe(0.6, 0.6, 0.6),
        "c": probe(0.7, 0.7, 0.7),
        "d": probe(0.8, 0.8, 0.8),
    }
    lines = study.composition_report(runs, probes)
    text = "\n".join(lines)
    assert "probe minimal pairs (relation, pooled) vs 1-step position: Spearman +1.00 (n = 4 encoders)" in text
    assert "probe minimal pairs (swap_binding, pooled) vs 1-step color_attr: Spearman -1.00 (n = 4 encoders)" in text
    assert "probe minimal pairs (count, pooled) vs 1-step counting: Spearman +0.80 (n = 4 encoders)" in text
    assert "probe minimal pairs (relation, token) vs 1-step position: Spearman -1.00 (n = 4 encoders)" in text
    assert text.count("(n = 12 encoder-edit pairs)") == 2
    # categories in CATEGORIES order, then the pooled and the token-level edit scores
    assert "| d | 0.400 | 0.400 | 0.100 | 0.800 | 0.800 | 0.800 | 0.200 | 0.200 | 0.200 |" in text


def test_no_correlation_from_fewer_than_three_encoders():
    runs = [run("a", 0.1, 0.4, 0.1), run("b", 0.2, 0.3, 0.3)]
    text = "\n".join(study.composition_report(runs, {"a": probe(0.5, 0.5, 0.5), "b": probe(0.6, 0.6, 0.6)}))
    assert "Spearman" not in text and "| b | 0.300 | 0.200 | 0.300 |" in text


@pytest.mark.parametrize("categories", [["shapes_colors"], []])
def test_single_category_runs_get_no_composition_table(categories):
    runs = [{"encoder": "a", "objective": "meanflow", "shapes": {1: dict.fromkeys(categories, 0.5)}}]
    assert study.composition_report(runs, {}) == []
