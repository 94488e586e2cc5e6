"""Decoding sample payloads and checking them against the manifest's modality spec.

The spec (``manifest["spec"]``) maps each file key to what its decoded value must be, e.g.
``{"mnist.png": {"kind": "image", "shape": [1, 28, 28], "dtype": "uint8"}, "caption.json":
{"kind": "ids", "shape": [32], "dtype": "int64"}, "feature.npy": {"kind": "array", "shape":
[2048], "dtype": "float32"}, "label.cls": {"kind": "int"}}``. :func:`write_manifest` records it
from the first sample written. Every decoded sample is checked against it (and float arrays
for NaN/inf) before it may reach a batch, so one bad sample is a counted data error, never a
crash in batching or a non-finite loss. numpy and Pillow only (no torch): the writer uses it.
"""
from __future__ import annotations

import io
import json
import math
import warnings
from typing import Any

import numpy as np
from PIL import Image

IMAGE_EXTS = frozenset({"png", "jpg", "jpeg", "ppm", "pgm", "pbm", "bmp", "webp", "tif", "tiff"})
_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})
_PIL_FORMATS = {"png": ("PNG",), "jpg": ("JPEG",), "jpeg": ("JPEG",), "webp": ("WEBP",)}
_KIND_DTYPE = {"image": "uint8", "ints": "int64"}
_ZEROS: dict = {}  # (size, dtype) -> zeros, for the finite test in `fits`
# `fits` multiplies NaN/inf by zero on purpose (the slow path then names the problem)
warnings.filterwarnings("ignore", "invalid value encountered in dot", RuntimeWarning, __name__)


def decode_image(data: bytes, ext: str = "") -> np.ndarray:
    """PNG/JPEG/... bytes -> uint8 (C, H, W); grayscale stays 1 channel, all else RGB.

    Pillow only (torchvision's decoders are deprecated since 0.29). The format hint skips
    Pillow's format probing and ``tobytes`` beats ``np.asarray``: together ~30% faster on
    small images."""
    stream = io.BytesIO(data)
    try:
        image = Image.open(stream, formats=_PIL_FORMATS.get(ext))
    except Image.UnidentifiedImageError:  # wrong extension: let Pillow probe every format
        image = Image.open(io.BytesIO(data))
    with image:
        image.load()  # Pillow decodes lazily: force it here so corrupt data raises here
        if image.mode not in ("L", "RGB"):
            image = image.convert("L" if image.mode in _GRAY_MODES else "RGB")
        array = np.frombuffer(image.tobytes(), np.uint8).reshape(image.height, image.width, -1)
    return array.transpose(2, 0, 1)


# ----------------------------------------------------------------------------- raw images
# Image encodings a recipe may choose at shard time (``--encoding``). ``npy``: the uint8 image
# as a ``.npy`` file, C-order (C, H, W) -- the layout the loader's batches have, so decoding is
# a header check and a reshape of the bytes. The manifest's spec marks such a file
# ``{"kind": "image", "encoding": "npy", ...}`` (a ``.npy`` without it is a float array).
IMAGE_ENCODINGS = ("png", "npy")
NPY_LAYOUT = "CHW"
_NPY_HEADER_MAX = 4096  # numpy writes 128 bytes for any image shape; a longer header is hostile


def encode_npy_image(image_chw: np.ndarray) -> bytes:
    """(C, H, W) uint8 -> ``.npy`` bytes (C order; what np.save writes)."""
    image = np.asarray(image_chw)
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"expected a uint8 (C, H, W) image, got {image.dtype} {image.shape}")
    return npy_header(image.shape) + np.ascontiguousarray(image).tobytes()


def npy_header(shape, dtype="uint8") -> bytes:
    """The exact header numpy writes before a C-order array of ``shape`` and ``dtype``: the
    loader's fast path compares it byte for byte (:class:`mmvae.data.decode.Decode`)."""
    buf = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": tuple(int(n) for n in shape)}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


def decode_npy_image(data: bytes) -> np.ndarray:
    """``.npy`` bytes -> the array they hold, refusing what ``np.load`` would trust: the
    header is parsed alone (never unpickled: object dtypes are refused) and the payload must
    have exactly the bytes the header announces before anything is allocated (a hostile
    header cannot ask for terabytes). dtype and shape are the spec check's job."""
    stream = io.BytesIO(data)
    major, _ = np.lib.format.read_magic(stream)
    if major not in (1, 2, 3):
        raise ValueError(f"unsupported .npy format version {major}")
    read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(stream, max_header_size=_NPY_HEADER_MAX)
    if dtype.hasobject:
        raise ValueError(f"object dtype {dtype} refused (it would be unpickled); images are uint8")
    if dtype.itemsize == 0 or any(n < 0 for n in shape):
        raise ValueError(f"invalid array header (dtype {dtype}, shape {shape})")
    count = math.prod(shape)
    offset = stream.tell()
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError(f"the header announces {count * dtype.itemsize} bytes of data, the file "
                         f"holds {len(data) - offset} (truncated or padded)")
    array = np.frombuffer(data, dtype, count, offset)
    return array.reshape(shape[::-1]).transpose() if fortran else array.reshape(shape)


def decode_value(ext: str, data: bytes, encoding: str | None = None) -> tuple[str, Any]:
    """Decode one payload by its (last) file extension into (kind, value); ``encoding="npy"``
    (from the manifest's spec) reads a ``.npy`` as a uint8 image rather than a float array."""
    last = ext.rsplit(".", 1)[-1].lower()
    if last in IMAGE_EXTS:
        return "image", decode_image(data, last)
    if last == "cls":
        return "int", int(data.decode("utf-8").strip())
    if last == "npy" and encoding == "npy":
        return "image", decode_npy_image(data)
    if last == "npy":
        return "array", np.load(io.BytesIO(data), allow_pickle=False)
    if last == "json":
        value = json.loads(data)
        if isinstance(value, list) and value and all(type(v) is int for v in value):
            return "ints", np.asarray(value, dtype=np.int64)  # token ids: batched to int64 (B, L)
        return "json", value
    if last == "txt":
        return "text", data.decode("utf-8")
    return "bytes", data


def spec_of(kind: str, value, encoding: str | None = None) -> dict:
    """The spec a decoded value sets (used on the first sample written); images record the
    ``encoding`` of their file (png, jpg, npy: how readers decode it)."""
    if kind in ("image", "array", "ints"):
        spec = {"kind": kind, "shape": list(value.shape), "dtype": str(value.dtype)}
        if kind == "image" and encoding:
            spec["encoding"] = encoding
            if encoding == "npy":
                spec["layout"] = NPY_LAYOUT
        return spec
    return {"kind": kind}


def image_encoding(key: str, spec: dict | None) -> str | None:
    """How file ``key`` decodes as the spec says: ``"npy"`` for a raw image, else None (by
    its extension)."""
    if spec and spec.get("kind") == "image" and spec.get("encoding") == "npy" and key.endswith(".npy"):
        return "npy"
    return None


def check_value(key: str, kind: str, value, spec: dict | None) -> str | None:
    """Why ``value`` (decoded from file ``key``) breaks ``spec``, or None if it fits. Float
    arrays must be finite whatever the spec says."""
    if spec is not None:
        if kind != spec.get("kind", kind):
            return f"{key} decodes to {kind}, the spec says {spec['kind']}"
        shape = spec.get("shape")
        if shape is not None and list(value.shape) != list(shape):
            noun = "ids" if kind == "ids" else "shape"
            got = value.shape[0] if kind == "ids" else tuple(value.shape)
            return f"{key} has {noun} {got}, the spec says {shape[0] if kind == 'ids' else tuple(shape)}"
        dtype = spec.get("dtype", _KIND_DTYPE.get(kind))
        if dtype is not None and hasattr(value, "dtype") and value.dtype != np.dtype(dtype):
            return f"{key} has dtype {value.dtype}, the spec says {dtype}"
    if kind == "array" and value.dtype.kind in "fc" and not np.isfinite(value).all():
        return f"{key} holds non-finite values (NaN or inf)"
    return None


def compile_spec(spec: dict) -> tuple:
    """(kind, shape tuple or None, numpy dtype or None) for :func:`fits`."""
    kind = spec.get("kind")
    shape = tuple(spec["shape"]) if spec.get("shape") is not None else None
    dtype = spec.get("dtype", _KIND_DTYPE.get(kind))
    return kind, shape, np.dtype(dtype) if dtype is not None else None


def fits(kind: str, value, compiled: tuple) -> bool:
    """Fast path of :func:`check_value` (a few comparisons per value: the loader calls it for
    every value). False means "ask check_value why". Finite test of float arrays: a dot
    product with zeros is NaN if and only if a value is NaN or inf (IEEE), ~3x faster than
    ``np.isfinite(x).all()``."""
    want_kind, shape, dtype = compiled
    if kind != want_kind:
        return False
    if shape is not None and value.shape != shape:
        return False
    if dtype is not None and value.dtype != dtype:
        return False
    if kind == "array" and value.dtype.kind in "fc":
        flat = value.reshape(-1)
        zeros = _ZEROS.get((flat.size, flat.dtype))
        if zeros is None:
            zeros = _ZEROS[(flat.size, flat.dtype)] = np.zeros(flat.size, flat.dtype)
        return math.isfinite(abs(np.dot(flat, zeros)))
    return True


def sample_spec(sample: dict, npy_images=()) -> dict:
    """Spec of every file of one raw sample (``{"__key__": ..., "mnist.png": bytes, ...}``);
    the keys in ``npy_images`` are raw ``.npy`` images (encoding ``npy``)."""
    spec = {}
    for key, data in sample.items():
        if key.startswith("__"):
            continue
        ext = key.partition(".")[2]
        encoding = "npy" if key in npy_images else None
        kind, value = decode_value(ext, data, encoding)
        spec[key] = spec_of(kind, value, encoding or (ext.rsplit(".", 1)[-1].lower() if kind == "image" else None))
    return spec
