"""LoftQ — Li et al. 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language
Models", arXiv 2310.08659.

An `init` part for a 4-bit base: quantization and the low-rank adapter are initialised
together so that deq(Q) + s·BA approximates the full-precision W better than deq(Q) alone.
Starting from res = W, for t = 1..T (`loftq_iter`):

    Q_t = q(res),   R_t = W − deq(Q_t),   U S Vᵀ = svd(R_t)
    B = U_r sqrt(S_r) / sqrt(s),   A = sqrt(S_r) V_rᵀ / sqrt(s)       (so that s·BA = U_r S_r V_rᵀ)
    res = W − s·BA                                                     (if t < T)

The base layer keeps Q_T and the adapter starts at (A, B). Dividing the factors by the
scale s makes the initialisation exact for any alpha; PEFT's `loftq_init` does not divide,
so its init is exact only when s = 1 (alpha = r; peft#1982). The SVD runs on the weight's
own device, CPU included (PEFT's requires CUDA). It needs the full-precision weights, so a
base that is already quantized is refused.
"""

from __future__ import annotations

import math

import torch

from .core import is_quantized
from .defaults import InitPart
from .parts import Option, register
from .quant import dequantize_weight, quantize_weight


def loftq_factors(weight: torch.Tensor, rank: int, scale: float, iters: int, quant_type: str, double_quant: bool,
                  blocksize: int):
    """(codes, state, A, B) of LoftQ's alternating initialisation for one (out, in) weight."""
    weight = weight.detach().float()
    residual = weight
    for t in range(iters):
        codes, state = quantize_weight(residual, quant_type, double_quant, blocksize)
        error = weight - dequantize_weight(codes, state)
        u, s, vh = torch.linalg.svd(error, full_matrices=False)
        root = torch.sqrt(s[:rank])
        b = u[:, :rank] * root / math.sqrt(scale)
        a = root.unsqueeze(1) * vh[:rank] / math.sqrt(scale)
        if t < iters - 1:
            residual = weight - scale * (b @ a)
    return codes, state, a, b


@register
class LoftQInit(InitPart):
    name = "loftq"
    idea = "quantize and initialise the adapter jointly: deq(Q) + s·BA ≈ W"
    idea_zh = "量化与适配器联合初始化，使 deq(Q) + s·BA ≈ W"
    options = {"loftq_iter": Option(1, int, lambda v: v >= 1, ">= 1", "alternating quantize/SVD rounds")}
    requires = {
        "base": (frozenset({"nf4", "fp4"}), "LoftQ initialises an adapter against a 4-bit base"),
        "layer": (frozenset({"lora"}), "LoftQ sets a plain LoRA pair (A, B) from an SVD"),
    }

    def check_target(self, name: str, module: torch.nn.Module) -> None:
        if is_quantized(module) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            raise ValueError(f"LoftQ needs the full-precision weights, but {name} is already quantized; "
                             "start from the full-precision base")

    @torch.no_grad()
    def init_layer(self, name: str, layer, original: torch.nn.Module) -> None:
        base = layer.base_layer
        codes, state, a, b = loftq_factors(
            original.weight, layer.r, layer.scale, self.opts.loftq_iter, base.state.quant_type, base.state.nested,
            base.state.blocksize)
        state.to(base.codes.device)
        base.codes = codes.to(base.codes.device)
        base.state = state
        layer.lora_A.copy_(a.to(layer.lora_A))
        layer.lora_B.copy_(b.to(layer.lora_B))
