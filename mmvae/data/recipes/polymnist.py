"""PolyMNIST (Sutter, Daunhawer, Vogt, ICLR 2021) from its published folder layout.

Input (nothing is downloaded): ``--polymnist DIR`` holds ``train/`` and ``test/``, each with one
folder per modality ``m0``, ``m1``, ... (PolyMNIST has five), each holding RGB images named
``<index>.<label>.png``. Image ``i`` of one modality pairs with image ``i`` of every other:
the same index must exist in every modality of the split, with the same label (the digits
differ: that is the point of PolyMNIST).

Output: ``{train,test}-NNNNNN.tar`` (samples ``m0.npy`` .. ``m{M-1}.npy`` 3×H×W raw uint8
(``.png`` with ``encoding="png"``) and
``label.cls``; sample key = the file index), ``unique_{split}.npz`` (uint8 ``m{i}``
(N, 3, H, W), int64 ``m{i}_labels`` and ``index``, in ascending index order: every image once,
for the digit classifiers) and ``manifest.json`` last.
"""
from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import numpy as np
from PIL import Image

from mmvae.data.recipes.common import (DEFAULT_ENCODING, InputError, check_encoding, encode_images,
                                       library_versions, save_npz, shard_limits)
from mmvae.data.writer import MANIFEST, write_manifest, write_shards

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
FILE_NAME = re.compile(r"^(\d+)\.(\d+)\.png$")
MODALITY_DIR = re.compile(r"^m(\d+)$")
LAYOUT_HINT = "expected DIR/{train,test}/m0..m4/<index>.<label>.png as PolyMNIST is published"


def modality_folders(split_dir: Path) -> list[str]:
    """The ``m0`` .. ``m{M-1}`` folder names of a split (at least two, numbered without gaps)."""
    if not split_dir.is_dir():
        raise InputError(f"PolyMNIST split folder {split_dir} not found; {LAYOUT_HINT}")
    numbers = sorted(int(match.group(1)) for p in split_dir.iterdir()
                     if p.is_dir() and (match := MODALITY_DIR.match(p.name)))
    if len(numbers) < 2 or numbers != list(range(len(numbers))):
        found = ", ".join(f"m{n}" for n in numbers) or "none"
        raise InputError(f"{split_dir} needs modality folders m0, m1, ... without gaps (found: {found}); {LAYOUT_HINT}")
    return [f"m{n}" for n in numbers]


def list_images(folder: Path) -> dict[int, tuple[int, Path]]:
    """index -> (label, path) of one modality folder; every file must be ``<index>.<label>.png``."""
    out = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):   # .DS_Store and the like
            continue
        match = FILE_NAME.match(path.name)
        if match is None:
            raise InputError(f"{path}: not an <index>.<label>.png file name; {LAYOUT_HINT}")
        index, label = int(match.group(1)), int(match.group(2))
        if label > 9:
            raise InputError(f"{path}: label {label} is not a digit 0..9")
        if index in out:
            raise InputError(f"{path}: index {index} appears twice in {folder} (also {out[index][1].name})")
        out[index] = (label, path)
    if not out:
        raise InputError(f"{folder} holds no <index>.<label>.png images; {LAYOUT_HINT}")
    return out


def check_aligned(split: str, listings: dict[str, dict[int, tuple[int, Path]]]) -> tuple[np.ndarray, np.ndarray]:
    """(indices, labels) shared by all modalities of a split; the first mismatch is named."""
    (first, reference), *others = listings.items()
    for name, listing in others:
        if len(listing) != len(reference):
            raise InputError(f"PolyMNIST {split}: {name} has {len(listing)} images but {first} has "
                             f"{len(reference)}; every modality needs the same <index> files")
        missing = sorted(set(reference) - set(listing))
        if missing:
            raise InputError(f"PolyMNIST {split}: index {missing[0]} is in {first} but not in {name} "
                             f"({len(missing)} indices differ)")
        for index, (label, path) in reference.items():
            if listing[index][0] != label:
                raise InputError(f"PolyMNIST {split}: {listing[index][1]} has label {listing[index][0]} but "
                                 f"{path} has {label}; image {index} must show one class in every modality")
    indices = np.asarray(sorted(reference), np.int64)
    return indices, np.asarray([reference[i][0] for i in indices], np.int64)


def read_images(paths: list[Path]) -> np.ndarray:
    """(N, 3, H, W) uint8 from image files of one size (any mode becomes RGB)."""
    arrays, size = [], None
    for path in paths:
        try:
            with Image.open(path) as image:
                array = np.asarray(image.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as exc:  # Pillow's errors for unreadable files
            raise InputError(f"{path}: cannot read as an image ({type(exc).__name__}: {exc})") from exc
        if size is None:
            size = array.shape
        elif array.shape != size:
            raise InputError(f"{path}: image is {array.shape[1]}×{array.shape[0]} but {paths[0].name} is "
                             f"{size[1]}×{size[0]}; all PolyMNIST images must have one size")
        arrays.append(array)
    return np.stack(arrays).transpose(0, 3, 1, 2).copy()


def load_split(root: Path, split: str, modalities: list[str] | None = None):
    """(modalities, indices, labels, {modality: images}) of one split, checked."""
    found = modality_folders(root / split)
    if modalities is not None and found != modalities:
        raise InputError(f"PolyMNIST {split} has modalities {', '.join(found)} but train has "
                         f"{', '.join(modalities)}; both splits need the same m<i> folders")
    listings = {m: list_images(root / split / m) for m in found}
    indices, labels = check_aligned(split, listings)
    images = {m: read_images([listings[m][i][1] for i in indices]) for m in found}
    shapes = {m: x.shape[1:] for m, x in images.items()}
    if len(set(shapes.values())) > 1:
        raise InputError(f"PolyMNIST {split}: modalities have different image sizes {shapes}")
    return found, indices, labels, images


def _samples(indices, labels, images: dict, encoding: str, chunk: int = 1024):
    """Samples in ascending index order, key = the file index; images encoded a chunk at a
    time (PNGs re-encoded: metadata stripped, same bytes for the same pixels)."""
    for start in range(0, len(indices), chunk):
        encoded = {m: encode_images(x[start:start + chunk], encoding) for m, x in images.items()}
        for i, (index, label) in enumerate(zip(indices[start:start + chunk], labels[start:start + chunk])):
            sample = {"__key__": f"{index:08d}"}
            sample.update({f"{m}.{encoding}": encoded[m][i] for m in images})
            sample["label.cls"] = int(label)
            yield sample


def build_polymnist(polymnist_dir, out_dir, *, shard_size_mb: float = 256, min_shards: int = 16,
                    encoding: str = DEFAULT_ENCODING, progress: bool = True) -> dict:
    """Build PolyMNIST shards in ``out_dir`` (module docstring) and return the manifest.
    ``encoding``: images as ``npy`` (raw uint8, the default) or ``png``.

    Every input is read and checked before anything is written.

    Raises:
        InputError: a missing folder, a malformed file name or image, or modalities whose
            counts or labels disagree (one-line message naming them).
    """
    check_encoding(encoding)
    root = Path(polymnist_dir)
    if not root.is_dir():
        raise InputError(f"PolyMNIST folder {root} not found; {LAYOUT_HINT}")
    data, modalities = {}, None
    for split in SPLITS:
        modalities, *data[split] = load_split(root, split, modalities)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)   # "not built" until the manifest is back
    splits, sizes, digests = {}, {}, {}
    for split, (indices, labels, images) in data.items():
        splits[split] = write_shards(_samples(indices, labels, images, encoding), out_dir, split, total=len(indices),
                                     progress=progress, **shard_limits(len(indices), shard_size_mb, min_shards))
        save_npz(out_dir / f"unique_{split}.npz", index=indices, **{key: value for m in modalities for key, value in (
            (m, images[m]), (f"{m}_labels", labels))})
        sizes[split] = {"samples": len(indices), "shards": len(splits[split])}
        # the pixels read, per modality: identifies the input without hashing 300k files twice
        digests[split] = {m: hashlib.sha256(x.tobytes()).hexdigest() for m, x in images.items()}
    shape = list(data["train"][2][modalities[0]].shape[1:])
    params = {
        "recipe": "mmvae.data.recipes.polymnist", "source": str(root), "sizes": sizes,
        "shard_size_mb": shard_size_mb, "min_shards": min_shards, "pixel_sha256": digests,
        "encoding": encoding, "modalities": {m: {"key": f"{m}.{encoding}", "shape": shape} for m in modalities},
        "versions": library_versions("numpy", "pillow"),
    }
    return write_manifest(out_dir, "polymnist", params, splits, ["unique_train.npz", "unique_test.npz"],
                          sample_keys=[f"{m}.{encoding}" for m in modalities] + ["label.cls"],
                          npy_images=[f"{m}.{encoding}" for m in modalities] if encoding == "npy" else ())
