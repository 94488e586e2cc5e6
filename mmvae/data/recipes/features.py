"""ResNet-101 image features for cubISft (REFERENCE.md §4 "Features"), from local weights.

The paper: torchvision ``resnet101`` with ImageNet weights, fc removed (the 2048-d avgpool
output), images through ``Resize(224)`` (shorter side only, no crop) and ``ToTensor`` with
**no** ImageNet normalisation (``imagenet_norm=True`` adds it). Images of different sizes are
batched by their resized size (the avgpool is adaptive, so any size gives 2048 values).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

from mmvae.data.recipes.common import InputError

FEATURE_DIM = 2048
RESIZE = 224
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
WEIGHTS_HELP = ("download https://download.pytorch.org/models/resnet101-63fe2227.pth (torchvision "
                "ResNet101_Weights.IMAGENET1K_V1, the ImageNet weights the paper used) on a machine with "
                "internet, copy it to e.g. data/weights/ and pass --weights data/weights/resnet101-63fe2227.pth "
                "(--random-weights only for tests)")


def resized_size(width: int, height: int, size: int = RESIZE) -> tuple[int, int]:
    """(height, width) after torchvision's ``Resize(size)``: shorter side -> size, the longer
    side -> int(size * long / short)."""
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def _state_dict(obj):
    """Accept a plain state_dict or a checkpoint wrapping one (``state_dict``/``model``);
    strip a DataParallel ``module.`` prefix."""
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise TypeError(f"expected a state_dict, got {type(obj).__name__}")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _load_weights(path: Path):
    """resnet101() with the weights of the local file ``path``; any problem -> InputError."""
    import torch
    from torchvision.models import resnet101

    if not path.is_file():
        raise InputError(f"ResNet-101 weights file {path} not found: {WEIGHTS_HELP}")
    try:
        state = _state_dict(torch.load(path, map_location="cpu", weights_only=True))
        model = resnet101()
        result = model.load_state_dict(state, strict=False)
    except Exception as exc:  # noqa: BLE001 - unpickling and shape errors alike
        problem = " ".join(f"{type(exc).__name__}: {exc}".split())[:240]
    else:
        missing, unexpected = result.missing_keys, result.unexpected_keys
        if not missing and not unexpected:
            return model
        problem = (f"{len(missing)} missing keys e.g. {missing[:2]}, "
                   f"{len(unexpected)} unexpected keys e.g. {unexpected[:2]}")
    raise InputError(f"cannot load {path} as torchvision resnet101 weights ({problem}); {WEIGHTS_HELP}")


def load_resnet101(weights=None, *, seed: int = 0, device="cpu"):
    """torchvision ``resnet101()`` with fc = Identity, in eval mode on ``device``: weights from
    the local file ``weights`` (loaded with ``weights_only=True``), or seeded random weights
    when ``weights`` is None (tests only)."""
    import torch
    from torchvision.models import resnet101

    if weights is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = resnet101()
    else:
        model = _load_weights(Path(weights))
    model.fc = torch.nn.Identity()
    return model.eval().to(device)


@contextlib.contextmanager
def _full_fp32():
    """No TF32 inside: features match the paper's fp32 CPU computation to ~1e-6, not ~1e-3."""
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class FeatureExtractor:
    """Call with a (B, 3, H, W) float batch in [0, 1] -> (B, 2048) float32 numpy."""

    def __init__(self, weights=None, *, imagenet_norm: bool = False, seed: int = 0, device=None):
        import torch

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = load_resnet101(weights, seed=seed, device=self.device)
        self.imagenet_norm = imagenet_norm
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    def __call__(self, batch):
        import torch

        with torch.inference_mode(), _full_fp32():
            x = batch.to(self.device, non_blocking=True).float()
            if self.imagenet_norm:
                x = (x - self.mean) / self.std
            return self.model(x).float().cpu().numpy()   # (B, 2048)
