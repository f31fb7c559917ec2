"""Per-channel standardisation of the frozen encoder's features (``model.standardize_text``), layer means,
pooled-only conditioning and ``emf probe``'s recommendation (issue 23)."""

from __future__ import annotations

import json
import zlib
from collections import Counter

import numpy as np
import pytest
import torch
import yaml

from emf_lightning.data.datamodule import ShardDataModule
from emf_lightning.data.pipeline import captions_from_shards
from emf_lightning.encoders import TextFeatures, build_encoder
from emf_lightning.encoders.statistics import channel_statistics, fit_channel_statistics, standardize_tokens
from emf_lightning.inference import MeanFlowGenerator
from emf_lightning.models.connector import TextConnector
from emf_lightning.training import EMFModule
from emf_lightning.utils.model_helpers import masked_mean

from helpers import HashWordEncoder, quiet_trainer, tiny_module, write_shapes_shards

CAPTIONS = ["a red circle", "two blue squares left of a green star", "a small yellow triangle"]


class OffsetEncoder(HashWordEncoder):
    """HashWordEncoder with one channel far from zero and varying at random from caption to caption: the kind of
    dominant channel the probe found in SmolLM2, which drowns the caption's content in every cosine."""

    name = "offset"

    def _encode_batch(self, captions):
        feats, cut = super()._encode_batch(captions)
        noise = torch.stack(
            [
                torch.randn(feats.tokens.shape[1], generator=torch.Generator().manual_seed(zlib.crc32(c.encode())))
                for c in captions
            ]
        )
        tokens = feats.tokens.clone()
        tokens[..., 0] = torch.where(feats.mask, tokens[..., 0] + 100.0 + 30.0 * noise, tokens[..., 0])
        return TextFeatures(tokens, feats.mask, masked_mean(tokens, feats.mask)), cut


def reference_statistics(features: list[TextFeatures]) -> tuple[np.ndarray, np.ndarray]:
    """numpy: mean and population std of every channel over the real tokens only."""
    rows = np.concatenate([f.tokens[f.mask].double().numpy() for f in features])
    return rows.mean(0), rows.std(0)


# ------------------------------------------------------------------------------------------ statistics


def test_channel_statistics_match_numpy_over_real_tokens_only():
    enc = OffsetEncoder(width=8)
    batches = [enc.encode(CAPTIONS[:2]), enc.encode(CAPTIONS[2:])]
    assert not batches[0].mask.all()  # padding is present and must not count
    mean, std = channel_statistics(batches)
    ref_mean, ref_std = reference_statistics(batches)
    np.testing.assert_allclose(mean.numpy(), ref_mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(std.numpy(), ref_std, rtol=1e-4)
    assert mean[0] > 50  # the offset channel


def test_a_constant_channel_is_floored_not_divided_by_zero():
    tokens = torch.randn(2, 5, 4)
    tokens[..., 3] = 7.0
    mean, std = channel_statistics([TextFeatures(tokens, torch.ones(2, 5, dtype=torch.bool), tokens.mean(1))])
    assert mean[3] == pytest.approx(7.0) and std[3] == pytest.approx(1e-2 * float(std[:3].median()), rel=0.5)
    assert torch.isfinite(standardize_tokens(tokens, mean, std)).all()


def test_standardize_tokens_z_scores_and_keeps_zero_tokens_zero():
    mean, std = torch.tensor([1.0, -2.0]), torch.tensor([2.0, 0.5])
    tokens = torch.tensor([[[3.0, -1.0], [0.0, 0.0]]])
    out = standardize_tokens(tokens, mean, std)
    torch.testing.assert_close(out, torch.tensor([[[1.0, 2.0], [0.0, 0.0]]]))


def test_fit_counts_each_caption_once():
    enc = HashWordEncoder(width=8)
    once = fit_channel_statistics(enc.encode, CAPTIONS)
    repeated = fit_channel_statistics(enc.encode, CAPTIONS + CAPTIONS[:1] * 5, batch_size=2)
    torch.testing.assert_close(once, repeated)


# ------------------------------------------------------------------------------------------ connector


def test_connector_without_standardisation_has_no_new_state():
    assert set(TextConnector(8, 16).state_dict()) == {
        "fc1.weight",
        "fc1.bias",
        "fc2.weight",
        "fc2.bias",
        "norm.weight",
    }


def test_connector_standardises_before_its_first_layer():
    torch.manual_seed(0)
    plain, standard = TextConnector(4, 8), TextConnector(4, 8, standardize=True)
    standard.load_state_dict(plain.state_dict(), strict=False)
    mean, std = torch.randn(4), torch.rand(4) + 0.5
    tokens = torch.randn(2, 3, 4)
    torch.testing.assert_close(standard(tokens), plain(tokens))  # identity until fitted
    assert not standard.is_fitted
    standard.set_standardization(mean, std)
    assert standard.is_fitted
    torch.testing.assert_close(standard(tokens), plain((tokens - mean) / std))
    with pytest.raises(ValueError, match="std > 0"):
        standard.set_standardization(mean, torch.zeros(4))
    with pytest.raises(ValueError, match="standardize=False"):
        plain.set_standardization(mean, std)


# ------------------------------------------------------------------------------------------ training, checkpoint, export


@pytest.fixture(scope="module")
def fitted_run(tmp_path_factory):
    """Two optimiser steps of a tiny module with ``standardize_text`` on shapes shards, checkpointed."""
    root = tmp_path_factory.mktemp("std_run")
    urls = write_shapes_shards(root / "shards", n_train=8, n_val=4)
    module = tiny_module(encoder=OffsetEncoder(), standardize_text=True)
    calls = {"train": 0}
    module.generator.connector.register_forward_hook(lambda *_: calls.__setitem__("train", calls["train"] + 1))
    dm = ShardDataModule(train_shards=urls["train"], batch_size=4, num_workers=0, image_size=16, epoch_length=8)
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    ckpt = root / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    return {"module": module, "urls": urls, "ckpt": ckpt, "train_calls": calls["train"], "root": root}


def test_fit_start_fits_the_statistics_on_the_training_captions(fitted_run):
    module = fitted_run["module"]
    captions = list(dict.fromkeys(captions_from_shards(fitted_run["urls"]["train"], Counter())))
    enc = OffsetEncoder()
    ref_mean, ref_std = reference_statistics([enc.encode([c]) for c in captions])
    for net in (module.generator, module.ema_generator):
        assert net.connector.is_fitted
        np.testing.assert_allclose(net.connector.feature_mean.numpy(), ref_mean, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(net.connector.feature_std.numpy(), ref_std, rtol=1e-4)
    assert fitted_run["train_calls"] >= 2  # the training step ran through the standardising connector


def test_training_and_sampling_feed_the_connector_standardised_features(fitted_run):
    module = fitted_run["module"]
    seen = []
    for net in (module.generator, module.ema_generator):
        net.connector.fc1.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    raw = module.encode_text(CAPTIONS)
    module.generate(CAPTIONS, steps=1, seed=0)
    conn = module.ema_generator.connector
    want = standardize_tokens(raw.tokens, conn.feature_mean, conn.feature_std)
    assert torch.equal(seen[-1][: len(CAPTIONS), : want.shape[1]], want)
    # the training loss takes the same path: one step's first layer sees standardised rows, centred near 0
    batch = {"image": torch.zeros(2, 3, 16, 16), "caption": CAPTIONS[:2]}
    module.compute_loss(batch, module.generator, torch.Generator().manual_seed(0), train=True)
    first = seen[-1]
    assert first[..., 0].abs().max() < 20  # the +100 channel would be ~100 without standardisation


def test_checkpoint_and_export_round_trip_give_identical_samples(fitted_run, tmp_path):
    from emf_lightning.commands.export import export

    module = fitted_run["module"]
    reloaded = EMFModule.load_from_checkpoint(fitted_run["ckpt"])
    assert reloaded.hparams.standardize_text is True
    torch.testing.assert_close(reloaded.ema_generator.connector.feature_std, module.ema_generator.connector.feature_std)
    want = module.generate(CAPTIONS, steps=1, seed=3)
    assert torch.equal(reloaded.generate(CAPTIONS, steps=1, seed=3), want)
    out = export(reloaded, tmp_path / "export", global_step=2)
    assert json.loads((out / "config.json").read_text())["standardize_text"] is True
    exported = MeanFlowGenerator.from_pretrained(out)
    assert exported.generator.connector.is_fitted
    assert torch.equal(exported.generate(CAPTIONS, steps=1, seed=3), want)
    # and the statistics matter: identity statistics give other images
    exported.generator.connector.set_standardization(
        torch.zeros(exported.encoder.dim), torch.ones(exported.encoder.dim)
    )
    assert not torch.equal(exported.generate(CAPTIONS, steps=1, seed=3), want)


def test_a_resumed_run_keeps_its_statistics_and_does_not_refit(fitted_run, monkeypatch):
    module = tiny_module(encoder=OffsetEncoder(), standardize_text=True)
    monkeypatch.setattr(module, "fit_text_standardization", lambda captions: pytest.fail("refitted on resume"))
    dm = ShardDataModule(
        train_shards=fitted_run["urls"]["train"], batch_size=4, num_workers=0, image_size=16, epoch_length=8
    )
    trainer = quiet_trainer(max_steps=3, limit_val_batches=0)
    trainer.fit(module, datamodule=dm, ckpt_path=fitted_run["ckpt"])
    saved = fitted_run["module"].generator.connector
    torch.testing.assert_close(module.generator.connector.feature_mean, saved.feature_mean)
    torch.testing.assert_close(module.generator.connector.feature_std, saved.feature_std)


def test_without_training_shards_the_error_says_what_to_do():
    module = tiny_module(standardize_text=True)
    module._trainer = None
    with pytest.raises(Exception, match="fit_text_standardization"):
        module.training_captions()


def test_standardize_text_is_an_architecture_key_under_a_checkpoint():
    from emf_lightning.checkpoint_config import is_structural

    assert is_structural("standardize_text")


# ------------------------------------------------------------------------------------------ every encoder


REGISTRY_TINY = {
    "llm": {"pretrained": False},
    "qwen3": {"pretrained": False},
    "t5": {"pretrained": False},
    "minilm": {"pretrained": False},
    "clip": {"pretrained": False},
    "bow": {"dim": 32},
    "label": {"num_classes": 16, "dim": 32},
}


@pytest.mark.parametrize("name", sorted(REGISTRY_TINY))
def test_every_registry_encoder_trains_and_samples_with_standardisation(name):
    captions = [*CAPTIONS, "a green star above a red square"]
    encoder = build_encoder(name, **REGISTRY_TINY[name])
    mean, std = fit_channel_statistics(encoder.encode, captions * 2)
    module = tiny_module(encoder=encoder, standardize_text=True)
    module.fit_text_standardization(captions)
    torch.testing.assert_close(module.generator.connector.feature_mean, mean)
    torch.testing.assert_close(module.ema_generator.connector.feature_std, std)
    # over the fitting captions' real tokens every channel is centred, and scaled to 1 unless it was floored
    feats = module.encode_text(captions)
    z = module.generator.connector.standardized(feats.tokens)[feats.mask].double()
    torch.testing.assert_close(z.mean(0), torch.zeros_like(z[0]), atol=1e-4, rtol=0)
    scaled = std > 1.5 * 1e-2 * std.median()
    torch.testing.assert_close(z.std(0, unbiased=False)[scaled], torch.ones_like(z[0])[scaled], atol=1e-3, rtol=0)
    batch = {"image": torch.zeros(2, 3, 16, 16), "caption": CAPTIONS[:2]}
    loss, _ = module.compute_loss(batch, module.generator, torch.Generator().manual_seed(0), train=True)
    assert torch.isfinite(loss).all()
    assert module.generate(CAPTIONS, steps=1).shape == (3, 3, 16, 16)


# ------------------------------------------------------------------------------------------ layers, pooled-only


def test_a_list_of_layers_gives_the_mean_of_their_hidden_states():
    one = build_encoder("llm", pretrained=False, layer=1)
    two = build_encoder("llm", pretrained=False, layer=2)
    both = build_encoder("llm", pretrained=False, layer=[1, 2])
    a, b, m = one.encode(CAPTIONS), two.encode(CAPTIONS), both.encode(CAPTIONS)
    torch.testing.assert_close(m.tokens, (a.tokens + b.tokens) / 2)
    assert "layer1:" in one.cache_key + ":"  # an int layer keeps its key (existing feature caches stay valid)
    assert "layermean1+2" in both.cache_key and both.init_args["layer"] == [1, 2]
    with pytest.raises(ValueError, match="out of range"):
        build_encoder("llm", pretrained=False, layer=[1, 9])


def test_a_layer_list_in_a_training_config_passes_the_cli(tmp_path):
    from emf_lightning.commands.probe import EncoderChoice

    spec = {"class_path": "emf_lightning.encoders.LLMEncoder", "init_args": {"pretrained": False, "layer": [0, -1]}}
    assert EncoderChoice(label="x", spec=spec).build().layers == [0, -1]


def test_pooled_only_conditioning_is_one_token_the_pooled_vector():
    from emf_lightning.encoders import PooledTokenEncoder

    inner = HashWordEncoder()
    only = PooledTokenEncoder(inner, keep_tokens=False)
    feats = only.encode(CAPTIONS)
    assert feats.tokens.shape[1] == 1 and feats.mask.all()
    torch.testing.assert_close(feats.tokens[:, 0], inner.encode(CAPTIONS).pooled)
    assert only.cache_key != PooledTokenEncoder(inner).cache_key
    assert "pooled-only" not in PooledTokenEncoder(inner).cache_key


# ------------------------------------------------------------------------------------------ probe


def test_probe_vary_expands_every_combination_into_labelled_specs():
    from emf_lightning.commands.probe import EncoderChoice, expand_variants

    base = [EncoderChoice(label="llm", name="llm", kwargs={"pretrained": False})]
    out = expand_variants(base, ["layer=[1, [1, 2]]", "chat_template=[false, true]"])
    assert [c.label for c in out] == [
        "llm layer=1 chat_template=false",
        "llm layer=1 chat_template=true",
        "llm layer=[1, 2] chat_template=false",
        "llm layer=[1, 2] chat_template=true",
    ]
    assert out[2].config_spec() == {
        "class_path": "emf_lightning.encoders.LLMEncoder",
        "init_args": {"pretrained": False, "layer": [1, 2], "chat_template": False},
    }
    wrapped = EncoderChoice(
        label="n",
        spec={
            "class_path": "emf_lightning.encoders.NormalizedEncoder",
            "init_args": {"encoder": base[0].config_spec()},
        },
    )
    inner = expand_variants([wrapped], ["layer=[2]"])[0].spec["init_args"]["encoder"]["init_args"]
    assert inner["layer"] == 2
    with pytest.raises(SystemExit, match="KEY=\\[v1"):
        expand_variants(base, ["layer=3"])


def test_recommendation_ranks_by_same_scene_auc_not_by_the_context_scores():
    # SmolLM2's case (docs/llm_encoder_2026-12-06.md): layer 8 raw has the best wording P@1 and exact P@k, the last
    # layer standardised the best AUC, and the generator followed the AUC.
    from emf_lightning.commands.probe import recommend

    def row(auc, wording, exact, **extra):
        metrics = {"same_scene_auc": auc, "wording/retrieval_at_1": wording, "retrieval/exact_precision_at_k": exact}
        return {"metrics": metrics, "spec": {"class_path": "x", "init_args": {}}, **extra}

    results = {
        "llm layer=8": row(0.738, 0.426, 0.347),
        "llm layer=-1 +std": row(0.860, 0.055, 0.300, standardized=True),
        "llm layer=-1": row(0.669, 0.077, 0.289),
        "no auc": {"metrics": {"same_scene_auc": float("nan")}, "spec": {}},
    }
    best = recommend(results)
    assert best["label"] == "llm layer=-1 +std" and best["score"] == 0.860
    assert best["config"]["model"]["standardize_text"] is True
    assert recommend({"no auc": results["no auc"]}) is None


def test_probe_recommends_standardisation_for_an_anisotropic_encoder(tmp_path, monkeypatch, capsys):
    """The probe's standardised row must beat the raw one for an encoder dominated by one channel, and the
    printed config lines must build the module it recommends."""
    import emf_lightning.encoders as encoders
    from emf_lightning.commands import probe

    monkeypatch.setitem(encoders.ENCODERS, "offset", OffsetEncoder)
    rc = probe.main(
        ["--encoder", "offset", "--n", "80", "--pairs", "20", "--recommend", "--no-figure", "--out", str(tmp_path)]
    )
    assert rc in (0, None)
    report = json.loads((tmp_path / "probe.json").read_text())
    raw, std = report["encoders"]["offset"]["metrics"], report["encoders"]["offset +std"]["metrics"]
    assert std["same_scene_auc"] > raw["same_scene_auc"]
    assert std["anisotropy/pooled"] < raw["anisotropy/pooled"]
    best = report["recommendation"]
    assert best["label"] == "offset +std"
    assert best["keys"] == ["same_scene_auc"] and best["score"] == std["same_scene_auc"]
    out = capsys.readouterr().out
    pasted = yaml.safe_load(out[out.index("model:") : out.index("\nwrote ")])
    assert pasted == best["config"] and pasted["model"]["standardize_text"] is True
    module = EMFModule(
        encoder=pasted["model"]["encoder"],
        backbone=tiny_module().hparams.backbone,
        standardize_text=pasted["model"]["standardize_text"],
    )
    assert module.generator.connector.standardize
