"""Where the real datasets, the ResNet weights and the paper's models are published, and what
each file must be (for `mmvae.data.download.fetch`).

MNIST's and SVHN's URLs and MD5s are read from torchvision's dataset classes at run time
(``MNIST.mirrors``/``MNIST.resources``, ``SVHN.split_list``) rather than copied here; the sizes
are the publishers' (MNIST's page, SVHN's files). The ResNet-101 weights are checked against
the sha256 prefix in their torchvision file name. The authors of the paper publish no checksums
for ``cub.zip`` and the pretrained zips: their sha256 is recorded on first download
(``<file>.sha256``) and checked on every later run, and zip's per-member CRC-32 is checked on
extraction.
"""
from __future__ import annotations

import re
from pathlib import Path

from mmvae.data.download import Resource, fetch
from mmvae.data.extract import extract
from mmvae.data.recipes.common import InputError

MNIST_SIZES = {"train-images-idx3-ubyte.gz": 9_912_422, "train-labels-idx1-ubyte.gz": 28_881,
               "t10k-images-idx3-ubyte.gz": 1_648_877, "t10k-labels-idx1-ubyte.gz": 4_542}
SVHN_SIZES = {"train_32x32.mat": 182_040_794, "test_32x32.mat": 64_275_384}
CUB_ZIP = Resource("cub.zip", ("http://www.robots.ox.ac.uk/~yshi/mmdgm/datasets/cub.zip",),
                   note="the paper authors' cleaned CUB (no published checksum)")
PRETRAINED_BASE = "http://www.robots.ox.ac.uk/~yshi/mmdgm/pretrained_models/"
PRETRAINED = {name: Resource(f"{name}.zip", (f"{PRETRAINED_BASE}{name}.zip",),
                             note="the paper's pretrained model (no published checksum)")
              for name in ("mnist-svhn", "cubIS", "cubISft")}
"""The paper's released models (seed-README.md, "Pretrained network")."""


def mnist_resources() -> list[Resource]:
    from torchvision.datasets import MNIST

    return [Resource(name, tuple(m + name for m in MNIST.mirrors), f"md5:{md5}", MNIST_SIZES.get(name))
            for name, md5 in MNIST.resources]


def svhn_resources() -> list[Resource]:
    from torchvision.datasets import SVHN

    out = []
    for split in ("train", "test"):
        url, name, md5 = SVHN.split_list[split]
        out.append(Resource(name, (url,), f"md5:{md5}", SVHN_SIZES.get(name)))
    return out


def resnet101_resource() -> Resource:
    from torchvision.models import ResNet101_Weights

    url = ResNet101_Weights.IMAGENET1K_V1.url
    name = url.rsplit("/", 1)[-1]
    prefix = re.search(r"-([0-9a-f]{8,})\.", name)  # torch.hub's convention: sha256 prefix
    return Resource(name, (url,), f"sha256:{prefix.group(1)}" if prefix else None)


def fetch_mnist_svhn(folder, **kwargs) -> tuple[Path, Path]:
    """Download MNIST (4 idx.gz files) into folder/mnist and SVHN (train, test .mat) into
    folder/svhn; returns the two folders, as `build_mnist_svhn` reads them."""
    folder = Path(folder)
    for resource in mnist_resources():
        fetch(resource, folder / "mnist", **kwargs)
    for resource in svhn_resources():
        fetch(resource, folder / "svhn", **kwargs)
    return folder / "mnist", folder / "svhn"


def _cub_root(folder: Path) -> Path | None:
    for candidate in (folder / "cub", folder):
        if (candidate / "text_trainvalclasses.txt").is_file():
            return candidate
    return None


def fetch_cub(folder, **kwargs) -> Path:
    """Download cub.zip into `folder`, extract it safely once, return the CUB folder (holding
    train/, test/, text_*.txt)."""
    folder = Path(folder)
    archive = fetch(CUB_ZIP, folder, **kwargs)
    marker = folder / ".cub.zip.extracted"
    if not marker.is_file() or _cub_root(folder) is None:
        extract(archive, folder)
        marker.write_text("done\n")
    root = _cub_root(folder)
    if root is None:
        raise InputError(f"{archive} did not hold text_trainvalclasses.txt (in cub/ or at its top): "
                         f"not the authors' cleaned CUB; delete it and download again")
    return root


def fetch_resnet101(folder, **kwargs) -> Path:
    """The torchvision ImageNet ResNet-101 weights (for cubISft features) in `folder`."""
    return fetch(resnet101_resource(), folder, **kwargs)


def fetch_pretrained(name: str, folder, **kwargs) -> Path:
    """One of the paper's released models (`PRETRAINED`) as a zip in `folder`."""
    if name not in PRETRAINED:
        raise InputError(f"no released model {name!r}; choose one of {', '.join(PRETRAINED)}")
    return fetch(PRETRAINED[name], folder, **kwargs)
