"""The built-in CUB-shaped ``shapes`` dataset (and ``shapes_ft``), its registry entry and CLI."""
from __future__ import annotations

import importlib
import json
from functools import partial

import numpy as np
import pytest
import torch

from mmvae.data import builtin
from mmvae.data.pipeline import make_loader
from mmvae.data.recipes import shapes
from mmvae.data.recipes.shapes import build_shapes

SMALL = dict(train_scenes=40, test_scenes=12, min_shards=2, progress=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    return out, build_shapes(out, seed=0, features=True, **SMALL)


def test_counts_keys_and_batches_in_the_cub_format(built):
    out, manifest = built
    assert manifest["dataset"] == "shapes_ft" and manifest["splits"]["train"]["num_samples"] == 400
    assert manifest["splits"]["test"]["num_samples"] == 120 and set(manifest["extra_files"]) == {
        "vocab.json", "unique_train.npz", "unique_test.npz"}
    assert manifest["sample_keys"] == ["caption.json", "caption.txt", "feature.npy", "image.jpg", "label.cls"]
    unique = np.load(out / "unique_test.npz")
    loader = make_loader(out, "test", batch_size=32, modalities=["image", "caption", "feature"], shuffle=False,
                         drop_last=False, return_keys=True)
    seen = 0
    for batch in loader:
        assert batch["image"].shape[1:] == (3, 64, 64) and batch["image"].dtype == torch.float32
        assert 0 <= batch["image"].min() and batch["image"].max() <= 1
        assert batch["caption"].shape[1:] == (32,) and batch["caption"].dtype == torch.int64
        assert batch["feature"].shape[1:] == (2048,) and batch["feature"].dtype == torch.float32
        scene = np.array([int(k) // 10 for k in batch["__key__"]])
        assert (batch["label"].numpy() == unique["shape"][scene]).all()
        caption_index = [int(k) for k in batch["__key__"]]
        torch.testing.assert_close(batch["caption"], torch.from_numpy(unique["caption"][caption_index]))
        torch.testing.assert_close(batch["feature"], torch.from_numpy(unique["feature"][scene]))
        jpeg = (batch["image"] * 255 - torch.from_numpy(unique["image"][scene]).float()).abs().mean()
        assert jpeg < 4   # the JPEG of the scene image, not another scene's
        seen += len(scene)
    assert seen == 120
    assert (unique["feature"] >= 0).all() and unique["feature"].std(axis=0).mean() > 0


def test_captions_describe_the_scene(built):
    out, _ = built
    unique = np.load(out / "unique_train.npz")
    vocab = json.loads((out / "vocab.json").read_text())
    from mmvae.data.recipes.captions import decode

    distinct = []
    for scene in range(40):
        texts = [decode(unique["caption"][10 * scene + j], vocab["itos"]) for j in range(10)]
        shape, colour = shapes.SHAPES[unique["shape"][scene]], list(shapes.COLOURS)[unique["colour"][scene]]
        for text in texts:
            words = text.split()
            assert set(words) & set(shapes.SHAPE_WORDS[shape]), (text, shape)
            assert set(words) & set(shapes.COLOUR_WORDS.get(colour, (colour,))), (text, colour)
            assert text == text.lower() and "<exc>" not in words
        distinct.append(len(set(texts)))
    assert np.mean(distinct) >= 8   # varied wording, not one caption repeated
    assert vocab["itos"][:3] == ["<exc>", "<pad>", "<eos>"] and all(n > 3 for n in vocab["counts"].values())


def test_images_show_the_main_object_colour(built):
    out, _ = built
    unique = np.load(out / "unique_train.npz")
    images = unique["image"].astype(np.int64)
    for scene in range(40):
        rgb = np.asarray(list(shapes.COLOURS.values())[unique["colour"][scene]])
        close = (np.abs(images[scene] - rgb[:, None, None]).max(axis=0) < 45).sum()
        assert close >= 15, (scene, close)     # a small star is ~30 px; the background is dark
    assert set(unique["num_objects"]) == {1, 2} and len(set(unique["shape"])) >= 4


def test_deterministic_given_the_seed(tmp_path):
    def shas(name, seed):
        m = build_shapes(tmp_path / name, seed=seed, train_scenes=8, test_scenes=4, min_shards=2, progress=False)
        return [s["sha256"] for sp in m["splits"].values() for s in sp["shards"]]

    assert shas("a", 0) == shas("b", 0) and not set(shas("a", 0)) & set(shas("c", 1))


def _shard_demo():
    return importlib.import_module("mmvae.cli.shard_demo")


def test_shard_demo_and_ensure_builtin_build_shapes(tmp_path, capsys, monkeypatch):
    assert _shard_demo().main(["--dataset", "shapes", "--out", str(tmp_path / "s"), "--scenes", "6", "3"]) == 0
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["dataset"] == "shapes" and manifest["splits"]["test"]["num_samples"] == 30
    assert "feature.npy" not in manifest["sample_keys"] and "shapes -> " in capsys.readouterr().out
    tiny = partial(build_shapes, **{**SMALL, "train_scenes": 4, "test_scenes": 2})
    monkeypatch.setitem(builtin.BUILTINS, "shapes", tiny)
    assert builtin.ensure_builtin(tmp_path / "e", "shapes")["splits"]["train"]["num_samples"] == 40


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "shapes", "--pairs-per-instance", "3"], "--pairs-per-instance applies to --dataset digits"),
    (["--dataset", "digits", "--scenes", "3", "3"], "--scenes applies to --dataset shapes / shapes_ft / shapes_simple"),
    (["--dataset", "shapes", "--scenes", "0", "3"], "--scenes must be >= 1"),
    (["--dataset", "cub"], "valid: digits, polydigits, shapes, shapes_ft, shapes_simple"),
])
def test_shard_demo_rejects_bad_options_in_one_line(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        _shard_demo().main([*argv, "--out", "x"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_simple_variant_one_centred_object_on_grey_with_fixed_phrasings(tmp_path):
    from mmvae.data.recipes.captions import decode

    manifest = builtin.BUILTINS["shapes_simple"](tmp_path, **SMALL)
    assert manifest["dataset"] == "shapes_simple" and manifest["params"]["simple"] is True
    unique = np.load(tmp_path / "unique_train.npz")
    itos = json.loads((tmp_path / "vocab.json").read_text())["itos"]
    assert set(unique["num_objects"]) == {1} and len(itos) < 30
    images = unique["image"].astype(np.int64)
    corners = images[:, :, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners == shapes.SIMPLE_BACKGROUND).all()  # plain grey, no lighting
    for scene in range(40):
        shape, colour = shapes.SHAPES[unique["shape"][scene]], list(shapes.COLOURS)[unique["colour"][scene]]
        size = shapes.SIZES[unique["size"][scene]]
        words = (shapes.SIZE_WORDS[size][0], shapes.COLOUR_WORDS.get(colour, (colour,))[0],
                 shapes.SHAPE_WORDS[shape][0])
        texts = {decode(unique["caption"][10 * scene + j], itos) for j in range(10)}
        assert texts == {t(*words) for t in shapes.SIMPLE_TEMPLATES}, texts
        rgb = np.asarray(shapes.COLOURS[colour])
        centre = images[scene, :, 28:36, 28:36].reshape(3, -1)
        assert (np.abs(centre - rgb[:, None]).max(axis=0) < 45).mean() > 0.5, (scene, shape, colour)
