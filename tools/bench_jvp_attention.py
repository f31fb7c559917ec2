#!/usr/bin/env python
"""Micro-benchmark of attention inside MeanFlow's graph-free JVP: the math path against the closed-form
op (models/jvp_attention.py: ``torch`` tiles, ``triton`` kernels), side by side in one process.

Two parts, each result one JSON line, printed and appended to ``--jsonl`` as soon as it is measured (a run
cut short keeps what it finished):

* ``attention``: one attention call on forward-AD dual tensors, self-attention (tangents on q, k, v) and
  cross-attention to padded text (tangent on q only); time, peak memory (CUDA), and the error of out and
  tangent relative to a float32 math-path reference.
* ``network``: ``meanflow.graph_free_jvp`` of a whole backbone (default DiT-B/2 on 32x32x4 latents, 256
  tokens) under each backend, against a plain forward of the same batch.

    python tools/bench_jvp_attention.py --device cuda --jsonl runs/gpu/jvp_attention.jsonl
    python tools/bench_jvp_attention.py --device cpu --batch 4 --heads 2 --network tiny --repeats 3   # smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.autograd.forward_ad as fwAD

from emf_lightning import meanflow
from emf_lightning.models import build_generator
from emf_lightning.models.attention import math_attention
from emf_lightning.models.jvp_attention import jvp_attention, set_jvp_attention_backend, triton_available

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--tokens", type=int, default=256, help="image tokens (self-attention length)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--text-tokens", type=int, default=77, help="keys of the cross-attention (padded text)")
    p.add_argument("--text-dim", type=int, default=768)
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--network", default="B", help="backbone preset for the network part, or 'none'")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--jsonl", default=None, help="append one JSON line per result here")
    return p.parse_args(argv)


class Recorder:
    def __init__(self, path: str | None):
        self.path = Path(path) if path else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, row: dict) -> None:
        line = json.dumps(row)
        print(line, flush=True)
        if self.path:
            with self.path.open("a") as f:
                f.write(line + "\n")


def measure(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> dict:
    """Median and minimum wall time (ms) of fn, and its peak memory above what was live before (CUDA)."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - start))
    peak = None
    if cuda:
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return {"median_ms": statistics.median(times), "min_ms": min(times), "peak_mib": peak}


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def attention_rows(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype, backends: list[str], record: Recorder
) -> None:
    g = torch.Generator(device=device).manual_seed(0)
    b, h, n, d, lt = args.batch, args.heads, args.tokens, args.head_dim, args.text_tokens

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32)

    text_mask = torch.ones(b, lt, dtype=torch.bool, device=device)
    text_mask[:, lt // 2 :] = torch.rand(b, lt - lt // 2, generator=g, device=device) < 0.3  # ragged padding
    cases = {
        "self": ([randn(b, h, n, d) for _ in range(3)], [randn(b, h, n, d) for _ in range(3)], None),
        "cross": (
            [randn(b, h, n, d), randn(b, h, lt, d), randn(b, h, lt, d)],
            [randn(b, h, n, d), None, None],
            text_mask,
        ),
    }
    for case, (primals, tangents, mask) in cases.items():
        filled = [torch.zeros_like(p) if t is None else t for p, t in zip(primals, tangents)]
        ref_out, ref_tangent = torch.func.jvp(
            lambda q, k, v: math_attention(q, k, v, mask), tuple(primals), tuple(filled)
        )  # float32 reference
        low = [p.to(dtype) for p in primals]
        low_t = [None if t is None else t.to(dtype) for t in tangents]

        def run(backend: str, low=low, low_t=low_t, mask=mask):
            with torch.no_grad(), fwAD.dual_level():
                duals = [p if t is None else fwAD.make_dual(p, t) for p, t in zip(low, low_t)]
                out = jvp_attention(*duals, mask, backend) if backend != "math" else math_attention(*duals, mask)
                return fwAD.unpack_dual(out)

        for backend in backends:
            row = {
                "part": "attention",
                "case": case,
                "backend": backend,
                "device": device.type,
                "dtype": str(dtype).removeprefix("torch."),
                "batch": b,
                "heads": h,
                "len_q": n,
                "len_k": primals[1].shape[2],
                "head_dim": d,
            }
            try:
                out, tangent = run(backend)
                row.update(out_rel_err=_rel(out, ref_out), tangent_rel_err=_rel(tangent, ref_tangent))
                del out, tangent
                row.update(measure(lambda backend=backend: run(backend), device, args.repeats, args.warmup))
            except Exception as exc:  # one failing backend must not hide the others' numbers
                row["error"] = f"{type(exc).__name__}: {exc}"[:500]
            record(row)


def network_rows(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype, backends: list[str], record: Recorder
) -> None:
    torch.manual_seed(0)
    tokens_side = int(round(args.tokens**0.5))
    patch = 2
    net = build_generator(
        args.network, text_dim=args.text_dim, input_size=tokens_side * patch, in_channels=4, patch_size=patch
    ).to(device)
    with torch.no_grad():  # adaLN-zero and zero heads would make every tangent 0
        for p in net.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.02)
    b = args.batch
    z = torch.randn(b, 4, tokens_side * patch, tokens_side * patch, device=device)
    v = torch.randn_like(z)
    r, t = torch.rand(b, device=device) * 0.5, torch.rand(b, device=device) * 0.5 + 0.5
    mask = torch.ones(b, args.text_tokens, dtype=torch.bool, device=device)
    mask[:, args.text_tokens // 2 :] = False
    cond = (torch.randn(b, args.text_tokens, args.text_dim, device=device), mask)
    amp = dtype != torch.float32

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=amp)

    def forward():
        with torch.no_grad(), autocast():
            return net(z, r, t, *cond)

    base = {
        "part": "network",
        "network": args.network,
        "device": device.type,
        "dtype": str(dtype).removeprefix("torch.") + (" autocast" if amp else ""),
        "batch": b,
        "tokens": tokens_side**2,
        "parameters_m": sum(p.numel() for p in net.parameters()) / 1e6,
    }
    record({**base, "backend": "plain forward (no JVP)", **measure(forward, device, args.repeats, args.warmup)})
    reference = None
    for backend in backends:
        row = {**base, "backend": backend}
        try:
            set_jvp_attention_backend(backend)

            def jvp():
                with autocast():
                    return meanflow.graph_free_jvp(net, z, r, t, v, cond)

            dudt = jvp().float()
            if reference is None:
                reference = dudt
            row["dudt_rel_diff_vs_first"] = _rel(dudt, reference)
            del dudt
            row.update(measure(jvp, device, args.repeats, args.warmup))
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"[:500]
        record(row)
    set_jvp_attention_backend("auto")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    dtype = DTYPES["bf16" if device.type == "cuda" else "fp32"] if args.dtype == "auto" else DTYPES[args.dtype]
    backends = ["math", "torch"] + (["triton"] if device.type == "cuda" and triton_available() else [])
    record = Recorder(args.jsonl)
    record(
        {
            "part": "environment",
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "triton": triton_available(),
            "threads": torch.get_num_threads(),
            "argv": sys.argv[1:] if argv is None else argv,
        }
    )
    attention_rows(args, device, dtype, backends, record)
    if args.network != "none":
        network_rows(args, device, dtype, backends, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
