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


def bits_per_parameter(blocksize: int = 64, double_quant: bool = True) -> float:
    """The asymptotic bits per weight (code tables amortised away)."""
    if not double_quant:
        return 4 + 32 / blocksize
    return 4 + 8 / blocksize + 32 / (NESTED_BLOCKSIZE * blocksize)
