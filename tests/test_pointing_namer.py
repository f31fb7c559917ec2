"""The pointing namer (``model.slot_pointer``): each attribute of a slot's name read from the caption's words the
slot points at, which kind of word chosen from the word alone and which object's from the slot's index and the
word's position."""

from __future__ import annotations

import math

import pytest
import torch

from emf_lightning.checkpoint_config import is_structural
from emf_lightning.errors import ConfigError
from emf_lightning.models.connector import TextConnector
from emf_lightning.models.layers import sincos_1d
from emf_lightning.models.slot_namer import ATTRIBUTE_SIZES, PointingNamer, SlotNamer

from helpers import tiny_module, tiny_unet


def _drawn_namer(dim: int = 8, key_dim: int = 4, slots: int = 2) -> PointingNamer:
    torch.manual_seed(0)
    namer = PointingNamer(dim, slots, key_dim=key_dim, max_tokens=16)
    for p in namer.parameters():  # biases too: every term of the reference below is exercised
        torch.nn.init.normal_(p, std=0.5)
    return namer


def test_the_namer_matches_a_reference_written_word_by_word():
    namer = _drawn_namer()
    slots, words = torch.randn(3, 2, 8), torch.randn(3, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    logits, place = namer(slots, words, mask)
    positions = sincos_1d(torch.arange(5), 8).float()
    for b in range(3):
        readable = [j for j in range(5) if mask[b, j]] or list(range(5))  # a row without words reads them all
        for k in range(2):
            for a, size in enumerate(namer.sizes):
                rows = slice(a * 4, (a + 1) * 4)
                scores = []
                for j in readable:
                    key = namer.word_position.weight[rows] @ positions[j] + namer.word_position.bias[rows]
                    kind = namer.word_kind.weight[a] @ words[b, j] + namer.word_kind.bias[a]
                    scores.append(kind + namer.which_words[k, rows] @ key / math.sqrt(4))
                weights = torch.stack(scores).softmax(0)
                read = sum(w * words[b, j] for w, j in zip(weights, readable))
                want = namer.classify[a].weight @ read + namer.classify[a].bias
                want[-1] += namer.nothing.weight[a] @ slots[b, k] + namer.nothing.bias[a]
                torch.testing.assert_close(logits[a][b, k], want, atol=1e-5, rtol=1e-5)
                assert logits[a].shape == (3, 2, size)
    torch.testing.assert_close(place, torch.sigmoid(slots @ namer.place.weight.T + namer.place.bias))


def test_the_words_read_depend_on_their_kind_and_position_and_the_slot_s_index_never_its_token():
    """The weights never depend on the slot tokens; without the word-kind term they depend on positions only (any
    words, same weights); with it the words' content moves them. Padding is never read."""
    namer = _drawn_namer(slots=3)
    words, other = torch.randn(1, 6, 8), torch.randn(1, 6, 8)
    first, second = namer(torch.randn(1, 3, 8), words, None), namer(torch.randn(1, 3, 8), words, None)
    for a in range(len(namer.sizes)):  # other slot tokens: only the "no object" logit moves
        torch.testing.assert_close(first[0][a][..., :-1], second[0][a][..., :-1])
    assert not torch.allclose(namer.pointing(words, None), namer.pointing(other, None))
    weights = namer.pointing(words, torch.tensor([[1, 1, 1, 1, 0, 0]], dtype=torch.bool))
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 3, 3))
    assert weights[..., 4:].abs().max() == 0
    assert not torch.allclose(weights[:, :, 0], weights[:, :, 1])  # each slot has its own preference
    with torch.no_grad():
        namer.word_kind.weight.zero_()
    torch.testing.assert_close(namer.pointing(words, None), namer.pointing(other, None))
    with pytest.raises(ValueError, match="built for 3 slots, got 2"):
        namer(torch.randn(1, 2, 8), words, None)


def test_pointed_at_its_shape_word_an_unseen_pair_gets_the_shape_reading_of_a_seen_one():
    """Words as one-hot vectors over the vocabulary (colours, then shapes, then sizes), and a word-kind term that
    marks each attribute's words: whatever the classifiers learnt, the shape of "a large red triangle" is read
    exactly as the shape of "a large blue triangle", in any word order. A namer of a slot token that mixes the words gives the unseen pair its own reading."""
    torch.manual_seed(0)
    vocab = sum(ATTRIBUTE_SIZES)
    namer = PointingNamer(vocab, 2, key_dim=4)
    kinds = torch.repeat_interleave(torch.arange(3), torch.tensor(ATTRIBUTE_SIZES))
    with torch.no_grad():
        namer.word_kind.weight.copy_(40.0 * torch.nn.functional.one_hot(kinds, 3).T.float())
        namer.word_kind.bias.zero_()
    offsets = (0, ATTRIBUTE_SIZES[0], ATTRIBUTE_SIZES[0] + ATTRIBUTE_SIZES[1])

    def words(color, shape, size, order):
        ids = [offsets[a] + (color, shape, size)[a] for a in order]
        return torch.eye(vocab)[ids][None]

    slots = torch.randn(1, 2, vocab)
    for order in ([1, 2, 0], [2, 0, 1]):
        unseen, seen = namer(slots, words(0, 3, 1, order), None), namer(slots, words(1, 3, 1, [0, 1, 2]), None)
        torch.testing.assert_close(unseen[0][1], seen[0][1])  # the shape: the triangle's, as in training
        torch.testing.assert_close(unseen[0][2], seen[0][2])  # the size
        assert not torch.allclose(unseen[0][0], seen[0][0])  # the colour is the caption's own
    mixing = torch.nn.Sequential(torch.nn.Linear(vocab, 64), torch.nn.GELU(), torch.nn.Linear(64, vocab))
    slot_namer = SlotNamer(vocab)
    unseen_slot = mixing(words(0, 3, 1, [0, 1, 2]).sum(1, keepdim=True))
    seen_slot = mixing(words(1, 3, 1, [0, 1, 2]).sum(1, keepdim=True))
    assert not torch.allclose(slot_namer(unseen_slot)[0][1], slot_namer(seen_slot)[0][1], atol=1e-3)


def test_the_pointer_needs_a_namer_is_structural_and_reads_the_words_in_named_slots():
    with pytest.raises(ValueError, match="set named_slots=True or layout=True"):
        TextConnector(6, 32, slots=2, pointer=True)
    with pytest.raises(ConfigError, match="model.slot_pointer chooses how the connector names"):
        tiny_module(backbone=tiny_unet(), text_slots=4, object_supervision=0.5, slot_pointer=True)
    assert is_structural("slot_pointer")
    with pytest.raises(ValueError, match="pass words"):
        PointingNamer(8, 2)(torch.randn(1, 2, 8))
    torch.manual_seed(0)
    connector = TextConnector(6, 32, slots=2, named_slots=True, pointer=True)
    assert connector.pointer and not TextConnector(6, 32, slots=2, named_slots=True).pointer
    x, mask = torch.randn(1, 4, 6), torch.ones(1, 4, dtype=torch.bool)
    changed = x.clone()
    changed[0, 2] = torch.randn(6)
    before, after = connector.context(x, mask)[0][:, 4:], connector.context(changed, mask)[0][:, 4:]
    assert not torch.allclose(before, after)  # the named slots read the words themselves
