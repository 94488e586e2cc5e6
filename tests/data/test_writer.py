"""Shard writer, manifest and `python -m mmvae.data verify`."""
from __future__ import annotations

import hashlib
import json
import tarfile

import pytest

from mmvae.data.__main__ import main as data_main
from mmvae.data.writer import read_manifest, write_manifest, write_shards


@pytest.fixture
def samples(tiny):
    return lambda n, start=0: [tiny.sample(start + i) for i in range(n)]


def _keys_in(path):
    with tarfile.open(path) as tar:
        return sorted({m.name.split(".", 1)[0] for m in tar.getmembers()})


def test_rolls_over_by_count_and_reports_true_sha256(tmp_path, samples):
    shards = write_shards(samples(10), tmp_path, "train", total=10, max_count=4, progress=False)
    assert [s["file"] for s in shards] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert [s["count"] for s in shards] == [4, 4, 2]
    for shard in shards:
        path = tmp_path / shard["file"]
        assert shard["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert len(_keys_in(path)) == shard["count"]
    assert _keys_in(tmp_path / "train-000002.tar") == ["00000008", "00000009"]


def test_rolls_over_by_bytes(tmp_path, samples, tiny):
    sample_bytes = sum(512 + -(-len(v) // 512) * 512 for k, v in tiny.sample(0).items()
                       if k.endswith(".png")) + 1024
    shards = write_shards(samples(6), tmp_path, "train", total=6, max_bytes=2 * sample_bytes + 100,
                          progress=False)
    assert len(shards) >= 3 and sum(s["count"] for s in shards) == 6
    assert all(s["count"] <= 2 for s in shards)


def test_same_samples_give_byte_identical_shards(tmp_path, samples):
    a = write_shards(samples(5), tmp_path / "a", "train", total=5, progress=False)
    b = write_shards(samples(5), tmp_path / "b", "train", total=5, progress=False)
    assert [s["sha256"] for s in a] == [s["sha256"] for s in b]


def test_interrupted_write_leaves_no_complete_looking_shard(tmp_path, samples):
    def exploding():
        yield from samples(6)
        raise RuntimeError("killed")

    (tmp_path / "manifest.json").write_text("{}")  # an older build: must be invalidated
    with pytest.raises(RuntimeError, match="killed"):
        write_shards(exploding(), tmp_path, "train", total=10, max_count=4, progress=False)
    names = sorted(p.name for p in tmp_path.iterdir())
    # the full first shard is complete; the half-written second one is gone, not renamed
    assert names == ["train-000000.tar"]
    assert len(_keys_in(tmp_path / "train-000000.tar")) == 4
    with pytest.raises(FileNotFoundError):
        read_manifest(tmp_path)


def test_rebuild_removes_stale_shards_and_partials(tmp_path, samples):
    write_shards(samples(9), tmp_path, "train", total=9, max_count=3, progress=False)
    (tmp_path / ".train-000005.tar.partial").write_bytes(b"left by a killed run")
    write_shards(samples(4), tmp_path, "train", total=4, max_count=3, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-000000.tar", "train-000001.tar"]


def test_manifest_roundtrip_and_extra_files(tmp_path, samples):
    shards = write_shards(samples(5), tmp_path, "test", total=5, max_count=2, progress=False)
    (tmp_path / "vocab.json").write_text('["a"]')
    write_manifest(tmp_path, "tiny", {"seed": 3}, {"test": shards}, ["vocab.json"],
                   sample_keys=["mnist.png", "svhn.png", "label.cls"])
    manifest = read_manifest(tmp_path)
    assert manifest["dataset"] == "tiny" and manifest["params"] == {"seed": 3}
    assert manifest["splits"]["test"]["num_samples"] == 5
    assert manifest["splits"]["test"]["shards"] == shards
    assert manifest["extra_files"]["vocab.json"]["sha256"] == hashlib.sha256(b'["a"]').hexdigest()
    assert not list(tmp_path.glob(".*partial"))


def test_read_manifest_errors_say_how_to_build(tmp_path):
    with pytest.raises(FileNotFoundError, match="shard_demo.py"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="shard_demo.py"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"dataset": "x"}))
    with pytest.raises(ValueError, match="params, splits"):
        read_manifest(tmp_path)


def test_verify_passes_then_detects_a_flipped_byte(tiny_dir, capsys):
    assert data_main(["verify", str(tiny_dir)]) == 0
    shard = tiny_dir / "test-000002.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0x01  # inside the first payload: the tar still parses, only the hash changes
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert data_main(["verify", str(tiny_dir)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "test-000002.tar" in err and "sha256" in err


def test_verify_detects_wrong_count_and_missing_shard(tiny_dir, capsys):
    manifest = json.loads((tiny_dir / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][1]["count"] = 9
    (tiny_dir / "manifest.json").write_text(json.dumps(manifest))
    (tiny_dir / "test-000003.tar").unlink()
    assert data_main(["verify", str(tiny_dir)]) == 1
    err = capsys.readouterr().err
    assert "train-000001.tar: 8 samples, manifest says 9" in err and "test-000003.tar: missing" in err


def test_verify_without_manifest_exits_2(tmp_path, capsys):
    assert data_main(["verify", str(tmp_path)]) == 2
    assert "shard_demo.py" in capsys.readouterr().err
