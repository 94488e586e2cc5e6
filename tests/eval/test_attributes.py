"""Attribute coherence on the shapes datasets: caption parsing, a perfect and a direction-broken
stand-in model drawn with the real scene renderer, and the metric through evaluate_run."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmvae.data.recipes import shapes
from mmvae.data.recipes.captions import encode_all
from mmvae.dists import get_family
from mmvae.eval.attributes import attribute_coherence, caption_attributes, one_object_scenes
from standins import StandInModel

COLOURS, SHAPES = list(shapes.COLOURS), list(shapes.SHAPES)
NC, NS = len(COLOURS), len(SHAPES)
WORDS = ["<exc>", "<pad>", "<eos>", "a", "the", "is", "and", "small", "disc", "violet",
         *COLOURS, *[s for s in SHAPES if s != "circle"], "circle"]
VOCAB = {"itos": WORDS, "stoi": {w: i for i, w in enumerate(WORDS)}, "max_len": 32}
EOS = WORDS.index("<eos>")


def ids(*texts):
    return encode_all(list(texts), VOCAB)


def test_caption_attributes_read_the_first_words_up_to_eos():
    got = caption_attributes(ids("the circle is small and red", "a violet disc", "a small", "a blue"),
                             WORDS, EOS)
    assert got["colour"].tolist() == [COLOURS.index("red"), COLOURS.index("purple"), -1,
                                      COLOURS.index("blue")]
    assert got["shape"].tolist() == [SHAPES.index("circle"), SHAPES.index("circle"), -1, -1]
    cut = ids("a red star")
    cut[0, 1] = EOS  # "a <eos> star": nothing after the first <eos> counts
    got = caption_attributes(cut, WORDS, EOS)
    assert got["colour"].tolist() == got["shape"].tolist() == [-1]


def render(colour: int, shape: int) -> torch.Tensor:
    scene = {"objects": [{"shape": SHAPES[shape], "colour": COLOURS[colour], "size": "large",
                          "angle": 0.0, "radius": 20.0, "xy": (32.0, 32.0)}],
             "background": np.zeros(3), "light": np.zeros(2)}
    return torch.from_numpy(shapes.render_scene(scene, np.random.default_rng(0))).float() / 255


TEMPLATES = torch.stack([render(c, s) for c in range(NC) for s in range(NS)])  # (42, 3, 64, 64)


class TemplateAttribute(nn.Module):
    """Nearest rendered template -> scores over one attribute (a perfect classifier here)."""

    def __init__(self, attr):
        super().__init__()
        self.attr = attr
        self.templates = nn.Parameter(TEMPLATES.flatten(1), requires_grad=False)

    def forward(self, x):
        d = torch.cdist(x.flatten(1).float(), self.templates).view(-1, NC, NS)
        return -(d.amin(2) if self.attr == "colour" else d.amin(1))


class _Mean:
    @staticmethod
    def mean(out):
        return out


class Expert(nn.Module):
    """z = 8 * [onehot(colour), onehot(shape)] (+ small noise); the image decoder renders the
    scene, the caption decoder writes 'a <colour> <shape>' (logits), colour shifted by `shift`."""

    latent_dim = NC + NS

    def __init__(self, modality, shift=0):
        super().__init__()
        self.modality, self.shift = modality, shift
        self.data_shape = (3, 64, 64) if modality == "image" else (32,)
        self.posterior_family, self.likelihood = get_family("normal"), _Mean()

    def posterior(self, x):
        if self.modality == "image":
            c, s = (TemplateAttribute(a)(x).argmax(-1) for a in ("colour", "shape"))
        else:
            got = caption_attributes(x.numpy(), WORDS, EOS)
            c, s = torch.from_numpy(got["colour"]), torch.from_numpy(got["shape"])
        loc = 8.0 * torch.cat([F.one_hot(c, NC), F.one_hot(s, NS)], -1).float()
        return loc, torch.full_like(loc, 0.1)

    def decode(self, z):
        c, s = (z[..., :NC].argmax(-1) + self.shift) % NC, z[..., NC:].argmax(-1)
        if self.modality == "image":
            return TEMPLATES[c * NS + s]
        texts = [f"a {COLOURS[i]} {SHAPES[j]}" for i, j in zip(c.tolist(), s.tolist())]
        return F.one_hot(torch.from_numpy(ids(*texts)), len(WORDS)).float()


class SceneModel(StandInModel):
    def __init__(self, shifts=(0, 0)):
        super().__init__([Expert("image", shifts[0]), Expert("caption", shifts[1])], NC + NS)


def scenes(n=60):
    colour, shape = np.arange(n) % NC, (np.arange(n) // NC) % NS
    images = torch.stack([TEMPLATES[c * NS + s] for c, s in zip(colour, shape)])
    captions = ids(*[f"the {SHAPES[s]} is small and {COLOURS[c]}" for c, s in zip(colour, shape)])
    return images, captions, {"colour": colour, "shape": shape}


CLASSIFIERS = {"colour": TemplateAttribute("colour"), "shape": TemplateAttribute("shape")}


def test_perfect_stand_in_is_fully_coherent():
    images, captions, truth = scenes()
    out = attribute_coherence(SceneModel(), images, captions, truth, CLASSIFIERS, WORDS, EOS,
                              batch_size=16, joint_samples=50)
    assert out["num_scenes"] == 60 and out["joint_samples"] == 50
    assert set(out["values"].values()) == {1.0}, out["values"]
    assert {f"{d}_{a}" for d in ("cross_image_to_caption", "cross_caption_to_image", "self_image",
                                 "self_caption", "joint") for a in ("colour", "shape", "both")} == set(out["values"])


def test_a_wrong_caption_decoder_breaks_only_generations_into_captions():
    images, captions, truth = scenes()
    v = attribute_coherence(SceneModel(shifts=(0, 1)), images, captions, truth, CLASSIFIERS, WORDS,
                            EOS, batch_size=16, joint_samples=50)["values"]
    assert v["cross_caption_to_image_both"] == v["self_image_both"] == 1.0
    assert v["cross_image_to_caption_colour"] == v["self_caption_colour"] == v["joint_colour"] == 0.0
    assert v["cross_image_to_caption_shape"] == v["joint_shape"] == 1.0 and v["joint_both"] == 0.0


def test_test_scenes_take_one_object_scenes_and_one_caption_each():
    unique = {"image": np.arange(4)[:, None] * np.ones((4, 3)), "num_objects": np.array([1, 2, 1, 1]),
              "caption": np.arange(40)[:, None] * np.ones((40, 2), np.int64),
              "colour": np.array([5, 6, 2, 1]), "shape": np.array([0, 1, 2, 3])}
    images, captions, truth = one_object_scenes(unique)
    assert images[:, 0].tolist() == [0, 2, 3] and captions[:, 0].tolist() == [0, 22, 33]
    assert truth["colour"].tolist() == [5, 2, 1] and truth["shape"].tolist() == [0, 2, 3]


@pytest.mark.parametrize("bad", ["mnist_svhn"])
def test_attribute_coherence_needs_image_and_caption(bad):
    import mmvae

    with pytest.raises(ValueError, match="image and caption"):
        attribute_coherence(mmvae.build_model(bad), *scenes(4), CLASSIFIERS, WORDS, EOS)
