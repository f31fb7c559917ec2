"""CLIP score: the formula on constructed features, preprocessing, real open_clip loading from a file."""

from __future__ import annotations

import json
import math

import open_clip
import pytest
import torch
from torch import nn

from emf_lightning.evaluation.clip_score import (
    OPENAI_MEAN,
    OPENAI_STD,
    CLIPScorer,
    clip_score_from_features,
    clip_scores_from_features,
    load_clip_scorer,
    load_open_clip_scorer,
)
from emf_lightning.utils.weights import MissingWeightsError


def _pair_with_cosine(c: float, img_norm: float, txt_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    theta = math.acos(c)
    img = torch.tensor([img_norm, 0.0, 0.0])
    txt = torch.tensor([txt_norm * math.cos(theta), 0.0, txt_norm * math.sin(theta)])
    return img, txt


def test_known_cosines_give_known_scores_and_negatives_clip_to_zero():
    cosines = [0.5, 1.0, -0.3, 0.0, 0.25]
    pairs = [_pair_with_cosine(c, 1.0 + i, 3.0 - 0.5 * i) for i, c in enumerate(cosines)]
    img = torch.stack([p[0] for p in pairs])
    txt = torch.stack([p[1] for p in pairs])
    scores = clip_scores_from_features(img, txt)
    torch.testing.assert_close(scores, torch.tensor([50.0, 100.0, 0.0, 0.0, 25.0], dtype=torch.float64))
    # Per-pair clipping: the mean is 35, not (50 + 100 - 30 + 0 + 25) / 5 = 29 as clipping the mean would give.
    assert clip_score_from_features(img, txt) == pytest.approx(35.0)


def test_feature_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match=r"equal shape, got \(2, 3\) and \(3, 3\)"):
        clip_scores_from_features(torch.zeros(2, 3), torch.zeros(3, 3))


class _MeanColourCLIP(nn.Module):
    """encode_image = mean pixel per channel; encode_text = a fixed vector per token id (stand-in model)."""

    def encode_image(self, pixels):
        return pixels.mean(dim=(2, 3))

    def encode_text(self, tokens):
        return torch.stack(
            [torch.tensor([1.0, 0.0, 0.0]) if t[0] == 1 else torch.tensor([0.0, 1.0, 0.0]) for t in tokens]
        )


def _tok(captions):
    return torch.tensor([[1] if "red" in c else [2] for c in captions])


def test_preprocess_resizes_crops_and_normalises():
    scorer = CLIPScorer(_MeanColourCLIP(), _tok, image_size=16)
    images = torch.zeros(2, 3, 8, 12)  # 0 in [-1, 1] is 0.5 in [0, 1]
    x = scorer.preprocess(images)
    assert x.shape == (2, 3, 16, 16)  # short side 8 -> 16, long side 12 -> 24, centre crop 16
    expected = (0.5 - torch.tensor(OPENAI_MEAN)) / torch.tensor(OPENAI_STD)
    torch.testing.assert_close(x[0, :, 5, 7], expected)
    with pytest.raises(ValueError, match="expected float images"):
        scorer.preprocess(torch.zeros(2, 8, 8, 3))


def test_scorer_pairs_images_with_captions():
    # Unit-std normalisation around 0 makes encode_image return the raw [0, 1] mean colour.
    scorer = CLIPScorer(_MeanColourCLIP(), _tok, image_size=4, mean=(0, 0, 0), std=(1, 1, 1))
    red = torch.full((1, 3, 4, 4), -1.0)
    red[:, 0] = 1.0  # pure red: mean colour (1, 0, 0)
    images = torch.cat([red, red])
    scores = scorer.scores(images, ["a red square", "a green square"])
    torch.testing.assert_close(scores, torch.tensor([100.0, 0.0], dtype=torch.float64))
    assert scorer.score(images, ["a red square", "a red square"]) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        scorer.scores(images, ["a red square"])


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory):
    """Register a tiny open_clip architecture and save randomly initialised weights as a checkpoint file."""
    folder = tmp_path_factory.mktemp("openclip")
    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (folder / "emf-tiny-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder / "emf-tiny-clip.json")
    torch.manual_seed(0)
    model = open_clip.create_model("emf-tiny-clip", pretrained=None, pretrained_text=False)
    ckpt = folder / "tiny.pt"
    torch.save(model.state_dict(), ckpt)
    return model.eval(), ckpt


def test_open_clip_checkpoint_file_loads_the_same_weights(tiny_open_clip):
    reference, ckpt = tiny_open_clip
    scorer = load_clip_scorer("emf-tiny-clip", pretrained=str(ckpt))
    assert scorer.image_size == 32 and scorer.model_id == "open_clip:emf-tiny-clip/tiny.pt"
    captions = ["a red circle", "two blue squares above a green triangle"]
    tokens = open_clip.get_tokenizer("emf-tiny-clip")(captions)
    with torch.no_grad():
        torch.testing.assert_close(scorer.encode_texts(captions), reference.encode_text(tokens))
        images = torch.rand(2, 3, 32, 32) * 2 - 1
        ref_img = reference.encode_image(((images + 1) / 2 - scorer.mean) / scorer.std)
    torch.testing.assert_close(scorer.encode_images(images), ref_img)
    expected = 100 * torch.nn.functional.cosine_similarity(ref_img, reference.encode_text(tokens)).clamp(min=0)
    torch.testing.assert_close(scorer.scores(images, captions), expected.double(), rtol=1e-5, atol=1e-4)


def test_missing_open_clip_weights_name_every_place(tmp_path):
    with pytest.raises(MissingWeightsError) as info:
        load_open_clip_scorer("ViT-B-32", "openai", cache_dir=str(tmp_path))
    msg = str(info.value)
    assert info.value.model == "timm/vit_base_patch32_clip_224.openai"
    assert str(tmp_path / "ViT-B-32.pt") in msg
    assert "open_clip_model.safetensors" in msg and "open_clip_pytorch_model.bin" in msg
    assert "clip_pretrained" in msg


def test_bad_open_clip_requests_are_clear_errors():
    with pytest.raises(ValueError, match="unknown open_clip pretrained tag 'nonsense' for 'ViT-B-32'"):
        load_open_clip_scorer("ViT-B-32", "nonsense")
    with pytest.raises(ValueError, match="needs pretrained CLIP weights"):
        load_clip_scorer("ViT-B-32", pretrained=None)


def test_missing_hf_clip_is_a_missing_weights_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(MissingWeightsError, match="openai/clip-vit-base-patch32"):
        load_clip_scorer("openai/clip-vit-base-patch32")


def test_transformers_clip_folder_loads_and_encodes_like_the_model(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "a": 2, "red": 3, "circle": 4, "blue": 5, "square": 6}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
    small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2)
    cfg = CLIPConfig(
        text_config=dict(
            small, vocab_size=7, max_position_embeddings=16, pad_token_id=0, bos_token_id=0, eos_token_id=0
        ),
        vision_config=dict(small, image_size=16, patch_size=8),
        projection_dim=8,
    )
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    scorer = load_clip_scorer(f"hf:{tmp_path}")
    assert scorer.image_size == 16 and scorer.model_id == f"hf:{tmp_path}"
    captions = ["a red circle", "a blue square"]
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        pixels = ((images + 1) / 2 - torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_STD).view(
            1, 3, 1, 1
        )
        ref_img = model.get_image_features(pixel_values=pixels).pooler_output
        enc = tokenizer(captions, padding=True, return_tensors="pt")
        ref_txt = model.get_text_features(
            input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]
        ).pooler_output
    torch.testing.assert_close(scorer.encode_images(images), ref_img)
    torch.testing.assert_close(scorer.encode_texts(captions), ref_txt)
    expected = 100 * torch.nn.functional.cosine_similarity(ref_img, ref_txt).clamp(min=0)
    torch.testing.assert_close(scorer.scores(images, captions), expected.double(), rtol=1e-5, atol=1e-4)
