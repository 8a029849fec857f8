"""Stage keys: a stage's identity for the stage cache.

key = hash(parent key and the step it branches at, the stage's normalized configuration and its
resolved numbers, the model config, tokenizer, data fingerprint, seed, precision). Two stages with
one key train to the same weights, so a complete checkpoint under a key is reused, never retrained.
`eval` is left out: evaluating more or less often changes no weight.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

KEY_VERSION = 1  # bump when a change to the engine changes what a stage trains to


def stage_key(parent: str | None, parent_step: int | None, stage: dict[str, Any], identity: dict[str, Any]) -> str:
    payload = {"version": KEY_VERSION, "parent": parent, "parent_step": parent_step, "stage": stage,
               "identity": identity}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]
