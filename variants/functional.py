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

Equations (PyTorch layout, W0 is (out, in); docs/lora-scaling.md, dora.md, vera.md):
  LoRA  (Hu et al. 2021, 2106.09685):      y = x W0ᵀ + b + s·(drop(x) Aᵀ) Bᵀ
  DoRA  (Liu et al. 2024, 2402.09353):     V = W0 + s·BA,  n = ‖V‖_row (detached, §4.3),
                                          y = x (m/n ⊙_row V)ᵀ + b
        with dropout, as PEFT:             y = x W0ᵀ + b + (m/n) ⊙ (drop(x) Vᵀ) − drop(x) W0ᵀ
  VeRA  (Kopiczko et al. 2024, 2310.11454): y = x W0ᵀ + b + λ_b ⊙ ((λ_d ⊙ (drop(x) Aᵀ)) Bᵀ)

Over a half-precision base the adapter path computes in float32 by default (the layer's
`adapter_compute_dtype`, PEFT's autocast_adapter_dtype): the base GEMM stays in the base's
dtype, x is cast up for the low-rank path, the two outputs are added in float32 and the sum
rounded once. Those calls always take the factored order (a merged W_eff in bf16 would round
ΔW to bf16). `reference.py` writes each forward as a few plain autograd lines; the tests
compare outputs and gradients of these fused functions against them.

The base weight is read through `layer.base_weight_native()` in forward and read again in
backward rather than saved, so a quantized base stays quantized between the two passes,
and no (out x in) matrix per layer is kept alive for backward: W_eff is rebuilt (cost
out·in·r, small against the T·out·in GEMMs). The rebuilt matrices live in a per-thread
scratch buffer reused by every layer — a fresh (out x in) allocation per layer and pass
costs more than the GEMM that fills it (page faults of large allocations).
"""

from __future__ import annotations

import functools
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
    def forward(ctx, x, xd, A, B, scale, layer, merged, cdt):
        fifo = layer.fan_in_fan_out
        w = layer.base_weight_native()
        bias = layer.base_bias()
        x2 = _flat(x)
        xd2 = x2 if xd is None else _flat(xd)
        A_, B_ = _as(A, cdt), _as(B, cdt)
        # (x Aᵀ)ᵀ = A xᵀ, computed as an (r x T) product: GEMMs with a skinny *first* operand
        # run ~2x faster on CPU BLAS than with a skinny output width, here and for ∂L/∂B below.
        xa_t = torch.mm(A_, _as(xd2, cdt).t())
        if merged:
            w_eff = lowrank_native(w, A_, B_, scale, fifo, out=scratch(0, _weight_shape(layer), w))
            y = linear_native(x2, w_eff, bias, fifo)
        elif cdt == x.dtype:
            # in place: an out-of-place addmm would first copy the whole (T x out) output
            y = linear_native(x2, w, bias, fifo).addmm_(xa_t.t(), B_.t(), alpha=scale)
        else:
            # half-precision base, float32 adapter (PEFT's autocast_adapter_dtype): the base
            # output is added to the adapter's in float32 and the sum rounded once
            y = torch.addmm(_as(linear_native(x2, w, bias, fifo), cdt), xa_t.t(), B_.t(), alpha=scale).to(x.dtype)
        ctx.save_for_backward(xd2 if A.requires_grad else None, xa_t if B.requires_grad else None, A, B)
        ctx.layer, ctx.scale, ctx.merged, ctx.shared, ctx.cdt = layer, scale, merged, xd is None, cdt
        return _unflat(y, x)

    @staticmethod
    def backward(ctx, gy):
        xd2, xa_t, A, B = ctx.saved_tensors
        need_x, need_xd, need_A, need_B = ctx.needs_input_grad[:4]
        layer, s, cdt = ctx.layer, ctx.scale, ctx.cdt
        fifo = layer.fan_in_fan_out
        g2 = _flat(gy)
        gc = _as(g2, cdt)
        A_, B_ = _as(A, cdt), _as(B, cdt)
        gx = gxd = gA = gB = None
        factored_input_grad = need_xd or (need_x and ctx.shared and not ctx.merged)
        gb = torch.mm(gc, B_) if (need_A or factored_input_grad) else None
        if need_B:
            gB = _as(torch.mm(xa_t, gc).mul_(s).t(), B.dtype)
        if need_A:
            gA = _as(torch.mm(gb.t(), _as(xd2, cdt)).mul_(s), A.dtype)
        if need_x:
            w = layer.base_weight_native()
            if ctx.shared and ctx.merged:
                w_eff = lowrank_native(w, A_, B_, s, fifo, out=scratch(0, _weight_shape(layer), w))
                gx = grad_input_native(g2, w_eff, fifo)
            else:
                gx = grad_input_native(g2, w, fifo)
                if ctx.shared:
                    if cdt == gx.dtype:
                        gx.addmm_(gb, A_, alpha=s)
                    else:
                        gx.add_(torch.mm(gb, A_).mul_(s).to(gx.dtype))
            gx = _unflat(gx, gy)
        if need_xd:
            gxd = _unflat(_as(torch.mm(gb, A_).mul_(s), gy.dtype), gy)
        return gx, gxd, gA, gB, None, None, None, None


def lora_linear(layer, x: torch.Tensor, xd: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """y = x W0ᵀ + b + scale·(xd Aᵀ) Bᵀ, with xd = x when `xd` is None (reference: `reference.lora_reference`)."""
    cdt = layer.adapter_compute_dtype(x.dtype)
    tokens = x.numel() // x.shape[-1]
    # W_eff in x's dtype would round ΔW to it: merged only when the adapter computes in x's dtype
    merged = xd is None and cdt == x.dtype and merged_is_cheaper(
        tokens, layer.in_features, layer.out_features, _needs_graph(x, A, B))
    return _LoRALinear.apply(x, xd, A, B, scale, layer, merged, cdt)


# ----- DoRA ------------------------------------------------------------------------------------------
def _row_scale(v: torch.Tensor, c: torch.Tensor, fifo: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """diag(c) V for V (out, in) given in native layout."""
    return torch.mul(v, c if fifo else c.unsqueeze(1), out=out)


def _direction_native(layer, w, A_, B_, scale, fifo, slot: int = 0) -> torch.Tensor:
    """V = W0 + s·B A in native layout and in A_'s dtype (W0 cast up into the scratch buffer if needed)."""
    shape = _weight_shape(layer)
    if w.dtype == A_.dtype:
        return lowrank_native(w, A_, B_, scale, fifo, out=scratch(slot, shape, w))
    v = scratch(slot, shape, A_).copy_(w)
    return v.addmm_(A_.t(), B_.t(), alpha=scale) if fifo else v.addmm_(B_, A_, alpha=scale)


# Output features whose c = m/n is below this recover z = (y − b)/c too inexactly (y − b has lost
# the digits of b): their z is recomputed as x V_iᵀ in backward instead (exact at m = 0).
DORA_RECOMPUTE_BELOW = 2.0 ** -6


def _dora_magnitude_grad(layer, g, y, x, A_, B_, scale, c, norm) -> torch.Tensor:
    """Σ_t g ⊙ z / n from the saved output y = b + c ⊙ z: z = (y − b)/c where c is large enough,
    z = x V_iᵀ recomputed for the few features where it is not (no division by a tiny m)."""
    bias = layer.base_bias()
    yb = y if bias is None else y - bias.to(y.dtype)
    small = c.abs() < DORA_RECOMPUTE_BELOW
    gm = torch.linalg.vecdot(g, yb, dim=0) / torch.where(small, torch.ones_like(c), c) / norm
    if bool(small.any()):
        cols = small.nonzero().squeeze(1)
        v = _direction_native(layer, layer.base_weight_native(), A_, B_, scale, layer.fan_in_fan_out, slot=1)
        v_rows = v[:, cols].t() if layer.fan_in_fan_out else v[cols]  # (k, in)
        z = torch.mm(_as(x, v_rows.dtype), v_rows.t())                # (T, k)
        gm[cols] = torch.linalg.vecdot(g[:, cols], z, dim=0) / norm[cols]
    return gm


class _DoRALinear(torch.autograd.Function):
    """DoRA with ‖V‖ detached. Without dropout, z = x Vᵀ and y = b + c ⊙ z (c = m/n), evaluated
    as  y = u + (c − 1) ⊙ (u − b)  from the one GEMM  u = x Vᵀ + b  (PEFT's form): at init
    c = 1 and V = W0, so y is the base output bit for bit. ∂L/∂m = Σ_t g ⊙ z / n. The forward
    saves y, which the following layers usually keep anyway (saving z as well would hold a
    second T x out tensor per layer), and backward recovers z = (y − b)/c, except for the
    features with c < DORA_RECOMPUTE_BELOW (m = 0 included), whose z it recomputes exactly."""

    @staticmethod
    def forward(ctx, x, xd, A, B, m, scale, layer, cdt):
        fifo = layer.fan_in_fan_out
        w = layer.base_weight_native()
        bias = layer.base_bias()
        x2 = _flat(x)
        A_, B_, m_ = _as(A, cdt), _as(B, cdt), _as(m, cdt)
        v = _direction_native(layer, w, A_, B_, scale, fifo)
        # ‖W0 + sBA‖ per output feature, treated as a constant (paper §4.3): no gradient.
        norm = torch.linalg.vector_norm(v, dim=0 if fifo else 1)
        c = m_ / norm
        if xd is None:
            xin = x2
            xa_t = torch.mm(A_, _as(x2, cdt).t()) if (B.requires_grad or cdt != x.dtype) else None  # see _LoRALinear
            if cdt == x.dtype:
                u = linear_native(x2, v, bias, fifo)
                y = u.mul_(c) if bias is None else torch.addcmul(u, u - bias, c - 1)
                z = y  # backward recovers z from y (see the class docstring)
            else:
                # half-precision base, float32 adapter: z = (x W0ᵀ)₁₆ + s·(x Aᵀ) Bᵀ in float32,
                # y = u + (c − 1) ⊙ (u − b) + c·s·(x Aᵀ) Bᵀ rounded once (as PEFT)
                u = linear_native(x2, w, bias, fifo)
                z = _as(u if bias is None else u - bias, cdt)
                lora = torch.mm(xa_t.t(), B_.t())
                y = torch.addcmul(_as(u, cdt), z, c - 1).addcmul_(lora, c * scale).to(x.dtype)
                z.add_(lora, alpha=scale)
            saved = z if m.requires_grad else None
        else:
            xin = _flat(xd)
            xdc = _as(xin, cdt)
            zd = linear_native(xdc, v, None, fifo)
            base_d = linear_native(xdc, _as(w, cdt), None, fifo)
            y = _as(linear_native(x2, w, bias, fifo), cdt).addcmul_(zd, c).sub_(base_d).to(x.dtype)
            xa_t = torch.mm(A_, xdc.t()) if B.requires_grad else None
            saved = zd
        z_from_y = xd is None and cdt == x.dtype
        keep_x = A.requires_grad or (z_from_y and m.requires_grad)
        ctx.save_for_backward(xin if keep_x else None, xa_t if B.requires_grad else None, A, B, m, norm, saved)
        ctx.layer, ctx.scale, ctx.shared, ctx.cdt, ctx.z_from_y = layer, scale, xd is None, cdt, z_from_y
        return _unflat(y, x)

    @staticmethod
    def backward(ctx, gy):
        xin, xa_t, A, B, m, norm, saved = ctx.saved_tensors
        need_x, need_xd, need_A, need_B, need_m = ctx.needs_input_grad[:5]
        layer, s, cdt = ctx.layer, ctx.scale, ctx.cdt
        fifo = layer.fan_in_fan_out
        shape = _weight_shape(layer)
        g2 = _flat(gy)
        gc = _as(g2, cdt)
        A_, B_, m_ = _as(A, cdt), _as(B, cdt), _as(m, cdt)
        c = m_ / norm
        gx = gxd = gA = gB = gm = None
        if need_m:
            # y = b + (m/n) ⊙ z with z = x Vᵀ (or drop(x) Vᵀ): ∂L/∂m = Σ_t g ⊙ z / n
            if ctx.z_from_y:
                gm = _as(_dora_magnitude_grad(layer, gc, saved, xin, A_, B_, s, c, norm), m.dtype)
            else:
                gm = _as(torch.linalg.vecdot(gc, saved, dim=0) / norm, m.dtype)
        # The adapter path sees the upstream gradient scaled per output feature by c = m/n;
        # folding c into the small factors avoids a pass over the (T x out) gradient.
        if need_B:
            gB = _as(torch.mm(xa_t, gc).mul_(c * s).t(), B.dtype)
        gbc = torch.mm(gc, B_ * c.unsqueeze(1)) if (need_A or (need_x and ctx.shared and cdt != g2.dtype)) else None
        if need_A:
            gA = _as(torch.mm(gbc.t(), _as(xin, cdt)).mul_(s), A.dtype)
        if need_x or need_xd:
            w = layer.base_weight_native()
            if ctx.shared and cdt == g2.dtype:
                v = _direction_native(layer, w, A_, B_, s, fifo)
                gx = grad_input_native(g2, _row_scale(v, c, fifo, out=scratch(1, shape, w)), fifo)
            elif ctx.shared:
                # through the half-precision base GEMM and the float32 low-rank path, as the forward
                gx = grad_input_native((gc * c).to(g2.dtype), w, fifo).add_(torch.mm(gbc, A_).mul_(s).to(g2.dtype))
            else:
                if need_x:
                    gx = grad_input_native(g2, w, fifo)
                if need_xd:
                    v = _direction_native(layer, w, A_, B_, s, fifo)
                    gxd = grad_input_native(gc * c, v, fifo).sub_(grad_input_native(gc, _as(w, cdt), fifo))
                    gxd = _unflat(_as(gxd, gy.dtype), gy)
            if gx is not None:
                gx = _unflat(gx, gy)
        return gx, gxd, gA, gB, gm, None, None, None


def dora_linear(layer, x, xd, A, B, magnitude, scale) -> torch.Tensor:
    """DoRA forward with the detached row norm (see module docstring; reference: `reference.dora_reference`)."""
    return _DoRALinear.apply(x, xd, A, B, magnitude, scale, layer, layer.adapter_compute_dtype(x.dtype))


# ----- VeRA ------------------------------------------------------------------------------------------
# Scratch slots of the VeRA path (0 and 1 are shared with LoRA/DoRA: W_eff and gᵀx).
_VERA_SCALED_B, _VERA_H = 2, 3


def _vera_scaled_b(B, lb, ld) -> torch.Tensor:
    """Λ_b B Λ_d = B ⊙ (λ_b ⊗ λ_d) (out x r), into a scratch buffer: no (out x r) allocation per call."""
    return torch.mul(B, ld, out=scratch(_VERA_SCALED_B, tuple(B.shape), B)).mul_(lb.unsqueeze(1))


def _vera_merged_native(w, lb, ld, A, B, fifo, out=None):
    """W + diag(λ_b) B diag(λ_d) A in native layout, as one fused GEMM: diag(λ_b) B diag(λ_d) = B ⊙ (λ_b ⊗ λ_d)."""
    return lowrank_native(w, A, _vera_scaled_b(B, lb, ld), 1.0, fifo, out=out)


FACTORED, MERGED, MERGED_KEPT = "factored", "merged", "merged_kept"


@functools.lru_cache(maxsize=512)  # a pure function of shapes, asked on every call
def vera_plan(tokens: int, in_features: int, out_features: int, rank: int, with_backward: bool) -> str:
    """How a VeRA layer evaluates one call; costs in multiply-adds beyond the base GEMMs, divided by r.

    factored     y = y0 + λ_b ⊙ ((λ_d ⊙ x Aᵀ) Bᵀ), keeping x Aᵀ and (λ_d ⊙ x Aᵀ) Bᵀ for backward as
                 PEFT's autograd does: forward T·(in+out), backward T·(in+out) (∂λ from the kept products,
                 ∂x = ((g ⊙ λ_b) B ⊙ λ_d) A).
    merged_kept  W_eff = W0 + Λ_b B Λ_d A (out·in) kept for ∂x = g W_eff; forward forms x Aᵀ (kept instead
                 of x), backward H = gᵀ (x Aᵀ) for ∂λ (T·(in+out)). Only where W_eff is no larger than what
                 `factored` keeps, T·(r+out).
    merged       the same, W_eff rebuilt in backward instead of kept (out·in more).
    """
    if not with_backward:
        return MERGED if out_features * in_features < tokens * (in_features + out_features) else FACTORED
    costs = {FACTORED: 2 * tokens * (in_features + out_features),
             MERGED: 2 * out_features * in_features + tokens * (in_features + out_features)}
    if out_features * in_features <= tokens * (rank + out_features):
        costs[MERGED_KEPT] = out_features * in_features + tokens * (in_features + out_features)
    return min(costs, key=costs.get)


@functools.lru_cache(maxsize=512)  # a pure function of shapes, asked on every call
def lambda_grad_route(tokens: int, in_features: int, out_features: int, rank: int, projection_shared: bool) -> str:
    """How the merged plans' backward forms H = gᵀ x Aᵀ (out x r), which gives both λ gradients.

    "projected"  H = gᵀ (x Aᵀ): T·r·out, plus T·r·in for x Aᵀ unless another layer with the same input
                 (q/k/v, gate/up) computes it too (`projection_shared`): the product is then computed once
                 (`projected_input`) and this layer pays only T·r·out.
    "gram"       H = (gᵀ x) Aᵀ: T·out·in + out·in·r, cheaper for a narrow output read alone.
    """
    projected = tokens * rank * (out_features + (0 if projection_shared else in_features))
    return "projected" if projected <= out_features * in_features * (tokens + rank) else "gram"


def _projection_key(x2: torch.Tensor, A_: torch.Tensor) -> tuple:
    return (x2.data_ptr(), x2.shape, x2.stride(), x2.dtype, x2._version,
            A_.data_ptr(), A_.shape, A_.stride(), A_.dtype, A_._version)


def projection_cached(A_: torch.Tensor, x2: torch.Tensor) -> bool:
    """Whether `projected_input(A_, x2)` would return a kept product (no multiply)."""
    last = getattr(_SCRATCH, "projected", None)
    return last is not None and not x2.is_inference() and last[0] == _projection_key(x2, A_)


def projected_input(A_: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """A xᵀ (r x T) for VeRA. Layers that read the same input through the same slice of the shared
    A (q/k/v, gate/up) get it computed once: the last product is kept per thread, keyed by both
    operands' address, layout, dtype and version counter; the entry holds both operands, so their
    memory cannot be reused by another tensor while it is kept. The result must not be modified."""
    if x2.is_inference() or A_.is_inference():  # no version counter to key on: not kept
        return torch.mm(A_, x2.t())
    key = _projection_key(x2, A_)
    last = getattr(_SCRATCH, "projected", None)
    if last is not None and last[0] == key:
        return last[3]
    xa_t = torch.mm(A_, x2.t())
    _SCRATCH.projected = (key, x2, A_, xa_t)
    return xa_t


def input_read_before(x: torch.Tensor) -> bool:
    """Whether the previous VeRA call (this thread) read this same input: the later layers of q/k/v and
    gate/up. Recorded by address, layout and version only (holds no reference); a false match (memory
    reused by another tensor of the same layout) only changes a cost choice, never a result."""
    key = (x.data_ptr(), x.shape, x.stride(), x.dtype, x._version)
    seen = getattr(_SCRATCH, "vera_last_input", None) == key
    _SCRATCH.vera_last_input = key
    return seen


class _VeRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, xd, lam_b, lam_d, A, B, layer, plan, cdt, shared_input):
        fifo = layer.fan_in_fan_out
        w = layer.base_weight_native()
        bias = layer.base_bias()
        x2 = _flat(x)
        xd2 = x2 if xd is None else _flat(xd)
        lb, ld, A_, B_ = _as(lam_b, cdt), _as(lam_d, cdt), _as(A, cdt), _as(B, cdt)
        kept = xa = p = None
        if plan == FACTORED:
            xa = projected_input(A_, _as(xd2, cdt)).t()
            p = torch.mm(xa * ld, B_.t())
            y = _as(linear_native(x2, w, bias, fifo), cdt).addcmul_(p, lb).to(x.dtype)
        else:
            keep = plan == MERGED_KEPT
            w_eff = _vera_merged_native(w, lb, ld, A_, B_, fifo, out=None if keep else scratch(0, _weight_shape(layer), w))
            kept = w_eff if keep else None
            y = linear_native(x2, w_eff, bias, fifo)
            if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
                # x Aᵀ for H is formed now, while x is still in cache, and kept (T x r) instead of x
                # (T x in); the first layer of a group, when H = (gᵀ x) Aᵀ is cheaper for it alone,
                # keeps x and decides in backward (see `lambda_grad_route`).
                shared = shared_input or projection_cached(A_, xd2)
                if lambda_grad_route(x2.shape[0], A_.shape[1], B_.shape[0], A_.shape[0], shared) == "projected":
                    xa = projected_input(A_, xd2).t()
        ctx.save_for_backward(xd2 if xa is None else None, lam_b, lam_d, A, B, kept, xa, p)
        ctx.layer, ctx.plan, ctx.shared, ctx.cdt, ctx.shared_input = layer, plan, xd is None, cdt, shared_input
        return _unflat(y, x)

    @staticmethod
    def backward(ctx, gy):
        xd2, lam_b, lam_d, A, B, kept, xa, p = ctx.saved_tensors
        need_x, need_xd, need_lb, need_ld = ctx.needs_input_grad[:4]
        layer, cdt = ctx.layer, ctx.cdt
        fifo = layer.fan_in_fan_out
        g2 = _flat(gy)
        gc = _as(g2, cdt)
        lb, ld, A_, B_ = _as(lam_b, cdt), _as(lam_d, cdt), _as(A, cdt), _as(B, cdt)
        tokens, out_f, in_f, r = g2.shape[0], B_.shape[0], A_.shape[1], A_.shape[0]
        gx = gxd = glb = gld = None
        if ctx.plan == FACTORED:
            # y = y0 + λ_b ⊙ p,  p = (λ_d ⊙ xa) Bᵀ,  xa = x Aᵀ;  gv = ∂L/∂(λ_d ⊙ xa) = (g ⊙ λ_b) B,
            # with λ_b folded into whichever of g (T x out) and B (out x r) is smaller
            if tokens > r:
                gv = torch.mm(gc, torch.mul(B_, lb.unsqueeze(1), out=scratch(_VERA_SCALED_B, (out_f, r), B_)))
            else:
                gv = torch.mm(gc * lb, B_)
            if need_lb:
                glb = _as(torch.linalg.vecdot(gc, p, dim=0), lam_b.dtype)
            if need_ld:
                gld = _as(torch.linalg.vecdot(gv, xa, dim=0), lam_d.dtype)
            if need_x or need_xd:
                gv.mul_(ld)
                if need_x:
                    gx = grad_input_native(g2, layer.base_weight_native(), fifo)
                    if ctx.shared and cdt == gx.dtype:
                        gx.addmm_(gv, A_)  # in place: no (T x in) temporary and no extra pass
                    elif ctx.shared:
                        gx.add_(torch.mm(gv, A_).to(gx.dtype))
                    gx = _unflat(gx, gy)
                if need_xd:
                    gxd = _unflat(_as(torch.mm(gv, A_), gy.dtype), gy)
            return gx, gxd, glb, gld, None, None, None, None, None, None
        if need_lb or need_ld:
            # Both gradients come from H = gᵀ x Aᵀ (out x r):
            #   ∂L/∂λ_b[o] = Σ_k H[o,k] B[o,k] λ_d[k],    ∂L/∂λ_d[k] = Σ_o H[o,k] B[o,k] λ_b[o].
            h = scratch(_VERA_H, (out_f, r), gc)
            if xa is not None:  # formed in forward
                torch.mm(gc.t(), xa, out=h)
            # x Aᵀ is shared when another layer read this input (the flag) or has already formed it
            elif lambda_grad_route(tokens, in_f, out_f, r, ctx.shared_input or projection_cached(A_, xd2)) == "projected":
                torch.mm(gc.t(), projected_input(A_, xd2).t(), out=h)
            else:
                torch.mm(torch.mm(gc.t(), xd2, out=scratch(1, (out_f, in_f), gc)), A_.t(), out=h)
            hb = h.mul_(B_)
            if need_lb:
                glb = _as(torch.mv(hb, ld), lam_b.dtype)
            if need_ld:
                gld = _as(torch.mv(hb.t(), lb), lam_d.dtype)
        if need_x:
            w_eff = kept if kept is not None else _vera_merged_native(
                layer.base_weight_native(), lb, ld, A_, B_, fifo, out=scratch(0, _weight_shape(layer), g2))
            gx = _unflat(grad_input_native(g2, w_eff, fifo), gy)
        return gx, gxd, glb, gld, None, None, None, None, None, None


def vera_linear(layer, x, xd, lam_b, lam_d, A, B) -> torch.Tensor:
    """VeRA forward; A (r, in) and B (out, r) are the layer's slices of the shared projections
    (reference: `reference.vera_reference`)."""
    cdt = layer.adapter_compute_dtype(x.dtype)
    plan = FACTORED
    with_backward = _needs_graph(x, lam_b, lam_d)
    if xd is None and cdt == x.dtype:  # a merged W_eff in x's dtype would round ΔW to it
        tokens = x.numel() // x.shape[-1]
        plan = vera_plan(tokens, layer.in_features, layer.out_features, A.shape[0], with_backward)
    # only the backward uses it (and inference tensors, which have no version counter, have no backward)
    shared_input = xd is None and with_backward and input_read_before(x)
    return _VeRALinear.apply(x, xd, lam_b, lam_d, A, B, layer, plan, cdt, shared_input)
