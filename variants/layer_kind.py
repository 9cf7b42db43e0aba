"""LayerKind: the part of a spec that decides the adapted layer (forward, tensors, merge).

A layer kind turns each targeted base layer into an `AdapterLayer` subclass
(`create`), may first build state shared by all its layers (`prepare`, e.g. VeRA's
frozen random projections), and says how its adapter tensors map to PEFT's
checkpoint format (`peft_type`, `peft_names`) where PEFT has the method.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from .core import AdapterLayer, is_quantized, module_device
from .parts import Part


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

    # Capabilities that modifiers ask for (`Part.layer_needs`) instead of listing layer kinds.
    # All off here: a new layer kind declares what it offers.
    #   trains_lora_pair  every layer has trainable factors `lora_A` (r x in) and `lora_B` (out x r)
    #   scaled_by_spec    the update is multiplied by the scaling part's factor s (`spec.scale`)
    #   update_is_s_ba    ΔW = s·lora_B·lora_A exactly, and these two are the layer's only adapter tensors
    trains_lora_pair: ClassVar[bool] = False
    scaled_by_spec: ClassVar[bool] = False
    update_is_s_ba: ClassVar[bool] = False

    # per-layer ranks that override spec.r (set by `build` from a saved adapter)
    rank_pattern: dict[str, int] = {}

    def rank_for(self, name: str) -> int:
        return self.rank_pattern.get(name, self.spec.r)

    def prepare(self, model: nn.Module, targets: list[tuple[str, nn.Module]]) -> None:
        """Build state shared by all layers before any is created (default: none)."""

    def create(self, name: str, base_layer: nn.Module) -> AdapterLayer:  # pragma: no cover - abstract
        raise NotImplementedError

    def shared_modules(self) -> dict[str, nn.Module]:
        """Modules to attach to the model root (name -> module); removed again on unload."""
        return {}
