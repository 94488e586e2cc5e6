"""Dataset recipes: how raw datasets become paired samples (pure functions + builders).

``pair_by_class`` is numpy-only and imported eagerly; the builders pull in Pillow, scipy,
nltk, torch or scikit-learn, so they are resolved lazily on first access.
"""
from importlib import import_module

from mmvae.data.recipes.pairing import expected_num_pairs, pair_by_class

_BUILDERS = {
    "build_digits": "mmvae.data.recipes.digits",
    "build_mnist_svhn": "mmvae.data.recipes.mnist_svhn",
    "build_cub": "mmvae.data.recipes.cub",
    "build_shapes": "mmvae.data.recipes.shapes",
    "build_polydigits": "mmvae.data.recipes.polydigits",
    "build_polymnist": "mmvae.data.recipes.polymnist",
    "InputError": "mmvae.data.recipes.common",
}

__all__ = ["pair_by_class", "expected_num_pairs", *_BUILDERS]


def __getattr__(name):
    if name in _BUILDERS:
        return getattr(import_module(_BUILDERS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
