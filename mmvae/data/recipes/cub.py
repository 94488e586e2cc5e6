"""CUB image-caption shards (cubIS, and cubISft with ``features="resnet101"``), REFERENCE.md §4.

Input: the authors' cleaned CUB folder (seed-README.md), nothing downloaded::

    CUB/train/<class>/*.jpg   150 train+val classes      CUB/text_trainvalclasses.txt
    CUB/test/<class>/*.jpg    50 test classes (disjoint)  CUB/text_testclasses.txt

Images are ordered as torchvision's ``ImageFolder`` orders them (sorted class folders, then
sorted file names; label = index of the class folder in its split), and each caption file holds
10 captions per image, one per line, in that order: caption i belongs to image i // 10. The
counts are checked (lines == 10 × images) before anything is written.

Output: shards of one sample per (image, caption) pair — ``image.jpg`` (64×64, plain resize as
``Resize([64, 64])``, any input mode made RGB), ``caption.json`` (32 ids), ``caption.txt``,
``label.cls`` and, for cubISft, ``feature.npy`` (2048-d float32, see ``features.py``) — plus
``vocab.json`` (train-only vocabulary, see ``captions.py``), ``unique_{split}.npz``
(``caption`` (N_cap, 32) ids, ``image_labels``, and ``feature`` (N_img, 2048) for cubISft) and
``manifest.json`` last. Dataset name ``cub`` or ``cub_ft``.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image

from mmvae.data.recipes import captions as cap
from mmvae.data.recipes.common import InputError, library_versions, save_npz
from mmvae.data.recipes.features import FEATURE_DIM, WEIGHTS_HELP, resized_size
from mmvae.data.writer import sha256_file, MANIFEST, write_manifest

log = logging.getLogger(__name__)

SPLITS = {"train": "text_trainvalclasses.txt", "test": "text_testclasses.txt"}
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # ImageFolder's
CUB_URL = "http://www.robots.ox.ac.uk/~yshi/mmdgm/datasets/cub.zip"
FEATURES = ("resnet101",)


# ---------------------------------------------------------------- reading and checking
def scan_image_folder(root) -> tuple[list[Path], np.ndarray, list[str]]:
    """(image paths, labels, class names) in torchvision ``ImageFolder`` order."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"CUB image folder {root} not found; unzip {CUB_URL} so that {root.parent} "
                         f"holds train/, test/ and the two text_*.txt files")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise InputError(f"{root} has no class folders (expected e.g. {root}/002.Laysan_Albatross/*.jpg)")
    paths, labels = [], []
    for label, name in enumerate(classes):
        found = [Path(dirpath) / f for dirpath, _, files in sorted(os.walk(root / name, followlinks=True))
                 for f in sorted(files) if f.lower().endswith(IMG_EXTENSIONS)]
        if not found:
            raise InputError(f"class folder {root / name} holds no images ({', '.join(IMG_EXTENSIONS)})")
        paths += found
        labels += [label] * len(found)
    return paths, np.asarray(labels, np.int64), classes


def read_captions(path) -> list[str]:
    """One caption per line (``\\r\\n`` or ``\\n``); a final newline does not add a caption."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"CUB caption file {path.name} not found in {path.parent} (from {CUB_URL})")
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.replace("\r\n", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.strip() for line in lines]


def check_alignment(captions_file, num_captions: int, image_dir, num_images: int) -> None:
    need = cap.CAPTIONS_PER_IMAGE * num_images
    if num_captions != need:
        raise InputError(f"{captions_file} has {num_captions} captions but {image_dir} holds {num_images} images, "
                         f"which need {cap.CAPTIONS_PER_IMAGE} x {num_images} = {need} (one caption per line, "
                         f"{cap.CAPTIONS_PER_IMAGE} per image, in sorted class/file order)")


def read_cub(cub_dir) -> dict:
    """Every split's image paths, labels, classes and captions, all checked."""
    cub_dir = Path(cub_dir)
    out = {}
    for split, text_name in SPLITS.items():
        paths, labels, classes = scan_image_folder(cub_dir / split)
        captions = read_captions(cub_dir / text_name)
        check_alignment(cub_dir / text_name, len(captions), cub_dir / split, len(paths))
        out[split] = {"paths": paths, "labels": labels, "classes": classes, "captions": captions,
                      "captions_file": cub_dir / text_name}
    return out


def _images_digest(root: Path, paths) -> str:
    """sha256 over (relative path, size) of every image: identifies the image set cheaply."""
    digest = hashlib.sha256()
    for p in paths:
        digest.update(f"{p.relative_to(root).as_posix()}\t{p.stat().st_size}\n".encode())
    return digest.hexdigest()


# ---------------------------------------------------------------- one pass over the images
class _ImagePass:
    """Dataset item i: (i, 64×64 JPEG bytes, uint8 (3, H, W) Resize(224) tensor or None, error).
    Errors are returned, not raised, so that a worker's failure becomes a one-line message."""

    def __init__(self, paths, with_feature_input: bool):
        self.paths, self.with_feature_input = paths, with_feature_input
        if with_feature_input:  # imported here, in the parent: forked workers need not import again
            from torchvision.transforms.functional import resize  # noqa: F401

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            with Image.open(self.paths[i]) as raw:
                image = raw.convert("RGB")   # L, CMYK, RGBA, P, ... -> RGB (as ImageFolder's loader)
            jpg = cap.encode_jpeg(image.resize((cap.IMAGE_SIZE, cap.IMAGE_SIZE), Image.Resampling.BILINEAR))
            tensor = None
            if self.with_feature_input:
                import torch
                from torchvision.transforms.functional import resize

                big = np.asarray(resize(image, 224))        # torchvision Resize(224): shorter side
                tensor = torch.from_numpy(big.transpose(2, 0, 1).copy())
            return i, jpg, tensor, None
        except Exception as exc:  # noqa: BLE001 - any unreadable image
            return i, None, None, f"cannot read image {self.paths[i]} ({type(exc).__name__}: {exc})"


def _keep(items):
    return items


def _batches(paths, batch_size: int, by_size: bool) -> list[list[int]]:
    """Index batches; with ``by_size`` only images of equal Resize(224) size share a batch."""
    if not by_size:
        return [list(range(i, min(i + batch_size, len(paths)))) for i in range(0, len(paths), batch_size)]
    groups: dict[tuple[int, int], list[int]] = {}
    for i, p in enumerate(paths):
        try:
            with Image.open(p) as image:
                size = resized_size(*image.size)
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"cannot read image {p} ({type(exc).__name__}: {exc})") from exc
        groups.setdefault(size, []).append(i)
    return [g[j:j + batch_size] for g in groups.values() for j in range(0, len(g), batch_size)]


def process_images(paths, *, extractor=None, workers: int = 0, batch_size: int = 64, progress: bool = True,
                   description: str = "images") -> tuple[list[bytes], np.ndarray | None]:
    """Read every image once: its 64×64 JPEG bytes, and its feature if ``extractor`` is given
    (batched by size, on the extractor's device). Returns (jpegs, features (N, 2048) or None)."""
    import torch

    batches = _batches(paths, batch_size, by_size=extractor is not None)
    loader = torch.utils.data.DataLoader(_ImagePass(paths, extractor is not None), batch_sampler=batches,
                                         num_workers=workers, collate_fn=_keep)
    jpegs: list[bytes | None] = [None] * len(paths)
    features = np.zeros((len(paths), FEATURE_DIM), np.float32) if extractor is not None else None
    from mmvae.log import progress_bar

    with progress_bar(progress) as bar:
        task = bar.add_task(f"reading {description}" + (" + features" if extractor else ""), total=len(paths))
        for items in loader:
            for i, jpg, _, error in items:
                if error:
                    raise InputError(error)
                jpegs[i] = jpg
            if extractor is not None:
                x = torch.stack([t for _, _, t, _ in items]).float().div(255)  # = ToTensor, exactly
                features[[i for i, *_ in items]] = extractor(x)
            bar.advance(task, len(items))
    return jpegs, features


# ---------------------------------------------------------------- building
def _check_feature_args(features, weights, random_weights):
    if features is None:
        if weights is not None or random_weights:
            raise ValueError("weights/random_weights need features='resnet101'")
        return
    if features not in FEATURES:
        raise ValueError(f"unknown features {features!r}; valid: {', '.join(FEATURES)}")
    if weights is None and not random_weights:
        raise InputError(f"{features} features need an ImageNet weights file (--weights FILE): {WEIGHTS_HELP}")
    if weights is not None and random_weights:
        raise ValueError("give either weights or random_weights, not both")
    if weights is not None and not Path(weights).is_file():
        raise InputError(f"ResNet-101 weights file {weights} not found: {WEIGHTS_HELP}")


def build_cub(cub_dir, out_dir, *, features: str | None = None, weights=None, random_weights: bool = False,
              imagenet_norm: bool = False, seed: int = 0, min_count: int = cap.MIN_COUNT,
              max_len: int = cap.MAX_LEN, shard_size_mb: float = 256, min_shards: int = 16, workers: int = 0,
              feature_batch_size: int = 64, device=None, progress: bool = True) -> dict:
    """Build the CUB shards in ``out_dir`` (module docstring) and return the manifest.

    Args:
        features: None (cubIS) or ``"resnet101"`` (cubISft: adds ``feature.npy``), which needs
            ``weights`` (a local torchvision resnet101 state_dict file) or ``random_weights``.
        imagenet_norm: normalise with ImageNet mean/std before the ResNet (the paper did not).
        seed: the order samples are written in (and the random weights).
        workers: DataLoader workers reading/resizing images.
        device: for the ResNet; default cuda when available.
    Raises:
        InputError: missing/misaligned inputs or weights (one-line message); nothing written.
    """
    _check_feature_args(features, weights, random_weights)
    data = read_cub(cub_dir)
    tokens = {split: [cap.tokenize(c) for c in d["captions"]] for split, d in data.items()}
    vocab = cap.build_vocab(tokens["train"], min_count=min_count, max_len=max_len)
    extractor = None
    if features is not None:
        from mmvae.data.recipes.features import FeatureExtractor

        extractor = FeatureExtractor(weights, imagenet_norm=imagenet_norm, seed=seed, device=device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)   # "not built" until the manifest is back
    splits, sizes = {}, {}
    for split, d in data.items():
        ids = cap.encode_all(d["captions"], vocab)
        jpegs, feats = process_images(d["paths"], extractor=extractor, workers=workers,
                                      batch_size=feature_batch_size, progress=progress, description=f"{split} images")
        splits[split] = cap.write_caption_shards(out_dir, split, images_jpg=jpegs, labels=d["labels"],
                                                 captions=d["captions"], ids=ids, features=feats, seed=seed,
                                                 shard_size_mb=shard_size_mb, min_shards=min_shards,
                                                 progress=progress)
        unique = {"caption": ids, "image_labels": d["labels"]}
        if feats is not None:
            unique["feature"] = feats
        save_npz(out_dir / f"unique_{split}.npz", **unique)
        sizes[split] = {"images": len(jpegs), "captions": len(ids), "classes": len(d["classes"]),
                        "shards": len(splits[split]),
                        "truncated_captions": int(sum(len(t) >= max_len for t in tokens[split]))}
    cap.write_json(out_dir / "vocab.json", vocab)
    feature_params = None if extractor is None else {
        "arch": "torchvision resnet101, fc removed (2048-d avgpool)", "name": features,
        "weights": "random (tests only)" if random_weights else Path(weights).name,
        "weights_sha256": None if random_weights else sha256_file(weights),
        "preprocessing": "Resize(224) shorter side, ToTensor" + (", ImageNet mean/std" if imagenet_norm else
                                                               ", no normalisation (paper)"),
        "device": str(extractor.device)}
    params = {
        "recipe": "mmvae.data.recipes.cub", "seed": seed, "captions_per_image": cap.CAPTIONS_PER_IMAGE,
        "image": {"size": [3, cap.IMAGE_SIZE, cap.IMAGE_SIZE], "resize": "plain bilinear (aspect not kept)",
                  "jpeg_quality": cap.JPEG_QUALITY},
        "tokenizer": cap.TOKENIZER, "min_count": min_count, "max_len": max_len, "vocab_size": len(vocab["itos"]),
        "features": feature_params, "shard_size_mb": shard_size_mb, "min_shards": min_shards, "sizes": sizes,
        "classes": {split: d["classes"] for split, d in data.items()},
        "sources": {split: {"captions_sha256": sha256_file(d["captions_file"]),
                            "images_digest": _images_digest(Path(cub_dir) / split, d["paths"])}
                    for split, d in data.items()},
        "versions": library_versions("numpy", "pillow", "nltk", "torch", "torchvision"),
    }
    keys = cap.CAPTION_KEYS + (["feature.npy"] if features else [])
    return write_manifest(out_dir, "cub_ft" if features else "cub", params, splits,
                          ["vocab.json", "unique_train.npz", "unique_test.npz"], sample_keys=keys)
