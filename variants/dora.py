"""DoRA — Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv 2402.09353.

The weight is split into a magnitude and a direction; LoRA updates the direction:

    V = W0 + s·B A,    W' = m ⊙_row V / ‖V‖_row,    y = x W'ᵀ + b0

‖·‖_row is one L2 norm per output feature (`dim=1` of the (out, in) weight; the paper's
"column" norm in its (in x out) notation, as NVlabs/DoRA, PEFT and torchtune compute
it). The norm is detached — treated as a constant, paper §4.3 — so it gets no
gradient. m starts at ‖W0‖_row, hence W' = W0 at step 0; A and B start as in LoRA; m, A
and B train; the base bias b0 is kept. With dropout the base term is re-evaluated on
drop(x), as PEFT does. Merge writes W' into the base weight and remembers ‖V‖_row so that
unmerge can undo it exactly: W0 = W'·‖V‖_row/m − s·BA.

(The seed tutorial's DoRA code adds an activation to a weight, starts m at ones, does not
detach the norm and drops b0: docs/dora.md.)
"""

from __future__ import annotations

import torch
from torch import nn

from .functional import dora_linear
from .lora import LoRA, LoRALayer
from .parts import register
from .reference import dora_reference


class DoRALayer(LoRALayer):
    adapter_parameters = ("lora_A", "lora_B", "magnitude")

    def __init__(self, base_layer: nn.Module, r: int, scale: float, dropout: float):
        super().__init__(base_layer, r, scale, dropout)
        with torch.no_grad():
            w = self.base_weight().to(self.lora_A.dtype)
            norm = torch.linalg.vector_norm(w + self.delta_weight(), dim=1)
        self.magnitude = nn.Parameter(norm)
        self.register_buffer("_merge_norm", None, persistent=False)

    @torch.no_grad()
    def refresh_after_init(self) -> None:
        """m = ‖W + s·BA‖_row for the W, A and B an init wrote (so W' = W + s·BA at step 0)."""
        w = self.base_weight().to(self.lora_A.dtype)
        self.magnitude.copy_(torch.linalg.vector_norm(w + self.delta_weight(), dim=1))

    def forward_unmerged(self, x: torch.Tensor) -> torch.Tensor:
        return dora_linear(self, x, self.adapter_input(x), self.lora_A, self.lora_B, self.magnitude, self.scale)

    def reference_forward(self, x: torch.Tensor, xd: torch.Tensor | None = None) -> torch.Tensor:
        return dora_reference(self, x, xd, self.lora_A, self.lora_B, self.magnitude, self.scale)

    def merged_weight(self) -> torch.Tensor:
        w = self.base_weight()
        v = w.to(self.lora_A.dtype) + self.delta_weight()
        norm = torch.linalg.vector_norm(v, dim=1)
        self._merge_norm = norm
        return ((self.magnitude / norm).unsqueeze(1) * v).to(w.dtype)

    def unmerged_weight(self, merged: torch.Tensor) -> torch.Tensor:
        factor = (self.magnitude / self._merge_norm).unsqueeze(1)
        w = merged.to(self.lora_A.dtype) / factor - self.delta_weight()
        self._merge_norm = None
        return w.to(merged.dtype)


@register
class DoRA(LoRA):
    name = "dora"
    idea = "magnitude/direction split, LoRA on the direction"
    idea_zh = "权重分解为幅度和方向，LoRA 只更新方向"
    update_is_s_ba = False  # the magnitude and the row norm sit on top of s·BA

    def create(self, name: str, base_layer: nn.Module) -> DoRALayer:
        return DoRALayer(base_layer, self.rank_for(name), self.spec.scale, self.spec.dropout)
