"""T5-family encoder states as text features (T5, Flan-T5, T5-v1.1) via transformers `T5EncoderModel`."""

from __future__ import annotations

from typing import Any

import torch

from emf_lightning.encoders.hf_base import HFTextEncoder, PaddingSide, Pooling
from emf_lightning.encoders.tiny import tiny_tokenizer
from emf_lightning.utils import hub

TINY_T5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8)


class T5Encoder(HFTextEncoder):
    """The encoder stack of a T5 model; tokens = final (layer-normed) encoder states, pooled = mean.

    T5 uses relative position biases, so no position ids are needed for left padding: distances between
    real tokens do not change and padded keys are masked.

    Args:
        model: Hugging Face id in the local cache or a local folder. Default google/flan-t5-base
            (d=768); google/t5-v1_1-xxl is the Imagen/SD3 choice (d=4096).
        layer: -1 = final encoder output; k = hidden_states[k] (0 = embeddings); a list = the mean of those.
        pretrained: False builds a tiny random T5 encoder (tests only; logs a warning).
        random_config: overrides of the tiny T5Config.
    """

    name = "t5"
    default_model = "google/flan-t5-base"
    absolute_positions = False

    def __init__(
        self,
        model: str | None = None,
        layer: int | list[int] = -1,
        pooling: Pooling = "mean",
        padding_side: PaddingSide = "right",
        max_length: int = 256,
        batch_size: int = 64,
        pretrained: bool = True,
        random_config: dict[str, Any] | None = None,
        seed: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
    ):
        super().__init__(
            layer=layer,
            padding_side=padding_side,
            pooling=pooling,
            batch_size=batch_size,
            max_length=max_length,
            device=device,
            dtype=dtype,
        )
        from transformers import T5Config, T5EncoderModel

        model = model or self.default_model
        config: dict[str, Any] = {}
        if pretrained:
            self._load_pretrained(hub.locate(model)[0], T5EncoderModel)
        else:
            config = self._build_random(
                "tiny T5",
                "t5",
                T5Config,
                T5EncoderModel,
                TINY_T5,
                random_config,
                seed,
                decoder_start_token_id=tiny_tokenizer("t5").pad_token_id,
            )
        self._setup(model if pretrained else "tiny-t5", pretrained, config)

    @classmethod
    def weights_available(cls, model: str | None = None, pretrained: bool = True, **_: Any) -> bool:
        return True if not pretrained else hub.weights_available(model or cls.default_model)
