"""Optimizers by plan name, with the parameter groups every stage relies on.

Every group carries `"group"` (its name) and `"lr_scale"` (1.0): the engine sets
`group["lr"] = schedule_lr * group["lr_scale"]` before each update, so the LR passed here is only
the starting value. Weights (`regularizers.is_decayed`) go in "decay", everything else in
"no_decay" with weight_decay 0; with muon the hidden-layer matrices go in a "muon" group.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from typing import Any

import torch
from torch import nn

from stagewise.config.optimizer_config import OPTIMIZER_SETTINGS, SCHEDULE_FREE
from stagewise.config.registry import OPTIMIZERS
from stagewise.optim.regularizers import is_decayed
from stagewise.optim.schedule_free import build_schedule_free

# Groups whose parameters take the stage's weight_decay (and sgd_l1's shrinkage).
_DECAY_GROUPS = frozenset({"decay", "muon"})


class ProximalSGD(torch.optim.Optimizer):
    """SGD (heavy-ball momentum as torch.optim.SGD, no dampening) followed by the L1 proximal step

        p <- sign(p) * max(|p| - lr * l1, 0)

    on groups with `l1 > 0`. Soft-thresholding sets small weights to exactly 0, which the L1
    subgradient added to the loss never does (it makes them oscillate around 0).
    """

    def __init__(self, params: Iterable[Any], lr: float, momentum: float = 0.0, l1: float = 0.0) -> None:
        if lr < 0 or not 0 <= momentum < 1 or l1 < 0:
            raise ValueError(f"need lr >= 0, 0 <= momentum < 1, l1 >= 0 (got {lr}, {momentum}, {l1})")
        super().__init__(params, {"lr": lr, "momentum": momentum, "l1": l1})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = _closure_loss(closure)
        for group in self.param_groups:
            lr, momentum, l1 = group["lr"], group["momentum"], group["l1"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                direction = p.grad
                if momentum:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = direction.clone()
                    else:
                        state["momentum_buffer"].mul_(momentum).add_(direction)
                    direction = state["momentum_buffer"]
                p.add_(direction, alpha=-lr)
                if l1:
                    p.copy_(p.sign() * (p.abs() - lr * l1).clamp_(min=0))
        return loss


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon on hidden-layer matrices, AdamW on the rest, as one real torch Optimizer.

    The two inner optimizers do the arithmetic; this object owns their parameter-group dicts and
    one shared `state` (their parameters are disjoint), so `param_groups`, `state_dict()`,
    `load_state_dict()`, `zero_grad()` and LR schedulers all work from the base class.
    """

    def __init__(self, muon_groups: list[dict[str, Any]], adamw_groups: list[dict[str, Any]], *,
                 lr: float, momentum: float, nesterov: bool, weight_decay: float,
                 betas: tuple[float, float], eps: float) -> None:
        parts: list[torch.optim.Optimizer] = []
        if muon_groups:
            # match_rms_adamw scales Muon's update to AdamW's RMS, so one LR serves both halves.
            parts.append(torch.optim.Muon(muon_groups, lr=lr, weight_decay=weight_decay, momentum=momentum,
                                          nesterov=nesterov, adjust_lr_fn="match_rms_adamw"))
        if adamw_groups:
            parts.append(torch.optim.AdamW(adamw_groups, lr=lr, betas=betas, eps=eps,
                                           weight_decay=weight_decay))
        self._parts = parts
        self._sizes = [len(part.param_groups) for part in parts]
        super().__init__([group for part in parts for group in part.param_groups], defaults={})
        self._share()

    def _share(self) -> None:
        """Point the inner optimizers at this one's group dicts and state (again after loading)."""
        start = 0
        for part, size in zip(self._parts, self._sizes, strict=True):
            part.param_groups = self.param_groups[start:start + size]
            part.state = self.state
            start += size

    def __getstate__(self) -> dict[str, Any]:
        # The base class pickles only defaults/state/param_groups; a copy must keep its parts too.
        return {**super().__getstate__(), "_parts": self._parts, "_sizes": self._sizes}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # load_state_dict replaces param_groups and state through here (without the parts).
        super().__setstate__(state)
        self._share()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = _closure_loss(closure)
        for part in self._parts:
            part.step()
        return loss


def _closure_loss(closure: Callable[[], float] | None) -> float | None:
    """torch's optimizer protocol: re-evaluate the loss (with gradients) when given a closure."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _check_settings(name: str, settings: dict[str, Any]) -> None:
    if name not in OPTIMIZER_SETTINGS:
        raise ValueError(f"unknown optimizer '{name}' (known: {', '.join(OPTIMIZER_SETTINGS)})")
    expected, given = set(OPTIMIZER_SETTINGS[name]), set(settings)
    if given != expected:
        raise ValueError(f"settings of '{name}' must be exactly {sorted(expected)} "
                         f"(missing {sorted(expected - given)}, extra {sorted(given - expected)})")


def _group(name: str, params: list[nn.Parameter], **options: Any) -> dict[str, Any]:
    return {"params": params, "group": name, "lr_scale": 1.0, **options}


def _by_scale(groups: list[dict[str, Any]], scales: dict[int, float]) -> list[dict[str, Any]]:
    """Each group split by its parameters' LR multiples (discriminative LRs), empty ones dropped."""
    out = []
    for group in groups:
        by: dict[float, list[nn.Parameter]] = {}
        for p in group["params"]:
            by.setdefault(scales.get(id(p), 1.0), []).append(p)
        out += [{**group, "params": params, "lr_scale": scale} for scale, params in sorted(by.items(), reverse=True)]
    return out


def _split(params: Iterable[nn.Parameter]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    params = list(params)
    return [p for p in params if is_decayed(p)], [p for p in params if not is_decayed(p)]


def _muon_params(model: nn.Module, trainable: list[nn.Parameter]) -> list[nn.Parameter]:
    """Hidden-layer matrices: 2-D weights that are neither embeddings nor the output head (Muon
    orthogonalizes whole matrices, which suits neither a lookup table nor the logits layer)."""
    excluded = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    getter = getattr(model, "get_output_embeddings", None)  # transformers models name their head
    head = getter() if callable(getter) else None
    if head is not None:
        excluded |= {id(p) for p in head.parameters()}
    return [p for p in trainable if p.dim() == 2 and id(p) not in excluded]


def build_optimizer(name: str, settings: dict[str, Any], model: nn.Module, l1: float = 0.0,
                    lr_scales: dict[str, float] | None = None,
                    trainable: Collection[str] | None = None) -> torch.optim.Optimizer:
    """The optimizer `name` over `model`'s parameters named in `trainable` (None: all of them);
    `settings` is that optimizer's complete settings dict (OPTIMIZER_SETTINGS keys, all filled);
    `l1` is sgd_l1's strength; `lr_scales`: LR multiples by parameter name
    (optim.layers.discriminative_scales)."""
    named = dict(model.named_parameters())
    scales = {id(named[n]): v for n, v in (lr_scales or {}).items()}
    _check_settings(name, settings)
    if settings["lr"] is None:
        raise ValueError(f"optimizer '{name}' has no lr")
    # In the model's order; named_parameters gives tied tensors once.
    params = [p for n, p in model.named_parameters() if trainable is None or n in trainable]
    if not params:
        raise ValueError("the model has no trainable parameters")
    lr = settings["lr"]

    if name == "muon":
        muon = _muon_params(model, params)
        in_muon = {id(p) for p in muon}
        decay, no_decay = _split(p for p in params if id(p) not in in_muon)
        wd = settings["weight_decay"]
        adamw_groups = _by_scale([_group("decay", decay, weight_decay=wd),
                                  _group("no_decay", no_decay, weight_decay=0.0)], scales)
        muon_groups = _by_scale([_group("muon", muon, weight_decay=wd)], scales)
        return MuonWithAdamW(muon_groups, adamw_groups, lr=lr, momentum=settings["momentum"],
                             nesterov=settings["nesterov"], weight_decay=wd,
                             betas=tuple(settings["betas"]), eps=settings["eps"])

    decay, no_decay = _split(params)
    plugin = OPTIMIZERS[name].build
    if plugin is not None:  # a plug-in's (config.registry): the standard groups and its settings
        wd = settings.get("weight_decay", 0.0)
        return plugin(_by_scale([_group("decay", decay, weight_decay=wd),
                                 _group("no_decay", no_decay, weight_decay=0.0)], scales), dict(settings))
    if name == "sgd_l1":
        groups = _by_scale([_group("decay", decay, l1=l1), _group("no_decay", no_decay, l1=0.0)], scales)
        return ProximalSGD(groups, lr=lr, momentum=settings["momentum"], l1=l1)

    wd = settings["weight_decay"]
    groups = _by_scale([_group("decay", decay, weight_decay=wd), _group("no_decay", no_decay, weight_decay=0.0)],
                       scales)
    # The fused kernels (one pass over each tensor, CPU and CUDA) are the fastest torch has.
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    if name in ("gd", "sgd"):
        # gd differs from sgd only in batching (the engine feeds the whole set), not in the update.
        return torch.optim.SGD(groups, lr=lr, momentum=settings["momentum"], nesterov=settings["nesterov"],
                               fused=fused)
    if name in SCHEDULE_FREE:
        return build_schedule_free(name, groups, settings)
    optimizer_class = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    return optimizer_class(groups, lr=lr, betas=tuple(settings["betas"]), eps=settings["eps"], fused=fused)


_CLASSES: dict[str, type[torch.optim.Optimizer]] = {
    "gd": torch.optim.SGD, "sgd": torch.optim.SGD, "sgd_l1": ProximalSGD,
    "adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "muon": MuonWithAdamW,
}


def apply_settings(optimizer: torch.optim.Optimizer, name: str, settings: dict[str, Any], l1: float = 0.0) -> None:
    """Change the hyperparameters of a carried optimizer in place, keeping its state. lr is left
    to the engine; weight_decay and l1 reach the decay groups only (no_decay stays at 0)."""
    _check_settings(name, settings)
    if OPTIMIZERS[name].build is None and type(optimizer) is not _CLASSES[name]:
        raise ValueError(f"cannot apply '{name}' settings to a {type(optimizer).__name__}")
    for group in optimizer.param_groups:
        decayed = group["group"] in _DECAY_GROUPS
        for key, value in settings.items():
            if key == "lr" or key not in group:
                continue
            if key == "weight_decay" and not decayed:
                continue
            if key == "eps" and group["group"] == "muon":
                continue  # the plan's eps is AdamW's; Muon keeps its Newton-Schulz eps
            group[key] = tuple(value) if key == "betas" else value
        if name == "sgd_l1":
            group["l1"] = l1 if decayed else 0.0
