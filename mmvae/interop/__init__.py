"""Interop with the paper code (iffsid/mmvae): its released models <-> our run folders."""
from mmvae.interop.paper import InteropError, export_paper_model, import_paper_model

__all__ = ["InteropError", "export_paper_model", "import_paper_model"]
