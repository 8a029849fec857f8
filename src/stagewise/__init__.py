"""stagewise: train language models with declared, resumable multi-stage optimization plans."""

__version__ = "0.1.0"
