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

A rank above a layer's width (r > min(out, in)) is accepted, as LoRA accepts it: the SVD
has only k = min(out, in) components, which then capture the whole residual (deq(Q) + s·BA
= W up to rounding); the other r − k rows of A keep LoRA's Kaiming-uniform init and the
matching columns of B start at zero, so they add nothing at step 0 and train as in LoRA.
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
    """(codes, state, A, B) of LoftQ's alternating initialisation for one (out, in) weight.

    A and B have k = min(rank, out, in) rows / columns: the SVD has no more components.
    """
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
    requires = {"base": (frozenset({"nf4", "fp4"}), "LoftQ initialises an adapter against a 4-bit base")}
    layer_needs = {"update_is_s_ba": "LoftQ sets a plain LoRA pair (A, B) from an SVD, so that s·BA is the "
                                     "quantization error's best rank-r part"}

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
        k = a.shape[0]  # min(r, out, in); rows of A past k keep the layer's own (LoRA) init
        layer.lora_A[:k].copy_(a.to(layer.lora_A))
        layer.lora_B[:, :k].copy_(b.to(layer.lora_B))
        layer.lora_B[:, k:].zero_()
