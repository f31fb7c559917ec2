"""EMFModule: frozen encoder outside the module tree, null condition, EMA, optimiser, sampling, bad input."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from emf_lightning.meanflow import FlowMatchingLoss, MeanFlowLoss, make_noise, null_condition
from emf_lightning.training import EMFModule, NonFiniteLossError
from emf_lightning.training.ema import ema_decay_at, update_ema
from emf_lightning.training.init_from import IncompatibleCheckpointError
from emf_lightning.utils.specs import to_spec

from helpers import FixedBatches, HashWordEncoder, quiet_trainer, shapes_batch, tiny_backbone, tiny_module


def loader(batches: list[dict]) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(FixedBatches(batches), batch_size=None)


# ---------------------------------------------------------------------------------------------- encoder


def test_encoder_is_not_saved_optimised_or_a_submodule():
    module = tiny_module()
    assert isinstance(module.encoder, HashWordEncoder)
    assert all(m is not module.encoder for m in module.modules())
    assert not any("table" in k or "encoder" in k for k in module.state_dict())
    opt = module.configure_optimizers()["optimizer"]
    optimised = {id(p) for group in opt.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in module.generator.parameters()}
    assert not any(p.requires_grad for p in module.encoder.parameters())
    assert not any(p.requires_grad for p in module.ema_generator.parameters())


def test_hparams_store_the_encoder_spec_not_the_encoder():
    module = tiny_module(encoder=HashWordEncoder(width=12, seed=3))
    spec = module.hparams["encoder"]
    assert spec["class_path"] == "helpers.HashWordEncoder"
    assert spec["init_args"]["width"] == 12 and spec["init_args"]["seed"] == 3
    # A module built from the spec alone gets the same encoder features.
    rebuilt = tiny_module(encoder=spec)
    a = module.encoder.encode(["a red circle"])
    b = rebuilt.encoder.encode(["a red circle"])
    assert torch.equal(a.tokens, b.tokens)


def test_encoder_spec_refuses_classes_that_are_not_encoders():
    with pytest.raises(ValueError, match="does not name a subclass of TextEncoder"):
        tiny_module(encoder={"class_path": "torch.nn.Linear", "init_args": {"in_features": 2, "out_features": 2}})


def test_encoder_spec_reads_back_constructor_arguments():
    enc = HashWordEncoder(width=8, seed=1, batch_size=5, max_length=7, device=torch.device("cpu"))
    spec = to_spec(enc)
    assert spec == {
        "class_path": "helpers.HashWordEncoder",
        "init_args": {"width": 8, "seed": 1, "batch_size": 5, "max_length": 7, "device": "cpu", "dtype": None},
    }


# ---------------------------------------------------------------------------------------------- conditions


def test_empty_caption_is_the_null_condition():
    module = tiny_module()
    feats = module.encode_text(["a red circle left of a blue square", ""])
    ref = module.encoder.encode(["a red circle left of a blue square"])
    n = ref.tokens.shape[1]
    assert torch.equal(feats.tokens[0, :n], ref.tokens[0]) and torch.equal(feats.mask[0, :n], ref.mask[0])
    assert torch.count_nonzero(feats.tokens[1]) == 0 and torch.count_nonzero(feats.pooled[1]) == 0
    assert feats.mask[1].tolist() == [True] + [False] * (feats.mask.shape[1] - 1)
    # Inside the padded batch the null row gives the generator exactly the length-1 null condition.
    z = torch.randn(1, 3, 16, 16)
    r, t = torch.tensor([0.2]), torch.tensor([0.7])
    net = module.generator.eval()
    u_padded = net(z, r, t, feats.tokens[1:2], feats.mask[1:2])
    u_null = net(z, r, t, *null_condition(1, module.encoder.dim))
    torch.testing.assert_close(u_padded, u_null, rtol=1e-5, atol=1e-6)


def test_precomputed_batch_features_are_used_and_dropped_rows_are_null():
    module = tiny_module()
    batch = shapes_batch(3, 16)
    ref = module.encoder.encode(batch["caption"])
    batch["features"] = {"tokens": ref.tokens, "mask": ref.mask, "pooled": ref.pooled}
    batch["caption"][1] = ""
    module.feature_cache.encode = None  # the cache must not be consulted
    feats = module.batch_text_features(batch)
    assert torch.equal(feats.tokens[0], ref.tokens[0]) and torch.equal(feats.mask[2], ref.mask[2])
    assert torch.count_nonzero(feats.tokens[1]) == 0 and feats.mask[1].sum() == 1 and feats.mask[1, 0]
    batch["features"]["tokens"] = torch.zeros(3, 2, 5)
    with pytest.raises(ValueError, match="precomputed features in the shards have width 5"):
        module.batch_text_features(batch)


def test_feature_cache_is_saved_to_disk(tmp_path: Path):
    module = tiny_module(feature_cache_dir=str(tmp_path))
    module.encode_text(["a red circle", "two blue squares"])
    module.save_feature_cache()
    again = tiny_module(feature_cache_dir=str(tmp_path))
    assert "a red circle" in again.feature_cache and len(again.feature_cache) == 2


def test_without_the_feature_cache_every_call_reaches_the_encoder():
    module = tiny_module(use_feature_cache=False)
    calls = []
    encode = module.encoder.encode
    object.__setattr__(module.encoder, "encode", lambda caps: calls.append(list(caps)) or encode(caps))
    first = module.encode_text(["a red circle", ""])
    second = module.encode_text(["a red circle", ""])
    assert calls == [["a red circle"], ["a red circle"]] and len(module.feature_cache) == 0
    assert torch.equal(first.tokens, second.tokens)


def test_all_empty_captions_never_reach_the_encoder():
    module = tiny_module()
    calls = []
    module.feature_cache.encode = lambda caps: calls.append(caps)  # would break if called
    feats = module.encode_text(["", ""])
    assert calls == [] and feats.tokens.shape == (2, 1, module.encoder.dim)
    assert feats.mask.all()


# ---------------------------------------------------------------------------------------------- sampling


def _perturb(module: EMFModule, seed: int = 0) -> None:
    """Give the zero-initialised output layers some weight so samples depend on the inputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in [*module.generator.parameters(), *module.ema_generator.parameters()]:
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def test_generate_one_step_is_noise_minus_ema_velocity_and_deterministic():
    module = tiny_module()
    _perturb(module)
    captions = ["a red circle", "two blue squares"]
    x = module.generate(captions, steps=1, seed=7)
    e = make_noise((2, 3, 16, 16), 7)
    feats = module.encode_text(captions)
    ones = torch.ones(2)
    with torch.no_grad():
        expected = e - module.ema_generator(e, 0 * ones, ones, feats.tokens, feats.mask)
    torch.testing.assert_close(x, expected.clamp(-1, 1))
    assert torch.equal(x, module.generate(captions, steps=1, seed=7))
    assert not torch.equal(x, module.generate(captions, steps=1, seed=8))
    assert not torch.equal(x, module.generate(captions, steps=1, seed=7, use_ema=False))


def test_generate_flow_matching_uses_euler_with_cfg():
    module = tiny_module(loss=FlowMatchingLoss())
    _perturb(module, 1)
    x = module.generate(["a green triangle"], steps=2, cfg_scale=3.0, seed=0)
    net = module.ema_generator
    z = make_noise((1, 3, 16, 16), 0)
    feats = module.encode_text(["a green triangle"])
    null = null_condition(1, module.encoder.dim)
    with torch.no_grad():
        for t_i, t_next in ((1.0, 0.5), (0.5, 0.0)):
            t = torch.full((1,), t_i)
            u_c = net(z, t, t, feats.tokens, feats.mask)
            u_0 = net(z, t, t, *null)
            z = z - (t_i - t_next) * (u_0 + 3.0 * (u_c - u_0))
    torch.testing.assert_close(x, z.clamp(-1, 1))


def test_predict_step_samples_each_step_count_with_the_batch_seed():
    module = tiny_module(sample_steps=(1, 2))
    _perturb(module, 3)
    batch = {"caption": ["a red circle", "two blue squares"], "key": ["k0", "k1"]}
    out = module.predict_step(batch, batch_idx=5)
    assert sorted(out["images"]) == [1, 2] and out["key"] == ["k0", "k1"]
    for steps, images in out["images"].items():
        assert torch.equal(images, module.generate(batch["caption"], steps=steps, seed=5))


def test_predict_writer_saves_one_png_per_caption_and_step_count(tmp_path: Path):
    import json

    import numpy as np
    from PIL import Image

    from emf_lightning.predict_writer import SamplePNGWriter
    from emf_lightning.utils.images import to_uint8

    module = tiny_module(sample_steps=(1, 2))
    _perturb(module, 4)
    batch = {"caption": ["a red circle", "two blue squares"], "key": ["k0", "k1"]}
    trainer = quiet_trainer(callbacks=[SamplePNGWriter(str(tmp_path))])
    trainer.predict(module, loader([batch]), return_predictions=False)
    for steps in (1, 2):
        want = to_uint8(module.generate(batch["caption"], steps=steps, seed=0))
        for i, key in enumerate(batch["key"]):
            got = np.asarray(Image.open(tmp_path / f"steps{steps}" / f"{key}.png"))
            assert np.array_equal(got, want[i])
    index = [json.loads(line) for line in (tmp_path / "captions-rank0.jsonl").read_text().splitlines()]
    assert len(index) == 4 and {r["caption"] for r in index} == set(batch["caption"])


def test_generate_rejects_empty_prompt_list_and_bad_steps():
    module = tiny_module()
    with pytest.raises(ValueError, match="at least one caption"):
        module.generate([])
    with pytest.raises(ValueError, match="steps must be >= 1"):
        module.generate(["a red circle"], steps=0)


# ---------------------------------------------------------------------------------------------- EMA, LR


def test_ema_decay_warmup_values():
    assert ema_decay_at(0, 0.9999) == pytest.approx(0.1)
    assert ema_decay_at(10, 0.9999) == pytest.approx(11 / 20)
    assert ema_decay_at(10**6, 0.999) == 0.999


def test_update_ema_hand_computed():
    model, ema = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
        model.bias.fill_(4.0)
        ema.weight.zero_()
        ema.bias.fill_(2.0)
    update_ema(ema, model, 0.75)
    assert ema.weight.tolist() == [[0.25, 0.5]] and ema.bias.tolist() == [2.5]


class RecordParams(Callback):
    """Snapshots of the generator's parameters after each optimiser step, and progress per batch."""

    def __init__(self):
        self.params: list[list[torch.Tensor]] = []
        self.progress: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.progress.append(pl_module.progress())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.params.append([p.detach().clone() for p in pl_module.generator.parameters()])


def test_training_ema_follows_the_warmup_formula_and_progress_schedule():
    module = tiny_module(optim={"ema_decay": 0.5}, loss=MeanFlowLoss(cond_drop_prob=0.0))
    init = [p.detach().clone() for p in module.generator.parameters()]
    batches = [shapes_batch(2, 16, seed=s) for s in range(3)]
    rec = RecordParams()
    quiet_trainer(max_steps=3, callbacks=[rec]).fit(module, loader(batches))
    assert rec.progress == pytest.approx([0.0, 1 / 3, 2 / 3])
    ema = init
    for step, params in enumerate(rec.params):
        d = min(0.5, (1 + step) / (10 + step))
        ema = [d * e + (1 - d) * p for e, p in zip(ema, params)]
    for got, want in zip(module.ema_generator.parameters(), ema):
        torch.testing.assert_close(got, want)
    assert not all(torch.equal(a, b) for a, b in zip(init, rec.params[-1]))


class RecordGradNorm(Callback):
    """The norm of the gradients the optimiser stepped with (Lightning clears them only in the next step)."""

    def __init__(self):
        self.norms: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        grads = [p.grad.flatten() for p in pl_module.generator.parameters() if p.grad is not None]
        self.norms.append(float(torch.cat(grads).norm()))


def test_gradient_clip_val_bounds_the_gradient_of_every_update():
    clip = 1e-3
    module = tiny_module()
    rec = RecordGradNorm()
    trainer = quiet_trainer(max_steps=2, callbacks=[rec], gradient_clip_val=clip)
    trainer.fit(module, loader([shapes_batch(2, 16, seed=s) for s in range(2)]))
    assert float(trainer.callback_metrics["train/grad_norm"]) > 10 * clip  # logged before clipping
    assert len(rec.norms) == 2
    assert all(0 < norm <= clip * (1 + 1e-4) for norm in rec.norms), rec.norms


def _learning_rates(module: EMFModule, steps: int) -> list[float]:
    """The learning rate of each of the first ``steps`` optimiser steps (the scheduler stepped every step)."""
    conf = module.configure_optimizers()
    assert conf["lr_scheduler"]["interval"] == "step"
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    seen = []
    for _ in range(steps):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return seen


def test_linear_lr_warmup():
    seen = _learning_rates(tiny_module(optim={"lr": 1e-2, "warmup_steps": 4}), 6)
    assert seen == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2, 1e-2, 1e-2])


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_lr_decays_after_warmup_to_the_floor(decay):
    # warm-up 2 steps, then 8 decay steps to 0.1 * lr at schedule_steps = 10 (hand-computed values).
    module = tiny_module(
        optim={"lr": 1.0, "warmup_steps": 2, "lr_decay": decay, "min_lr_ratio": 0.1, "schedule_steps": 10}
    )
    seen = _learning_rates(module, 12)
    fracs = [min(1.0, (s - 2) / 8) for s in range(2, 12)]
    if decay == "cosine":
        shape = [0.5 * (1 + math.cos(math.pi * f)) for f in fracs]
    else:
        shape = [1 - f for f in fracs]
    assert seen == pytest.approx([0.5, 1.0] + [0.1 + 0.9 * s for s in shape])
    assert seen[2] == pytest.approx(1.0) and seen[-2] == pytest.approx(0.1) and seen[-1] == pytest.approx(0.1)


def test_bad_lr_decay_settings_are_refused():
    with pytest.raises(ValueError, match="lr_decay must be one of"):
        tiny_module(optim={"lr_decay": "step"})
    with pytest.raises(ValueError, match=r"min_lr_ratio must be in \[0, 1\]"):
        tiny_module(optim={"min_lr_ratio": 1.5})


# ---------------------------------------------------------------------------------------------- bad input


def _nan_batches(n: int, bad: int) -> list[dict]:
    batches = [shapes_batch(2, 16, seed=s) for s in range(n)]
    batches[bad]["image"][0, 0, 0, 0] = float("nan")
    return batches


def test_nan_loss_stops_with_step_and_keys_and_writes_no_checkpoint(tmp_path: Path):
    module = tiny_module()
    ckpt_dir = tmp_path / "ckpts"
    ckpt = ModelCheckpoint(
        dirpath=ckpt_dir,
        filename="{step}",
        every_n_train_steps=1,
        save_top_k=-1,
        save_last=True,
        save_on_exception=True,
    )
    batches = _nan_batches(4, bad=2)
    trainer = quiet_trainer(max_steps=4, callbacks=[ckpt], enable_checkpointing=True)
    with pytest.raises(NonFiniteLossError) as info:
        trainer.fit(module, loader(batches))
    msg = str(info.value)
    assert "at global step 2" in msg and batches[2]["key"][0] in msg and "no checkpoint is written" in msg
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["last.ckpt", "step=1.ckpt", "step=2.ckpt"]
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=True)["global_step"] == 2


def test_nan_on_first_step_leaves_checkpoint_dir_empty(tmp_path: Path):
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_last=True, save_on_exception=True)
    trainer = quiet_trainer(max_steps=2, callbacks=[ckpt], enable_checkpointing=True)
    with pytest.raises(NonFiniteLossError, match="at global step 0"):
        trainer.fit(tiny_module(), loader(_nan_batches(2, bad=0)))
    assert list(tmp_path.iterdir()) == []


def test_nonfinite_gradient_is_refused():
    module = tiny_module()
    for p in module.generator.parameters():
        p.grad = torch.zeros_like(p)
    next(module.generator.parameters()).grad[0] = float("inf")
    with pytest.raises(NonFiniteLossError, match="gradient norm is inf"):
        module.on_before_optimizer_step(None)


def test_image_size_mismatch_is_a_clear_error():
    module = tiny_module()
    batch = shapes_batch(2, 8)
    with pytest.raises(ValueError, match=r"make data.image_size match the backbone's input_size"):
        module.compute_loss(batch, module.generator, torch.Generator(), train=True)


def test_a_loss_that_is_not_an_objective_is_refused():
    with pytest.raises(ValueError, match="does not name a subclass of Objective"):
        tiny_module(loss={"class_path": "torch.nn.MSELoss", "init_args": {}})


# ---------------------------------------------------------------------------------------------- init_from


def _save_generator_ckpt(module: EMFModule, path: Path) -> Path:
    torch.save({"state_dict": module.state_dict(), "global_step": 0}, path)
    return path


def test_init_from_loads_weights_and_copies_time_into_interval_embedder(tmp_path: Path):
    fm = tiny_module(loss=FlowMatchingLoss())
    _perturb(fm, 2)
    path = _save_generator_ckpt(fm, tmp_path / "fm.ckpt")
    mf = tiny_module(init_from=str(path), optim={"lr": 0.0})
    quiet_trainer(max_steps=1).fit(mf, loader([shapes_batch(2, 16)]))  # on_fit_start loads init_from
    src = fm.generator.state_dict()
    for name, value in mf.generator.state_dict().items():
        if name.startswith("backbone.interval_embedder."):
            want = src[name.replace("interval_embedder", "t_embedder")]
        else:
            want = src[name]
        torch.testing.assert_close(value, want, msg=name)
    interval = mf.ema_generator.backbone.interval_embedder.state_dict()
    for name, value in mf.ema_generator.backbone.t_embedder.state_dict().items():
        torch.testing.assert_close(interval[name], value)
    # Meaningful only because the source's two embedders differ.
    assert any(
        not torch.equal(v, src[k.replace("interval_embedder", "t_embedder")])
        for k, v in src.items()
        if k.startswith("backbone.interval_embedder.")
    )


def test_resume_does_not_reload_init_from(tmp_path: Path):
    fm = tiny_module(loss=FlowMatchingLoss())
    init = _save_generator_ckpt(fm, tmp_path / "fm.ckpt")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpts", filename="{step}", every_n_train_steps=1, save_top_k=-1)
    batches = loader([shapes_batch(2, 16, seed=s) for s in range(2)])
    quiet_trainer(max_steps=1, callbacks=[ckpt], enable_checkpointing=True).fit(
        tiny_module(init_from=str(init)), batches
    )
    init.unlink()  # a resumed run must not need the init_from file any more
    resumed = tiny_module(init_from=str(init))
    trainer = quiet_trainer(max_steps=2)
    trainer.fit(resumed, batches, ckpt_path=str(tmp_path / "ckpts" / "step=1.ckpt"))
    assert trainer.global_step == 2


def test_init_from_another_architecture_lists_mismatches(tmp_path: Path):
    other = tiny_module(backbone=tiny_backbone(hidden_size=64))
    path = _save_generator_ckpt(other, tmp_path / "other.ckpt")
    module = tiny_module()
    with pytest.raises(IncompatibleCheckpointError) as info:
        module.load_init_weights(str(path))
    msg = str(info.value)
    assert "another generator architecture" in msg
    assert "shape mismatch: backbone.blocks.0.mlp.fc2.weight: checkpoint (64, 256) vs model (32, 128)" in msg
    assert "... and 22 more" in msg  # long lists are cut, with the count of what was left out


def test_init_from_a_foreign_checkpoint(tmp_path: Path):
    path = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"encoder.layer.weight": torch.zeros(2)}}, path)
    with pytest.raises(IncompatibleCheckpointError, match="holds no 'generator.\\*' weights"):
        tiny_module().load_init_weights(str(path))
    with pytest.raises(FileNotFoundError, match="init_from checkpoint not found"):
        tiny_module().load_init_weights(str(tmp_path / "missing.ckpt"))


def test_progress_defaults_to_zero_without_a_trainer():
    assert tiny_module().progress() == 0.0
    assert math.isclose(tiny_module(optim={"schedule_steps": 10}).progress(), 0.0)


def test_bf16_mixed_precision_trains_with_fp32_weights():
    # What the GPU configs use (precision: bf16-mixed); CPU autocast runs the same code path.
    module = tiny_module()
    trainer = quiet_trainer(max_steps=2, precision="bf16-mixed")
    trainer.fit(module, loader([shapes_batch(2, 16, seed=s) for s in range(2)]))
    assert trainer.global_step == 2 and math.isfinite(float(trainer.callback_metrics["train/loss"]))
    assert all(p.dtype == torch.float32 for p in module.generator.parameters())
    assert all(p.dtype == torch.float32 for p in module.ema_generator.parameters())


class CheckRanksAgree(Callback):
    """Inside a DDP run: weights and EMA equal on every rank; the encoder is not part of the DDP module."""

    def on_train_end(self, trainer, pl_module):
        ddp_params = {id(p) for p in trainer.strategy.model.parameters()}
        assert not any(id(p) in ddp_params for p in pl_module.encoder.parameters())
        for net in (pl_module.generator, pl_module.ema_generator):
            flat = torch.cat([p.detach().flatten() for p in net.parameters()])
            gathered = trainer.strategy.all_gather(flat)
            assert torch.equal(gathered[0], gathered[1])


@pytest.mark.slow
def test_ddp_two_processes_keep_weights_and_ema_in_sync():
    module = tiny_module()
    trainer = quiet_trainer(devices=2, strategy="ddp_spawn", max_steps=2, callbacks=[CheckRanksAgree()])
    trainer.fit(module, loader([shapes_batch(2, 16, seed=s) for s in range(2)]))
