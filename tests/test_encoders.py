"""Text encoders on tiny random models: the TextFeatures contract, padding invariance, truncation,
baselines, registry and offline loading."""

from __future__ import annotations

import hashlib
import warnings

import pytest
import torch

from emf_lightning.encoders import (
    EMF_PROMPT_TEMPLATE,
    ENCODERS,
    BagOfWordsEncoder,
    CaptionTruncationWarning,
    CLIPTextEncoder,
    LabelEncoder,
    LLMEncoder,
    SentenceEncoder,
    T5Encoder,
    TextFeatures,
    build_encoder,
    build_encoder_from_config,
    pack_tokens,
)
from emf_lightning.encoders.label import hash_class
from emf_lightning.meanflow import null_features
from emf_lightning.utils.hub import weights_available
from emf_lightning.utils.weights import MissingWeightsError

CAPTIONS = [
    "a red circle left of a blue square",
    "two cats",
    "a green triangle above a small yellow star on a plain background",
]
TINY = {
    "llm": dict(pretrained=False),
    "qwen3": dict(pretrained=False),
    "t5": dict(pretrained=False),
    "clip": dict(pretrained=False),
    "minilm": dict(pretrained=False),
    "bow": dict(dim=48),
    "label": dict(num_classes=7, dim=16),
}
TRANSFORMER_NAMES = ["llm", "t5", "clip", "minilm"]


@pytest.fixture(scope="module")
def encoders() -> dict:
    return {name: build_encoder(name, **kwargs) for name, kwargs in TINY.items()}


@pytest.fixture(scope="module")
def left_encoders() -> dict:
    return {name: build_encoder(name, padding_side="left", **TINY[name]) for name in TRANSFORMER_NAMES}


def test_registry_has_every_encoder() -> None:
    # "precomputed" serves a copied feature cache (no model to build tiny): tests/test_precomputed_encoder.py
    models = {name: cls for name, cls in ENCODERS.items() if name != "precomputed"}
    assert set(models) == set(TINY)
    assert {cls.name for cls in models.values()} == set(TINY)


@pytest.mark.parametrize("name", list(TINY))
def test_features_follow_the_contract(encoders, name) -> None:
    enc = encoders[name]
    feats = enc.encode(CAPTIONS)
    b = len(CAPTIONS)
    assert feats.tokens.dtype == torch.float32 and feats.pooled.dtype == torch.float32
    assert feats.mask.dtype == torch.bool
    assert feats.tokens.shape[0] == b and feats.tokens.shape[2] == enc.dim
    assert feats.pooled.shape == (b, enc.dim)
    assert feats.mask.shape == feats.tokens.shape[:2]
    assert bool(feats.mask.any(1).all())
    assert int(feats.mask.sum(1).max()) == feats.tokens.shape[1]  # padded to the longest caption, no more
    assert torch.count_nonzero(feats.tokens[~feats.mask]) == 0  # exact zeros in padding
    # real tokens come first in each row (right-packed), whatever the padding side inside the model
    lengths = feats.mask.sum(1, keepdim=True)
    assert torch.equal(feats.mask, torch.arange(feats.mask.shape[1]).unsqueeze(0) < lengths)
    feats.validate()
    assert torch.isfinite(feats.tokens).all() and torch.isfinite(feats.pooled).all()


@pytest.mark.parametrize("name", list(TINY))
def test_encoders_are_frozen_and_stay_in_eval_mode(encoders, name) -> None:
    enc = encoders[name]
    enc.train()  # what a parent LightningModule does at the start of fit
    assert not enc.training and all(not m.training for m in enc.modules())
    assert all(not p.requires_grad for p in enc.parameters())
    feats = enc.encode(CAPTIONS[:2])
    assert not feats.tokens.requires_grad and feats.tokens.grad_fn is None
    # a trainable head on top: its backward must not reach the encoder
    head = torch.nn.Linear(enc.dim, 1)
    head(feats.tokens).sum().backward()
    assert head.weight.grad is not None
    assert all(p.grad is None for p in enc.parameters())


@pytest.mark.parametrize("name", TRANSFORMER_NAMES)
def test_features_do_not_depend_on_batch_neighbours_or_padding_side(encoders, left_encoders, name) -> None:
    right, left = encoders[name], left_encoders[name]
    batch = right.encode(CAPTIONS)
    swapped = left.encode(CAPTIONS)
    for i, caption in enumerate(CAPTIONS):
        alone = right.encode([caption])
        n = alone.tokens.shape[1]
        assert int(batch.mask[i].sum()) == n
        torch.testing.assert_close(batch.tokens[i, :n], alone.tokens[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(batch.pooled[i], alone.pooled[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(swapped.tokens, batch.tokens, atol=1e-5, rtol=0)
    torch.testing.assert_close(swapped.pooled, batch.pooled, atol=1e-5, rtol=0)
    assert torch.equal(swapped.mask, batch.mask)


def test_llm_pad_token_equals_eos_and_never_leaks(encoders) -> None:
    enc = encoders["llm"]
    assert enc.tokenizer.pad_token_id == enc.tokenizer.eos_token_id
    feats = enc.encode(CAPTIONS)
    expected = [len(enc.tokenizer(c)["input_ids"]) for c in CAPTIONS]
    assert feats.mask.sum(1).tolist() == expected


def test_llm_template_spans_and_chat_template() -> None:
    full = LLMEncoder(pretrained=False, prompt_template=EMF_PROMPT_TEMPLATE)
    span = LLMEncoder(pretrained=False, prompt_template=EMF_PROMPT_TEMPLATE, span="caption", padding_side="left")
    a, c = full.encode(CAPTIONS), span.encode(CAPTIONS)
    prefix_len = len(full.tokenizer("Please generate image based on the following caption:")["input_ids"])
    for i in range(len(CAPTIONS)):
        n_all, n_cap = int(a.mask[i].sum()), int(c.mask[i].sum())
        assert n_all == prefix_len + n_cap  # the template is a prefix: the caption is the tail
        torch.testing.assert_close(a.tokens[i, n_all - n_cap : n_all], c.tokens[i, :n_cap], atol=1e-5, rtol=0)
    # the template's tokens are the same for every caption (causal attention cannot see the caption)
    torch.testing.assert_close(a.tokens[0, :prefix_len], a.tokens[1, :prefix_len], atol=1e-6, rtol=0)
    assert full.cache_key != span.cache_key != LLMEncoder(pretrained=False).cache_key

    chat = LLMEncoder(pretrained=False, chat_template=True, span="caption")
    rendered = chat.tokenizer.apply_chat_template(
        [{"role": "user", "content": "{caption}"}], tokenize=False, add_generation_prompt=True
    )
    manual = LLMEncoder(pretrained=False, prompt_template=rendered, span="caption")
    assert chat._prefix == "<|im_start|>user\n" and chat._suffix.endswith("<|im_start|>assistant\n")
    torch.testing.assert_close(chat.encode(CAPTIONS).tokens, manual.encode(CAPTIONS).tokens, atol=1e-6, rtol=0)


def test_llm_layer_zero_is_the_token_embedding() -> None:
    enc = LLMEncoder(pretrained=False, layer=0)
    feats = enc.encode(CAPTIONS[:2])
    for i, caption in enumerate(CAPTIONS[:2]):
        ids = torch.tensor(enc.tokenizer(caption)["input_ids"])
        expected = enc.model.get_input_embeddings().weight[ids]
        torch.testing.assert_close(feats.tokens[i, : len(ids)], expected)
    with pytest.raises(ValueError, match="layer=5 out of range"):
        LLMEncoder(pretrained=False, layer=5)


def test_prompt_template_needs_one_caption_field() -> None:
    with pytest.raises(ValueError, match="exactly once"):
        LLMEncoder(pretrained=False, prompt_template="no placeholder here")


@pytest.mark.parametrize("name", ["llm", "t5", "clip", "minilm", "bow"])
def test_truncation_warns_once_with_the_count(name) -> None:
    enc = build_encoder(name, max_length=6, **TINY[name])
    long = "one two three four five six seven eight nine ten eleven twelve"
    with pytest.warns(CaptionTruncationWarning, match=r"2 of 3 captions were truncated to max_length=6") as record:
        feats = enc.encode([long, "a", long + " again"])
    assert len([w for w in record if issubclass(w.category, CaptionTruncationWarning)]) == 1
    assert feats.tokens.shape[1] == 6 and feats.mask[0].all() and not feats.mask[1].all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enc.encode(["cats", "dogs"])  # nothing cut, nothing said


def test_chunked_encoding_matches_one_batch() -> None:
    big = LLMEncoder(pretrained=False, batch_size=64)
    small = LLMEncoder(pretrained=False, batch_size=2)
    captions = CAPTIONS + ["a blue ring", "three small purple hexagons below a cat"]
    a, b = big.encode(captions), small.encode(captions)
    assert a.tokens.shape == b.tokens.shape and torch.equal(a.mask, b.mask)
    torch.testing.assert_close(a.tokens, b.tokens, atol=1e-5, rtol=0)


def test_compute_dtype_and_float32_features() -> None:
    enc = LLMEncoder(pretrained=False, dtype="bf16")
    assert next(enc.parameters()).dtype == torch.bfloat16
    feats = enc.encode(CAPTIONS[:1])
    assert feats.tokens.dtype == torch.float32
    assert enc.cache_key.endswith("bfloat16") and LLMEncoder(pretrained=False).cache_key.endswith("float32")


def test_clip_pooled_matches_open_clip_encode_text(encoders) -> None:
    import open_clip

    from emf_lightning.encoders.clip import TINY_CLIP
    from emf_lightning.utils.model_helpers import random_init

    reference = random_init(lambda: open_clip.model.CLIP(**TINY_CLIP), 0).eval()
    tokens = open_clip.tokenizer.SimpleTokenizer()(CAPTIONS)
    with torch.no_grad():
        expected = reference.encode_text(tokens)
    torch.testing.assert_close(encoders["clip"].encode(CAPTIONS).pooled, expected, atol=1e-5, rtol=1e-5)


def test_bag_of_words_is_blind_to_word_order(encoders) -> None:
    enc = encoders["bow"]
    a = enc.encode(["a red circle left of a blue square", "a blue circle left of a red square"])
    assert torch.equal(a.tokens[0], a.tokens[1]) and torch.equal(a.pooled[0], a.pooled[1])
    b = enc.encode(["Square BLUE a, a circle red of left!"])  # case and punctuation do not matter either
    assert torch.equal(b.tokens[0], a.tokens[0])
    c = enc.encode(["a red circle left of a green square"])
    assert not torch.equal(c.pooled[0], a.pooled[0])
    # one token per word (duplicates kept: a multiset), vectors fixed by (seed, word) across instances
    assert int(a.mask[0].sum()) == 8
    again = BagOfWordsEncoder(dim=48).encode(["red"])
    assert torch.equal(again.tokens[0, 0], enc.word_vector("red"))
    assert not torch.equal(BagOfWordsEncoder(dim=48, seed=1).encode(["red"]).tokens, again.tokens)
    assert int(enc.encode(["?!"]).mask.sum()) == 1  # no words: one placeholder token, never an empty row


def test_label_encoder_maps_equal_captions_to_equal_features(encoders) -> None:
    enc = encoders["label"]
    feats = enc.encode(["a cat", "a dog", "a cat"])
    assert feats.tokens.shape == (3, 1, 16)
    assert torch.equal(feats.tokens[0], feats.tokens[2]) and torch.equal(feats.pooled[:, None], feats.tokens)
    expected = int.from_bytes(hashlib.blake2b(b"a cat", digest_size=8).digest(), "little") % 7
    assert hash_class("a cat", 7) == expected == int(enc.class_ids(["a cat"])[0])
    gram = enc.table @ enc.table.T
    torch.testing.assert_close(gram, torch.eye(7) * 16, atol=1e-4, rtol=0)  # orthogonal rows, RMS 1


def test_label_encoder_with_a_class_list(tmp_path) -> None:
    path = tmp_path / "classes.txt"
    path.write_text("tench\ngoldfish\nshark\n")
    enc = LabelEncoder(classes=str(path), dim=4)
    assert enc.class_ids(["shark", "tench"]).tolist() == [2, 0]
    with pytest.raises(ValueError, match=r"1 captions are not in the class list, e.g. 'whale'"):
        enc.encode(["shark", "whale"])
    with pytest.raises(ValueError, match="not both"):
        LabelEncoder(classes=["a"], num_classes=3)
    many = LabelEncoder(num_classes=10, dim=4)  # more classes than dims: unit-RMS rows, not orthogonal
    torch.testing.assert_close(many.table.norm(dim=1), torch.full((10,), 2.0))


def test_empty_caption_and_bad_input_are_refused(encoders) -> None:
    enc = encoders["bow"]
    with pytest.raises(ValueError, match="caption 1 is empty: the empty caption is the null condition"):
        enc.encode(["a cat", ""])
    with pytest.raises(TypeError, match="takes a list of captions"):
        enc.encode("a cat")
    with pytest.raises(TypeError, match="caption 0 is int"):
        enc.encode([3])
    with pytest.raises(ValueError, match="empty caption list"):
        enc.encode([])


def test_missing_weights_name_the_model(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    cases = [
        (LLMEncoder, {"model": "Qwen/Qwen3-0.6B"}, "Qwen/Qwen3-0.6B"),
        (ENCODERS["qwen3"], {}, "Qwen/Qwen3-0.6B"),
        (T5Encoder, {}, "google/flan-t5-base"),
        (CLIPTextEncoder, {}, "timm/vit_large_patch14_clip_224.openai"),
        (SentenceEncoder, {"model": "sentence-transformers/all-mpnet-base-v2"}, "all-mpnet-base-v2"),
    ]
    for cls, kwargs, model_id in cases:
        assert not cls.weights_available(**kwargs)
        with pytest.raises(MissingWeightsError, match=model_id) as err:
            cls(**kwargs)
        assert str(tmp_path / "hub") in str(err.value)
    assert LLMEncoder.weights_available(pretrained=False) and BagOfWordsEncoder.weights_available()


@pytest.mark.parametrize("cls", [LLMEncoder, T5Encoder, SentenceEncoder])
def test_pretrained_loads_a_local_folder(tmp_path, cls) -> None:
    tiny = cls(pretrained=False)
    folder = tmp_path / "model"
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    assert weights_available(str(folder)) and cls.weights_available(model=str(folder))
    loaded = cls(model=str(folder))
    assert loaded.cache_key.startswith(f"{cls.name}:{folder}:")
    torch.testing.assert_close(loaded.encode(CAPTIONS).tokens, tiny.encode(CAPTIONS).tokens, atol=1e-6, rtol=0)
    (folder / "model.safetensors").unlink()  # config without weights: a clear error, not a random model
    assert not weights_available(str(folder))
    with pytest.raises(MissingWeightsError, match="no config.json plus model weights"):
        cls(model=str(folder))


def test_registry_builds_by_name_class_path_and_config() -> None:
    with pytest.raises(ValueError, match="unknown text encoder 'gpt9'; registered: bow, clip, label, llm"):
        build_encoder("gpt9")
    enc = build_encoder("emf_lightning.encoders.BagOfWordsEncoder", dim=8)
    assert isinstance(enc, BagOfWordsEncoder) and enc.dim == 8
    same = build_encoder_from_config(
        {"class_path": "emf_lightning.encoders.bow.BagOfWordsEncoder", "init_args": enc.init_args}
    )
    assert same.cache_key == enc.cache_key
    assert build_encoder_from_config({"name": "label", "num_classes": 3}).num_classes == 3
    with pytest.raises(ValueError, match="does not name a subclass of TextEncoder"):
        build_encoder("torch.nn.Linear")


def test_init_args_rebuild_an_equal_encoder(encoders) -> None:
    for name, enc in encoders.items():
        assert type(enc)(**enc.init_args).cache_key == enc.cache_key, name
    llm = LLMEncoder(pretrained=False, prompt_template=EMF_PROMPT_TEMPLATE, layer=1, max_length=32)
    assert llm.init_args["prompt_template"] == EMF_PROMPT_TEMPLATE and llm.init_args["layer"] == 1
    assert LLMEncoder(**llm.init_args).cache_key == llm.cache_key
    keys = {
        llm.cache_key,
        LLMEncoder(pretrained=False, layer=1, max_length=32).cache_key,
        LLMEncoder(pretrained=False, prompt_template=EMF_PROMPT_TEMPLATE, layer=0, max_length=32).cache_key,
        LLMEncoder(pretrained=False, prompt_template=EMF_PROMPT_TEMPLATE, layer=1, max_length=16).cache_key,
    }
    assert len(keys) == 4


def test_pack_tokens_moves_kept_positions_first() -> None:
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1) + 1
    hidden[0, 0] = float("nan")  # garbage in a padded slot must not leak
    keep = torch.tensor([[False, True, False, True], [True, True, True, False]])
    tokens, mask = pack_tokens(hidden, keep)
    assert tokens[..., 0].tolist() == [[2.0, 4.0, 0.0], [5.0, 6.0, 7.0]]
    assert mask.tolist() == [[True, True, False], [True, True, True]]
    with pytest.raises(ValueError, match="no tokens to keep"):
        pack_tokens(hidden, torch.zeros(2, 4, dtype=torch.bool))


def test_text_features_helpers() -> None:
    a = TextFeatures(torch.ones(1, 2, 3), torch.ones(1, 2, dtype=torch.bool), torch.ones(1, 3))
    b = TextFeatures(torch.full((2, 1, 3), 2.0), torch.ones(2, 1, dtype=torch.bool), torch.zeros(2, 3))
    cat = TextFeatures.cat([a, b]).validate()
    assert cat.tokens.shape == (3, 2, 3) and cat.lengths().tolist() == [2, 1, 1]
    assert cat.tokens[1, 1].abs().sum() == 0 and torch.equal(cat.row(1).tokens, b.tokens[:1])
    null = null_features(cat)
    assert null.tokens.shape == (3, 1, 3) and null.mask.all() and null.tokens.abs().sum() == 0
    bad = TextFeatures(torch.ones(1, 2, 3), torch.tensor([[True, False]]), torch.ones(1, 3))
    with pytest.raises(ValueError, match="exactly zero where mask is False"):
        bad.validate()


def test_clip_loads_a_local_open_clip_checkpoint(tmp_path, encoders) -> None:
    import json

    import open_clip

    from emf_lightning.encoders.clip import TINY_CLIP
    from emf_lightning.utils.model_helpers import random_init

    (tmp_path / "EMF-Test-Tiny-CLIP.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(tmp_path / "EMF-Test-Tiny-CLIP.json")
    checkpoint = tmp_path / "tiny.pt"
    torch.save(random_init(lambda: open_clip.model.CLIP(**TINY_CLIP), 0).state_dict(), checkpoint)
    assert CLIPTextEncoder.weights_available(model="EMF-Test-Tiny-CLIP", weights=str(checkpoint))
    loaded = CLIPTextEncoder(model="EMF-Test-Tiny-CLIP", weights=str(checkpoint))
    assert not hasattr(loaded, "visual") and loaded.dim == 32
    expected = encoders["clip"].encode(CAPTIONS)
    got = loaded.encode(CAPTIONS)
    torch.testing.assert_close(got.tokens, expected.tokens, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.pooled, expected.pooled, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="has no pretrained tag 'laion9b'"):
        CLIPTextEncoder(model="EMF-Test-Tiny-CLIP", weights="laion9b")


@pytest.mark.parametrize(
    "raw, want",
    [
        ("A LARGE RED CIRCLE!", "a large red circle"),
        ("red circle.", "red circle"),
        ("  a circle,   coloured red ", "a circle coloured red"),
        ("hey, can you make me a red box?", "hey can you make me a red box"),
        ("a three-sided shape (red)", "a three-sided shape red"),
        ("it's red -- really", "it's red really"),
        ("?!", "?!"),  # nothing left: the caption stays as it was (never the empty null caption)
    ],
)
def test_normalize_caption_hand_cases(raw, want):
    from emf_lightning.encoders import normalize_caption

    assert normalize_caption(raw) == want


def test_normalized_encoder_gives_the_wrapped_features_of_the_normalized_caption():
    from emf_lightning.encoders import NormalizedEncoder
    from emf_lightning.utils.specs import build, to_spec

    from helpers import HashWordEncoder

    inner = HashWordEncoder(width=8)  # case-blind, but "circle!!" and "circle" are different words to it
    wrapped = NormalizedEncoder(inner)
    a = wrapped.encode(["A RED Circle!!", "a blue square"])
    b = inner.encode(["a red circle", "a blue square"])
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.mask, b.mask) and wrapped.dim == 8
    assert wrapped.cache_key != inner.cache_key and inner.cache_key in wrapped.cache_key
    from emf_lightning.encoders import TextEncoder

    rebuilt = build(to_spec(wrapped), TextEncoder)
    assert isinstance(rebuilt.encoder, HashWordEncoder) and rebuilt.cache_key == wrapped.cache_key
    off = NormalizedEncoder(inner, lowercase=False, punctuation=False)
    assert not torch.equal(off.encode(["A RED Circle!!"]).tokens, a.tokens[:1])


def test_pooled_token_encoder_prepends_the_pooled_vector_as_a_token():
    from emf_lightning.encoders import PooledTokenEncoder

    from helpers import HashWordEncoder

    inner = HashWordEncoder(width=8)
    wrapped = PooledTokenEncoder(inner)
    captions = ["a red circle", "two big blue squares on black"]
    a, b = wrapped.encode(captions), inner.encode(captions)
    assert a.tokens.shape == (2, b.tokens.shape[1] + 1, 8) and a.mask[:, 0].all()
    torch.testing.assert_close(a.tokens[:, 0], b.pooled)
    torch.testing.assert_close(a.tokens[:, 1:], b.tokens)
    assert torch.equal(a.mask[:, 1:], b.mask) and torch.equal(a.pooled, b.pooled)
    assert inner.cache_key in wrapped.cache_key and wrapped.cache_key != inner.cache_key


@pytest.mark.parametrize("wrapper", ["NormalizedEncoder", "PooledTokenEncoder"])
def test_encoder_wrappers_answer_weights_available_for_the_encoder_they_wrap(wrapper):
    import emf_lightning.encoders as encoders

    from helpers import HashWordEncoder

    cls = getattr(encoders, wrapper)
    missing = {"class_path": "emf_lightning.encoders.T5Encoder", "init_args": {"model": "no-such-org/no-such-t5"}}
    random = {"class_path": "emf_lightning.encoders.T5Encoder", "init_args": {"pretrained": False}}
    assert not cls.weights_available(encoder=missing)  # a checkpoint's spec of an encoder whose weights are absent
    assert cls.weights_available(encoder=random) and cls.weights_available(encoder=HashWordEncoder(width=8))
