"""Explicit name -> builder tables. Unknown names raise and list the valid ones.

A model's rebuild spec (its `model` config section as a dict: name and settings) is the
registry's record, not an attribute of the model: `build_model` records it (`spec_of` reads it)
and `save_model` writes it as model.json, from the record or from an explicit `spec=` for a
model built outside the registry."""
from __future__ import annotations

import dataclasses
import json
import weakref
from pathlib import Path
from typing import Callable

import torch

from mmvae.config import ConfigError, ModelConfig
from mmvae.models import cub, digits, toy

MODELS: dict[str, Callable[[ModelConfig], torch.nn.Module]] = {
    "mnist": digits.build_mnist,
    "svhn": digits.build_svhn,
    "mnist_svhn": digits.build_mnist_svhn,
    "polydigits": digits.build_polydigits,
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


# model -> the spec it was built from; weak, so the record goes with the model
_SPECS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def build_model(name: str, **overrides) -> torch.nn.Module:
    """Build a registered model; `overrides` are keys of the `model` config section."""
    check_model_name(name)
    cfg = dataclasses.replace(ModelConfig(name=name), **overrides)
    model = MODELS[name](cfg)
    _SPECS[model] = dataclasses.asdict(cfg)  # enough to rebuild it (save_model / load_model)
    return model


def spec_of(model: torch.nn.Module) -> dict | None:
    """The `model` section `build_model` built `model` from (a fresh dict), or None for a model
    built outside the registry."""
    spec = _SPECS.get(model)
    return None if spec is None else dict(spec)


MODEL_JSON, WEIGHTS = "model.json", "weights.pt"


def save_model(model: torch.nn.Module, path: str | Path, spec: ModelConfig | None = None) -> Path:
    """Write `path/model.json` (the model config) and `path/weights.pt` (state_dict). A model
    built outside the registry (a builder of `MODELS` called directly) passes the config it was
    built from as `spec`; one built by `build_model` needs none."""
    if spec is not None:
        spec = dataclasses.asdict(spec)
    elif (spec := spec_of(model)) is None:
        raise ValueError(f"save_model: {type(model).__name__} was not built by build_model, so "
                         f"its config is unknown; pass spec=ModelConfig(name=..., ...)")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path / WEIGHTS)
    (path / MODEL_JSON).write_text(json.dumps(spec, indent=2))
    return path


def model_dir(path: str | Path) -> Path:
    """The folder holding model.json: `path` itself, or a run folder's `model/`."""
    path = Path(path)
    if (path / "model").is_dir() and not (path / MODEL_JSON).exists():
        path = path / "model"
    if not (path / MODEL_JSON).is_file():
        raise FileNotFoundError(f"{path} holds no {MODEL_JSON}: pass a run's model/ folder")
    return path


def load_model(path: str | Path, map_location="cpu") -> torch.nn.Module:
    """Rebuild a model saved with `save_model` (or a run folder's `model/`), weights_only."""
    path = model_dir(path)
    spec = json.loads((path / MODEL_JSON).read_text())
    name = spec.pop("name")
    model = build_model(name, **spec)
    state = torch.load(path / WEIGHTS, map_location=map_location, weights_only=True)
    model.load_state_dict(state)
    return model


def load_weights(model: torch.nn.Module, path: str | Path) -> Path:
    """Load the weights saved with `save_model` at `path` (a run folder or its `model/`) into
    `model`, which must have the same parameters (names and shapes); returns the folder read.
    Every failure is a one-line ConfigError."""
    try:
        path = model_dir(path)
        state = torch.load(path / WEIGHTS, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise ConfigError(f"train.init_from: {err}") from None
    except Exception as err:  # noqa: BLE001 - torch.load raises many kinds on a damaged file
        raise ConfigError(f"train.init_from: {path / WEIGHTS} cannot be loaded "
                          f"({type(err).__name__}); save the weights again") from None
    ours = model.state_dict()
    missing = sorted(set(ours) - set(state))
    extra = sorted(set(state) - set(ours))
    shapes = sorted(k for k in set(ours) & set(state) if ours[k].shape != state[k].shape)
    if missing or extra or shapes:
        what = "; ".join(f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                         for label, keys in (("missing", missing), ("unexpected", extra),
                                             ("other shape", shapes)) if keys)
        raise ConfigError(f"train.init_from: {path} holds weights of another model ({what}); "
                          f"set the model section as in {path / MODEL_JSON}")
    model.load_state_dict(state)
    return path
