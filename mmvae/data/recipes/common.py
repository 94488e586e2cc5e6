"""Helpers shared by the dataset recipes: input errors, shard sizing, reproducible side files."""
from __future__ import annotations

import io
import os
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np


class InputError(ValueError):
    """The user's raw dataset files are missing or malformed. The message is one line that
    names the file expected and where; the launch scripts print it and exit with code 2."""


def shard_limits(num_samples: int, shard_size_mb: float, min_shards: int) -> dict:
    """``write_shards`` limits: shards of at most ``shard_size_mb`` MiB, and at least
    ``min_shards`` shards (so that dp ranks × workers each get one) when there are enough
    samples."""
    if shard_size_mb <= 0 or min_shards < 1:
        raise ValueError(f"shard_size_mb must be > 0 and min_shards >= 1 (got {shard_size_mb}, {min_shards})")
    return {"max_bytes": int(shard_size_mb * 2**20), "max_count": max(1, -(-num_samples // min_shards))}


def save_npz(path, *, compress: bool = True, **arrays: np.ndarray) -> None:
    """Like ``np.savez[_compressed]`` but byte-reproducible (fixed zip timestamps) and atomic,
    so that the manifest's sha256 of side files depends only on the recipe inputs."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    try:
        with zipfile.ZipFile(tmp, "w", compression=method, allowZip64=True) as zf:
            for name, array in arrays.items():
                buf = io.BytesIO()
                np.lib.format.write_array(buf, np.asarray(array), allow_pickle=False)
                info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = method
                zf.writestr(info, buf.getvalue(), compresslevel=1 if compress else None)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# Per-recipe image encoding (``--encoding`` of the shard scripts). npy by default for the small
# digit images: lossless like PNG and decoded ~10x cheaper (a header check and a reshape), for
# shards 1.3-1.6x larger (docs/data.md, Throughput). CUB-like recipes keep JPEG (lossy source,
# 64x64x3 raw would be ~4x the bytes).
DEFAULT_ENCODING = "npy"


def check_encoding(encoding: str) -> str:
    """``encoding`` if it is one the recipes write, else a one-line ValueError naming them."""
    from mmvae.data.samples import IMAGE_ENCODINGS

    if encoding not in IMAGE_ENCODINGS:
        raise ValueError(f"image encoding {encoding!r}; choose one of {', '.join(IMAGE_ENCODINGS)}")
    return encoding


def encode_images(images: np.ndarray, encoding: str, png=None) -> list[bytes]:
    """(N, C, H, W) uint8 -> one payload per image: ``npy`` (raw uint8 C-order (C, H, W),
    ``mmvae.data.samples.encode_npy_image``) or ``png`` (``png`` if given: the recipe's PNG
    encoder of one image, else :func:`png_batch`)."""
    from mmvae.data.samples import encode_npy_image

    if check_encoding(encoding) == "npy":
        return [encode_npy_image(x) for x in images]
    return [png(x) for x in images] if png is not None else png_batch(images)


def npy_bytes(array: np.ndarray) -> bytes:
    """One array as ``.npy`` file bytes (what the pipeline's ``.npy`` decoder reads)."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def library_versions(*names: str) -> dict:
    """Versions of the libraries the shard bytes depend on (recorded in the manifest)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def png_batch(images: np.ndarray, level: int = 6) -> list[bytes]:
    """(N, 1|3, H, W) uint8 -> one PNG file per image (8-bit grey or RGB, no interlace).

    Pillow's ``Image.save`` costs ~0.3 ms of Python per small image, which dominates building
    tens of thousands of 28×28 images. Here the PNG "Sub" row filter is applied to the whole
    batch in numpy and each image is then only a zlib call and three chunks: any PNG decoder
    (Pillow included) reads the result; pixels round-trip exactly."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 (N, 1|3, H, W) images, got {images.dtype} {images.shape}")
    n, channels, height, width = images.shape
    rows = images.transpose(0, 2, 3, 1).reshape(n, height, width * channels)
    filtered = np.empty((n, height, 1 + width * channels), np.uint8)
    filtered[:, :, 0] = 1                                                  # filter type 1 = Sub
    filtered[:, :, 1:1 + channels] = rows[:, :, :channels]
    filtered[:, :, 1 + channels:] = rows[:, :, channels:] - rows[:, :, :-channels]  # mod 256
    header = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2 if channels == 3 else 0, 0, 0, 0))
    end = _png_chunk(b"IEND", b"")
    return [_PNG_SIGNATURE + header + _png_chunk(b"IDAT", zlib.compress(f.tobytes(), level)) + end
            for f in filtered]


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
