"""Data layer: shard writing/checking, the streaming WebDataset pipeline, dataset recipes.

Public names are resolved lazily (PEP 562) so that ``import mmvae.data`` and
``python -m mmvae.data verify`` do not import torch, webdataset, Pillow or scikit-learn until
they are needed (the GPU machine may lack some of them).
"""
from importlib import import_module

_EXPORTS = {
    "write_shards": "mmvae.data.writer",
    "write_manifest": "mmvae.data.writer",
    "read_manifest": "mmvae.data.manifest",
    "verify_shards": "mmvae.data.checks",
    "check_shards": "mmvae.data.checks",
    "ShardsError": "mmvae.data.errors",
    "ShardsNotFound": "mmvae.data.errors",
    "make_loader": "mmvae.data.pipeline",
    "Loader": "mmvae.data.pipeline",
    "ShardDataError": "mmvae.data.errors",
    "pair_by_class": "mmvae.data.recipes.pairing",
    "expected_num_pairs": "mmvae.data.recipes.pairing",
    "build_digits": "mmvae.data.recipes.digits",
    "build_mnist_svhn": "mmvae.data.recipes.mnist_svhn",
    "build_cub": "mmvae.data.recipes.cub",
    "build_shapes": "mmvae.data.recipes.shapes",
    "build_polydigits": "mmvae.data.recipes.polydigits",
    "build_polymnist": "mmvae.data.recipes.polymnist",
    "InputError": "mmvae.data.recipes.common",
    "ensure_builtin": "mmvae.data.builtin",
    "BUILTINS": "mmvae.data.builtin",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
