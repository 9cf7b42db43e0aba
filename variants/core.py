"""AdapterLayer: the wrapper every layer kind builds around a frozen linear layer.

Conventions (docs/README.md, "Notation"): the base weight W0 is (out, in) as in `nn.Linear`;
GPT-2's `Conv1D` stores it transposed, (in, out) ("fan_in_fan_out"). A layer keeps the
base module untouched as `base_layer` and works with two views of its weight:

- `base_weight_native()`: the tensor exactly as the base module uses it (dequantized if
  the base is quantized), so a merged weight can be built in the same memory layout and
  the adapted forward equals the base forward bit for bit when the update is zero;
- `base_weight()`: the same weight as (out, in).

Merge writes W0 + ΔW into the base weight and unmerge takes it out again; each layer kind
defines ΔW (`delta_weight`) and, if its merge is not additive (DoRA), the pair
`merged_weight` / `unmerged_weight`.
"""

from __future__ import annotations

import sys
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn


def conv1d_class() -> type | None:
    """GPT-2's Conv1D, if transformers has loaded it; else None.

    A Conv1D layer exists only once transformers.pytorch_utils was imported (a GPT-2 built by
    transformers imports it), so looking it up in sys.modules recognises every such layer while
    `import variants` itself stays free of transformers (~0.8 s of imports a stage that only
    reads specs or reports, such as compare, does not need).
    """
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def supported_base_layers() -> tuple[type, ...]:
    """The layer types an adapter can wrap: nn.Linear, GPT-2's Conv1D (when loaded), our 4-bit layer."""
    from .quant import QuantizedLinear

    return tuple(t for t in (nn.Linear, conv1d_class(), QuantizedLinear) if t is not None)


# Quantized layers of other libraries: recognised so the error can say what to do instead.
FOREIGN_QUANTIZED = ("Linear4bit", "Linear8bitLt", "QuantLinear")


def is_fan_in_fan_out(module: nn.Module) -> bool:
    """True for layers whose weight is stored (in, out), like GPT-2's Conv1D."""
    conv1d = conv1d_class()
    return conv1d is not None and isinstance(module, conv1d)


def is_quantized(module: nn.Module) -> bool:
    """True for a base layer stored quantized (its class dequantizes on demand).

    Looked up on the class: on the instance, a plain nn.Linear answers through nn.Module's
    __getattr__ with a raised and caught AttributeError, ~10 µs on every forward and backward."""
    return callable(getattr(type(module), "dequantized", None))


def module_device(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def in_out_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a supported base layer."""
    if is_quantized(module):
        return module.in_features, module.out_features
    weight = module.weight
    if is_fan_in_fan_out(module):
        return weight.shape[0], weight.shape[1]
    return weight.shape[1], weight.shape[0]


class AdapterLayer(nn.Module):
    """Base class: holds the frozen `base_layer`, the dropout rate and the merge state.

    Subclasses declare `adapter_parameters` (names of their trainable tensors, saved with
    the adapter) and implement `forward_unmerged` and `delta_weight`.
    """

    adapter_parameters: ClassVar[tuple[str, ...]] = ()
    # The dtype the adapter path computes in (the layer kind's `adapter_dtype` option):
    # "float32" runs it in at least float32 over a half-precision base, as PEFT's
    # autocast_adapter_dtype does (x cast up, the adapter's output added in float32, the sum
    # cast back); "base" runs it in the input's dtype (the adapter tensors cast down).
    adapter_dtype: str = "float32"
    # While True (AdaptedModel.bypass_adapters, a calibration), the layer computes its base
    # layer alone: what a data-aware init must see (PEFT's disable_adapter()).
    bypassed: bool = False

    def __init__(self, base_layer: nn.Module, dropout: float):
        super().__init__()
        self.base_layer = base_layer
        self.fan_in_fan_out = is_fan_in_fan_out(base_layer)
        self.in_features, self.out_features = in_out_features(base_layer)
        self.dropout = float(dropout)
        self.merged = False

    # ----- base weight access ---------------------------------------------------------------
    @property
    def base_is_quantized(self) -> bool:
        return is_quantized(self.base_layer)

    def base_weight_native(self) -> torch.Tensor:
        """The base weight in the base module's own layout (dequantized if quantized)."""
        if self.base_is_quantized:
            return self.base_layer.dequantized()
        return self.base_layer.weight

    def base_weight(self) -> torch.Tensor:
        """The base weight as (out, in)."""
        w = self.base_weight_native()
        return w.t() if self.fan_in_fan_out else w

    def base_bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def adapter_compute_dtype(self, input_dtype: torch.dtype) -> torch.dtype:
        """The dtype of the adapter path for an input of `input_dtype` (see `adapter_dtype`)."""
        if self.adapter_dtype == "base":
            return input_dtype
        return torch.promote_types(input_dtype, torch.float32)

    def to_native(self, weight_out_in: torch.Tensor) -> torch.Tensor:
        """An (out, in) matrix in the base module's layout."""
        return weight_out_in.t() if self.fan_in_fan_out else weight_out_in

    def write_base_weight(self, weight_out_in: torch.Tensor) -> None:
        """Make an (out, in) matrix the base weight (merge, unmerge).

        The parameter keeps its identity and takes the new matrix as its storage, instead of
        having it copied in: weights loaded from safetensors are a private mapping of the file,
        and a copy into it costs one more pass over the weight plus a copy-on-write fault per
        4 KiB page (SmolLM2-135M's 210 linear layers, one thread: merge 0.42 s instead of 0.53-0.63 s)."""
        if self.base_is_quantized:
            raise ValueError("a 4-bit base weight cannot take an exact update; use merge_and_unload(), "
                             "which returns full-precision layers")
        weight = self.base_layer.weight
        new = self.to_native(weight_out_in).to(weight.dtype)
        if new.shape != weight.shape:
            raise ValueError(f"a base weight of shape {tuple(weight.shape)} cannot take a {tuple(new.shape)} matrix")
        if not new.is_contiguous() or new.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr():
            new = new.clone(memory_format=torch.contiguous_format)  # the weight's own layout, its own memory
        with torch.no_grad():
            weight.data = new  # takes the matrix over: callers pass one they built for it (merged_weight)

    # ----- forward ----------------------------------------------------------------------------
    def adapter_input(self, x: torch.Tensor) -> torch.Tensor | None:
        """drop(x) for the adapter path while training, or None when it is x itself."""
        if self.training and self.dropout > 0.0:
            return F.dropout(x, p=self.dropout, training=True)
        return None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.merged or self.bypassed:
            return self.base_layer(x, *args, **kwargs)
        if self.base_is_quantized:
            # QLoRA computes in the base's compute dtype (bf16 on CUDA) and hands back x's dtype.
            dtype = self.base_layer.compute_dtype_for(x)
            if dtype != x.dtype:
                return self.forward_unmerged(x.to(dtype)).to(x.dtype)
        return self.forward_unmerged(x)

    def forward_unmerged(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def refresh_after_init(self) -> None:
        """Re-derive tensors that depend on W0 + s·BA after an init rewrote A, B or W (default: none;
        DoRA recomputes its magnitude, as PEFT does after its init, peft/tuners/lora/layer.py:317)."""

    # ----- merge --------------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:  # pragma: no cover - abstract
        """ΔW as (out, in), in the adapter's dtype."""
        raise NotImplementedError

    def merged_weight(self) -> torch.Tensor:
        """W0 + ΔW as (out, in)."""
        w = self.base_weight()
        return w + self.delta_weight().to(w.dtype)

    def unmerged_weight(self, merged: torch.Tensor) -> torch.Tensor:
        """The inverse of `merged_weight` given the merged (out, in) weight."""
        return merged - self.delta_weight().to(merged.dtype)

    def full_precision_merged(self) -> nn.Linear:
        """A plain nn.Linear holding W0 + ΔW (dequantized base), for merge_and_unload of a 4-bit base."""
        weight = self.merged_weight()
        bias = self.base_bias()
        linear = nn.Linear(self.in_features, self.out_features, bias=bias is not None,
                           device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)
        linear.requires_grad_(False)
        return linear

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            raise RuntimeError("this adapter layer is already merged")
        self.write_base_weight(self.merged_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("this adapter layer is not merged")
        self.write_base_weight(self.unmerged_weight(self.base_weight()))
        self.merged = False

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The tensors that define this layer's adapter (saved and loaded)."""
        return {name: getattr(self, name) for name in self.adapter_parameters}

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, dropout={self.dropout}, merged={self.merged}"
