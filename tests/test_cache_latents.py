"""`emf cache-latents` on real shapes-world shards with a tiny random VAE, and the data module reading the result."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from emf_lightning.commands.cache_latents import main
from emf_lightning.data.datamodule import ShardDataModule
from emf_lightning.data.pipeline import MissingLatentsError, expand_shard_urls
from emf_lightning.data.shards import ShardSample, read_manifest, write_shards
from emf_lightning.data.transforms import open_rgb, resize_center_crop
from emf_lightning.errors import ConfigError
from emf_lightning.shapes import ShapesWorld
from emf_lightning.utils.images import from_uint8

pytest.importorskip("diffusers")

VAE = ["--vae", "sd-vae", "--vae-arg", "pretrained=false"]  # tiny random AutoencoderKL (seed 0): f2, 4 channels


def _members(path: str | Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


@pytest.fixture()
def source(tmp_path: Path) -> str:
    """Two shards of 3 shapes samples at 40 px (so the 32 px crop resizes), one with an undecodable image."""
    world = ShapesWorld(seed=0, resolution=40, split="train", size=6)
    samples = [
        ShardSample(key=s.key, image=s.image, caption=s.caption, captions=s.captions, meta=s.spec)
        for s in (world[i] for i in range(6))
    ]
    samples[4] = ShardSample(key=samples[4].key, image=b"not a png at all", caption="a broken image")
    return write_shards(samples, str(tmp_path / "src" / "train-%06d.tar"), maxcount=3).urls


def _run(source: str, out: Path, *extra: str) -> int:
    return main(
        [
            *VAE,
            "--shards",
            source,
            "--out",
            str(out / "train-%06d.tar"),
            "--image-size",
            "32",
            "--batch-size",
            "2",
            "--device",
            "cpu",
            *extra,
        ]
    )


def test_latents_equal_direct_encoding_and_every_file_is_kept(tmp_path, source, capsys):
    from emf_lightning.autoencoders import build_autoencoder

    out = tmp_path / "lat"
    assert _run(source, out, "--flip") == 0
    printed = capsys.readouterr().out
    assert "skipped      1 samples: undecodable_image" in printed
    ae = build_autoencoder("sd-vae", pretrained=False)
    inputs = expand_shard_urls(source)
    outputs = sorted(out.glob("train-*.tar"))
    assert [p.name for p in outputs] == ["train-000000.tar", "train-000001.tar"]
    kept = 0
    for src, dst in zip(inputs, outputs):
        original, written = _members(src), _members(dst)
        keys = {name.split(".", 1)[0] for name in original}
        for key in sorted(keys):
            if original[f"{key}.txt"] == b"a broken image":
                assert not any(n.startswith(key + ".") for n in written)  # skipped as the training loader would
                continue
            kept += 1
            for name, data in original.items():  # every original file, byte for byte
                if name.startswith(key + "."):
                    assert written[name] == data
            latent = np.load(io.BytesIO(written[f"{key}.latent.npy"]))
            flipped = np.load(io.BytesIO(written[f"{key}.latent_flip.npy"]))
            assert latent.dtype == np.float16 and latent.shape == (4, 16, 16)
            image = from_uint8(np.array(resize_center_crop(open_rgb(original[f"{key}.png"]), 32)))[None]
            # the same preprocessed image encoded on its own; float32 batch noise is far below float16 steps
            torch.testing.assert_close(
                torch.from_numpy(latent).float(), ae.encode(image)[0].half().float(), rtol=2e-3, atol=2e-3
            )
            torch.testing.assert_close(
                torch.from_numpy(flipped).float(), ae.encode(image.flip(-1))[0].half().float(), rtol=2e-3, atol=2e-3
            )
    assert kept == 5
    manifest = read_manifest(str(out / "train-%06d.tar"))
    assert manifest["complete"] and manifest["total"] == 5 and manifest["skipped"] == {"undecodable_image": 1}
    assert manifest["latent"]["cache_key"] == ae.cache_key and manifest["latent"]["shape"] == [4, 16, 16]
    assert manifest["urls"] == str(out / "train-{000000..000001}.tar")


def test_data_module_reads_the_written_latents(tmp_path, source):
    out = tmp_path / "lat"
    _run(source, out)
    urls = read_manifest(str(out / "train-%06d.tar"))["urls"]
    dm = ShardDataModule(val_shards=urls, batch_size=8, num_workers=0, image_size=32, load_latents=True)
    dm.setup("validate")
    (batch,) = list(dm.val_dataloader())
    assert batch["latent"].shape == (5, 4, 16, 16) and batch["latent"].dtype == torch.float32
    first = _members(out / "train-000000.tar")[f"{batch['key'][0]}.latent.npy"]
    assert torch.equal(batch["latent"][0], torch.from_numpy(np.load(io.BytesIO(first))).float())


def test_shards_without_latents_are_a_clear_error(source):
    dm = ShardDataModule(val_shards=source, batch_size=8, num_workers=0, image_size=32, load_latents=True)
    dm.setup("validate")
    with pytest.raises(MissingLatentsError, match=r"no precomputed latent .* `emf cache-latents --vae"):
        list(dm.val_dataloader())


def test_a_rerun_skips_finished_shards(tmp_path, source, capsys):
    out = tmp_path / "lat"
    _run(source, out)
    first = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    capsys.readouterr()
    assert _run(source, out) == 0
    printed = capsys.readouterr().out
    assert "2 already done" in printed and "wrote        0 shard(s); 5 samples" in printed
    assert "skipped      1 samples: undecodable_image" in printed  # counts of finished shards are kept
    (out / "train-000001.tar").unlink()  # e.g. a run killed during shard 1 (which is renamed only when complete)
    assert _run(source, out) == 0
    assert "wrote        1 shard(s); 5 samples" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == first  # same bytes again
    with pytest.raises(ConfigError, match="different settings"):
        _run(source, out, "--flip")


def test_an_unreadable_shard_is_counted_and_retried(tmp_path, source, capsys):
    first = expand_shard_urls(source)[0]
    missing = tmp_path / "not-yet.tar"
    shards = f"{first}::pipe:cat {missing}"  # e.g. a network shard that failed this time
    assert _run(shards, tmp_path / "lat") == 0
    assert "skipped      1 shards: unreadable_shard" in capsys.readouterr().out
    missing.write_bytes(Path(expand_shard_urls(source)[1]).read_bytes())  # it is there now
    assert _run(shards, tmp_path / "lat") == 0
    printed = capsys.readouterr().out
    assert "1 already done" in printed and "wrote        1 shard(s); 5 samples" in printed


def test_missing_vae_weights_exit_with_the_message(tmp_path, source, capsys):
    from emf_lightning import cli

    args = ["--vae", "sd-vae", "--shards", source, "--out", str(tmp_path / "x-%06d.tar"), "--device", "cpu"]
    assert cli.main(["cache-latents", *args]) == 2
    assert "stabilityai/sd-vae-ft-ema" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="needs an integer field"):
        main([*VAE, "--shards", source, "--out", str(tmp_path / "x.tar")])


def test_cli_lists_the_command():
    from emf_lightning import cli

    assert "cache-latents" in cli.EXTRA_COMMANDS
    assert cli.command_module_name("cache-latents") == "emf_lightning.commands.cache_latents"
