"""DiT backbone for MeanFlow: u(x, r, t, text) with adaLN-Zero blocks and cross-attention to text tokens.

Layout follows DiT (Peebles & Xie) with the MeanFlow change of two time embedders, one for t and one for
the interval t - r, summed into the adaLN conditioning, and a cross-attention sub-block (as in PixArt /
EMF) that reads the text tokens under their key padding mask. Every residual branch is gated by an
adaLN-Zero gate, so a freshly initialised network outputs exactly zero.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from timm.layers import Mlp, PatchEmbed, to_2tuple
from torch import Tensor

from emf_lightning.utils.model_helpers import masked_mean

from .attention import attention
from .layers import Backbone, TimestepEmbedder, init_linears_normal, sincos_2d
from .norms import Float32RMSNorm


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation of tokens [B, N, D] by per-sample shift/scale [B, D]."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


class SelfAttention(nn.Module):
    """Multi-head self-attention over image tokens, per-head RMS QK-norm (stabilises attention logits)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = Float32RMSNorm(self.head_dim, eps=1e-6)
        self.k_norm = Float32RMSNorm(self.head_dim, eps=1e-6)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """[B, N, D] -> [B, N, D]."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class CrossAttention(nn.Module):
    """Image tokens attend to text tokens under a key padding mask (True = real token)."""

    def __init__(self, dim: int, context_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim, 2 * dim)
        self.q_norm = Float32RMSNorm(self.head_dim, eps=1e-6)
        self.k_norm = Float32RMSNorm(self.head_dim, eps=1e-6)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None) -> Tensor:
        """x [B, N, D], context [B, L, Dc], mask [B, L] bool -> [B, N, D]."""
        b, n, d = x.shape
        q = self.q(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(context).reshape(b, context.shape[1], 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = attention(self.q_norm(q), self.k_norm(k), v, mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class DiTBlock(nn.Module):
    """adaLN-Zero block: gated self-attention, gated cross-attention to text, gated MLP."""

    def __init__(self, dim: int, num_heads: int, context_dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.cross_attn = CrossAttention(dim, context_dim, num_heads)
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=partial(nn.GELU, approximate="tanh"))
        # shift/scale/gate for each of the three sub-blocks.
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 9 * dim))

    def forward(self, x: Tensor, c: Tensor, context: Tensor, mask: Tensor | None) -> Tensor:
        """x [B, N, D], conditioning c [B, D], context [B, L, Dc] -> [B, N, D]."""
        s1, sc1, g1, s2, sc2, g2, s3, sc3, g3 = self.adaLN_modulation(c).chunk(9, dim=-1)
        x = x + g1[:, None] * self.attn(modulate(self.norm1(x), s1, sc1))
        x = x + g2[:, None] * self.cross_attn(modulate(self.norm2(x), s2, sc2), context, mask)
        x = x + g3[:, None] * self.mlp(modulate(self.norm3(x), s3, sc3))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a linear map from tokens to patches."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """[B, N, D] -> [B, N, p*p*C]."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(Backbone):
    """Text-conditioned DiT predicting MeanFlow's average velocity u(x, r, t | text).

    Args:
        preset: a named size of ``PRESETS`` (DiT's S, B, L, XL, and "tiny" for CPU runs): the defaults of the
            size arguments below that are left as None.
        input_size: spatial size of x (int for square, or (H, W)).
        in_channels: channels of x (3 for pixels, the autoencoder's latent channels otherwise); u has the same.
        patch_size: side of the square patches; must divide input_size.
        hidden_size: token width D.
        depth: number of blocks.
        num_heads: attention heads; must divide hidden_size.
        mlp_ratio: MLP hidden width / D.
        context_dim: width of the text tokens (default D: the connector maps the encoder's width to it).
        pool_context: also add a projection of the masked mean of the text tokens into the adaLN
            conditioning, so global prompt content modulates every block, not only cross-attention.
        time_scale: multiplier of t (and t - r) before the sinusoid (1 = raw t; see TimestepEmbedder).
        frequency_dim: sinusoid width of the time embedders.
    """

    # DiT's sizes (Peebles & Xie, table 1); "tiny" runs a training step on a laptop CPU at 32x32.
    PRESETS = {
        "tiny": {"hidden_size": 128, "depth": 4, "num_heads": 4, "mlp_ratio": 4.0, "patch_size": 4},
        "S": {"hidden_size": 384, "depth": 12, "num_heads": 6, "mlp_ratio": 4.0, "patch_size": 2},
        "B": {"hidden_size": 768, "depth": 12, "num_heads": 12, "mlp_ratio": 4.0, "patch_size": 2},
        "L": {"hidden_size": 1024, "depth": 24, "num_heads": 16, "mlp_ratio": 4.0, "patch_size": 2},
        "XL": {"hidden_size": 1152, "depth": 28, "num_heads": 16, "mlp_ratio": 4.0, "patch_size": 2},
    }

    def __init__(
        self,
        preset: str | None = "S",
        input_size: int | tuple[int, int] = 32,
        in_channels: int = 3,
        patch_size: int | None = None,
        hidden_size: int | None = None,
        depth: int | None = None,
        num_heads: int | None = None,
        mlp_ratio: float | None = None,
        context_dim: int | None = None,
        pool_context: bool = True,
        time_scale: float = 1.0,
        frequency_dim: int = 256,
    ):
        cfg = self.preset_args(
            preset,
            patch_size=patch_size,
            hidden_size=hidden_size,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
        )
        patch_size, hidden_size, depth = cfg["patch_size"], cfg["hidden_size"], cfg["depth"]
        num_heads, mlp_ratio = cfg["num_heads"], cfg["mlp_ratio"]
        super().__init__()
        size = to_2tuple(input_size)
        if size[0] % patch_size or size[1] % patch_size:
            raise ValueError(f"patch_size {patch_size} must divide input_size {size}")
        if hidden_size % num_heads:
            raise ValueError(f"num_heads {num_heads} must divide hidden_size {hidden_size}")
        if hidden_size % 4:
            raise ValueError(f"hidden_size must be divisible by 4 (2D sin-cos embedding), got {hidden_size}")
        self.input_size = size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.hidden_size = hidden_size
        self.grid_size = (size[0] // patch_size, size[1] // patch_size)
        context_dim = hidden_size if context_dim is None else context_dim
        self.context_dim = context_dim

        self.x_embedder = PatchEmbed(size, patch_size, in_channels, hidden_size, bias=True)
        self.register_buffer("pos_embed", sincos_2d(self.grid_size, hidden_size)[None], persistent=False)
        self.t_embedder = TimestepEmbedder(hidden_size, frequency_dim, time_scale)
        self.interval_embedder = TimestepEmbedder(hidden_size, frequency_dim, time_scale)
        self.context_embedder = (
            nn.Sequential(nn.Linear(context_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
            if pool_context
            else None
        )
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, context_dim, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT initialisation: Xavier linears, N(0, 0.02) time MLPs, zero adaLN and output (adaLN-Zero)."""

        def _xavier(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_xavier)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        for emb in (self.t_embedder, self.interval_embedder, self.context_embedder):
            if emb is not None:
                init_linears_normal(emb)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    @torch.no_grad()
    def copy_time_embedder_to_interval(self) -> None:
        """Copy t_embedder's weights into interval_embedder (EMF's recipe when starting from a FM model)."""
        self.interval_embedder.load_state_dict(self.t_embedder.state_dict())

    def unpatchify(self, x: Tensor) -> Tensor:
        """[B, N, p*p*C] -> [B, C, H, W]."""
        p, c = self.patch_size, self.in_channels
        gh, gw = self.grid_size
        x = x.reshape(x.shape[0], gh, gw, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, gh * p, gw * p)

    def conditioning(self, r: Tensor, t: Tensor, context: Tensor, mask: Tensor | None) -> Tensor:
        """adaLN conditioning [B, D]: embed(t) + embed(t - r) (+ projection of the pooled text)."""
        c = self.t_embedder(t) + self.interval_embedder(t - r)
        if self.context_embedder is not None:
            c = c + self.context_embedder(masked_mean(context, mask))
        return c

    def forward(self, x: Tensor, r: Tensor, t: Tensor, context: Tensor, context_mask: Tensor | None = None) -> Tensor:
        """Average velocity over [r, t].

        Args:
            x: [B, C, H, W] noisy input z_t.
            r, t: [B] times with r <= t (raw, in [0, 1]).
            context: [B, L, context_dim] text tokens (already through the connector).
            context_mask: [B, L] bool, True = real token; None = all real.

        Returns:
            u: [B, C, H, W], same shape as x.
        """
        self.check_inputs(x, r, t, context)
        h = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        c = self.conditioning(r, t, context, context_mask)
        for block in self.blocks:
            h = block(h, c, context, context_mask)
        return self.unpatchify(self.final_layer(h, c))
