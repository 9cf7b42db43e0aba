"""Fused forward/backward of the adapted linear layers (LoRA, DoRA, VeRA).

Each function is one `torch.autograd.Function` so a layer costs one autograd node, and
each picks, per call, the cheaper of two exact evaluation orders:

*merged*   build the effective weight  W_eff = W0 + ΔW  (out x in, cost out·in·r) and run
           one GEMM  y = x W_effᵀ + b; the backward reuses it for  ∂L/∂x = g W_eff.
*factored* keep the low-rank path separate,  y = x W0ᵀ + b + s·(x Aᵀ) Bᵀ  (cost T·r·(in+out)).

Merged wins when the token count T is large against the layer width (training batches),
factored when it is small (token-by-token generation). Both give the same numbers up to
float rounding, and when ΔW = 0 (any adapter at init) both give exactly the base output:
W_eff is then W0 bit for bit, built in the base module's own memory layout.

Equations (PyTorch layout, W0 is (out, in); shared/VARIANTS.md):
  LoRA  (Hu et al. 2021, 2106.09685):      y = x W0ᵀ + b + s·(drop(x) Aᵀ) Bᵀ
  DoRA  (Liu et al. 2024, 2402.09353):     V = W0 + s·BA,  n = ‖V‖_row (detached, §4.3),
                                          y = x (m/n ⊙_row V)ᵀ + b
        with dropout, as PEFT:             y = x W0ᵀ + b + (m/n) ⊙ (drop(x) Vᵀ) − drop(x) W0ᵀ
  VeRA  (Kopiczko et al. 2024, 2310.11454): y = x W0ᵀ + b + λ_b ⊙ ((λ_d ⊙ (drop(x) Aᵀ)) Bᵀ)

The base weight is read through `layer.base_weight_native()` in forward and read again in
backward rather than saved, so a quantized base stays quantized between the two passes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


# ----- helpers working in the base module's native weight layout ---------------------------------
def linear_native(x2: torch.Tensor, w_native: torch.Tensor, bias: torch.Tensor | None, fifo: bool) -> torch.Tensor:
    """x2 @ Wᵀ + b, computed exactly as nn.Linear (fifo=False) or GPT-2's Conv1D (fifo=True) do."""
    if fifo:
        return torch.addmm(bias, x2, w_native) if bias is not None else torch.mm(x2, w_native)
    return F.linear(x2, w_native, bias)


def grad_input_native(g2: torch.Tensor, w_native: torch.Tensor, fifo: bool) -> torch.Tensor:
    """g2 @ W for W = (out, in) given in native layout."""
    return torch.mm(g2, w_native.t()) if fifo else torch.mm(g2, w_native)


def lowrank_native(w_native: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, fifo: bool) -> torch.Tensor:
    """W + scale·B A in native layout (a new tensor; equal to W bit for bit when B A = 0)."""
    if fifo:
        return torch.addmm(w_native, A.t(), B.t(), alpha=scale)
    return torch.addmm(w_native, B, A, alpha=scale)


def merged_is_cheaper(tokens: int, in_features: int, out_features: int, with_backward: bool) -> bool:
    """Whether building W_eff (out·in·r, twice with backward) beats the factored path (T·r·(in+out))."""
    merge_cost = out_features * in_features * (2 if with_backward else 1)
    factored_cost = tokens * (out_features + in_features if with_backward else out_features)
    return merge_cost < factored_cost


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _needs_graph(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ----- LoRA ------------------------------------------------------------------------------------------
class _LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, xd, A, B, scale, layer, merged):
        fifo = layer.fan_in_fan_out
        w = layer.base_weight_native()
        bias = layer.base_bias()
        x2 = _flat(x)
        xd2 = x2 if xd is None else _flat(xd)
        A_, B_ = A.to(x.dtype), B.to(x.dtype)
        xa = torch.mm(xd2, A_.t())
        if merged:
            y = linear_native(x2, lowrank_native(w, A_, B_, scale, fifo), bias, fifo)
        else:
            y = torch.addmm(linear_native(x2, w, bias, fifo), xa, B_.t(), alpha=scale)
        ctx.save_for_backward(xd2 if A.requires_grad else None, xa if B.requires_grad else None, A, B)
        ctx.layer, ctx.scale, ctx.merged, ctx.shared = layer, scale, merged, xd is None
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, gy):
        xd2, xa, A, B = ctx.saved_tensors
        need_x, need_xd, need_A, need_B = ctx.needs_input_grad[:4]
        layer, s = ctx.layer, ctx.scale
        fifo = layer.fan_in_fan_out
        g2 = _flat(gy)
        A_, B_ = A.to(g2.dtype), B.to(g2.dtype)
        gx = gxd = gA = gB = None
        factored_input_grad = need_xd or (need_x and ctx.shared and not ctx.merged)
        gb = torch.mm(g2, B_) if (need_A or factored_input_grad) else None
        if need_B:
            gB = torch.mm(g2.t(), xa).mul_(s).to(B.dtype)
        if need_A:
            gA = torch.mm(gb.t(), xd2).mul_(s).to(A.dtype)
        if need_x:
            w = layer.base_weight_native()
            if ctx.shared and ctx.merged:
                gx = grad_input_native(g2, lowrank_native(w, A_, B_, s, fifo), fifo)
            else:
                gx = grad_input_native(g2, w, fifo)
                if ctx.shared:
                    gx.addmm_(gb, A_, alpha=s)
            gx = gx.view(*gy.shape[:-1], gx.shape[-1])
        if need_xd:
            gxd = torch.mm(gb, A_).mul_(s).view(*gy.shape[:-1], A.shape[1])
        return gx, gxd, gA, gB, None, None, None


def lora_linear(layer, x: torch.Tensor, xd: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """y = x W0ᵀ + b + scale·(xd Aᵀ) Bᵀ, with xd = x when `xd` is None."""
    tokens = x.numel() // x.shape[-1]
    merged = xd is None and merged_is_cheaper(tokens, layer.in_features, layer.out_features, _needs_graph(x, A, B))
    return _LoRALinear.apply(x, xd, A, B, scale, layer, merged)


# ----- DoRA ------------------------------------------------------------------------------------------
def _row_scale(v: torch.Tensor, c: torch.Tensor, fifo: bool) -> torch.Tensor:
    """diag(c) V for V (out, in) given in native layout."""
    return v * c if fifo else v * c.unsqueeze(1)


class _DoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, xd, A, B, m, scale, layer):
        fifo = layer.fan_in_fan_out
        w = layer.base_weight_native()
        bias = layer.base_bias()
        x2 = _flat(x)
        A_, B_, m_ = A.to(x.dtype), B.to(x.dtype), m.to(x.dtype)
        v = lowrank_native(w, A_, B_, scale, fifo)
        # ‖W0 + sBA‖ per output feature, treated as a constant (paper §4.3): no gradient.
        norm = torch.linalg.vector_norm(v, dim=0 if fifo else 1)
        c = m_ / norm
        if xd is None:
            y = linear_native(x2, _row_scale(v, c, fifo), bias, fifo)
            xa = torch.mm(x2, A_.t()) if B.requires_grad else None
            ctx.save_for_backward(x2 if A.requires_grad else None, xa, A, B, m, norm, y if m.requires_grad else None)
        else:
            xd2 = _flat(xd)
            zd = linear_native(xd2, v, None, fifo)
            y = linear_native(x2, w, bias, fifo) + zd * c - linear_native(xd2, w, None, fifo)
            xa = torch.mm(xd2, A_.t()) if B.requires_grad else None
            ctx.save_for_backward(xd2, xa, A, B, m, norm, zd)
        ctx.layer, ctx.scale, ctx.shared = layer, scale, xd is None
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, gy):
        xin, xa, A, B, m, norm, saved = ctx.saved_tensors
        need_x, need_xd, need_A, need_B, need_m = ctx.needs_input_grad[:5]
        layer, s = ctx.layer, ctx.scale
        fifo = layer.fan_in_fan_out
        g2 = _flat(gy)
        A_, B_, m_ = A.to(g2.dtype), B.to(g2.dtype), m.to(g2.dtype)
        c = m_ / norm
        gx = gxd = gA = gB = gm = None
        # The adapter path sees the upstream gradient scaled per output feature by c = m/n;
        # folding c into B (out x r) avoids a pass over the (T x out) gradient.
        Bc = B_ * c.unsqueeze(1)
        if need_m:
            if ctx.shared:
                # z = x Vᵀ = (y - b) / c, hence ∂L/∂m = Σ_t g ⊙ z / n = Σ_t g ⊙ (y - b) / m.
                y = saved
                bias = layer.base_bias()
                gy_sum = (g2 * y).sum(0)
                if bias is not None:
                    gy_sum = gy_sum - bias.to(g2.dtype) * g2.sum(0)
                gm = gy_sum / m_
            else:
                gm = (g2 * saved).sum(0) / norm
            gm = gm.to(m.dtype)
        if need_B:
            gB = torch.mm(g2.t(), xa).mul_(c.unsqueeze(1) * s).to(B.dtype)
        if need_A:
            gA = torch.mm(torch.mm(g2, Bc).t(), xin).mul_(s).to(A.dtype)
        if need_x or need_xd:
            w = layer.base_weight_native()
            v = lowrank_native(w, A_, B_, s, fifo)
            if ctx.shared:
                gx = grad_input_native(g2, _row_scale(v, c, fifo), fifo)
            else:
                if need_x:
                    gx = grad_input_native(g2, w, fifo)
                if need_xd:
                    gxd = grad_input_native(g2 * c, v, fifo) - grad_input_native(g2, w, fifo)
                    gxd = gxd.view(*gy.shape[:-1], gxd.shape[-1])
            if gx is not None:
                gx = gx.view(*gy.shape[:-1], gx.shape[-1])
        return gx, gxd, gA, gB, gm, None, None


def dora_linear(layer, x, xd, A, B, magnitude, scale) -> torch.Tensor:
    """DoRA forward with the detached row norm (see module docstring)."""
    return _DoRALinear.apply(x, xd, A, B, magnitude, scale, layer)


# ----- VeRA ------------------------------------------------------------------------------------------
class _VeRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, xd, lam_b, lam_d, A, B, layer, merged):
        fifo = layer.fan_in_fan_out
        w = layer.base_weight_native()
        bias = layer.base_bias()
        x2 = _flat(x)
        xd2 = x2 if xd is None else _flat(xd)
        lb, ld = lam_b.to(x.dtype), lam_d.to(x.dtype)
        A_, B_ = A.to(x.dtype), B.to(x.dtype)
        if merged:
            y = linear_native(x2, _vera_merged_native(w, lb, ld, A_, B_, fifo), bias, fifo)
        else:
            u = torch.mm(xd2, A_.t()).mul_(ld)
            y = linear_native(x2, w, bias, fifo).addcmul_(torch.mm(u, B_.t()), lb)
        ctx.save_for_backward(xd2, lam_b, lam_d, A, B)
        ctx.layer, ctx.merged, ctx.shared = layer, merged, xd is None
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, gy):
        xd2, lam_b, lam_d, A, B = ctx.saved_tensors
        need_x, need_xd, need_lb, need_ld = ctx.needs_input_grad[:4]
        layer = ctx.layer
        fifo = layer.fan_in_fan_out
        g2 = _flat(gy)
        lb, ld = lam_b.to(g2.dtype), lam_d.to(g2.dtype)
        A_, B_ = A.to(g2.dtype), B.to(g2.dtype)
        gx = gxd = glb = gld = None
        tokens, out_f, in_f, r = g2.shape[0], B_.shape[0], A_.shape[1], A_.shape[0]
        if need_lb or need_ld:
            # Two exact ways to the λ gradients; take the cheaper for this shape.
            if tokens * r * (in_f + 2 * out_f) <= out_f * in_f * (tokens + 2 * r):
                xa = torch.mm(xd2, A_.t())
                if need_lb:
                    glb = (g2 * torch.mm(xa * ld, B_.t())).sum(0)
                if need_ld:
                    gld = (xa * torch.mm(g2 * lb, B_)).sum(0)
            else:
                G = torch.mm(g2.t(), xd2)  # ∂L/∂ΔW, (out, in)
                if need_lb:
                    glb = (G * torch.mm(B_ * ld, A_)).sum(1)
                if need_ld:
                    gld = (torch.mm(G, A_.t()) * B_ * lb.unsqueeze(1)).sum(0)
            glb = glb.to(lam_b.dtype) if glb is not None else None
            gld = gld.to(lam_d.dtype) if gld is not None else None
        if need_x or need_xd:
            w = layer.base_weight_native()
            if ctx.shared and ctx.merged:
                gx = grad_input_native(g2, _vera_merged_native(w, lb, ld, A_, B_, fifo), fifo)
            else:
                adapter_grad = torch.mm(torch.mm(g2 * lb, B_) * ld, A_)
                if need_x:
                    gx = grad_input_native(g2, w, fifo)
                    if ctx.shared:
                        gx.add_(adapter_grad)
                if need_xd:
                    gxd = adapter_grad.view(*gy.shape[:-1], in_f)
            if gx is not None:
                gx = gx.view(*gy.shape[:-1], gx.shape[-1])
        return gx, gxd, glb, gld, None, None, None, None


def _vera_merged_native(w, lb, ld, A, B, fifo):
    """W + diag(λ_b) B diag(λ_d) A in native layout, as one fused GEMM: diag(λ_b) B diag(λ_d) = B ⊙ (λ_b ⊗ λ_d)."""
    return lowrank_native(w, A, B * ld * lb.unsqueeze(1), 1.0, fifo)


def vera_linear(layer, x, xd, lam_b, lam_d, A, B) -> torch.Tensor:
    """VeRA forward; A (r, in) and B (out, r) are the layer's slices of the shared projections."""
    tokens = x.numel() // x.shape[-1]
    merged = xd is None and merged_is_cheaper(tokens, layer.in_features, layer.out_features, _needs_graph(x, lam_b, lam_d))
    return _VeRALinear.apply(x, xd, lam_b, lam_d, A, B, layer, merged)
