"""Shards split by node and by worker: nothing dropped or duplicated in an ordered pass; the resampled
training stream yields exactly epoch_length samples per epoch, summed over ranks (issue 7, section 4)."""

from __future__ import annotations

import io
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import webdataset as wds
from PIL import Image

from emf_lightning.data.datamodule import ShardDataModule
from emf_lightning.data.pipeline import split_shards, worker_share

SHARD_SIZES = (3, 1, 4, 2, 5, 3, 2)  # uneven on purpose: 20 samples in 7 shards


def _png(v: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), v, np.uint8)).save(out, format="PNG")
    return out.getvalue()


def write_uneven_shards(root: Path) -> tuple[str, list[str]]:
    """Seven shards of different sizes; returns (brace URL, every key)."""
    keys = []
    for s, n in enumerate(SHARD_SIZES):
        with wds.TarWriter(str(root / f"part-{s}.tar"), mtime=0, encoder=False) as w:
            for i in range(n):
                key = f"s{s}_{i}"
                keys.append(key)
                w.write({"__key__": key, "png": _png(10 * s + i), "txt": f"caption {key}".encode()})
    return str(root / "part-{0..6}.tar"), keys


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[str, list[str]]:
    return write_uneven_shards(tmp_path_factory.mktemp("split"))


def test_split_shards_by_node_then_worker_by_hand():
    urls = [f"u{i}" for i in range(7)]
    assert split_shards(urls, 0, 2, 0, 2) == ["u0", "u4"]
    assert split_shards(urls, 0, 2, 1, 2) == ["u2", "u6"]
    assert split_shards(urls, 1, 2, 0, 2) == ["u1", "u5"]
    assert split_shards(urls, 1, 2, 1, 2) == ["u3"]
    with pytest.raises(ValueError, match="invalid split"):
        split_shards(urls, 2, 2, 0, 1)


@pytest.mark.parametrize("n_shards", [1, 5, 8, 13])
@pytest.mark.parametrize("world, workers", [(1, 1), (2, 2), (3, 2), (4, 3)])
def test_split_shards_is_a_partition(n_shards, world, workers):
    urls = [f"u{i}" for i in range(n_shards)]
    parts = [split_shards(urls, r, world, w, workers) for r in range(world) for w in range(workers)]
    assert sorted(u for p in parts for u in p) == sorted(urls)  # each shard exactly once


def test_worker_share_splits_exactly():
    for total in (0, 1, 7, 10, 11):
        for workers in (1, 2, 3, 4):
            shares = [worker_share(total, w, workers) for w in range(workers)]
            assert sum(shares) == total and max(shares) - min(shares) <= 1


def _rank_keys(urls: str, rank: int, world: int, monkeypatch, num_workers: int) -> list[str]:
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    dm = ShardDataModule(val_shards=urls, batch_size=2, num_workers=num_workers, image_size=4)
    dm.setup("validate")
    return [k for b in dm.val_dataloader() for k in b["key"]]


def test_ordered_pass_over_two_ranks_and_two_workers_loses_and_repeats_nothing(shards, monkeypatch):
    urls, keys = shards
    per_rank = [_rank_keys(urls, r, 2, monkeypatch, num_workers=2) for r in range(2)]
    assert Counter(per_rank[0] + per_rank[1]) == Counter(keys)  # every sample exactly once
    # rank 0 reads shards 0, 2, 4, 6 and rank 1 shards 1, 3, 5
    assert {k.split("_")[0] for k in per_rank[0]} == {"s0", "s2", "s4", "s6"}
    assert {k.split("_")[0] for k in per_rank[1]} == {"s1", "s3", "s5"}
    # deterministic: the same split gives the same order
    assert _rank_keys(urls, 1, 2, monkeypatch, num_workers=2) == per_rank[1]


def test_ordered_pass_single_process_is_file_order(shards, monkeypatch):
    urls, keys = shards
    assert _rank_keys(urls, 0, 1, monkeypatch, num_workers=0) == keys


def _train_loader(urls: str, rank: int, world: int, monkeypatch, epoch_length: int, num_workers: int):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    dm = ShardDataModule(
        train_shards=urls,
        batch_size=2,
        num_workers=num_workers,
        image_size=4,
        epoch_length=epoch_length,
        shuffle_buffer=8,
        seed=3,
    )
    dm.setup("fit")
    return dm.train_dataloader()


def test_resampled_stream_yields_exactly_epoch_length_per_epoch(shards, monkeypatch):
    urls, keys = shards
    loaders = [_train_loader(urls, r, 2, monkeypatch, epoch_length=14, num_workers=2) for r in range(2)]
    for loader in loaders:
        # 7 samples per rank: worker shares 4 and 3 -> batches 2+2 (last of each worker partial)
        assert len(loader) == 4
        for _ in range(2):  # two epochs
            batches = list(loader)
            assert len(batches) == 4
            assert sum(len(b["key"]) for b in batches) == 7
            assert set(k for b in batches for k in b["key"]) <= set(keys)
    # ranks draw different streams (seeded by rank)
    epoch_keys = [[k for b in loader for k in b["key"]] for loader in loaders]
    assert epoch_keys[0] != epoch_keys[1]


# ---------------------------------------------------------------------------------------------- two processes


def _ddp_worker(rank: int, world: int, init_file: str, urls: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # forked from a process that may have started intra-op threads
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        dm = ShardDataModule(
            train_shards=urls,
            val_shards=urls,
            batch_size=2,
            num_workers=2,
            image_size=4,
            epoch_length=10,
            shuffle_buffer=4,
        )
        dm.setup("fit")  # rank and world size come from torch.distributed
        val_keys = [k for b in dm.val_dataloader() for k in b["key"]]
        train_counts = [sum(len(b["key"]) for b in dm.train_dataloader()) for _ in range(2)]
        gathered: list = [None] * world
        dist.all_gather_object(gathered, {"val": val_keys, "train": train_counts, "rank": dm.rank})
        if rank == 0:
            torch.save(gathered, os.path.join(out_dir, "result.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_split_shards_without_loss(shards, tmp_path):
    urls, keys = shards
    # fork, not spawn: the ranks and their DataLoader workers then need no fresh Python imports (seconds each)
    mp.start_processes(
        _ddp_worker, args=(2, str(tmp_path / "init"), urls, str(tmp_path)), nprocs=2, join=True, start_method="fork"
    )
    gathered = torch.load(tmp_path / "result.pt")
    assert [g["rank"] for g in gathered] == [0, 1]
    assert Counter(gathered[0]["val"] + gathered[1]["val"]) == Counter(keys)
    assert [g["train"] for g in gathered] == [[5, 5], [5, 5]]  # epoch_length 10 over 2 ranks, every epoch
