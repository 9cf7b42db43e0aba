"""LoRA-family adapters for any transformers causal LM: one spec, composable parts.

    import variants
    spec = variants.AdapterSpec.from_preset("dora", r=16, alpha=32, target_modules="q_proj,v_proj")
    adapted = variants.build(model, spec)           # model modified in place; only adapters train
    adapted.print_trainable_parameters()
    records = variants.train(adapted, batches, variants.TrainSettings(steps=100, lr=1e-3))
    variants.train(adapted, batches, settings, strategy="fsdp")  # under torchrun: DDP or FSDP2
    variants.save(adapted, "out/adapter")           # adapter_config.json + adapter.safetensors
    variants.export_peft(adapted, "out/peft")       # loads with peft.PeftModel.from_pretrained
    adapted = variants.load_peft(model, "peft/adapter")  # a PEFT adapter folder (LORA, VERA, ADALORA)
    spec = variants.peft_spec("peft/adapter")       # its spec, read without a model or its tensors

Methods (presets): lora, qlora, loftq, adalora, sora, lora_plus, dora, rslora, lora_fa, vera,
delta_lora.
Parts by slot: `variants.part_names(slot)`; what each part and method does: docs/README.md.
"""

from . import (
    distributed,  # noqa: F401  (variants.distributed: strategies, World, check_strategy)
    registry,  # noqa: F401  (registers every part)
)
from .checkpoint import Checkpointer
from .core import AdapterLayer
from .io import export_peft, file_bytes, load, save
from .model import AdaptedModel, build
from .parts import SLOTS, Option, Part, part_class, register
from .parts import names as part_names
from .peft_load import load_peft, peft_spec
from .spec import PRESETS, AdapterSpec
from .training import NonFiniteLossError, StepRecord, TrainSettings, train


def names() -> list[str]:
    """The named methods (presets), sorted."""
    return sorted(PRESETS)


def get(name: str, **overrides) -> AdapterSpec:
    """The spec of a named method, with overrides (`get("vera", r=64)`)."""
    return AdapterSpec.from_preset(name, **overrides)


__all__ = [
    "AdaptedModel", "AdapterLayer", "Checkpointer", "AdapterSpec", "NonFiniteLossError", "Option", "PRESETS", "Part", "SLOTS",
    "StepRecord", "TrainSettings", "build", "export_peft", "file_bytes", "get", "load", "load_peft", "names", "part_class", "peft_spec",
    "part_names", "register", "save", "train",
]
