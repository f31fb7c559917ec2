"""What a browser may ask for, checked before it reaches a model: every refusal is a ``RequestError`` whose
message the page shows as it is (the server answers 400 and keeps serving).

A request body is JSON: ``{"model": "A", "prompt": "...", "steps": 1, "seed": 0, "cfg": 1.0}``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any


class RequestError(ValueError):
    """A request the server refuses; ``status`` is its HTTP status code."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """Bounds on one request (the command line can change them)."""

    max_prompt_chars: int = 1000
    max_steps: int = 64
    max_cfg: float = 20.0
    max_seed: int = 2**32 - 1
    max_body_bytes: int = 64 * 1024


@dataclass(frozen=True)
class ImageRequest:
    model: str
    prompt: str
    steps: int
    seed: int
    cfg: float

    @property
    def batch_key(self) -> tuple[str, int, float]:
        """Requests with equal keys are sampled together (the sampler takes one step count and one scale)."""
        return (self.model, self.steps, self.cfg)

    def settings(self) -> dict[str, Any]:
        return asdict(self)


def decode_body(body: bytes) -> dict[str, Any]:
    """The JSON object in a request body; invalid UTF-8 or JSON, or another JSON type, is a RequestError."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RequestError(f"the request is not valid UTF-8 (byte {err.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise RequestError(f"the request is not valid JSON ({err.msg} at character {err.pos})") from None
    if not isinstance(data, dict):
        raise RequestError("the request must be a JSON object with model, prompt, steps, seed and cfg")
    return data


def check_prompt(value: Any, limits: Limits) -> str:
    if not isinstance(value, str):
        raise RequestError("prompt must be text")
    prompt = value.strip()
    if not prompt:
        raise RequestError("type a prompt to draw")
    if len(prompt) > limits.max_prompt_chars:
        raise RequestError(
            f"the prompt is {len(prompt)} characters long; at most {limits.max_prompt_chars} are allowed"
        )
    try:
        prompt.encode("utf-8")  # JSON may carry lone surrogates ("\ud800"), which no tokenizer can read
    except UnicodeEncodeError:
        raise RequestError("the prompt holds characters that are not valid Unicode") from None
    if any(ord(c) < 32 and c not in "\t\n\r" for c in prompt):
        raise RequestError("the prompt holds control characters")
    return prompt


def check_int(name: str, value: Any, low: int, high: int) -> int:
    # bool is an int in Python; true/false are no step count or seed
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise RequestError(f"{name} must be a whole number from {low} to {high}")
    try:
        number = float(value)
    except ValueError:
        raise RequestError(f"{name} must be a whole number from {low} to {high}, got {str(value)[:20]!r}") from None
    if not math.isfinite(number) or number != int(number) or not low <= number <= high:
        raise RequestError(f"{name} must be a whole number from {low} to {high}, got {str(value)[:20]}")
    return int(number)


def check_cfg(value: Any, limits: Limits) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise RequestError(f"guidance scale must be a number from 0 to {limits.max_cfg:g}")
    try:
        number = float(value)
    except ValueError:
        raise RequestError(f"guidance scale must be a number, got {str(value)[:20]!r}") from None
    if not math.isfinite(number):
        raise RequestError(f"guidance scale must be a finite number, got {number}")
    if not 0.0 <= number <= limits.max_cfg:
        raise RequestError(f"guidance scale must be from 0 to {limits.max_cfg:g}, got {number:g}")
    return number


def parse_image_request(body: bytes, models: list[str], limits: Limits) -> ImageRequest:
    """Validate a request body against the served model names and the limits."""
    if len(body) > limits.max_body_bytes:
        raise RequestError(f"the request is {len(body)} bytes; at most {limits.max_body_bytes} are read", status=413)
    data = decode_body(body)
    model = data.get("model", models[0])
    if model not in models:
        raise RequestError(f"no model {str(model)[:40]!r} here; the server has {', '.join(models)}")
    return ImageRequest(
        model=model,
        prompt=check_prompt(data.get("prompt"), limits),
        steps=check_int("steps", data.get("steps", 1), 1, limits.max_steps),
        seed=check_int("seed", data.get("seed", 0), 0, limits.max_seed),
        cfg=check_cfg(data.get("cfg", 1.0), limits),
    )
