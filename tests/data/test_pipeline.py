"""The streaming pipeline: shapes, dp/worker splits, equal batches, determinism, bad data."""
from __future__ import annotations

import gc
import hashlib
import io
import json
import logging
import pickle
import tarfile
import warnings

import numpy as np
import pytest
import torch

from mmvae.data.pipeline import ShardDataError, make_loader
from mmvae.data.writer import write_manifest, write_shards

MODS = ["mnist", "svhn"]


def keys_of(loader):
    return [k for batch in loader for k in batch["__key__"]]


def rewrite_member(path, fn):
    """Rewrite a shard, replacing member payloads by fn(name, data) (None drops the member),
    and its manifest entry's size and sha256: bad data written at build time, which only the
    per-sample checks can catch."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for member, data in members:
            data = fn(member.name, data)
            if data is not None:
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    manifest_path = path.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for entry in (e for split in manifest["splits"].values() for e in split["shards"]):
        if entry["file"] == path.name:
            entry.update(bytes=path.stat().st_size, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    manifest_path.write_text(json.dumps(manifest))


def test_batch_shapes_dtypes_ranges_and_exact_pixels(tiny_dir, tiny):
    loader = make_loader(tiny_dir, "train", batch_size=4, modalities=MODS, shuffle=False, return_keys=True)
    batch = next(iter(loader))
    assert set(batch) == {"mnist", "svhn", "label", "__key__"}
    assert batch["mnist"].shape == (4, 1, 28, 28) and batch["mnist"].dtype == torch.float32
    assert batch["svhn"].shape == (4, 3, 32, 32) and batch["svhn"].dtype == torch.float32
    assert batch["label"].shape == (4,) and batch["label"].dtype == torch.int64
    for name in MODS:
        assert 0.0 <= batch[name].min() and batch[name].max() <= 1.0
    index = int(batch["__key__"][1])
    mnist, svhn = tiny.images(index)
    torch.testing.assert_close(batch["mnist"][1], torch.from_numpy(mnist).float() / 255)
    torch.testing.assert_close(batch["svhn"][1], torch.from_numpy(svhn).float() / 255)
    assert batch["label"][1].item() == index % 10
    assert "__key__" not in next(iter(make_loader(tiny_dir, "train", batch_size=4, modalities=["svhn"])))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_eval_single_rank_sees_every_sample_once(tiny_dir, num_workers):
    loader = make_loader(tiny_dir, "test", batch_size=4, modalities=MODS, shuffle=False,
                         drop_last=False, num_workers=num_workers, return_keys=True)
    batches = list(loader)
    keys = [k for b in batches for k in b["__key__"]]
    manifest = json.loads((tiny_dir / "manifest.json").read_text())
    assert len(keys) == len(set(keys)) == manifest["splits"]["test"]["num_samples"] == 18
    assert len(batches) == len(loader)  # 4 workers' worth of partial batches counted exactly
    assert loader.errors == 0


def test_two_dp_ranks_partition_the_split_with_equal_batches(tiny_dir):
    loaders = [make_loader(tiny_dir, "train", batch_size=4, modalities=MODS, dp_rank=r, dp_size=2,
                           seed=5, epoch=1, return_keys=True) for r in range(2)]
    seen = [keys_of(loader) for loader in loaders]
    assert len(loaders[0]) == len(loaders[1]) == 32 // (2 * 4)
    assert len(seen[0]) == len(seen[1]) == 16
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == {f"{i:08d}" for i in range(32)}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_uneven_shards_still_give_every_rank_len_batches(tmp_path, tiny, num_workers):
    tiny.make_shards(tmp_path, {"train": [9, 7, 8, 2, 3]})  # 29 samples, ranks get 14 vs 15
    counts = []
    for rank in range(2):
        loader = make_loader(tmp_path, "train", batch_size=3, modalities=["mnist"], dp_rank=rank,
                             dp_size=2, num_workers=num_workers if rank == 0 else 0)
        batches = list(loader)
        assert all(b["mnist"].shape[0] == 3 for b in batches)
        counts.append(len(batches))
        assert len(loader) == 29 // (2 * 3)
    assert counts == [4, 4]
    # more batches than one pass over a rank's shards: the stream repeats instead of hanging
    loader = make_loader(tmp_path, "train", batch_size=1, modalities=["mnist"], dp_rank=1, dp_size=2)
    assert len(list(loader)) == len(loader) == 14


def test_same_seed_and_epoch_give_the_same_order(tiny_dir):
    def order(**kw):
        return keys_of(make_loader(tiny_dir, "train", batch_size=4, modalities=MODS, shuffle_buffer=16,
                                   return_keys=True, **kw))

    first = order(seed=1, epoch=0)
    assert first == order(seed=1, epoch=0)
    assert first != order(seed=1, epoch=1) and first != order(seed=2, epoch=0)
    assert sorted(first) == sorted(order(seed=1, epoch=0, shuffle=False))
    with_workers = order(seed=1, epoch=3, num_workers=2)
    assert with_workers == order(seed=1, epoch=3, num_workers=2)


def test_set_epoch_reshuffles_and_is_reproducible(tiny_dir):
    loader = make_loader(tiny_dir, "train", batch_size=4, modalities=MODS, return_keys=True)
    epoch0 = keys_of(loader)
    loader.set_epoch(1)
    epoch1 = keys_of(loader)
    loader.set_epoch(0)
    assert keys_of(loader) == epoch0 != epoch1


def test_resampled_gives_a_fixed_number_of_batches(tiny_dir):
    loader = make_loader(tiny_dir, "train", batch_size=4, modalities=MODS, resampled=True,
                         dp_rank=1, dp_size=2, return_keys=True)
    assert len(list(loader)) == len(loader) == 4
    assert keys_of(loader) == keys_of(loader)  # reproducible for a given (seed, epoch)


def test_too_few_shards_for_ranks_times_workers_is_a_clear_error(tiny_dir):
    with pytest.raises(ValueError, match=r"4 shards but dp_size=2 x num_workers=3 = 6 .*fewer workers"):
        make_loader(tiny_dir, "train", batch_size=2, modalities=MODS, dp_size=2, num_workers=3)


@pytest.mark.parametrize("kwargs, match", [
    ({"modalities": ["cub"]}, "unknown modalities"),
    ({"modalities": "mnist"}, "list of key stems"),
    ({"dp_rank": 2, "dp_size": 2}, "dp_rank"),
    ({"on_error": "ignore"}, "on_error"),
    ({"batch_size": 33}, "fewer than one batch"),
])
def test_bad_arguments_raise_value_error(tiny_dir, kwargs, match):
    args = {"batch_size": 4, "modalities": MODS, **kwargs}
    with pytest.raises(ValueError, match=match):
        make_loader(tiny_dir, "train", **args)


def test_missing_split_or_manifest(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="available: train, test"):
        make_loader(tiny_dir, "val", batch_size=4, modalities=MODS)
    with pytest.raises(FileNotFoundError, match="shard_demo.py"):
        make_loader(tmp_path, "train", batch_size=4, modalities=MODS)


def _eval_loader(tiny_dir, **kw):
    return make_loader(tiny_dir, "test", batch_size=4, modalities=MODS, shuffle=False,
                       drop_last=False, return_keys=True, **kw)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_image_is_skipped_counted_or_raised(tiny_dir, caplog, num_workers):
    rewrite_member(tiny_dir / "test-000002.tar", lambda n, d: d[:40] if n == "00000043.svhn.png" else d)
    with caplog.at_level(logging.WARNING, logger="mmvae.data"):
        loader = _eval_loader(tiny_dir, num_workers=num_workers)
        keys = keys_of(loader)
    assert "00000043" not in keys and len(keys) == 17
    assert loader.errors == 1  # counted in the workers, totalled in the main process
    if num_workers == 0:
        assert "test-000002.tar" in caplog.text and "00000043" in caplog.text
    if num_workers == 0:  # (a raise inside a worker works too, but torch then needs ~5 s to
        # shut the worker down: not worth it in a unit test)
        with pytest.raises(ShardDataError, match=r"test-000002\.tar.*00000043.*svhn"):
            keys_of(_eval_loader(tiny_dir, on_error="raise"))


def test_truncated_tar_is_skipped_counted_or_raised(tiny_dir, caplog):
    shard = tiny_dir / "test-000001.tar"
    shard.write_bytes(shard.read_bytes()[:5000])
    with caplog.at_level(logging.WARNING, logger="mmvae.data"):
        loader = _eval_loader(tiny_dir)
        keys = keys_of(loader)
    assert loader.errors >= 1 and "test-000001.tar" in caplog.text
    assert {f"{i:08d}" for i in range(32, 37)} | {f"{i:08d}" for i in range(42, 50)} <= set(keys)
    with pytest.raises(ShardDataError, match=r"test-000001\.tar"):
        keys_of(_eval_loader(tiny_dir, on_error="raise"))


def test_missing_key_is_skipped_counted_or_raised(tiny_dir, caplog):
    rewrite_member(tiny_dir / "test-000003.tar", lambda n, d: None if n == "00000048.mnist.png" else d)
    with caplog.at_level(logging.WARNING, logger="mmvae.data"):
        loader = _eval_loader(tiny_dir)
        keys = keys_of(loader)
    assert "00000048" not in keys and len(keys) == 17 and loader.errors == 1
    assert "missing key(s) mnist" in caplog.text and "00000048" in caplog.text
    # a modality that was not requested may be missing
    assert len(keys_of(make_loader(tiny_dir, "test", batch_size=4, modalities=["svhn"], shuffle=False,
                                   drop_last=False, return_keys=True))) == 18
    with pytest.raises(ShardDataError, match=r"test-000003\.tar.*00000048"):
        keys_of(_eval_loader(tiny_dir, on_error="raise"))


def test_training_raises_instead_of_running_short_when_data_is_all_bad(tmp_path, tiny):
    tiny.make_shards(tmp_path, {"train": [4, 4]})
    for shard in tmp_path.glob("train-*.tar"):
        rewrite_member(shard, lambda n, d: b"garbage" if n.endswith(".png") else d)
    loader = make_loader(tmp_path, "train", batch_size=2, modalities=MODS)
    with pytest.raises(ShardDataError, match="only 0 of its 4 batches"):
        list(loader)


def test_generic_decode_for_cub_like_keys(tmp_path, tiny):
    """jpg (RGB), npy features and json captions decode by extension, like CUB shards."""
    def sample(i):
        rng = np.random.default_rng(i)
        image = rng.integers(0, 256, (3, 8, 8), dtype=np.uint8)
        buf = io.BytesIO()
        from PIL import Image
        Image.fromarray(image.transpose(1, 2, 0)).save(buf, format="JPEG")
        feature = io.BytesIO()
        np.save(feature, rng.standard_normal(5).astype(np.float64))
        return {"__key__": f"{i:04d}", "image.jpg": buf.getvalue(), "feature.npy": feature.getvalue(),
                "caption.json": json.dumps({"tokens": [i, 1, 2]}), "gray.png": tiny.png(image[:1])}

    shards = write_shards((sample(i) for i in range(6)), tmp_path, "train", total=6, max_count=3,
                          progress=False)
    write_manifest(tmp_path, "cubish", {}, {"train": shards},
                   sample_keys=["image.jpg", "feature.npy", "caption.json", "gray.png"])
    batch = next(iter(make_loader(tmp_path, "train", batch_size=3, shuffle=False,
                                  modalities=["image", "feature", "caption", "gray"])))
    assert batch["image"].shape == (3, 3, 8, 8) and batch["image"].dtype == torch.float32
    assert batch["gray"].shape == (3, 1, 8, 8)
    assert batch["feature"].shape == (3, 5) and batch["feature"].dtype == torch.float32
    assert batch["caption"] == [{"tokens": [0, 1, 2]}, {"tokens": [1, 1, 2]}, {"tokens": [2, 1, 2]}]
    assert "label" not in batch


def test_pipeline_is_picklable_for_spawned_workers(tiny_dir):
    loader = make_loader(tiny_dir, "train", batch_size=4, modalities=MODS)
    clone = pickle.loads(pickle.dumps(loader.pipeline))
    assert sum(b["label"].shape[0] for b in clone) == 32
    assert loader.stages[:4] == ("shards", "split_by_dp_group", "split_by_worker", "read")


def test_does_not_read_rank_env_vars(tiny_dir, monkeypatch):
    """A launcher's RANK/WORLD_SIZE must not change which shards a dp rank reads."""
    expected = keys_of(make_loader(tiny_dir, "train", batch_size=4, modalities=MODS, dp_rank=0, dp_size=2,
                                   return_keys=True))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert keys_of(make_loader(tiny_dir, "train", batch_size=4, modalities=MODS, dp_rank=0, dp_size=2,
                               return_keys=True)) == expected


def test_shards_are_closed_after_reading_not_left_to_the_gc(tiny_dir):
    """webdataset's own opener leaves tar files to the garbage collector (ResourceWarning)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        for i, _ in enumerate(_eval_loader(tiny_dir)):
            if i == 1:
                break  # early stop too
        keys_of(_eval_loader(tiny_dir))
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


def test_a_shard_of_bad_samples_counts_each_and_warns_a_few_times(tiny_dir, caplog):
    rewrite_member(tiny_dir / "test-000000.tar",
                   lambda n, d: _small_png() if n.endswith("mnist.png") else d)
    with caplog.at_level(logging.WARNING, logger="mmvae.data"):
        loader = _eval_loader(tiny_dir)
        keys = keys_of(loader)
    assert len(keys) == 13 and loader.errors == 5  # every sample of the 5-sample shard
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4 and "has shape (1, 10, 10), the spec says (1, 28, 28)" in lines[0]
    assert "more bad samples in shard" in lines[3] and "test-000000.tar" in lines[3]


def test_without_a_spec_in_the_manifest_the_first_good_sample_sets_it(tiny_dir):
    rewrite_member(tiny_dir / "test-000001.tar", lambda n, d: _small_png() if n == "00000038.mnist.png" else d)
    manifest = json.loads((tiny_dir / "manifest.json").read_text())
    del manifest["spec"]  # shards built before the spec existed
    (tiny_dir / "manifest.json").write_text(json.dumps(manifest))
    loader = _eval_loader(tiny_dir)
    keys = keys_of(loader)
    assert "00000038" not in keys and len(keys) == 17 and loader.errors == 1


def _small_png():
    buf = io.BytesIO()
    from PIL import Image
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()
