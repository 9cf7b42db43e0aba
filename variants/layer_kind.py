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

from .core import AdapterLayer
from .parts import Part


def adapter_dtype(base_layer: nn.Module) -> torch.dtype:
    """Adapter tensors stay fp32 over a half-precision or quantized base (as PEFT's autocast_adapter_dtype)."""
    weight = base_layer.weight
    if weight.dtype in (torch.float32, torch.float64):
        return weight.dtype
    return torch.float32


class LayerKind(Part):
    slot = "layer"
    # PEFT's peft_type for export, or None where PEFT lacks the method.
    peft_type: ClassVar[str | None] = None
    # our tensor name -> PEFT's key suffix inside the adapted module
    peft_names: ClassVar[dict[str, str]] = {}

    def prepare(self, model: nn.Module, targets: list[tuple[str, nn.Module]]) -> None:
        """Build state shared by all layers before any is created (default: none)."""

    def create(self, name: str, base_layer: nn.Module) -> AdapterLayer:  # pragma: no cover - abstract
        raise NotImplementedError

    def shared_modules(self) -> dict[str, nn.Module]:
        """Modules to attach to the model root (name -> module); removed again on unload."""
        return {}
