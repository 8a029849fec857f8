"""Layer groups for fine-tuning: freezing by name pattern, ULMFiT's gradual unfreezing (the top
group first, one more group each epoch) and discriminative learning rates (each group below the
top one learns `factor` times slower; Howard & Ruder use 2.6).

A model's layer groups, input side first: a transformer's parameters before its first block
(embeddings), one group per block (`h.N`, `layers.N`, `layer.N`, `block.N`), and those after
the last block (final norm, head); a model without numbered blocks (the BiGRU) has one group
per top-level module. Parameters are in registration order, which is the forward order for
every model here, so "before" and "after" the blocks are known without running the model.
"""

from __future__ import annotations

import fnmatch
import re

from torch import nn

from stagewise.errors import UserError

_BLOCK = re.compile(r"(?:^|\.)(?:h|layers|layer|block)\.(\d+)\.")


def layer_groups(model: nn.Module) -> list[list[str]]:
    """Parameter names per layer group, input side first."""
    names = [name for name, _ in model.named_parameters()]
    blocks = {name: int(m.group(1)) for name in names if (m := _BLOCK.search(name))}
    if not blocks:
        groups: dict[str, list[str]] = {}
        for name in names:
            groups.setdefault(name.split(".")[0], []).append(name)
        return list(groups.values())
    first = names.index(next(iter(blocks)))
    before = [n for n in names[:first] if n not in blocks]
    after = [n for n in names[first:] if n not in blocks]
    by_block: dict[int, list[str]] = {}
    for name, index in blocks.items():
        by_block.setdefault(index, []).append(name)
    return [g for g in [before, *(by_block[i] for i in sorted(by_block)), after] if g]


def discriminative_scales(groups: list[list[str]], factor: float) -> dict[str, float]:
    """Each parameter's LR multiple: 1 for the top group, 1/factor for the one below, and so on."""
    top = len(groups) - 1
    return {name: factor ** -(top - i) for i, group in enumerate(groups) for name in group}


def unfrozen_count(n_groups: int, epoch: int) -> int:
    """Gradual unfreezing: the top group in epoch 0, one more each epoch, all of them at last."""
    return min(n_groups, epoch + 1)


def set_trainable(model: nn.Module, trainable: set[str]) -> None:
    """Only the named parameters receive gradients; the others keep their values and get none
    (so no optimizer, weight decay included, touches them)."""
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)


def matching(model: nn.Module, patterns: list[str], where: str) -> set[str]:
    """Parameter names matching any glob pattern (`transformer.h.0.*`); a pattern that matches
    nothing is a plan error, since it is almost always a typo."""
    names = [name for name, _ in model.named_parameters()]
    found: set[str] = set()
    for i, pattern in enumerate(patterns):
        hits = fnmatch.filter(names, pattern)
        if not hits:
            raise UserError(f"{where}[{i}]", f"'{pattern}' matches no parameter of the model "
                                             f"(e.g. {', '.join(names[:3])})")
        found.update(hits)
    return found
