"""Built-in datasets that can be generated offline on first use (no download)."""
from __future__ import annotations

import logging
from pathlib import Path

from functools import partial

from mmvae.data.recipes.digits import build_digits
from mmvae.data.recipes.polydigits import build_polydigits
from mmvae.data.recipes.shapes import build_shapes
from mmvae.data.writer import MANIFEST, read_manifest

log = logging.getLogger(__name__)

# name -> builder(out_dir, **kwargs) returning the manifest. digits: MNIST-SVHN-shaped pairs;
# shapes: CUB-shaped image-caption pairs; shapes_ft: shapes + 2048-d stand-in features (cubISft);
# shapes_simple: one centred object per image and three fixed phrasings (the caption demo);
# polydigits: PolyMNIST-shaped, five textured modalities m0..m4 of one digit class.
BUILTINS = {"digits": build_digits, "shapes": build_shapes, "shapes_ft": partial(build_shapes, features=True),
            "shapes_simple": partial(build_shapes, simple=True), "polydigits": build_polydigits}


def ensure_builtin(shards_dir, dataset: str, **build_kwargs) -> dict:
    """Return the manifest of ``shards_dir``, building built-in ``dataset`` there first if the
    folder has no manifest yet (call on the main process only; others wait at a barrier).

    Raises:
        ValueError: no manifest and ``dataset`` is not a built-in (lists the valid names).
    """
    if (Path(shards_dir) / MANIFEST).is_file():
        manifest = read_manifest(shards_dir)
        if manifest["dataset"] != dataset:
            log.warning("%s holds dataset %r, not %r", shards_dir, manifest["dataset"], dataset)
        return manifest
    if dataset not in BUILTINS:
        raise ValueError(f"no manifest in {shards_dir} and {dataset!r} is not a built-in dataset "
                         f"(built-ins: {', '.join(sorted(BUILTINS))}); build its shards with its "
                         f"launch/shard_*.py script")
    log.info("building built-in dataset %r in %s", dataset, shards_dir)
    return BUILTINS[dataset](shards_dir, **build_kwargs)
