"""Imports every part module once, in a fixed order, so the registry is complete."""

from . import (  # noqa: F401  (layer kinds)  # noqa: F401  (modifiers)
    adalora,
    corda,
    defaults,  # noqa: F401  (standard scaling, full base, default init, adamw, no step hook)
    delta_lora,
    dora,
    eva,
    loftq,
    lora,
    lora_fa,
    lora_ga,
    lora_plus,
    olora,
    pissa,
    qlora,
    rslora,
    sora,
    vera,
)
