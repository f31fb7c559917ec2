"""Text-conditioned U-Net backbone for MeanFlow in pixel space: u(x, r, t, text).

MeanFlow's own pixel-space experiments (CIFAR-10, 32x32) use a U-Net, not a DiT: at small resolutions a
convolutional network learns edges and corners from far fewer samples than a patch-4 transformer, whose
linear patch head paints every 4x4 patch from one token. Layout follows DDPM / ADM:

- residual blocks (GroupNorm, SiLU, 3x3 conv) whose second norm is modulated by the conditioning vector
  (scale and shift, "AdaGN"); the conditioning is embed(t) + embed(t - r) + a projection of the pooled
  text, exactly as in the DiT backbone;
- cross-attention from the image positions to the text tokens (under their padding mask) after each
  block at the resolutions listed in ``attention_resolutions``, plus self-attention there; with
  ``position_embedding`` the attention's image tokens carry a fixed 2D sin-cos embedding of where they are
  (convolutions and attention are otherwise blind to absolute place, which "left of" and "above" need);
- every residual branch ends in a zero-initialised layer, and so does the output convolution, so a freshly
  initialised network outputs exactly zero (as DiT's adaLN-Zero does).

All attention goes through :func:`attention`, which takes its forward-mode-safe math path inside the
MeanFlow JVP; there its GroupNorms, convolutions and linears take the hand-written tangent rules of
``meanflow.tangent_rules``, much faster on a CPU than PyTorch's generic formulas.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import to_2tuple
from torch import Tensor

from emf_lightning.utils.model_helpers import masked_mean

from .attention import attention
from .layers import Backbone, TimestepEmbedder, init_linears_normal, sincos_2d, zero_init


def _group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups of at least 4 channels (small widths keep meaningful groups)."""
    groups = min(32, max(1, channels // 4))
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, AdaGN(cond)-SiLU-dropout-conv(zero init), plus a (1x1) skip."""

    def __init__(self, in_ch: int, out_ch: int, cond_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = _group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.cond = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * out_ch))
        self.norm2 = _group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.cond(c)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over positions, then cross-attention to the text tokens; both residual, zero-init.

    ``grid`` (H, W of this level) adds a fixed 2D sin-cos position embedding to the normalised image tokens
    before both attentions' projections, so a query knows where it stands (not a parameter: checkpoints of
    either kind load into the same module tree).
    """

    def __init__(self, channels: int, context_dim: int, head_dim: int = 32, grid: tuple[int, int] | None = None):
        super().__init__()
        if channels % head_dim:
            raise ValueError(f"attention head_dim {head_dim} must divide the channels {channels}")
        self.grid = grid
        if grid is not None:
            self.register_buffer("pos_embed", sincos_2d(grid, channels)[None], persistent=False)
        self.num_heads = channels // head_dim
        self.head_dim = head_dim
        self.norm_self = _group_norm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj_self = zero_init(nn.Linear(channels, channels))
        self.norm_cross = _group_norm(channels)
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(context_dim, 2 * channels)
        self.proj_cross = zero_init(nn.Linear(channels, channels))

    def _heads(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def _merge(self, x: Tensor) -> Tensor:
        b, _, n, _ = x.shape
        return x.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)

    def _tokens(self, normed: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, HW, C], plus the position embedding where the block has one."""
        tokens = normed.flatten(2).transpose(1, 2)
        if self.grid is None:
            return tokens
        if tuple(normed.shape[-2:]) != self.grid:
            raise ValueError(f"attention built for a {self.grid} grid got {tuple(normed.shape[-2:])}")
        return tokens + self.pos_embed.to(tokens.dtype)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None) -> Tensor:
        b, ch, hgt, wid = x.shape
        tokens = self._tokens(self.norm_self(x))  # [B, HW, C]
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        out = self._merge(attention(self._heads(q), self._heads(k), self._heads(v)))
        x = x + self.proj_self(out).transpose(1, 2).reshape(b, ch, hgt, wid)

        tokens = self._tokens(self.norm_cross(x))
        k, v = self.kv(context).chunk(2, dim=-1)
        out = self._merge(attention(self._heads(self.q(tokens)), self._heads(k), self._heads(v), mask))
        return x + self.proj_cross(out).transpose(1, 2).reshape(b, ch, hgt, wid)


class UNetStep(nn.Module):
    """One block of a level: a residual block, then attention (where the level has it), then, at the end of an
    up level, nearest 2x upsampling and a 3x3 conv."""

    def __init__(self, res: ResBlock, attn: AttentionBlock | None = None, upsample: nn.Conv2d | None = None):
        super().__init__()
        self.res, self.attn, self.upsample = res, attn, upsample

    def forward(self, h: Tensor, c: Tensor, context: Tensor, mask: Tensor | None) -> Tensor:
        h = self.res(h, c)
        if self.attn is not None:
            h = self.attn(h, context, mask)
        if self.upsample is not None:
            h = self.upsample(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return h


class UNet(Backbone):
    """Text-conditioned U-Net predicting MeanFlow's average velocity u(x, r, t | text).

    Args:
        preset: a named size of ``PRESETS`` ("tiny", "S", "B"): the defaults of the size arguments below that
            are left as None.
        input_size: spatial size of x (int for square, or (H, W)); divisible by 2**(len(channel_mult) - 1).
        in_channels: channels of x; the output has the same.
        base_channels: width of the first level; level i has ``base_channels * channel_mult[i]``.
        channel_mult: width multipliers, one per resolution level (each level after the first halves H, W).
        num_res_blocks: residual blocks per level on the way down (one more on the way up, as in DDPM).
        attention_resolutions: downsampling factors (1 = full size) at which attention blocks run.
        head_dim: channels per attention head.
        context_dim: width of the text tokens (the connector's output width).
        position_embedding: give the attention blocks' image tokens a fixed 2D sin-cos embedding of their
            place (off by default: the presets and their checkpoints predate it; same parameters either way).
        dropout: dropout inside the residual blocks.
        time_scale, frequency_dim: as in the DiT's time embedders.
    """

    PRESETS = {
        "tiny": {
            "base_channels": 32,
            "channel_mult": (1, 2, 2),
            "num_res_blocks": 1,
            "attention_resolutions": (4,),
            "head_dim": 32,
            "context_dim": 128,
        },
        "S": {
            "base_channels": 64,
            "channel_mult": (1, 2, 2),
            "num_res_blocks": 2,
            "attention_resolutions": (2, 4),
            "head_dim": 32,
            "context_dim": 256,
        },
        "B": {
            "base_channels": 128,
            "channel_mult": (1, 2, 2, 2),
            "num_res_blocks": 2,
            "attention_resolutions": (2,),
            "head_dim": 64,
            "context_dim": 512,
        },
    }

    def __init__(
        self,
        preset: str | None = "tiny",
        input_size: int | tuple[int, int] = 32,
        in_channels: int = 3,
        base_channels: int | None = None,
        channel_mult: Sequence[int] | None = None,
        num_res_blocks: int | None = None,
        attention_resolutions: Sequence[int] | None = None,
        head_dim: int | None = None,
        context_dim: int | None = None,
        position_embedding: bool = False,
        dropout: float = 0.0,
        time_scale: float = 1.0,
        frequency_dim: int = 256,
    ):
        cfg = self.preset_args(
            preset,
            base_channels=base_channels,
            channel_mult=channel_mult,
            num_res_blocks=num_res_blocks,
            attention_resolutions=attention_resolutions,
            head_dim=head_dim,
            context_dim=context_dim,
        )
        base_channels, channel_mult, num_res_blocks = cfg["base_channels"], cfg["channel_mult"], cfg["num_res_blocks"]
        attention_resolutions, head_dim, context_dim = cfg["attention_resolutions"], cfg["head_dim"], cfg["context_dim"]
        super().__init__()
        size = to_2tuple(input_size)
        factor = 2 ** (len(channel_mult) - 1)
        if size[0] % factor or size[1] % factor:
            raise ValueError(f"input_size {size} must be divisible by {factor} for {len(channel_mult)} levels")
        if num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks}")
        self.input_size = size
        self.in_channels = in_channels
        self.context_dim = context_dim
        cond_dim = 4 * base_channels
        self.t_embedder = TimestepEmbedder(cond_dim, frequency_dim, time_scale)
        self.interval_embedder = TimestepEmbedder(cond_dim, frequency_dim, time_scale)
        self.context_embedder = nn.Sequential(
            nn.Linear(context_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim)
        )

        self.input_conv = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        widths = [base_channels * m for m in channel_mult]

        def grid(level: int) -> tuple[int, int] | None:
            return (size[0] // 2**level, size[1] // 2**level) if position_embedding else None

        def attn(level: int, ch: int) -> AttentionBlock | None:
            if 2**level not in attention_resolutions:
                return None
            return AttentionBlock(ch, context_dim, head_dim, grid(level))

        # Down: steps, and a strided conv between levels; every output is a skip for the way up.
        self.down = nn.ModuleList()
        skips, ch = [base_channels], base_channels
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                self.down.append(UNetStep(ResBlock(ch, width, cond_dim, dropout), attn(level, width)))
                ch = width
                skips.append(ch)
            if level < len(widths) - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)
        self.mid = nn.ModuleList(
            [
                UNetStep(
                    ResBlock(ch, ch, cond_dim, dropout),
                    AttentionBlock(ch, context_dim, head_dim, grid(len(widths) - 1)),
                ),
                UNetStep(ResBlock(ch, ch, cond_dim, dropout)),
            ]
        )
        # Up: one more step per level than down, each taking one skip; a level ends by upsampling.
        self.up = nn.ModuleList()
        for level in reversed(range(len(widths))):
            width = widths[level]
            for i in range(num_res_blocks + 1):
                res, level_attn = ResBlock(ch + skips.pop(), width, cond_dim, dropout), attn(level, width)
                # Built after the block and its attention: the order in which a seed fills the weights.
                upsample = nn.Conv2d(width, width, 3, padding=1) if level > 0 and i == num_res_blocks else None
                self.up.append(UNetStep(res, level_attn, upsample))
                ch = width
        self.out_norm = _group_norm(ch)
        self.out_conv = zero_init(nn.Conv2d(ch, in_channels, 3, padding=1))
        for emb in (self.t_embedder, self.interval_embedder, self.context_embedder):
            init_linears_normal(emb)
        # Channels-last convolutions: oneDNN (CPU) and cuDNN (tensor cores) run NHWC without reorders.
        self.to(memory_format=torch.channels_last)

    @torch.no_grad()
    def copy_time_embedder_to_interval(self) -> None:
        """Copy t_embedder's weights into interval_embedder (EMF's recipe when starting from a FM model)."""
        self.interval_embedder.load_state_dict(self.t_embedder.state_dict())

    def conditioning(self, r: Tensor, t: Tensor, context: Tensor, mask: Tensor | None) -> Tensor:
        """[B, cond_dim]: embed(t) + embed(t - r) + projection of the (masked) mean text token."""
        pooled = self.context_embedder(masked_mean(context, mask))
        return self.t_embedder(t) + self.interval_embedder(t - r) + pooled

    @property
    def input_feature_channels(self) -> int:
        """Channels of the ``input_features`` :meth:`forward` adds to its first features (a generator's layout)."""
        return self.input_conv.out_channels

    def forward(
        self,
        x: Tensor,
        r: Tensor,
        t: Tensor,
        context: Tensor,
        context_mask: Tensor | None = None,
        input_features: Tensor | None = None,
    ) -> Tensor:
        """Average velocity over [r, t]; shapes as :meth:`DiT.forward`. ``input_features`` [B,
        input_feature_channels, H, W], when given, are added to the input convolution's output."""
        self.check_inputs(x, r, t, context)
        c = self.conditioning(r, t, context, context_mask)
        h = self.input_conv(x.contiguous(memory_format=torch.channels_last))
        if input_features is not None:
            h = h + input_features.contiguous(memory_format=torch.channels_last)
        skips = [h]
        for block in self.down:
            h = block(h) if isinstance(block, nn.Conv2d) else block(h, c, context, context_mask)
            skips.append(h)
        for block in self.mid:
            h = block(h, c, context, context_mask)
        for block in self.up:
            h = block(torch.cat([h, skips.pop()], dim=1), c, context, context_mask)
        return self.out_conv(F.silu(self.out_norm(h))).contiguous()
