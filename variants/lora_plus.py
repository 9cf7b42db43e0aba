"""LoRA+ — Hayou, Ghosh & Yu 2024, "LoRA+: Efficient Low Rank Adaptation of Large
Models", arXiv 2402.12354.

Same model as LoRA; only the optimizer changes: B learns faster than A,

    η_B = λ · η_A,     λ = `loraplus_ratio` (the paper's starting point: 2^4 = 16)

The paper derives η_B/η_A = Θ(n) from the model *width* n at a fixed rank — nothing in
it scales with sqrt(r). (The seed tutorial's lr_A = η/sqrt r, lr_B = η·sqrt r is not the
paper's rule: docs/optimizers.md.)

Group membership follows PEFT's `create_loraplus_optimizer`: B and every 1-D trainable
tensor (DoRA's magnitude, biases) get η_B; A and the other matrices get η_A; both
groups use the training run's weight decay.
"""

from __future__ import annotations

from .defaults import OptimizerPart
from .parts import Option, register


@register
class LoRAPlus(OptimizerPart):
    name = "lora_plus"
    idea = "B learns loraplus_ratio times faster than A"
    idea_zh = "B 的学习率是 A 的 λ 倍（非对称学习率）"
    options = {
        "loraplus_ratio": Option(16.0, float, lambda v: v > 0, "> 0", "η_B / η_A"),
    }
    layer_needs = {"trains_lora_pair": "LoRA+ sets the learning rates of a trainable A/B pair, "
                                       "and this layer kind trains no A or B"}

    def param_groups(self, adapted, groups: list[dict]) -> list[dict]:
        out = []
        for g in groups:
            slow = {"params": [], "names": []}
            fast = {"params": [], "names": [], "lr_scale": g.get("lr_scale", 1.0) * self.opts.loraplus_ratio}
            rest = {k: v for k, v in g.items() if k not in ("params", "names", "lr_scale")}
            for name, p in zip(g["names"], g["params"], strict=True):
                leaf = name.rsplit(".", 1)[-1]
                dest = fast if (leaf == "lora_B" or p.ndim == 1) else slow
                dest["params"].append(p)
                dest["names"].append(name)
            if "lr_scale" in g:
                slow["lr_scale"] = g["lr_scale"]
            out += [{**rest, **slow}, {**rest, **fast}]
        return out
