"""LayerKind: the part of a spec that decides the adapted layer (forward, tensors, merge).

A layer kind turns each targeted base layer into an `AdapterLayer` subclass
(`create`), may first build state shared by all its layers (`prepare`, e.g. VeRA's
frozen random projections), and says how its adapter tensors map to PEFT's
checkpoint format (`peft_type`; variants/peft_format.py maps the tensors) where PEFT has the method.

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

    # Capabilities that modifiers ask for (`Part.layer_needs`) instead of listing layer kinds.
    # All off here: a new layer kind declares what it offers.
    #   trains_lora_pair  every layer has trainable factors `lora_A` (r x in) and `lora_B` (out x r)
    #   scaled_by_spec    the update is multiplied by the scaling part's factor s (`spec.scale`)
    #   update_is_s_ba    ΔW = s·lora_B·lora_A exactly, and these two are the layer's only adapter tensors
    #   init_sets_lora_pair  an init may write lora_A and lora_B, and the layer's function at step 0 depends
    #                     only on W0 + s·BA (its other tensors follow via `refresh_after_init`): the
    #                     base-rewriting inits (docs/init-family.md)
    trains_lora_pair: ClassVar[bool] = False
    scaled_by_spec: ClassVar[bool] = False
    update_is_s_ba: ClassVar[bool] = False
    init_sets_lora_pair: ClassVar[bool] = False

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
