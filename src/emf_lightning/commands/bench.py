"""``emf bench`` (also ``tools/bench_step.py`` and ``make bench``): the cost of MeanFlow, measured side by side.

In one process, with the same generator, batch and data, it times a full training step (loss, backward,
AdamW update) of

* flow matching (the floor: one forward and one backward),
* naive MeanFlow (``torch.func.jvp`` over the whole batch, math attention everywhere, u from the JVP's
  primal, as public code does: ``meanflow.naive.ReferenceMeanFlowLoss``, the reference of the test suite),
* our MeanFlow (``meanflow.MeanFlowLoss``: a graph-free JVP on the r != t rows only, then one fused forward)
  at 25 % and 75 % r != t, with MeanFlow's tangent and with improved MeanFlow's predicted one,

and reports the median time, the peak memory of a step and their ratios to flow matching; then sampling
throughput (1- and 2-step MeanFlow against an n-step flow-matching Euler sampler) and, when the data
package is present, data-loader samples/s from WebDataset shards.

Peak memory of a step = the highest amount of tensor memory live during one step, minus what was live
just before it (parameters and optimizer state; gradients are freed before each step, so they count).
On CUDA that is ``torch.cuda.max_memory_allocated``; on the CPU it is the same quantity replayed from
the allocation and free events that ``torch.profiler`` records (``profile_memory=True``) for torch's
CPU allocator. Process RSS is not used: the C allocator's caching makes it lag and overshoot.

Examples::

    emf bench                                  # CPU: tiny and S, writes nothing
    emf bench --out docs/bench_cpu.md --json docs/bench_cpu.json
    emf bench --device cuda --sizes S,B,L --compile --out docs/bench_gpu.md
    emf bench --device cuda --sizes sana-1.6b  # EMF's recipe: SANA 1.6B (random weights) at 512 px
    emf bench --dry-run                        # print the resolved setup and exit
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from emf_lightning.meanflow import (
    FlowMatchingLoss,
    MeanFlowLoss,
    TimeSampler,
    make_noise,
    sample_flow_matching,
    sample_meanflow,
)
from emf_lightning.meanflow.naive import ReferenceMeanFlowLoss
from emf_lightning.models import build_generator
from emf_lightning.models.compiled import CompiledForward
from emf_lightning.utils.progress import progress

# Default workloads. CPU: pixel space 32x32, patch 4 (64 tokens). CUDA: SD-VAE latents of 256 px images
# (32x32x4), patch 2 (256 tokens), as in DiT / MeanFlow on ImageNet 256.
CPU_DEFAULTS = {
    "image_size": 32,
    "channels": 3,
    "patch_size": 4,
    "batch": {"tiny": 32, "S": 16, "unet-tiny": 32, "unet-S": 16},
}
CUDA_DEFAULTS = {
    "image_size": 32,
    "channels": 4,
    "patch_size": 2,
    "batch": {"tiny": 256, "S": 128, "B": 64, "L": 32, "XL": 32, "unet-S": 128, "unet-B": 64},
}

# Text features of the DiT / U-Net workloads: SmolLM2-135M's width, a short caption's padded length.
TEXT_DEFAULTS = {"text_len": 24, "text_dim": 576}

# The diffusers SANA adapter (`models.SanaMeanFlowBackbone`) with RANDOM weights of a named config
# (`SANA_CONFIGS`), trained as EMF's recipe trains it (configs/emf_sana.yaml: blocks, embedders and
# scale_shift_table; gradient checkpointing). Latent channels and patch come from the config; the default grid is
# DC-AE's for 512 px (16 x 16) and the text is Qwen3-0.6B's width, 128 tokens.
SANA_SIZES = {"sana-tiny": "tiny", "sana-1.6b": "sana-1.6b"}
SANA_DEFAULTS = {
    "image_size": {"sana-tiny": 8, "sana-1.6b": 16},
    "batch": {"sana-tiny": 8, "sana-1.6b": 16},
    "text_len": 128,
    "text_dim": 1024,
}


@dataclass
class Workload:
    """One model size and batch to benchmark."""

    size: str
    batch: int
    image_size: int
    channels: int
    patch_size: int | None  # None for U-Net presets (no patches)
    text_len: int
    text_dim: int


@dataclass
class Variant:
    """One training objective / JVP configuration."""

    key: str
    label: str
    objective: str  # "fm" | "mf" | "naive"
    neq_ratio: float = 0.25
    tangent: str = "conditional"
    jvp_precision: str = "autocast"

    def loss(self) -> FlowMatchingLoss | MeanFlowLoss:
        """The loss object for this variant (same time distribution everywhere)."""
        sampler = TimeSampler(neq_ratio=self.neq_ratio)
        if self.objective == "fm":
            return FlowMatchingLoss(sampler, cond_drop_prob=0.0)
        if self.objective == "naive":  # the reference computes du/dt as public code does: no precision choice
            return ReferenceMeanFlowLoss(sampler, cond_drop_prob=0.0, jvp_tangent=self.tangent)
        return MeanFlowLoss(sampler, cond_drop_prob=0.0, jvp_tangent=self.tangent, jvp_precision=self.jvp_precision)


VARIANTS = [
    Variant("fm", "flow matching", "fm"),
    Variant("mf_naive", "MeanFlow naive (full-batch JVP, as public code)", "naive", 0.25),
    Variant("mf25", "MeanFlow, 25% r!=t", "mf", 0.25),
    Variant("mf75", "MeanFlow, 75% r!=t", "mf", 0.75),
    # improved MeanFlow's tangent: one more no-gradient forward on the r != t rows
    Variant("mf_pred25", "MeanFlow, predicted tangent, 25% r!=t", "mf", 0.25, tangent="predicted"),
    Variant("mf_pred75", "MeanFlow, predicted tangent, 75% r!=t", "mf", 0.75, tangent="predicted"),
    # du/dt outside autocast (the reference codes' fp32 JVP); the same step as mf25/mf75 without --precision bf16
    Variant("mf_fp32jvp25", "MeanFlow, du/dt in fp32, 25% r!=t", "mf", 0.25, jvp_precision="fp32"),
    Variant("mf_fp32jvp75", "MeanFlow, du/dt in fp32, 75% r!=t", "mf", 0.75, jvp_precision="fp32"),
]
AUTOCAST_ONLY = {"mf_fp32jvp25", "mf_fp32jvp75"}

TARGETS = {"mf25": 1.3, "mf75": 1.7}
MEMORY_TARGET = 1.3


@dataclass
class StepResult:
    """Timing and memory of one variant on one workload."""

    variant: str
    label: str
    median_ms: float | None = None
    min_ms: float | None = None
    times_ms: list[float] = field(default_factory=list)
    peak_step_mib: float | None = None
    error: str | None = None
    time_ratio: float | None = None
    min_time_ratio: float | None = None
    memory_ratio: float | None = None


# ---------------------------------------------------------------------------------------------- measuring


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall-clock seconds for one call of ``fn``, waiting for queued CUDA work."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def cpu_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak of live CPU tensor bytes during ``fn`` above the level at its start (profiler allocator events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def cuda_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak allocated CUDA bytes during ``fn`` above the level at its start."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def resident_bytes(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Parameters plus optimizer state: what lives across steps."""
    total = sum(p.numel() * p.element_size() for p in module.parameters())
    for state in optimizer.state.values():
        total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    return total


# ---------------------------------------------------------------------------------------------- workloads


def build_bench_generator(w: Workload) -> torch.nn.Module:
    """The generator of one workload: a named DiT / U-Net preset, or the SANA adapter with random weights."""
    if w.size in SANA_SIZES:
        from emf_lightning.models import Generator, SanaMeanFlowBackbone

        backbone = SanaMeanFlowBackbone.from_config(
            SANA_SIZES[w.size], input_size=w.image_size, trainable="emf", gradient_checkpointing=True
        )
        return Generator.for_backbone(backbone, w.text_dim)
    patch = {} if w.patch_size is None else {"patch_size": w.patch_size}  # U-Nets have no patches
    return build_generator(w.size, text_dim=w.text_dim, input_size=w.image_size, in_channels=w.channels, **patch)


def make_batch(w: Workload, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Images in [-1, 1] and text features with padding (lengths between half and all of text_len)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(w.batch, w.channels, w.image_size, w.image_size, generator=g) * 2 - 1
    lengths = torch.randint(max(1, w.text_len // 2), w.text_len + 1, (w.batch,), generator=g)
    mask = torch.arange(w.text_len)[None] < lengths[:, None]
    tokens = torch.randn(w.batch, w.text_len, w.text_dim, generator=g) * mask[..., None]
    return x.to(device), (tokens.to(device), mask.to(device))


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """bf16/fp16 autocast when asked for, else nothing."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def bench_steps(
    w: Workload,
    variants: Sequence[Variant],
    device: torch.device,
    amp_dtype: torch.dtype | None,
    repeats: int,
    warmup: int,
    compile_model: bool,
    seed: int,
    log: Callable[[str], None],
    advance: Callable[..., None] | None = None,
) -> tuple[list[StepResult], dict[str, Any]]:
    """Time and measure every variant on one workload, rounds interleaved so load drift hits all alike.
    ``advance`` (a progress counter) moves once after the warm-up, once per round and once after memory."""
    advance = advance or (lambda *a, **k: None)
    if compile_model:
        # A fresh compile cache per workload: Dynamo keys its cache on Generator.forward's code, which every
        # workload shares, and guarding the previous model's graph against this one can fail (KeyError on a
        # buffer the new backbone lacks). One model per process, as in training, never meets this.
        torch._dynamo.reset()
    torch.manual_seed(seed)
    gen = build_bench_generator(w).to(device)
    net: Any = CompiledForward(gen) if compile_model else gen  # the JVP stays eager (models/compiled.py)
    opt = torch.optim.AdamW([p for p in gen.parameters() if p.requires_grad], lr=1e-5)
    x, cond = make_batch(w, device, seed)
    results = {v.key: StepResult(v.key, v.label) for v in variants}
    steps: dict[str, Callable[[], None]] = {}
    for v in variants:
        loss_fn = v.loss()
        g = torch.Generator(device).manual_seed(seed)

        def step(loss_fn=loss_fn, g=g) -> None:
            opt.zero_grad(set_to_none=True)
            with autocast_context(device, amp_dtype):
                loss, _ = loss_fn(net, x, cond, generator=g)
            loss.backward()
            opt.step()

        steps[v.key] = step

    live = []
    for v in variants:  # warm-up (and compile); a variant that fails is reported, not fatal
        try:
            for _ in range(warmup):
                steps[v.key]()
            live.append(v.key)
        except Exception as exc:  # noqa: BLE001 - the table shows the reason
            results[v.key].error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            log(f"  {v.key}: failed: {results[v.key].error}")
    advance(1, description=f"bench {w.size}: timing")
    for i in range(repeats):
        for key in live:
            results[key].times_ms.append(1e3 * timed(steps[key], device))
        log(f"  {w.size}: round {i + 1}/{repeats}")
        advance(1, description=f"bench {w.size}: timing" if i + 1 < repeats else f"bench {w.size}: memory")
    measure = cuda_peak_bytes if device.type == "cuda" else cpu_peak_bytes
    if live:
        # The first profiled step of a process over-counts on the CPU (by about the parameter size:
        # frees of blocks from before profiling are dropped); measure once and discard.
        measure(steps[live[0]])
    for key in live:
        results[key].median_ms = statistics.median(results[key].times_ms)
        results[key].min_ms = min(results[key].times_ms)
        results[key].peak_step_mib = measure(steps[key]) / 2**20
    advance(1)
    fm = results.get("fm")
    for r in results.values():
        if fm and fm.median_ms and r.median_ms:
            r.time_ratio = r.median_ms / fm.median_ms
            r.min_time_ratio = r.min_ms / fm.min_ms
        if fm and fm.peak_step_mib and r.peak_step_mib:
            r.memory_ratio = r.peak_step_mib / fm.peak_step_mib
    info = {
        "parameters_m": sum(p.numel() for p in gen.parameters()) / 1e6,
        "trainable_m": sum(p.numel() for p in gen.parameters() if p.requires_grad) / 1e6,
        "resident_mib": resident_bytes(gen, opt) / 2**20,
        "layout": (f"patch {w.patch_size} ({(w.image_size // w.patch_size) ** 2} tokens)" if w.patch_size else "U-Net"),
    }
    return list(results.values()), info


def bench_sampling(
    w: Workload, device: torch.device, amp_dtype: torch.dtype | None, fm_steps: int, repeats: int, seed: int
) -> dict[str, float]:
    """Images/s of MeanFlow at 1 and 2 steps and of flow-matching Euler at ``fm_steps`` (same network)."""
    torch.manual_seed(seed)
    gen = build_bench_generator(w).to(device).eval()
    _, cond = make_batch(w, device, seed)
    noise = make_noise((w.batch, w.channels, w.image_size, w.image_size), seed, device)
    runs = {
        "meanflow_1": lambda: sample_meanflow(gen, noise, cond, steps=1),
        "meanflow_2": lambda: sample_meanflow(gen, noise, cond, steps=2),
        f"flow_matching_{fm_steps}": lambda: sample_flow_matching(gen, noise, cond, steps=fm_steps),
    }
    out = {}
    with autocast_context(device, amp_dtype):
        for name, fn in runs.items():
            fn()  # warm-up
            out[name] = w.batch / statistics.median(timed(fn, device) for _ in range(repeats))
    return out


def bench_loader(
    shards: str | None, image_size: int, batch: int, workers: int, n_samples: int, n_batches: int
) -> dict[str, Any]:
    """Training samples/s from ``ShardDataModule``; writes temporary shapes-world shards when none given."""
    try:
        from emf_lightning.data.datamodule import ShardDataModule
        from emf_lightning.data.throughput import loader_throughput
    except ImportError as exc:  # the data package is another module's job; report, don't fail
        return {"skipped": f"data package unavailable ({exc})"}
    with tempfile.TemporaryDirectory() as tmp:
        source = shards
        if source is None:
            from emf_lightning.data.shards import write_shards
            from emf_lightning.shapes import ShapesWorld, shapes_samples

            world = ShapesWorld(seed=0, resolution=image_size, split="train", size=n_samples)
            source = write_shards(
                shapes_samples(world, n=n_samples), f"{tmp}/bench-%06d.tar", maxcount=max(1, n_samples // 4)
            ).urls
        dm = ShardDataModule(
            train_shards=source,
            batch_size=batch,
            num_workers=workers,
            image_size=image_size,
            shuffle_buffer=min(1000, n_samples),
            epoch_length=n_samples,
        )
        rate = loader_throughput(dm, n_batches=n_batches, warmup=2)
    return {
        "samples_per_s": rate,
        "shards": shards or f"temporary shapes world, {n_samples} samples",
        "batch": batch,
        "workers": workers,
    }


# ---------------------------------------------------------------------------------------------- reporting


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:{spec}}{suffix}"


def _verdict(key: str, r: StepResult) -> str:
    if key not in TARGETS or r.time_ratio is None:
        return ""
    ok_t = r.time_ratio <= TARGETS[key]
    ok_m = r.memory_ratio is not None and r.memory_ratio <= MEMORY_TARGET
    return ("time ok" if ok_t else f"time > {TARGETS[key]}x") + ", " + ("mem ok" if ok_m else f"mem > {MEMORY_TARGET}x")


def step_rows(results: Sequence[StepResult]) -> list[list[str]]:
    """Table rows: variant, median and min ms and their ratios to FM, peak MiB, memory ratio, target check."""
    rows = []
    for r in results:
        if r.error:
            rows.append([r.label, "failed", "", "", "", "", "", r.error])
            continue
        rows.append(
            [
                r.label,
                _fmt(r.median_ms, ".1f"),
                _fmt(r.time_ratio, ".2f", "x"),
                _fmt(r.min_ms, ".1f"),
                _fmt(r.min_time_ratio, ".2f", "x"),
                _fmt(r.peak_step_mib, ".1f"),
                _fmt(r.memory_ratio, ".2f", "x"),
                _verdict(r.variant, r),
            ]
        )
    return rows


STEP_HEADER = [
    "step",
    "median ms",
    "vs FM",
    "min ms",
    "vs FM (min)",
    "peak step MiB",
    "memory vs FM",
    "target (median)",
]


def _parameter_count(info: dict[str, Any]) -> str:
    """ "45.8M parameters", with "(12.0M trained)" when part of the model is frozen (the SANA workloads)."""
    total, trained = info["parameters_m"], info.get("trainable_m", info["parameters_m"])
    return f"{total:.1f}M parameters" + (f" ({trained:.1f}M trained)" if trained < total else "")


def markdown_report(report: dict[str, Any]) -> str:
    """The whole report as markdown tables."""
    env = report["environment"]
    lines = [
        f"# Step benchmark ({env['device']})",
        "",
        f"Command: `{report['command']}`  ",
        f"torch {env['torch']}, {env['device_name']}, {env['threads']} threads, precision {env['precision']}, "
        f"compile {env['compile']}, {env['date']}.",
        "",
        "A step = loss + backward + AdamW update, timed in interleaved rounds (median and minimum; on a "
        "shared machine the minimum is the less disturbed estimate). Peak step memory = highest "
        "live tensor memory during one step minus the memory live before it (parameters and optimizer state). "
        + (
            "CUDA: torch.cuda.max_memory_allocated."
            if env["device"] == "cuda"
            else "CPU: replayed from torch.profiler allocator events."
        ),
        "",
    ]
    for wl in report["workloads"]:
        w = wl["workload"]
        lines += [
            f"## {w['size']}: {_parameter_count(wl['info'])}, batch {w['batch']}, "
            f"{w['channels']}x{w['image_size']}x{w['image_size']}, {wl['info']['layout']}, "
            f"text {w['text_len']}x{w['text_dim']}",
            "",
            "| " + " | ".join(STEP_HEADER) + " |",
            "|" + "---|" * len(STEP_HEADER),
        ]
        lines += ["| " + " | ".join(row) + " |" for row in step_rows([StepResult(**r) for r in wl["steps"]])]
        if wl.get("sampling"):
            s = wl["sampling"]
            mf1 = s.get("meanflow_1")
            lines += ["", "| sampler | images/s | vs 1-step MeanFlow |", "|---|---|---|"]
            for name, rate in s.items():
                lines.append(
                    f"| {name.replace('_', ' ')} steps | {rate:.1f} | {_fmt(rate / mf1 if mf1 else None, '.3f', 'x')} |"
                )
        lines.append("")
    loader = report.get("loader")
    if loader:
        lines += ["## Data loader", ""]
        if "skipped" in loader:
            lines.append(f"skipped: {loader['skipped']}")
        else:
            lines.append(
                f"{loader['samples_per_s']:.0f} samples/s ({loader['shards']}, batch {loader['batch']}, "
                f"{loader['workers']} workers)"
            )
        lines.append("")
    return "\n".join(lines)


def print_report(report: dict[str, Any]) -> None:
    """The markdown report, rendered on the console (one renderer for the file and the screen)."""
    from rich.console import Console
    from rich.markdown import Markdown

    Console().print(Markdown(markdown_report(report)))


# ---------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``emf bench``."""
    p = argparse.ArgumentParser(
        prog="emf bench", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--sizes", default=None, help="comma-separated presets (default: tiny,S on CPU; S,B,L on CUDA)")
    p.add_argument("--batch", type=int, default=None, help="batch size for every size (default: per size)")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--channels", type=int, default=None)
    p.add_argument("--patch-size", type=int, default=None)
    p.add_argument("--text-len", type=int, default=None, help="padded caption length (default 24; SANA: 128)")
    p.add_argument(
        "--text-dim", type=int, default=None, help="text feature width (default 576 = SmolLM2-135M; SANA: 1024)"
    )
    p.add_argument(
        "--variants",
        default=None,
        help="comma-separated subset of: " + ", ".join(v.key for v in VARIANTS) + " (default: all; the fp32-JVP "
        "ones only under bf16 autocast, where they differ)",
    )
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5 on CPU, 20 on CUDA)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="autocast dtype (auto: bf16 on CUDA, fp32 on CPU)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the generator's plain forward passes (the JVP stays eager)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--fm-steps", type=int, default=50, help="Euler steps of the flow-matching sampler")
    p.add_argument("--sample-repeats", type=int, default=3)
    p.add_argument("--no-sampling", action="store_true")
    p.add_argument("--shards", default=None, help="shards for the loader benchmark (default: temporary shapes world)")
    p.add_argument("--loader-samples", type=int, default=512)
    p.add_argument("--loader-batches", type=int, default=10)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--no-loader", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the markdown report here")
    p.add_argument("--json", default=None, help="write the raw results here")
    p.add_argument("--dry-run", action="store_true", help="print the resolved setup and exit")
    return p


def sana_workload(size: str, args: argparse.Namespace) -> Workload:
    """A SANA workload: channels and patch from its config, grid / batch / text from SANA_DEFAULTS or the flags."""
    from emf_lightning.models.diffusers_adapter import SANA_CONFIGS

    config = SANA_CONFIGS[SANA_SIZES[size]]
    if args.channels not in (None, config["in_channels"]) or args.patch_size not in (None, config["patch_size"]):
        raise SystemExit(f"emf bench: {size} has {config['in_channels']} channels and patch {config['patch_size']}")
    return Workload(
        size=size,
        batch=args.batch or SANA_DEFAULTS["batch"][size],
        image_size=args.image_size or SANA_DEFAULTS["image_size"][size],
        channels=config["in_channels"],
        patch_size=config["patch_size"],
        text_len=args.text_len or SANA_DEFAULTS["text_len"],
        text_dim=args.text_dim or SANA_DEFAULTS["text_dim"],
    )


def resolve(args: argparse.Namespace) -> tuple[torch.device, list[Workload], list[Variant], torch.dtype | None]:
    """Device, workloads, variants and autocast dtype from the arguments."""
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("emf bench: --device cuda but no CUDA device is available")
    defaults = CUDA_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    sizes = (args.sizes or ("S,B,L" if device.type == "cuda" else "tiny,S")).split(",")
    from emf_lightning.models import BACKBONES, UNet

    unknown = [s for s in sizes if s not in BACKBONES and s not in SANA_SIZES]
    if unknown:
        raise SystemExit(f"emf bench: unknown size(s) {unknown}; choose from {sorted(BACKBONES) + list(SANA_SIZES)}")
    workloads = [
        sana_workload(s, args)
        if s in SANA_SIZES
        else Workload(
            size=s,
            batch=args.batch or defaults["batch"].get(s, 16),
            image_size=args.image_size or defaults["image_size"],
            channels=args.channels or defaults["channels"],
            patch_size=None if BACKBONES[s][0] is UNet else args.patch_size or defaults["patch_size"],
            text_len=args.text_len or TEXT_DEFAULTS["text_len"],
            text_dim=args.text_dim or TEXT_DEFAULTS["text_dim"],
        )
        for s in sizes
    ]
    by_key = {v.key: v for v in VARIANTS}
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    if args.variants is None:
        keys = [v.key for v in VARIANTS if precision == "bf16" or v.key not in AUTOCAST_ONLY]
    else:
        keys = [k for k in args.variants.split(",") if k]
    bad = [k for k in keys if k not in by_key]
    if bad:
        raise SystemExit(f"emf bench: unknown variant(s) {bad}; choose from {list(by_key)}")
    if "fm" not in keys:
        keys.insert(0, "fm")  # every ratio is against flow matching
    amp = torch.bfloat16 if precision == "bf16" else None
    return device, workloads, [by_key[k] for k in keys], amp


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the process exit code."""
    args = build_parser().parse_args(argv)
    threads = torch.get_num_threads()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        return _run(args, argv)
    finally:
        torch.set_num_threads(threads)  # callers (tests, notebooks) keep their setting


def _run(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    device, workloads, variants, amp = resolve(args)
    repeats = args.repeats or (20 if device.type == "cuda" else 5)
    if args.dry_run:
        print(
            json.dumps(
                {
                    "device": str(device),
                    "precision": str(amp or "fp32"),
                    "repeats": repeats,
                    "workloads": [asdict(w) for w in workloads],
                    "variants": [v.key for v in variants],
                },
                indent=2,
            )
        )
        return 0

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    report: dict[str, Any] = {
        "command": "emf bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "environment": {
            "device": device.type,
            "device_name": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "precision": "bf16 autocast" if amp else "fp32",
            "compile": bool(args.compile),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        },
        "workloads": [],
    }

    def write() -> None:
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(markdown_report(report))
            log(f"wrote {args.out}")
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(report, indent=2))
            log(f"wrote {args.json}")

    for w in workloads:
        log(f"benchmarking {w.size} (batch {w.batch}) on {device}")
        # One bar per case: warm-up, each timing round, memory, then sampling.
        total = 1 + repeats + 1 + (0 if args.no_sampling else 1)
        with progress(f"bench {w.size}: warm-up", total=total) as advance:
            steps, info = bench_steps(
                w, variants, device, amp, repeats, args.warmup, args.compile, args.seed, log, advance
            )
            entry: dict[str, Any] = {"workload": asdict(w), "info": info, "steps": [asdict(s) for s in steps]}
            if not args.no_sampling:
                advance(0, description=f"bench {w.size}: sampling")
                entry["sampling"] = bench_sampling(w, device, amp, args.fm_steps, args.sample_repeats, args.seed)
                advance(1)
        report["workloads"].append(entry)
        write()  # after every size: a run cut short by its time limit keeps what it measured
    if not args.no_loader:
        w0 = workloads[0]
        # Latent workloads (channels != 3) stand for images 8x larger (SD-VAE downsampling).
        pixels = w0.image_size if w0.channels == 3 else 8 * w0.image_size
        report["loader"] = bench_loader(
            args.shards, pixels, w0.batch, args.workers, args.loader_samples, args.loader_batches
        )
    print_report(report)
    write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
