"""SanaMeanFlowBackbone: a tiny random diffusers SANA transformer as a MeanFlow backbone (offline, CPU)."""

from __future__ import annotations

import fnmatch

import pytest
import torch

from emf_lightning.meanflow import MeanFlowLoss, TimeSampler, graph_free_jvp
from emf_lightning.meanflow.tangent_rules import jvp_safe_attention
from emf_lightning.models import Generator, TextConnector
from emf_lightning.models.diffusers_adapter import SANA_CONFIGS, SanaMeanFlowBackbone
from emf_lightning.utils.weights import MissingWeightsError

diffusers = pytest.importorskip("diffusers")
TINY = SANA_CONFIGS["tiny"]  # 4 latent channels, 8 x 8, patch 2, caption width 24, 2 blocks


def _pretrained_sana(root, seed: int = 0):
    """A random 'pretrained' SANA saved like a pipeline (root/transformer), with non-zero weights everywhere."""
    torch.manual_seed(seed)
    base = diffusers.SanaTransformer2DModel(**TINY)
    base.save_pretrained(root / "transformer")
    return base.eval()


def _inputs(dtype=torch.float32, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=gen, dtype=dtype)
    ctx = torch.randn(2, 5, 24, generator=gen, dtype=dtype)
    mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    return x, ctx, mask


def _sana_velocity(base, x, t, ctx, mask):
    """The wrapped model as SanaPipeline calls it: timestep = sigma x 1000 x timestep_scale, mask as 0/1."""
    with torch.no_grad():
        return base(
            x,
            encoder_hidden_states=ctx,
            timestep=t * 1000 * base.config.timestep_scale,
            encoder_attention_mask=mask.to(x.dtype),
            return_dict=False,
        )[0]


def test_default_init_keeps_the_pretrained_velocity_exactly(tmp_path):
    base = _pretrained_sana(tmp_path)
    adapter = SanaMeanFlowBackbone.from_pretrained(str(tmp_path))  # pipeline folder -> transformer/ subfolder
    assert adapter.interval_init == "zero" and adapter.time_scale == 1000.0 and adapter.context_dim == 24
    x, ctx, mask = _inputs()
    t = torch.tensor([0.3, 0.9])
    with torch.no_grad():
        u_eq = adapter(x, t, t, ctx, mask)
        u_neq = adapter(x, torch.tensor([0.0, 0.5]), t, ctx, mask)
    v = _sana_velocity(base, x, t, ctx, mask)
    assert torch.equal(u_eq, v)  # bit for bit at r = t
    assert torch.equal(u_neq, v)  # and at init for every r: the interval embedder adds exactly zero


def test_copy_and_random_inits_start_the_interval_embedder_as_documented(tmp_path):
    base = _pretrained_sana(tmp_path)
    copy = SanaMeanFlowBackbone.from_pretrained(str(tmp_path), interval_init="copy")
    emb = copy.transformer.time_embed
    for name, p in emb.timestep_embedder.state_dict().items():
        assert torch.equal(emb.guidance_embedder.state_dict()[name], p)
    x, ctx, mask = _inputs()
    t = torch.tensor([0.3, 0.9])
    with torch.no_grad():
        # copy adds embed(t - r = 0) != 0: the output at r = t moves away from the pretrained velocity
        assert not torch.allclose(copy(x, t, t, ctx, mask), _sana_velocity(base, x, t, ctx, mask))
    rand = SanaMeanFlowBackbone.from_pretrained(str(tmp_path), interval_init="random", seed=3)
    assert rand.transformer.time_embed.guidance_embedder.linear_2.weight.abs().sum() > 0


def test_export_loads_back_in_diffusers_and_in_the_adapter(tmp_path):
    _pretrained_sana(tmp_path / "base")
    adapter = SanaMeanFlowBackbone.from_pretrained(str(tmp_path / "base"), interval_init="random", seed=5)
    adapter.transformer.save_pretrained(tmp_path / "export")
    plain = diffusers.SanaTransformer2DModel.from_pretrained(tmp_path / "export")
    assert plain.config.guidance_embeds
    back = SanaMeanFlowBackbone.from_pretrained(str(tmp_path / "export"), interval_init="existing")
    x, ctx, mask = _inputs()
    r, t = torch.tensor([0.1, 0.2]), torch.tensor([0.6, 0.9])
    with torch.no_grad():
        u = adapter(x, r, t, ctx, mask)
        assert torch.equal(back(x, r, t, ctx, mask), u)
        # diffusers alone reproduces it with guidance = (t - r) x 1000
        v = plain(
            x,
            encoder_hidden_states=ctx,
            timestep=t * 1000,
            guidance=(t - r) * 1000,
            encoder_attention_mask=mask.float(),
            return_dict=False,
        )[0]
    torch.testing.assert_close(v, u, rtol=1e-5, atol=1e-6)  # diffusers' own float32 kernels, same maths
    with pytest.raises(ValueError, match="already has a guidance embedder"):
        SanaMeanFlowBackbone.from_pretrained(str(tmp_path / "export"))
    with pytest.raises(ValueError, match="interval_init='existing' needs"):
        SanaMeanFlowBackbone.from_pretrained(str(tmp_path / "base"), interval_init="existing")


def test_missing_weights_name_the_model_and_where_we_looked(tmp_path):
    with pytest.raises(MissingWeightsError, match="no-such-org/no-such-sana") as err:
        SanaMeanFlowBackbone.from_pretrained("no-such-org/no-such-sana")
    assert "'transformer' subfolder" in str(err.value)
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text("{}")
    with pytest.raises(MissingWeightsError, match=str(tmp_path / "transformer")):
        SanaMeanFlowBackbone.from_pretrained(str(tmp_path))


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="set pretrained=False"):
        SanaMeanFlowBackbone(config=TINY)
    with pytest.raises(ValueError, match="unknown SANA config 'huge'"):
        SanaMeanFlowBackbone.from_config("huge")
    with pytest.raises(ValueError, match="interval_init must be one of"):
        SanaMeanFlowBackbone.from_config("tiny", interval_init="ones")
    adapter = SanaMeanFlowBackbone.from_config("tiny")
    x, ctx, mask = _inputs()
    with pytest.raises(ValueError, match=r"expects x of shape \[B, 4, 8, 8\]"):
        adapter(x[:, :, :4], torch.zeros(2), torch.ones(2), ctx, mask)


def test_jvp_equals_central_differences_in_float64():
    """MeanFlow's graph-free JVP (forward-mode dual tensors + fast tangent rules) and torch.func.jvp through the
    adapter both equal a central difference along (v, 0, 1); t enters the pretrained embedder x 1000."""
    adapter = SanaMeanFlowBackbone.from_config("tiny", interval_init="random", seed=2).double()
    x, ctx, mask = _inputs(torch.float64)
    r, t = torch.tensor([0.1, 0.5], dtype=torch.float64), torch.tensor([0.3, 0.9], dtype=torch.float64)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)

    def f(z, r_, t_):
        return adapter(z, r_, t_, ctx, mask)

    h = 1e-7
    with torch.no_grad():
        fd = (f(x + h * v, r, t + h) - f(x - h * v, r, t - h)) / (2 * h)
    dudt = graph_free_jvp(adapter, x, r, t, v, (ctx, mask))
    torch.testing.assert_close(dudt, fd, rtol=1e-6, atol=1e-6 * fd.abs().max().item())
    with jvp_safe_attention():
        u, dudt_func = torch.func.jvp(f, (x, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))
    torch.testing.assert_close(dudt_func, dudt, rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        torch.testing.assert_close(u, f(x, r, t))


def _names(adapter, predicate) -> set[str]:
    return {n for n, _ in adapter.named_parameters() if predicate(n.removeprefix("transformer."))}


def test_trainable_selection_emf_and_patterns():
    emf = SanaMeanFlowBackbone.from_config("tiny", trainable="emf")
    expected = _names(emf, lambda n: n.startswith(("transformer_blocks.", "time_embed.")) or n == "scale_shift_table")
    assert set(emf.trainable_parameter_names()) == expected
    frozen = {n for n, p in emf.named_parameters() if not p.requires_grad}
    assert any("patch_embed" in n for n in frozen) and any("caption_projection" in n for n in frozen)
    assert any("proj_out" in n for n in frozen)
    only = SanaMeanFlowBackbone.from_config("tiny", trainable=["time_embed.guidance_embedder.*"])
    assert set(only.trainable_parameter_names()) == _names(
        only, lambda n: fnmatch.fnmatchcase(n, "time_embed.guidance_embedder.*")
    )
    assert len(only.trainable_parameter_names()) == 4  # two linears, weight and bias
    with pytest.raises(ValueError, match=r"\['blocks\.\*'\] match no parameter"):
        SanaMeanFlowBackbone.from_config("tiny", trainable=["blocks.*"])
    with pytest.raises(ValueError, match="trainable='none' needs LoRA"):
        SanaMeanFlowBackbone.from_config("tiny", trainable="none")


def test_lora_trains_only_the_adapters_and_starts_as_the_base_model():
    pytest.importorskip("peft")
    plain = SanaMeanFlowBackbone.from_config("tiny", seed=0)
    lora = SanaMeanFlowBackbone.from_config("tiny", seed=0, lora={"r": 4})
    names = lora.trainable_parameter_names()
    # 2 blocks x (self + cross attention) x (to_q, to_k, to_v, to_out.0) adapters, each lora_A and lora_B
    assert len(names) == 2 * 2 * 4 * 2 and all(".lora_A." in n or ".lora_B." in n for n in names)
    x, ctx, mask = _inputs()
    r, t = torch.tensor([0.2, 0.4]), torch.tensor([0.5, 0.9])
    u = lora(x, r, t, ctx, mask)
    with torch.no_grad():
        assert torch.equal(u, plain(x, r, t, ctx, mask))  # lora_B = 0 at init
    u.square().mean().backward()
    with_grad = {n for n, p in lora.named_parameters() if p.grad is not None}
    assert with_grad == set(names)
    both = SanaMeanFlowBackbone.from_config(
        "tiny", lora={"r": 2, "target_modules": ["to_q"]}, trainable=["scale_shift_table"]
    )
    assert len(both.trainable_parameter_names()) == 2 * 2 * 2 + 1
    with pytest.raises(ValueError, match="unknown LoRA option"):
        SanaMeanFlowBackbone.from_config("tiny", lora={"rank": 4})


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        adapter = SanaMeanFlowBackbone.from_config(
            "tiny", interval_init="random", seed=4, gradient_checkpointing=checkpointing
        )
        assert adapter.transformer.gradient_checkpointing is checkpointing
        x, ctx, mask = _inputs()
        adapter(x, torch.tensor([0.1, 0.3]), torch.tensor([0.4, 0.8]), ctx, mask).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in adapter.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


def test_meanflow_step_through_a_generator():
    """Generator(connector, adapter) takes the place of a DiT: a MeanFlow loss (graph-free JVP) backpropagates."""
    backbone = SanaMeanFlowBackbone.from_config("tiny", interval_init="random", trainable="emf")
    net = Generator(TextConnector(16, backbone.context_dim), backbone)
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    tokens, mask = torch.randn(3, 6, 16), torch.ones(3, 6, dtype=torch.bool)
    loss_fn = MeanFlowLoss(TimeSampler(neq_ratio=(1.0, 1.0)), cond_drop_prob=0.0)
    loss, stats = loss_fn(net, x, (tokens, mask), generator=torch.Generator().manual_seed(1))
    loss.backward()
    assert torch.isfinite(loss) and stats["dudt_rms"] > 0
    assert net.connector.fc1.weight.grad is not None
    assert all(p.grad is None for n, p in backbone.named_parameters() if not p.requires_grad)
    assert backbone.transformer.time_embed.guidance_embedder.linear_1.weight.grad.abs().sum() > 0
