"""Shared machinery for encoders built on a transformers model plus a fast tokenizer (llm, t5, minilm).

One code path loads the tokenizer and model (from a local folder, or a tiny random stand-in for tests), handles
tokenisation with truncation counting, right or left padding, position ids for absolute-position models, the
choice of layer, keeping only a caption span inside a prompt template, and re-packing the output so `mask` marks
exactly the kept tokens and everything else is zero.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from emf_lightning.encoders.base import TextEncoder, TextFeatures, pack_tokens
from emf_lightning.encoders.tiny import tiny_tokenizer
from emf_lightning.utils import hub
from emf_lightning.utils.model_helpers import masked_mean, random_init, short_hash

PaddingSide = Literal["right", "left"]
Pooling = Literal["mean", "last"]


class HFTextEncoder(TextEncoder):
    """Base for transformers encoders. Subclasses load `self.tokenizer` / `self.model` (with `_load_pretrained` or
    `_build_random`) and call `_setup`.

    Class attributes:
      absolute_positions: pass explicit position ids (cumsum of the attention mask) so left padding does
        not shift positions; False for models with relative positions (T5), which ignore them.
      causal: a decoder-only LM (disables the KV cache during the forward).
    """

    absolute_positions: bool = True
    causal: bool = False

    def __init__(
        self,
        *,
        layer: int | Sequence[int] = -1,
        padding_side: PaddingSide = "right",
        pooling: Pooling = "mean",
        batch_size: int = 64,
        max_length: int | None = 256,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
    ):
        super().__init__(batch_size=batch_size, max_length=max_length, device=device, dtype=dtype)
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if pooling not in ("mean", "last"):
            raise ValueError(f"pooling must be 'mean' or 'last', got {pooling!r}")
        # A list of layers gives the mean of their hidden states (hidden states of neighbouring layers share a
        # basis through the residual stream, so their mean is meaningful); it is kept a list for the init_args.
        self.layer = [int(k) for k in layer] if isinstance(layer, (list, tuple)) else int(layer)
        if isinstance(self.layer, list) and not self.layer:
            raise ValueError("layer: give at least one layer")
        self.padding_side = padding_side
        self.pooling = pooling
        # Text around each caption (prompt template / chat template); empty for plain encoders.
        self._prefix = ""
        self._suffix = ""
        self._add_special_tokens = True
        self._caption_span_only = False
        self._model_id = ""
        self._model_key_extra: list[str] = []

    def _load_pretrained(self, source: str, model_class: Any) -> None:
        """The tokenizer and the `model_class` weights from a local folder, the model in the compute dtype."""
        from transformers import AutoTokenizer

        self.tokenizer = hub.load(AutoTokenizer.from_pretrained, source)
        self.model = hub.load(model_class.from_pretrained, source, dtype=self.compute_dtype)

    def _build_random(
        self,
        what: str,
        tokenizer_style: str,
        config_class: Any,
        build: Callable[[Any], Any],
        sizes: dict[str, Any],
        random_config: dict[str, Any] | None,
        seed: int,
        **config_extra: Any,
    ) -> dict[str, Any]:
        """A tiny random model on a tiny tokenizer (`pretrained=False`, tests only; logs a warning).

        `sizes` (overridden by `random_config`) and `config_extra` go to `config_class`, `build(config)` makes the
        model. Returns the sizes and seed, which the cache key records.
        """
        self.tokenizer = tiny_tokenizer(tokenizer_style)
        config = {**sizes, **(random_config or {}), "seed": seed}
        cfg = config_class(
            vocab_size=len(self.tokenizer),
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,  # None for BERT, as its config's default
            **config_extra,
            **{k: v for k, v in config.items() if k != "seed"},
        )
        hub.warn_random(self.name, what)
        self.model = random_init(lambda: build(cfg), seed)
        return config

    def _setup(self, model_id: str, pretrained: bool, random_config: dict | None = None) -> None:
        """Record identity for the cache key, validate the layer, pick a pad token, freeze."""
        num_layers = int(getattr(self.model.config, "num_hidden_layers", getattr(self.model.config, "num_layers", 0)))
        for layer in self.layers:
            if not -(num_layers + 1) <= layer <= num_layers:
                raise ValueError(f"layer={layer} out of range for a model with {num_layers} layers (0 = embeddings)")
        if self.max_length is None:
            self.max_length = int(min(getattr(self.tokenizer, "model_max_length", 512), 1 << 16))
        if self.tokenizer.pad_token_id is None:
            # Causal LMs often ship without a pad token; any id works because padding is masked out.
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._model_id = model_id
        if not pretrained:
            self._model_key_extra = ["random-" + short_hash(json.dumps(random_config or {}, sort_keys=True))]
        self._finish_init()

    @property
    def layers(self) -> list[int]:
        """The layers whose hidden states are averaged (one for an int ``layer``)."""
        return self.layer if isinstance(self.layer, list) else [self.layer]

    @property
    def dim(self) -> int:
        return int(
            self.model.config.hidden_size if hasattr(self.model.config, "hidden_size") else self.model.config.d_model
        )

    def _key_parts(self) -> list[str]:
        layer = "mean" + "+".join(map(str, self.layer)) if isinstance(self.layer, list) else str(self.layer)
        parts = [self._model_id, *self._model_key_extra, f"layer{layer}", f"len{self.max_length}"]
        if self._prefix or self._suffix:
            parts.append("tpl-" + short_hash(self._prefix + "\x00" + self._suffix))
        if self._caption_span_only:
            parts.append("span-caption")
        parts.append(f"pool-{self.pooling}")
        parts.append(str(self.compute_dtype).removeprefix("torch."))
        return parts

    def _texts(self, captions: list[str]) -> list[str]:
        return [self._prefix + c + self._suffix for c in captions]

    def _tokenize(self, captions: list[str]) -> tuple[dict[str, Tensor], Tensor, int]:
        """Tokenise with truncation and padding; return the model inputs, the keep mask and #truncated."""
        texts = self._texts(captions)
        lengths = [
            len(ids)
            for ids in self.tokenizer(texts, add_special_tokens=self._add_special_tokens, verbose=False)["input_ids"]
        ]
        truncated = sum(n > self.max_length for n in lengths)
        enc = self.tokenizer(
            texts,
            add_special_tokens=self._add_special_tokens,
            truncation=True,
            max_length=self.max_length,
            padding="longest",
            padding_side=self.padding_side,
            return_tensors="pt",
            return_offsets_mapping=self._caption_span_only,
        )
        keep = enc["attention_mask"].bool()
        if self._caption_span_only:
            # Characters of the caption inside the templated text; keep tokens that overlap it.
            start = torch.full((len(captions), 1), len(self._prefix))
            end = start + torch.tensor([len(c) for c in captions]).unsqueeze(1)
            offsets = enc.pop("offset_mapping")
            keep &= (offsets[..., 0] < end) & (offsets[..., 1] > start)
        device = self.device
        inputs = {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}
        return inputs, keep.to(device), truncated

    def _hidden(self, inputs: dict[str, Tensor]) -> Tensor:
        """Run the model; return the chosen layer's hidden states [B, T, D] (the mean of several chosen layers)."""
        kwargs: dict[str, Any] = dict(inputs)
        if self.absolute_positions:
            # cumsum - 1 gives 0, 1, 2, ... over real tokens whatever the padding side.
            kwargs["position_ids"] = (inputs["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
        if self.causal:
            kwargs["use_cache"] = False
        want_all = self.layer != -1
        out = self.model(**kwargs, output_hidden_states=want_all, return_dict=True)
        if not want_all:
            return out.last_hidden_state
        # hidden_states[0] is the embedding output, hidden_states[-1] the final (normed) layer output.
        return torch.stack([out.hidden_states[k].float() for k in self.layers]).mean(0)

    def _encode_batch(self, captions: list[str]) -> tuple[TextFeatures, int]:
        inputs, keep, truncated = self._tokenize(captions)
        hidden = self._hidden(inputs).float()  # pool in float32 even when the model runs in bf16/fp16
        tokens, mask = pack_tokens(hidden, keep)
        if self.pooling == "last":
            pooled = tokens[torch.arange(tokens.shape[0], device=tokens.device), mask.sum(1) - 1]
        else:
            pooled = masked_mean(tokens, mask)
        return TextFeatures(tokens, mask, pooled), truncated
