"""Image classifiers for the coherence metrics (REFERENCE.md §6, ``analyse_ms``).

The paper's small conv net, for a (C, S, S) digit image (MNIST: C=1, S=28; SVHN: C=3, S=32):

    Conv(C->10, 5) -> maxpool 2 -> ReLU -> Conv(10->20, 5) -> Dropout2d -> maxpool 2 -> ReLU
    -> flatten (20 * s^2, s = ((S - 4) // 2 - 4) // 2: 320 for MNIST, 500 for SVHN)
    -> Linear(., 50) -> ReLU -> Dropout(0.5) -> Linear(50, 10) -> log_softmax

trained with Adam (lr 1e-3) on the negative log-likelihood. The paper trains 30 epochs over the
1.68M *duplicated* MNIST-SVHN pairs; here the classifiers see the *unique* train images of each
modality (``unique_train.npz`` next to the shards), which carries the same information at a
fraction of the cost (REFERENCE.md §9.9). They are cached next to the shards as
``<shards>/classifiers/{modality}.pt`` (a state_dict, loaded with ``weights_only=True``) and
``{modality}.json`` (architecture, seed, epochs and test accuracy on ``unique_test.npz``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmvae.log import track

NUM_CLASSES = 10
CACHE_DIR = "classifiers"


class DigitClassifier(nn.Module):
    """The paper's digit classifier for (C, S, S) images in [0, 1]; returns log-probabilities."""

    def __init__(self, in_channels: int = 1, size: int = 28, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.in_channels, self.size = in_channels, size
        s = ((size - 4) // 2 - 4) // 2
        if s < 1:
            raise ValueError(f"images of size {size} are too small for the digit classifier")
        self.conv1 = nn.Conv2d(in_channels, 10, 5)
        self.conv2 = nn.Conv2d(10, 20, 5)
        self.drop2d = nn.Dropout2d()
        self.fc1 = nn.Linear(20 * s * s, 50)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(50, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(F.max_pool2d(self.conv1(x), 2))              # (B, 10, (S-4)/2, .)
        h = F.relu(F.max_pool2d(self.drop2d(self.conv2(h)), 2))  # (B, 20, s, s)
        h = self.drop(F.relu(self.fc1(h.flatten(1))))             # (B, 50)
        return F.log_softmax(self.fc2(h), dim=-1)                 # (B, 10)


def as_float_images(images) -> torch.Tensor:
    """uint8 (0..255) or float (0..1) arrays/tensors -> float32 tensor in [0, 1]."""
    images = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images)
    return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()


@torch.no_grad()
def predict(net: nn.Module, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Predicted classes (N,) for images (N, C, H, W) in [0, 1]; the net in eval mode."""
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    out = [net(images[i:i + batch_size].to(device)).argmax(-1).cpu()
           for i in range(0, images.shape[0], batch_size)]
    net.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def accuracy(net: nn.Module, images, labels) -> float:
    """Fraction of correctly classified images."""
    labels = torch.as_tensor(np.asarray(labels) if not torch.is_tensor(labels) else labels)
    return (predict(net, as_float_images(images)) == labels.long()).float().mean().item()


def train_classifier(images, labels, *, epochs: int = 30, batch_size: int = 128, lr: float = 1e-3,
                     seed: int = 0, device: str | torch.device = "cpu") -> DigitClassifier:
    """Train a `DigitClassifier` on images (N, C, S, S) (uint8 or [0, 1] floats) and labels (N,).

    Seeded: the initialisation and the minibatch order come from `seed` alone.
    """
    x = as_float_images(images)
    y = torch.as_tensor(np.asarray(labels)).long()
    if x.dim() != 4 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"expected square images (N, C, S, S), got {tuple(x.shape)}")
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # dropout masks and init
        net = DigitClassifier(x.shape[1], x.shape[-1]).to(device)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        net.train()
        # shown when the caller's progress bar is on (evaluation, training)
        for _ in track(range(epochs), f"classifier training ({len(x)} images)", epochs,
                       enabled=False):
            for idx in torch.randperm(len(x), generator=generator).split(batch_size):
                loss = F.nll_loss(net(x[idx].to(device)), y[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return net.eval()


# --- unique images and the on-disk cache -------------------------------------------------------

def load_unique(shards_dir, split: str, modalities: Sequence[str],
                target: str = "") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``unique_{split}.npz`` of a shard folder: modality -> (images uint8 (N, C, H, W), labels
    (N,)), from the arrays ``{modality}`` and ``{modality}_labels`` (or, with ``target``, the
    array ``target``: e.g. the shapes datasets' ``colour``)."""
    path = Path(shards_dir) / f"unique_{split}.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: coherence needs the unique images that "
                                "digit and shapes shard recipes write (launch/shard_demo.py)")
    with np.load(path, allow_pickle=False) as npz:
        missing = [m for m in modalities if m not in npz or (target or f"{m}_labels") not in npz]
        if missing:
            raise KeyError(f"{path} lacks images/labels of {', '.join(missing)}; has {', '.join(npz.files)}")
        return {m: (npz[m], npz[target or f"{m}_labels"].astype(np.int64)) for m in modalities}


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    torch.save(obj, tmp) if path.suffix == ".pt" else tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def _load_cached(folder: Path, name: str, shape: Sequence[int] | None):
    """(net, info) from the cache, or None if absent or made for other (C, S) images."""
    weights, meta = folder / f"{name}.pt", folder / f"{name}.json"
    if not (weights.is_file() and meta.is_file()):
        return None
    info = json.loads(meta.read_text())
    if shape is not None and (info.get("in_channels"), info.get("size")) != (shape[0], shape[-1]):
        return None  # a classifier for other images: retrain
    net = DigitClassifier(info["in_channels"], info["size"])
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return net.eval(), info


def load_or_train_classifiers(shards_dir, modalities: Sequence[str], *, epochs: int = 30,
                              seed: int = 0, retrain: bool = False, cache_dir=None,
                              image_shapes: dict | None = None, target: str = "",
                              device: str | torch.device = "cpu") -> tuple[dict, dict]:
    """Classifiers of `modalities`' images: ({modality: net}, {modality: info}).

    Loaded from ``<cache_dir or shards_dir/classifiers>/{name}.pt`` when present (and, if
    `image_shapes` gives the modality's (C, H, W), made for that shape), else trained on
    ``unique_train.npz``, scored on ``unique_test.npz`` and written there (atomically).
    ``info["test_accuracy"]`` is recorded. The labels are ``{modality}_labels`` (name: the
    modality) or, with ``target``, that array (name: ``{modality}-{target}``).
    """
    folder = Path(cache_dir) if cache_dir is not None else Path(shards_dir) / CACHE_DIR
    image_shapes = image_shapes or {}
    nets, infos = {}, {}
    for m in modalities:
        name = f"{m}-{target}" if target else m
        cached = None if retrain else _load_cached(folder, name, image_shapes.get(m))
        if cached is None:
            (x_tr, y_tr), = load_unique(shards_dir, "train", [m], target).values()
            (x_te, y_te), = load_unique(shards_dir, "test", [m], target).values()
            net = train_classifier(x_tr, y_tr, epochs=epochs, seed=seed, device=device).cpu()
            info = {"modality": m, "target": target or f"{m}_labels", "in_channels": net.in_channels, "size": net.size,
                    "epochs": epochs, "seed": seed, "trained_on": "unique_train.npz",
                    "train_images": int(len(y_tr)), "test_images": int(len(y_te)),
                    "test_accuracy": accuracy(net, x_te, y_te)}
            folder.mkdir(parents=True, exist_ok=True)
            _atomic_save(net.state_dict(), folder / f"{name}.pt")
            _atomic_save(info, folder / f"{name}.json")
            cached = net, info
        nets[m], infos[m] = cached
    return {m: n.to(device) for m, n in nets.items()}, infos
