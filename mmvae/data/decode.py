"""Decoding and collation, the pipeline's sample -> batch stages (`mmvae.data.pipeline` lists
them in order): ``decode`` turns each selected payload into a value by its extension and checks
it against the manifest's modality spec, ``batch`` collates samples, ``tensors`` turns numpy
into torch, and ``images_to_float`` finishes the images in the main process."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mmvae.data.errors import ErrorCounter, describe
from mmvae.data.samples import (check_value, compile_spec, decode_value, fits, image_encoding, npy_header,
                                spec_of)


class Decode:
    """Stage ``decode``: every selected payload by extension, then checked against the
    manifest's modality spec (shape, dtype, caption length; float arrays must be finite). A
    failure is reported with shard, key and reason and the sample dropped, so a batch only
    ever holds samples that fit together. Without a spec in the manifest (folders built before
    it existed), the first good value of each key in this worker sets it.

    Raw ``.npy`` images (spec ``encoding: npy``) take a fast path: a payload that is exactly
    the header numpy writes for the spec's uint8 shape plus that many bytes *is* a fitting
    image, a view of the bytes; anything else goes through the full, refusing decoder
    (:func:`mmvae.data.samples.decode_npy_image`) and the same checks as any image."""

    def __init__(self, errors: ErrorCounter, spec: dict | None):
        self.errors, self.spec, self.learn = errors, dict(spec or {}), spec is None
        self._compiled = {key: compile_spec(value) for key, value in self.spec.items()}
        self._encoding = {key: image_encoding(key, value) for key, value in self.spec.items()}
        self._raw = {key: self._raw_image(value) for key, value in self.spec.items() if self._encoding[key]}

    @staticmethod
    def _raw_image(spec: dict) -> tuple | None:
        """(header, total bytes, shape) of a fitting raw image, or None if the spec has no
        plain uint8 shape (then every payload takes the full decoder)."""
        shape = spec.get("shape")
        if spec.get("dtype", "uint8") != "uint8" or not isinstance(shape, list) \
                or not all(type(n) is int and n > 0 for n in shape):
            return None
        header = npy_header(shape)
        return header, len(header) + int(np.prod(shape)), tuple(shape)

    def _decode(self, stem: str, ext: str, data: bytes):
        key = stem if "." in stem else f"{stem}.{ext}"
        raw = self._raw.get(key)
        if raw is not None and len(data) == raw[1] and data.startswith(raw[0]):
            return ("image", np.frombuffer(data, np.uint8, offset=len(raw[0])).reshape(raw[2])), None, None
        try:
            kind, value = decode_value(ext, data, self._encoding.get(key))
        except Exception as exn:  # noqa: BLE001 - corrupt image, bad int, bad json, not UTF-8
            return None, f"cannot decode {key} ({describe(exn)})", exn
        compiled = self._compiled.get(key)
        if compiled is not None and fits(kind, value, compiled):
            return (kind, value), None, None
        why = check_value(key, kind, value, self.spec.get(key))  # the reason, or a spec to learn
        if why is None and compiled is None and self.learn:
            self.spec[key] = spec_of(kind, value)
            self._compiled[key] = compile_spec(self.spec[key])
        return (kind, value), why, None

    def __call__(self, src):
        for sample in src:
            out = {"__key__": sample["__key__"]}
            for stem, value in sample.items():
                if stem[:2] == "__":
                    continue
                out[stem], why, exn = self._decode(stem, *value)
                if why is not None:
                    self.errors.sample(sample["__url__"], sample["__key__"], why, exn)
                    break
            else:
                yield out


def collate(samples: list[dict]) -> dict:
    """Stage ``batch`` (collation): stack images/arrays/id lists, gather ints; other json and
    text stay lists."""
    batch: dict[str, Any] = {"__key__": [s["__key__"] for s in samples]}
    for stem in samples[0]:
        if stem.startswith("__"):
            continue
        kind = samples[0][stem][0]
        values = [s[stem][1] for s in samples]
        if kind in ("image", "array", "mask"):  # mask: presence rows -> (B, M) bool
            values = np.stack(values)
        elif kind == "ints":  # equal lengths stack to (B, L); ragged lists stay a list of arrays
            values = np.stack(values) if len({v.shape for v in values}) == 1 else values
        elif kind == "int":
            values = np.asarray(values, dtype=np.int64)
        batch[stem] = (kind, values)
    return batch


class ToTensors:
    """Stage ``tensors``: images -> uint8 tensors, arrays -> float32, ints and JSON lists of
    ints (token ids) -> int64."""

    def __init__(self, return_keys: bool):
        self.return_keys = return_keys

    def __call__(self, src):
        for batch in src:
            out = {"__key__": batch["__key__"]} if self.return_keys else {}
            for stem, value in batch.items():
                if stem.startswith("__"):
                    continue
                kind, value = value
                if kind == "image":  # stays uint8 until the main process: see images_to_float
                    value = torch.from_numpy(value)
                elif kind == "array":
                    value = torch.from_numpy(np.ascontiguousarray(value)).float()
                elif kind == "mask":
                    value = torch.from_numpy(value)
                elif kind in ("int", "ints"):
                    value = (torch.from_numpy(value) if isinstance(value, np.ndarray)
                             else [torch.from_numpy(v) for v in value])
                out[stem] = value
            yield out


def images_to_float(batch: dict) -> dict:
    """Last step, in the main process: uint8 image tensors -> float32 in [0, 1]. Images cross
    the worker -> main pipe as uint8 (4× less data; measurably faster with workers), and numpy
    converts ~50× faster than torch's ``.float()`` on a 2-thread CPU."""
    for name, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dtype == torch.uint8:
            batch[name] = torch.from_numpy(np.multiply(value.numpy(), np.float32(1 / 255), dtype=np.float32))
    return batch
