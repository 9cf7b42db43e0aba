"""PiSSA — Meng et al. 2024, "PiSSA: Principal Singular Values and Singular Vectors Adaptation of
Large Language Models", arXiv 2404.02948 (§3, Eq. 2-4). Details: docs/init-family.md.

The adapter starts at the principal rank-r part of W0 and the base keeps the rest:

    U S Vᵀ = svd(W0),  S_r' = S[:r] / s,
    A0 = diag(√S_r') V_rᵀ  (r x in),   B0 = U_r diag(√S_r')  (out x r)   ⇒  s·B0A0 = U_r S_r V_rᵀ
    W_res = W0 − s·B0A0   (written into the base; init_base.RewritingInit)

The paper takes alpha = r (s = 1); dividing S by s, as PEFT 0.21.2 does (tuners/lora/layer.py:429-467),
makes the init exact for any alpha. `pissa_niter` K > 0 replaces the exact SVD by Halko's randomized
one, `torch.svd_lowrank(W, q=r, niter=K)` as PEFT's "pissa_niter_K"; its draws are seeded per
layer (`pissa_seed` + the layer's index in target order) under a forked RNG, where PEFT draws from
the global RNG (so PEFT's own result cannot be reproduced at load; ours is saved with the adapter).
Computed in fp32 (PEFT refuses other dtypes; an fp64 base is computed in fp64 here). GPT-2's
Conv1D is handled through the (out, in) view. A rank above the layer's (r > min(out, in)) is a
ValueError naming the layer, r and its shape; PEFT accepts it and saves an adapter it cannot reload.
"""

from __future__ import annotations

import torch

from .init_base import RewritingInit, compute_dtype
from .parts import Option, register


def pissa_factors(weight: torch.Tensor, r: int, scale: float, niter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0, B0) of PiSSA for an (out, in) weight, PEFT's op order (layer.py:439-461)."""
    if niter == 0:
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        ur, sr, vhr = u[:, :r], s[:r], vh[:r]
    else:
        ur, sr, v = torch.svd_lowrank(weight, r, niter=niter)
        vhr = v.t()
    sr = sr / scale
    a = torch.diag(torch.sqrt(sr)) @ vhr
    b = ur @ torch.diag(torch.sqrt(sr))
    return a, b


@register
class PiSSAInit(RewritingInit):
    name = "pissa"
    idea = "start from W0's top-r singular triplets; the base keeps the residual"
    idea_zh = "以 W0 的前 r 个奇异三元组初始化适配器，基座保留残差"
    options = {
        "pissa_niter": Option(0, int, lambda v: v >= 0, ">= 0",
                              "0: exact SVD; K > 0: randomized SVD with K subspace iterations"),
        "pissa_seed": Option(0, int, lambda v: v >= 0, ">= 0",
                             "seed of the randomized SVD (plus the layer's index), drawn under a forked RNG"),
    }

    def layer_factors(self, name, layer, index):
        if self.opts.pissa_niter:
            torch.manual_seed(self.opts.pissa_seed + index)  # inside configure's fork_rng
        weight = layer.base_weight().to(compute_dtype(layer))
        return pissa_factors(weight, layer.r, layer.scale, self.opts.pissa_niter)
