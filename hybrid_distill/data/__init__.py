"""Training data: sources (``sources``), decoding and the crop (``decode``), the cached folder index
(``folder_index``) and the sharded, resumable loaders (``loader``). ``build_loader`` is the entry point."""

from hybrid_distill.data.loader import build_loader

__all__ = ["build_loader"]
