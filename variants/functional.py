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
backward rather than saved, so a quantized base stays quantized between the two passes,
and no (out x in) matrix per layer is kept alive for backward: W_eff is rebuilt (cost
out·in·r, small against the T·out·in GEMMs). The rebuilt matrices live in a per-thread
scratch buffer reused by every layer — a fresh (out x in) allocation per layer and pass
costs more than the GEMM that fills it (page faults of large allocations).
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F

_SCRATCH = threading.local()


def scratch(slot: int, shape: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
    """A reusable (shape) buffer for a short-lived matrix; its content dies with the next use of `slot`.

    Only for values consumed before the autograd function returns (never saved, never returned).
    Views are cached per shape, so a call costs no tensor operation once warm.
    """
    cache = getattr(_SCRATCH, "cache", None)
    if cache is None:
        cache = _SCRATCH.cache = {}
    key = (slot, shape, like.dtype, like.device)
    view = cache.get(key)
    if view is not None:
        return view
    need = math.prod(shape)
    base_key = (slot, like.dtype, like.device)
    buf = cache.get(base_key)
    if buf is None or buf.numel() < need:
        buf = torch.empty(need, dtype=like.dtype, device=like.device)
        # views of the old, smaller buffer stay valid for their own shapes but are dropped
        # so that every slot uses one allocation
        for k in [k for k in cache if len(k) == 4 and k[0] == slot and k[2:] == base_key[1:]]:
            del cache[k]
        cache[base_key] = buf
    view = cache[key] = buf[:need].view(shape)
    return view


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


# ----- helpers working in the base module's native weight layout ---------------------------------
def linear_native(x2: torch.Tensor, w_native: torch.Tensor, bias: torch.Tensor | None, fifo: bool) -> torch.Tensor:
    """x2 @ Wᵀ + b, computed exactly as nn.Linear (fifo=False) or GPT-2's Conv1D (fifo=True) do."""
    if fifo:
        return torch.addmm(bias, x2, w_native) if bias is not None else torch.mm(x2, w_native)
    return F.linear(x2, w_native, bias)


def grad_input_native(g2: torch.Tensor, w_native: torch.Tensor, fifo: bool) -> torch.Tensor:
    """g2 @ W for W = (out, in) given in native layout."""
    return torch.mm(g2, w_native.t()) if fifo else torch.mm(g2, w_native)


def lowrank_native(w_native: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, fifo: bool,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """W + scale·B A in native layout (equal to W bit for bit when B A = 0); into `out` if given."""
    if fifo:
        return torch.addmm(w_native, A.t(), B.t(), alpha=scale, out=out)
    return torch.addmm(w_native, B, A, alpha=scale, out=out)


def merged_is_cheaper(tokens: int, in_features: int, out_features: int, with_backward: bool) -> bool:
    """Whether building W_eff (out·in·r, twice with backward) beats the factored path (T·r·(in+out))."""
    merge_cost = out_features * in_features * (2 if with_backward else 1)
    factored_cost = tokens * (out_features + in_features if with_backward else out_features)
    return merge_cost < factored_cost


def keep_merged_weight(tokens: int, in_features: int, out_features: int, rank: int) -> bool:
    """Keep W_eff from forward for backward (instead of rebuilding it) when it is no larger than
    the (T x r) activation the factored form would have to keep anyway: never more memory than
    the factored evaluation, and one out·in·r GEMM less (VeRA's r ~ width, large T)."""
    return out_features * in_features <= tokens * rank


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


def _unflat(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t if like.dim() == 2 else t.view(*like.shape[:-1], t.shape[-1])


def _needs_graph(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _weight_shape(layer) -> tuple[int, int]:
    return (layer.in_features, layer.out_features) if layer.fan_in_fan_out else (layer.out_features, layer.in_features)


# ----- LoRA ------------------------------------------------------------------------------------------
class _LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, xd, A, B, scale, layer, merged):
        fifo = layer.fan_in_fan_out
        w = layer.base_weight_native()
        bias = layer.base_bias()
        x2 = _flat(x)
        xd2 = x2 if xd is None else _flat(xd)
        A_, B_ = _as(A, x.dtype), _as(B, x.dtype)
        # (x Aᵀ)ᵀ = A xᵀ, computed as an (r x T) product: GEMMs with a skinny *first* operand
        # run ~2x faster on CPU BLAS than with a skinny output width, here and for ∂L/∂B below.
        xa_t = torch.mm(A_, xd2.t())
        if merged:
            w_eff = lowrank_native(w, A_, B_, scale, fifo, out=scratch(0, _weight_shape(layer), w))
            y = linear_native(x2, w_eff, bias, fifo)
        else:
            # in place: an out-of-place addmm would first copy the whole (T x out) output
            y = linear_native(x2, w, bias, fifo).addmm_(xa_t.t(), B_.t(), alpha=scale)
        ctx.save_for_backward(xd2 if A.requires_grad else None, xa_t if B.requires_grad else None, A, B)
        ctx.layer, ctx.scale, ctx.merged, ctx.shared = layer, scale, merged, xd is None
        return _unflat(y, x)

    @staticmethod
    def backward(ctx, gy):
        xd2, xa_t, A, B = ctx.saved_tensors
        need_x, need_xd, need_A, need_B = ctx.needs_input_grad[:4]
        layer, s = ctx.layer, ctx.scale
        fifo = layer.fan_in_fan_out
        g2 = _flat(gy)
        A_, B_ = _as(A, g2.dtype), _as(B, g2.dtype)
        gx = gxd = gA = gB = None
        factored_input_grad = need_xd or (need_x and ctx.shared and not ctx.merged)
        gb = torch.mm(g2, B_) if (need_A or factored_input_grad) else None
        if need_B:
            gB = _as(torch.mm(xa_t, g2).mul_(s).t(), B.dtype)
        if need_A:
            gA = _as(torch.mm(gb.t(), xd2).mul_(s), A.dtype)
        if need_x:
            w = layer.base_weight_native()
            if ctx.shared and ctx.merged:
                w_eff = lowrank_native(w, A_, B_, s, fifo, out=scratch(0, _weight_shape(layer), w))
                gx = grad_input_native(g2, w_eff, fifo)
            else:
                gx = grad_input_native(g2, w, fifo)
                if ctx.shared:
                    gx.addmm_(gb, A_, alpha=s)
            gx = _unflat(gx, gy)
        if need_xd:
            gxd = _unflat(torch.mm(gb, A_).mul_(s), gy)
        return gx, gxd, gA, gB, None, None, None


def lora_linear(layer, x: torch.Tensor, xd: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """y = x W0ᵀ + b + scale·(xd Aᵀ) Bᵀ, with xd = x when `xd` is None."""
    tokens = x.numel() // x.shape[-1]
    merged = xd is None and merged_is_cheaper(tokens, layer.in_features, layer.out_features, _needs_graph(x, A, B))
    return _LoRALinear.apply(x, xd, A, B, scale, layer, merged)


# ----- DoRA ------------------------------------------------------------------------------------------
def _row_scale(v: torch.Tensor, c: torch.Tensor, fifo: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """diag(c) V for V (out, in) given in native layout."""
    return torch.mul(v, c if fifo else c.unsqueeze(1), out=out)


class _DoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, xd, A, B, m, scale, layer):
        fifo = layer.fan_in_fan_out
        w = layer.base_weight_native()
        bias = layer.base_bias()
        shape = _weight_shape(layer)
        x2 = _flat(x)
        A_, B_, m_ = _as(A, x.dtype), _as(B, x.dtype), _as(m, x.dtype)
        v = lowrank_native(w, A_, B_, scale, fifo, out=scratch(0, shape, w))
        # ‖W0 + sBA‖ per output feature, treated as a constant (paper §4.3): no gradient.
        norm = torch.linalg.vector_norm(v, dim=0 if fifo else 1)
        c = m_ / norm
        if xd is None:
            y = linear_native(x2, _row_scale(v, c, fifo, out=scratch(1, shape, w)), bias, fifo)
            xa_t = torch.mm(A_, x2.t()) if B.requires_grad else None  # (x Aᵀ)ᵀ, see _LoRALinear
            ctx.save_for_backward(x2 if A.requires_grad else None, xa_t, A, B, m, norm, y if m.requires_grad else None)
        else:
            xd2 = _flat(xd)
            zd = linear_native(xd2, v, None, fifo)
            y = linear_native(x2, w, bias, fifo).addcmul_(zd, c).sub_(linear_native(xd2, w, None, fifo))
            xa_t = torch.mm(A_, xd2.t()) if B.requires_grad else None
            ctx.save_for_backward(xd2, xa_t, A, B, m, norm, zd)
        ctx.layer, ctx.scale, ctx.shared = layer, scale, xd is None
        return _unflat(y, x)

    @staticmethod
    def backward(ctx, gy):
        xin, xa_t, A, B, m, norm, saved = ctx.saved_tensors
        need_x, need_xd, need_A, need_B, need_m = ctx.needs_input_grad[:5]
        layer, s = ctx.layer, ctx.scale
        fifo = layer.fan_in_fan_out
        shape = _weight_shape(layer)
        g2 = _flat(gy)
        A_, B_, m_ = _as(A, g2.dtype), _as(B, g2.dtype), _as(m, g2.dtype)
        c = m_ / norm
        gx = gxd = gA = gB = gm = None
        if need_m:
            if ctx.shared:
                # z = x Vᵀ = (y - b) / c, hence ∂L/∂m = Σ_t g ⊙ z / n = Σ_t g ⊙ (y - b) / m.
                gy_sum = torch.linalg.vecdot(g2, saved, dim=0)
                bias = layer.base_bias()
                if bias is not None:
                    gy_sum = gy_sum - _as(bias, g2.dtype) * g2.sum(0)
                gm = gy_sum / m_
            else:
                gm = torch.linalg.vecdot(g2, saved, dim=0) / norm
            gm = _as(gm, m.dtype)
        # The adapter path sees the upstream gradient scaled per output feature by c = m/n;
        # folding c into the small factors avoids a pass over the (T x out) gradient.
        if need_B:
            gB = _as(torch.mm(xa_t, g2).mul_(c * s).t(), B.dtype)
        if need_A:
            gA = _as(torch.mm(torch.mm(g2, B_ * c.unsqueeze(1)).t(), xin).mul_(s), A.dtype)
        if need_x or need_xd:
            w = layer.base_weight_native()
            v = lowrank_native(w, A_, B_, s, fifo, out=scratch(0, shape, w))
            if ctx.shared:
                gx = grad_input_native(g2, _row_scale(v, c, fifo, out=scratch(1, shape, w)), fifo)
            else:
                if need_x:
                    gx = grad_input_native(g2, w, fifo)
                if need_xd:
                    gxd = grad_input_native(g2 * c, v, fifo).sub_(grad_input_native(g2, w, fifo))
                    gxd = _unflat(gxd, gy)
            if gx is not None:
                gx = _unflat(gx, gy)
        return gx, gxd, gA, gB, gm, None, None


def dora_linear(layer, x, xd, A, B, magnitude, scale) -> torch.Tensor:
    """DoRA forward with the detached row norm (see module docstring)."""
    return _DoRALinear.apply(x, xd, A, B, magnitude, scale, layer)


# ----- VeRA ------------------------------------------------------------------------------------------
def _vera_merged_native(w, lb, ld, A, B, fifo, out=None):
    """W + diag(λ_b) B diag(λ_d) A in native layout, as one fused GEMM: diag(λ_b) B diag(λ_d) = B ⊙ (λ_b ⊗ λ_d)."""
    return lowrank_native(w, A, B * ld * lb.unsqueeze(1), 1.0, fifo, out=out)


class _VeRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, xd, lam_b, lam_d, A, B, layer, merged):
        fifo = layer.fan_in_fan_out
        w = layer.base_weight_native()
        bias = layer.base_bias()
        x2 = _flat(x)
        xd2 = x2 if xd is None else _flat(xd)
        dt = x.dtype
        lb, ld, A_, B_ = _as(lam_b, dt), _as(lam_d, dt), _as(A, dt), _as(B, dt)
        kept = None
        if merged:
            keep = keep_merged_weight(x2.shape[0], layer.in_features, layer.out_features, A.shape[0])
            w_eff = _vera_merged_native(w, lb, ld, A_, B_, fifo, out=None if keep else scratch(0, _weight_shape(layer), w))
            kept = w_eff if keep else None
            y = linear_native(x2, w_eff, bias, fifo)
        else:
            u = torch.mm(xd2, A_.t()).mul_(ld)
            y = linear_native(x2, w, bias, fifo).addcmul_(torch.mm(u, B_.t()), lb)
        ctx.save_for_backward(xd2, lam_b, lam_d, A, B, kept)
        ctx.layer, ctx.merged, ctx.shared = layer, merged, xd is None
        return _unflat(y, x)

    @staticmethod
    def backward(ctx, gy):
        xd2, lam_b, lam_d, A, B, kept = ctx.saved_tensors
        need_x, need_xd, need_lb, need_ld = ctx.needs_input_grad[:4]
        layer = ctx.layer
        fifo = layer.fan_in_fan_out
        g2 = _flat(gy)
        dt = g2.dtype
        lb, ld, A_, B_ = _as(lam_b, dt), _as(lam_d, dt), _as(A, dt), _as(B, dt)
        gx = gxd = glb = gld = None
        tokens, out_f, in_f, r = g2.shape[0], B_.shape[0], A_.shape[1], A_.shape[0]
        if need_lb or need_ld:
            # Both gradients come from H = gᵀ x Aᵀ (out x r):
            #   ∂L/∂λ_b[o] = Σ_k H[o,k] B[o,k] λ_d[k],    ∂L/∂λ_d[k] = Σ_o H[o,k] B[o,k] λ_b[o].
            # H = gᵀ (x Aᵀ) costs T·r·(in+out), H = (gᵀ x) Aᵀ costs T·out·in + out·in·r: take the cheaper.
            if tokens * r * (in_f + out_f) <= out_f * in_f * (tokens + r):
                h = torch.mm(torch.mm(A_, xd2.t()), g2).t()
            else:
                h = torch.mm(torch.mm(g2.t(), xd2, out=scratch(1, (out_f, in_f), g2)), A_.t())
            hb = h * B_
            if need_lb:
                glb = _as(torch.mv(hb, ld), lam_b.dtype)
            if need_ld:
                gld = _as(torch.mv(hb.t(), lb), lam_d.dtype)
        if need_x or need_xd:
            w = layer.base_weight_native()
            if ctx.shared and ctx.merged:
                w_eff = kept if kept is not None else _vera_merged_native(
                    w, lb, ld, A_, B_, fifo, out=scratch(0, _weight_shape(layer), w))
                gx = grad_input_native(g2, w_eff, fifo)
            else:
                adapter_grad = torch.mm(torch.mm(g2 * lb, B_).mul_(ld), A_)
                if need_x:
                    gx = grad_input_native(g2, w, fifo)
                    if ctx.shared:
                        gx.add_(adapter_grad)
                if need_xd:
                    gxd = _unflat(adapter_grad, gy)
            if gx is not None:
                gx = _unflat(gx, gy)
        return gx, gxd, glb, gld, None, None, None, None


def vera_linear(layer, x, xd, lam_b, lam_d, A, B) -> torch.Tensor:
    """VeRA forward; A (r, in) and B (out, r) are the layer's slices of the shared projections."""
    tokens = x.numel() // x.shape[-1]
    merged = xd is None and merged_is_cheaper(tokens, layer.in_features, layer.out_features, _needs_graph(x, lam_b, lam_d))
    return _VeRALinear.apply(x, xd, lam_b, lam_d, A, B, layer, merged)
