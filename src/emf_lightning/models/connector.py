"""Trainable bridge from frozen text-encoder features to the backbone's width (as in EMF)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.nn as nn
from torch import Tensor

from emf_lightning.utils.model_helpers import standardize_tokens

from .attention import attention
from .layers import sincos_1d, zero_init
from .layout import (
    LAYOUT_CHANNELS,
    RELATIONS,
    LayoutPlanner,
    ObjectCount,
    SlotRelations,
    check_spacing,
    most_object_like,
    spread_places,
)
from .norms import Float32RMSNorm
from .slot_namer import PointingNamer, SlotNamer

# The connector's options as the model config, checkpoints and exports name them -> (TextConnector's argument,
# default). The defaults are those of files written before an option existed.
CONNECTOR_OPTIONS: dict[str, tuple[str, Any]] = {
    "standardize_text": ("standardize", False),
    "text_refiner_layers": ("refiner_layers", 0),
    "text_slots": ("slots", 0),
    "named_slots": ("named_slots", False),
    "slot_layout": ("layout", False),
    "slot_relations": ("relations", False),
    "slot_count": ("counts", False),
    "slot_pointer": ("pointer", False),
    "layout_spacing": ("spacing", 0.0),
}
# Those of them that only change how a layout is sampled, not the weights: a checkpoint may be judged with others.
SAMPLING_CONNECTOR_OPTIONS = ("layout_spacing",)


def connector_config(source: Mapping[str, Any]) -> dict[str, Any]:
    """The connector's options in ``source`` (a model's hyperparameters or an export's config.json), keyed as
    ``CONNECTOR_OPTIONS`` names them, absent ones at their defaults."""
    return {key: type(default)(source.get(key, default)) for key, (_, default) in CONNECTOR_OPTIONS.items()}


class SlotReading(NamedTuple):
    """What the connector's slots read a caption as: the slot tokens [B, K, D] (before naming and the final norm)
    and the caption's mapped tokens [B, L, D] with their mask [B, L] (None: all real), which a ``PointingNamer``
    names the slots from."""

    slots: Tensor
    words: Tensor
    words_mask: Tensor | None


class _TextAttentionBlock(nn.Module):
    """What the refiner and slot blocks share: a fixed 1D sin-cos position table for the caption's tokens (added to
    the normalised attention input, so the residual stream stays free of it; a buffer built once for
    ``max_tokens`` positions, outside the state dict), per-head QK RMSNorm, and zero-initialised residual ends (the
    attention's output projection and an MLP), so a new block changes nothing."""

    def __init__(self, dim: int, head_dim: int, max_tokens: int, what: str):
        super().__init__()
        if dim % head_dim:
            raise ValueError(f"{what} head_dim {head_dim} must divide the width {dim}")
        self.register_buffer("pos_embed", sincos_1d(torch.arange(max_tokens), dim).float(), persistent=False)
        self.num_heads = dim // head_dim
        self.head_dim = head_dim
        self.what = what

    def _add_residual_ends(self, dim: int, mlp_ratio: float) -> None:
        # Built after the block's own projections: the order in which a seed fills the weights.
        self.q_norm = Float32RMSNorm(self.head_dim, eps=1e-6)
        self.k_norm = Float32RMSNorm(self.head_dim, eps=1e-6)
        self.proj = zero_init(nn.Linear(dim, dim))
        self.norm_mlp = Float32RMSNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), zero_init(nn.Linear(hidden, dim)))

    def _positions(self, n: int, dtype: torch.dtype) -> Tensor:
        if n > self.pos_embed.shape[0]:
            raise ValueError(f"the {self.what} takes at most {self.pos_embed.shape[0]} text tokens, got {n}")
        return self.pos_embed[:n].to(dtype)

    def _heads(self, x: Tensor) -> Tensor:
        """[B, N, parts * D] -> [parts, B, heads, N, head_dim]."""
        b, n, width = x.shape
        parts = width // (self.num_heads * self.head_dim)
        return x.reshape(b, n, parts, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)

    def _residual(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """x plus the attention of q over (k, v) (heads as ``_heads`` makes them), then plus the MLP."""
        out = attention(self.q_norm(q), self.k_norm(k), v, mask)
        x = x + self.proj(out.transpose(1, 2).reshape(x.shape))
        return x + self.mlp(self.norm_mlp(x))


class TokenRefinerBlock(_TextAttentionBlock):
    """Pre-norm transformer block over the text tokens: masked self-attention, then an MLP; both residual and
    zero-initialised, so a new block is the identity and training starts from the per-token connector. The fixed
    1D position tells a token where it stands in the caption."""

    def __init__(self, dim: int, head_dim: int = 32, mlp_ratio: float = 2.0, max_tokens: int = 1024):
        super().__init__(dim, head_dim, max_tokens, "token refiner")
        self.norm_attn = Float32RMSNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self._add_residual_ends(dim, mlp_ratio)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """x [B, L, D], mask [B, L] bool (True = real token) or None -> [B, L, D]."""
        h = self.norm_attn(x) + self._positions(x.shape[1], x.dtype)
        q, k, v = self._heads(self.qkv(h))
        return self._residual(x, q, k, v, mask)


class SlotBlock(_TextAttentionBlock):
    """Learned slot tokens read the caption: pre-norm cross-attention from the slots to the caption's tokens and
    the slots themselves (masked; the slots can share out the objects), then an MLP; both residual and
    zero-initialised, so new slots are their learned starting vectors. The caption's tokens carry the fixed 1D
    position, so a slot can ask for "the first object" as well as for "the red one"."""

    def __init__(self, dim: int, head_dim: int = 32, mlp_ratio: float = 2.0, max_tokens: int = 1024):
        super().__init__(dim, head_dim, max_tokens, "slots' reader")
        self.norm_slots = Float32RMSNorm(dim, eps=1e-6)
        self.norm_tokens = Float32RMSNorm(dim, eps=1e-6)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self._add_residual_ends(dim, mlp_ratio)

    def forward(self, slots: Tensor, tokens: Tensor, mask: Tensor | None) -> Tensor:
        """slots [B, K, D], tokens [B, L, D], mask [B, L + K] bool over the tokens then the slots (True = attend;
        ``TextConnector.context`` builds it once for every block) or None -> slots [B, K, D]."""
        s = self.norm_slots(slots)
        keys = torch.cat(
            [self.norm_tokens(tokens) + self._positions(tokens.shape[1], tokens.dtype), s.to(tokens.dtype)], 1
        )
        (q,), (k, v) = self._heads(self.q(s)), self._heads(self.kv(keys))
        return self._residual(slots, q, k, v, mask)


class TextConnector(nn.Module):
    """[optional per-channel standardisation] -> Linear -> GELU(tanh) -> Linear -> RMSNorm, applied per token,
    [-> optional token refiner].

    The frozen encoder's last hidden states have their own scale and anisotropy; the connector maps them
    to the backbone width and the RMSNorm fixes their scale, so cross-attention sees well-conditioned keys.
    The null condition (all-zero tokens) maps to a learned constant through the biases and norm weight.

    With ``standardize=True`` the features are first z-scored per channel with statistics fitted once on the
    training captions (``set_standardization``; ``EMFModule(standardize_text=True)`` does it at fit start). An
    LLM's hidden states can be dominated by a few huge channels (docs/probe_results.md): a random first Linear
    then sees almost the same vector for every caption, and it must learn to undo that before it can learn
    anything else. The statistics are buffers, so checkpoints and exports carry them and every path that runs
    the generator (training, evaluation, sampling, an export) applies the same map. An all-zero token (the null
    condition, padding) stays zero: the null condition stays the centre of the standardised space.

    With ``refiner_layers > 0`` the mapped tokens then pass through that many trainable transformer blocks
    (``TokenRefinerBlock``: self-attention among the caption's tokens, under its padding mask) and a final
    RMSNorm. A per-token map cannot tie "red" to "circle" in "a red circle and a blue square"; the backbone's
    cross-attention reads tokens one by one, so binding must already be in them. The frozen encoder's own
    contextual mixing was trained for something else; the refiner learns the mixing the generator needs
    (docs/composition_2026-12-06.md measures it). Blocks start as the identity.

    With ``slots > 0`` the backbone reads, after the caption's tokens, that many learned slot tokens, each of
    which has read the whole caption through ``SLOT_LAYERS`` ``SlotBlock``s (a Perceiver-style resampler;
    :meth:`context` returns them with the mask extended). A slot can gather one object's shape, colour and place
    into one token, the format the oracle features of the composition study give the backbone.

    With ``named_slots=True`` (needs ``slots``) each slot passes through a ``SlotNamer`` (colour, shape and size
    probabilities, and place) and the backbone reads that name, mapped linearly to the context width and
    RMS-normalised, instead of the slot itself: a bottleneck that makes an object the sum of one embedding per
    attribute. The namer must be taught its classes (``model.object_supervision``, through the slots
    :meth:`read` returns).

    With ``layout=True`` (needs ``slots``) the connector also owns a ``SlotNamer`` (which slots hold an object), a
    ``LayoutPlanner`` (where they stand) and the map of each slot's name to the content ``paint_layout`` paints
    there (``models.layout``); the ``Generator`` feeds the painted map to the backbone. With ``relations=True`` (needs
    ``layout``) it also owns a ``SlotRelations`` (which relation the caption states between each pair of slots'
    objects), whose reading the planner is given. With ``counts=True`` (needs ``layout``) it owns an ``ObjectCount``
    (how many objects the caption states, from its tokens) and places that many slots, the most object-like, instead
    of each slot whose name is an object. With ``pointer=True`` (needs a namer) the namer is a ``PointingNamer``:
    each slot's name is read from the caption's words it points at, not from the slot, so an unseen colour-shape
    pair is named as its words say. ``spacing`` > 0 (needs ``layout``) spreads each sampled layout so that every two
    placed objects stand at least that fraction of the image side apart (``models.layout.spread_places``).
    """

    SLOT_LAYERS = 2

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        eps: float = 1e-6,
        standardize: bool = False,
        refiner_layers: int = 0,
        slots: int = 0,
        named_slots: bool = False,
        layout: bool = False,
        relations: bool = False,
        counts: bool = False,
        pointer: bool = False,
        spacing: float = 0.0,
    ):
        super().__init__()
        if in_dim <= 0 or out_dim <= 0:
            raise ValueError(f"TextConnector dims must be positive, got in_dim={in_dim}, out_dim={out_dim}")
        for name, value in dict(refiner_layers=refiner_layers, slots=slots).items():
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if named_slots and not slots:
            raise ValueError("named_slots names the slot tokens: set slots to at least 1")
        if layout and not slots:
            raise ValueError("layout places the slot tokens' objects: set slots to at least 1")
        if relations and not layout:
            raise ValueError("relations tell the layout planner how the slots' objects stand: set layout=True")
        if counts and not layout:
            raise ValueError("counts decide how many of the slots' objects the layout places: set layout=True")
        if pointer and not (named_slots or layout):
            raise ValueError("pointer chooses how the slots are named: set named_slots=True or layout=True")
        check_spacing(spacing)
        if spacing and not layout:
            raise ValueError("spacing spreads the sampled layout's places: set layout=True")
        self.spacing = float(spacing)
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.standardize = bool(standardize)
        if self.standardize:
            # Identity until fitted; `standardization_fitted` tells the two apart in a checkpoint.
            self.register_buffer("feature_mean", torch.zeros(in_dim))
            self.register_buffer("feature_std", torch.ones(in_dim))
            self.register_buffer("standardization_fitted", torch.tensor(False))
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(out_dim, out_dim)
        self.norm = Float32RMSNorm(out_dim, eps=eps)
        self.refiner = nn.ModuleList(TokenRefinerBlock(out_dim) for _ in range(refiner_layers))
        self.refiner_norm = Float32RMSNorm(out_dim, eps=eps) if refiner_layers else None
        if slots:
            self.slot_queries = nn.Parameter(torch.randn(slots, out_dim))
            self.slot_blocks = nn.ModuleList(SlotBlock(out_dim) for _ in range(self.SLOT_LAYERS))
            self.slot_norm = Float32RMSNorm(out_dim, eps=eps)
        self._named_slots = bool(named_slots)
        if named_slots or layout:
            self.slot_namer = PointingNamer(out_dim, slots) if pointer else SlotNamer(out_dim)
        if named_slots:
            self.slot_name_embed = nn.Linear(self.slot_namer.name_width, out_dim)
        if relations:
            self.slot_relations = SlotRelations(out_dim)
        if layout:
            self.layout_planner = LayoutPlanner(out_dim, relation_channels=len(RELATIONS) if relations else 0)
            self.layout_paint = nn.Linear(sum(self.slot_namer.sizes), LAYOUT_CHANNELS)
        if counts:
            self.object_count = ObjectCount(in_dim, slots)

    @property
    def refiner_layers(self) -> int:
        """How many token refiner blocks follow the per-token map (0: none)."""
        return len(self.refiner)

    @property
    def slots(self) -> int:
        """How many learned slot tokens follow the caption's tokens in :meth:`context` (0: none)."""
        return self.slot_queries.shape[0] if hasattr(self, "slot_queries") else 0

    @property
    def named_slots(self) -> bool:
        """Whether the backbone reads each slot's name (``SlotNamer``) instead of the slot itself."""
        return self._named_slots

    @property
    def has_namer(self) -> bool:
        """Whether the connector names its slots itself (``named_slots`` or ``layout``): the namer is then part of
        the generator, taught by ``model.object_supervision``."""
        return hasattr(self, "slot_namer")

    @property
    def layout(self) -> bool:
        """Whether the connector plans where its slots' objects stand (``models.layout``)."""
        return hasattr(self, "layout_planner")

    @property
    def relations(self) -> bool:
        """Whether the layout planner reads the relations the caption states between the slots' objects."""
        return hasattr(self, "slot_relations")

    @property
    def counts(self) -> bool:
        """Whether the layout places as many slots as the caption states objects (``ObjectCount``)."""
        return hasattr(self, "object_count")

    @property
    def pointer(self) -> bool:
        """Whether the slots are named from the caption's words they point at (``PointingNamer``)."""
        return isinstance(getattr(self, "slot_namer", None), PointingNamer)

    @property
    def is_fitted(self) -> bool:
        """Whether standardisation statistics were set (False when standardisation is off)."""
        return self.standardize and bool(self.standardization_fitted)

    @torch.no_grad()
    def set_standardization(self, mean: Tensor, std: Tensor) -> None:
        """Use these per-channel statistics (each [in_dim], std > 0) from now on."""
        if not self.standardize:
            raise ValueError("this TextConnector was built with standardize=False")
        if mean.shape != (self.in_dim,) or std.shape != (self.in_dim,):
            raise ValueError(f"standardisation statistics must have shape ({self.in_dim},)")
        if not bool(torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
            raise ValueError("standardisation statistics must be finite with std > 0")
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std)
        self.standardization_fitted.fill_(True)

    def standardized(self, tokens: Tensor) -> Tensor:
        """``tokens`` z-scored per channel (all-zero tokens stay zero); unchanged without standardisation."""
        if not self.standardize:
            return tokens
        return standardize_tokens(tokens, self.feature_mean, self.feature_std)

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        """[B, L, in_dim] (mask [B, L] bool, True = real token; only the refiner reads it) -> [B, L, out_dim]."""
        if tokens.shape[-1] != self.in_dim:
            raise ValueError(
                f"TextConnector expects text features of width {self.in_dim}, got {tokens.shape[-1]} "
                "(was the generator built for another text encoder?)"
            )
        out = self.norm(self.fc2(self.act(self.fc1(self.standardized(tokens)))))
        if not self.refiner:
            return out
        for block in self.refiner:
            out = block(out, mask)
        return self.refiner_norm(out)

    def context(self, tokens: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """What the backbone reads: the mapped tokens [B, L, out_dim] and their mask, with the slot tokens after
        them ([B, L + slots, out_dim], mask extended with True) when the connector has slots (their names when
        ``named_slots``)."""
        context, mask, _ = self.read(tokens, mask)
        return context, mask

    def read(self, tokens: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor | None, SlotReading | None]:
        """:meth:`context` and what it was made from (``SlotReading``; None without slots), for the namer and the
        layout."""
        out = self(tokens, mask)
        if not self.slots:
            return out, mask, None
        slots, context_mask = self._read_slots(out, mask)
        reading = SlotReading(slots, out, mask)
        shown = slots
        if self.named_slots:
            with torch.autocast(slots.device.type, enabled=False):
                shown = self.slot_name_embed(self.slot_namer.describe(*reading))
        return torch.cat([out, self.slot_norm(shown).to(out.dtype)], dim=1), context_mask, reading

    def name(self, reading: SlotReading) -> tuple[list[Tensor], Tensor]:
        """The namer's reading of the slots: (logits [B, K, n_a + 1] per attribute, place [B, K, 2]) fp32."""
        return self.slot_namer(*reading)

    def objects_present(self, reading: SlotReading, count: Tensor | None = None) -> Tensor:
        """[B, K] bool: the slots whose name is an object (the namer's "no object", averaged over the attributes,
        below one half), or given ``count`` [B] that many slots, those least likely to name nothing."""
        nothing = torch.stack([p[..., -1] for p in self.slot_namer.probabilities(*reading)], -1).mean(-1)
        return nothing < 0.5 if count is None else most_object_like(nothing, count)

    def count_objects(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        """How many objects each caption states: logits [B, slots + 1] fp32 from the text tokens [B, L, in_dim]
        (standardised, as the connector reads them)."""
        if not self.counts:
            raise ValueError("this connector was built without counts=True: it has no ObjectCount")
        with torch.autocast(tokens.device.type, enabled=False):
            return self.object_count(self.standardized(tokens.float()), mask)

    def layout_content(self, reading: SlotReading) -> Tensor:
        """[B, K, LAYOUT_CHANNELS] fp32: what the layout map paints for each slot, a linear map of its name's class
        probabilities (an unseen colour-shape pair is a new sum of seen parts)."""
        with torch.autocast(reading.slots.device.type, enabled=False):
            return self.layout_paint(torch.cat(self.slot_namer.probabilities(*reading), -1))

    def relation_features(self, slots: Tensor, present: Tensor) -> Tensor | None:
        """What the planner reads of the stated relations ([B, K, R], ``SlotRelations.features``, detached: the
        classifier and the slots are taught the relations by their own loss, not by the planner's); None without
        ``relations``."""
        if not self.relations:
            return None
        with torch.autocast(slots.device.type, enabled=False):
            return self.slot_relations.features(slots, present).detach()

    def plan_layout(
        self,
        reading: SlotReading,
        generator: torch.Generator | None = None,
        tokens: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """A sampled layout for the slots ``reading`` holds, read from the text tokens [B, L, in_dim] (mask [B, L]):
        (places [B, K, 2] in [0, 1], spread ``spacing`` apart, present [B, K] bool). The tokens are needed with
        ``counts``, which reads the object count there."""
        count = None
        if self.counts:
            if tokens is None:
                raise ValueError("a connector with counts reads the object count from the text tokens: pass tokens")
            count = self.count_objects(tokens, mask).argmax(-1)
        present = self.objects_present(reading, count)
        relations = self.relation_features(reading.slots, present)
        places = self.layout_planner.sample(reading.slots, present, generator, relations=relations)
        return spread_places(places, present, self.spacing), present

    def _read_slots(self, out: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The slot tokens after the slot blocks have read the mapped caption ``out`` [B, L, D] (before the final
        norm), and the mask extended over them."""
        if mask is not None:  # the slots are always read: by each other here, and by the backbone
            mask = torch.cat([mask, mask.new_ones(out.shape[0], self.slots)], dim=1)
        slots = self.slot_queries.expand(out.shape[0], -1, -1)
        for block in self.slot_blocks:
            slots = block(slots, out, mask)
        return slots, mask
