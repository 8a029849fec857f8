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


class StageLayers:
    """A stage's `layers` settings bound to its model: which parameters the optimizer holds (all
    but the frozen ones, so gradual unfreezing can hand more of them gradients later), which
    receive gradients in a given epoch, and each one's LR multiple."""

    def __init__(self, model: nn.Module, freeze: list[str], unfreeze: str, lr_factor: float, where: str,
                 only: set[str] | None = None) -> None:
        """`only`: the parameters the stage may train at all (an adapter's; None: every one)."""
        self.model = model
        self.groups = layer_groups(model)
        frozen = matching(model, freeze, f"{where}.layers.freeze") if freeze else set()
        self.held = {name for group in self.groups for name in group} - frozen
        if only is not None:
            self.held &= only
        if not self.held:
            raise UserError(f"{where}.layers.freeze", "freezes every parameter: nothing would train")
        self.gradual = unfreeze == "gradual"
        self.scales = discriminative_scales(self.groups, lr_factor) if lr_factor != 1.0 else None

    def hold(self) -> None:
        """Before the optimizer is built: every parameter it is to hold requires grad."""
        set_trainable(self.model, self.held)

    def trainable(self, epoch: int) -> set[str]:
        if not self.gradual:
            return self.held
        top = self.groups[len(self.groups) - unfrozen_count(len(self.groups), epoch):]
        return self.held & {name for group in top for name in group}

    def apply(self, epoch: int) -> None:
        set_trainable(self.model, self.trainable(epoch))
