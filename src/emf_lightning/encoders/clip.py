"""CLIP text tower (open_clip) as a text encoder: token states plus the projected EOT embedding.

We run open_clip's own modules (token embedding, positional embedding, transformer blocks, ln_final,
text projection) but build the inputs ourselves: sequences are cut to the longest caption of the batch
instead of always 77, position ids follow the attention mask (so left padding works too), and the
attention mask is causal plus key padding. Only OpenAI-style towers are supported (causal mask, EOT
pooling, no class token): ViT-B/L/H/bigG from OpenAI, LAION, DataComp...

Tokens: the final LayerNorm'd states (width of the text tower), the stream Stable Diffusion 1.x
cross-attends to; `project_tokens=True` also passes them through the text projection. Pooled: the EOT
state through the text projection, i.e. CLIP's text embedding.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from emf_lightning.encoders.base import TextEncoder, TextFeatures, pack_tokens
from emf_lightning.encoders.hf_base import PaddingSide
from emf_lightning.utils.hub import cached_file, warn_random
from emf_lightning.utils.model_helpers import random_init
from emf_lightning.utils.weights import MissingWeightsError, hf_cache_dir

TINY_CLIP = dict(
    embed_dim=32,
    text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=4, layers=2),
    vision_cfg=dict(image_size=32, layers=1, width=32, head_width=16, patch_size=16),
)
OPEN_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _locate_open_clip_weights(model: str, weights: str) -> tuple[str, dict]:
    """Resolve (model, weights tag or file) to a local checkpoint file and its pretrained config."""
    import open_clip

    if os.path.isfile(os.path.expanduser(weights)):
        return os.path.expanduser(weights), {}
    cfg = open_clip.get_pretrained_cfg(model, weights)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(model)
        raise ValueError(f"open_clip has no pretrained tag {weights!r} for {model!r}; known tags: {tags}")
    hub = cfg.get("hf_hub", "")
    if not hub:
        raise MissingWeightsError(
            f"open_clip {model} / {weights}", str(hf_cache_dir()), hint=f"Download {cfg.get('url', '')}"
        )
    # open_clip writes 'org/repo/' (default file names) or 'org/repo/file.bin'.
    repo, filename = os.path.split(hub)
    for name in (filename,) if filename else OPEN_CLIP_WEIGHT_FILES:
        found = cached_file(repo, name)
        if found:
            return found, cfg
    raise MissingWeightsError(
        repo,
        str(hf_cache_dir()),
        hint=f"(open_clip {model} with pretrained={weights!r}; or pass weights=<checkpoint file>)",
    )


class CLIPTextTower(torch.nn.Module):
    """The text-tower modules of an open_clip model (the vision tower is dropped to save memory)."""

    def __init__(self, clip: Any, model: str):
        super().__init__()
        tower = getattr(clip, "text", clip)  # CustomTextCLIP keeps the tower in .text, CLIP inline
        if getattr(tower, "cls_emb", None) is not None or not hasattr(tower, "token_embedding"):
            raise ValueError(f"{model}: unsupported text tower (class token or Hugging Face text model)")
        pool = getattr(tower, "text_pool_type", getattr(tower, "pool_type", "argmax"))
        if pool not in ("argmax", "eos") or getattr(tower, "attn_mask", None) is None:
            raise ValueError(
                f"{model}: only causal text towers with EOT pooling are supported (got pool_type={pool!r})"
            )
        self.token_embedding = tower.token_embedding
        self.positional_embedding = tower.positional_embedding
        self.transformer = tower.transformer
        self.ln_final = tower.ln_final
        self.text_projection = tower.text_projection
        self.heads = int(tower.transformer.resblocks[0].attn.num_heads)

    @property
    def context_length(self) -> int:
        return int(self.positional_embedding.shape[0])

    @property
    def width(self) -> int:
        return int(self.positional_embedding.shape[1])

    @property
    def embed_dim(self) -> int:
        proj = self.text_projection
        if proj is None:
            return self.width
        return int(proj.out_features if isinstance(proj, torch.nn.Linear) else proj.shape[1])

    def project(self, x: Tensor) -> Tensor:
        """Apply the text projection (identity when the model has none)."""
        proj = self.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, torch.nn.Module) else x @ proj

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        """ids/mask [B, T] (either padding side) -> final LayerNorm'd states [B, T, width]."""
        length = ids.shape[1]
        dtype = self.ln_final.weight.dtype
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        x = self.token_embedding(ids).to(dtype) + self.positional_embedding[positions].to(dtype)
        causal = torch.ones(length, length, dtype=torch.bool, device=ids.device).tril()
        allowed = causal.unsqueeze(0) & mask.unsqueeze(1)
        # Padding queries may see themselves: a fully masked row would give NaN, which we never read,
        # but NaN values times zero weights would still poison real rows in the next layer.
        allowed |= torch.eye(length, dtype=torch.bool, device=ids.device).unsqueeze(0)
        additive = torch.zeros(allowed.shape, dtype=dtype, device=ids.device).masked_fill(~allowed, float("-inf"))
        x = self.transformer(x, attn_mask=additive.repeat_interleave(self.heads, dim=0))
        return self.ln_final(x)


class CLIPTextEncoder(TextEncoder):
    """The text tower of an open_clip CLIP model.

    Args:
        model: open_clip architecture name, e.g. "ViT-L-14" (default, text width 768, embed 768).
        weights: open_clip pretrained tag ("openai", "laion2b_s32b_b82k", ...) found in the local HF cache,
            or a local checkpoint file.
        project_tokens: also project token states with the text projection (needed when the projection
            changes the width, so that tokens and pooled share D).
        padding_side: "right" or "left"; features are the same either way.
        max_length: at most the model's context length (77); longer captions are cut (EOT kept) with a warning.
        pretrained: False builds a tiny random CLIP (tests only; logs a warning).
    """

    name = "clip"
    default_model = "ViT-L-14"
    default_weights = "openai"

    def __init__(
        self,
        model: str | None = None,
        weights: str | None = None,
        project_tokens: bool = False,
        padding_side: PaddingSide = "right",
        max_length: int | None = None,
        batch_size: int = 64,
        pretrained: bool = True,
        random_config: dict[str, Any] | None = None,
        seed: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
    ):
        super().__init__(batch_size=batch_size, max_length=max_length, device=device, dtype=dtype)
        import open_clip
        from open_clip.tokenizer import SimpleTokenizer

        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        self.padding_side = padding_side
        self.project_tokens = project_tokens
        model = model or self.default_model
        weights = weights or self.default_weights
        if pretrained:
            checkpoint, cfg = _locate_open_clip_weights(model, weights)
            clip = open_clip.create_model(
                model, pretrained=checkpoint, force_quick_gelu=bool(cfg.get("quick_gelu", False))
            )
            self.tokenizer = open_clip.get_tokenizer(model)
            self._model_id = f"{model}/{weights}"
        else:
            config = {**TINY_CLIP, **(random_config or {})}
            warn_random(self.name, "tiny open_clip CLIP")
            clip = random_init(lambda: open_clip.model.CLIP(**config), seed)
            self.tokenizer = SimpleTokenizer()
            self._model_id = "tiny-clip-" + str(seed)
        if not isinstance(self.tokenizer, SimpleTokenizer):
            raise ValueError(f"{model}: only CLIP BPE (SimpleTokenizer) text towers are supported")
        self.text = CLIPTextTower(clip, model)
        del clip
        context, width, embed = self.text.context_length, self.text.width, self.text.embed_dim
        self.max_length = min(max_length or context, context)
        if embed != width and not project_tokens:
            raise ValueError(
                f"{model}: the text projection maps width {width} to {embed}; set project_tokens=True so tokens "
                "and pooled features share one dimension"
            )
        self._dim = embed if project_tokens else width
        self._finish_init()

    @property
    def dim(self) -> int:
        return self._dim

    def _key_parts(self) -> list[str]:
        return [
            self._model_id,
            f"len{self.max_length}",
            "proj" if self.project_tokens else "ln",
            str(self.compute_dtype).removeprefix("torch."),
        ]

    @classmethod
    def weights_available(
        cls, model: str | None = None, weights: str | None = None, pretrained: bool = True, **_: Any
    ) -> bool:
        if not pretrained:
            return True
        try:
            _locate_open_clip_weights(model or cls.default_model, weights or cls.default_weights)
        except (MissingWeightsError, ValueError):
            return False
        return True

    def _tokenize(self, captions: list[str]) -> tuple[Tensor, Tensor, int]:
        """[SOT] bpe [EOT] per caption, cut to max_length keeping EOT last; padded ids and mask."""
        sot, eot = self.tokenizer.sot_token_id, self.tokenizer.eot_token_id
        rows, truncated = [], 0
        for caption in captions:
            ids = [sot, *self.tokenizer.encode(caption), eot]
            if len(ids) > self.max_length:
                truncated += 1
                ids = ids[: self.max_length - 1] + [eot]
            rows.append(ids)
        length = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), length, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.bool)
        for i, r in enumerate(rows):
            cols = slice(length - len(r), length) if self.padding_side == "left" else slice(0, len(r))
            ids[i, cols] = torch.tensor(r)
            mask[i, cols] = True
        return ids.to(self.device), mask.to(self.device), truncated

    def _encode_batch(self, captions: list[str]) -> tuple[TextFeatures, int]:
        ids, mask, truncated = self._tokenize(captions)
        tokens, out_mask = pack_tokens(self.text(ids, mask), mask)
        eot_state = tokens[torch.arange(tokens.shape[0], device=tokens.device), out_mask.sum(1) - 1]
        pooled = self.text.project(eot_state)
        if self.project_tokens:
            zero = torch.zeros((), dtype=tokens.dtype, device=tokens.device)
            tokens = torch.where(out_mask.unsqueeze(-1), self.text.project(tokens), zero)
        return TextFeatures(tokens, out_mask, pooled), truncated
