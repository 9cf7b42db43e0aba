"""Training memory each variant would need for Llama-2-7B, from exact bytes per parameter.

The adapter is built for real on a Llama-2-7B-shaped model on PyTorch's `meta` device (no
memory is allocated), so the trainable-parameter counts are exact for the spec, not
estimated. Memory of the persistent training state:

    M = base weights + adapter weights + gradients + optimizer state (+ method-specific state)

      base weights     every base parameter: 2 B (bf16), or for a 4-bit base the NF4 + double
                       quantization bytes of the linear layers (variants.quant.quantized_bytes)
                       plus 2 B for what stays unquantized (embeddings, norms, output head)
      adapter weights  4 B per adapter parameter (fp32, trainable or frozen) + shared buffers
      gradients        4 B per trainable parameter
      AdamW state      8 B per trainable parameter (two fp32 moments)
      extra state      what parts declare per adapted base weight (Part.state_bytes_per_base_weight;
                       Delta-LoRA's fp32 residual of W over a bf16 base: 4 B)

Activations are left out: they depend on batch size, sequence length and checkpointing, not
on the method (within a few percent for these methods), and would dominate any constant.

Per GPU under N-way FSDP2, as `variants.train(strategy="fsdp")` shards (fully_shard per decoder
layer, then the root):

    M_N = (base parameters + extra state) / N + 4-bit codes + adapter + gradients + AdamW state

FSDP2 shards by dim-0 rows (up to one padded row per rank): the frozen bf16 base weights, the
4-bit codes (frozen parameters while sharded), the unquantized parts of a 4-bit base, and
Delta-LoRA's residual (kept row by row like W). Every rank holds whole: the 4-bit quantization
state (absmax, double-quantization constants, code tables), the adapter tensors (VeRA's shared
pair included), their gradients and AdamW state (they are ~0.1-1 % of the weights, and each
part's hooks then see whole tensors). N = 1 is the single-process total.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import variants
from variants.quant import quantized_bytes

GIB = 2**30
FSDP_WAYS = (1, 2, 8)  # the N of the per-GPU projection under N-way FSDP2

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                 tie_word_embeddings=False)


@dataclass(frozen=True)
class Projection:
    variant: str
    base_params: int
    trainable_params: int
    adapter_params: int
    base_bytes: float
    adapter_bytes: float
    gradient_bytes: float
    optimizer_bytes: float
    extra_bytes: float
    base_replicated_bytes: float = 0.0  # of base_bytes: what FSDP2 leaves whole on every rank (4-bit state)

    @property
    def total_bytes(self) -> float:
        return self.base_bytes + self.adapter_bytes + self.gradient_bytes + self.optimizer_bytes + self.extra_bytes

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GIB

    def per_gpu_bytes(self, n: int) -> float:
        """Persistent memory per GPU under n-way FSDP2 (see the module docstring for what is sharded)."""
        sharded = self.base_bytes - self.base_replicated_bytes + self.extra_bytes
        whole = self.base_replicated_bytes + self.adapter_bytes + self.gradient_bytes + self.optimizer_bytes
        return sharded / n + whole


def _meta_llama2_7b():
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**LLAMA2_7B)).to(torch.bfloat16)


def _full_precision_twin(spec: variants.AdapterSpec) -> variants.AdapterSpec:
    """The same adapter on a full-precision base with the default init: the adapter's tensors have the
    same shapes, and a meta-device model cannot be quantized (the 4-bit bytes come from a formula)."""
    dropped = {key for slot in ("base", "init") for key in variants.part_class(slot, getattr(spec, slot)).options}
    values = {k: v for k, v in spec.to_dict().items() if k not in dropped}
    return variants.AdapterSpec.from_dict({**values, "base": "full", "init": "default"})


def project(name: str, spec: variants.AdapterSpec, base_bits: str = "bf16", blocksize: int = 64,
            double_quant: bool = True) -> Projection:
    """The projection for one spec; `base_bits` is "bf16" or "4bit" (QLoRA-style storage)."""
    model = _meta_llama2_7b()
    base_params = sum(p.numel() for p in model.parameters())
    adapted = variants.build(model, _full_precision_twin(spec))
    adapter_params = sum(t.numel() for layer in adapted.layers.values() for t in layer.adapter_state().values())
    shared = sum(t.numel() for m in adapted.layer_kind.shared_modules().values() for t in m.buffers())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    adapted_weight_params = sum(layer.in_features * layer.out_features for layer in adapted.layers.values())
    state = 0.0
    if base_bits == "4bit":
        quantized = sum(quantized_bytes(layer.in_features * layer.out_features, blocksize, double_quant)
                        for layer in adapted.layers.values())
        state = quantized - sum(math.ceil(layer.in_features * layer.out_features / 2) for layer in adapted.layers.values())
        base_bytes = quantized + 2 * (base_params - adapted_weight_params)
    else:
        base_bytes = 2.0 * base_params
    extra = sum(part.state_bytes_per_base_weight for part in adapted.parts) * adapted_weight_params
    return Projection(variant=name, base_params=base_params, trainable_params=trainable,
                      adapter_params=adapter_params + shared, base_bytes=base_bytes,
                      adapter_bytes=4.0 * (adapter_params + shared), gradient_bytes=4.0 * trainable,
                      optimizer_bytes=8.0 * trainable, extra_bytes=extra, base_replicated_bytes=state)
