"""The HTTP side of ``emf serve``, on the standard library's threading HTTP server.

Routes (anything else is 404; methods other than GET and POST are 501):
    GET  /            the page (page.html, read once from this package; no path from a request reaches a file)
    GET  /api/info    the models served, their default step counts and the limits
    POST /api/image   JSON request (see requests.py) -> {"image": PNG data URL, "compute_ms", ...}

Answers: 200 with the image; 400/413 with {"error": message} for a request the server refuses; 503 with
{"error": "busy: ..."} when the queue is full; 500 with {"error": ...} when sampling fails. None of them stops
the server. Each PNG carries its prompt and settings in text chunks, so a downloaded image documents itself.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import socket
import threading
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources

import numpy as np
from PIL import Image, PngImagePlugin

from emf_lightning.serve.batching import Batcher, BusyError, ImageResult
from emf_lightning.serve.models import ServedModel
from emf_lightning.serve.requests import ImageRequest, Limits, RequestError, parse_image_request

log = logging.getLogger("emf_lightning.serve")


def png_with_settings(image: np.ndarray, request: ImageRequest, model: ServedModel) -> bytes:
    """The image as PNG bytes with tEXt chunks: the prompt, each setting and the model's source."""
    info = PngImagePlugin.PngInfo()
    settings = {**request.settings(), "source": model.source, "objective": model.objective}
    for key, value in settings.items():
        info.add_text(f"emf:{key}", str(value))
    info.add_text("parameters", json.dumps(settings))
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


class ServeApp:
    """The models, the batcher and the page; ``image(body) -> (status, payload)`` is the whole API."""

    def __init__(
        self,
        models: list[ServedModel],
        limits: Limits | None = None,
        max_queue: int = 64,
        max_batch: int = 16,
        timeout_s: float = 120.0,
    ):
        if not models:
            raise ValueError("emf serve needs at least one model")
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must differ, got {names}")
        self.models = {m.name: m for m in models}
        self.limits = limits or Limits()
        self.timeout_s = timeout_s
        self.batcher = Batcher(self.sample_batch, max_queue=max_queue, max_batch=max_batch)
        self.page = resources.files("emf_lightning.serve").joinpath("page.html").read_bytes()

    def start(self) -> ServeApp:
        self.batcher.start()
        return self

    def stop(self) -> None:
        self.batcher.stop()

    def sample_batch(self, requests: list[ImageRequest]) -> np.ndarray:
        first = requests[0]
        model = self.models[first.model]
        return model.sample([r.prompt for r in requests], [r.seed for r in requests], first.steps, first.cfg)

    def info(self) -> dict:
        return {"models": [m.describe() for m in self.models.values()], "limits": asdict(self.limits)}

    def image(self, body: bytes) -> tuple[int, dict]:
        """Answer one image request; never raises."""
        try:
            request = parse_image_request(body, list(self.models), self.limits)
            result: ImageResult = self.batcher.submit(request).result(timeout=self.timeout_s)
            png = png_with_settings(result.image, request, self.models[request.model])
        except RequestError as err:
            return err.status, {"error": str(err)}
        except BusyError as err:
            return HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(err)}
        except FutureTimeout:
            return HTTPStatus.SERVICE_UNAVAILABLE, {"error": f"busy: no image after {self.timeout_s:g} s; try again"}
        except Exception as err:  # a failed forward is this request's error, not the server's end
            log.exception("sampling failed")
            return HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"sampling failed: {type(err).__name__}: {err}"}
        return HTTPStatus.OK, {
            **request.settings(),
            "image": "data:image/png;base64," + base64.b64encode(png).decode("ascii"),
            "compute_ms": round(result.compute_ms, 2),
            "queue_ms": round(result.queue_ms, 2),
            "batch_size": result.batch_size,
        }


class Handler(BaseHTTPRequestHandler):
    """Routes of ``ServeApp``; ``self.server.app`` is the app."""

    protocol_version = "HTTP/1.1"  # keep-alive: a typing user sends many small requests on one connection
    server_version = "emf-serve"
    timeout = 30  # seconds a connection may sit idle or half-sent before its thread lets it go

    def do_GET(self) -> None:  # noqa: N802 - the standard library's name
        path = self.path.split("?", 1)[0]
        if path == "/":
            self.send(HTTPStatus.OK, self.server.app.page, "text/html; charset=utf-8")
        elif path == "/api/info":
            self.send_json(HTTPStatus.OK, self.server.app.info())
        else:
            self.send_json(HTTPStatus.NOT_FOUND, {"error": "not found: this server has /, /api/info and /api/image"})

    def do_POST(self) -> None:  # noqa: N802
        if self.path.split("?", 1)[0] != "/api/image":
            self.send_json(HTTPStatus.NOT_FOUND, {"error": "not found: POST only to /api/image"})
            return
        length = self.headers.get("Content-Length")
        limit = self.server.app.limits.max_body_bytes
        if length is None or not length.isdigit():
            self.send_json(HTTPStatus.LENGTH_REQUIRED, {"error": "a Content-Length header is required"})
            return
        if int(length) > limit:
            self.close_connection = True  # the unread body would otherwise be taken for the next request
            self.send_json(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": f"the request is {length} bytes; at most {limit}"}
            )
            return
        body = self.rfile.read(int(length))
        status, payload = self.server.app.image(body)
        self.send_json(status, payload)

    def send_json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload, allow_nan=False).encode("utf-8")
        self.send(status, data, "application/json")

    def send(self, status: int, data: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        if status == HTTPStatus.SERVICE_UNAVAILABLE:
            self.send_header("Retry-After", "1")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the standard library's signature
        log.debug("%s %s", self.address_string(), format % args)


class AppServer(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client never keeps the process alive at shutdown
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], app: ServeApp):
        self.app = app
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/"


def make_server(app: ServeApp, host: str = "127.0.0.1", port: int = 7860) -> AppServer:
    """A bound server for ``app`` (``port=0`` picks a free port; see ``server.url``)."""
    return AppServer((host, port), app)


def serve_in_thread(server: AppServer) -> threading.Thread:
    """Serve until ``server.shutdown()`` (tests and tools run the server beside their own code)."""
    thread = threading.Thread(target=server.serve_forever, name="emf-serve-http", daemon=True)
    thread.start()
    return thread
