"""mmvae: multimodal mixture-of-experts VAEs at scale.

The model functions below are resolved on first use (PEP 562), so importing a light submodule
(`import mmvae.config`, `mmvae.data`, `mmvae.eval.text`) does not load torch and every net.
"""
__all__ = ["MODELS", "build_model", "load_model", "save_model"]
__version__ = "0.1.0"


def __getattr__(name):
    if name in __all__:
        from mmvae import registry  # torch and every model: only when asked for
        return getattr(registry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
