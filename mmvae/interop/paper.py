"""The paper code's released models (``model.rar`` + ``args.rar``) <-> our run folders.

``import_paper_model(PATH, RUN_DIR)`` reads a paper run folder (or a zip of one, extracted
safely): ``args.rar`` — a ``torch.save``d ``argparse.Namespace`` — with
``torch.load(weights_only=True)`` and ``argparse.Namespace`` as the one allowed class, and
``model.rar`` — a state dict — with ``weights_only=True``. The flags become our config
(`FLAGS`), the tensors our model's through the explicit table of `mmvae.interop.names`, and
RUN_DIR gets what a finished run of ours has (``config.yaml``, ``model/``), so that

* ``launch/evaluate.py --run RUN_DIR`` and ``mmvae.load_model(RUN_DIR)`` work, and
* ``launch/train.py --config RUN_DIR/config.yaml train.init_from=RUN_DIR run.dir=NEW``
  fine-tunes it (a new run starting from its weights with a fresh optimiser: the paper
  released no optimiser state).

``export_paper_model(RUN_DIR, OUT)`` writes the reverse (``model.rar``, ``args.rar`` in the
torch 1.3-readable format), which the paper's ``--pre-trained OUT`` loads.

Errors are `InteropError` (a ValueError), one line naming the file and the fix.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pickle
import tempfile
from pathlib import Path

import torch

from mmvae.config import Config, ConfigError, from_dict, save_config, to_dict
from mmvae.data.download import file_digest
from mmvae.interop import names
from mmvae.registry import build_model, save_model

MODEL_FILE, ARGS_FILE = "model.rar", "args.rar"

FLAGS = {  # paper argparse dest -> our config key
    "latent_dim": "model.latent_dim",
    "num_hidden_layers": "model.num_hidden_layers",
    "learn_prior": "model.learn_prior",
    "llik_scaling": "model.llik_scaling",   # 0 = the model's default, in both codes
    "obj": "objective.name",
    "K": "objective.K",
    "looser": "objective.looser",
    "batch_size": "data.batch_size",
    "epochs": "train.epochs",
    "seed": "train.seed",
    "lr": "train.lr",                       # in the CUB models' args; main.py itself used 1e-3
    "experiment": "run.experiment",
}
"""Flags that become config keys (``model`` is mapped through `names.MODELS`)."""

IGNORED_FLAGS = {
    "cuda": "device choice", "no_cuda": "device choice", "no_analytics": "plots during training",
    "logp": "final likelihood (launch/evaluate.py does it)", "print_freq": "console output",
    "pre_trained": "the import itself", "std": "unused by the released code",
    "projection": "unused by the released code",
}
DEFAULT_SHARDS = {"mnist_svhn": "shards/mnist_svhn", "cubIS": "shards/cub", "cubISft": "shards/cub_ft",
                  "mnist": "shards/mnist_svhn", "svhn": "shards/mnist_svhn", "cub_image": "shards/cub",
                  "cub_image_ft": "shards/cub_ft", "cub_sentence": "shards/cub"}
CAPTION_MODELS = ("cubIS", "cubISft", "cub_sentence")


class InteropError(ValueError):
    """A paper model that cannot be imported or exported (one line naming the fix)."""


# --- reading the paper's files ----------------------------------------------------------------

def read_args(path) -> argparse.Namespace:
    """``args.rar`` with weights_only=True and only argparse.Namespace allowed."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            args = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise InteropError(f"{path}: not a paper args.rar readable as an argparse.Namespace "
                           f"alone ({first[:200]}); nothing else is unpickled") from None
    if not isinstance(args, argparse.Namespace):
        raise InteropError(f"{path} holds a {type(args).__name__}, not an argparse.Namespace")
    return args


def read_state(path) -> dict[str, torch.Tensor]:
    """``model.rar``: a state dict of tensors, weights_only=True."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise InteropError(f"{path}: not a state dict of tensors ({first[:200]})") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise InteropError(f"{path} is not a state dict (name -> tensor)")
    return dict(state)


def find_paper_folder(path, scratch: Path) -> Path:
    """The folder holding model.rar and args.rar: `path` itself, or inside the zip `path`
    (extracted safely into `scratch`)."""
    path = Path(path)
    if not path.exists():
        raise InteropError(f"{path} not found: pass the paper's model folder or its .zip "
                           f"(e.g. mnist-svhn.zip from the paper's README)")
    if path.is_file():
        from mmvae.data.extract import extract

        extract(path, scratch)
        path = scratch
    found = sorted(p.parent for p in path.rglob(MODEL_FILE))
    if not found:
        raise InteropError(f"{path} holds no {MODEL_FILE}: not a paper model folder")
    if len(found) > 1:
        raise InteropError(f"{path} holds {len(found)} {MODEL_FILE} files ({', '.join(map(str, found[:3]))}); "
                           f"pass one model folder")
    folder = found[0]
    if not (folder / ARGS_FILE).is_file():
        raise InteropError(f"{folder} has {MODEL_FILE} but no {ARGS_FILE}: the flags it was trained "
                           f"with are needed to rebuild it")
    return folder


# --- flags <-> config -------------------------------------------------------------------------

def config_from_args(args: argparse.Namespace, *, vocab_size: int = 0, shards: str | None = None,
                     run_dir: str = "") -> tuple[Config, dict]:
    """Our config for the paper's flags, and notes {flag: what became of it}."""
    flags = vars(args)
    paper_model = flags.get("model")
    if paper_model not in names.MODELS:
        raise InteropError(f"args.rar: model {paper_model!r} cannot be imported; importable: "
                           f"{', '.join(names.MODELS)}")
    ours = names.MODELS[paper_model][0]
    tree = {"model": {"name": ours}, "data": {"shards": shards or DEFAULT_SHARDS[ours]},
            "run": {"dir": run_dir}}
    notes = {"model": f"model.name={ours}"}
    for flag, value in flags.items():
        if flag in FLAGS:
            section, key = FLAGS[flag].split(".")
            tree.setdefault(section, {})[key] = "" if value is None else value
            notes[flag] = f"{FLAGS[flag]}={value!r}"
        elif flag != "model":
            notes[flag] = f"ignored ({IGNORED_FLAGS.get(flag, 'not a setting of ours')})"
    if vocab_size:
        tree["model"]["vocab_size"] = vocab_size
    if ours in CAPTION_MODELS:  # the likelihood the paper's caption models were trained with
        tree["model"]["paper_token_loss"] = True
        notes["(caption likelihood)"] = "model.paper_token_loss=True (paper's ignore_index=0)"
    tree.setdefault("run", {}).setdefault("experiment", "")
    try:
        return from_dict(tree), notes
    except ConfigError as err:
        raise InteropError(f"args.rar: {err}") from None


def args_from_config(cfg: Config, paper_model: str) -> argparse.Namespace:
    """The paper's flags for our config (export): FLAGS reversed, defaults for the rest."""
    flat = to_dict(cfg)
    values = {"model": paper_model, "pre_trained": "", "no_cuda": False, "cuda": False,
              "no_analytics": True, "logp": False, "print_freq": 0}
    for flag, key in FLAGS.items():
        section, name = key.split(".")
        values[flag] = flat[section][name]
    values["experiment"] = values["experiment"] or paper_model
    return argparse.Namespace(**values)


def paper_name(our_name: str) -> str:
    for paper, (ours, _, _) in names.MODELS.items():
        if ours == our_name:
            return paper
    raise InteropError(f"model {our_name!r} has no counterpart in the paper code; exportable: "
                       f"{', '.join(m for m, *_ in names.MODELS.values())}")


# --- tensors ----------------------------------------------------------------------------------

def _vocab_size(paper_model: str, state: dict) -> int:
    nets = names.MODELS[paper_model][1]
    for paper_prefix, _, net in nets:
        if net is names.CUB_SENTENCE_NET:
            key = f"{paper_prefix}enc.embedding.weight"
            if key not in state:
                raise InteropError(f"model.rar has no {key}: not a {paper_model} model")
            return int(state[key].shape[0])
    return 0


def state_from_paper(model: torch.nn.Module, paper_model: str, paper: dict, *,
                     num_hidden_layers: int = 1) -> dict[str, torch.Tensor]:
    """Our state dict for `model` from the paper's tensors, through `names` (checked: every
    tensor named by the table present with our shape, nothing left over)."""
    ours = model.state_dict()
    table = names.tensor_table(paper_model, ours, num_hidden_layers)
    out, missing = {}, []
    for key, pkey in table.items():
        if pkey not in paper:
            if pkey.rpartition(".")[2] in names.OPTIONAL:
                continue
            missing.append(pkey)
        elif tuple(paper[pkey].shape) != tuple(ours[key].shape):
            raise InteropError(f"model.rar: {pkey} has shape {tuple(paper[pkey].shape)}, our {key} "
                               f"needs {tuple(ours[key].shape)}; do args.rar's flags (latent_dim, "
                               f"num_hidden_layers) belong to this model.rar?")
        else:
            out[key] = paper[pkey].to(ours[key].dtype)
    if missing:
        raise InteropError(f"model.rar lacks {len(missing)} tensors of a paper {paper_model} model, "
                           f"e.g. {', '.join(missing[:3])}")
    used = set(table.values()) | _sub_prior_keys(paper_model, paper, out)
    extra = sorted(set(paper) - used)
    if extra:
        raise InteropError(f"model.rar has {len(extra)} tensors that a paper {paper_model} model "
                           f"does not, e.g. {', '.join(extra[:3])}")
    for i in range(len(getattr(model, "vaes", []))):  # ours share the MMVAE's prior
        out[f"vaes.{i}.prior_raw"], out[f"vaes.{i}.prior_loc"] = out["prior_raw"], out["prior_loc"]
    return out


def _sub_prior_keys(paper_model: str, paper: dict, out: dict) -> set[str]:
    """The paper's sub-VAE prior keys: unused ones (mnist_svhn) are accepted and dropped;
    shared ones (cubIS, cubISft) must equal the MMVAE's."""
    mode = names.MODELS[paper_model][2]
    keys = {k for k in paper if k.startswith("vaes.") and "._pz_params." in k}
    if mode == "shared":
        for key in keys:
            top = paper[key.split(".", 2)[2]]
            if not torch.equal(paper[key], top):
                raise InteropError(f"model.rar: {key} differs from the MMVAE's prior; in a paper "
                                   f"{paper_model} model the sub-VAEs share it")
    return keys if mode else set()


def state_to_paper(model: torch.nn.Module, paper_model: str, *,
                   num_hidden_layers: int = 1) -> dict[str, torch.Tensor]:
    """The paper's state dict for our `model` (the reverse of `state_from_paper`)."""
    ours = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    table = names.tensor_table(paper_model, ours, num_hidden_layers)
    out = {pkey: ours[key] for key, pkey in table.items()}
    mode = names.MODELS[paper_model][2]
    for i in range(len(getattr(model, "vaes", []))) if mode else ():
        for j, top in enumerate((ours["prior_loc"], ours["prior_raw"])):
            # shared: the very tensor again; unused: the paper's initial zeros (never trained)
            out[f"vaes.{i}._pz_params.{j}"] = top.clone() if mode == "shared" else torch.zeros_like(top)
    return out


# --- run folders ------------------------------------------------------------------------------

def import_paper_model(path, run_dir, *, shards: str | None = None) -> dict:
    """Turn a paper model folder or zip into the run folder `run_dir` (module docstring);
    returns the import record (also written to RUN_DIR/import.json)."""
    run_dir = Path(run_dir)
    if (run_dir / "config.yaml").exists() or (run_dir / "model").exists():
        raise InteropError(f"{run_dir} already holds a run; choose a new --out folder")
    with tempfile.TemporaryDirectory(prefix="paper-model-") as scratch:
        folder = find_paper_folder(path, Path(scratch))
        args, paper = read_args(folder / ARGS_FILE), read_state(folder / MODEL_FILE)
        sources = {f: file_digest(folder / f, "sha256") for f in (MODEL_FILE, ARGS_FILE)}
    paper_model = getattr(args, "model", None)
    if paper_model not in names.MODELS:
        raise InteropError(f"args.rar: model {paper_model!r} cannot be imported; importable: "
                           f"{', '.join(names.MODELS)}")
    cfg, notes = config_from_args(args, vocab_size=_vocab_size(paper_model, paper), shards=shards,
                                  run_dir=str(run_dir))
    kwargs = dataclasses.asdict(cfg.model)
    model = build_model(kwargs.pop("name"), **kwargs)
    model.load_state_dict(state_from_paper(model, paper_model, paper,
                                           num_hidden_layers=cfg.model.num_hidden_layers))
    record = {"source": str(path), "paper_model": paper_model, "sha256": sources,
              "tensors": len(paper), "flags": notes, "paper_args": _jsonable(vars(args))}
    _write_run(run_dir, cfg, model, record)
    return record


def _jsonable(flags: dict) -> dict:
    return {k: v if isinstance(v, (str, int, float, bool, type(None))) else repr(v)
            for k, v in flags.items()}


def _write_run(run_dir: Path, cfg: Config, model: torch.nn.Module, record: dict) -> None:
    """config.yaml, model/ and import.json: what a finished run of ours holds. Fine-tuning is a
    new run started from model/ (`train.init_from`), with a fresh optimiser: the paper released
    none."""
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    save_model(model, run_dir / "model")
    (run_dir / "import.json").write_text(json.dumps(record, indent=2) + "\n")


def export_paper_model(run_dir, out_dir) -> Path:
    """Write OUT/model.rar and OUT/args.rar (paper format) for the run in `run_dir`."""
    from mmvae.config import load_config
    from mmvae.registry import load_model

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    try:
        cfg = load_config(run_dir / "config.yaml")
        model = load_model(run_dir / "model")
    except (ConfigError, FileNotFoundError) as err:
        raise InteropError(f"{run_dir}: not a run folder ({err})") from None
    paper_model = paper_name(cfg.model.name)
    state = state_to_paper(model, paper_model, num_hidden_layers=cfg.model.num_hidden_layers)
    out_dir.mkdir(parents=True, exist_ok=True)
    legacy = {"_use_new_zipfile_serialization": False}  # readable by the paper's torch 1.3
    torch.save(state, out_dir / MODEL_FILE, **legacy)
    torch.save(args_from_config(cfg, paper_model), out_dir / ARGS_FILE, **legacy)
    return out_dir
