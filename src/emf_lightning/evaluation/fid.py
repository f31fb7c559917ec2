"""FID and KID of generated images against a fixed set of real images.

Feature extractors follow torchmetrics' contract: ``forward(uint8 [B, 3, H, W]) -> float [B, D]``. Any such
``nn.Module`` can be injected (a DINOv2 wrapper, a tiny random net in tests); the default is Inception-v3
(the TF 2015-12-05 graph used by every published FID), loaded from a file already on disk:

* clean-fid / StyleGAN2-ADA TorchScript ``inception-2015-12-05.pt``: images are resized to 299 with
  clean-fid's own resizer (PIL bicubic on float channels, the "clean" protocol of Parmar et al. 2022);
* torch-fidelity / torchmetrics state dict ``weights-inception-2015-12-05-6726825d.pth`` in the torch hub
  cache: wrapped in torchmetrics' ``NoTrainInceptionV3`` (needs the ``torch-fidelity`` package).

Nothing here downloads. When no file is found, :class:`MissingWeightsError` names every place looked at.

The statistics themselves are torchmetrics' ``FrechetInceptionDistance`` and ``KernelInceptionDistance``,
fed precomputed features through a pass-through extractor. That way each image goes through Inception
once (not once per metric), features can be sharded over ranks and gathered, and the real set's features
are cached on disk (:class:`ReferenceFeatureCache`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from emf_lightning.utils.optional import require
from emf_lightning.utils.weights import MissingWeightsError, emf_cache_dir

log = logging.getLogger(__name__)

CLEAN_FID_FILE = "inception-2015-12-05.pt"
CLEAN_FID_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/" + CLEAN_FID_FILE
TORCH_FIDELITY_FILE = "weights-inception-2015-12-05-6726825d.pth"
TORCH_FIDELITY_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + TORCH_FIDELITY_FILE
INCEPTION_MODEL_ID = "inception-v3 (TF 2015-12-05, FID)"
INCEPTION_SIZE = 299


def inception_search_paths(path: str | os.PathLike | None = None) -> list[Path]:
    """Files tried, in order, for the Inception weights.

    With ``path``: that file, or both known file names inside that folder. Without: our own cache,
    clean-fid's download folder (the system temp dir) and the torch hub checkpoint folder that
    torch-fidelity and torchmetrics download into.
    """
    if path is not None:
        p = Path(path).expanduser()
        return [p / CLEAN_FID_FILE, p / TORCH_FIDELITY_FILE] if p.is_dir() else [p]
    return [
        emf_cache_dir() / CLEAN_FID_FILE,
        Path(tempfile.gettempdir()) / CLEAN_FID_FILE,
        Path(torch.hub.get_dir()) / "checkpoints" / TORCH_FIDELITY_FILE,
        emf_cache_dir() / TORCH_FIDELITY_FILE,
    ]


class InceptionFeatures(nn.Module):
    """Inception-v3 pool3 features (2048-d) from uint8 images of any size.

    Build it with :func:`load_inception`. ``feature_id`` names weights and resize protocol, so cached
    reference features are never mixed across protocols.
    """

    num_features = 2048

    def __init__(self, net: nn.Module, protocol: str, feature_id: str):
        super().__init__()
        if protocol not in ("clean", "torchmetrics"):
            raise ValueError(f"unknown Inception protocol {protocol!r}")
        self.net = net
        self.protocol = protocol
        self.feature_id = feature_id
        self.net.eval()
        if protocol == "clean":
            resize = require("cleanfid.resize", extra="fid", purpose=f"FID with clean-fid's {CLEAN_FID_FILE}")
            # clean-fid's "clean" mode: resize each float channel with PIL bicubic, no re-quantisation.
            self._resize = resize.make_resizer("PIL", False, "bicubic", (INCEPTION_SIZE, INCEPTION_SIZE))

    def train(self, mode: bool = True) -> InceptionFeatures:
        """Stay in eval mode: FID features must not depend on batch statistics."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """uint8 ``[B, 3, H, W]`` -> float ``[B, 2048]``."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        if self.protocol == "torchmetrics":
            return self.net(images).reshape(images.shape[0], -1)
        hwc = images.permute(0, 2, 3, 1).cpu().numpy()
        resized = np.stack([self._resize(img) for img in hwc])  # float32 [B, 299, 299, 3] in [0, 255]
        x = torch.from_numpy(resized).permute(0, 3, 1, 2).to(images.device)
        # The TorchScript graph's `layers` expect the TF normalisation (x - 128) / 128.
        feats = self.net.layers((x - 128.0) / 128.0)
        return feats.reshape(images.shape[0], -1).float()


class MissingInceptionError(MissingWeightsError):
    """No Inception FID weights on disk. Its message gives the download URLs (Inception is not on the
    Hugging Face hub, so the base class's ``huggingface-cli`` hint would mislead)."""

    def __init__(self, looked_in: list[str]):
        super().__init__(INCEPTION_MODEL_ID, looked_in)
        message = (
            f"Inception-v3 FID weights ({CLEAN_FID_FILE} or {TORCH_FIDELITY_FILE}) were not found (offline). "
            f"Looked in: {', '.join(looked_in)}. Download {CLEAN_FID_URL} (clean-fid / StyleGAN2-ADA) or "
            f"{TORCH_FIDELITY_URL} (torch-fidelity / torchmetrics) on a machine with internet access, put it in "
            "one of those places, or set `inception_path`."
        )
        self.args = (message,)

    def __str__(self) -> str:
        return self.args[0]


def load_inception(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> InceptionFeatures:
    """Load Inception-v3 FID weights from disk (see :func:`inception_search_paths`); never downloads.

    Raises:
        MissingWeightsError: no candidate file exists.
        ImportError: only the torch-fidelity file exists but the ``torch-fidelity`` package is missing.
    """
    candidates = inception_search_paths(path)
    for file in candidates:
        if not file.is_file():
            continue
        if file.name == TORCH_FIDELITY_FILE or file.suffix == ".pth":
            try:
                from torchmetrics.image.fid import NoTrainInceptionV3

                net = NoTrainInceptionV3(
                    name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(file)
                )
            except ModuleNotFoundError as err:
                raise ImportError(
                    f"Found {file}, the torch-fidelity Inception state dict, but loading it needs the "
                    "`torch-fidelity` package (pip install torch-fidelity), or use clean-fid's "
                    f"{CLEAN_FID_FILE} instead."
                ) from err
            return InceptionFeatures(net, "torchmetrics", "inception-2015-12-05/torch-fidelity/bilinear-aa").to(device)
        net = torch.jit.load(str(file), map_location="cpu")
        if not hasattr(net, "layers"):
            raise ValueError(f"{file} is not clean-fid's Inception TorchScript (it has no `layers` submodule)")
        return InceptionFeatures(net, "clean", "inception-2015-12-05/clean-fid/pil-bicubic").to(device)
    raise MissingInceptionError([str(c) for c in candidates])


@torch.no_grad()
def extract_features(
    extractor: nn.Module,
    images: np.ndarray | Tensor,
    batch_size: int = 64,
    device: str | torch.device | None = None,
) -> Tensor:
    """Run ``extractor`` over uint8 images ``[N, H, W, 3]`` (array or tensor) in batches -> float64 ``[N, D]`` on CPU."""
    arr = torch.as_tensor(np.asarray(images)) if not isinstance(images, Tensor) else images
    if arr.dtype != torch.uint8 or arr.dim() != 4 or arr.shape[-1] != 3:
        raise ValueError(f"expected uint8 images [N, H, W, 3], got {arr.dtype} {tuple(arr.shape)}")
    if device is None:
        device = next((p.device for p in extractor.parameters()), torch.device("cpu"))
    out = []
    for start in range(0, arr.shape[0], batch_size):
        chunk = arr[start : start + batch_size].permute(0, 3, 1, 2).contiguous().to(device)
        out.append(extractor(chunk).reshape(chunk.shape[0], -1).double().cpu())
    if not out:
        raise ValueError("no images to extract features from")
    return torch.cat(out)


class _Precomputed(nn.Module):
    """Pass-through "extractor" so torchmetrics accumulates features we computed ourselves."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:
        return x


def _check_pair(real: Tensor, fake: Tensor, minimum: int) -> None:
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features must be [N, D] with equal D, got {tuple(real.shape)} and {tuple(fake.shape)}")
    if real.shape[0] < minimum or fake.shape[0] < minimum:
        raise ValueError(f"need at least {minimum} real and fake samples, got {real.shape[0]} and {fake.shape[0]}")


def frechet_distance(real: Tensor, fake: Tensor) -> float:
    """FID between two feature sets ``[N, D]`` (torchmetrics' Frechet distance, float64, unbiased covariance)."""
    _check_pair(real, fake, 2)
    # sync_on_compute=False: callers gather features across ranks themselves; a second sync would double count.
    metric = FrechetInceptionDistance(feature=_Precomputed(real.shape[1]), sync_on_compute=False)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return float(metric.compute())


def kernel_inception_distance(
    real: Tensor, fake: Tensor, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID (mean, std over random subsets) with the cubic polynomial kernel, via torchmetrics.

    ``subset_size`` is clipped to the smaller set, as clean-fid does. ``seed`` fixes the subsets.
    """
    _check_pair(real, fake, 2)
    size = min(subset_size, real.shape[0], fake.shape[0])
    with warnings.catch_warnings():
        # torchmetrics warns that KID buffers all features; we hand it features we already hold.
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(
            feature=_Precomputed(real.shape[1]), subsets=subsets, subset_size=size, sync_on_compute=False
        )
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    # torchmetrics draws subsets from the global RNG: fork it so results are seeded and nothing else shifts.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


class ReferenceFeatureCache:
    """Real-image features on disk, keyed by dataset, sample keys, resolution and feature extractor.

    Layout: ``root/<key>.npz`` with ``features`` (float64 [N, D]) and ``meta`` (JSON of the key fields).
    """

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else emf_cache_dir() / "fid_refs"

    @staticmethod
    def key(dataset: Sequence[str] | str, sample_keys: Sequence[str], resolution: int, feature_id: str) -> str:
        """Stable hash of what determines the reference features."""
        fields = ReferenceFeatureCache._fields(dataset, sample_keys, resolution, feature_id)
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]

    @staticmethod
    def _fields(dataset, sample_keys, resolution, feature_id) -> dict:
        dataset = [dataset] if isinstance(dataset, str) else list(dataset)
        keys_hash = hashlib.sha256("\n".join(sample_keys).encode()).hexdigest()
        return {
            "dataset": dataset,
            "n": len(sample_keys),
            "sample_keys_sha256": keys_hash,
            "resolution": int(resolution),
            "feature_id": feature_id,
        }

    def path(self, key: str) -> Path:
        """File holding the features for ``key``."""
        return self.root / f"{key}.npz"

    def load(self, key: str) -> Tensor | None:
        """Cached features, or ``None`` when absent or unreadable (a corrupt file is logged and ignored)."""
        file = self.path(key)
        if not file.is_file():
            return None
        try:
            with np.load(file) as data:
                return torch.from_numpy(data["features"].astype(np.float64))
        except (OSError, ValueError, KeyError) as err:
            log.warning("ignoring unreadable FID reference cache %s: %s", file, err)
            return None

    def save(self, key: str, features: Tensor, meta: dict | None = None) -> Path:
        """Write features atomically (temp file + rename), so concurrent readers never see half a file."""
        self.root.mkdir(parents=True, exist_ok=True)
        file = self.path(key)
        fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".npz.tmp")
        os.close(fd)
        with open(tmp, "wb") as fh:
            np.savez(fh, features=features.double().cpu().numpy(), meta=json.dumps(meta or {}))
        os.replace(tmp, file)
        return file

    def get_or_compute(
        self,
        dataset: Sequence[str] | str,
        sample_keys: Sequence[str],
        resolution: int,
        feature_id: str,
        compute,
        write: bool = True,
    ) -> Tensor:
        """Load the features for this key, or call ``compute()`` and store its result (unless ``write`` is
        False: with several processes all compute, which may be a collective, and one writes)."""
        key = self.key(dataset, sample_keys, resolution, feature_id)
        cached = self.load(key)
        if cached is not None and cached.shape[0] == len(sample_keys):
            return cached
        features = compute()
        if write:
            self.save(key, features, self._fields(dataset, sample_keys, resolution, feature_id))
        return features
