"""The paper's released-model format <-> our run folders.

The paper-format state dicts here are written from the paper code's nets (iffsid/mmvae
``src/models/vae_*.py``, ``mmvae_*.py``: names and shapes, as torch 1.3 saves them, in torch's
legacy file format) independently of `mmvae.interop.names`; every tensor gets distinct random
values, and the checks are by value: the paper's forward computations, written here with plain
torch.nn.functional on the paper's tensors, must equal our nets' on the imported model."""
from __future__ import annotations

import argparse
import importlib
import json
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mmvae
from mmvae.interop.paper import InteropError, import_paper_model, read_args

D, V = 4, 23  # latent dim; vocabulary (the paper's was 1590)


# --- the paper's parameter names and shapes --------------------------------------------------

def _linear(name, n_in, n_out, bias=True):
    return {f"{name}.weight": (n_out, n_in), **({f"{name}.bias": (n_out,)} if bias else {})}


def _conv(name, c_in, c_out, k=(4, 4), bias=True, transposed=False):
    shape = (c_in, c_out, *k) if transposed else (c_out, c_in, *k)
    return {f"{name}.weight": shape, **({f"{name}.bias": (c_out,)} if bias else {})}


def _bn(name, c):
    return {f"{name}.weight": (c,), f"{name}.bias": (c,), f"{name}.running_mean": (c,),
            f"{name}.running_var": (c,), f"{name}.num_batches_tracked": ()}


def _prior(prefix=""):
    return {f"{prefix}_pz_params.0": (1, D), f"{prefix}_pz_params.1": (1, D)}


def paper_mnist(p):
    return {**_prior(p), **_linear(f"{p}enc.enc.0.0", 784, 400), **_linear(f"{p}enc.fc21", 400, D),
            **_linear(f"{p}enc.fc22", 400, D), **_linear(f"{p}dec.dec.0.0", D, 400),
            **_linear(f"{p}dec.fc3", 400, 784)}


def paper_svhn(p):
    enc = {**_conv(f"{p}enc.enc.0", 3, 32), **_conv(f"{p}enc.enc.2", 32, 64), **_conv(f"{p}enc.enc.4", 64, 128),
           **_conv(f"{p}enc.c1", 128, D), **_conv(f"{p}enc.c2", 128, D)}
    chans = [(D, 128), (128, 64), (64, 32), (32, 3)]
    dec = {k: v for i, (a, b) in enumerate(chans) for k, v in _conv(f"{p}dec.dec.{2 * i}", a, b, transposed=True).items()}
    return {**_prior(p), **enc, **dec}


def paper_cub_image(p):
    chans = [(3, 64), (64, 128), (128, 256), (256, 512)]
    enc = {k: v for i, (a, b) in enumerate(chans) for k, v in _conv(f"{p}enc.enc.{2 * i}", a, b).items()}
    dec_chans = [(D, 512), (512, 256), (256, 128), (128, 64), (64, 3)]
    dec = {k: v for i, (a, b) in enumerate(dec_chans)
           for k, v in _conv(f"{p}dec.dec.{2 * i}", a, b, transposed=True).items()}
    return {**_prior(p), **enc, **_conv(f"{p}enc.c1", 512, D), **_conv(f"{p}enc.c2", 512, D), **dec}


def paper_cub_feature(p):
    return {**_prior(p), **_linear(f"{p}enc.enc.layer0.0", 2048, 1024), **_linear(f"{p}enc.enc.layer1.0", 1024, 512),
            **_linear(f"{p}enc.enc.layer2.0", 512, 256), **_linear(f"{p}enc.fc21", 256, D),
            **_linear(f"{p}enc.fc22", 256, D), **_linear(f"{p}dec.dec.out_t.0", D, 256),
            **_linear(f"{p}dec.dec.layer1_t.0", 256, 512), **_linear(f"{p}dec.dec.layer2_t.0", 512, 1024),
            **_linear(f"{p}dec.fc31", 1024, 2048)}


SENT_STEPS = [(4, 4)] * 3 + [(1, 4)] * 2  # kernel of each encoder conv


def paper_sentence(p, ft):
    c = (32, 64, 128, 256, 512) if ft else (32, 64, 128, 128, 128)
    out = {**_prior(p), f"{p}enc.embedding.weight": (V, 128)}
    c_in = 1
    for i, (c_out, k) in enumerate(zip(c, SENT_STEPS)):
        out.update({**_conv(f"{p}enc.enc.{3 * i}", c_in, c_out, k, bias=ft), **_bn(f"{p}enc.enc.{3 * i + 1}", c_out)})
        c_in = c_out
    out.update({**_conv(f"{p}enc.c1", c[-1], D, bias=ft), **_conv(f"{p}enc.c2", c[-1], D, bias=ft)})
    dec = [D, *c[::-1]]
    for i, (a, b, k) in enumerate(zip(dec, dec[1:], [(4, 4), *SENT_STEPS[::-1]])):
        out.update({**_conv(f"{p}dec.dec.{3 * i}", a, b, k, bias=ft, transposed=True),
                    **_bn(f"{p}dec.dec.{3 * i + 1}", b)})
    out.update(_conv(f"{p}dec.dec.15", 32, 1, bias=ft, transposed=True))
    out.update({f"{p}dec.toVocabSize.weight": (V, 128), f"{p}dec.toVocabSize.bias": (V,)})
    return out


PAPER = {  # model -> (names and shapes, sub-VAE priors shared with the MMVAE's?)
    "mnist_svhn": (lambda: {**_prior(), **paper_mnist("vaes.0."), **paper_svhn("vaes.1.")}, False),
    "cubIS": (lambda: {**_prior(), **paper_cub_image("vaes.0."), **paper_sentence("vaes.1.", False)}, True),
    "cubISft": (lambda: {**_prior(), **paper_cub_feature("vaes.0."), **paper_sentence("vaes.1.", True)}, True),
}


def paper_state(model: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Distinct random values for every tensor, tied and shared as the paper's modules are; an
    OrderedDict with `_metadata`, as `state_dict()` returns."""
    spec, shared = PAPER[model]
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in spec().items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.randint(1, 10_000, (), generator=gen)
        elif name.endswith("running_var"):
            state[name] = torch.rand(shape, generator=gen) + 0.5
        else:
            state[name] = torch.randn(shape, generator=gen) * 0.1
    for key in [k for k in state if k.endswith("dec.toVocabSize.weight")]:
        state[key] = state[key.replace("dec.toVocabSize", "enc.embedding")]  # tied
    if shared:  # the sub-VAEs hold the MMVAE's ParameterList
        for key in [k for k in state if k.startswith("vaes.") and "_pz_params" in k]:
            state[key] = state[key.split(".", 2)[2]]
    state = OrderedDict(state)
    state._metadata = OrderedDict({"": {"version": 1}})
    return state


def paper_args(model: str, **extra) -> argparse.Namespace:
    flags = dict(experiment=model, model=model, obj="dreg", K=3, looser=True, llik_scaling=0.0,
                 batch_size=4, epochs=1, latent_dim=D, num_hidden_layers=1, pre_trained="",
                 learn_prior=True, logp=False, print_freq=0, no_analytics=True, no_cuda=False,
                 seed=5, cuda=False)
    return argparse.Namespace(**{**flags, **extra})


def write_paper_folder(folder: Path, model: str, state=None, args=None) -> Path:
    """model.rar + args.rar as the paper's torch 1.3 wrote them (legacy, non-zip format)."""
    folder.mkdir(parents=True, exist_ok=True)
    legacy = {"_use_new_zipfile_serialization": False}
    torch.save(state if state is not None else paper_state(model), folder / "model.rar", **legacy)
    torch.save(args if args is not None else paper_args(model), folder / "args.rar", **legacy)
    return folder


# --- the paper's forward computations, from its tensors alone --------------------------------

def _bn_eval(h, s, name):
    return F.batch_norm(h, s[f"{name}.running_mean"], s[f"{name}.running_var"], s[f"{name}.weight"],
                        s[f"{name}.bias"], training=False)


def _lin(h, s, name):
    return F.linear(h, s[f"{name}.weight"], s.get(f"{name}.bias"))


def paper_encode(kind, s, p, x):
    """(loc, raw scale) of the paper's encoder with prefix p."""
    if kind == "mnist":
        h = F.relu(_lin(x.flatten(1), s, f"{p}enc.enc.0.0"))
        return _lin(h, s, f"{p}enc.fc21"), _lin(h, s, f"{p}enc.fc22")
    if kind == "feature":
        h = x
        for i in range(3):
            h = F.elu(_lin(h, s, f"{p}enc.enc.layer{i}.0"))
        return _lin(h, s, f"{p}enc.fc21"), _lin(h, s, f"{p}enc.fc22")
    if kind in ("svhn", "image"):
        h = x
        for i in range(3 if kind == "svhn" else 4):
            h = F.relu(F.conv2d(h, s[f"{p}enc.enc.{2 * i}.weight"], s[f"{p}enc.enc.{2 * i}.bias"], 2, 1))
    else:  # sentence
        h = F.embedding(x.long(), s[f"{p}enc.embedding.weight"], padding_idx=0).unsqueeze(1)
        for i, k in enumerate(SENT_STEPS):
            stride, pad = (2, 1) if k == (4, 4) else ((1, 2), (0, 1))
            h = F.conv2d(h, s[f"{p}enc.enc.{3 * i}.weight"], s.get(f"{p}enc.enc.{3 * i}.bias"), stride, pad)
            h = F.relu(_bn_eval(h, s, f"{p}enc.enc.{3 * i + 1}"))
    heads = [F.conv2d(h, s[f"{p}enc.c{j}.weight"], s.get(f"{p}enc.c{j}.bias")).flatten(1) for j in (1, 2)]
    return tuple(heads)


def paper_decode(kind, s, p, z):
    if kind == "mnist":
        h = F.relu(_lin(z, s, f"{p}dec.dec.0.0"))
        return torch.sigmoid(_lin(h, s, f"{p}dec.fc3")).clamp(1e-6, 1 - 1e-6).view(-1, 1, 28, 28)
    if kind == "feature":
        h = F.elu(_lin(z, s, f"{p}dec.dec.out_t.0"))
        h = F.elu(_lin(h, s, f"{p}dec.dec.layer1_t.0"))
        return _lin(F.elu(_lin(h, s, f"{p}dec.dec.layer2_t.0")), s, f"{p}dec.fc31")
    h = z[:, :, None, None]
    if kind in ("svhn", "image"):
        n = 4 if kind == "svhn" else 5
        for i in range(n):
            w, b = s[f"{p}dec.dec.{2 * i}.weight"], s[f"{p}dec.dec.{2 * i}.bias"]
            h = F.conv_transpose2d(h, w, b, 1 if i == 0 else 2, 0 if i == 0 else 1)
            h = torch.sigmoid(h) if i == n - 1 else F.relu(h)
        return h
    steps = [((1, 1), (0, 0))] + [((1, 2), (0, 1))] * 2 + [((2, 2), (1, 1))] * 2
    for i, (stride, pad) in enumerate(steps):
        h = F.conv_transpose2d(h, s[f"{p}dec.dec.{3 * i}.weight"], s.get(f"{p}dec.dec.{3 * i}.bias"), stride, pad)
        h = F.relu(_bn_eval(h, s, f"{p}dec.dec.{3 * i + 1}"))
    h = F.relu(F.conv_transpose2d(h, s[f"{p}dec.dec.15.weight"], s.get(f"{p}dec.dec.15.bias"), 2, 1))
    return _lin(h.reshape(-1, 32, 128), s, f"{p}dec.toVocabSize")  # logits (N, 32, V)


KINDS = {"mnist_svhn": ("mnist", "svhn"), "cubIS": ("image", "sentence"), "cubISft": ("feature", "sentence")}
INPUTS = {"mnist": lambda g: torch.rand(3, 1, 28, 28, generator=g),
          "svhn": lambda g: torch.rand(3, 3, 32, 32, generator=g),
          "image": lambda g: torch.rand(3, 3, 64, 64, generator=g),
          "feature": lambda g: torch.rand(3, 2048, generator=g) * 2,
          "sentence": lambda g: torch.randint(0, V, (3, 32), generator=g)}


def _launcher(name):
    return importlib.import_module(f"mmvae.cli.{name}").main


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", list(PAPER))
def test_every_paper_tensor_lands_where_the_paper_uses_it(tmp_path, name):
    state = paper_state(name)
    folder = write_paper_folder(tmp_path / "paper", name, state)
    run = tmp_path / "run"
    assert _launcher("import_paper_model")([str(folder), "--out", str(run)]) == 0
    model = mmvae.load_model(run).eval()
    ours = model.state_dict()
    # every paper tensor is in our model by value (mnist_svhn's unused sub-VAE priors aside)
    unused = {k for k in state if k.startswith("vaes.") and "_pz_params" in k} if name == "mnist_svhn" else set()
    for key, value in state.items():
        if key not in unused:
            assert any(o.shape == value.shape and torch.equal(o, value.to(o.dtype)) for o in ours.values()), key
    # priors: the MMVAE's, shared by our sub-VAEs
    assert torch.equal(model.prior_raw, state["_pz_params.1"]) and torch.equal(model.prior_loc, state["_pz_params.0"])
    assert all(v.prior_raw is model.prior_raw for v in model.vaes)
    # every net computes what the paper's computes with those tensors
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for i, (kind, vae) in enumerate(zip(KINDS[name], model.vaes)):
            x, z = INPUTS[kind](g), torch.randn(5, D, generator=g)
            for got, want in zip(vae.enc(x), paper_encode(kind, state, f"vaes.{i}.", x)):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(vae.dec(z), paper_decode(kind, state, f"vaes.{i}.", z), rtol=1e-4, atol=1e-5)
    # the reverse gives back the paper's state dict, tensor by tensor
    exported = tmp_path / "back"
    assert _launcher("import_paper_model")([str(run), "--out", str(exported), "--export"]) == 0
    back = torch.load(exported / "model.rar", weights_only=True)
    assert set(back) == set(state)
    for key, value in state.items():
        expected = torch.zeros_like(value) if key in unused else value
        assert torch.equal(back[key], expected), key
    assert vars(read_args(exported / "args.rar"))["latent_dim"] == D


def test_flags_become_config_keys_and_ignored_ones_are_listed(tmp_path):
    args = paper_args("cubISft", K=7, looser=False, obj="iwae", llik_scaling=0.002, batch_size=9,
                      epochs=11, seed=3, lr=1e-4, std=0.0001, experiment="ft")
    folder = write_paper_folder(tmp_path / "p", "cubISft", args=args)
    record = import_paper_model(folder, tmp_path / "run", shards="somewhere")
    cfg = mmvae.config.load_config(tmp_path / "run" / "config.yaml")
    assert (cfg.model.name, cfg.model.latent_dim, cfg.model.learn_prior, cfg.model.llik_scaling) == ("cubISft", D, True, 0.002)
    assert (cfg.model.vocab_size, cfg.model.paper_token_loss) == (V, True)  # from the embedding; paper loss
    assert (cfg.objective.name, cfg.objective.K, cfg.objective.looser) == ("iwae", 7, False)
    assert (cfg.data.batch_size, cfg.data.shards, cfg.train.epochs, cfg.train.seed, cfg.train.lr) == (9, "somewhere", 11, 3, 1e-4)
    assert cfg.run.experiment == "ft" and cfg.run.dir == str(tmp_path / "run")
    assert record["flags"]["std"].startswith("ignored") and record["flags"]["cuda"].startswith("ignored")
    assert json.loads((tmp_path / "run" / "import.json").read_text())["sha256"]["model.rar"]
    assert mmvae.load_model(tmp_path / "run").llik_scaling == [0.002, 1.0]


class Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_args_rar_unpickles_nothing_but_a_namespace(tmp_path, capsys):
    folder = write_paper_folder(tmp_path / "p", "mnist_svhn", args=argparse.Namespace(model="mnist_svhn", x=Evil()))
    with pytest.raises(InteropError, match="argparse.Namespace alone"):
        import_paper_model(folder, tmp_path / "run")
    assert "unpickled!" not in capsys.readouterr().out
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("change, message", [
    (lambda s, a: s.pop("vaes.1.enc.c2.bias"), "lacks 1 tensors"),
    (lambda s, a: s.__setitem__("vaes.0.enc.extra.weight", torch.zeros(1)), "does not, e.g. vaes.0.enc.extra.weight"),
    (lambda s, a: setattr(a, "latent_dim", D + 1), "has shape"),
    (lambda s, a: setattr(a, "model", "cubS_unknown"), "cannot be imported"),
])
def test_a_mismatching_folder_is_one_line_and_writes_nothing(tmp_path, capsys, change, message):
    state, args = paper_state("mnist_svhn"), paper_args("mnist_svhn")
    change(state, args)
    folder = write_paper_folder(tmp_path / "p", "mnist_svhn", state, args)
    assert _launcher("import_paper_model")([str(folder), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err
    assert not (tmp_path / "run").exists()


@pytest.fixture
def imported_zip_run(tmp_path, shards):
    """A paper mnist_svhn folder, zipped as released (a top folder inside), imported with
    data.shards at the tiny built-in digits shards."""
    folder = write_paper_folder(tmp_path / "src" / "mnist-svhn", "mnist_svhn")
    archive = tmp_path / "mnist-svhn.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in folder.iterdir():
            zf.write(f, f"mnist-svhn/{f.name}")
    run = tmp_path / "run"
    assert _launcher("import_paper_model")([str(archive), "--out", str(run), "--shards", str(shards)]) == 0
    return run


def test_imported_zip_evaluates_end_to_end(imported_zip_run):
    run = imported_zip_run
    argv = ["--run", str(run), "--metrics", "likelihood,latent", "eval.iwae_K=4", "eval.k_chunk=2",
            "eval.max_datapoints=8", "eval.latent_max_train=40", "logging.progress=false"]
    assert _launcher("evaluate")(argv) == 0
    saved = json.loads((run / "eval.json").read_text())
    assert saved["model"] == "mnist_svhn" and saved["metrics"]["likelihood"]["num_datapoints"] == 8
    assert (run / "report.md").is_file()


def test_init_from_fine_tunes_the_imported_weights(imported_zip_run, tmp_path):
    """train.init_from starts a new run from the imported weights: after two Adam steps of lr 1e-3
    no parameter moved by more than a few lr (a fresh initialisation would differ by far more),
    and some moved; the imported folder is left as it was."""
    run = imported_zip_run
    before = mmvae.load_model(run).state_dict()
    ft = tmp_path / "ft"
    argv = ["--config", str(run / "config.yaml"), f"train.init_from={run}", f"run.dir={ft}",
            "train.max_steps=2", "train.test_every=0", "logging.wandb=disabled",
            "logging.progress=false"]
    assert _launcher("train")(argv) == 0
    assert json.loads((ft / "summary.json").read_text())["step"] == 2
    after = mmvae.load_model(ft).state_dict()
    moved = {k: (after[k] - before[k]).abs().max().item() for k in before}
    assert max(moved.values()) <= 3 * 2 * 1e-3
    assert moved["vaes.0.enc.loc.weight"] > 0 and moved["vaes.1.dec.body.6.bias"] > 0
    untouched = mmvae.load_model(run).state_dict()
    assert all(torch.equal(untouched[k], before[k]) for k in before)
    assert not (run / "checkpoints").exists()


def test_init_from_refuses_to_overwrite_its_source_and_another_model(imported_zip_run, capsys):
    run = imported_zip_run
    base = ["--config", str(run / "config.yaml"), "train.max_steps=1", "logging.wandb=disabled",
            "logging.progress=false"]
    assert _launcher("train")(base + [f"train.init_from={run}"]) == 2  # run.dir is the import
    assert "set run.dir to a new folder" in capsys.readouterr().err
    assert _launcher("train")(base + [f"train.init_from={run}", "model.latent_dim=3",
                                      f"run.dir={run}-other"]) == 2
    err = capsys.readouterr().err
    assert "another model" in err and len(err.strip().splitlines()) == 1
    assert not (run / "metrics.jsonl").exists() and not Path(f"{run}-other").exists()
