"""4-bit base weights through bitsandbytes (QLoRA's storage), and their exact byte accounting.

QLoRA — Dettmers et al. 2023, arXiv 2305.14314 — stores each frozen weight in 4-bit
NormalFloat (NF4: 16 levels at the quantiles of N(0,1), normalised to [-1, 1]) with one
absmax constant per block of `blocksize` (64) weights. Double quantization (DQ) quantizes
those fp32 constants again to 8 bits, in blocks of 256, with one fp32 constant per block
and an offset (their mean). Bits per parameter:

    4                              packed codes (two per byte)
  + 32 / blocksize                 fp32 absmax per block            (no DQ: 0.5 at blocksize 64)
  or 8 / blocksize                 8-bit absmax per block           (DQ)
  + 32 / (256·blocksize)           fp32 second-level absmax         (DQ)
  = 4.127 bits at blocksize 64 with DQ (the paper's "≈0.127 bit overhead"),
    plus two small code tables (16 and 256 fp32 values) per tensor.

`quantized_bytes(n, ...)` is this formula; `state_bytes` counts the real tensors, and a
test checks that the two agree. bitsandbytes is imported lazily: importing it costs ~6 s.
"""

from __future__ import annotations

import math

import torch

NESTED_BLOCKSIZE = 256  # bitsandbytes' block size for the second-level (double) quantization


def bnb_functional():
    import bitsandbytes.functional as bnbf

    return bnbf


def quantize_weight(weight: torch.Tensor, quant_type: str = "nf4", double_quant: bool = True,
                    blocksize: int = 64):
    """(packed uint8 codes, QuantState) of a weight; the state knows its shape and dtype."""
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be nf4 or fp4, got {quant_type!r}")
    if weight.is_meta:
        # bitsandbytes caches its double-quant code table on the device of its first call: a meta
        # table would break every later quantization in the process
        raise ValueError("cannot quantize a weight on the meta device (it has no values); build a 4-bit base "
                         "from real weights")
    return bnb_functional().quantize_4bit(weight.detach().contiguous(), blocksize=blocksize,
                                          compress_statistics=double_quant, quant_type=quant_type)


def dequantize_weight(packed: torch.Tensor, state) -> torch.Tensor:
    return bnb_functional().dequantize_4bit(packed, state)


def state_bytes(packed: torch.Tensor, state) -> int:
    """Bytes of the codes plus every tensor of the quantization state (the real storage)."""
    total = packed.numel() * packed.element_size()
    total += state.absmax.numel() * state.absmax.element_size()
    total += state.code.numel() * state.code.element_size()
    if state.nested:
        s2 = state.state2
        total += s2.absmax.numel() * s2.absmax.element_size() + s2.code.numel() * s2.code.element_size()
        total += state.offset.numel() * state.offset.element_size()
    return total


def quantized_bytes(n_params: int, blocksize: int = 64, double_quant: bool = True) -> float:
    """Bytes that `n_params` weights take in 4-bit storage, from the formula in the module docstring."""
    blocks = math.ceil(n_params / blocksize)
    codes = math.ceil(n_params / 2)
    code_table = 16 * 4
    if not double_quant:
        return codes + 4 * blocks + code_table
    nested_blocks = math.ceil(blocks / NESTED_BLOCKSIZE)
    return codes + blocks + 4 * nested_blocks + code_table + NESTED_BLOCKSIZE * 4 + 4  # + offset


def save_quantized(path, quantized: dict) -> None:
    """Write {layer name: (codes, QuantState)} to one safetensors file (states packed as tensors)."""
    from safetensors.torch import save_file

    tensors = {}
    for name, (codes, state) in quantized.items():
        tensors[f"{name}.weight"] = codes.contiguous()
        for key, value in state.as_dict(packed=True).items():
            tensors[f"{name}.weight.{key}"] = value.contiguous()
    save_file(tensors, str(path))


def load_quantized(folder) -> dict:
    """Read what `save_quantized` wrote (file `weights.safetensors` in `folder`): {layer: (codes, QuantState)}."""
    from pathlib import Path

    from safetensors.torch import load_file

    tensors = load_file(str(Path(folder) / "weights.safetensors"))
    names = sorted({k[: -len(".weight")] for k in tensors if k.endswith(".weight")})
    out = {}
    for name in names:
        prefix = f"{name}.weight."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        out[name] = (tensors[f"{name}.weight"], bnb_functional().QuantState.from_dict(state, device="cpu"))
    return out


def bits_per_parameter(blocksize: int = 64, double_quant: bool = True) -> float:
    """The asymptotic bits per weight (code tables amortised away)."""
    if not double_quant:
        return 4 + 32 / blocksize
    return 4 + 8 / blocksize + 32 / (NESTED_BLOCKSIZE * blocksize)


# ----- the 4-bit frozen base layer -------------------------------------------------------------------
class QuantizedLinear(torch.nn.Module):
    """A frozen linear layer whose weight is stored 4-bit by bitsandbytes.

    The forward is dequantize-then-matmul, computed in `compute_dtype` (bf16 on CUDA and
    fp32 on CPU when "auto"), as bitsandbytes' own Linear4bit does on CPU. It never calls
    bnb's Linear4bit, whose CPU inference-layout repack after an eval forward silently drops
    later input gradients (docs/quantized.md). The codes are a buffer (they move with the
    model); the quantization state follows them on every `.to()`.
    """

    # Buffers that hold the frozen weight itself: FSDP2 shards parameters only, so data-parallel
    # training (variants/distributed.py) turns these into frozen parameters while it shards.
    weight_buffers = ("codes",)

    def __init__(self, codes: torch.Tensor, state, bias: torch.Tensor | None, in_features: int,
                 out_features: int, compute_dtype: str = "auto"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("codes", codes)
        self.state = state
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.compute_dtype = compute_dtype

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, quant_type: str, double_quant: bool, blocksize: int,
                    compute_dtype: str = "auto", prequantized=None) -> QuantizedLinear:
        if prequantized is not None:
            codes, state = prequantized
        else:
            codes, state = quantize_weight(linear.weight.detach().float(), quant_type, double_quant, blocksize)
        device = linear.weight.device
        state.to(device)  # in place
        return cls(codes.to(device), state, linear.bias, linear.in_features, linear.out_features, compute_dtype)

    def compute_dtype_for(self, x: torch.Tensor) -> torch.dtype:
        if self.compute_dtype == "auto":
            return torch.bfloat16 if self.codes.is_cuda else torch.float32
        return getattr(torch, self.compute_dtype)

    def dequantized(self) -> torch.Tensor:
        """The (out, in) weight, dequantized (in the state's original dtype)."""
        return dequantize_weight(self.codes, self.state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype_for(x)
        bias = None if self.bias is None else self.bias.to(dtype)
        return torch.nn.functional.linear(x.to(dtype), self.dequantized().to(dtype), bias).to(x.dtype)

    def _apply(self, fn, recurse: bool = True):
        out = super()._apply(fn, recurse)
        self.state.to(self.codes.device)  # QuantState.to moves its tensors in place
        return out

    def storage_bytes(self) -> int:
        """Codes + quantization state + bias, as held in memory."""
        bias = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return state_bytes(self.codes, self.state) + bias

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, {self.state.quant_type}, "
                f"double_quant={self.state.nested}, blocksize={self.state.blocksize}")
