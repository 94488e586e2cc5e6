"""PNG grids of reconstructions and prior samples (REFERENCE.md §5: ``reconstruct``, generate).

Called by the trainer every test epoch and by ``evaluate``, so it stays cheap: one encoder pass,
M*M decoder calls on n images, and torchvision's ``make_grid``/``save_image``. Modalities of
different sizes and channels are put side by side as the paper does: each image is padded
(centred) to the largest height/width and grey images are repeated to RGB, so MNIST 28x28 sits
next to SVHN 32x32. Modalities that are not images (C, H, W) (e.g. the linear-Gaussian toys)
have no picture: the functions then write nothing and return [].
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torchvision.utils import make_grid, save_image

from mmvae.eval import eval_mode


def is_image_model(model) -> bool:
    """Every modality is an image (C, H, W) with C in {1, 3}."""
    return all(len(e.data_shape) == 3 and e.data_shape[0] in (1, 3) for e in model.experts)


def _canvas(model) -> tuple[int, int]:
    """The common (H, W) every modality is padded to."""
    return (max(e.data_shape[1] for e in model.experts),
            max(e.data_shape[2] for e in model.experts))


def to_rgb_canvas(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(n, C, h, w) in [0, 1] -> (n, 3, H, W): centred zero padding, grey repeated to RGB."""
    images = images.detach().float().cpu().clamp(0, 1)
    H, W = size
    top, left = (H - images.shape[-2]) // 2, (W - images.shape[-1]) // 2
    images = F.pad(images, (left, W - images.shape[-1] - left, top, H - images.shape[-2] - top))
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def reconstruction_grid(model, xs: Sequence[torch.Tensor], n: int = 8) -> tuple[torch.Tensor, list[str]]:
    """All rows of the reconstruction figure, (rows * n, 3, H, W), and one caption per row.

    For every expert r (a block of M + 1 rows): the n inputs x_r, then for every modality d
    the decoder-d mean of one posterior sample z ~ q_r(z | x_r) (d = r: reconstruction;
    d != r: cross-generation).
    """
    xs = [x[:n] for x in xs]
    with eval_mode(model):
        grid = model.reconstruct(xs)  # grid[r][d]: (n, C_d, H_d, W_d)
    size, names = _canvas(model), model.modalities
    rows, captions = [], []
    for r, (x, decoded) in enumerate(zip(xs, grid)):
        rows.append(to_rgb_canvas(x, size))
        captions.append(f"input {names[r]}")
        for d, images in enumerate(decoded):
            rows.append(to_rgb_canvas(images, size))
            captions.append(f"{names[d]} decoded from q_{names[r]}(z|x_{names[r]})")
    return torch.cat(rows), captions


def save_reconstructions(model, xs: Sequence[torch.Tensor], path, n: int = 8) -> list[Path]:
    """Write the reconstruction/cross-generation grid to `path` (PNG) and its row captions to
    `path` with suffix .txt. xs: one batch per modality (model.modalities order), (B, C, H, W)
    in [0, 1]. Returns the written paths ([] for non-image models)."""
    if not is_image_model(model):
        return []
    xs = list(xs)
    n = min(n, xs[0].shape[0])
    images, captions = reconstruction_grid(model, xs, n)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, path, nrow=n, padding=2, pad_value=1.0)
    caption = path.with_suffix(".txt")
    caption.write_text("rows, top to bottom:\n" + "\n".join(captions) + "\n")
    return [path, caption]


def save_prior_samples(model, path, n: int = 64, generator: torch.Generator | None = None) -> list[Path]:
    """Decoder means of n prior samples z ~ p(z) (the same z for every modality), one square
    grid per modality written to ``<stem>_<modality>.png`` next to `path`. Returns the paths
    ([] for non-image models)."""
    if not is_image_model(model):
        return []
    with eval_mode(model):
        samples = model.generate(n, generator)  # per modality (n, C, H, W)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nrow = max(1, round(n ** 0.5))
    written = []
    for name, images in zip(model.modalities, samples):
        out = path.with_name(f"{path.stem}_{name}.png")
        save_image(make_grid(images.float().cpu().clamp(0, 1), nrow=nrow, padding=2,
                             pad_value=1.0), out)
        written.append(out)
    return written
