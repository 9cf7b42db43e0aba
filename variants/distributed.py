"""Data-parallel training in whatever process group the launcher made: DDP and FSDP2.

`variants.train(..., strategy=...)` uses this module and nothing else for collectives; the
parts never ask which strategy runs. The launcher (torchrun, the pipeline's train stage)
initialises the default process group; this module only finds it (`world()`).

What each strategy holds on a rank (docs/distributed.md):

    none   one process, everything local (today's loop, unchanged)
    ddp    DistributedDataParallel over the adapted model: every rank holds the whole model;
           the gradients of the trainable adapter tensors are averaged after backward
    fsdp   FSDP2 (`torch.distributed.fsdp.fully_shard`) on every decoder layer, then the root:
           each rank holds 1/N of every frozen base *parameter* (dim-0 shards); buffers (the
           4-bit codes of QLoRA/LoftQ, VeRA's shared frozen pair) are never sharded. The adapter
           tensors are kept whole on every rank (`ignored_params`) and their gradients
           all-reduced here, as DDP does — they are ~0.1-1 % of the weights, and every part's
           hook then sees whole tensors and whole gradients with no collective of its own.

The data split: `batches` yields the GLOBAL batch, identical on every rank; rank k takes its
rows (`torch.tensor_split`, so the first ranks take one row more when the rows do not divide)
and weights its mean loss by  W · n_k / N  (n_k its loss tokens, N the global count, W the
world size). After the gradient average,

    (1/W) Σ_k ∇(W · n_k/N · L_k + R) = Σ_k n_k/N ∇L_k + ∇R  = ∇(global-batch mean loss) + ∇R,

the single-process gradient of the global batch (R: a parts' `extra_loss`, the same on every
rank). The one exception the caller controls: dropout masks depend on how rows are split.

Whole tensors a part may need from a sharded one come from `full(t)`; Delta-LoRA's write into
a sharded base weight goes through `local_rows(w)` (each rank updates the rows it holds).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from .model import AdaptedModel
    from .spec import AdapterSpec

STRATEGIES = ("none", "ddp", "fsdp")
IGNORE_INDEX = -100  # label of a position without a target (transformers' convention)


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world() -> World:
    """This process's place in the default process group; World(0, 1, 0) without one."""
    if not initialized():
        return World(0, 1, 0)
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def check_strategy(spec: AdapterSpec, strategy: str) -> None:
    """Raise ValueError if `spec` cannot train under `strategy`.

    Every method of the project works under every strategy (the adapters stay whole on each
    rank, see the module docstring), so this only validates the strategy's name; a method
    that cannot be served would be refused here, with the reason, before anything launches.
    """
    if strategy not in STRATEGIES:
        label = getattr(spec, "label", spec)
        raise ValueError(f"{label}: unknown distributed strategy {strategy!r} (known: {', '.join(STRATEGIES)})")


def require_process_group(strategy: str) -> World:
    """The world for `strategy`; a ValueError when a distributed strategy has no process group."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown distributed strategy {strategy!r} (known: {', '.join(STRATEGIES)})")
    if strategy != "none" and not initialized():
        raise ValueError(f"strategy={strategy!r} needs an initialised default process group "
                         "(torch.distributed.init_process_group, e.g. under torchrun)")
    return world()


# ----- the collective helper: whole tensors and sums ---------------------------------------------------
def is_sharded(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor gathered from every rank (a collective), anything else as it is."""
    if is_sharded(t):
        return t.full_tensor()
    return t


def full_state(obj: Any) -> Any:
    """`obj` (nested dicts/lists/tuples) with every sharded tensor replaced by its whole tensor.

    A collective when `obj` holds DTensors: every rank must call it on the same structure.
    """
    if isinstance(obj, torch.Tensor):
        return full(obj).detach() if is_sharded(obj) else obj
    if isinstance(obj, dict):
        return {k: full_state(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [full_state(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(full_state(v) for v in obj)
    return obj


def local_rows(t: torch.Tensor) -> tuple[torch.Tensor, slice]:
    """(the tensor this rank holds, the slice of dim 0 it covers). Unsharded: (t, all rows).

    The local tensor is a view of the storage FSDP all-gathers from, so an in-place update of
    it is what every rank sees at the next forward.
    """
    if not is_sharded(t):
        return t, slice(0, t.shape[0])
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if any(not isinstance(p, Shard) or p.dim != 0 for p in t.placements):
        raise ValueError(f"expected a tensor sharded on dim 0, got placements {t.placements}")
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return t.to_local(), slice(offset[0], offset[0] + shape[0])


def sharded_like(local: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`local` (this rank's rows of a tensor shaped like `ref`) as a tensor sharded as `ref` is;
    `local` itself when `ref` is not sharded. Keeps per-rank state gatherable by `full_state`."""
    if not is_sharded(ref):
        return local
    from torch.distributed.tensor import DTensor

    shape = (ref.shape[0], *local.shape[1:])
    return DTensor.from_local(local, ref.device_mesh, ref.placements, shape=torch.Size(shape),
                              stride=torch.empty(shape, device="meta").stride())


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over all ranks, in place (returns it); a no-op in one process."""
    if initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def average_gradients(params: list[torch.Tensor]) -> None:
    """Average the gradients of `params` over all ranks, in one flat all-reduce (gloo has no AVG)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or not initialized() or dist.get_world_size() == 1:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat.div_(dist.get_world_size())
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


def all_gather_object(obj: Any) -> list[Any]:
    """[rank 0's obj, rank 1's obj, ...] on every rank ([obj] in one process)."""
    if not initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if initialized():
        dist.barrier()


# ----- the data split ---------------------------------------------------------------------------------
def loss_tokens(batch: Mapping[str, torch.Tensor]) -> int:
    """Positions that carry a next-token target: labels[:, 1:] != -100 (a causal LM's shifted
    labels, as transformers' loss and the pipeline's response loss count them); the attended
    positions when the batch has no labels."""
    labels = batch.get("labels")
    if labels is not None:
        return int((labels[..., 1:] != IGNORE_INDEX).sum())
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())


def batch_rows(batch: Mapping[str, torch.Tensor]) -> int:
    rows = {int(v.shape[0]) for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0}
    if len(rows) != 1:
        raise ValueError(f"every tensor of a batch must have the same number of rows, got {sorted(rows)}")
    return rows.pop()


def rank_share(batch: Mapping[str, torch.Tensor], w: World) -> tuple[dict[str, torch.Tensor], float]:
    """(this rank's rows of the global batch, the weight W·n_k/N of its mean loss)."""
    rows = batch_rows(batch)
    if rows < w.world_size:
        raise ValueError(f"a global batch of {rows} rows cannot be split over {w.world_size} ranks "
                         "(every rank needs at least one row); raise the batch size or use fewer processes")
    shares = [{k: (torch.tensor_split(v, w.world_size)[rank] if isinstance(v, torch.Tensor) and v.dim() > 0 else v)
               for k, v in batch.items()} for rank in range(w.world_size)]
    counts = [loss_tokens(share) for share in shares]
    # decided from the global batch, so every rank raises the same error at the same step
    # (a mean over no tokens is NaN, and a rank that stopped alone would leave the others waiting)
    empty = [rank for rank, n in enumerate(counts) if n == 0]
    if empty:
        raise ValueError(f"rank {', '.join(map(str, empty))}'s rows of the global batch have no loss tokens "
                         f"(tokens per rank: {counts}); shuffle the data or raise the batch size")
    return shares[w.rank], w.world_size * counts[w.rank] / sum(counts)


# ----- wrap and unwrap ----------------------------------------------------------------------------------
def _adapter_params(adapted: AdaptedModel) -> set[nn.Parameter]:
    """Every adapter tensor that is a parameter (trainable or frozen, e.g. LoRA-FA's A)."""
    ids = adapted.adapter_tensors_ids()
    return {p for p in adapted.model.parameters() if id(p) in ids or p.requires_grad}


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP2 shards one by one: the classes a transformers model names as
    never to be split (`_no_split_modules`, its decoder layers), else the longest nn.ModuleList."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of layers to shard")
    return list(max(lists, key=len))


_MESHES: dict = {}


def _mesh(device: str, size: int):
    """One 1-D device mesh over the default group per device type (each new mesh is a new group)."""
    from torch.distributed.device_mesh import init_device_mesh

    key = (device, size, id(dist.group.WORLD))
    if key not in _MESHES:
        _MESHES.clear()
        _MESHES[key] = init_device_mesh(device, (size,))
    return _MESHES[key]


class Wrapped:
    """The model as one strategy runs it: `module` is what the loss function calls."""

    def __init__(self, adapted: AdaptedModel, strategy: str):
        self.adapted = adapted
        self.strategy = strategy
        self.world = require_process_group(strategy)
        self.module: nn.Module = adapted.model
        self._ddp = None
        self._fsdp_modules: list[nn.Module] = []
        self._weight_buffers: list[tuple[nn.Module, str]] = []
        model = adapted.model
        if strategy == "none":
            return
        if any(is_sharded(t) for t in list(model.parameters()) + list(model.buffers())):
            raise ValueError("the model is already sharded (wrapped twice?)")
        if strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            # Buffers (4-bit codes, VeRA's pair) are the same on every rank and never change:
            # they are broadcast once at construction, not before every forward.
            self._ddp = self.module = DistributedDataParallel(model, broadcast_buffers=False)
        else:
            from torch.distributed.fsdp import fully_shard

            self._broadcast_from_rank0(model)  # what DDP does at construction
            mesh = _mesh("cuda" if next(model.parameters()).is_cuda else "cpu", self.world.world_size)
            ignored = _adapter_params(adapted)
            self._weight_buffers = _weight_buffers_as_parameters(model)
            for block in decoder_layers(model):
                fully_shard(block, mesh=mesh, ignored_params=ignored)
                self._fsdp_modules.append(block)
            fully_shard(model, mesh=mesh, ignored_params=ignored)
            self._fsdp_modules.append(model)

    @staticmethod
    @torch.no_grad()
    def _broadcast_from_rank0(model: nn.Module) -> None:
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)

    def sync_gradients(self, params: list[torch.Tensor]) -> None:
        """Average the adapter gradients over ranks where the wrapper does not (FSDP2's ignored params)."""
        if self.strategy == "fsdp":
            average_gradients(params)

    @torch.no_grad()
    def unwrap(self) -> None:
        """Take the wrappers off: whole parameters again, no hooks, the model's own classes."""
        if self._ddp is not None:
            self._ddp = None  # the reducer, and its gradient hooks, go with the wrapper
            self.module = self.adapted.model
        if self._fsdp_modules:
            _unshard_fsdp(self._fsdp_modules)
            self._fsdp_modules = []
            self.module = self.adapted.model
            for module, name in self._weight_buffers:
                param = module._parameters.pop(name)
                module.register_buffer(name, param.detach())


def _weight_buffers_as_parameters(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """Turn the buffers that hold frozen weights (`weight_buffers`: the 4-bit codes) into frozen
    parameters, so that FSDP2 shards them like any base weight; (module, name) of each."""
    moved = []
    for module in model.modules():
        for name in getattr(module, "weight_buffers", ()):
            tensor = module._buffers.pop(name)
            module.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
            moved.append((module, name))
    return moved


def _unshard_fsdp(fsdp_modules: list[nn.Module]) -> None:
    """Undo fully_shard on `fsdp_modules` in place (a collective): gather every sharded parameter
    into a plain nn.Parameter, remove FSDP2's hooks and state, and restore each module's class."""
    from torch.distributed._composable.contract import REGISTRY_KEY, STATE_KEY
    from torch.distributed._composable_state import _module_state_mapping

    for module in fsdp_modules:
        module.reshard()  # the root keeps its parameters unsharded after forward
    for module in fsdp_modules:
        state = module._get_fsdp_state()
        group = state._fsdp_param_group
        if group is not None:
            for fsdp_param in group.fsdp_params:
                fsdp_param._post_load_hook_handle.remove()
                owner, name = fsdp_param._module_info.module, fsdp_param._module_info.param_name
                sharded = getattr(owner, name)
                setattr(owner, name, nn.Parameter(sharded.full_tensor(), requires_grad=sharded.requires_grad))
                for shared_owner, shared_name in zip(fsdp_param._module_info.shared_modules,
                                                     fsdp_param._module_info.shared_param_names, strict=True):
                    setattr(shared_owner, shared_name, getattr(owner, name))
            for handles in (group._module_to_pre_save_state_dict_hook_handle,
                            group._module_to_pre_load_state_dict_hook_handle):
                for handle in handles.values():
                    handle.remove()
                handles.clear()
        state._pre_forward_hook_handle.remove()
        state._post_forward_hook_handle.remove()
        for key in (STATE_KEY, REGISTRY_KEY):
            module.__dict__.pop(key, None)
        _module_state_mapping.pop(module, None)
        module.__class__ = module.__class__.__bases__[1]  # fully_shard made the class (FSDPModule, original)
    for module in fsdp_modules:
        for sub in module.modules():
            for attr in ("_is_fsdp_managed_module", "_fsdp_use_orig_params"):
                sub.__dict__.pop(attr, None)


def base_bytes_per_rank(adapted: AdaptedModel) -> int:
    """Bytes of base weights this rank holds: its shards of sharded parameters (the 4-bit codes
    included), every buffer and each 4-bit layer's quantization state (absmax, code tables)
    whole; adapter tensors excluded. After a distributed `train` has unwrapped the model,
    the figure measured while it ran (`adapted.distributed_stats`)."""
    model = adapted.model
    tensors = list(model.parameters()) + list(model.buffers())
    if not any(is_sharded(t) for t in tensors):
        stats = getattr(adapted, "distributed_stats", None)
        if stats is not None:
            return int(stats["base_bytes_per_rank"])
    adapter = adapted.adapter_tensors_ids()
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        storage = getattr(module, "storage_bytes", None)
        if callable(storage):
            total += storage()  # counts its sharded codes whole: take back what other ranks hold
            inside = list(module.parameters()) + list(module.buffers())
            total -= sum((t.numel() - t.to_local().numel()) * t.element_size() for t in inside if is_sharded(t))
            seen |= {id(t) for t in inside}
    for t in tensors:
        if id(t) in adapter or id(t) in seen:
            continue
        seen.add(id(t))
        local = t.to_local() if is_sharded(t) else t
        total += local.numel() * local.element_size()
    return total
