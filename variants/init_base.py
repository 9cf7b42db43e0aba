"""Bases of the initialisation family (docs/init-family.md): inits that rewrite the base weights,
inits that need calibration data, and the calibration scope they run in. Nothing here is
registered; PiSSA (pissa.py), OLoRA (olora.py) and the data-aware parts subclass these.

A base-rewriting init (PiSSA, Meng et al. 2024, arXiv 2404.02948; OLoRA, Büyükakyüz 2024,
arXiv 2406.01775; CorDA; LoRA-GA) starts the adapter at factors (A0, B0) taken from W0 and
keeps the model's function by writing the residual into the base:

    W_res = W0 − s·B0 A0,       y = x W_resᵀ + s·(x Aᵀ) Bᵀ  = x W0ᵀ   at step 0 (A = A0, B = B0)

The part keeps (A0, B0) per layer. They travel with a saved adapter (`@init.<layer>.initial_A/B`),
so `io.load` rebuilds W_res with the same formula (bitwise the training-time residual) and runs
no SVD and no calibration; `unload` writes W0 = W_res + s·B0 A0 back (within an ulp); a PEFT
export writes the plain LoRA of rank 2r that gives the trained function on the ORIGINAL base,
[A; A0] and [B, −B0] (s(BA − B0A0) + W0 = W_res + s·BA).

Writes follow "factors first, W last": every layer's factors and residual are computed before
the first tensor is written; the residuals are written last, and any error while writing puts
the original weight tensors back (bitwise) before it propagates.

A data-aware init (`DataInit`) leaves the model as LoRA builds it (B = 0: the base function)
and waits for `AdaptedModel.calibrate(batches)`: the first `init_batches` training batches, run
in a `calibration_scope` (adapters bypassed, the global RNG forked, train/eval modes,
requires_grad flags and gradients restored, hooks removed), then `compute_factors` gives every
layer's (A, B) and `apply_factors` writes them all at once.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .core import in_out_features
from .defaults import InitPart, _checked_factors
from .parts import Option

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


def layers_of(adapted_or_layers) -> dict:
    """The {name: AdapterLayer} of an AdaptedModel, or the mapping itself."""
    layers = getattr(adapted_or_layers, "layers", adapted_or_layers)
    if not isinstance(layers, Mapping):
        raise TypeError(f"expected an AdaptedModel or a mapping of layers, got {type(adapted_or_layers).__name__}")
    return layers


def lm_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The model's own loss on the batch's `labels` (calibration's default loss)."""
    return model(**batch).loss


def cuda_devices(model: nn.Module) -> list[int]:
    """CUDA device indices the model lives on (what torch.random.fork_rng must fork besides the CPU)."""
    return sorted({t.device.index or 0 for t in model.parameters() if t.device.type == "cuda"})


def compute_dtype(layer) -> torch.dtype:
    """fp32 for half-precision and fp32 bases (PEFT computes every init in fp32), fp64 for an fp64 base."""
    return torch.promote_types(layer.lora_A.dtype, torch.float32)


def residual_weight(layer, a0: torch.Tensor, b0: torch.Tensor) -> torch.Tensor:
    """W − s·B0 A0 as (out, in), in the compute dtype; PEFT's op order ((s·B) @ A, layer.py:464)."""
    dtype = compute_dtype(layer)
    return layer.base_weight().to(dtype) - (layer.scale * b0.to(dtype)) @ a0.to(dtype)


def original_weight(layer, a0: torch.Tensor, b0: torch.Tensor) -> torch.Tensor:
    """W_res + s·B0 A0 as (out, in): the inverse of `residual_weight` (within an ulp of W0)."""
    dtype = compute_dtype(layer)
    return layer.base_weight().to(dtype) + (layer.scale * b0.to(dtype)) @ a0.to(dtype)


# ----- calibration scope ----------------------------------------------------------------------------
class CalibrationScope:
    """What a data-aware init uses while it runs its batches: hooks that are removed afterwards,
    and the count of model forwards (reported by `calibrate`)."""

    def __init__(self, adapted):
        self.adapted = adapted
        self.forwards = 0
        self._handles: list[Any] = []

    def forward_pre_hook(self, module: nn.Module, hook: Callable, **kwargs) -> Any:
        handle = module.register_forward_pre_hook(hook, **kwargs)
        self._handles.append(handle)
        return handle

    def forward_hook(self, module: nn.Module, hook: Callable, **kwargs) -> Any:
        handle = module.register_forward_hook(hook, **kwargs)
        self._handles.append(handle)
        return handle

    def backward_hook(self, module: nn.Module, hook: Callable) -> Any:
        handle = module.register_full_backward_hook(hook)
        self._handles.append(handle)
        return handle

    def tensor_hook(self, tensor: torch.Tensor, hook: Callable) -> Any:
        handle = tensor.register_hook(hook)
        self._handles.append(handle)
        return handle

    def remove_hooks(self) -> None:
        while self._handles:
            self._handles.pop().remove()


@contextlib.contextmanager
def calibration_scope(adapted) -> Iterator[CalibrationScope]:
    """Run calibration forwards on the base function, leaving no trace on the model or the RNG.

    Inside: every adapter layer computes its base layer alone (`bypass_adapters`), the global
    RNG streams are forked (a draw inside does not move the training run's stream), and model
    forwards are counted. On exit, also after an error: every module's train/eval mode, every
    parameter's requires_grad flag and gradient are what they were, and every hook registered
    through the scope is removed.
    """
    model = adapted.model
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    scope = CalibrationScope(adapted)

    def count(*_):
        scope.forwards += 1

    try:
        with adapted.bypass_adapters(), torch.random.fork_rng(devices=cuda_devices(model)):
            scope.forward_pre_hook(model, count)
            yield scope
    finally:
        scope.remove_hooks()
        for module, mode in modes:
            module.training = mode
        for p, flag, grad in flags:
            p.requires_grad_(flag)
            p.grad = grad


# ----- base-rewriting inits -------------------------------------------------------------------------
class RewritingInit(InitPart):
    """An init that starts the adapter at (A0, B0) from W0 and writes W_res = W0 − s·B0A0 into the base.

    A data-free subclass implements `layer_factors(name, layer, index)`; `configure` computes
    them for every layer (under a forked RNG) and applies them. A data-aware subclass (also a
    DataInit) computes them in `calibrate` instead.
    """

    rewrites_base = True
    peft_rank_multiplier = 2
    requires = {"base": (frozenset({"full"}), "it rewrites W0 into the residual W0 − s·B0A0, which a 4-bit base "
                                              "cannot hold exactly")}
    layer_needs = {"init_sets_lora_pair": "it starts the adapter at a LoRA pair (A0, B0) and subtracts s·B0A0 from "
                                          "W0, which needs a layer whose step-0 update is s·BA"}

    def __init__(self, spec):
        super().__init__(spec)
        self.initial: Factors = {}  # layer -> (A0, B0), as written
        self._rewritten: set[str] = set()  # layers whose base weight holds W_res now

    # ----- checks -----------------------------------------------------------------------------------
    def ranks_needed(self, r: int) -> int:
        """Singular directions a layer of rank r needs (LoRA-GA: 2r)."""
        return r

    def check_target(self, name: str, module: nn.Module) -> None:
        in_f, out_f = in_out_features(module)
        needed = self.ranks_needed(self.spec.r)
        if needed > min(in_f, out_f):
            raise ValueError(f"init={self.name}: r={self.spec.r} needs {needed} directions, but {name} of shape "
                             f"(out={out_f}, in={in_f}) has rank at most {min(in_f, out_f)}; lower r")

    # ----- build ------------------------------------------------------------------------------------
    def layer_factors(self, name: str, layer, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A0, B0) of one layer from its base weight (data-free subclasses)."""
        raise NotImplementedError  # pragma: no cover - data-aware parts compute in calibrate

    def configure(self, adapted) -> None:
        if self.deferred or self.calibration_batches():
            return  # a saved adapter brings its factors (load_adapter_tensors); a data-aware part calibrates
        with torch.no_grad(), torch.random.fork_rng(devices=cuda_devices(adapted.model)):
            factors = {name: self.layer_factors(name, layer, i) for i, (name, layer) in enumerate(adapted.layers.items())}
        self.apply_factors(adapted, factors)

    @torch.no_grad()
    def apply_factors(self, adapted_or_layers, factors: Factors) -> None:
        """Write A = A0, B = B0, then W_res = W − s·B0A0, then refresh (DoRA's magnitude).

        Everything is computed before the first write; an error while writing puts back the
        original weight tensors and factors (bitwise) before it propagates.
        """
        layers = layers_of(adapted_or_layers)
        prepared = _checked_factors(self.name, layers, factors)
        again = sorted(set(prepared) & self._rewritten)
        if again:
            raise ValueError(f"init={self.name}: the base of {again[:3]} already holds a residual")
        residuals = {name: residual_weight(layers[name], a0, b0) for name, (a0, b0) in prepared.items()}
        for name, w in residuals.items():
            if not torch.isfinite(w).all():
                raise ValueError(f"init={self.name}: the residual of {name} is not finite")
        previous = {name: (layers[name].lora_A.detach().clone(), layers[name].lora_B.detach().clone())
                    for name in prepared}
        weights: dict[str, torch.Tensor] = {}
        try:
            for name, (a0, b0) in prepared.items():
                layers[name].lora_A.copy_(a0)
                layers[name].lora_B.copy_(b0)
            for name, w in residuals.items():  # W last
                weights[name] = layers[name].base_layer.weight.data
                layers[name].write_base_weight(w)
            for name in prepared:
                layers[name].refresh_after_init()
        except BaseException:
            for name, weight in weights.items():
                layers[name].base_layer.weight.data = weight
            for name, (a, b) in previous.items():
                layers[name].lora_A.copy_(a)
                layers[name].lora_B.copy_(b)
                layers[name].refresh_after_init()
            raise
        self.initial.update(prepared)
        self._rewritten |= set(prepared)

    @torch.no_grad()
    def restore_base(self, adapted_or_layers) -> None:
        """W0 = W_res + s·B0A0 for every rewritten layer that is not merged (a merged layer holds the
        trained function, which `unload` returns as it is)."""
        layers = layers_of(adapted_or_layers)
        for name in sorted(self._rewritten):
            layer = layers.get(name)
            if layer is None or layer.merged:
                continue
            a0, b0 = self.initial[name]
            layer.write_base_weight(original_weight(layer, a0, b0))
            self._rewritten.discard(name)

    # ----- persistence --------------------------------------------------------------------------------
    def adapter_tensors(self, adapted) -> dict[str, torch.Tensor]:
        out = {}
        for name, (a0, b0) in self.initial.items():
            out[f"{name}.initial_A"] = a0
            out[f"{name}.initial_B"] = b0
        return out

    @torch.no_grad()
    def load_adapter_tensors(self, adapted, tensors: dict[str, torch.Tensor]) -> None:
        """Rebuild W_res = W − s·B0A0 from the saved initial factors (same formula, no SVD)."""
        names = {key.rsplit(".", 1)[0] for key in tensors}
        unknown = sorted(names - set(adapted.layers))
        if unknown:
            raise ValueError(f"init={self.name}: initial factors for unknown layers {unknown[:5]}")
        if not tensors:
            if self.deferred:
                raise ValueError(f"init={self.name}: the saved adapter has no initial factors (@init.<layer>.initial_A/B), "
                                 "so the residual base cannot be rebuilt")
            return
        missing = sorted(n for n in adapted.layers if f"{n}.initial_A" not in tensors or f"{n}.initial_B" not in tensors)
        if missing:
            raise ValueError(f"init={self.name}: the saved adapter lacks the initial factors of {missing[:5]}")
        factors = {n: (tensors[f"{n}.initial_A"], tensors[f"{n}.initial_B"]) for n in adapted.layers}
        prepared = _checked_factors(self.name, adapted.layers, factors)
        self.restore_base(adapted)  # a base already holding our own residual goes back to W0 first
        residuals = {name: residual_weight(adapted.layers[name], a0, b0) for name, (a0, b0) in prepared.items()}
        for name, w in residuals.items():
            adapted.layers[name].write_base_weight(w)
        self.initial = prepared
        self._rewritten = set(prepared)
        self.after_load(adapted)

    def after_load(self, adapted) -> None:
        """Hook for subclasses (a DataInit counts as calibrated once its factors are loaded)."""

    def state_dict(self) -> dict[str, Any]:
        return {"initial": {name: {"A": a, "B": b} for name, (a, b) in self.initial.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A resumed run re-derives the same initial factors (deterministic init): check that it did."""
        saved = state.get("initial")
        if saved is None:
            return
        if set(saved) != set(self.initial):
            raise ValueError(f"init={self.name}: the checkpoint's initial factors cover {len(saved)} layers, this run's "
                             f"{len(self.initial)} (calibrate before resuming)")
        for name, pair in saved.items():
            a0, b0 = self.initial[name]
            if not (torch.equal(pair["A"].to(a0), a0) and torch.equal(pair["B"].to(b0), b0)):
                raise ValueError(f"init={self.name}: the initial factors of {name} differ from the checkpoint's "
                                 "(the init is not reproducible here: other data, seed or hardware)")

    # ----- PEFT export: a plain LoRA of rank 2r on the original base -----------------------------------
    def peft_factors(self, name: str, layer, factors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if name not in self.initial:
            raise ValueError(f"init={self.name}: {name} has no initial factors yet (calibrate first)")
        a0, b0 = self.initial[name]
        out = dict(factors)
        out["lora_A"] = torch.cat([factors["lora_A"], a0.to(factors["lora_A"])], 0)
        out["lora_B"] = torch.cat([factors["lora_B"], -b0.to(factors["lora_B"])], 1)
        return out  # DoRA's magnitude stays: V = W0 + s·[B, −B0][A; A0] = W_res + s·BA


# ----- data-aware inits -----------------------------------------------------------------------------
class DataInit(InitPart):
    """An init computed from calibration batches (the first `init_batches` batches of the training data).

    `build` leaves LoRA's init (B = 0: the base function) and marks the adapter as needing
    calibration; `calibrate` validates, runs `compute_factors` inside a `calibration_scope`
    (available as `self.scope` while it runs) and applies the factors. A loaded adapter
    (`deferred`) counts as calibrated. Subclasses implement `compute_factors`, and may
    override `check_batches` (more checks on the batches, before anything runs),
    `apply_factors` and `calibration_summary` (extra keys for the returned summary).
    """

    options = {"init_batches": Option(4, int, lambda v: v >= 1, ">= 1",
                                      "calibration batches taken from the start of the training stream")}

    def __init__(self, spec):
        super().__init__(spec)
        self.calibrated = False
        self.scope: CalibrationScope | None = None

    def calibration_batches(self) -> int:
        return int(self.opts.init_batches)

    def needs_calibration(self) -> bool:
        return not self.calibrated

    def configure(self, adapted) -> None:
        super().configure(adapted)  # RewritingInit's: nothing to do for a data-aware part
        if self.deferred:
            self.calibrated = True

    def after_load(self, adapted) -> None:
        self.calibrated = True

    def check_batches(self, adapted, batches: Sequence[Mapping[str, torch.Tensor]]) -> None:
        """Raise ValueError for batches this init cannot use (called before anything runs)."""
        for i, batch in enumerate(batches):
            if not isinstance(batch, Mapping) or not isinstance(batch.get("input_ids"), torch.Tensor):
                raise ValueError(f"init={self.name}: calibration batch {i} must be a mapping with an 'input_ids' tensor, "
                                 f"got {type(batch).__name__}")

    def compute_factors(self, adapted, batches: Sequence[Mapping[str, torch.Tensor]],
                        loss_fn: Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor]) -> Factors:
        raise NotImplementedError  # pragma: no cover - each data-aware part computes its own

    def calibration_summary(self) -> dict[str, Any]:
        """Extra JSON-ready keys for `calibrate`'s summary (EVA: the ranks)."""
        return {}

    def calibrate(self, adapted, batches, loss_fn=None) -> dict[str, Any]:
        n = self.calibration_batches()
        if self.calibrated:
            raise ValueError(f"init={self.name}: this adapter is already calibrated; build a new one to calibrate again")
        if isinstance(batches, Mapping) or not isinstance(batches, Sequence):
            raise ValueError(f"init={self.name}: calibration batches must be a list of batches, got {type(batches).__name__}")
        if len(batches) < n:
            raise ValueError(f"init={self.name} needs init_batches={n} calibration batches, got {len(batches)}")
        if adapted.merged:
            raise ValueError(f"init={self.name}: the adapter is merged; calibrate before merging")
        batches = list(batches[:n])  # only the first init_batches
        self.check_batches(adapted, batches)
        loss_fn = lm_loss if loss_fn is None else loss_fn
        start = time.perf_counter()
        with calibration_scope(adapted) as scope:
            self.scope = scope
            try:
                factors = self.compute_factors(adapted, batches, loss_fn)
            finally:
                self.scope = None
        self.apply_factors(adapted, factors)
        self.calibrated = True
        return {"seconds": time.perf_counter() - start, "batches": n, "forwards": scope.forwards,
                **self.calibration_summary()}


__all__ = ["RewritingInit", "DataInit", "calibration_scope", "CalibrationScope", "layers_of",
           "residual_weight", "original_weight", "lm_loss"]
