"""CUB recipe on a tiny tree in the real layout: class folders of JPEGs (RGB, grayscale, CMYK,
an RGBA PNG), caption files with 10 lines per image in ImageFolder order."""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmvae.data.pipeline import make_loader
from mmvae.data.recipes import captions as cap
from mmvae.data.recipes.common import InputError
from mmvae.data.recipes.cub import _batches, build_cub, scan_image_folder
from mmvae.data.recipes.features import FeatureExtractor, load_resnet101, resized_size

# (class folder, file name, mode, fill, size): listed out of order on purpose; ImageFolder order is
# sorted class folders, then sorted file names; "notes.txt" is not an image.
TRAIN = [("002.Laysan_Albatross", "b.jpg", "L", 90, (40, 30)),
         ("002.Laysan_Albatross", "a.jpg", "CMYK", (0, 255, 255, 0), (30, 40)),
         ("001.Black_footed_Albatross", "z.JPG", "RGB", (20, 200, 30), (50, 30)),
         ("001.Black_footed_Albatross", "c.png", "RGBA", (10, 20, 240, 128), (40, 40)),
         ("002.Laysan_Albatross", "c.jpg", "RGB", (250, 250, 0), (40, 30))]
TEST = [("004.Groove_billed_Ani", "x.jpg", "RGB", (200, 100, 50), (36, 24)),
        ("003.Sooty_Albatross", "y.jpg", "L", 30, (24, 36))]
# expected RGB mean colour of each image, in ImageFolder order
TRAIN_RGB = [(10, 20, 240), (20, 200, 30), (255, 0, 0), (90, 90, 90), (250, 250, 0)]
TEST_RGB = [(30, 30, 30), (200, 100, 50)]


def caption(split: str, i: int, j: int) -> str:
    """Caption j of image i. Controlled counts over the 50 train captions: 'often' 4 times
    (kept: count > 3), 'rare' 3 times (dropped), 'unseen' only in test; one 40-token caption;
    one with a sentence end inside the line."""
    text = f"this bird img{split}{i} has cap{j} , and wings"
    if split == "train" and (i, j) in {(0, 1), (1, 1), (2, 1), (3, 1)}:
        text += " often"
    if split == "train" and (i, j) in {(0, 2), (1, 2), (2, 2)}:
        text += " rare"
    if split == "train" and (i, j) == (1, 3):
        text = " ".join(["long"] * 40)
    if split == "train" and (i, j) == (2, 4):
        text = "a bird with a white belly. it has black wings."
    if split == "test":
        text += " unseen"
    return text


def make_cub(root: Path, train=TRAIN, test=TEST, captions_per_image=10, drop_line=None) -> Path:
    for split, items in (("train", train), ("test", test)):
        for folder, name, mode, fill, size in items:
            (root / split / folder).mkdir(parents=True, exist_ok=True)
            Image.new(mode, size, fill).save(root / split / folder / name)
        (root / split / items[0][0] / "notes.txt").write_text("not an image")
        lines = [caption(split, i, j) for i in range(len(items)) for j in range(captions_per_image)]
        if drop_line is not None and split == drop_line:
            lines.pop(5)
        name = "text_trainvalclasses.txt" if split == "train" else "text_testclasses.txt"
        (root / name).write_text("\n".join(lines) + "\n")
    return root


def simple_tokens(text: str) -> list[str]:
    """Independent tokenisation for the controlled captions above."""
    return text.replace(",", " ,").replace(".", " .").split()


def _launch():
    return importlib.import_module("mmvae.cli.shard_cub")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = make_cub(tmp_path_factory.mktemp("cub"))
    manifest = build_cub(root, root / "out", seed=0, min_shards=2, progress=False)
    return root / "out", manifest


def test_image_folder_order_and_labels(tmp_path):
    make_cub(tmp_path)
    paths, labels, classes = scan_image_folder(tmp_path / "train")
    assert [p.name for p in paths] == ["c.png", "z.JPG", "a.jpg", "b.jpg", "c.jpg"]
    assert labels.tolist() == [0, 0, 1, 1, 1] and classes == ["001.Black_footed_Albatross", "002.Laysan_Albatross"]


def test_samples_align_caption_i_with_image_i_div_10(built):
    out, manifest = built
    assert manifest["dataset"] == "cub" and manifest["splits"]["train"]["num_samples"] == 50
    assert manifest["sample_keys"] == ["caption.json", "caption.txt", "image.jpg", "label.cls"]
    for split, rgb, labels in (("train", TRAIN_RGB, [0, 0, 1, 1, 1]), ("test", TEST_RGB, [0, 1])):
        loader = make_loader(out, split, batch_size=7, modalities=["image", "caption", "caption.txt"],
                             shuffle=False, drop_last=False, return_keys=True)
        seen = set()
        for batch in loader:
            assert batch["image"].shape[1:] == (3, 64, 64) and batch["image"].dtype == torch.float32
            assert batch["caption"].shape[1:] == (32,) and batch["caption"].dtype == torch.int64
            for k, key in enumerate(batch["__key__"]):
                i, j = divmod(int(key), 10)
                assert batch["caption.txt"][k] == caption(split, i, j).strip()
                mean = (batch["image"][k].mean(dim=(1, 2)) * 255).tolist()
                assert np.allclose(mean, rgb[i], atol=6), (split, key, mean, rgb[i])  # L, CMYK, RGBA -> RGB
                assert batch["label"][k].item() == labels[i]
                seen.add(int(key))
        assert seen == set(range(10 * len(rgb)))


def test_vocabulary_rules(built):
    out, _ = built
    vocab = json.loads((out / "vocab.json").read_text())
    train = [simple_tokens(caption("train", i, j)) for i in range(5) for j in range(10)]
    counts: dict[str, int] = {}
    for tokens in train:
        for t in tokens:
            counts[t] = counts.get(t, 0) + 1
    expected = [w for w in counts if counts[w] > 3]           # dicts keep first-appearance order
    assert vocab["itos"] == ["<exc>", "<pad>", "<eos>"] + expected
    assert vocab["specials"] == {"<exc>": 0, "<pad>": 1, "<eos>": 2} and vocab["max_len"] == 32
    assert "often" in vocab["itos"] and "rare" not in vocab["itos"] and "unseen" not in vocab["itos"]
    assert vocab["counts"]["often"] == 4 and vocab["min_count"] == 3
    assert vocab["total_tokens"] == sum(counts.values())
    assert vocab["excluded_count"] == sum(n for n in counts.values() if n <= 3)
    stoi = {w: i for i, w in enumerate(vocab["itos"])}
    unique = {s: np.load(out / f"unique_{s}.npz")["caption"] for s in ("train", "test")}
    long_ids = unique["train"][13]                              # 40 x 'long': 31 + <eos>, no pad
    assert long_ids.tolist() == [stoi["long"]] * 31 + [2]
    belly = unique["train"][24].tolist()       # "belly. it": the inner sentence end is its own token
    assert belly.index(2) == len(simple_tokens(caption("train", 2, 4))) == 12
    short = unique["train"][0].tolist()                        # tokens, <eos>, then <pad>s
    n = len(simple_tokens(caption("train", 0, 0)))
    assert short[n] == 2 and short[n + 1:] == [1] * (31 - n) and 0 not in short[:n]
    test0 = unique["test"][0].tolist()                         # OOV -> <exc>: imgtest0 and unseen
    assert test0[:len(simple_tokens(caption("test", 0, 0)))].count(0) == 2


def test_two_dp_ranks_see_disjoint_samples(built):
    out, _ = built
    keys = [[k for b in make_loader(out, "train", batch_size=5, modalities=["image", "caption"], dp_rank=r,
                                    dp_size=2, return_keys=True) for k in b["__key__"]] for r in range(2)]
    assert len(keys[0]) == len(keys[1]) == 25 and not set(keys[0]) & set(keys[1])


def test_same_seed_same_bytes(tmp_path):
    make_cub(tmp_path)

    def shas(name, seed, workers=0):
        m = build_cub(tmp_path, tmp_path / name, seed=seed, min_shards=2, workers=workers, progress=False)
        return [s["sha256"] for sp in m["splits"].values() for s in sp["shards"]], m["extra_files"]["vocab.json"]

    first, again, other = shas("a", 0), shas("b", 0, workers=2), shas("c", 1)   # workers keep the order
    assert first == again and not set(first[0]) & set(other[0]) and first[1] == other[1]


@pytest.mark.parametrize("setup, argv, message", [
    (dict(drop_line="test"), [], "text_testclasses.txt has 19 captions but"),
    (dict(drop_line="test"), [], "holds 2 images, which need 10 x 2 = 20"),
    (dict(captions_per_image=9), [], "has 45 captions but"),
    (dict(), ["--features", "resnet101"], "resnet101-63fe2227.pth"),
    (dict(), ["--weights", "missing.pth"], "weights file missing.pth not found"),
])
def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys, monkeypatch, setup, argv, message):
    make_cub(tmp_path / "cub", **setup)
    monkeypatch.chdir(tmp_path)
    code = _launch().main(["--cub", "cub", "--out", "out", "--workers", "0", *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_missing_caption_file_and_folder_are_named(tmp_path):
    make_cub(tmp_path)
    (tmp_path / "text_trainvalclasses.txt").unlink()
    with pytest.raises(InputError, match="text_trainvalclasses.txt not found in"):
        build_cub(tmp_path, tmp_path / "o", progress=False)
    with pytest.raises(InputError, match=r"CUB image folder .*nowhere.train not found"):
        build_cub(tmp_path / "nowhere", tmp_path / "o", progress=False)


def test_resize_rule_and_batches_group_equal_sizes(tmp_path):
    from torchvision.transforms.functional import resize

    for size in [(40, 30), (30, 40), (500, 333), (224, 224)]:
        assert resized_size(*size) == resize(Image.new("RGB", size), 224).size[::-1]
    make_cub(tmp_path)
    paths, _, _ = scan_image_folder(tmp_path / "train")
    batches = _batches(paths, 2, by_size=True)
    assert sorted(i for b in batches for i in b) == list(range(5)) and max(map(len, batches)) <= 2
    for b in batches:
        assert len({Image.open(paths[i]).size for i in b}) == 1


def test_resnet_features_with_random_weights(tmp_path):
    """2 images only: ResNet-101 on CPU is slow."""
    square = [(f, n, m, fill, (32, 32)) for f, n, m, fill, _ in TRAIN[2:3] + TEST[:1]]
    make_cub(tmp_path, train=square[:1], test=square[1:])
    manifest = build_cub(tmp_path, tmp_path / "ft", random_weights=True, features="resnet101", device="cpu",
                         min_shards=1, progress=False)
    assert manifest["dataset"] == "cub_ft" and "feature.npy" in manifest["sample_keys"]
    assert manifest["params"]["features"]["weights"] == "random (tests only)"
    feats = np.load(tmp_path / "ft" / "unique_train.npz")["feature"]
    other = np.load(tmp_path / "ft" / "unique_test.npz")["feature"]
    assert feats.shape == (1, 2048) and feats.dtype == np.float32 and np.isfinite(feats).all()
    assert (feats >= 0).all() and not np.allclose(feats, other)   # post-ReLU avgpool, per image
    batch = next(iter(make_loader(tmp_path / "ft", "train", batch_size=10, modalities=["feature", "caption"],
                                  shuffle=False, return_keys=True)))
    assert batch["feature"].shape == (10, 2048) and batch["feature"].dtype == torch.float32
    for k, key in enumerate(batch["__key__"]):
        torch.testing.assert_close(batch["feature"][k], torch.from_numpy(feats[int(key) // 10]))


def test_weights_file_loads_with_weights_only_and_bad_files_are_named(tmp_path):
    from torchvision.models import resnet101

    reference = resnet101()
    reference.layer4[2].bn3.running_mean.normal_()   # a buffer that random init leaves at 0
    wrapped = {"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}
    torch.save(wrapped, tmp_path / "w.pth")         # a checkpoint wrapping a DataParallel state_dict
    extractor = FeatureExtractor(tmp_path / "w.pth", device="cpu")
    model = extractor.model
    torch.testing.assert_close(model.conv1.weight, reference.conv1.weight)
    torch.testing.assert_close(model.layer4[2].bn3.running_mean, reference.layer4[2].bn3.running_mean)
    assert isinstance(model.fc, torch.nn.Identity) and not model.training
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, tmp_path / "bad.pth")
    with pytest.raises(InputError, match=r"cannot load .*bad.pth as torchvision resnet101 weights \(.*missing keys"):
        load_resnet101(tmp_path / "bad.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match=r"junk.pth as torchvision resnet101 weights \(UnpicklingError"):
        load_resnet101(tmp_path / "junk.pth")
    x = torch.rand(1, 3, 32, 32)
    plain = extractor(x)
    extractor.imagenet_norm = True
    assert plain.shape == (1, 2048) and not np.allclose(plain, extractor(x))


def test_tokenize_keeps_one_caption_per_line():
    assert cap.tokenize("this bird has a white belly. it has black-tipped wings, and a crown.") == (
        "this", "bird", "has", "a", "white", "belly", ".", "it", "has", "black-tipped", "wings", ",", "and",
        "a", "crown", ".")
    assert cap.encode(("a", "b"), {"a": 3}, max_len=5) == [3, 0, 2, 1, 1]
