"""CorDA — Yang et al. 2024, "CorDA: Context-Oriented Decomposition Adaptation of Large Language
Models for Task-Aware Parameter-Efficient Fine-tuning", arXiv 2406.05223 (§3.2, Eq. 3-5).

The weight is decomposed in the context of its inputs: with C the covariance of a layer's inputs
over the calibration sequences,

    C = (1/N) Σ_seq X̂ᵀX̂,   X̂ = X / |max X|                   (one sequence X: tokens x in)
    C' = C + λ·mean(diag C)·I,  λ = 0.01, doubled until ‖C'C'⁻¹ − I‖_F < 0.05
    U S Vhᵀ = svd(W C'),   V = (Vh C'⁻¹)ᵀ                    ⇒  W = U S Vᵀ  (V not orthonormal)
    ipm: the r largest triplets, kpm: the r smallest;  S ← S/s
    A = diag(√S) Vᵀ (r x in),  B = U diag(√S) (out x r),  W_res = W − s·B A

so the adapter starts at the components that matter most (ipm: instruction-previewed) or least
(kpm: knowledge-preserved) for the inputs, and the model equals the base at step 0.

As PEFT 0.21.2 (`peft/tuners/lora/corda.py`, `LoraLayer.corda_init`), each sequence is one
forward: for every row of every calibration batch, its attended tokens (attention_mask = 1) as one
batch-1 forward with positions 0..T−1 (PEFT's hook needs batch size 1; padding would otherwise
enter the covariance). Layers that see the same input (q/k/v, gate/up) share one covariance and
one damped inverse: the numbers are bitwise those PEFT computes once per layer, with a third of
the memory and inverses.

Our `kpm` is the smallest components of the covariance of the *training* batches (issue 13 allows
no other data), not the paper's knowledge-preserving mode, which takes the covariance of
world-knowledge QA data (docs/init-data-aware.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .init_base import DataInit, RewritingInit
from .parts import Option, register

CORDA_METHODS = ("ipm", "kpm")


def sequences(batches: Sequence[Mapping[str, torch.Tensor]]) -> list[torch.Tensor]:
    """Every row of every batch as one (1, T_i) sequence of its attended tokens."""
    out = []
    for batch in batches:
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        for i in range(ids.shape[0]):
            row = ids[i] if mask is None else ids[i][mask[i].bool()]
            if row.numel():
                out.append(row.unsqueeze(0))
    return out


@torch.no_grad()
def covariances(forward: Callable[[torch.Tensor], Any], modules: Mapping[str, nn.Module],
                seqs: Sequence[torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(covariance per group leader, layer -> its group leader) of the inputs of `modules`.

    `forward(ids)` runs the base function on one (1, T) sequence. Layers whose input is the same
    tensor in the first forward form a group (its first layer in module order leads); every later
    forward checks that this still holds.
    """
    if not seqs:
        raise ValueError("CorDA needs at least one calibration sequence with attended tokens, got none")
    names = list(modules)
    inputs: dict[str, torch.Tensor] = {}

    def recorder(name):
        def hook(_module, args, _output):
            inputs[name] = args[0]
        return hook

    sums: dict[str, torch.Tensor] = {}
    leader: dict[str, str] = {}
    handles = [modules[n].register_forward_hook(recorder(n)) for n in names]
    try:
        for index, seq in enumerate(seqs):
            inputs.clear()
            forward(seq)
            missing = [n for n in names if n not in inputs]
            if missing:
                raise ValueError(f"CorDA: the calibration forward never ran the layers {missing[:5]}")
            if index == 0:
                firsts: dict[int, str] = {}
                for n in names:
                    leader[n] = firsts.setdefault(id(inputs[n]), n)
            for n in names:
                if inputs[n] is not inputs[leader[n]]:
                    raise RuntimeError(f"CorDA: {n} and {leader[n]} shared an input in the first forward, "
                                       "but not in a later one")
            for n in names:
                if leader[n] != n:
                    continue
                x = inputs[n].detach().squeeze(0).float()
                x = x / torch.max(x).abs()  # PEFT (and iboing/CorDA): max of the values, then abs
                if torch.isnan(x).any() or torch.isinf(x).any():
                    raise ValueError(f"CorDA: the input of {n} is not finite after scaling by its maximum "
                                     "(an all-zero input?)")
                cov = x.t().matmul(x)
                sums[n] = cov if n not in sums else sums[n].add_(cov)
            inputs.clear()
    finally:
        for h in handles:
            h.remove()
    count = len(seqs)
    return {n: c / count for n, c in sums.items()}, leader


@torch.no_grad()
def damped_inverse(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(C', C'⁻¹, λ): C' = C + λ·mean(diag C)·I with λ = 0.01·2^k, the first k with ‖C'C'⁻¹ − I‖_F < 0.05.

    At most 64 doublings (λ ~ 1e17, far past any covariance PEFT's unbounded loop accepts); a
    covariance that still fails (non-finite values) raises.
    """
    cov = cov.float()
    eye = torch.eye(cov.size(0), device=cov.device)
    damp = 0.01
    for _ in range(64):
        compensate = torch.diag(torch.ones(cov.size(0), device=cov.device) * torch.mean(torch.diag(cov)) * damp)
        fixed = cov + compensate
        inverse = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inverse, eye).item() < 0.05:
            return fixed, inverse, damp
        damp *= 2
    raise ValueError(f"CorDA: the input covariance cannot be inverted even with damping {damp:g}·mean(diag C)")


@torch.no_grad()
def corda_factors(weight: torch.Tensor, fixed_cov: torch.Tensor, cov_inverse: torch.Tensor, r: int, scale: float,
                  method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of CorDA for one (out, in) weight, given its input's damped covariance and inverse."""
    if method not in CORDA_METHODS:
        raise ValueError(f"corda_method must be one of {', '.join(CORDA_METHODS)}, got {method!r}")
    w = weight.float() @ fixed_cov
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    v = (vh @ cov_inverse).transpose(0, 1)
    keep = slice(None, r) if method == "ipm" else slice(-r, None)
    u, s, v = u[:, keep].clone(), s[keep].clone(), v[:, keep].clone()
    s /= scale
    a = v.t().mul(s.sqrt().view(-1, 1)).contiguous()
    b = u.mul(s.sqrt()).contiguous()
    return a, b


# ----- the init part ------------------------------------------------------------------------------------
@register
class CordaInit(DataInit, RewritingInit):
    name = "corda"
    idea = "SVD of W times the covariance of its inputs on training batches; the base keeps the residual"
    idea_zh = "对 W 乘以训练批次输入协方差后做 SVD 初始化适配器，基座保留残差"
    options = {
        **DataInit.options,
        "corda_method": Option("ipm", str, lambda v: v in CORDA_METHODS, " or ".join(CORDA_METHODS),
                               "ipm: the r largest context-weighted components; kpm: the r smallest"),
    }

    def __init__(self, spec):
        super().__init__(spec)
        self.groups = 0

    def check_batches(self, adapted, batches) -> None:
        super().check_batches(adapted, batches)
        if not sequences(batches):
            raise ValueError("init=corda: the calibration batches have no attended tokens (attention_mask is all 0)")

    def compute_factors(self, adapted, batches, loss_fn):
        model = adapted.model
        model.eval()  # as PEFT's calib_cov_distribution (the scope restores the modes)
        covs, leader = covariances(lambda ids: model(input_ids=ids), adapted.layers, sequences(batches))
        self.groups = len(covs)
        inverses = {n: damped_inverse(c) for n, c in covs.items()}
        covs.clear()
        factors = {}
        for name, layer in adapted.layers.items():
            fixed, inverse, _ = inverses[leader[name]]
            factors[name] = corda_factors(layer.base_weight().detach(), fixed, inverse, layer.r, layer.scale,
                                          self.opts.corda_method)
        return factors

    def calibration_summary(self) -> dict[str, Any]:
        return {"covariances": self.groups}
