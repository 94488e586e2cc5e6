"""Dataset recipes: how raw datasets become paired samples (pure functions + builders).

``pair_by_class`` is numpy-only and imported eagerly; ``build_digits`` pulls in Pillow and
scikit-learn, so it is resolved lazily on first access.
"""
from mmvae.data.recipes.pairing import expected_num_pairs, pair_by_class

__all__ = ["pair_by_class", "expected_num_pairs", "build_digits"]


def __getattr__(name):
    if name == "build_digits":
        from mmvae.data.recipes.digits import build_digits

        return build_digits
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
