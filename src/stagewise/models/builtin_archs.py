"""The model architectures stagewise builds itself, added to the arch registry (config.registry)
by their modules under their plan names. A new one is one module with a settings model and a
model (class or function) decorated with `register_arch`."""

from __future__ import annotations

from stagewise.models import bigru, gpt, transformer_seq2seq

BUILTIN_ARCHS = (gpt, bigru, transformer_seq2seq)  # imported for their registrations
