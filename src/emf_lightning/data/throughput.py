"""How fast a datamodule delivers training samples (used by tools/bench_step.py)."""

from __future__ import annotations

import time
from typing import Any


def loader_throughput(datamodule: Any, n_batches: int = 20, warmup: int = 2) -> float:
    """Samples per second from `datamodule.train_dataloader()`, over `n_batches` after `warmup` batches.

    The warm-up batches absorb worker start-up and the first shuffle-buffer fill. If an epoch ends
    first, iteration continues into the next one (the training stream is endless).
    """
    if n_batches < 1:
        raise ValueError(f"n_batches must be >= 1, got {n_batches}")
    if getattr(datamodule, "streams", None) is not None and "train" not in datamodule.streams:
        datamodule.setup("fit")
    loader = datamodule.train_dataloader()

    def batches():
        while True:
            produced = False
            for batch in loader:
                produced = True
                yield batch
            if not produced:
                raise RuntimeError("the training loader produced no batch")

    it = batches()
    for _ in range(warmup):
        next(it)
    samples = 0
    start = time.perf_counter()
    for _ in range(n_batches):
        samples += len(next(it)["image"])
    elapsed = time.perf_counter() - start
    return samples / elapsed
