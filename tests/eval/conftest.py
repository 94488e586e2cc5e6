"""Fixtures of the evaluation tests: a class-template stand-in model, template classifiers,
sklearn's digits at 28x28, run folders."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmvae.dists import get_family
from standins import StandInModel

NUM_CLASSES = 10


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Small convs on a shared 2-core box: 2 intra-op threads were up to 10x slower than 1
    whenever another process was busy (OpenMP workers wait on each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def templates(shape, seed):
    """One fixed random image per class: (10, *shape) in [0, 1]."""
    return torch.rand(NUM_CLASSES, *shape, generator=torch.Generator().manual_seed(seed))


class TemplateClassifier(nn.Module):
    """Nearest class template (a perfect classifier for template images)."""

    def __init__(self, tmpl):
        super().__init__()
        self.tmpl = nn.Parameter(tmpl.flatten(1), requires_grad=False)  # (10, P)

    def forward(self, x):
        return -torch.cdist(x.flatten(1).float(), self.tmpl)  # (B, 10)


class _Out:
    @staticmethod
    def mean(out):
        return out


class TemplateExpert(nn.Module):
    """Encoder: z ~ N(8 * onehot((class of x + enc_shift) mod 10), 0.1^2) (blind: N(0, I),
    whatever x); decoder: the template of class (argmax z + shift) mod 10. Shifts 0 make a
    perfect cross-modal generator."""

    latent_dim = NUM_CLASSES

    def __init__(self, modality, shape, seed, shift=0, enc_shift=0, blind=False):
        super().__init__()
        self.modality, self.data_shape, self.shift = modality, tuple(shape), shift
        self.enc_shift, self.blind = enc_shift, blind
        self.register_buffer("tmpl", templates(shape, seed))
        self.classifier = TemplateClassifier(self.tmpl)
        self.posterior_family = get_family("normal")
        self.likelihood = _Out()

    def posterior(self, x):
        cls = (self.classifier(x).argmax(-1) + self.enc_shift) % NUM_CLASSES
        loc = 8.0 * F.one_hot(cls, NUM_CLASSES).float()
        if self.blind:  # ignores its input
            return torch.zeros_like(loc), torch.ones_like(loc)
        return loc, torch.full_like(loc, 0.1)

    def decode(self, z):
        cls = (z.argmax(-1) + self.shift) % NUM_CLASSES
        return self.tmpl[cls]


class TemplateModel(StandInModel):
    """A two-modality model that is 'perfect' (shifts 0): cross and joint coherence 1."""

    def __init__(self, shifts=(0, 0)):
        super().__init__([TemplateExpert("mnist", (1, 28, 28), 1, shifts[0]),
                          TemplateExpert("svhn", (3, 32, 32), 2, shifts[1])], NUM_CLASSES)

    def classifiers(self):
        return {e.modality: e.classifier for e in self.vaes}

    def pairs(self, n, seed=0):
        """n labelled pairs of class templates, balanced classes: ([x_mnist, x_svhn], labels)."""
        labels = torch.arange(n) % NUM_CLASSES
        labels = labels[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]
        return [e.tmpl[labels] for e in self.vaes], labels


class PolyTemplateModel(TemplateModel):
    """M modalities m0..m{M-1} of (3, 28, 28) class templates (polydigits-shaped), each expert
    a `TemplateExpert` with its own decoder shift, encoder shift and blindness."""

    def __init__(self, num=3, shifts=None, enc_shifts=None, blind=()):
        shifts, enc_shifts = shifts or [0] * num, enc_shifts or [0] * num
        StandInModel.__init__(self, [
            TemplateExpert(f"m{i}", (3, 28, 28), 10 + i, shifts[i], enc_shifts[i], i in blind)
            for i in range(num)], NUM_CLASSES)


@pytest.fixture
def make_poly_template_model():
    """PolyTemplateModel(num, shifts, enc_shifts, blind)."""
    return PolyTemplateModel


@pytest.fixture
def template_model():
    return TemplateModel()


@pytest.fixture
def make_template_model():
    """TemplateModel(shifts=(mnist decoder shift, svhn decoder shift))."""
    return TemplateModel


@pytest.fixture(scope="session")
def digits28():
    """sklearn's 8x8 digits bilinearly upsampled to (N, 1, 28, 28) in [0, 1], with labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images / 16.0, dtype=torch.float32)[:, None]
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    return x, torch.tensor(bunch.target, dtype=torch.long)


@pytest.fixture(scope="session")
def unique_digits(tmp_path_factory, digits28):
    """A shard-like folder holding only unique_{train,test}.npz (mnist: the 28x28 digits;
    svhn: the same digits padded to 32x32 RGB), as digit recipes write them."""
    folder = tmp_path_factory.mktemp("unique_digits")
    x, y = digits28
    mnist = (x * 255).round().to(torch.uint8).numpy()
    svhn = np.repeat(np.pad(mnist, ((0, 0), (0, 0), (2, 2), (2, 2))), 3, axis=1)
    cut = 1400
    for split, sl in (("train", slice(None, cut)), ("test", slice(cut, None))):
        np.savez(folder / f"unique_{split}.npz", mnist=mnist[sl], mnist_labels=y[sl].numpy(),
                 svhn=svhn[sl], svhn_labels=y[sl].numpy())
    return folder


@pytest.fixture
def make_shapes_run(tmp_path):
    """make_shapes_run(test_scenes) -> (run folder, shards): tiny shapes_simple shards (30 train
    scenes) and an untrained cubIS (D=4) saved as a run folder that evaluates them."""
    import json

    import mmvae
    from mmvae.config import load_config, save_config
    from mmvae.data import builtin

    def make(test_scenes: int):
        shards, run = tmp_path / "shapes", tmp_path / "run"
        builtin.BUILTINS["shapes_simple"](shards, train_scenes=30, test_scenes=test_scenes,
                                          min_shards=2, progress=False)
        vocab = len(json.loads((shards / "vocab.json").read_text())["itos"])
        torch.manual_seed(0)
        run.mkdir()
        save_config(load_config(None, ["model.name=cubIS", "model.latent_dim=4", f"model.vocab_size={vocab}",
                                       f"data.shards={shards}", "logging.progress=false"]), run / "config.yaml")
        mmvae.save_model(mmvae.build_model("cubIS", latent_dim=4, vocab_size=vocab), run / "model")
        return run, shards

    return make
