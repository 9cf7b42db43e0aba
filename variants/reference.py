"""Plain reference forwards of the fused layers in `functional.py`: the math in a few lines each.

These are the equations as the papers (and loralib) write them, evaluated by ordinary
autograd ops in the dtype of the tensors given; they are slower and keep more memory
than the fused versions, which tests compare against them (outputs and gradients).
`xd` is the adapter's input drop(x); None means x itself (no dropout). W0 is (out, in).

  LoRA  (Hu et al. 2021, arXiv 2106.09685):        y = x W0ᵀ + b + s·(drop(x) Aᵀ) Bᵀ
  DoRA  (Liu et al. 2024, arXiv 2402.09353):       V = W0 + s·B A,  n = ‖V‖_row detached (§4.3),
                                                   y = x (m/n ⊙_row V)ᵀ + b
        with dropout, as PEFT:                     y = x W0ᵀ + b + (m/n) ⊙ (drop(x) Vᵀ) − drop(x) W0ᵀ
  VeRA  (Kopiczko et al. 2024, arXiv 2310.11454):  ΔW = Λ_b B Λ_d A,  y = x W0ᵀ + b + drop(x) ΔWᵀ
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _base(layer, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, layer.base_weight().to(x.dtype), _bias(layer, x))


def _bias(layer, x: torch.Tensor) -> torch.Tensor | None:
    b = layer.base_bias()
    return None if b is None else b.to(x.dtype)


def lora_reference(layer, x, xd, A, B, scale) -> torch.Tensor:
    xd = x if xd is None else xd
    return _base(layer, x) + scale * (xd @ A.t()) @ B.t()


def dora_reference(layer, x, xd, A, B, m, scale) -> torch.Tensor:
    w0 = layer.base_weight().to(x.dtype)
    v = w0 + scale * B @ A
    n = torch.linalg.vector_norm(v, dim=1).detach()
    if xd is None:
        return F.linear(x, (m / n).unsqueeze(1) * v, _bias(layer, x))
    return _base(layer, x) + (m / n) * (xd @ v.t()) - xd @ w0.t()


def vera_reference(layer, x, xd, lam_b, lam_d, A, B) -> torch.Tensor:
    xd = x if xd is None else xd
    delta = lam_b.unsqueeze(1) * B * lam_d @ A  # Λ_b B Λ_d A
    return _base(layer, x) + xd @ delta.t()
