"""Build adapters on a model from a spec, and the handle that drives them.

`build(model, spec)` checks everything first (spec, target patterns, shapes), then
replaces each targeted linear layer in place with its adapter layer, freezes every
base parameter and lets each part configure itself. The model stays an ordinary
`transformers` model: call it, generate with it, as before.

The returned `AdaptedModel` is the single entry point a training loop needs. Its hook
methods call the hook of every part of the spec, in slot order; the loop never asks
which variant it trains:

    opt = adapted.optimizer(lr=..., weight_decay=...)    # parts shape the groups, the optimizer part builds it
    sched = torch.optim.lr_scheduler.LambdaLR(opt, ...)  # optional
    for step in range(steps):
        loss = model(**batch).loss
        extra = adapted.extra_loss(step)                 # None when no part adds a term
        (loss if extra is None else loss + extra).backward(); clip
        adapted.before_optimizer_step(step, opt)
        opt.step()
        adapted.after_optimizer_step(step, opt)          # before sched.step() and zero_grad()
        sched.step(); opt.zero_grad()
    adapted.finalize()

The optimizer-step hooks take the optimizer explicitly: a part that steps tensors of
its own (SoRA's gates) uses the learning rate in force in `opt`, so it follows the
schedule exactly as the main update does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .core import AdapterLayer
from .layer_kind import LayerKind
from .parts import Part
from .spec import AdapterSpec
from .targets import find_targets, replace_module


class AdaptedModel:
    """A model with adapter layers, its spec, and the parts that implement the spec."""

    def __init__(self, model: nn.Module, spec: AdapterSpec, layers: dict[str, AdapterLayer], parts: list[Part]):
        self.model = model
        self.spec = spec
        self.layers = layers
        self.parts = parts
        # Targets left without an adapter because their rank is 0 (EVA's rank redistribution):
        # `rank_pattern()` lists them with rank 0, so `io.load` leaves them alone too.
        self.unadapted: list[str] = []
        # The optimizer `optimizer()` built last (reports name its class); hooks never read it,
        # they receive the optimizer that steps.
        self.optimizer_in_use: torch.optim.Optimizer | None = None

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __repr__(self) -> str:
        return f"AdaptedModel({self.spec.label}, {len(self.layers)} layers, {self.trainable_summary()})"

    # ----- parts ----------------------------------------------------------------------------------
    def part(self, slot: str) -> Part:
        for p in self.parts:
            if p.slot == slot:
                return p
        raise KeyError(slot)  # pragma: no cover - every slot has a part

    @property
    def layer_kind(self) -> LayerKind:
        return self.part("layer")  # type: ignore[return-value]

    # ----- parameters -----------------------------------------------------------------------------
    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_trainable_parameters()]

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, as PEFT's `get_nb_trainable_parameters`."""
        trainable = total = 0
        for p in self.model.parameters():
            total += p.numel()
            if p.requires_grad:
                trainable += p.numel()
        for module in self.model.modules():  # a 4-bit base holds its weights as codes, not parameters
            if callable(getattr(module, "dequantized", None)):
                total += module.in_features * module.out_features
        return trainable, total

    def trainable_summary(self) -> str:
        trainable, total = self.parameter_counts()
        return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"

    def print_trainable_parameters(self) -> None:
        print(self.trainable_summary())

    def adapter_tensors_ids(self) -> set[int]:
        ids = {id(t) for layer in self.layers.values() for t in layer.adapter_state().values()}
        for module in self.layer_kind.shared_modules().values():
            ids |= {id(t) for t in module.buffers()}
        return ids

    def base_weight_bytes(self) -> int:
        """Bytes of everything the base model holds in memory (parameters and buffers), adapters excluded.

        Quantized layers count their real storage (codes + quantization state, `storage_bytes`).
        """
        adapter = self.adapter_tensors_ids()
        seen: set[int] = set()
        total = 0
        for module in self.model.modules():
            storage = getattr(module, "storage_bytes", None)
            if callable(storage):
                total += storage()
                seen |= {id(t) for t in list(module.parameters()) + list(module.buffers())}
        for t in list(self.model.parameters()) + list(self.model.buffers()):
            if id(t) in adapter or id(t) in seen:
                continue
            seen.add(id(t))
            total += t.numel() * t.element_size()
        return total

    def rank_pattern(self) -> dict[str, int]:
        """Layers whose rank differs from the spec's r (after SoRA's pruning, EVA's redistribution),
        name -> rank; targets left unadapted have rank 0."""
        out = {name: layer.r for name, layer in self.layers.items()
               if getattr(layer, "r", self.spec.r) != self.spec.r}
        return {**out, **dict.fromkeys(self.unadapted, 0)}

    def leave_unadapted(self, names: list[str]) -> None:
        """Put the base layers of `names` back and stop adapting them (a rank-0 layer adds nothing)."""
        unknown = sorted(set(names) - set(self.layers))
        if unknown:
            raise ValueError(f"leave_unadapted: no adapter layers {unknown[:5]}")
        for name in names:
            replace_module(self.model, name, self.layers.pop(name).base_layer)
            self.unadapted.append(name)

    def parts_summary(self) -> dict[str, Any]:
        """Every part's report after training, keyed by slot (only parts that report something)."""
        return {p.slot: s for p in self.parts if (s := p.summary(self))}

    def iter_layers(self) -> Iterator[tuple[str, AdapterLayer]]:
        return iter(self.layers.items())

    # ----- merge ----------------------------------------------------------------------------------
    @property
    def merged(self) -> bool:
        return any(layer.merged for layer in self.layers.values())

    def merge(self) -> None:
        """Write every layer's update into its base weight (forward then costs nothing extra)."""
        for layer in self.layers.values():
            layer.merge()

    def unmerge(self) -> None:
        for layer in self.layers.values():
            layer.unmerge()

    def unload(self) -> nn.Module:
        """Put the base layers back (merged or not) and drop shared modules; returns the model.

        An init that rewrote W0 into a residual (PiSSA, ...) first writes W0 back into every
        layer that is not merged, so removing the adapter gives the original base (a merged
        layer keeps the trained function)."""
        self.part("init").restore_base(self)
        return self._detach({name: layer.base_layer for name, layer in self.layers.items()})

    def _detach(self, replacements: dict[str, nn.Module]) -> nn.Module:
        for name, module in replacements.items():
            replace_module(self.model, name, module)
        for attr in self.layer_kind.shared_modules():
            if hasattr(self.model, attr):
                delattr(self.model, attr)
        self.layers = {}
        return self.model

    def merge_and_unload(self) -> nn.Module:
        """The model with every update merged and no adapter layers left.

        A 4-bit base cannot hold the update exactly, so its layers come back as full-precision
        nn.Linear holding deq(Q) + ΔW — exactly the function that was trained.
        """
        replacements = {}
        with torch.no_grad():
            for name, layer in self.layers.items():
                if layer.base_is_quantized:
                    replacements[name] = layer.full_precision_merged()
                else:
                    layer.merge()
                    replacements[name] = layer.base_layer
        return self._detach(replacements)

    # ----- data-aware initialisation (the init slot's calibration hook) ----------------------------
    def calibration_batches(self) -> int:
        """Training batches the init part needs before training (0: a data-free init)."""
        return self.part("init").calibration_batches()

    @property
    def needs_calibration(self) -> bool:
        """True while a data-aware init waits for `calibrate` (variants.train refuses the model until then)."""
        return self.part("init").needs_calibration()

    def calibrate(self, batches: Sequence[Mapping[str, torch.Tensor]],
                  loss_fn: Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor] | None = None
                  ) -> dict[str, Any]:
        """Initialise a data-aware adapter from calibration batches (training data only).

        Validates first (at least `init_batches` batches, else a ValueError naming init_batches
        and the count; not calibrated yet), then runs the init on the first `init_batches`
        batches with the adapters bypassed, the global RNG forked, and train/eval modes,
        requires_grad flags and hooks restored afterwards; every layer's factors are computed
        before any is written. `loss_fn(model, batch)` (default: the model's loss on `labels`)
        is for inits that need gradients. Returns {"seconds", "batches", "forwards", ...}.
        """
        return self.part("init").calibrate(self, batches, loss_fn)

    @contextlib.contextmanager
    def bypass_adapters(self) -> Iterator[AdaptedModel]:
        """Within the block every adapter layer computes its base layer alone (the base function)."""
        layers = list(self.layers.values())
        previous = [layer.bypassed for layer in layers]
        for layer in layers:
            layer.bypassed = True
        try:
            yield self
        finally:
            for layer, flag in zip(layers, previous):
                layer.bypassed = flag

    # ----- training hooks -------------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        """The optimizer's groups after every part had its say (`names` kept for bookkeeping)."""
        named = self.named_trainable_parameters()
        groups = [{"params": [p for _, p in named], "names": [n for n, _ in named]}]
        for part in self.parts:
            groups = part.param_groups(self, groups)
        return [g for g in groups if g["params"]]

    def optimizer(self, lr: float, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                  eps: float | None = None) -> torch.optim.Optimizer:
        """The optimizer this spec trains with (AdamW, LoRA+ groups, LoRA-FA's projected AdamW, ...).

        `eps=None` takes the optimizer part's reference value (AdamW 1e-8, LoRA-FA 1e-6 as PEFT's
        LoraFAOptimizer); a number overrides it.
        """
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0:
            raise ValueError(f"learning rate must be a positive number, got {lr!r}")
        if not isinstance(weight_decay, (int, float)) or isinstance(weight_decay, bool) or weight_decay < 0:
            raise ValueError(f"weight_decay must be a non-negative number, got {weight_decay!r}")
        if eps is not None and (not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0):
            raise ValueError(f"eps must be a positive number (or None for the optimizer's own default), got {eps!r}")
        groups = self.param_groups()
        if not groups:
            raise ValueError(f"{self.spec.label}: the model has no trainable adapter tensors")
        optimizer_part = self.part("optimizer")
        if eps is None:
            eps = optimizer_part.default_eps  # type: ignore[attr-defined]
        self.optimizer_in_use = optimizer_part.make_optimizer(  # type: ignore[attr-defined]
            self, groups, lr=float(lr), weight_decay=float(weight_decay), betas=betas, eps=float(eps))
        return self.optimizer_in_use

    def extra_loss(self, step: int) -> torch.Tensor | None:
        """Sum of the parts' extra loss terms, or None when no part adds one."""
        total = None
        for part in self.parts:
            term = part.extra_loss(self, step)
            if term is not None:
                total = term if total is None else total + term
        return total

    def before_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """Every part's hook, after backward and clipping, right before `optimizer.step()`."""
        _check_step_args(step, optimizer)
        for part in self.parts:
            part.before_optimizer_step(self, step, optimizer)

    def after_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """Every part's hook, right after `optimizer.step()`, before the scheduler's step and `zero_grad()`."""
        _check_step_args(step, optimizer)
        for part in self.parts:
            part.after_optimizer_step(self, step, optimizer)

    def finalize(self) -> None:
        for part in self.parts:
            part.finalize(self)

    def hooks_state_dict(self) -> dict[str, Any]:
        return {part.slot: part.state_dict() for part in self.parts}

    def load_hooks_state_dict(self, state: Mapping[str, Any]) -> None:
        for part in self.parts:
            part.load_state_dict(state.get(part.slot, {}))

    # ----- adapter tensors --------------------------------------------------------------------------
    # Keys: "<layer name>.<tensor>" for layer tensors, "@shared.<module>.<tensor>" for modules
    # shared by all layers (VeRA's projections), "@<slot>.<key>" for a part's own tensors.
    # "@" never occurs in a module name, so the three namespaces cannot collide.
    def adapter_state_dict(self, include_shared: bool | None = None) -> dict[str, torch.Tensor]:
        """Every tensor that defines the adapter (shared modules only if the layer kind saves them)."""
        out: dict[str, torch.Tensor] = {}
        for name, layer in self.layers.items():
            for key, tensor in layer.adapter_state().items():
                out[f"{name}.{key}"] = tensor.detach()
        if include_shared is None:
            include_shared = bool(getattr(self.layer_kind.opts, "save_projection", True))
        if include_shared:
            for attr, module in self.layer_kind.shared_modules().items():
                for key, tensor in module.state_dict().items():
                    out[f"@shared.{attr}.{key}"] = tensor.detach()
        for part in self.parts:
            for key, tensor in part.adapter_tensors(self).items():
                out[f"@{part.slot}.{key}"] = tensor.detach()
        return out

    @torch.no_grad()
    def load_adapter_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Load what `adapter_state_dict` produced; names and shapes must match exactly.

        Shared modules are optional in the file (they are regenerated from their seed when
        absent); part tensors are handed to their part after the layer tensors are in place.
        """
        layer_targets = {f"{n}.{k}": t for n, layer in self.layers.items() for k, t in layer.adapter_state().items()}
        shared_targets = {f"@shared.{attr}.{k}": t for attr, module in self.layer_kind.shared_modules().items()
                          for k, t in module.state_dict().items()}
        part_slots = {p.slot for p in self.parts}
        part_tensors: dict[str, dict[str, torch.Tensor]] = {}
        missing = sorted(set(layer_targets) - set(tensors))
        unexpected = []
        for key, value in tensors.items():
            target = layer_targets.get(key, shared_targets.get(key))
            if target is not None:
                if tuple(value.shape) != tuple(target.shape):
                    raise ValueError(f"adapter tensor {key!r} has shape {tuple(value.shape)}, "
                                     f"this model needs {tuple(target.shape)}")
                target.copy_(value.to(target.dtype))
                continue
            slot, _, rest = key[1:].partition(".") if key.startswith("@") else ("", "", "")
            if slot in part_slots and rest:
                part_tensors.setdefault(slot, {})[rest] = value
            else:
                unexpected.append(key)
        if missing or unexpected:
            raise ValueError(f"adapter tensors do not match this model and spec: missing {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''}, unexpected {sorted(unexpected)[:5]}")
        for part in self.parts:
            part.load_adapter_tensors(self, part_tensors.get(part.slot, {}))


def _check_step_args(step: int, optimizer: torch.optim.Optimizer) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative integer (the 0-based optimizer step), got {step!r}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"the optimizer-step hooks need the optimizer that steps (from adapted.optimizer()), "
                         f"got {optimizer!r}")


def build(model: nn.Module, spec: AdapterSpec | Mapping[str, Any], *, quantized: Mapping[str, Any] | None = None,
          rank_pattern: Mapping[str, int] | None = None, deferred_init: bool = False) -> AdaptedModel:
    """Add the adapter described by `spec` to `model` (in place) and return its handle.

    `quantized`: codes and states already quantized for a 4-bit base (layer name -> (codes,
    QuantState)), so the base is not quantized twice. `rank_pattern`: per-layer ranks of a
    saved adapter whose ranks changed in training (SoRA's pruning). `deferred_init`: the
    adapter's tensors will be loaded from a file (io.load), so the init part computes
    nothing (no SVD, no calibration); a base-rewriting init rebuilds its residual from the
    loaded initial factors.

    All validation happens before the first module is replaced (the spec, the targets, every
    part's `check_target`, pre-quantized weights, the rank pattern): on any error the model
    is left exactly as it was. Should something still fail while the layers are replaced,
    the original modules and requires_grad flags are put back before the error propagates,
    and so are base weights an init rewrote (the init part configures last, so nothing runs
    after it writes them).
    """
    if not isinstance(spec, AdapterSpec):
        spec = AdapterSpec.from_dict(spec)
    targets = find_targets(model, spec.target_modules)
    parts = [cls(spec) for cls in spec.part_classes()]
    by_slot = {p.slot: p for p in parts}
    by_slot["init"].deferred = bool(deferred_init)  # type: ignore[attr-defined]
    layer_kind: LayerKind = by_slot["layer"]  # type: ignore[assignment]
    base_part = by_slot["base"]
    if quantized is not None:  # before the target checks, which compare each target with its codes
        if not hasattr(base_part, "use_prequantized"):
            raise ValueError(f"pre-quantized weights were given, but {spec.label} uses base={spec.base}")
        if not isinstance(quantized, Mapping):
            raise ValueError(f"quantized must map layer names to (codes, QuantState), got {type(quantized).__name__}")
        base_part.use_prequantized(quantized)
    # the init part first: its reason for refusing a target (e.g. LoftQ needs full-precision
    # weights) is the most specific one
    checkers = sorted(parts, key=lambda p: p.slot != "init")
    for name, module in targets:
        for part in checkers:
            part.check_target(name, module)
    if rank_pattern:
        unknown = sorted(set(rank_pattern) - {n for n, _ in targets})
        if unknown:
            raise ValueError(f"rank_pattern names layers this spec does not adapt: {unknown[:5]}")
        bad = {n: r for n, r in rank_pattern.items() if isinstance(r, bool) or not isinstance(r, int) or r < 0}
        if bad:
            raise ValueError(f"rank_pattern ranks must be non-negative integers (0: the target stays unadapted), "
                             f"got {bad}")
        layer_kind.rank_pattern = dict(rank_pattern)
    unadapted = [n for n, r in (rank_pattern or {}).items() if r == 0]
    targets = [(n, m) for n, m in targets if n not in unadapted]
    layer_kind.prepare(model, targets)
    taken = [attr for attr in layer_kind.shared_modules() if hasattr(model, attr)]
    if taken:
        raise ValueError(f"{type(model).__name__} already has an attribute {taken[0]!r}, "
                         f"where {spec.label} keeps its shared modules")

    # From here on the model changes; anything unforeseen is rolled back.
    flags = [(p, p.requires_grad) for p in model.parameters()]
    replaced: list[tuple[str, nn.Module]] = []
    added: list[str] = []
    layers: dict[str, AdapterLayer] = {}
    init_part = by_slot["init"]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for name, module in targets:
            layer = layer_kind.create(name, base_part.convert(name, module))  # type: ignore[attr-defined]
            init_part.init_layer(name, layer, module)  # type: ignore[attr-defined]
            # a new module starts in training mode; take the replaced one's, or a model in eval mode
            # would run the adapter's dropout at inference
            layer.train(module.training)
            replace_module(model, name, layer)
            replaced.append((name, module))
            layers[name] = layer
        for attr, module in layer_kind.shared_modules().items():
            model.add_module(attr, module)
            added.append(attr)
        adapted = AdaptedModel(model, spec, layers, parts)
        adapted.unadapted = [n for n in (rank_pattern or {}) if n in unadapted]
        # the init part last: a base-rewriting init writes W0 − s·B0A0 as the final change of build
        for part in sorted(parts, key=lambda p: p.slot == "init"):
            part.configure(adapted)
    except BaseException:
        init_part.restore_base(layers)  # type: ignore[attr-defined]
        for attr in added:
            delattr(model, attr)
        for name, module in reversed(replaced):
            replace_module(model, name, module)
        for p, flag in flags:
            p.requires_grad_(flag)
        raise
    return adapted
