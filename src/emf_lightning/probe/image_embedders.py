"""Image feature extractors that tell the probe how alike two images are (relevance on image-caption shards).

On shards without scene specs (COCO-like data) the probe scores a retrieved caption by how similar its
image is to the query's image. The extractor is pluggable:

- ``dinov2``: DINOv2 ViT-S/14 through timm (``timm/vit_small_patch14_dinov2.lvd142m``), CLS features;
- ``clip``: CLIP ViT-B/32 image tower through open_clip (``timm/vit_base_patch32_clip_224.openai``);
- ``pixels``: 16x16 downsampled raw pixels, centred per image. No weights, a crude stand-in that the user
  must ask for by name (it measures colour layout, not content).

Weights come from the Hugging Face cache or a local file; when absent, ``MissingWeightsError`` names the
model id and where it was looked for. Nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from emf_lightning.utils.images import from_uint8
from emf_lightning.utils.weights import MissingWeightsError, hf_cache_dir

ImageEmbedder = Callable[[np.ndarray], Tensor]
"""uint8 images [B, H, W, 3] -> float features [B, D]."""

DINOV2_ID = "timm/vit_small_patch14_dinov2.lvd142m"
CLIP_ID = "timm/vit_base_patch32_clip_224.openai"
IMAGE_EMBEDDERS = ("dinov2", "clip", "pixels")


def _hf_snapshot(model_id: str) -> Path | None:
    """Path of a cached Hugging Face snapshot of ``model_id``, or None (no network involved)."""
    root = hf_cache_dir() / ("models--" + model_id.replace("/", "--")) / "snapshots"
    if not root.is_dir():
        return None
    snaps = sorted(p for p in root.iterdir() if p.is_dir() and any(p.iterdir()))
    return snaps[-1] if snaps else None


def _weights_file(model_id: str, weights: str | None) -> str:
    """A local weights file: ``weights`` if given, else the cached snapshot's safetensors/bin file."""
    looked = []
    if weights is not None:
        if Path(weights).is_file():
            return weights
        looked.append(weights)
    snap = _hf_snapshot(model_id)
    looked.append(str(hf_cache_dir() / ("models--" + model_id.replace("/", "--"))))
    if snap is not None:
        for name in (
            "open_clip_model.safetensors",
            "model.safetensors",
            "open_clip_pytorch_model.bin",
            "pytorch_model.bin",
        ):
            if (snap / name).is_file():
                return str(snap / name)
    raise MissingWeightsError(
        model_id, looked, hint="Or run the probe on shards with scene specs, or pass --image-encoder pixels."
    )


@torch.no_grad()
def _pixel_features(images: np.ndarray) -> Tensor:
    x = from_uint8(images)
    x = F.interpolate(x, size=(16, 16), mode="area").flatten(1)
    return x - x.mean(dim=1, keepdim=True)


class _TorchImageEmbedder:
    """Resize, normalise and run a frozen vision model in batches."""

    def __init__(
        self,
        model: torch.nn.Module,
        size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        forward: Callable[[Tensor], Tensor],
        batch_size: int = 32,
    ):
        self.model = model.eval().requires_grad_(False)
        self.size, self.forward, self.batch_size = size, forward, batch_size
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> Tensor:
        out = []
        for start in range(0, len(images), self.batch_size):
            x = (from_uint8(images[start : start + self.batch_size]) + 1) / 2
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False).clamp(0, 1)
            out.append(self.forward((x - self.mean) / self.std).float())
        return torch.cat(out)


def build_image_embedder(name: str, weights: str | None = None, pretrained: bool = True) -> ImageEmbedder:
    """Build an image feature extractor by name (``dinov2``, ``clip`` or ``pixels``).

    Args:
        name: one of ``IMAGE_EMBEDDERS``.
        weights: optional local weights file (otherwise the Hugging Face cache is searched).
        pretrained: False builds the architecture with random weights; only for tests of the code path.
    """
    if name == "pixels":
        return _pixel_features
    if name == "dinov2":
        import timm

        kwargs = {"pretrained": False}
        if pretrained:
            kwargs = {"pretrained": True, "pretrained_cfg_overlay": {"file": _weights_file(DINOV2_ID, weights)}}
        # 224 px input (16 x 16 patches) instead of 518: probe images are small and CPU time is scarce.
        model = timm.create_model("vit_small_patch14_dinov2.lvd142m", num_classes=0, img_size=224, **kwargs)
        cfg = model.pretrained_cfg
        return _TorchImageEmbedder(model, 224, cfg["mean"], cfg["std"], model)
    if name == "clip":
        import open_clip

        model = open_clip.create_model("ViT-B-32", pretrained=_weights_file(CLIP_ID, weights) if pretrained else None)
        return _TorchImageEmbedder(
            model, 224, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD, model.encode_image
        )
    raise ValueError(f"unknown image encoder {name!r}; choose one of {', '.join(IMAGE_EMBEDDERS)}")
