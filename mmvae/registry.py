"""Explicit name -> builder tables. Unknown names raise and list the valid ones."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import torch

from mmvae.config import ConfigError, ModelConfig
from mmvae.models import cub, digits, toy

MODELS: dict[str, Callable[[ModelConfig], torch.nn.Module]] = {
    "mnist": digits.build_mnist,
    "svhn": digits.build_svhn,
    "mnist_svhn": digits.build_mnist_svhn,
    "gaussian": toy.build_gaussian,
    "gaussian_pair": toy.build_gaussian_pair,
    "cub_image": cub.build_cub_image,
    "cub_image_ft": cub.build_cub_image_ft,
    "cub_sentence": cub.build_cub_sentence,
    "cubIS": cub.build_cubIS,
    "cubISft": cub.build_cubISft,
}


def check_model_name(name: str) -> None:
    if name not in MODELS:
        raise ConfigError(f"model.name={name!r} is not a model; valid: {', '.join(sorted(MODELS))}")


def build_model(name: str, **overrides) -> torch.nn.Module:
    """Build a registered model; `overrides` are keys of the `model` config section."""
    check_model_name(name)
    cfg = dataclasses.replace(ModelConfig(name=name), **overrides)
    model = MODELS[name](cfg)
    model.spec = dataclasses.asdict(cfg)  # enough to rebuild it (save_model / load_model)
    return model


MODEL_JSON, WEIGHTS = "model.json", "weights.pt"


def save_model(model: torch.nn.Module, path: str | Path) -> Path:
    """Write `path/model.json` (the model config) and `path/weights.pt` (state_dict)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path / WEIGHTS)
    (path / MODEL_JSON).write_text(json.dumps(model.spec, indent=2))
    return path


def load_model(path: str | Path, map_location="cpu") -> torch.nn.Module:
    """Rebuild a model saved with `save_model` (or a run folder's `model/`), weights_only."""
    path = Path(path)
    if (path / "model").is_dir() and not (path / MODEL_JSON).exists():
        path = path / "model"
    if not (path / MODEL_JSON).is_file():
        raise FileNotFoundError(f"{path} holds no {MODEL_JSON}: pass a run's model/ folder")
    spec = json.loads((path / MODEL_JSON).read_text())
    name = spec.pop("name")
    model = build_model(name, **spec)
    state = torch.load(path / WEIGHTS, map_location=map_location, weights_only=True)
    model.load_state_dict(state)
    return model
