"""A 20-second check that MeanFlow's JVP step runs on this GPU under bf16 autocast (used by gpu_session.sh
to pick the precision of the longer runs). Exit 0 and one line of timings, or the error."""

import time

import torch

from emf_lightning.meanflow import FlowMatchingLoss, MeanFlowLoss, TimeSampler
from emf_lightning.models.generator import build_generator

device = torch.device("cuda")
net = build_generator("S", text_dim=576, input_size=64, patch_size=4).to(device)
x = torch.randn(64, 3, 64, 64, device=device)
tokens, mask = torch.randn(64, 16, 576, device=device), torch.ones(64, 16, dtype=torch.bool, device=device)
opt = torch.optim.AdamW(net.parameters(), 1e-4)
for name, loss_fn in (
    ("meanflow", MeanFlowLoss(TimeSampler(neq_ratio=0.5), cond_drop_prob=0.0)),
    ("flow_matching", FlowMatchingLoss(TimeSampler(), cond_drop_prob=0.0)),
):
    times = []
    for _ in range(6):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = loss_fn(net, x, (tokens, mask), None, 0.5)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        assert torch.isfinite(loss), f"{name}: non-finite loss {loss.item()}"
    print(f"smoke ok: {name} bf16 S/64px batch 64 step {1000 * sorted(times[2:])[1]:.1f} ms, loss {loss.item():.4f}")
