"""``emf serve``: a web page that draws as you type, for one or two trained generators side by side.

models.py     ServedModel: a checkpoint or an export as "captions + seeds -> uint8 images", batched
requests.py   ImageRequest and the validation of what a browser sends (every refusal is a one-line message)
batching.py   Batcher: one worker thread, a bounded queue, requests with equal settings sampled in one forward
server.py     the HTTP server (standard library only): the page, /api/info and /api/image, nothing else
page.html     the hand-written page (debounced redraw, step counts side by side, A/B, timings, download)
"""

from emf_lightning.serve.batching import Batcher, BusyError, ImageResult
from emf_lightning.serve.models import ServedModel, load_served_model
from emf_lightning.serve.requests import ImageRequest, Limits, RequestError, parse_image_request
from emf_lightning.serve.server import ServeApp, make_server

__all__ = [
    "Batcher",
    "BusyError",
    "ImageRequest",
    "ImageResult",
    "Limits",
    "RequestError",
    "ServeApp",
    "ServedModel",
    "load_served_model",
    "make_server",
    "parse_image_request",
]
