"""OLoRA — Büyükakyüz 2024, "OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models",
arXiv 2406.01775. Details: docs/init-family.md.

The adapter starts at the first r columns of W0's QR factorisation and the base keeps the rest:

    Q R = qr(W0)  (reduced),   B0 = Q[:, :r]  (out x r, orthonormal columns),   A0 = R[:r]  (r x in)
    W_res = W0 − s·B0A0   (written into the base; init_base.RewritingInit)

As PEFT 0.21.2 (tuners/lora/layer.py:384-427) the factors are not divided by s, and W_res
subtracts s·B0A0, so the init is exact for any alpha. Computed in fp32 (an fp64 base in fp64).
Deviation: PEFT factorises the stored weight without transposing GPT-2's Conv1D (in, out) and
builds a B of the wrong shape (its forward then fails); here the factorisation is always of
the (out, in) weight. r > min(out, in) is a ValueError naming the layer, r and its shape.
"""

from __future__ import annotations

import torch

from .init_base import RewritingInit, compute_dtype
from .parts import register


def olora_factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0, B0) of OLoRA for an (out, in) weight."""
    q, rr = torch.linalg.qr(weight)
    return rr[:r].contiguous(), q[:, :r].contiguous()


@register
class OLoRAInit(RewritingInit):
    name = "olora"
    idea = "start from W0's QR factors (orthonormal B); the base keeps the residual"
    idea_zh = "以 W0 的 QR 分解（正交 B）初始化适配器，基座保留残差"

    def layer_factors(self, name, layer, index):
        return olora_factors(layer.base_weight().to(compute_dtype(layer)), layer.r)
