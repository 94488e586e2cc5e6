"""The built-in five-modality polydigits dataset and the PolyMNIST folder recipe."""
from __future__ import annotations

import importlib
import io
import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmvae.data import builtin
from mmvae.data.__main__ import main as verify_main
from mmvae.data.pipeline import make_loader
from mmvae.data.recipes.common import png_batch
from mmvae.data.recipes.digits import load_handwritten
from mmvae.data.recipes.polydigits import MODALITIES, STYLES, build_polydigits, compose
from mmvae.data.checks import verify_shards

TINY = dict(sources_per_class=30, train_samples=200, test_samples=60, train_shards=2, test_shards=1, progress=False)


def _launcher(name):
    return importlib.import_module(f"mmvae.cli.{name}")


@pytest.fixture(scope="module")
def poly_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("polydigits")
    build_polydigits(out, seed=0, **TINY)
    return out


def _shard_digests(folder) -> list[str]:
    manifest = json.loads((Path(folder) / "manifest.json").read_text())
    return [s["sha256"] for split in manifest["splits"].values() for s in split["shards"]]


def test_polydigits_is_byte_identical_for_a_seed_and_differs_for_another(tmp_path):
    small = {**TINY, "train_samples": 40, "test_samples": 10}
    build_polydigits(tmp_path / "a", seed=0, **small)
    build_polydigits(tmp_path / "b", seed=0, **small)
    build_polydigits(tmp_path / "c", seed=1, **small)
    assert _shard_digests(tmp_path / "a") == _shard_digests(tmp_path / "b")
    assert (tmp_path / "a" / "unique_train.npz").read_bytes() == (tmp_path / "b" / "unique_train.npz").read_bytes()
    assert not set(_shard_digests(tmp_path / "a")) & set(_shard_digests(tmp_path / "c"))


def test_shards_hold_the_unique_images_and_all_five_modalities_share_the_label(poly_dir):
    unique = np.load(poly_dir / "unique_test.npz")
    _, source_labels = load_handwritten()
    loader = make_loader(poly_dir, "test", batch_size=16, modalities=list(MODALITIES), shuffle=False,
                         drop_last=False, return_keys=True)
    seen = 0
    for batch in loader:
        j = np.array([int(k) for k in batch["__key__"]])
        for m in MODALITIES:
            assert batch[m].shape[1:] == (3, 28, 28)
            torch.testing.assert_close(batch[m], torch.from_numpy(unique[m][j]).float() / 255)
            # the label of the sample is the class of the handwritten digit drawn in every modality
            assert (source_labels[unique[f"{m}_source"][j]] == batch["label"].numpy()).all()
            assert (unique[f"{m}_labels"][j] == batch["label"].numpy()).all()
        seen += len(j)
    assert seen == 60 and loader.errors == 0


def test_each_modality_has_its_own_background_colour_and_texture(poly_dir):
    """A nearest-centroid rule on (mean, std) of each image's colour channels, fitted on train,
    names the modality of every test image: the five looks are distinguishable."""
    def features(images):  # (N, 3, 28, 28) -> (N, 6)
        x = images.astype(np.float64)
        return np.concatenate([x.mean(axis=(2, 3)), x.std(axis=(2, 3))], axis=1)

    train, test = (np.load(poly_dir / f"unique_{s}.npz") for s in ("train", "test"))
    centroids = np.stack([features(train[m]).mean(axis=0) for m in MODALITIES])
    mean_colours = centroids[:, :3]
    gaps = np.linalg.norm(mean_colours[:, None] - mean_colours[None], axis=-1)[np.triu_indices(5, 1)]
    assert gaps.min() > 25, f"two modalities have nearly the same mean colour ({gaps.min():.1f})"
    for k, m in enumerate(MODALITIES):
        nearest = np.linalg.norm(features(test[m])[:, None] - centroids[None], axis=-1).argmin(axis=1)
        assert (nearest == k).mean() == 1.0, m


def test_compose_blends_background_and_its_inverse_by_digit_intensity():
    rng = np.random.default_rng(0)
    background = rng.integers(0, 256, (4, 3, 28, 28), dtype=np.uint8)
    digit = rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)
    digit[0], digit[1] = 0, 255
    alpha, bg = digit[:, None] / 255.0, background.astype(np.float64)
    expected = np.round((1 - alpha) * bg + alpha * (255 - bg))
    out = compose(background, digit)
    assert out.dtype == np.uint8 and (out == expected).all()
    assert (out[0] == background[0]).all() and (out[1] == 255 - background[1]).all()


def test_every_palette_keeps_the_inverted_digit_legible():
    """Digit pixels take 255 - background: a palette near mid-grey would hide the digit."""
    def luma(rgb):
        return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]

    for style in STYLES:
        for colour in (style.low, style.high):
            assert abs(luma(colour) - luma([255 - c for c in colour])) >= 60, style


def test_each_sample_shows_five_different_independently_drawn_instances(poly_dir):
    unique = np.load(poly_dir / "unique_train.npz")
    sources = np.stack([unique[f"{m}_source"] for m in MODALITIES])          # (5, N)
    for a in range(5):
        for b in range(a + 1, 5):
            assert (sources[a] != sources[b]).all(), (MODALITIES[a], MODALITIES[b])
            assert not (unique[MODALITIES[a]] == unique[MODALITIES[b]]).all(axis=(1, 2, 3)).any()
    # independent draws: an m0 digit used in several samples meets different m1 digits
    partners = {}
    for s0, s1 in zip(sources[0], sources[1]):
        partners.setdefault(s0, set()).add(s1)
    reused = [p for s0, p in partners.items() if (sources[0] == s0).sum() > 1]
    assert reused and np.mean([len(p) > 1 for p in reused]) > 0.9


def test_polydigits_shards_verify_with_the_data_cli(poly_dir, capsys):
    results = list(verify_shards(poly_dir))
    assert len(results) == 2 + 1 + 2 and all(r["ok"] for _, _, r in results)  # 3 shards + 2 side files
    assert verify_main(["verify", str(poly_dir)]) == 0
    manifest = json.loads((poly_dir / "manifest.json").read_text())
    assert manifest["dataset"] == "polydigits"
    assert manifest["sample_keys"] == sorted([f"{m}.npy" for m in MODALITIES] + ["label.cls"])
    assert manifest["params"]["modalities"]["m2"] == {"key": "m2.npy", "shape": [3, 28, 28], "texture": "tiles",
                                                      "palette": [[8, 50, 20], [50, 125, 55]]}


def test_digit_classifiers_train_and_cache_per_modality_from_the_unique_files(poly_dir, tmp_path, monkeypatch):
    from mmvae.eval import classifiers
    from mmvae.eval.classifiers import load_or_train_classifiers

    shapes = {m: (3, 28, 28) for m in MODALITIES}
    nets, infos = load_or_train_classifiers(poly_dir, MODALITIES, epochs=1, cache_dir=tmp_path, image_shapes=shapes)
    assert sorted(nets) == sorted(MODALITIES)
    assert all(info["in_channels"] == 3 and info["size"] == 28 and info["train_images"] == 200
               and info["test_images"] == 60 for info in infos.values())
    assert all((tmp_path / f"{m}.pt").is_file() for m in MODALITIES)
    monkeypatch.setattr(classifiers, "train_classifier", lambda *a, **k: pytest.fail("retrained a cached classifier"))
    _, again = load_or_train_classifiers(poly_dir, MODALITIES, epochs=1, cache_dir=tmp_path, image_shapes=shapes)
    assert again == infos


def test_too_few_source_digits_per_class_is_a_clear_error_that_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="only 2 source digits in a split, fewer than the 5 modalities"):
        build_polydigits(tmp_path / "out", **{**TINY, "sources_per_class": 10})   # 2 test sources per class
    assert not (tmp_path / "out").exists()


def test_shard_demo_builds_polydigits_with_its_sample_counts(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(builtin.BUILTINS, "polydigits", partial(
        build_polydigits, sources_per_class=30, train_shards=2, test_shards=1, progress=False))
    demo = _launcher("shard_demo")
    assert demo.main(["--dataset", "polydigits", "--out", str(tmp_path / "o"), "--samples", "30", "10"]) == 0
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert [manifest["splits"][s]["num_samples"] for s in ("train", "test")] == [30, 10]
    assert "polydigits -> " in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--dataset", "digits", "--out", str(tmp_path / "x"), "--samples", "3", "3"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--samples applies to --dataset polydigits" in err
    assert len(err.strip().splitlines()) == 1


def test_png_batch_round_trips_rgb_and_grey_pixels_exactly():
    rng = np.random.default_rng(0)
    for shape in ((7, 3, 28, 28), (3, 1, 9, 5)):
        images = rng.integers(0, 256, shape, dtype=np.uint8)
        images[0] //= 50  # smooth too, not only noise
        for data, image in zip(png_batch(images), images):
            with Image.open(io.BytesIO(data)) as decoded:
                assert decoded.mode == ("RGB" if shape[1] == 3 else "L")
                array = np.asarray(decoded)
            assert (array.reshape(shape[2], shape[3], -1).transpose(2, 0, 1) == image).all()


# ---------------------------------------------------------------- the published PolyMNIST format
def write_polymnist(root: Path, counts=(("train", 6), ("test", 4)), modalities: int = 5) -> dict:
    """A tiny PolyMNIST folder: random RGB 28×28 images named <index>.<label>.png; returns the
    pixels written, {(split, modality): (N, 3, 28, 28)}, and the labels per split."""
    rng = np.random.default_rng(0)
    written = {}
    for split, n in counts:
        labels = rng.integers(0, 10, n)
        written[split, "labels"] = labels
        for m in range(modalities):
            folder = root / split / f"m{m}"
            folder.mkdir(parents=True)
            images = rng.integers(0, 256, (n, 28, 28, 3), dtype=np.uint8)
            for index, (image, label) in enumerate(zip(images, labels)):
                Image.fromarray(image).save(folder / f"{index}.{label}.png")
            written[split, f"m{m}"] = images.transpose(0, 3, 1, 2)
    return written


def test_polymnist_recipe_shards_the_published_folders(tmp_path, capsys):
    written = write_polymnist(tmp_path / "PolyMNIST")
    assert _launcher("shard_polymnist").main(["--polymnist", str(tmp_path / "PolyMNIST"),
                                              "--out", str(tmp_path / "out"), "--min-shards", "2"]) == 0
    assert "polymnist (m0, m1, m2, m3, m4)" in capsys.readouterr().out
    out = tmp_path / "out"
    assert all(r["ok"] for _, _, r in verify_shards(out))
    loader = make_loader(out, "train", batch_size=4, modalities=list(MODALITIES), shuffle=False,
                         drop_last=False, return_keys=True)
    seen = 0
    for batch in loader:
        index = np.array([int(k) for k in batch["__key__"]])
        assert (batch["label"].numpy() == written["train", "labels"][index]).all()
        for m in MODALITIES:
            torch.testing.assert_close(batch[m], torch.from_numpy(written["train", m][index]).float() / 255)
        seen += len(index)
    assert seen == 6
    unique = np.load(out / "unique_test.npz")
    assert (unique["m3"] == written["test", "m3"]).all() and (unique["m3_labels"] == written["test", "labels"]).all()


def _drop_one(root):
    sorted((root / "train" / "m3").iterdir())[0].unlink()


def _relabel(root):
    path = next(p for p in (root / "train" / "m2").iterdir() if p.name.startswith("1."))
    label = int(path.name.split(".")[1])
    path.rename(path.with_name(f"1.{(label + 1) % 10}.png"))


def _corrupt(root):
    sorted((root / "test" / "m4").iterdir())[0].write_bytes(b"not a png")


def _rename_index(root):
    first = sorted((root / "test" / "m1").iterdir())[0]
    first.rename(first.with_name(f"99.{first.name.split('.')[1]}.png"))


@pytest.mark.parametrize("mutate, message", [
    (lambda root: None, "PolyMNIST folder"),                                       # root not created
    (lambda root: write_polymnist(root, counts=(("train", 3),)), "split folder"),  # no test/
    (lambda root: (write_polymnist(root), _drop_one(root)), "train: m3 has 5 images but m0 has 6"),
    (lambda root: (write_polymnist(root), _relabel(root)), "image 1 must show one class in every modality"),
    (lambda root: (write_polymnist(root), _rename_index(root)), "is in m0 but not in m1"),
    (lambda root: (write_polymnist(root), (root / "train" / "m0" / "notes.txt").write_text("x")),
     "not an <index>.<label>.png file name"),
    (lambda root: (write_polymnist(root), _corrupt(root)), "cannot read as an image"),
    (lambda root: (write_polymnist(root, modalities=2), (root / "test" / "m2").mkdir()),
     "test has modalities m0, m1, m2 but train has m0, m1"),
])
def test_malformed_polymnist_folders_stop_with_one_line_naming_the_problem(tmp_path, capsys, mutate, message):
    root = tmp_path / "PolyMNIST"
    mutate(root)
    code = _launcher("shard_polymnist").main(["--polymnist", str(root), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
