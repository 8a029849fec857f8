"""Sharded weights (`distributed: {strategy: fsdp}`): FSDP2's `fully_shard` on each block of the
model (the modules of its top-level ModuleLists: a transformer's layers), then on the whole model,
so that each rank holds 1/N of every weight, gradient and optimizer moment and gathers a block's
weights only while it computes with it.

Checkpoints and exports keep the one-process format: the weights and the optimizer's state are
gathered in full (every rank takes part, rank 0 keeps them, on the CPU) and written as a plain
model's are; loading a full state gives each rank its own shard of it (every rank reads the
checkpoint, as under ddp). So a stage trained with fsdp resumes or is reused with ddp, fsdp or one
process, and the other way round.

What does not work on sharded weights yet is refused before a run starts (`check_sharded`, one
line naming the key)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from stagewise.config.optimizer_config import SCHEDULE_FREE
from stagewise.errors import UserError

if TYPE_CHECKING:
    from stagewise.engine.distributed import World
    from stagewise.engine.prepare_run import Prepared

# A sharded model's twin with its weights on the meta device: what a gathered full state is
# loaded into (on rank 0) to be written as a plain model is.
_TWINS: WeakKeyDictionary[nn.Module, nn.Module] = WeakKeyDictionary()


def shard_model(model: nn.Module, dtype: torch.dtype | None) -> None:
    """Shard `model` in place over the process group; `dtype` (bf16): the weights are gathered
    and computed in it, the gradients reduced in fp32, the sharded master weights stay fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    meta = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad) for p in model.parameters()}
    _TWINS[model] = copy.deepcopy(model, memo=meta)  # no copy of the weights; tied ones stay tied
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype is not None \
        else MixedPrecisionPolicy()
    for block in _blocks(model):
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    model.register_load_state_dict_pre_hook(_to_shards)


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The members of the outermost ModuleLists (a block's own lists are inside its shard)."""
    blocks: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and not any(name.startswith(f"{b}.") for b, _ in blocks):
            blocks += [(f"{name}.{i}", block) for i, block in enumerate(module)]
    return [block for _, block in blocks]


def _to_shards(module: nn.Module, state: dict[str, Any], prefix: str, *_: Any) -> None:
    """Before `load_state_dict`: each full tensor of a sharded weight becomes this rank's shard of
    it (sliced locally: every rank holds the same full state)."""
    params = dict(module.named_parameters(prefix=prefix.rstrip("."), remove_duplicate=False))
    for name, value in state.items():
        param = params.get(name)
        if isinstance(param, DTensor) and not isinstance(value, DTensor):
            state[name] = distribute_tensor(value.to(param.device, param.dtype), param.device_mesh,
                                            param.placements, src_data_rank=None)


def is_sharded(model: nn.Module) -> bool:
    return model in _TWINS


@contextmanager
def full_model(world: World, model: nn.Module) -> Iterator[nn.Module | None]:
    """On rank 0, the model to write (a checkpoint, an export): `model` itself, or when sharded a
    plain CPU twin holding its gathered weights (every rank takes part in the gathering). None on
    the other ranks."""
    twin = _TWINS.get(model)
    if twin is None:
        yield model if world.is_main else None
        return
    full: dict[int, torch.Tensor] = {}  # by the weight gathered: tied names share one tensor
    state = {name: full.setdefault(id(v), _full(v)) if isinstance(v, DTensor) else v
             for name, v in model.state_dict(keep_vars=True).items()}
    if not world.is_main:
        yield None
        return
    twin.load_state_dict({k: v.detach() for k, v in state.items()}, assign=True)
    try:
        yield twin
    finally:
        twin.to("meta")  # its full weights are not kept between writes


def _full(value: DTensor) -> torch.Tensor:
    """The gathered tensor in a storage of its own on the CPU (a gathered shard padded to split
    evenly is a view into a longer one, which safetensors will not write)."""
    gathered = value.full_tensor().detach()
    return torch.empty_like(gathered, device="cpu").copy_(gathered)


def full_optimizer_state(state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer's state_dict with every sharded tensor gathered in full (every rank takes part):
    a one-process optimizer's state. Unchanged when nothing is sharded."""
    if not any(isinstance(v, DTensor) for s in state["state"].values() for v in s.values()):
        return state
    return {**state, "state": {i: {k: _full(v) if isinstance(v, DTensor) else v for k, v in s.items()}
                               for i, s in state["state"].items()}}


def sharded_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """A full (one-process) optimizer state for `optimizer` over sharded weights: each tensor of a
    weight's shape becomes this rank's shard of it. Unchanged when nothing is sharded."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not any(isinstance(p, DTensor) for p in params):
        return state

    def local(i: int, value: Any) -> Any:
        p = params[i]
        if isinstance(p, DTensor) and isinstance(value, torch.Tensor) and value.shape == p.shape:
            return distribute_tensor(value.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
        return value

    return {**state, "state": {i: {k: local(i, v) for k, v in s.items()} for i, s in state["state"].items()}}


def plain(value: torch.Tensor) -> torch.Tensor:
    """A norm or check computed over sharded tensors, as one tensor on every rank."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def check_sharded(prepared: Prepared) -> None:
    """What fsdp does not do yet, refused before anything runs: UserError naming the key."""
    if prepared.plan.distributed.strategy != "fsdp":
        return
    for stage in prepared.stages:
        cfg, numbers, where = stage.resolved.config, stage.resolved, f"{prepared.plan_path}: {stage.resolved.node.where}"
        refused = [
            ("optimizer.handoff", numbers.handoff != "reset", f"{numbers.handoff} is"),
            ("optimizer.lr", numbers.auto_lr, "lr auto (the SWATS estimate) is"),
            ("optimizer.name", numbers.optimizer == "muon" or numbers.optimizer in SCHEDULE_FREE,
             f"{numbers.optimizer} is"),
            ("average", cfg.average is not None, "weight averaging is"),
            ("merge", bool(numbers.merged), "a merge stage is"),
            ("adapter", stage.setup.adapter is not None, "an adapter stage is"),
            ("task", stage.model is not prepared.root, "a stage with a model of its own (a new head) is"),
            ("from", stage.resolved.node.from_init, "from: init is"),
            *((f"rules[{j}].do.switch", rule.do.switch is not None, "a rule's optimizer switch is")
              for j, rule in enumerate(cfg.rules)),
        ]
        for key, bad, what in refused:
            if bad:
                raise UserError(f"{where}.{key}", f"{what} not supported with distributed.strategy fsdp yet")
