"""rsLoRA scaling — Kalajdzievski 2023, "A Rank Stabilization Scaling Factor for
Fine-Tuning with LoRA", arXiv 2312.03732.

The update is W0 + γ_r·BA with γ_r = alpha/sqrt(r) instead of alpha/r: the paper proves
γ_r ∈ Θ(r^-1/2) keeps activations and gradients stable as r grows, whereas alpha/r
makes higher ranks learn ever more slowly ("gradient collapse"). Everything else
(forward, init, trainable tensors, merge) is LoRA's; merge uses the new factor.
"""

from __future__ import annotations

import math

from .parts import Part, register


@register
class RsLoRAScaling(Part):
    slot = "scaling"
    name = "rslora"
    idea = "rank-stabilised scale alpha/sqrt(r)"
    idea_zh = "秩稳定缩放 alpha/√r"
    layer_needs = {"scaled_by_spec": "rsLoRA changes the factor s of s·BA, and this layer kind's update "
                                     "is not scaled by s (VeRA: the λ vectors; AdaLoRA: alpha/init_r)"}

    @staticmethod
    def factor(r: int, alpha: float) -> float:
        return alpha / math.sqrt(r)
