"""Shard writers (shapes world, image folder, JSONL/CSV), the manifest, the CLI, and the tar reader's damage handling."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from emf_lightning.commands.shards import main as shards_main
from emf_lightning.commands.shards import parse_mix
from emf_lightning.data.health import EMPTY_CAPTION, MISSING_IMAGE, UNDECODABLE_IMAGE, SkipCounter
from emf_lightning.data.shards import (
    ShardSample,
    attach_features,
    brace_url,
    manifest_path,
    read_manifest,
    sanitize_key,
    write_shards,
)
from emf_lightning.data.sources import BAD_ROW, folder_samples, list_samples
from emf_lightning.data.tar_reader import iter_shard_samples, iter_tar_members, split_key
from emf_lightning.shapes import ShapesWorld, shapes_samples


def _world(n: int = 10, res: int = 16, split: str = "train") -> ShapesWorld:
    return ShapesWorld(seed=3, resolution=res, split=split, size=n)


def _png_bytes(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


# ------------------------------------------------------------------------------------------------- naming


def test_brace_url_and_manifest_path():
    assert brace_url("a/train-%06d.tar", 10) == "a/train-{000000..000009}.tar"
    assert brace_url("x-%d.tar", 3) == "x-{0..2}.tar"
    assert brace_url("x-%04d.tar", 1) == "x-0000.tar"
    assert list(wds.shardlists.expand_urls(brace_url("t-%03d.tar", 12)))[-1] == "t-011.tar"
    assert manifest_path("out/train-%06d.tar") == Path("out/train.manifest.json")
    assert manifest_path("out/%06d.tar") == Path("out/manifest.json")


def test_sanitize_key_removes_dots_that_would_split_the_sample():
    assert sanitize_key("img.001") == "img_001"
    assert sanitize_key("dir.v2/photo.final") == "dir.v2/photo_final"
    assert split_key(sanitize_key("a.b.c") + ".png") == ("a_b_c", "png")
    assert sanitize_key("__meta__") == "k__meta__"
    with pytest.raises(ValueError, match="invalid sample key"):
        sanitize_key("/./")


# ------------------------------------------------------------------------------------------------- shapes


def test_shapes_shards_roundtrip_with_tar_tarfile_and_webdataset(tmp_path):
    world = _world(10)
    result = write_shards(
        shapes_samples(world), str(tmp_path / "train-%06d.tar"), maxcount=4, source={"kind": "shapes", "seed": 3}
    )
    assert [s["count"] for s in result.shards] == [4, 4, 2]
    assert result.total == 10
    manifest = read_manifest(tmp_path / "train-%06d.tar")
    assert manifest["urls"] == str(tmp_path / "train-{000000..000002}.tar")
    assert manifest["source"] == {"kind": "shapes", "seed": 3}
    assert manifest["total"] == 10 and manifest["format"].startswith("emf-lightning-shards/")

    listing = subprocess.run(
        ["tar", "-tf", str(tmp_path / "train-000000.tar")], capture_output=True, text=True, check=True
    ).stdout.split()
    keys = [world[i].key for i in range(4)]
    assert listing == [f"{k}.{ext}" for k in keys for ext in ("json", "png", "txt")]

    with tarfile.open(tmp_path / "train-000002.tar") as tf:
        assert tf.getnames() == [f"{world[i].key}.{ext}" for i in (8, 9) for ext in ("json", "png", "txt")]
        assert tf.extractfile(f"{world[8].key}.txt").read().decode() == world[8].caption

    ds = wds.WebDataset(manifest["urls"], shardshuffle=False).decode("rgb8")
    got = list(ds)
    assert [s["__key__"] for s in got] == [world[i].key for i in range(10)]
    for i, s in enumerate(got):
        ref = world[i]
        np.testing.assert_array_equal(s["png"], ref.image)  # PNG is lossless
        assert s["txt"] == ref.caption
        assert s["json"]["captions"] == ref.captions
        assert {k: v for k, v in s["json"].items() if k != "captions"} == json.loads(json.dumps(ref.spec))


def test_same_samples_give_byte_identical_shards(tmp_path):
    a = write_shards(shapes_samples(_world(5)), str(tmp_path / "a-%06d.tar"), maxcount=10)
    b = write_shards(shapes_samples(_world(5)), str(tmp_path / "b-%06d.tar"), maxcount=10)
    assert a.total == b.total == 5
    assert (tmp_path / "a-000000.tar").read_bytes() == (tmp_path / "b-000000.tar").read_bytes()


def test_writer_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="needs an integer field such as %06d"):
        write_shards(shapes_samples(_world(2)), str(tmp_path / "train.tar"))
    with pytest.raises(ValueError, match="no samples to write"):
        write_shards(iter(()), str(tmp_path / "t-%06d.tar"))
    dup = [ShardSample(key="same", image=np.zeros((4, 4, 3), np.uint8), caption="x") for _ in range(2)]
    with pytest.raises(ValueError, match="duplicate sample key 'same'"):
        write_shards(dup, str(tmp_path / "d-%06d.tar"))
    with pytest.raises(ValueError, match="empty caption"):
        write_shards(
            [ShardSample(key="k", image=np.zeros((4, 4, 3), np.uint8), caption="  ")], str(tmp_path / "e-%06d.tar")
        )
    assert not manifest_path(str(tmp_path / "d-%06d.tar")).exists()  # no manifest for a failed write


# ------------------------------------------------------------------------------------------------- folder / list


def _make_folder(root: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {name: rng.integers(0, 256, (6, 8, 3), dtype=np.uint8) for name in ("a", "b", "c", "d")}
    (root / "sub").mkdir(parents=True)
    Image.fromarray(arrays["a"]).save(root / "a.png")
    (root / "a.txt").write_text("a red thing\n\nthe red thing\n")  # two captions, blank line ignored
    Image.fromarray(arrays["b"]).save(root / "sub" / "b.v1.jpg", quality=90)
    (root / "sub" / "b.v1.txt").write_text("a photo")
    Image.fromarray(arrays["c"]).save(root / "c.bmp")  # re-encoded to PNG
    (root / "c.txt").write_text("bitmap")
    Image.fromarray(arrays["d"]).save(root / "d.png")  # no caption file -> skipped
    (root / "e.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # undecodable -> skipped
    (root / "e.txt").write_text("broken")
    return arrays


def test_folder_source_keeps_files_skips_bad_ones_and_counts(tmp_path):
    arrays = _make_folder(tmp_path / "imgs")
    counter = SkipCounter("test")
    result = write_shards(
        folder_samples(tmp_path / "imgs", counter), str(tmp_path / "out/f-%06d.tar"), skipped=counter.drain
    )
    assert result.skipped == {EMPTY_CAPTION: 1, UNDECODABLE_IMAGE: 1}
    samples = {s["__key__"]: s for s in wds.WebDataset(result.urls, shardshuffle=False)}
    assert sorted(samples) == ["a", "c", "sub/b_v1"]
    # the JPEG is stored byte for byte, no re-encoding
    assert samples["sub/b_v1"]["jpg"] == (tmp_path / "imgs/sub/b.v1.jpg").read_bytes()
    np.testing.assert_array_equal(np.array(Image.open(io.BytesIO(samples["c"]["png"]))), arrays["c"])
    assert samples["a"]["txt"].decode() == "a red thing"
    assert json.loads(samples["a"]["json"])["captions"] == ["a red thing", "the red thing"]
    assert "json" not in samples["c"]


def test_folder_source_resizes_and_crops_when_asked(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    img = np.zeros((4, 8, 3), np.uint8)
    img[:, 2:6] = 255  # the centre 4 columns are white: after a centre crop of the 4x8 image, all white
    Image.fromarray(img).save(root / "w.png")
    (root / "w.txt").write_text("white")
    sample = next(folder_samples(root, SkipCounter(), image_size=4))
    assert sample.image_format == "png"
    np.testing.assert_array_equal(np.array(Image.open(io.BytesIO(sample.image))), np.full((4, 4, 3), 255, np.uint8))


def test_folder_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        next(folder_samples(tmp_path / "nope", SkipCounter()))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        next(folder_samples(tmp_path / "empty", SkipCounter()))


def test_jsonl_and_csv_sources(tmp_path):
    arr = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    Image.fromarray(arr).save(tmp_path / "x.png")
    lines = [
        json.dumps({"image": "x.png", "caption": ["first caption", "second"], "id": "row.a", "score": 0.5}),
        "{not json",
        json.dumps({"image": "missing.png", "caption": "gone"}),
        json.dumps({"caption": "no image field"}),
        json.dumps({"image": "x.png", "caption": ""}),
        json.dumps({"image": "x.png", "caption": "plain"}),
    ]
    (tmp_path / "list.jsonl").write_text("\n".join(lines) + "\n")
    counter = SkipCounter()
    samples = list(list_samples(tmp_path / "list.jsonl", counter))
    assert counter.drain() == {BAD_ROW: 2, MISSING_IMAGE: 1, EMPTY_CAPTION: 1}
    assert [s.key for s in samples] == ["row_a", "000000006"]
    assert samples[0].caption == "first caption" and samples[0].captions == ["first caption", "second"]
    assert samples[0].meta == {"score": 0.5}
    assert samples[0].image == (tmp_path / "x.png").read_bytes()

    (tmp_path / "imgs").mkdir()
    Image.fromarray(arr).save(tmp_path / "imgs" / "y.png")
    (tmp_path / "list.csv").write_text("path,text,source\ny.png,a csv caption,web\n")
    rows = list(
        list_samples(tmp_path / "list.csv", counter, root=tmp_path / "imgs", image_field="path", caption_field="text")
    )
    assert [(r.key, r.caption, r.meta) for r in rows] == [("000000001", "a csv caption", {"source": "web"})]
    with pytest.raises(ValueError, match="unsupported list file"):
        next(list_samples(tmp_path / "x.png", counter))


# ------------------------------------------------------------------------------------------------- features


def test_attach_features_stores_only_real_tokens(tmp_path):
    def encode(captions):
        n = len(captions)
        lengths = [len(c.split()) for c in captions]
        tokens = torch.arange(n * 5 * 2, dtype=torch.float32).reshape(n, 5, 2)
        mask = torch.tensor([[j < L for j in range(5)] for L in lengths])
        tokens = tokens * mask[..., None]
        return SimpleNamespace(tokens=tokens, mask=mask, pooled=tokens.sum(1))

    samples = [
        ShardSample(key=f"k{i}", image=np.zeros((2, 2, 3), np.uint8), caption=" ".join(["w"] * (i + 1)))
        for i in range(3)
    ]
    out = list(attach_features(samples, encode, batch_size=2))
    assert [s.features["tokens"].shape for s in out] == [(1, 2), (2, 2), (3, 2)]  # one token per word
    np.testing.assert_array_equal(out[1].features["tokens"], [[10.0, 11.0], [12.0, 13.0]])
    result = write_shards(out, str(tmp_path / "f-%06d.tar"))
    with tarfile.open(tmp_path / "f-000000.tar") as tf:
        z = np.load(io.BytesIO(tf.extractfile("k1.features.npz").read()))
        np.testing.assert_array_equal(z["tokens"], out[1].features["tokens"])
        np.testing.assert_array_equal(z["pooled"], [22.0, 24.0])
    assert result.total == 3


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_shapes_folder_list_and_check(tmp_path, capsys):
    assert (
        shards_main(
            [
                "shapes",
                "--out",
                str(tmp_path / "s/train-%06d.tar"),
                "--n",
                "5",
                "--resolution",
                "16",
                "--seed",
                "1",
                "--maxcount",
                "2",
                "--mix",
                "colors=1,position=2",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "wrote 5 samples in 3 shard(s)" in out and str(tmp_path / "s/train-{000000..000002}.tar") in out
    manifest = read_manifest(tmp_path / "s/train.manifest.json")
    assert manifest["source"]["mix"] == {"colors": 1.0, "position": 2.0} and manifest["source"]["seed"] == 1
    world = ShapesWorld(seed=1, resolution=16, split="train", mix={"colors": 1, "position": 2}, size=5)
    first = next(iter(wds.WebDataset(manifest["urls"], shardshuffle=False)))
    assert first["txt"].decode() == world[0].caption

    _make_folder(tmp_path / "imgs")
    assert shards_main(["folder", str(tmp_path / "imgs"), "--out", str(tmp_path / "f/f-%06d.tar")]) == 0
    assert "skipped: empty_caption=1, undecodable_image=1" in capsys.readouterr().out
    assert read_manifest(tmp_path / "f/f.manifest.json")["skipped"] == {EMPTY_CAPTION: 1, UNDECODABLE_IMAGE: 1}

    (tmp_path / "l.jsonl").write_text(json.dumps({"img": "imgs/a.png", "text": "hello"}) + "\n")
    assert (
        shards_main(
            [
                "list",
                str(tmp_path / "l.jsonl"),
                "--out",
                str(tmp_path / "l/l-%06d.tar"),
                "--image-field",
                "img",
                "--caption-field",
                "text",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert shards_main(["shapes", "--out", str(tmp_path / "s"), "--split", "val", "--n", "2"]) == 0  # a folder
    assert capsys.readouterr().out.split()[-1] == str(tmp_path / "s/val-000000.tar")
    assert shards_main(["check", str(tmp_path / "s/train-{000000..000002}.tar")]) == 0
    assert capsys.readouterr().out.strip() == "check: 5 samples, nothing skipped"
    assert shards_main(["list", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "x-%06d.tar")]) == 2
    assert "list file" in capsys.readouterr().err


def test_parse_mix():
    assert parse_mix("colors=2, position=1") == {"colors": 2.0, "position": 1.0}
    assert parse_mix('{"colors": 3}') == {"colors": 3.0}
    assert parse_mix("") is None
    with pytest.raises(Exception, match="name=weight"):
        parse_mix("colors")


# ------------------------------------------------------------------------------------------------- tar damage


def _tar_bytes(n: int = 4) -> tuple[bytes, list[tarfile.TarInfo]]:
    buf = io.BytesIO()
    with wds.TarWriter(buf, mtime=0, encoder=False) as w:
        for i in range(n):
            w.write({"__key__": f"s{i}", "txt": f"caption {i}".encode(), "bin": bytes([i + 1]) * 700})
    raw = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        return raw, tf.getmembers()


def _read(data: bytes) -> tuple[list[str], list[str]]:
    damage: list[str] = []
    names = [name for name, _ in iter_tar_members(io.BytesIO(data), damage.append)]
    return names, damage


ALL8 = [f"s{i}.{e}" for i in range(4) for e in ("bin", "txt")]


def test_tar_reader_clean_plain_and_gzip():
    raw, _ = _tar_bytes()
    assert _read(raw) == (ALL8, [])
    assert _read(gzip.compress(raw)) == (ALL8, [])


def test_tar_reader_resyncs_after_a_damaged_header():
    raw, members = _tar_bytes()
    bad = bytearray(raw)
    off = members[3].offset  # header of s1.txt
    bad[off : off + 100] = b"x" * 100
    names, damage = _read(bytes(bad))
    assert names == [n for n in ALL8 if n != "s1.txt"]  # only the damaged member is lost
    assert damage == ["damaged bytes between members; reading resumed at the next header"]
    # tarfile itself silently stops at the damage, losing every later member
    with tarfile.open(fileobj=io.BytesIO(bytes(bad)), mode="r|") as tf:
        assert [m.name for m in tf] == ALL8[:3]


@pytest.mark.parametrize(
    "cut, expected, message",
    [
        ("mid_data", 4, "unexpected end of data"),
        ("boundary", 4, "without an end-of-archive marker"),
        ("mid_header", 4, "inside a tar header"),
    ],
)
def test_tar_reader_truncation_keeps_complete_members(cut, expected, message):
    raw, members = _tar_bytes()
    at = {
        "mid_data": members[4].offset_data + 100,
        "boundary": members[4].offset,
        "mid_header": members[4].offset + 200,
    }[cut]
    names, damage = _read(raw[:at])
    assert names == ALL8[:expected]
    assert len(damage) == 1 and message in damage[0]


def test_tar_reader_empty_and_garbage():
    assert _read(b"") == ([], ["empty file"])
    assert _read(b"not a tar" * 100) == ([], ["no valid tar header at the start"])


def test_shard_samples_count_unreadable_and_corrupt_shards(tmp_path):
    raw, members = _tar_bytes()
    (tmp_path / "cut.tar").write_bytes(raw[: members[5].offset_data + 3])  # inside s2.txt
    counter = SkipCounter()
    got = list(iter_shard_samples(str(tmp_path / "cut.tar"), counter))
    assert [g["__key__"] for g in got] == ["s0", "s1", "s2"]
    assert set(got[2]) == {"__key__", "__url__", "bin"}  # s2 lost its .txt to the cut; the decoder judges it
    assert counter.drain() == {"corrupt_shard": 1}
    assert list(iter_shard_samples(str(tmp_path / "missing.tar"), counter)) == []
    assert counter.drain() == {"unreadable_shard": 1}


def test_cli_stores_encoder_features_that_the_datamodule_returns(tmp_path, capsys):
    from emf_lightning.data.datamodule import ShardDataModule
    from emf_lightning.encoders import build_encoder

    assert (
        shards_main(
            [
                "shapes",
                "--out",
                str(tmp_path / "t-%06d.tar"),
                "--n",
                "3",
                "--resolution",
                "8",
                "--encoder",
                "bow",
                "--features-batch-size",
                "2",
            ]
        )
        == 0
    )
    urls = capsys.readouterr().out.split()[-1]
    manifest = read_manifest(tmp_path / "t.manifest.json")
    encoder = build_encoder("bow")
    assert manifest["features"]["cache_key"] == encoder.cache_key and manifest["features"]["dim"] == encoder.dim
    dm = ShardDataModule(val_shards=urls, batch_size=3, num_workers=0, image_size=8, load_features=True)
    dm.setup("validate")
    (batch,) = list(dm.val_dataloader())
    ref = encoder.encode(batch["caption"])  # same captions, encoded now, padded to the batch's longest
    got = batch["features"]
    assert torch.equal(got["mask"], ref.mask)
    assert torch.allclose(got["tokens"], ref.tokens) and torch.allclose(got["pooled"], ref.pooled)
