"""`emf serve` without a browser: request checks, the batcher, batched sampling against `emf sample`'s path,
and the HTTP routes (a tiny in-memory model; the browser and load tests are in test_serve_browser.py)."""

from __future__ import annotations

import base64
import http.client
import io
import json
import re
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from emf_lightning import cli
from emf_lightning.commands.sample import sample_grid
from emf_lightning.serve import Batcher, BusyError, ImageRequest, Limits, RequestError, ServeApp, parse_image_request
from emf_lightning.serve.models import model_from_module
from emf_lightning.serve.server import make_server, serve_in_thread
from emf_lightning.utils.images import to_uint8

from helpers import tiny_module

MODELS = ["A", "B"]


def body(**fields) -> bytes:
    return json.dumps({"model": "A", "prompt": "a red circle", "steps": 1, "seed": 0, "cfg": 1.0, **fields}).encode()


# ------------------------------------------------------------------------------------------------ requests


def test_a_valid_request_is_parsed():
    request = parse_image_request(body(prompt="  a red circle ", steps=2, seed=7, cfg=2.5, model="B"), MODELS, Limits())
    assert request == ImageRequest(model="B", prompt="a red circle", steps=2, seed=7, cfg=2.5)


@pytest.mark.parametrize(
    "raw, message",
    [
        (body(prompt=""), "type a prompt to draw"),
        (body(prompt="   "), "type a prompt to draw"),
        (body(prompt="x" * 10_000), "10000 characters long; at most 1000"),
        (b'{"prompt": "a red \xff\xfe circle"}', "not valid UTF-8"),
        (b'{"prompt": "a red circle", "cfg": NaN}', "guidance scale must be a finite number"),
        (body(cfg="nan"), "guidance scale must be a finite number"),
        (body(cfg=-1), "guidance scale must be from 0 to 20"),
        (body(steps=1000), "steps must be a whole number from 1 to 64, got 1000"),
        (body(steps=1.5), "steps must be a whole number"),
        (body(steps=True), "steps must be a whole number"),
        (body(seed=-3), "seed must be a whole number from 0"),
        (body(model="../../etc/passwd"), "no model '../../etc/passwd' here"),
        (b'{"prompt": "\\ud800 circle"}', "not valid Unicode"),
        (body(prompt="a\x00b"), "control characters"),
        (b"[1, 2]", "must be a JSON object"),
        (b"{not json", "not valid JSON"),
        (body(prompt=None), "prompt must be text"),
    ],
)
def test_bad_requests_are_refused_with_a_message(raw, message):
    with pytest.raises(RequestError, match=re.escape(message)) as info:
        parse_image_request(raw, MODELS, Limits())
    assert info.value.status == 400


def test_an_oversized_body_is_refused_before_it_is_decoded():
    with pytest.raises(RequestError, match="at most 100") as info:
        parse_image_request(b"x" * 101, MODELS, Limits(max_body_bytes=100))
    assert info.value.status == 413


# ------------------------------------------------------------------------------------------------- batcher


def request(prompt="p", steps=1, cfg=1.0, seed=0, model="A") -> ImageRequest:
    return ImageRequest(model=model, prompt=prompt, steps=steps, seed=seed, cfg=cfg)


class GatedSampler:
    """Blocks each batch until released; records the batches it was given."""

    def __init__(self):
        self.gate = threading.Event()
        self.batches: list[list[str]] = []

    def __call__(self, requests):
        self.gate.wait(10)
        self.batches.append([r.prompt for r in requests])
        return np.zeros((len(requests), 2, 2, 3), np.uint8)


def wait_until(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_waiting_requests_with_equal_settings_are_sampled_together():
    sampler = GatedSampler()
    batcher = Batcher(sampler, max_queue=16, max_batch=3).start()
    try:
        first = batcher.submit(request("first"))
        wait_until(lambda: batcher.queued == 0)  # the worker now holds "first" and waits at the gate
        same = [batcher.submit(request(f"s{i}")) for i in range(4)]
        other = batcher.submit(request("two steps", steps=2))
        sampler.gate.set()
        results = [f.result(10) for f in [first, *same, other]]
    finally:
        batcher.stop()
    assert sampler.batches == [["first"], ["s0", "s1", "s2"], ["s3"], ["two steps"]]
    assert [r.batch_size for r in results] == [1, 3, 3, 3, 1, 1]
    assert batcher.images_made == 6


def test_a_full_queue_answers_busy_and_recovers():
    sampler = GatedSampler()
    batcher = Batcher(sampler, max_queue=2, max_batch=1).start()
    try:
        running = batcher.submit(request("running"))
        wait_until(lambda: batcher.queued == 0)
        waiting = [batcher.submit(request(f"w{i}")) for i in range(2)]
        with pytest.raises(BusyError, match="busy: 2 images are already waiting"):
            batcher.submit(request("one too many"))
        sampler.gate.set()
        for future in [running, *waiting]:
            future.result(10)
        assert batcher.submit(request("later")).result(10).batch_size == 1
    finally:
        batcher.stop()


def test_a_failing_batch_fails_its_requests_only():
    def sample(requests):
        if requests[0].prompt == "boom":
            raise RuntimeError("kaboom")
        return np.zeros((len(requests), 2, 2, 3), np.uint8)

    batcher = Batcher(sample).start()
    try:
        with pytest.raises(RuntimeError, match="kaboom"):
            batcher.submit(request("boom")).result(10)
        assert batcher.submit(request("fine")).result(10).image.shape == (2, 2, 3)
    finally:
        batcher.stop()


# ----------------------------------------------------------------------------------------- the model's side


@pytest.fixture(scope="module")
def module():
    """A tiny module with random weights everywhere (its zero-initialised output layers would ignore the text)."""
    module = tiny_module().eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=generator))
    return module


def test_a_request_gives_what_emf_sample_gives_batched_or_not(module):
    served = model_from_module(module, "A", "memory")
    prompts, seeds = ["a red circle", "a small blue square on the left", "green"], [0, 5, 0]
    batched = served.sample(prompts, seeds, steps=2, cfg_scale=1.5)
    for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
        alone = served.sample([prompt], [seed], steps=2, cfg_scale=1.5)[0]
        expected = to_uint8(sample_grid(module, [prompt], [2], 1.5, seed))[0]  # what `emf sample` computes
        np.testing.assert_array_equal(alone, expected)
        assert np.abs(batched[i].astype(int) - alone.astype(int)).max() <= 1  # float rounding of another batch size
    assert not np.array_equal(batched[0], batched[2])  # same seed, other prompt: the prompt matters


def test_a_flow_matching_checkpoint_offers_its_many_step_count():
    from emf_lightning.meanflow import FlowMatchingLoss

    served = model_from_module(tiny_module(loss=FlowMatchingLoss()), "A", "memory")
    assert served.describe()["objective"] == "flow_matching" and served.describe()["steps"] == [1, 2, 4, 50]
    assert served.sample(["a red circle"], [0], steps=3, cfg_scale=1.0).shape == (1, 16, 16, 3)


# ------------------------------------------------------------------------------------------------ the server


@pytest.fixture(scope="module")
def server(module):
    app = ServeApp([model_from_module(module, "A", "memory")], Limits(), max_queue=8).start()
    srv = make_server(app, port=0)
    serve_in_thread(srv)
    yield srv
    srv.shutdown()
    srv.server_close()
    app.stop()


def call(server, method: str, path: str, data: bytes | None = None, headers: dict | None = None):
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request(method, path, body=data, headers=headers or {})
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    return response.status, payload


def test_the_server_binds_to_localhost_by_default(server):
    assert server.server_address[0] == "127.0.0.1"
    assert server.url.startswith("http://127.0.0.1:")


def test_the_page_and_the_info(server):
    status, page = call(server, "GET", "/")
    assert status == 200 and b"<title>emf serve</title>" in page and b"/api/image" in page
    status, info = call(server, "GET", "/api/info")
    info = json.loads(info)
    assert status == 200
    assert info["models"][0]["steps"] == [1, 2, 4] and info["models"][0]["objective"] == "meanflow"
    assert info["limits"]["max_steps"] == 64


def test_an_image_comes_back_as_a_png_that_carries_its_settings(server, module):
    status, payload = call(server, "POST", "/api/image", body(prompt="a blue circle", steps=2, seed=3, cfg=1.0))
    answer = json.loads(payload)
    assert status == 200, answer
    assert answer["image"].startswith("data:image/png;base64,") and answer["compute_ms"] > 0
    png = Image.open(io.BytesIO(base64.b64decode(answer["image"].split(",", 1)[1])))
    assert png.text["emf:prompt"] == "a blue circle" and json.loads(png.text["parameters"])["seed"] == 3
    expected = to_uint8(sample_grid(module, ["a blue circle"], [2], 1.0, 3))[0]
    np.testing.assert_array_equal(np.asarray(png.convert("RGB")), expected)


@pytest.mark.parametrize(
    "method, path, data, headers, status, message",
    [
        ("POST", "/api/image", body(prompt=""), None, 400, "type a prompt"),
        ("POST", "/api/image", body(prompt="y" * 10_000), None, 400, "at most 1000"),
        ("POST", "/api/image", b'{"prompt": "\xc3\x28"}', None, 400, "not valid UTF-8"),
        ("POST", "/api/image", b'{"prompt": "a", "cfg": NaN}', None, 400, "finite"),
        ("POST", "/api/image", body(steps=1000), None, 400, "from 1 to 64"),
        ("POST", "/api/image", b"x" * 70_000, None, 413, "at most 65536"),
        ("GET", "/../../etc/passwd", None, None, 404, "not found"),
        ("GET", "/src/emf_lightning/serve/page.html", None, None, 404, "not found"),
        ("POST", "/api/info", b"{}", None, 404, "not found"),
    ],
)
def test_bad_requests_get_a_message_and_the_server_keeps_serving(server, method, path, data, headers, status, message):
    got, payload = call(server, method, path, data, headers)
    assert got == status
    assert message in json.loads(payload)["error"]
    ok, _ = call(server, "POST", "/api/image", body())
    assert ok == 200


def test_other_methods_and_a_missing_length_are_refused(server):
    assert call(server, "PUT", "/api/image", b"{}")[0] == 501
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.putrequest("POST", "/api/image")
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 411 and "Content-Length" in json.loads(response.read())["error"]
    conn.close()


def test_concurrent_requests_all_succeed(server):
    results: list[int] = []

    def client(i):
        results.append(call(server, "POST", "/api/image", body(prompt=f"circle {i}", seed=i))[0])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [200] * 8


# ------------------------------------------------------------------------------------------------- command


def test_serve_without_a_model_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["serve"])
    assert info.value.code == 2
    assert "--ckpt PATH or --export DIR" in capsys.readouterr().err


def test_serve_with_a_missing_checkpoint_is_one_line(tmp_path, capsys):
    assert cli.main(["serve", "--ckpt", str(tmp_path / "nope.ckpt")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "emf serve: error: --ckpt" in err and "no such file" in err
