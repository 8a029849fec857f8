"""The public Python API's implementation; `stagewise/__init__.py` re-exports it (lazily)."""
