"""QLoRA — Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv 2305.14314.

The base slot `nf4` (or `fp4`) stores every adapted linear layer's frozen weight in 4 bits
with bitsandbytes (variants/quant.py: NF4 codes, absmax per block of 64, double
quantization of the absmax constants); the adapter on top is any layer kind (QLoRA is
`layer=lora, base=nf4`, QDoRA `layer=dora, base=nf4`):

    Y = X · doubleDequant(c1, c2, W_NF4)ᵀ + s · X Aᵀ Bᵀ,    computed in bf16 on CUDA, fp32 on CPU

Only A and B train; gradients flow through the dequantized weight to the inputs. The
optimizer slot `paged_adamw` is the paper's paged AdamW (bitsandbytes' PagedAdamW32bit,
optimizer state in unified memory) on CUDA, and plain AdamW on the CPU, where paging has
nothing to page to; the metrics record which one ran. Gradient checkpointing
(`gradient_checkpointing: true`) trades recomputation for activation memory, as the
paper's recipe does.

Merging into a 4-bit weight would round the update away (PEFT requantizes, with a
warning); here `merge()` refuses, and `merge_and_unload()` returns full-precision linear
layers holding deq(Q) + ΔW, which is exactly the trained function.
"""

from __future__ import annotations

import torch

from .defaults import BaseStorage, OptimizerPart, resolve_lr, strip_names
from .parts import Option, register
from .quant import QuantizedLinear

_COMPUTE = ("auto", "float32", "bfloat16", "float16")


class FourBitBase(BaseStorage):
    quant_type: str
    options = {
        "double_quant": Option(True, bool, help="quantize the absmax constants again (8-bit, blocks of 256)"),
        "quant_blocksize": Option(64, int, lambda v: v in (64, 128, 256, 512, 1024, 2048, 4096),
                                  "one of 64, 128, ..., 4096", "weights per absmax constant"),
        "compute_dtype": Option("auto", str, lambda v: v in _COMPUTE, "one of " + ", ".join(_COMPUTE),
                                "dtype of the dequantized matmul (auto: bf16 on CUDA, fp32 on CPU)"),
        "gradient_checkpointing": Option(False, bool, help="recompute activations in backward"),
    }

    def __init__(self, spec):
        super().__init__(spec)
        self.prequantized: dict | None = None

    def use_prequantized(self, tensors: dict | None) -> None:
        """Codes and states quantized earlier (the pipeline's `quantize` stage), keyed by layer name.

        Called by `build` before the target checks: `check_target` then refuses a target whose
        codes are missing or do not match it, before any module is replaced.
        """
        self.prequantized = tensors

    def check_target(self, name: str, module: torch.nn.Module) -> None:
        if isinstance(module, QuantizedLinear):
            raise ValueError(f"{name} is already quantized; build {self.spec.label} on the full-precision base")
        if getattr(module, "fan_in_fan_out", False) or type(module).__name__ == "Conv1D":
            raise ValueError(f"base={self.name} supports nn.Linear layers; {name} is a {type(module).__name__}")
        if self.prequantized is not None:
            self._check_prequantized(name, module)

    def _check_prequantized(self, name: str, module: torch.nn.Module) -> None:
        if name not in self.prequantized:
            raise ValueError(f"no pre-quantized weight for {name}")
        pre = self.prequantized[name]
        if not isinstance(pre, (tuple, list)) or len(pre) != 2 or not hasattr(pre[1], "quant_type"):
            raise ValueError(f"pre-quantized {name} must be a pair (codes, QuantState), got {type(pre).__name__}")
        state = pre[1]
        if state.quant_type != self.quant_type or state.blocksize != self.opts.quant_blocksize or \
                state.nested != self.opts.double_quant:
            raise ValueError(
                f"pre-quantized {name} is {state.quant_type}/blocksize {state.blocksize}/double_quant "
                f"{state.nested}, the spec asks {self.quant_type}/{self.opts.quant_blocksize}/"
                f"{self.opts.double_quant}")
        shape = (module.out_features, module.in_features)
        if tuple(state.shape) != shape:
            raise ValueError(f"pre-quantized {name} holds a weight of shape {tuple(state.shape)}, "
                             f"the layer's is {shape}")

    def convert(self, name: str, module: torch.nn.Module) -> torch.nn.Module:
        pre = None if self.prequantized is None else self.prequantized[name]  # checked in check_target
        return QuantizedLinear.from_linear(module, self.quant_type, self.opts.double_quant, self.opts.quant_blocksize,
                                           self.opts.compute_dtype, prequantized=pre)

    def configure(self, adapted) -> None:
        if self.opts.gradient_checkpointing:
            model = adapted.model
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


@register
class NF4Base(FourBitBase):
    name = "nf4"
    quant_type = "nf4"
    idea = "frozen base in 4-bit NormalFloat with double quantization"
    idea_zh = "基座权重 4-bit NF4 量化（含双重量化）"
    merge_is_exact = False


@register
class FP4Base(FourBitBase):
    name = "fp4"
    quant_type = "fp4"
    idea = "frozen base in 4-bit float"
    idea_zh = "基座权重 4-bit FP4 量化"
    merge_is_exact = False


@register
class PagedAdamW(OptimizerPart):
    name = "paged_adamw"
    idea = "paged AdamW (optimizer state in unified memory) on CUDA"
    idea_zh = "分页优化器（CUDA 上优化器状态放在统一内存）"

    def make_optimizer(self, adapted, groups, *, lr, weight_decay, betas, eps) -> torch.optim.Optimizer:
        params = [p for g in groups for p in g["params"]]
        if params and params[0].is_cuda:
            import bitsandbytes as bnb

            return bnb.optim.PagedAdamW32bit(strip_names(resolve_lr(groups, lr)), lr=lr, betas=betas, eps=eps,
                                             weight_decay=weight_decay)
        return super().make_optimizer(adapted, groups, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
