"""PNG grids of reconstructions and prior samples (REFERENCE.md §5: ``reconstruct``, generate).

Called by the trainer every test epoch and by ``evaluate``, so it stays cheap: one encoder pass,
M*M decoder calls on n images, and torchvision's ``make_grid``/``save_image``. Modalities of
different sizes and channels are put side by side as the paper does: each image is padded
(centred) to the largest height/width and grey images are repeated to RGB, so MNIST 28x28 sits
next to SVHN 32x32. Reconstruction grids label their rows ("input mnist", "mnist
reconstruction", "mnist -> svhn", ...) and every image is drawn `SCALE` times its size.
Modalities that are not images (C, H, W) (e.g. the linear-Gaussian toys) have no picture: the functions then write nothing and return [].

Models with captions or ResNet features (cubIS, cubISft, cub_sentence, cub_image_ft) are shown
as "panels": images as they are, features as their nearest training image (`feature_index`, a
`mmvae.eval.display.FeatureIndex`; without one a feature modality is not drawn) and captions as
text (`vocab`, the shards' ``itos``; without one the token ids are printed). Their files:

* ``recon_XXX.png``: the image rows (inputs, reconstructions, cross-generations) as a grid,
  ``recon_XXX.txt``: those rows' captions, then every caption row as text, one line per item;
  ``recon_XXX_pairs.png``: all rows, images and captions together, in one figure;
* ``prior_XXX_<modality>.png`` per image/feature modality, ``prior_XXX_caption.txt``, and
  ``prior_XXX_pairs.png``: the first 16 prior samples as image-caption pairs;
* ``recon_XXX_captions.json`` / ``prior_XXX_captions.json``: the captions as a table,
  ``{"columns": ["item", <caption row labels>...], "data": [[i, caption, ...], ...]}`` (one
  row per item), which the trainer logs as a W&B table (``captions/recon``, ``captions/prior``).

`picture_resources(shards_dir, model)` gives the keyword arguments for a model (vocabulary and
feature index, loaded lazily from the shards, {} for digit models).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torchvision.utils import make_grid, save_image

from mmvae.eval import eval_mode
from mmvae.models.captions import CaptionLikelihood


SCALE = 2
"""Image-model pictures are drawn at this many screen pixels per image pixel: a 28x28 digit at
its own size is too small to read (the grid was 272 px wide)."""


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
    the decoder-d mean of one posterior sample z ~ q_r(z | x_r) (d = r: "r reconstruction";
    d != r: the cross-generation "r -> d").
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
            captions.append(f"{names[r]} reconstruction" if d == r else f"{names[r]} -> {names[d]}")
    return torch.cat(rows), captions


def save_reconstructions(model, xs: Sequence[torch.Tensor], path, n: int = 8, *,
                         vocab: Sequence[str] | None = None, feature_index=None) -> list[Path]:
    """Write the reconstruction/cross-generation grid to `path` (PNG) and its row captions to
    `path` with suffix .txt. xs: one batch per modality (model.modalities order), (B, C, H, W)
    in [0, 1] for images. Returns the written paths ([] for models with nothing to draw).
    Caption/feature models: see the module docstring (`vocab`, `feature_index`)."""
    if not is_image_model(model):
        return _save_panel_reconstructions(model, xs, path, n, vocab, feature_index)
    xs = list(xs)
    n = min(n, xs[0].shape[0])
    images, captions = reconstruction_grid(model, xs, n)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [(label, ("images", images[i * n:(i + 1) * n])) for i, label in enumerate(captions)]
    _pairs_figure(rows, path, n, cell=SCALE * max(images.shape[-2:]) + 8)  # labelled rows
    caption = path.with_suffix(".txt")
    caption.write_text("rows, top to bottom:\n" + "\n".join(captions) + "\n")
    return [path, caption]


def save_prior_samples(model, path, n: int = 64, generator: torch.Generator | None = None, *,
                       vocab: Sequence[str] | None = None, feature_index=None) -> list[Path]:
    """Decoder means of n prior samples z ~ p(z) (the same z for every modality), one square
    grid per modality written to ``<stem>_<modality>.png`` next to `path`. Returns the paths
    ([] for models with nothing to draw). Caption/feature models: see the module docstring."""
    if not is_image_model(model):
        return _save_panel_prior_samples(model, path, n, generator, vocab, feature_index)
    with eval_mode(model):
        samples = model.generate(n, generator)  # per modality (n, C, H, W)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nrow = max(1, round(n ** 0.5))
    written = []
    for name, images in zip(model.modalities, samples):
        out = path.with_name(f"{path.stem}_{name}.png")
        grid = make_grid(images.float().cpu().clamp(0, 1), nrow=nrow, padding=2, pad_value=1.0)
        save_image(F.interpolate(grid[None], scale_factor=SCALE, mode="nearest")[0], out)
        written.append(out)
    return written


# --- models with captions and features: panels of images and text ------------------------------

PAIRS_SHOWN = 16
"""Prior samples drawn as image-caption pairs (two rows of 8)."""


def picture_resources(shards_dir, model, build_index: bool = True) -> dict:
    """Keyword arguments of the picture functions for `model`: ``vocab`` (the shards' ``itos``)
    when it has captions, ``feature_index`` when it has a 1-D feature modality. The index is
    opened memory-mapped from the shards folder; when it is missing and `build_index` is set it
    is built there once (`mmvae.eval.display.build_feature_index`, one pass over the train
    split). {} for image-only models; loaded lazily and cached."""
    from mmvae.eval.display import load_vocab, open_or_build_index

    if is_image_model(model):
        return {}
    out = {}
    if any(isinstance(e.likelihood, CaptionLikelihood) for e in model.experts):
        out["vocab"] = load_vocab(shards_dir)
    if "feature" in model.modalities:  # not the 1-D linear-Gaussian references
        out["feature_index"] = open_or_build_index(shards_dir, build=build_index)
    return out


def _kind(expert, feature_index) -> str | None:
    """How a modality is drawn: image, caption, feature (nearest image) or not at all."""
    if isinstance(expert.likelihood, CaptionLikelihood):
        return "caption"
    shape = expert.data_shape
    if len(shape) == 3 and shape[0] in (1, 3):
        return "image"
    if (len(shape) == 1 and feature_index is not None
            and feature_index.features.shape[1:] == tuple(shape)):
        return "feature"
    return None


def _panel(kind: str | None, values: torch.Tensor, vocab, feature_index):
    """("images", (n, 3|1, H, W)) or ("text", [str] * n) or None."""
    from mmvae.eval.display import decode_captions

    if kind == "caption":
        return "text", decode_captions(values, vocab)
    if kind == "image":
        return "images", values
    if kind == "feature":
        return "images", feature_index.lookup(values)
    return None


def _row_label(name: str, kind: str | None) -> str:
    return f"{name} (nearest train image)" if kind == "feature" else name


def _save_panel_reconstructions(model, xs, path, n, vocab, feature_index) -> list[Path]:
    kinds = [_kind(e, feature_index) for e in model.experts]
    if not any(kinds):
        return []
    xs = [x[:n] for x in xs]
    with eval_mode(model):
        grid = model.reconstruct(xs)  # grid[r][d]
    names, rows = model.modalities, []
    for r, (x, decoded) in enumerate(zip(xs, grid)):
        rows.append((_row_label(f"input {names[r]}", kinds[r]),
                     _panel(kinds[r], x, vocab, feature_index)))
        for d, values in enumerate(decoded):
            label = f"{names[d]} decoded from q_{names[r]}(z|x_{names[r]})"
            rows.append((_row_label(label, kinds[d]), _panel(kinds[d], values, vocab, feature_index)))
    return _write_panels([(label, p) for label, p in rows if p is not None], Path(path),
                         xs[0].shape[0])


def _save_panel_prior_samples(model, path, n, generator, vocab, feature_index) -> list[Path]:
    kinds = [_kind(e, feature_index) for e in model.experts]
    if not any(kinds):
        return []
    with eval_mode(model):
        samples = model.generate(n, generator)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written, panels = [], []
    for name, kind, values in zip(model.modalities, kinds, samples):
        panel = _panel(kind, values, vocab, feature_index)
        if panel is None:
            continue
        panels.append((_row_label(name, kind), panel))
        if panel[0] == "images":
            out = path.with_name(f"{path.stem}_{name}.png")
            save_image(make_grid(panel[1].float().cpu().clamp(0, 1), nrow=max(1, round(n ** 0.5)),
                                 padding=2, pad_value=1.0), out)
        else:
            out = path.with_name(f"{path.stem}_{name}.txt")
            out.write_text("".join(f"{i}: {t}\n" for i, t in enumerate(panel[1])))
        written.append(out)
    text_rows = [(label, panel[1]) for label, panel in panels if panel[0] == "text"]
    if text_rows:
        written.append(write_caption_table(text_rows, path.with_name(f"{path.stem}_captions.json")))
    if len(panels) > 1:  # pairs: blocks of 8 samples, one row per modality
        shown, ncol = min(n, PAIRS_SHOWN), min(n, 8)
        rows = [(label, (kind, values[s:s + ncol])) for s in range(0, shown, ncol)
                for label, (kind, values) in panels]
        written.append(_pairs_figure(rows, path.with_name(f"{path.stem}_pairs.png"), ncol))
    return written


def write_caption_table(text_rows, path: Path) -> Path:
    """`path` (JSON): the captions of `text_rows` [(label, [str] * n)] as a table with one row
    per item: {"columns": ["item", label, ...], "data": [[i, text, ...], ...]}."""
    labels = [label for label, _ in text_rows]
    data = [[i, *texts] for i, texts in enumerate(zip(*(t for _, t in text_rows)))]
    path.write_text(json.dumps({"columns": ["item", *labels], "data": data}, indent=1))
    return path


def _write_panels(rows, path: Path, n: int) -> list[Path]:
    """The image rows as a grid (`path`), every caption as text (.txt), all rows together
    (``<stem>_pairs.png``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    image_rows = [(label, p[1]) for label, p in rows if p[0] == "images"]
    text_rows = [(label, p[1]) for label, p in rows if p[0] == "text"]
    if image_rows:
        size = (max(x.shape[-2] for _, x in image_rows), max(x.shape[-1] for _, x in image_rows))
        grid = torch.cat([to_rgb_canvas(x, size) for _, x in image_rows])
        save_image(grid, path, nrow=n, padding=2, pad_value=1.0)
        written.append(path)
    lines = []
    if image_rows:
        lines += [f"rows of {path.name}, top to bottom:"] + [label for label, _ in image_rows] + [""]
    for label, texts in text_rows:
        lines += [f"{label}:"] + [f"  {i}: {t}" for i, t in enumerate(texts)] + [""]
    txt = path.with_suffix(".txt")
    txt.write_text("\n".join(lines))
    written.append(txt)
    if text_rows:
        written.append(write_caption_table(text_rows, path.with_name(f"{path.stem}_captions.json")))
    if image_rows and text_rows:
        written.append(_pairs_figure(rows, path.with_name(f"{path.stem}_pairs.png"), n))
    return written


def _wrap(text: str, font, width: int) -> list[str]:
    """Greedy word wrap to `width` pixels (a word longer than a line gets its own line)."""
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and font.getlength(candidate) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return lines + [line] if line else lines


def _pairs_figure(rows, path: Path, ncol: int, cell: int = 128, label_width: int = 150) -> Path:
    """One PNG: a row per (label, ("images", tensor) | ("text", [str])), ncol items each; images
    scaled to `cell` pixels, captions wrapped under one another. Drawn with Pillow (a
    matplotlib grid of ~50 axes takes seconds, this takes milliseconds)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=11)
    line_height, pad = 13, 4
    blocks = []  # (label lines, kind, payload, height)
    for label, (kind, values) in rows:
        label_lines = _wrap(label, font, label_width - 2 * pad)
        if kind == "images":
            payload, height = values[:ncol], cell
        else:
            payload = [_wrap(t, font, cell - 2 * pad) for t in values[:ncol]]
            height = max(len(x) for x in payload) * line_height
        height = max(height, len(label_lines) * line_height) + 2 * pad
        blocks.append((label_lines, kind, payload, height))
    canvas = Image.new("RGB", (label_width + ncol * cell, sum(b[3] for b in blocks)), "white")
    draw = ImageDraw.Draw(canvas)
    top = 0
    for label_lines, kind, payload, height in blocks:
        y = top + (height - len(label_lines) * line_height) // 2
        for i, line in enumerate(label_lines):
            draw.text((pad, y + i * line_height), line, fill="black", font=font)
        for j, item in enumerate(payload):
            left = label_width + j * cell
            if kind == "images":
                image = item.detach().float().cpu().clamp(0, 1)
                image = image.expand(3, -1, -1) if image.shape[0] == 1 else image
                array = (image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
                tile = Image.fromarray(array).resize((cell - 2 * pad, cell - 2 * pad), Image.NEAREST)
                canvas.paste(tile, (left + pad, top + pad))
            else:
                for i, line in enumerate(item):
                    draw.text((left + pad, top + pad + i * line_height), line, fill="black", font=font)
        draw.line([(0, top + height - 1), (canvas.width, top + height - 1)], fill=(220, 220, 220))
        top += height
    canvas.save(path)
    return path
