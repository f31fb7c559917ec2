"""End-to-end sanity in pure torch: a tiny generator memorises 4 captioned 16x16 images with MeanFlow."""

from __future__ import annotations

import math

import pytest
import torch

from emf_lightning.meanflow import MeanFlowLoss, TimeSampler, make_noise, sample_meanflow
from emf_lightning.models import build_generator


def four_images() -> torch.Tensor:
    """Four distinct, smooth 3x16x16 images in [-1, 1] (gradient, disc, quadrants, waves)."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    disc = (xx**2 + yy**2 < 0.4).float() * 2 - 1
    images = [
        torch.stack([xx, yy, -xx]),
        torch.stack([disc, -disc, disc * 0.5]),
        torch.stack([torch.sign(xx * yy), torch.full_like(xx, -0.5), torch.sign(xx)]),
        torch.stack([torch.sin(3 * xx), torch.cos(3 * yy), (xx > yy).float() * 2 - 1]),
    ]
    return torch.stack(images)


@pytest.mark.slow
def test_tiny_generator_overfits_four_captioned_images():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: one thread is faster and kinder to a shared machine
    try:
        torch.manual_seed(0)
        images = four_images()
        g = torch.Generator().manual_seed(0)
        # Fixed random "text features": 3 tokens of width 16, the first caption one token shorter.
        tokens = torch.randn(4, 3, 16, generator=g)
        mask = torch.ones(4, 3, dtype=torch.bool)
        mask[0, 2] = False
        tokens[0, 2] = 0.0
        gen = build_generator("tiny", text_dim=16, input_size=16, patch_size=4, depth=2)
        loss_fn = MeanFlowLoss(TimeSampler("uniform", neq_ratio=0.75), cond_drop_prob=0.0)
        steps, reps = 500, 2
        opt = torch.optim.AdamW(gen.parameters(), lr=2e-3, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
        x = images.repeat(reps, 1, 1, 1)
        cond = (tokens.repeat(reps, 1, 1), mask.repeat(reps, 1))

        sample_noise = make_noise((4, 3, 16, 16), seed=7)

        def probe() -> tuple[float, float]:
            # Same noise and times before and after training: the raw (unweighted) MeanFlow error on the
            # training distribution of (r, t), and the one-step sample error against the images.
            with torch.no_grad():
                _, stats = loss_fn(gen, x, cond, generator=torch.Generator().manual_seed(123))
                one_step = sample_meanflow(gen, sample_noise, (tokens, mask), steps=1)
            return stats["mse"].item(), (one_step - images).pow(2).mean().item()

        start = probe()
        for _ in range(steps):
            loss, _ = loss_fn(gen, x, cond, generator=g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        end = probe()
        # Rows with small t (u ~ (z - x) / t) stay the hardest part of the training loss; the one-step
        # map, the thing the method is for, improves by more than two orders of magnitude.
        assert end[0] < start[0] / 10, (start, end)
        assert end[1] < start[1] / 100, (start, end)

        gen.eval()
        samples = sample_meanflow(gen, make_noise((4, 3, 16, 16), seed=8), (tokens, mask), steps=1)
        err = (samples[:, None] - images[None]).pow(2).flatten(2).mean(-1)  # [sample, image]
        # Each caption's one-step sample lands on its own image, far closer than to any other image.
        assert err.diagonal().max() < 0.03, err
        assert torch.equal(err.argmin(dim=1), torch.arange(4))
        off = err + torch.eye(4) * 1e9
        assert (off.min(dim=1).values > 10 * err.diagonal()).all(), err
    finally:
        torch.set_num_threads(threads)
