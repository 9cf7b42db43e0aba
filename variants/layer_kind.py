"""LayerKind: the part of a spec that decides the adapted layer (forward, tensors, merge).

A layer kind turns each targeted base layer into an `AdapterLayer` subclass
(`create`), may first build state shared by all its layers (`prepare`, e.g. VeRA's
frozen random projections), and says how its adapter tensors map to PEFT's
checkpoint format (`peft_type`, `peft_names`) where PEFT has the method.

Every layer kind takes the option `adapter_dtype`: the dtype its adapter path computes in
over a half-precision base — `float32` (default; PEFT's autocast_adapter_dtype: x is cast
to float32 for the adapter path and the float32 sum of base and adapter outputs is cast
back) or `base` (the adapter tensors are cast to the base's dtype). Adapter tensors are
stored in float32 over such a base either way; a merge writes into the base's dtype.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from .core import AdapterLayer, is_quantized, module_device
from .parts import Option, Part

ADAPTER_DTYPES = ("float32", "base")


def adapter_dtype(base_layer: nn.Module) -> torch.dtype:
    """Adapter tensors stay fp32 over a half-precision or quantized base (as PEFT's autocast_adapter_dtype)."""
    if is_quantized(base_layer):
        return torch.float32
    weight = base_layer.weight
    if weight.dtype in (torch.float32, torch.float64):
        return weight.dtype
    return torch.float32


def adapter_kwargs(base_layer: nn.Module) -> dict:
    """dtype and device for a new adapter tensor of this base layer."""
    return {"dtype": adapter_dtype(base_layer), "device": module_device(base_layer)}


class LayerKind(Part):
    slot = "layer"
    # PEFT's peft_type for export, or None where PEFT lacks the method.
    peft_type: ClassVar[str | None] = None
    # our tensor name -> PEFT's key suffix inside the adapted module
    peft_names: ClassVar[dict[str, str]] = {}

    options = {
        "adapter_dtype": Option("float32", str, lambda v: v in ADAPTER_DTYPES, " or ".join(ADAPTER_DTYPES),
                                "dtype of the adapter computation over a half-precision base"),
    }

    # per-layer ranks that override spec.r (set by `build` from a saved adapter)
    rank_pattern: dict[str, int] = {}

    def rank_for(self, name: str) -> int:
        return self.rank_pattern.get(name, self.spec.r)

    def prepare(self, model: nn.Module, targets: list[tuple[str, nn.Module]]) -> None:
        """Build state shared by all layers before any is created (default: none)."""

    def create(self, name: str, base_layer: nn.Module) -> AdapterLayer:  # pragma: no cover - abstract
        raise NotImplementedError

    def configure(self, adapted) -> None:
        """Tell every layer its adapter compute dtype. Read from the spec, not `opts`: a kind
        with options of its own (VeRA, AdaLoRA) accepts this inherited one without listing it."""
        choice = self.spec.options.get("adapter_dtype", LayerKind.options["adapter_dtype"].default)
        for layer in adapted.layers.values():
            layer.adapter_dtype = choice

    def shared_modules(self) -> dict[str, nn.Module]:
        """Modules to attach to the model root (name -> module); removed again on unload."""
        return {}
