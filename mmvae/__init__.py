"""mmvae: multimodal mixture-of-experts VAEs at scale."""
from mmvae.registry import MODELS, build_model, load_model, save_model

__all__ = ["MODELS", "build_model", "load_model", "save_model"]
__version__ = "0.1.0"
