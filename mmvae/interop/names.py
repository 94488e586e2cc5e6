"""The parameter-name table between the paper code's models and ours (no matching by order).

Each table maps a *module* of the paper's nets (the prefix of its state-dict keys) to the module
of ours that computes the same thing; the tensors under a module (``weight``, ``bias``,
``running_mean``, ``running_var``, ``num_batches_tracked``) have the same names on both sides.
Paper names are those of iffsid/mmvae's ``src/models/vae_*.py`` and ``mmvae_*.py`` (torch 1.3
``state_dict()``); ours are those of ``mmvae/nets/*.py`` inside ``mmvae/models``.

| paper model (``--model``) | ours         | sub-VAEs (paper prefix ``vaes.0.``, ``vaes.1.``) |
|---------------------------|--------------|----------------------------------------------------|
| mnist_svhn                | mnist_svhn   | MNIST_NET, SVHN_NET                                |
| cubIS                     | cubIS        | CUB_IMAGE_NET, CUB_SENTENCE_NET (cubS widths)      |
| cubISft                   | cubISft      | CUB_FEATURE_NET, CUB_SENTENCE_NET (cubSft widths)  |
| mnist, svhn, cubI, cubIft, cubS | mnist, svhn, cub_image, cub_image_ft, cub_sentence | (no prefix) |

Priors (``PRIOR``): the paper keeps ``_pz_params = [mu, raw scale]`` (a ParameterList; mu is a
frozen zero); ours are the ``prior_loc`` buffer and the ``prior_raw`` parameter. Sub-VAE priors:
in mnist_svhn the paper's sub-VAEs own prior parameters that the MMVAE never uses (they get no
gradient and stay at their initial zeros): import ignores them, export writes zeros. In cubIS and
cubISft the paper assigns the MMVAE's ParameterList to each sub-VAE, so ``vaes.i._pz_params.*``
are the MMVAE's tensors again: import checks that they are, export repeats them. Ours always
share the MMVAE's prior parameter (``vaes.i.prior_raw``), so those keys are derived, not mapped.

The caption decoder's output layer (paper ``dec.toVocabSize``, ours ``dec.out``) has its weight
tied to the embedding on both sides: the state dicts list the same tensor under both names.
"""
from __future__ import annotations

PRIOR = {
    "_pz_params.0": "prior_loc",  # (1, D) prior mean, a fixed zero
    "_pz_params.1": "prior_raw",  # (1, D) raw prior scale (softmax or softplus, per model)
}

MNIST_NET = {  # vae_mnist.Enc / Dec (num_hidden_layers = 1; more: mnist_net below)
    "enc.enc.0.0": "enc.body.0",    # Linear(784, 400) + ReLU
    "enc.fc21": "enc.loc",          # Linear(400, D)
    "enc.fc22": "enc.raw_scale",    # Linear(400, D), softmax trick
    "dec.dec.0.0": "dec.body.0",    # Linear(D, 400) + ReLU
    "dec.fc3": "dec.out",           # Linear(400, 784), sigmoid
}

SVHN_NET = {  # vae_svhn.Enc / Dec
    "enc.enc.0": "enc.body.0",      # Conv(3 -> 32, 4, 2, 1)
    "enc.enc.2": "enc.body.2",      # Conv(32 -> 64, 4, 2, 1)
    "enc.enc.4": "enc.body.4",      # Conv(64 -> 128, 4, 2, 1)
    "enc.c1": "enc.loc",            # Conv(128 -> D, 4, 1, 0)
    "enc.c2": "enc.raw_scale",      # Conv(128 -> D, 4, 1, 0)
    "dec.dec.0": "dec.body.0",      # ConvT(D -> 128, 4, 1, 0)
    "dec.dec.2": "dec.body.2",      # ConvT(128 -> 64, 4, 2, 1)
    "dec.dec.4": "dec.body.4",      # ConvT(64 -> 32, 4, 2, 1)
    "dec.dec.6": "dec.body.6",      # ConvT(32 -> 3, 4, 2, 1), sigmoid
}

CUB_IMAGE_NET = {  # vae_cub_image.Enc / Dec
    "enc.enc.0": "enc.body.0",      # Conv(3 -> 64, 4, 2, 1)
    "enc.enc.2": "enc.body.2",      # Conv(64 -> 128)
    "enc.enc.4": "enc.body.4",      # Conv(128 -> 256)
    "enc.enc.6": "enc.body.6",      # Conv(256 -> 512)
    "enc.c1": "enc.loc",            # Conv(512 -> D, 4, 1, 0)
    "enc.c2": "enc.raw_scale",      # Conv(512 -> D, 4, 1, 0), softplus
    "dec.dec.0": "dec.body.0",      # ConvT(D -> 512, 4, 1, 0)
    "dec.dec.2": "dec.body.2",      # ConvT(512 -> 256, 4, 2, 1)
    "dec.dec.4": "dec.body.4",      # ConvT(256 -> 128)
    "dec.dec.6": "dec.body.6",      # ConvT(128 -> 64)
    "dec.dec.8": "dec.body.8",      # ConvT(64 -> 3), sigmoid
}

CUB_FEATURE_NET = {  # vae_cub_image_ft.Enc / Dec (ELU MLPs)
    "enc.enc.layer0.0": "enc.body.0",    # Linear(2048, 1024)
    "enc.enc.layer1.0": "enc.body.2",    # Linear(1024, 512)
    "enc.enc.layer2.0": "enc.body.4",    # Linear(512, 256)
    "enc.fc21": "enc.loc",               # Linear(256, D)
    "enc.fc22": "enc.raw_scale",         # Linear(256, D), softplus
    "dec.dec.out_t.0": "dec.body.0",     # Linear(D, 256)
    "dec.dec.layer1_t.0": "dec.body.2",  # Linear(256, 512)
    "dec.dec.layer2_t.0": "dec.body.4",  # Linear(512, 1024)
    "dec.fc31": "dec.out",               # Linear(1024, 2048)
}

CUB_SENTENCE_NET = {  # vae_cub_sent(_ft).Enc / Dec: Conv, BatchNorm2d, ReLU blocks
    "enc.embedding": "enc.embedding",   # Embedding(V, 128, padding_idx=0)
    "enc.enc.0": "enc.body.0",          # Conv(1 -> 32, 4, 2, 1)
    "enc.enc.1": "enc.body.1",          # BatchNorm2d(32)
    "enc.enc.3": "enc.body.3",          # Conv(32 -> 64, 4, 2, 1)
    "enc.enc.4": "enc.body.4",          # BatchNorm2d(64)
    "enc.enc.6": "enc.body.6",          # Conv(64 -> 128, 4, 2, 1)
    "enc.enc.7": "enc.body.7",          # BatchNorm2d(128)
    "enc.enc.9": "enc.body.9",          # Conv(128 -> 128 | 256, (1, 4), (1, 2), (0, 1))
    "enc.enc.10": "enc.body.10",        # BatchNorm2d
    "enc.enc.12": "enc.body.12",        # Conv(128 | 256 -> 128 | 512, (1, 4), (1, 2), (0, 1))
    "enc.enc.13": "enc.body.13",        # BatchNorm2d
    "enc.c1": "enc.loc",                # Conv(C -> D, 4, 1, 0)
    "enc.c2": "enc.raw_scale",          # Conv(C -> D, 4, 1, 0), softplus
    "dec.dec.0": "dec.body.0",          # ConvT(D -> C, 4, 1, 0)
    "dec.dec.1": "dec.body.1",          # BatchNorm2d
    "dec.dec.3": "dec.body.3",          # ConvT((1, 4), (1, 2), (0, 1))
    "dec.dec.4": "dec.body.4",          # BatchNorm2d
    "dec.dec.6": "dec.body.6",          # ConvT((1, 4), (1, 2), (0, 1))
    "dec.dec.7": "dec.body.7",          # BatchNorm2d
    "dec.dec.9": "dec.body.9",          # ConvT(128 -> 64, 4, 2, 1)
    "dec.dec.10": "dec.body.10",        # BatchNorm2d(64)
    "dec.dec.12": "dec.body.12",        # ConvT(64 -> 32, 4, 2, 1)
    "dec.dec.13": "dec.body.13",        # BatchNorm2d(32)
    "dec.dec.15": "dec.body.15",        # ConvT(32 -> 1, 4, 2, 1), ReLU
    "dec.toVocabSize": "dec.out",       # Linear(128, V); weight tied to enc.embedding
}


def mnist_net(num_hidden_layers: int) -> dict[str, str]:
    """MNIST_NET plus the extra hidden layers: paper ``enc.enc.<i>.0`` (a Sequential of
    Sequential(Linear, ReLU)) is our ``enc.body.<2i>`` (a flat Sequential of Linear, ReLU)."""
    table = dict(MNIST_NET)
    for i in range(1, num_hidden_layers):
        table[f"enc.enc.{i}.0"] = f"enc.body.{2 * i}"
        table[f"dec.dec.{i}.0"] = f"dec.body.{2 * i}"
    return table


# paper --model -> (our registry name, [(paper prefix, our prefix, net table)], sub-VAE priors)
MODELS = {
    "mnist_svhn": ("mnist_svhn", [("vaes.0.", "vaes.0.", "mnist"), ("vaes.1.", "vaes.1.", SVHN_NET)],
                   "unused"),
    "cubIS": ("cubIS", [("vaes.0.", "vaes.0.", CUB_IMAGE_NET),
                        ("vaes.1.", "vaes.1.", CUB_SENTENCE_NET)], "shared"),
    "cubISft": ("cubISft", [("vaes.0.", "vaes.0.", CUB_FEATURE_NET),
                            ("vaes.1.", "vaes.1.", CUB_SENTENCE_NET)], "shared"),
    "mnist": ("mnist", [("", "", "mnist")], None),
    "svhn": ("svhn", [("", "", SVHN_NET)], None),
    "cubI": ("cub_image", [("", "", CUB_IMAGE_NET)], None),
    "cubIft": ("cub_image_ft", [("", "", CUB_FEATURE_NET)], None),
    "cubS": ("cub_sentence", [("", "", CUB_SENTENCE_NET)], None),
}
"""The paper's models we import; "mnist" stands for mnist_net(num_hidden_layers)."""

TENSOR_NAMES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
OPTIONAL = ("num_batches_tracked",)
"""BatchNorm's step counter: absent from state dicts saved before torch 0.4.1; kept at 0 then."""


def module_table(paper_model: str, num_hidden_layers: int = 1) -> dict[str, str]:
    """Paper module -> our module for the whole model, priors included."""
    _, nets, sub_priors = MODELS[paper_model]
    table = dict(PRIOR)
    for paper_prefix, our_prefix, net in nets:
        net = mnist_net(num_hidden_layers) if net == "mnist" else net
        table.update({paper_prefix + k: our_prefix + v for k, v in net.items()})
    return table


def tensor_table(paper_model: str, our_keys, num_hidden_layers: int = 1) -> dict[str, str]:
    """Our state-dict key -> paper key for every tensor the table covers (our sub-VAE prior
    keys are derived from the MMVAE's and are not in it)."""
    inverse = {ours: paper for paper, ours in module_table(paper_model, num_hidden_layers).items()}
    out = {}
    for key in our_keys:
        module, _, leaf = key.rpartition(".")
        if key in inverse:  # a tensor-level entry (the priors)
            out[key] = inverse[key]
        elif module in inverse and leaf in TENSOR_NAMES:
            out[key] = f"{inverse[module]}.{leaf}"
    return out
