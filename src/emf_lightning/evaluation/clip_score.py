"""CLIP score: how well generated images match their prompts, by a frozen CLIP model.

Definition (Hessel et al. 2021 with torchmetrics' scale 100): per image-caption pair
``100 * max(cos(E_image, E_text), 0)``, averaged over pairs. Note that torchmetrics' ``CLIPScore.compute``
clips the *mean* instead of each pair; we clip each pair, as its docstring and the paper define it.

Models: open_clip (built-in architecture name + pretrained tag or checkpoint file) or a Hugging Face
``CLIPModel`` (repo id or local folder). Weights come only from disk: open_clip's download cache, the
Hugging Face cache, or a path. Nothing here downloads; absent weights raise :class:`MissingWeightsError`.
Any object with ``encode_image`` / ``encode_text`` can be wrapped by :class:`CLIPScorer` directly.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from emf_lightning.utils.weights import MissingWeightsError, hf_cache_dir

log = logging.getLogger(__name__)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_scores_from_features(image_features: Tensor, text_features: Tensor) -> Tensor:
    """Per-pair CLIP score ``100 * max(cos, 0)`` for row-aligned ``[B, D]`` features -> ``[B]``."""
    if image_features.shape != text_features.shape or image_features.dim() != 2:
        raise ValueError(
            f"expected two [B, D] feature tensors of equal shape, got {tuple(image_features.shape)} "
            f"and {tuple(text_features.shape)}"
        )
    cos = F.cosine_similarity(image_features.double(), text_features.double(), dim=-1)
    return 100.0 * cos.clamp(min=0.0)


def clip_score_from_features(image_features: Tensor, text_features: Tensor) -> float:
    """Mean of :func:`clip_scores_from_features`."""
    return float(clip_scores_from_features(image_features, text_features).mean())


class CLIPScorer(nn.Module):
    """Frozen CLIP model plus its preprocessing; scores images in [-1, 1] against captions.

    Args:
        model: has ``encode_image(pixels [B, 3, S, S]) -> [B, D]`` and ``encode_text(tokens) -> [B, D]``.
        tokenize: maps a list of captions to whatever ``encode_text`` takes (moved to the model's device).
        image_size: CLIP input resolution ``S``.
        mean, std: per-channel normalisation of [0, 1] pixels.
        model_id: names the model in logs and results.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenize: Callable[[list[str]], Tensor | dict],
        image_size: int,
        mean: Sequence[float] = OPENAI_MEAN,
        std: Sequence[float] = OPENAI_STD,
        model_id: str = "clip",
    ):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenize = tokenize
        self.image_size = int(image_size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.model_id = model_id

    def train(self, mode: bool = True) -> CLIPScorer:
        """Always eval: a metric network must not change with the trainer's mode."""
        return super().train(False)

    def preprocess(self, images: Tensor) -> Tensor:
        """[-1, 1] ``[B, 3, H, W]`` -> normalised ``[B, 3, S, S]``: resize the short side to S (bicubic,
        antialiased, like open_clip's ``Resize``), centre-crop, normalise."""
        if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"expected float images [B, 3, H, W] in [-1, 1], got {images.dtype} {tuple(images.shape)}")
        x = (images.float().clamp(-1, 1) + 1) / 2
        h, w = x.shape[-2:]
        scale = self.image_size / min(h, w)
        new_h, new_w = max(self.image_size, round(h * scale)), max(self.image_size, round(w * scale))
        if (new_h, new_w) != (h, w):
            x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
        top, left = (new_h - self.image_size) // 2, (new_w - self.image_size) // 2
        x = x[..., top : top + self.image_size, left : left + self.image_size].clamp(0, 1)
        return (x - self.mean) / self.std

    @property
    def device(self) -> torch.device:
        """Device of the wrapped model."""
        return self.mean.device

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """[-1, 1] images -> image embeddings ``[B, D]``."""
        return self.model.encode_image(self.preprocess(images.to(self.device))).float()

    @torch.no_grad()
    def encode_texts(self, captions: Sequence[str]) -> Tensor:
        """Captions -> text embeddings ``[B, D]``."""
        tokens = self.tokenize(list(captions))
        if isinstance(tokens, dict):
            tokens = {k: v.to(self.device) for k, v in tokens.items()}
        else:
            tokens = tokens.to(self.device)
        return self.model.encode_text(tokens).float()

    def scores(self, images: Tensor, captions: Sequence[str]) -> Tensor:
        """Per-pair CLIP scores ``[B]`` (float64, on CPU)."""
        if len(captions) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(captions)} captions")
        return clip_scores_from_features(self.encode_images(images), self.encode_texts(captions)).cpu()

    def score(self, images: Tensor, captions: Sequence[str]) -> float:
        """Mean CLIP score over the pairs."""
        return float(self.scores(images, captions).mean())


# ---------------------------------------------------------------- open_clip


def open_clip_weight_candidates(
    model_name: str, tag: str, cache_dir: str | None = None
) -> list[tuple[str, Path | None]]:
    """(description, cached file or None) for each place open_clip would fetch ``model_name``/``tag`` from."""
    import open_clip
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    if not cfg:
        known = open_clip.list_pretrained_tags_by_model(model_name)
        raise ValueError(f"unknown open_clip pretrained tag {tag!r} for {model_name!r}; known tags: {known}")
    out: list[tuple[str, Path | None]] = []
    if cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        # open_clip's convention: "org/repo/" -> default file names, "org/repo/file" -> that file.
        repo_id, filename = os.path.split(cfg["hf_hub"])
        names = [filename] if filename else [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
        if filename.endswith((".bin", ".pth")):
            names.insert(0, filename[:-4] + ".safetensors")
        for name in names:
            hit = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
            where = f"HF cache {cache_dir or hf_cache_dir()} ({repo_id}/{name})"
            out.append((where, Path(hit) if isinstance(hit, str) else None))
    if cfg.get("url"):
        folder = Path(cache_dir or os.path.expanduser("~/.cache/clip"))
        file = folder / os.path.basename(cfg["url"])
        out.append((str(file), file if file.is_file() else None))
    return out


def load_open_clip_scorer(
    model_name: str = "ViT-B-32",
    pretrained: str = "openai",
    device: str | torch.device = "cpu",
    cache_dir: str | None = None,
) -> CLIPScorer:
    """An open_clip model with real weights from a checkpoint file or an already-downloaded tag."""
    import open_clip

    if not pretrained:
        raise ValueError("CLIP score needs pretrained CLIP weights; got pretrained=None (a random CLIP scores nothing)")
    tag_cfg: dict = {}
    if os.path.isfile(pretrained):
        checkpoint = Path(pretrained)
    else:
        candidates = open_clip_weight_candidates(model_name, pretrained, cache_dir)
        tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
        found = [file for _, file in candidates if file is not None]
        if not found:
            # Name the hub repo when there is one, so the error's download hint is a working command.
            hub = tag_cfg.get("hf_hub", "").rstrip("/")
            raise MissingWeightsError(
                hub if hub.count("/") == 1 else f"open_clip {model_name}/{pretrained}",
                [where for where, _ in candidates],
                hint=f"(open_clip model {model_name}, pretrained tag {pretrained!r}.) Or point `clip_pretrained` "
                "at a checkpoint file.",
            )
        checkpoint = found[0]
    force_pre = {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg}
    model = open_clip.create_model(
        model_name,
        pretrained=str(checkpoint),
        device=device,
        force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)),
        force_preprocess_cfg=force_pre or None,
        pretrained_text=False,  # never fetch separate tower weights: the checkpoint holds the whole model
    )
    pre = open_clip.get_model_preprocess_cfg(model)
    size = pre.get("size", model.visual.image_size)
    size = size[0] if isinstance(size, (tuple, list)) else size
    tokenizer = open_clip.get_tokenizer(model_name)
    return CLIPScorer(
        model,
        tokenizer,
        int(size),
        pre.get("mean", OPENAI_MEAN),
        pre.get("std", OPENAI_STD),
        model_id=f"open_clip:{model_name}/{pretrained if not os.path.isfile(pretrained) else checkpoint.name}",
    ).to(device)


# ---------------------------------------------------------------- transformers


class _HFCLIPAdapter(nn.Module):
    """Gives a transformers ``CLIPModel`` the open_clip ``encode_image`` / ``encode_text`` interface."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.clip = model

    @staticmethod
    def _tensor(out) -> Tensor:
        # transformers 5 may return a model output instead of a bare tensor.
        if isinstance(out, Tensor):
            return out
        return out.pooler_output if getattr(out, "pooler_output", None) is not None else out[0]

    def encode_image(self, pixels: Tensor) -> Tensor:
        return self._tensor(self.clip.get_image_features(pixel_values=pixels))

    def encode_text(self, tokens: dict) -> Tensor:
        return self._tensor(self.clip.get_text_features(**tokens))


def load_hf_clip_scorer(model_id_or_path: str, device: str | torch.device = "cpu") -> CLIPScorer:
    """A transformers ``CLIPModel`` (repo id from the HF cache, or a local folder); never downloads."""
    from transformers import AutoTokenizer, CLIPModel

    try:
        model = CLIPModel.from_pretrained(model_id_or_path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(model_id_or_path, local_files_only=True)
    except OSError as err:
        raise MissingWeightsError(model_id_or_path, [model_id_or_path, str(hf_cache_dir())]) from err
    mean, std = OPENAI_MEAN, OPENAI_STD
    try:
        from transformers import AutoImageProcessor

        proc = AutoImageProcessor.from_pretrained(model_id_or_path, local_files_only=True)
        mean, std = tuple(proc.image_mean), tuple(proc.image_std)
    except (OSError, ValueError, AttributeError):
        log.info("no image processor config for %s; using the OpenAI CLIP normalisation", model_id_or_path)
    max_len = model.config.text_config.max_position_embeddings

    def tokenize(captions: list[str]) -> dict:
        enc = tokenizer(captions, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    return CLIPScorer(
        _HFCLIPAdapter(model),
        tokenize,
        model.config.vision_config.image_size,
        mean,
        std,
        model_id=f"hf:{model_id_or_path}",
    ).to(device)


def load_clip_scorer(
    model: str = "ViT-B-32", pretrained: str | None = "openai", device: str | torch.device = "cpu"
) -> CLIPScorer:
    """Dispatch: ``hf:<repo or folder>`` or an ``org/name`` repo id -> transformers; else an open_clip name."""
    if model.startswith("hf:"):
        return load_hf_clip_scorer(model[3:], device)
    if "/" in model or Path(model).is_dir():
        return load_hf_clip_scorer(model, device)
    return load_open_clip_scorer(model, pretrained or "", device)
