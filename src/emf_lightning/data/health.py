"""Counting bad input: why samples were skipped, per worker and per epoch.

Data loading runs in DataLoader worker processes, so counts cannot live in one shared Python object.
Each worker keeps a `SkipCounter`; every batch carries the counts accumulated since that worker's
previous batch (`batch["skipped"]`), and the main process sums them into a `SkipTally` that prints an
epoch summary. Nothing is counted twice and nothing is lost between workers.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping

log = logging.getLogger("emf_lightning.data")

# Reasons a sample (or a whole stretch of a shard) was skipped. Shard-level reasons count shards,
# sample-level reasons count samples.
UNREADABLE_SHARD = "unreadable_shard"  # the shard could not be opened (missing file, network, pipe error)
CORRUPT_SHARD = "corrupt_shard"  # truncated or damaged tar; samples before (and after resync) survive
DUPLICATE_ENTRY = "duplicate_entry"  # the same key.ext twice in a row; the repeat is ignored
MISSING_IMAGE = "missing_image"
UNDECODABLE_IMAGE = "undecodable_image"
EMPTY_CAPTION = "empty_caption"  # no .txt and no caption in the .json, or only whitespace
UNDECODABLE_CAPTION = "undecodable_caption"  # the .txt is not valid UTF-8
BAD_JSON = "bad_json"
BAD_FEATURES = "bad_features"  # precomputed text features missing (when required) or unreadable
BAD_LATENT = "bad_latent"  # precomputed latent unreadable (a missing one raises MissingLatentsError)

SHARD_REASONS = frozenset({UNREADABLE_SHARD, CORRUPT_SHARD})
# Every reason the datamodule counts, in a fixed order (ranks sum them as one vector).
ALL_REASONS = (
    UNREADABLE_SHARD,
    CORRUPT_SHARD,
    DUPLICATE_ENTRY,
    MISSING_IMAGE,
    UNDECODABLE_IMAGE,
    EMPTY_CAPTION,
    BAD_JSON,
    BAD_FEATURES,
    BAD_LATENT,
    UNDECODABLE_CAPTION,
)


class SkipCounter:
    """Per-process skip counts since the last `drain()`, logging one warning per reason and process.

    The first skip of each reason is logged at WARNING with the sample's key and the error (so a user
    sees what kind of damage there is); repeats go to DEBUG, so a corrupt dataset does not flood the log.
    """

    def __init__(self, name: str = "data") -> None:
        self.name = name
        self._pending: Counter[str] = Counter()
        self._warned: set[str] = set()

    def skip(self, reason: str, detail: str = "", n: int = 1) -> None:
        """Record `n` skips for `reason`; `detail` names the sample/shard and the error."""
        self._pending[reason] += n
        if reason not in self._warned:
            self._warned.add(reason)
            log.warning(
                "%s: skipping input (%s): %s. Further '%s' skips are counted, and summarised at the end of the epoch.",
                self.name,
                reason,
                detail,
                reason,
            )
        else:
            log.debug("%s: skipping input (%s): %s", self.name, reason, detail)

    def drain(self) -> dict[str, int]:
        """Return the counts since the previous drain and reset them."""
        out = dict(self._pending)
        self._pending.clear()
        return out

    def __bool__(self) -> bool:
        return bool(self._pending)


class SkipTally:
    """Sum of skip counts in the main process (e.g. over one epoch of one dataloader)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.samples = 0

    def add(self, skipped: Mapping[str, int] | None, samples: int = 0) -> None:
        """Add one batch's `skipped` counts and its number of delivered samples."""
        if skipped:
            for reason, n in skipped.items():
                self.counts[reason] += int(n)
        self.samples += int(samples)

    def reset(self) -> None:
        """Start a new epoch."""
        self.counts.clear()
        self.samples = 0

    def summary(self, label: str) -> str:
        """One line: delivered samples and skips by reason, e.g. for the end-of-epoch log."""
        if not self.counts:
            return f"{label}: {self.samples} samples, nothing skipped"
        parts = []
        for reason in sorted(self.counts):
            unit = "shards" if reason in SHARD_REASONS else "samples"
            parts.append(f"{reason}={self.counts[reason]} {unit}")
        return f"{label}: {self.samples} samples delivered; skipped: " + ", ".join(parts)
