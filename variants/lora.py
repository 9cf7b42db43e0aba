"""LoRA — Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models",
arXiv 2106.09685.

    y = x W0ᵀ + b0 + s·(drop(x) Aᵀ) Bᵀ,      ΔW = s·B A,   s = alpha/r (or alpha/sqrt r)

A (r x in) starts Kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)), as
microsoft/LoRA's loralib and PEFT do; B (out x r) starts at zero, so ΔW = 0 and the
adapted model equals the base model at step 0 (§4.1). Only A and B train. Merge writes
W0 + s·BA into the base weight; unmerge subtracts it again.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .core import AdapterLayer
from .functional import lora_linear
from .layer_kind import LayerKind, adapter_kwargs
from .parts import register
from .reference import lora_reference


class LoRALayer(AdapterLayer):
    adapter_parameters = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module, r: int, scale: float, dropout: float):
        super().__init__(base_layer, dropout)
        self.r = r
        self.scale = float(scale)
        kw = adapter_kwargs(base_layer)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward_unmerged(self, x: torch.Tensor) -> torch.Tensor:
        return lora_linear(self, x, self.adapter_input(x), self.lora_A, self.lora_B, self.scale)

    def reference_forward(self, x: torch.Tensor, xd: torch.Tensor | None = None) -> torch.Tensor:
        """The same output by plain autograd ops (tests compare the fused forward with it)."""
        return lora_reference(self, x, xd, self.lora_A, self.lora_B, self.scale)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scale

    def extra_repr(self) -> str:
        return f"r={self.r}, scale={self.scale:g}, " + super().extra_repr()


@register
class LoRA(LayerKind):
    name = "lora"
    idea = "frozen W0 plus a trainable low-rank update s·BA"
    idea_zh = "冻结 W0，训练低秩增量 s·BA"
    peft_type = "LORA"
    trains_lora_pair = scaled_by_spec = update_is_s_ba = True
    init_sets_lora_pair = True  # DoRA inherits it: its magnitude is re-derived after the init

    def create(self, name: str, base_layer: nn.Module) -> LoRALayer:
        return LoRALayer(base_layer, self.rank_for(name), self.spec.scale, self.spec.dropout)
