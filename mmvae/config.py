"""Typed experiment configuration: nested dataclasses, YAML files, dotted overrides.

Precedence is command line > YAML file > defaults. Every field carries a comment that says what
it does; `python launch/train.py --help-config` prints them. A config is validated once, by
`load_config`, and then treated as read-only; the resolved config is saved with the run.

Values are YAML scalars with YAML 1.2 booleans (only true/false): `no`, `off`, `yes`, `on` are
the strings they look like (`train.mixed_precision=no`), which boolean keys also accept. Numbers
are finite and in range (`POSITIVE`, `NON_NEGATIVE`).

Errors are `ConfigError` (a `ValueError`) with a one-line message that names the valid keys or
the fix; entry points turn it into exit code 2 before anything is written.
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad configuration: unknown key, wrong type, impossible value, missing file."""


class _Loader(yaml.SafeLoader):
    """YAML with the booleans of YAML 1.2: only true/false (any case). PyYAML's YAML 1.1 also
    reads yes/no/on/off as booleans, which turned `train.mixed_precision=no` into False; here
    they stay strings, and boolean keys accept them (`_coerce`)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool",
                              re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
BOOL_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def parse_yaml(text: str):
    """A YAML document as plain Python values, booleans only from true/false (`_Loader`)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


@dataclass
class ModelConfig:
    name: str = "mnist_svhn"
    """Model in the registry (`mmvae.registry.MODELS`): mnist, svhn, mnist_svhn, polydigits,
    cubIS, cubISft, cub_image, cub_image_ft, cub_sentence, gaussian, gaussian_pair."""
    latent_dim: int = 20
    """Latent dimension D (paper: 20 for MNIST-SVHN, 64 for CUB)."""
    learn_prior: bool = False
    """Learn the prior's scale parameters (the paper's results use this)."""
    llik_scaling: float = 0.0
    """Likelihood scaling of the first modality in multimodal bounds; 0 means the model default
    (3072/784 = 3.918 for MNIST in mnist_svhn)."""
    num_hidden_layers: int = 1
    """Hidden layers of the MNIST MLP encoder/decoder."""
    data_dim: int = 4
    """Data dimension of the linear-Gaussian reference models (gaussian, gaussian_pair)."""
    vocab_size: int = 0
    """Caption vocabulary size of the CUB sentence models; 0 = read it from the shards'
    vocab.json (never hard-coded)."""
    fusion: str = "moe"
    """Joint posterior of a multimodal model (mnist_svhn, polydigits, gaussian_pair): moe
    (MMVAE, the mixture of experts) | mopoe (mixture of the products of experts of every
    non-empty subset, Sutter et al. 2021) | poe (MVAE: product with a prior expert, Wu & Goodman
    2018). mopoe and poe use Normal posteriors and prior (a product of experts is closed form only
    for Gaussians). moe_plus (MMVAE+, Palumbo et al. 2023): moe over the shared z plus
    modality-specific latents w_m (`private_dim`) with auxiliary priors (`aux_scale`)."""
    private_dim: int = 0
    """moe_plus: size of each modality-specific latent w_m; 0 = latent_dim (MMVAE+'s PolyMNIST
    model: 32 and 32)."""
    aux_scale: float = 2.0
    """moe_plus: scale of the auxiliary prior r_m(w_m) (same family as p(w), which starts at
    scale 1), wider than p(w): the w of a modality that is not given (cross generation, the
    other modalities' strata of the bound) is drawn from it."""
    num_modalities: int = 2
    """Modalities of gaussian_pair (x1 .. xM); the others have their data's modalities."""
    paper_token_loss: bool = False
    """Caption likelihood: false scores real tokens and <eos> only; true reproduces the paper
    code (ignores <exc>, scores <pad>)."""


@dataclass
class ObjectiveConfig:
    name: str = "dreg"
    """Estimator: elbo | iwae | dreg (the `m_` multimodal form is chosen by the model)."""
    looser: bool = True
    """Multimodal IWAE/DReG: the paper's stratified bound (mean over experts of per-expert
    IWAE) instead of the joint bound over all M*K particles."""
    K: int = 30
    """Particles per expert per datapoint."""
    k_chunk: int = 0
    """Process at most this many particles at once (two-pass, same gradient); 0 = all K."""
    dreg_variant: str = "unbiased"
    """DReG for mixtures: unbiased (default, DESIGN.md) | paper (w^2 on the path, mixture
    detached: the paper's intent) | stl (what the paper code computed: its hook never fires) |
    cv / swap (unbiased, the other experts' score terms replaced by a control variate / moved
    onto their own particles; swap needs looser, not fp16: docs/estimators.md)."""


@dataclass
class DataConfig:
    shards: str = "shards/demo-digits"
    """Folder with manifest.json and {train,test}-NNNNNN.tar shards, or an http(s):// prefix
    serving such a folder (docs/data.md, Remote shards)."""
    builtin: str = ""
    """Name of a built-in dataset (digits, shapes, shapes_ft) to build into `shards` when it is
    missing; empty means the shards must already exist."""
    batch_size: int = 128
    """Datapoints per batch per data-parallel group."""
    num_workers: int = 0
    """DataLoader workers per process."""
    shuffle_buffer: int = 1000
    """Samples held in the shuffle buffer."""
    on_error: str = "skip"
    """Bad data (a corrupt, truncated or wrong-sized shard, a sample that does not decode or
    breaks the modality spec): skip (log, count every lost sample in data_errors) | raise
    (one-line error naming the shard)."""
    verify: str = "size"
    """Check at start: size (each shard's size against the manifest, cheap) | sha256 (hash
    every shard; reads all the data once)."""
    resampled: bool = False
    """Sample shards with replacement (large multi-node jobs)."""
    tar_reader: str = "webdataset"
    """How shards' tars are parsed: webdataset (its member iterator over Python's tarfile, the
    reference) | fast (mmvae.data.tarread, ~3x less read time per sample, the same members;
    for loaders that must keep up with a GPU: docs/data.md, Throughput)."""
    drop_modalities: float = 0.0
    """Simulate missing modalities in training: drop each modality of a sample with this
    probability, in [0, 1) (seeded by train.seed, epoch and sample key: the same on every
    layout; never all of a sample's). Multimodal models; fusions moe, mopoe, poe."""


@dataclass
class TrainConfig:
    epochs: int = 30
    """Passes over the training split."""
    max_steps: int = 0
    """Stop after this many optimiser steps in total (0 = no limit)."""
    seed: int = 1
    """Seed of parameters, data order and particle noise."""
    lr: float = 1e-3
    """Adam learning rate (amsgrad, as the paper); > 0."""
    adam_eps: float = 1e-8
    """Adam's eps; > 0. The paper code sums the loss over the batch where we average it, which
    under Adam equals eps / batch_size here (7.8e-11 at B=128) to match it exactly; the default
    is unchanged: eps alters < 2% of the encoder steps by > 1% (docs/estimators.md)."""
    init_from: str = ""
    """Start a fresh run from these weights: a run folder or its model/ (e.g. one written by
    launch/import_paper_model.py), same model section; the optimiser starts afresh. Ignored
    when resuming (the checkpoint holds the weights)."""
    mixed_precision: str = "no"
    """no | bf16 | fp16 | auto: autocast for the networks; densities and weights stay fp32.
    auto = bf16 where the hardware has native bf16 (CUDA, CPU with avx512_bf16 or AMX), else no;
    the run's config.yaml records the choice."""
    compile: bool = False
    """torch.compile the per-modality encoders and decoders (values and gradients as eager;
    the first steps pay the compile time, minutes on a small CPU)."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this value (0 = off; the paper does not clip)."""
    log_every: int = 10
    """Write train metrics every this many steps."""
    checkpoint_every: int = 0
    """Also checkpoint every this many steps (0 = at the end of each epoch only)."""
    keep_last: int = 2
    """Checkpoints kept on disk."""
    max_bad_steps: int = 5
    """Stop after this many consecutive steps with a non-finite loss or gradient (fp16 overflows,
    which the grad scaler skips, are counted apart as overflow_steps)."""
    test_every: int = 1
    """Evaluate the test bound and write pictures every this many epochs (0 = never)."""
    test_batches: int = 0
    """Test batches per evaluation (0 = the whole test split)."""
    eval_every: int = 0
    """Also compute `train.eval_metrics` every this many epochs, on every process's share of
    the test data, logged as eval/<metric>/<key> (0 = never; options from the eval section)."""
    eval_metrics: list = field(default_factory=lambda: ["coherence", "attributes", "cca"])
    """Metrics of `train.eval_every`, among likelihood | coherence | subset_coherence |
    subset_latent | attributes | cca; those that do not apply to the model or data are skipped
    with one note."""


@dataclass
class ParallelConfig:
    particle_shards: int = 1
    """P: ranks that share a batch and split its K particles (world = groups x P)."""


@dataclass
class LoggingConfig:
    wandb: str = "offline"
    """offline | online | disabled. Online without credentials or network falls back to
    offline with one warning."""
    project: str = "mmvae"
    """W&B project."""
    progress: bool = True
    """Show a rich progress bar on the main process."""


@dataclass
class EvalConfig:
    metrics: list = field(default_factory=lambda: ["likelihood", "coherence", "latent",
                                                   "subset_coherence", "subset_latent",
                                                   "pictures"])
    """Metrics computed by launch/evaluate.py: likelihood | coherence (digit pairs) | latent |
    subset_coherence, subset_latent (any M >= 2 modalities with digit classifiers: every
    subset of given modalities) | pictures | cca (CUB feature + caption models) | attributes
    (image + caption models on the built-in shapes data); inapplicable ones are skipped with a
    note."""
    iwae_K: int = 1000
    """Particles of the IWAE log-likelihood estimates."""
    k_chunk: int = 100
    """Particles alive at once in evaluation."""
    batch_size: int = 128
    """Test batch size of coherence and latent accuracy."""
    likelihood_batch: int = 32
    """Test batch size of the likelihoods: M * k_chunk * likelihood_batch decodes per decoder
    are alive at once (the paper used 12 with all K = 1000 at once)."""
    max_datapoints: int = 0
    """Likelihood and cross coherence: stop after this many test datapoints (0 = all)."""
    coherence_samples: int = 10000
    """Prior samples of the joint coherence (paper: 10,000) and of the joint attribute coherence."""
    coherence_pairs: str = "auto"
    """unique (each unique test image once) | shards (the duplicated test pairs) | auto."""
    classifier_epochs: int = 30
    """Epochs of the coherence classifiers (digits; shapes colour/shape) over the unique train
    images (cached next to the shards)."""
    latent_max_train: int = 20000
    """Latent accuracy without unique images: at most this many train datapoints."""
    embedding: str = "umap"
    """umap (paper) | tsne | pca: the latent embedding method."""
    plot_batch: int = 128
    """Datapoints of the first test batch shown in pictures and plots."""
    toy_datapoints: int = 1000
    """Test datapoints sampled from the linear-Gaussian reference models (no shards)."""
    likelihood_datapoints: int = 0
    """Likelihood only: stop after this many test datapoints (0 = eval.max_datapoints)."""
    cca_dir: str = ""
    """Folder of the CCA coherence artifacts (FastText vectors, CCA projections, means); empty =
    <data.shards>/cca. Fitted there on first use, then loaded."""
    cca_reset: bool = False
    """Refit the CCA artifacts even if present (overwrites them)."""
    cca_k: int = 40
    """Canonical directions of the CCA coherence (paper: 40)."""
    cca_samples: int = 1000
    """Prior samples of the CCA joint coherence (paper: 1,000)."""


@dataclass
class RunConfig:
    experiment: str = ""
    """Experiment name (empty = the model name); the run folder is runs/<experiment>/<time>."""
    dir: str = ""
    """Run folder; empty = runs/<experiment>/<timestamp>."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)


PERIODIC_METRICS = ("likelihood", "coherence", "subset_coherence", "subset_latent", "attributes",
                    "cca")
"""Metrics the trainer can compute every `train.eval_every` epochs: the `sharded` records of
`mmvae.eval.metrics.METRICS`, which every process computes a share of (listed here because
config sits below eval; tests/eval/test_metrics.py checks that the two agree)."""

FUSIONS = ("moe", "mopoe", "poe", "moe_plus")
"""`model.fusion` names: the keys of `mmvae.models.fusions.FUSIONS` (listed here because config
sits below models; tests/test_fusions.py checks that the two agree)."""

CHOICES = {
    "model.fusion": FUSIONS,
    "objective.name": ("elbo", "iwae", "dreg"),
    "objective.dreg_variant": ("unbiased", "paper", "stl", "cv", "swap"),
    "data.on_error": ("skip", "raise"),
    "data.verify": ("size", "sha256"),
    "data.tar_reader": ("webdataset", "fast"),
    "train.mixed_precision": ("no", "bf16", "fp16", "auto"),
    "logging.wandb": ("offline", "online", "disabled"),
    "eval.coherence_pairs": ("auto", "unique", "shards"),
    "eval.embedding": ("umap", "tsne", "pca"),
}
POSITIVE = ("model.latent_dim", "model.num_modalities", "model.aux_scale", "objective.K", "train.lr",
            "train.adam_eps", "data.batch_size",
            "parallel.particle_shards",
            "train.keep_last", "train.max_bad_steps", "eval.iwae_K", "eval.batch_size",
            "eval.likelihood_batch", "eval.coherence_samples", "eval.plot_batch",
            "eval.toy_datapoints", "eval.cca_k", "eval.cca_samples")
NON_NEGATIVE = ("objective.k_chunk", "data.num_workers", "train.epochs", "train.max_steps",
                "train.grad_clip", "train.log_every", "train.checkpoint_every",
                "train.test_every", "train.test_batches", "train.eval_every", "model.llik_scaling",
                "eval.k_chunk", "model.num_hidden_layers", "model.vocab_size", "eval.max_datapoints",
                "eval.classifier_epochs", "eval.latent_max_train", "eval.likelihood_datapoints",
                "model.private_dim")


def _sections():
    return {f.name: f.type for f in dataclasses.fields(Config)}


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def valid_keys() -> list[str]:
    """All dotted keys, e.g. ``objective.K``."""
    hints = typing.get_type_hints(Config)
    return [f"{s}.{k}" for s, cls in hints.items() for k in _field_types(cls)]


def _coerce(key: str, value: Any, typ: Any) -> Any:
    origin = typing.get_origin(typ) or typ
    if origin is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in BOOL_WORDS:
            return BOOL_WORDS[value.lower()]
    elif origin is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif origin is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "3e-3" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):  # nan/inf would pass every range check below
                raise ConfigError(f"{key}: expected a finite number, got {value!r}")
            return number
    elif origin is str:
        if isinstance(value, str):
            return value
        if value is None:
            return ""
    elif origin is list:
        if isinstance(value, list):
            return value
        if isinstance(value, str):
            return [v for v in value.split(",") if v]
    raise ConfigError(f"{key}: expected {getattr(origin, '__name__', origin)}, got {value!r}")


def apply_override(cfg: Config, key: str, value: Any) -> None:
    """Set the dotted `key` (``section.name``) of `cfg` to `value`, coerced to the key's type;
    an unknown key or a bad value is a ConfigError. `validate` afterwards checks the whole."""
    parts = key.split(".")
    hints = typing.get_type_hints(Config)
    if len(parts) != 2 or parts[0] not in hints or parts[1] not in _field_types(hints[parts[0]]):
        raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(valid_keys())}")
    section, name = parts
    typ = _field_types(hints[section])[name]
    setattr(getattr(cfg, section), name, _coerce(key, value, typ))


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if not prefix and k in _sections() and v is None:
            continue  # an empty section (`model:` with nothing under it) keeps the defaults
        if isinstance(v, dict) and not prefix:
            if k not in _sections():
                raise ConfigError(f"unknown config section {k!r}; valid sections: "
                                  f"{', '.join(_sections())}")
            out.update(_flatten(v, key + "."))
        elif not prefix and k in _sections():
            raise ConfigError(f"config section {k!r} holds {v!r}, not keys; write its keys "
                              f"indented on the lines under `{k}:`, or drop it")
        else:
            out[key] = v
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """``objective.K=50`` -> ("objective.K", 50); values are parsed as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. objective.K=50)")
    key, raw = text.split("=", 1)
    try:
        value = parse_yaml(raw) if raw != "" else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: cannot parse value ({err.problem})") from None
    return key.strip(), value


def validate(cfg: Config) -> Config:
    """Check choices and ranges; raise ConfigError naming the key and the fix.

    The model name is checked by `mmvae.registry` (config sits below the models)."""
    flat = to_dict(cfg)
    for key in valid_keys():  # also for configs built in code, which skip `_coerce`
        s, k = key.split(".")
        if isinstance(flat[s][k], float) and not math.isfinite(flat[s][k]):
            raise ConfigError(f"{key}: expected a finite number, got {flat[s][k]}")
    for key, choices in CHOICES.items():
        s, k = key.split(".")
        if flat[s][k] not in choices:
            raise ConfigError(f"{key}={flat[s][k]!r}; choose one of {', '.join(choices)}")
    for key in POSITIVE:
        s, k = key.split(".")
        if flat[s][k] <= 0:
            raise ConfigError(f"{key} must be > 0, got {flat[s][k]}")
    for key in NON_NEGATIVE:
        s, k = key.split(".")
        if flat[s][k] < 0:
            raise ConfigError(f"{key} must be >= 0, got {flat[s][k]}")
    unknown = [m for m in cfg.train.eval_metrics if m not in PERIODIC_METRICS]
    if unknown:
        raise ConfigError(f"train.eval_metrics has {', '.join(map(str, unknown))}; choose from "
                          f"{', '.join(PERIODIC_METRICS)} (the others run in launch/evaluate.py)")
    P, K = cfg.parallel.particle_shards, cfg.objective.K
    if K % P:
        raise ConfigError(f"objective.K={K} is not divisible by parallel.particle_shards={P}; "
                          f"choose K as a multiple of P")
    o = cfg.objective
    if o.name == "dreg" and o.dreg_variant == "swap" and not o.looser:
        raise ConfigError("objective.dreg_variant=swap needs the looser bound: set objective."
                          "looser=true, or use objective.dreg_variant=cv for the joint bound")
    if o.name == "dreg" and o.dreg_variant == "swap" and cfg.train.mixed_precision == "fp16":
        # its path scale is 1/w-sized on gradients that fp16 has already flushed (14% off)
        raise ConfigError("objective.dreg_variant=swap loses terms under fp16 gradients: set "
                          "train.mixed_precision=bf16 (or no), or use objective.dreg_variant=cv")
    if cfg.objective.name == "elbo" and (P > 1 or cfg.objective.k_chunk):
        raise ConfigError("objective.name=elbo uses one particle: set parallel.particle_shards=1 "
                          "and objective.k_chunk=0, or use iwae/dreg")
    if not 0 <= cfg.data.drop_modalities < 1:
        # every fusion and objective takes the presence mask (`mmvae.objectives`, "Missing
        # modalities"): the simulated rate is the only setting that can be wrong
        raise ConfigError(f"data.drop_modalities={cfg.data.drop_modalities} must be in [0, 1)")
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file, then ``key=value`` overrides; validated."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found (see configs/ for examples)")
        try:
            tree = parse_yaml(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason}); save "
                              f"the config as UTF-8") from None
        except OSError as err:
            raise ConfigError(f"config file {str(path)!r} cannot be read: "
                              f"{err.strerror or err}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: invalid YAML ({err})".replace("\n", " ")) from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(tree).__name__}")
        for key, value in _flatten(tree).items():
            apply_override(cfg, key, value)
    for text in overrides:
        apply_override(cfg, *parse_override(text))
    return validate(cfg)


def from_dict(tree: dict) -> Config:
    """Rebuild a Config saved with `save_config` (validated)."""
    cfg = Config()
    for key, value in _flatten(tree).items():
        apply_override(cfg, key, value)
    return validate(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def describe() -> str:
    """Every key with its default and its comment (for --help-config)."""
    import ast
    import inspect

    lines = []
    for section, cls in typing.get_type_hints(Config).items():
        tree = ast.parse(inspect.getsource(cls))
        body = tree.body[0].body
        docs = {}
        for a, b in zip(body, body[1:]):
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr):
                docs[a.target.id] = " ".join(str(b.value.value).split())
        defaults = dataclasses.asdict(cls())
        for name in _field_types(cls):
            lines.append(f"{section}.{name} = {defaults[name]!r}\n    {docs.get(name, '')}")
    return "\n".join(lines)
