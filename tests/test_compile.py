"""torch.compile of the plain forward passes: no graph break, same loss and gradients, the JVP left eager."""

from __future__ import annotations

import pytest
import torch

from emf_lightning.meanflow import MeanFlowLoss, TimeSampler
from emf_lightning.models import build_generator
from emf_lightning.models.compiled import CompiledForward

from test_models import perturb_zero_init

GENERATORS = {
    "dit": dict(name="tiny", patch_size=4, hidden_size=32, depth=1, num_heads=2),
    "unet": dict(
        name="unet-tiny", base_channels=8, channel_mult=(1, 2), attention_resolutions=(2,), head_dim=8, context_dim=16
    ),
}


def _generator(kind: str):
    torch.manual_seed(0)
    args = dict(GENERATORS[kind])
    gen = build_generator(args.pop("name"), text_dim=12, input_size=16, **args)
    perturb_zero_init(gen)
    return gen


def _inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 16, 16, generator=g)
    cond = (torch.randn(4, 5, 12, generator=g), torch.ones(4, 5, dtype=torch.bool))
    return x, cond


KINDS = ["dit", pytest.param("unet", marks=pytest.mark.slow)]  # tracing costs ~5 s per model on 2 cores


@pytest.mark.parametrize("kind", KINDS)
def test_the_plain_forward_compiles_without_a_graph_break(kind):
    gen = _generator(kind)
    x, (tokens, mask) = _inputs()
    explained = torch._dynamo.explain(gen)(x, torch.rand(4), torch.rand(4), tokens, mask)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


@pytest.mark.parametrize("kind", KINDS)
def test_compiled_step_equals_the_eager_step_and_leaves_the_jvp_eager(kind, monkeypatch):
    gen = _generator(kind)
    x, cond = _inputs()
    loss_fn = MeanFlowLoss(TimeSampler(neq_ratio=0.5), cond_drop_prob=0.0, jvp_tangent="predicted")
    results = []
    for net in (gen, CompiledForward(gen, backend="eager")):  # dynamo traces; "eager" skips code generation
        gen.zero_grad()
        calls = {"compiled": 0}
        if isinstance(net, CompiledForward):
            compiled = net.compiled

            def counting(*args, _compiled=compiled, **kwargs):
                calls["compiled"] += 1
                return _compiled(*args, **kwargs)

            net.compiled = counting
        loss, _ = loss_fn(net, x, cond, generator=torch.Generator().manual_seed(3))
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in gen.parameters()], calls["compiled"]))
    (eager_loss, eager_grads, _), (loss, grads, compiled_calls) = results
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # Two plain forwards went through the compiled function (predicted tangent, graph-keeping forward); the
    # JVP's forward did not (it would have run with dual tensors).
    assert compiled_calls == 2
