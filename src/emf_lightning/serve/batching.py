"""One worker thread samples queued requests; those with equal settings (model, steps, guidance) that are
waiting together go through the model in one forward.

Batches form by themselves: while the worker samples one batch, new requests queue up, and the next batch
takes every waiting request with the oldest one's settings, up to ``max_batch``. Nothing waits on purpose, so
a lone request is answered as fast as an unbatched server would. The queue is bounded: beyond ``max_queue``
waiting requests ``submit`` raises ``BusyError`` at once instead of letting latency grow without end.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from emf_lightning.serve.requests import ImageRequest


class BusyError(RuntimeError):
    """The queue is full; the client should try again shortly."""


@dataclass
class ImageResult:
    image: np.ndarray  # uint8 [H, W, 3]
    compute_ms: float  # the forward this image was part of (encoder, sampler, decoder)
    queue_ms: float  # waiting before that forward started
    batch_size: int


@dataclass
class _Job:
    request: ImageRequest
    future: Future
    queued_at: float


SampleBatch = Callable[[Sequence[ImageRequest]], np.ndarray]


class Batcher:
    """``submit(request) -> Future[ImageResult]``; ``sample_batch(requests)`` returns their uint8 images."""

    def __init__(self, sample_batch: SampleBatch, max_queue: int = 64, max_batch: int = 16):
        if max_queue < 1 or max_batch < 1:
            raise ValueError(f"max_queue and max_batch must be >= 1, got {max_queue} and {max_batch}")
        self.sample_batch = sample_batch
        self.max_queue, self.max_batch = int(max_queue), int(max_batch)
        self._queue: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="emf-serve-batcher", daemon=True)
        self.batches_run = 0
        self.images_made = 0

    def start(self) -> Batcher:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            for job in self._queue:
                job.future.set_exception(BusyError("the server is shutting down"))
            self._queue.clear()
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def submit(self, request: ImageRequest) -> Future:
        future: Future = Future()
        with self._cond:
            if self._stopping:
                raise BusyError("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise BusyError(f"busy: {len(self._queue)} images are already waiting; try again in a moment")
            self._queue.append(_Job(request, future, time.perf_counter()))
            self._cond.notify()
        return future

    def _next_batch(self) -> list[_Job]:
        """Wait for work, then take the oldest job and every waiting job with its settings (in arrival order)."""
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return []
            key = self._queue[0].request.batch_key
            batch = [job for job in self._queue if job.request.batch_key == key][: self.max_batch]
            taken = set(map(id, batch))
            self._queue = deque(job for job in self._queue if id(job) not in taken)
            return batch

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if not batch:
                return
            start = time.perf_counter()
            try:
                images = self.sample_batch([job.request for job in batch])
            except Exception as err:  # one failed batch must not stop the worker
                for job in batch:
                    job.future.set_exception(err)
                continue
            done = time.perf_counter()
            self.batches_run += 1
            self.images_made += len(batch)
            for job, image in zip(batch, images):
                job.future.set_result(
                    ImageResult(image, (done - start) * 1e3, (start - job.queued_at) * 1e3, len(batch))
                )
