"""Imports every part module once, in a fixed order, so the registry is complete."""

from . import defaults  # noqa: F401  (standard scaling, full base, default init, adamw, no step hook)
from . import lora, dora, vera, adalora, sora  # noqa: F401  (layer kinds)
from . import rslora, lora_plus, lora_fa, delta_lora, qlora, loftq  # noqa: F401  (modifiers)
