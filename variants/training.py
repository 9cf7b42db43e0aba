"""The reference training loop: the one place that calls every hook, for every variant.

    for each step t:
        loss = task loss + Σ parts' extra_loss(t)            (AdaLoRA's orthogonality term, ...)
        stop if loss is not finite
        backward; clip the gradient norm; stop if it is not finite
        before_optimizer_step(t, optimizer)                  (Delta-LoRA snapshots B, A)
        optimizer.step()                                     (LoRA+ groups, LoRA-FA projection, ...)
        after_optimizer_step(t, optimizer)                   (Delta-LoRA moves W, AdaLoRA allocates,
                                                              SoRA's gate step at the scheduled lr)
        scheduler.step(); zero_grad()
    finalize()

The loop never looks at the variant's name; the pipeline and the tests share it.

Under a process group (`strategy="ddp"` or `"fsdp"`, variants/distributed.py) the same loop
runs on every rank: each takes its rows of the global batch, the loss is weighted so that
the averaged gradient is the single-process gradient of the global batch, and the loss and
gradient norm it checks and reports are the global ones — so a NaN stops every rank at the
same step. The hooks run on every rank on whole, identical tensors.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch

from . import distributed
from .checkpoint import Checkpointer, rng_state, set_rng_state
from .model import AdaptedModel

SCHEDULES = ("constant", "linear", "cosine")


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss or gradient norm; the message names variant and step."""


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    lr: float
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float | None = None  # None: the optimizer part's reference value (AdamW 1e-8, LoRA-FA 1e-6)
    warmup_steps: int = 0
    schedule: str = "constant"
    grad_clip: float | None = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps <= 0:
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be a non-negative integer, got {self.warmup_steps!r}")
        if self.eps is not None and (isinstance(self.eps, bool) or not isinstance(self.eps, (int, float))
                                     or not self.eps > 0):
            raise ValueError(f"eps must be a positive number or null, got {self.eps!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.grad_clip is not None and not (isinstance(self.grad_clip, (int, float)) and self.grad_clip > 0):
            raise ValueError(f"grad_clip must be a positive number or null, got {self.grad_clip!r}")


@dataclass(frozen=True)
class StepRecord:
    step: int
    loss: float
    lr: float
    grad_norm: float
    tokens: int
    seconds: float


def lr_factor(settings: TrainSettings) -> Callable[[int], float]:
    """Multiplier of the base learning rate at each step: linear warmup, then the schedule."""
    warmup, total = settings.warmup_steps, settings.steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if settings.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if settings.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def count_tokens(batch: Mapping[str, torch.Tensor]) -> int:
    """Tokens the model processed in this batch (attended positions; padding excluded)."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())


def model_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The model's own loss (`labels` in the batch)."""
    return model(**batch).loss


def train(adapted: AdaptedModel, batches: Iterable[Mapping[str, torch.Tensor]], settings: TrainSettings,
          on_step: Callable[[StepRecord], None] | None = None,
          loss_fn: Callable[[torch.nn.Module, Mapping[str, torch.Tensor]], torch.Tensor] = model_loss,
          checkpoint: Checkpointer | None = None,
          strategy: str = "none",
          ) -> list[StepRecord]:
    """Train `adapted` for `settings.steps` optimizer steps on `batches` (cycled if shorter).

    `loss_fn(model, batch)` gives the task loss (default: the model's own), a mean over the
    batch's loss tokens (`distributed.loss_tokens`); `on_step` sees each step's record as soon
    as the step is done (progress, curves). With a `checkpoint`, the state is saved every
    `checkpoint.every` steps, and a run that finds a matching checkpoint resumes from it
    (skipping the batches already consumed) to the same result.

    `strategy` "ddp" or "fsdp" trains data-parallel in the initialised default process group
    (a ValueError without one): call it on every rank with the same global batches; `on_step`
    runs on every rank; only rank 0 writes checkpoints. On return the model is unwrapped and
    every rank holds the whole trained adapter (and base).
    """
    if adapted.needs_calibration:
        init = adapted.part("init")
        raise ValueError(f"init={init.name} needs {adapted.calibration_batches()} calibration batches: "
                         "call adapted.calibrate(batches) first")
    world = distributed.require_process_group(strategy)
    parallel = strategy != "none"
    if not parallel:
        world = distributed.World(0, 1, 0)  # a process group the caller uses otherwise is not ours
    model = adapted.model
    optimizer = adapted.optimizer(settings.lr, settings.weight_decay, settings.betas, settings.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(settings))
    params = adapted.trainable_parameters()
    records: list[StepRecord] = []
    start = 0
    if checkpoint is not None:
        state = checkpoint.load()
        if state is not None:  # restored before wrapping: every tensor is still whole
            start = _restore(adapted, optimizer, scheduler, state, world)
            records = [StepRecord(**r) for r in state["records"]]
    wrapped = distributed.Wrapped(adapted, strategy)
    if parallel:
        adapted.distributed_stats = {"strategy": strategy, "world_size": world.world_size,
                                     "base_bytes_per_rank": distributed.base_bytes_per_rank(adapted)}
    wrapped.module.train()
    stream = _cycle(batches)
    for _ in range(start):
        next(stream)  # the batches the checkpointed steps consumed
    for step in range(start, settings.steps):
        started = time.perf_counter()
        batch = next(stream)
        if parallel:
            loss, norm = _parallel_backward(adapted, wrapped, loss_fn, batch, step, world, params, settings)
        else:
            loss = loss_fn(model, batch)
            extra = adapted.extra_loss(step)
            total = loss if extra is None else loss + extra
            if not torch.isfinite(total):
                raise NonFiniteLossError(f"{adapted.spec.label}: loss is {total.item()} at step {step}")
            total.backward()
            norm = _clip(params, settings.grad_clip)
            loss = float(loss.detach())
        if not math.isfinite(norm):
            raise NonFiniteLossError(f"{adapted.spec.label}: gradient norm is {norm} at step {step}{_where(world)}")
        adapted.before_optimizer_step(step, optimizer)
        optimizer.step()
        # before the scheduler moves on: the hooks see the learning rate this step used
        adapted.after_optimizer_step(step, optimizer)
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        record = StepRecord(step, loss, lr, norm, count_tokens(batch), time.perf_counter() - started)
        records.append(record)
        if on_step is not None:
            on_step(record)
        if checkpoint is not None and (step + 1) % checkpoint.every == 0 and step + 1 < settings.steps:
            state = _capture(adapted, optimizer, scheduler, step + 1, records, world)  # a collective
            if world.rank == 0:
                checkpoint.save(state)
    wrapped.unwrap()
    adapted.finalize()
    return records


def _where(world: distributed.World) -> str:
    return "" if world.world_size == 1 else f" (global value over {world.world_size} ranks)"


def _parallel_backward(adapted: AdaptedModel, wrapped: distributed.Wrapped, loss_fn, batch, step: int,
                       world: distributed.World, params: list[torch.Tensor],
                       settings: TrainSettings) -> tuple[float, float]:
    """This rank's share of forward and backward; returns the global loss and gradient norm."""
    local, weight = distributed.rank_share(batch, world)
    local_loss = loss_fn(wrapped.module, local)
    extra = adapted.extra_loss(step)
    # the global-batch mean: Σ_k (n_k/N)·L_k, the same number on every rank
    global_loss = distributed.all_reduce_sum(local_loss.detach().reshape(1) * (weight / world.world_size))
    loss = float(global_loss)
    total = loss if extra is None else loss + float(extra.detach())
    if not math.isfinite(total):
        # every rank is here together (the value is global): name the ranks whose own loss was not finite
        bad = [rank for rank, ok in enumerate(distributed.all_gather_object(bool(torch.isfinite(local_loss))))
               if not ok]
        raise NonFiniteLossError(f"{adapted.spec.label}: loss is {total} at step {step} (not finite on "
                                 f"rank {', '.join(map(str, bad)) or 'none: the extra loss'} of {world.world_size})")
    scaled = local_loss * weight
    (scaled if extra is None else scaled + extra).backward()
    wrapped.sync_gradients(params)
    return loss, _clip(params, settings.grad_clip)  # the gradients are whole and equal: the global norm


def _capture(adapted: AdaptedModel, optimizer, scheduler, step: int, records: list[StepRecord],
             world: distributed.World | None = None) -> dict:
    """The training state with whole tensors (a collective under a process group: call it on every rank)."""
    state = {
        "step": step,
        "adapter": {f"{name}.{key}": distributed.full(t) for name, layer in adapted.layers.items()
                    for key, t in layer.adapter_state().items()},
        "optimizer": distributed.full_state(optimizer.state_dict()),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "parts": distributed.full_state(adapted.hooks_state_dict()),
        "records": [dict(vars(r)) for r in records],
    }
    if world is not None and world.world_size > 1:
        # every rank's generators, so each continues its own stream (dropout) on resume
        state["world_size"] = world.world_size
        state["rng_ranks"] = distributed.all_gather_object(rng_state())
    return state


@torch.no_grad()
def _restore(adapted: AdaptedModel, optimizer, scheduler, state: dict, world: distributed.World | None = None) -> int:
    world = world or distributed.World(0, 1, 0)
    saved_world = int(state.get("world_size", 1))
    if saved_world != world.world_size:
        raise ValueError(f"the checkpoint at step {state['step']} was written by a run of {saved_world} "
                         f"process(es); this run has {world.world_size}: resume with the same world size, "
                         "or remove the checkpoint to start over")
    tensors = state["adapter"]
    for name, layer in adapted.layers.items():
        for key, target in layer.adapter_state().items():
            saved = tensors[f"{name}.{key}"]
            if tuple(saved.shape) != tuple(target.shape):
                raise ValueError(f"checkpoint tensor {name}.{key} has shape {tuple(saved.shape)}, "
                                 f"expected {tuple(target.shape)}")
            target.copy_(saved)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    adapted.load_hooks_state_dict(state["parts"])
    set_rng_state(state["rng_ranks"][world.rank] if "rng_ranks" in state else state["rng"])
    return int(state["step"])


def _clip(params: list[torch.Tensor], max_norm: float | None) -> float:
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return 0.0
    if max_norm is None:
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in with_grad])))
    return float(torch.nn.utils.clip_grad_norm_(with_grad, max_norm, foreach=True))


def _cycle(batches: Iterable[Mapping[str, torch.Tensor]]) -> Iterator[Mapping[str, torch.Tensor]]:
    """Repeat a re-iterable collection of batches; an iterator is consumed once."""
    while True:
        produced = False
        for batch in batches:
            produced = True
            yield batch
        if not produced:
            raise ValueError("the training batches ran out (pass a list, or an iterator long enough for every step)")
