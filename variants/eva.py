"""EVA — Paischer et al. 2024, "One Initialization to Rule them All: Fine-tuning via Explained
Variance Adaptation", arXiv 2410.07170 (§3, Algorithm 1).

A starts from the right singular vectors of each layer's *inputs* on a few calibration batches;
B starts at 0, so the model equals the base at step 0 and the base weights are never touched.
Per layer k with inputs X_k (tokens x in, only tokens that carry a label and are not padding):

    incremental PCA of X_k over the batches (variants/incremental_pca.py), n_k = round(ρ·r) components
    converged when cos(v_i^(t), v_i^(t−1)) ≥ τ for each of the first r_k components
    rank redistribution: pool the explained-variance ratios of every layer's n_k components,
    keep the Σ_k r largest; r_k = how many of layer k's were kept (0 ≤ r_k ≤ ρ·r)
    A_k = V_k[:r_k]   (rows: unit principal directions; `eva_whiten`: A_k = diag(S_k)^(-1/2) V_k[:r_k])
    alpha_k = alpha·r_k/r  with `eva_adjust_scaling`, so s_k = s with alpha/r (alpha·√r_k/r with rsLoRA)

Layers that receive the same input (q/k/v, gate/up) share one PCA, and the one that comes first
keeps the largest rank of its group, as in PEFT. A layer whose rank comes out 0 is left unadapted.

This follows PEFT 0.21.2's `peft/tuners/lora/eva.py` (`_get_eva_state_dict`, Apache-2.0) step for
step — the hash pass on the first batch, the order in which hooks leave and rejoin, the rank
distribution after every forward — so that the same batches give the same components and ranks
(tests/test_init_data.py). Differences, each argued in docs/init-data-aware.md:

- `eva_max_passes`: PEFT cycles over the batches until every layer converged, with no bound. We
  stop after that many passes and keep the current estimate (a warning, and the unconverged layers
  in the calibration result): the components are still the PCA of everything seen, only not yet
  stable to τ between two updates, which happens when eigenvalues nearly tie.
- Batches in which no layer could ever be fitted (fewer masked tokens than components in every
  batch) are refused up front; PEFT would loop forever.
- With `whiten`, each layer's A is divided by sqrt(S) once. PEFT divides in place on a view of the
  shared PCA's components, so the second and third layer of a shared-input group are divided
  two and three times.
- ρ above 1000 is not silently capped (PEFT caps it); round(r·ρ) > in is refused instead.
"""

from __future__ import annotations

import hashlib
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .core import in_out_features
from .incremental_pca import IncrementalPCA
from .init_base import DataInit
from .parts import Option, part_class, register

LABEL_IGNORE = -100


def token_mask(batch: Mapping[str, torch.Tensor], use_label_mask: bool,
               label_mask_value: int = LABEL_IGNORE) -> torch.Tensor:
    """The tokens EVA fits on: attended (attention_mask) and, with the label mask, carrying a label."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask", torch.ones_like(ids)).bool()
    if use_label_mask and "labels" in batch:
        mask = torch.logical_and(mask, batch["labels"] != label_mask_value)
    return mask


def _layer_input(args: tuple, mask: torch.Tensor) -> torch.Tensor:
    x = args[0] if isinstance(args, (tuple, list)) else args
    # PEFT indexes with mask.nonzero(): the masked tokens in row-major order, as x[mask]
    return x.detach()[mask.to(x.device)]


def _digest(x: torch.Tensor) -> tuple:
    data = x.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()
    return tuple(x.shape), x.dtype, hashlib.blake2b(data, digest_size=16).digest()


class _SvdHook:
    """A forward hook that folds a layer's masked input into its incremental PCA."""

    def __init__(self, n_components: int, tau: float, state: dict):
        self.n_components = n_components
        self.tau = tau
        self.state = state  # {"mask": the current batch's token mask}
        self.pca = IncrementalPCA(n_components)
        self.converged = torch.zeros((n_components,), dtype=torch.bool)

    @torch.no_grad()
    def __call__(self, module, args, output) -> None:
        previous = self.pca.components_.clone() if self.pca.fitted else None
        x = _layer_input(args, self.state["mask"])
        if x.shape[0] < self.n_components:
            return  # too few tokens in this batch for this layer (PEFT skips it too)
        self.pca.partial_fit(x.to(torch.float32))
        if previous is None:
            return
        self.converged = F.cosine_similarity(self.pca.components_, previous) >= self.tau


@dataclass
class EvaResult:
    components: dict[str, torch.Tensor]  # layer -> (r_k, in); r_k may be 0
    ranks: dict[str, int]
    forwards: int  # the hash pass included
    shared_inputs: dict[str, str] = field(default_factory=dict)  # layer -> the layer whose PCA it uses
    unconverged: list[str] = field(default_factory=list)  # only when eva_max_passes stopped the loop


def rank_distribution(hooks: Mapping[str, _SvdHook], layer_hook: Mapping[str, str], shared: Mapping[str, str],
                      budget: int, max_components: Mapping[str, int]) -> dict[str, int]:
    """Each layer's rank: its share of the `budget` largest explained-variance ratios of all layers.

    PEFT's `_get_rank_distribution`, including the order of the pooled values (which decides ties:
    layers sharing a PCA repeat the same values) and the swap that gives a group's first layer
    the largest rank of the group.
    """
    ratios = {k: h.pca.explained_variance_ratio_[: max_components[k]] for k, h in hooks.items()}
    keys, values = zip(*[(k, c) for k, name in layer_hook.items() for c in ratios[name]], strict=True)
    order = torch.stack(values).argsort(descending=True)
    counts = Counter([keys[i] for i in order[:budget]])
    counts = {k: counts.get(k, 0) for k in layer_hook}
    for k, k_hook in shared.items():
        if counts[k_hook] < counts[k]:
            counts[k_hook], counts[k] = counts[k], counts[k_hook]
    return counts


@torch.no_grad()
def eva_components(forward: Callable[[Mapping[str, torch.Tensor]], Any], modules: Mapping[str, nn.Module],
                   batches: Sequence[Mapping[str, torch.Tensor]], ranks: Mapping[str, int], *, rho: float,
                   tau: float, use_label_mask: bool = True, label_mask_value: int = LABEL_IGNORE,
                   whiten: bool = False, max_passes: int | None = None) -> EvaResult:
    """EVA's components and ranks for the layers `modules` (name -> the module whose input is X_k).

    `forward(batch)` runs the model on one batch with the adapters out of the way (the hooks read
    the layer inputs of the base function). `ranks`: each layer's r before redistribution.
    `max_passes`: at most this many passes over `batches` after the hash pass (None: no bound, as PEFT).
    """
    if not batches:
        raise ValueError("EVA needs at least one calibration batch, got none")
    names = list(modules)
    max_components = {n: round(ranks[n] * rho) for n in names}
    budget = sum(ranks[n] for n in names)
    masks = [token_mask(b, use_label_mask, label_mask_value) for b in batches]
    tokens = [int(m.sum()) for m in masks]
    need = max(max_components.values())
    if max(tokens) < need:
        what = "labelled, attended" if use_label_mask else "attended"
        raise ValueError(f"EVA fits round(r·rho) = {need} components per layer, but the calibration batches have "
                         f"{tokens} {what} tokens: at least one batch needs {need} or more")
    state: dict[str, Any] = {"mask": masks[0]}
    handles = []
    try:
        # hash pass: which layers see equal inputs (they share one PCA)
        seen: dict[str, tuple] = {}

        def recorder(name):
            def hook(_module, args, _output):
                seen[name] = _digest(_layer_input(args, state["mask"]))
            return hook

        for name in names:
            handles.append(modules[name].register_forward_hook(recorder(name)))
        forward(batches[0])
        forwards = 1
        for h in handles:
            h.remove()
        handles.clear()
        missing = [n for n in names if n not in seen]
        if missing:
            raise ValueError(f"EVA: the calibration forward never ran the layers {missing[:5]}")
        groups: dict[tuple, list[str]] = {}
        for name in names:
            groups.setdefault(seen[name], []).append(name)
        shared = {member: group[0] for group in groups.values() for member in group[1:]}
        for group in groups.values():
            top = max(max_components[n] for n in group)
            for n in group:
                max_components[n] = top
        hooks = {n: _SvdHook(max_components[n], tau, state) for n in names if n not in shared}
        active = {n: modules[n].register_forward_hook(hooks[n]) for n in hooks}
        handles = list(active.values())
        layer_hook = {**{n: n for n in hooks}, **shared}

        converged = dict.fromkeys(hooks, False)
        rank_dist = dict(max_components)
        cap = None if max_passes is None else max_passes * len(batches)
        loop_forwards = 0
        unconverged: list[str] = []
        while True:
            batch_index = loop_forwards % len(batches)
            state["mask"] = masks[batch_index]
            for name, hook in hooks.items():
                done = bool(torch.all(hook.converged[: rank_dist[name]]))
                if not converged[name] and done:
                    active.pop(name).remove()
                    converged[name] = True
                elif converged[name] and not done:
                    active[name] = modules[name].register_forward_hook(hook)
                    handles.append(active[name])
                    converged[name] = False
            if all(converged.values()):
                break
            if cap is not None and loop_forwards >= cap:
                unconverged = [n for n in names if not converged[layer_hook[n]]]
                break
            forward(batches[batch_index])
            loop_forwards += 1
            if not all(h.pca.fitted for h in hooks.values()):
                continue
            rank_dist = rank_distribution(hooks, layer_hook, shared, budget, max_components)
    finally:
        for h in handles:
            h.remove()

    unfitted = [n for n in names if not hooks[layer_hook[n]].pca.fitted]
    if unfitted:  # only reachable through the cap: every batch was too short for these layers
        raise ValueError(f"EVA: no calibration batch had enough tokens for the layers {unfitted[:5]}")
    components = {}
    for name in names:
        rank = rank_dist[name]
        pca = hooks[layer_hook[name]].pca
        u = pca.components_[:rank]
        if whiten:
            u = u / pca.singular_values_[:rank].sqrt().reshape(-1, 1)
        components[name] = u.clone()
    return EvaResult(components, {n: rank_dist[n] for n in names}, forwards + loop_forwards, shared, unconverged)


# ----- the init part ------------------------------------------------------------------------------------
def _forward_without_labels(model: nn.Module) -> Callable[[Mapping[str, torch.Tensor]], Any]:
    # the hooks read the layer inputs; the loss on `labels` would only cost time
    return lambda batch: model(**{k: v for k, v in batch.items() if k != "labels"})


@register
class EvaInit(DataInit):
    name = "eva"
    idea = "A from the principal directions of each layer's inputs on training batches; ranks by explained variance"
    idea_zh = "以训练批次上各层输入的主方向初始化 A，并按解释方差重新分配各层的秩"
    options = {
        **DataInit.options,
        "eva_rho": Option(2.0, float, lambda v: v >= 1.0, ">= 1",
                          "ρ: each layer may take up to round(ρ·r) components in the rank redistribution"),
        "eva_tau": Option(0.99, float, lambda v: 0.0 < v <= 1.0, "in (0, 1]",
                          "τ: a component has converged when cos(v_t, v_t-1) >= τ"),
        "eva_whiten": Option(False, bool, None, "", "divide A's rows by sqrt of their singular values"),
        "eva_label_mask": Option(True, bool, None, "", "fit only tokens that carry a label (labels != -100)"),
        "eva_adjust_scaling": Option(True, bool, None, "",
                                     "alpha_k = alpha·r_k/r for a layer whose rank changed (PEFT's default)"),
        "eva_max_passes": Option(200, int, lambda v: v >= 1, ">= 1",
                                 "at most this many passes over the batches (PEFT: unbounded)"),
    }
    layer_needs = {"init_sets_lora_pair": "EVA writes A from its components, B = 0 and a new rank per layer, "
                                          "which needs a layer whose adapter is a plain LoRA pair (A, B)"}

    def __init__(self, spec):
        super().__init__(spec)
        self.result: EvaResult | None = None
        self.initial: dict[str, torch.Tensor] = {}  # layer -> A as calibrated (checked on resume)

    def check_target(self, name: str, module: nn.Module) -> None:
        in_f, _ = in_out_features(module)
        need = round(self.spec.r * self.opts.eva_rho)
        if need > in_f:
            raise ValueError(f"init=eva: r·eva_rho = {self.spec.r}·{self.opts.eva_rho:g} -> {need} components, but "
                             f"{name} has only in_features={in_f}; lower r or eva_rho")

    def init_layer(self, name: str, layer, original: nn.Module) -> None:
        # alpha_k = alpha·r_k/r (eva_adjust_scaling) or alpha: deterministic from the layer's rank, so a
        # loaded adapter (rank_pattern) gets its scales back without calibrating
        layer.scale = self._scale(layer.r)

    def _scale(self, rank: int) -> float:
        spec = self.spec
        alpha = spec.alpha * rank / spec.r if self.opts.eva_adjust_scaling else spec.alpha
        return float(part_class("scaling", spec.scaling).factor(rank, alpha))

    def check_batches(self, adapted, batches) -> None:
        super().check_batches(adapted, batches)
        need = round(self.spec.r * self.opts.eva_rho)
        tokens = [int(token_mask(b, self.opts.eva_label_mask).sum()) for b in batches]
        if max(tokens) < need:
            what = "labelled (labels != -100), attended" if self.opts.eva_label_mask else "attended"
            raise ValueError(f"init=eva: the calibration batches have {tokens} {what} tokens, but each layer fits "
                             f"round(r·eva_rho) = {need} components: at least one batch needs {need} or more")

    def compute_factors(self, adapted, batches, loss_fn):
        model = adapted.model
        model.eval()  # as PEFT: no dropout in the calibration forwards (the scope restores the modes)
        result = eva_components(
            _forward_without_labels(model), adapted.layers, batches, {n: layer.r for n, layer in adapted.layers.items()},
            rho=self.opts.eva_rho, tau=self.opts.eva_tau, use_label_mask=self.opts.eva_label_mask,
            whiten=self.opts.eva_whiten, max_passes=self.opts.eva_max_passes)
        if result.unconverged:
            warnings.warn(f"init=eva: {len(result.unconverged)} layers had not converged to eva_tau="
                          f"{self.opts.eva_tau:g} after eva_max_passes={self.opts.eva_max_passes}; their A is the "
                          f"current estimate: {result.unconverged[:5]}", stacklevel=4)
        self.result = result
        return {name: (a, torch.zeros(adapted.layers[name].out_features, a.shape[0]))
                for name, a in result.components.items()}

    @torch.no_grad()
    def apply_factors(self, adapted_or_layers, factors) -> None:
        """Give each layer its rank r_k (new A, B tensors; their requires_grad flags kept), A = the
        components, B = 0, s_k from alpha_k; a layer of rank 0 is left unadapted (as PEFT does)."""
        adapted = adapted_or_layers
        layers = adapted.layers
        unknown = sorted(set(factors) - set(layers))
        if unknown:
            raise ValueError(f"init=eva: factors for layers this adapter does not have: {unknown[:5]}")
        for name, (a, b) in factors.items():  # every check before the first change
            layer = layers[name]
            if a.ndim != 2 or a.shape[1] != layer.in_features or tuple(b.shape) != (layer.out_features, a.shape[0]):
                raise ValueError(f"init=eva: factors of {name} have shapes A {tuple(a.shape)}, B {tuple(b.shape)}")
            if not torch.isfinite(a).all():
                raise ValueError(f"init=eva: the components of {name} are not finite")
        dropped = [name for name, (a, _) in factors.items() if a.shape[0] == 0]
        for name, (a, b) in factors.items():
            if a.shape[0] == 0:
                continue
            layer = layers[name]
            a = a.detach().to(layer.lora_A)
            if a.shape[0] != layer.r:
                grads = layer.lora_A.requires_grad, layer.lora_B.requires_grad
                layer.lora_A = nn.Parameter(a.clone(), requires_grad=grads[0])
                layer.lora_B = nn.Parameter(b.detach().to(layer.lora_B).clone(), requires_grad=grads[1])
                layer.r = a.shape[0]
            else:
                layer.lora_A.copy_(a)
                layer.lora_B.copy_(b)
            layer.scale = self._scale(layer.r)
            layer.refresh_after_init()
            self.initial[name] = a.clone()
        adapted.leave_unadapted(dropped)

    def calibration_summary(self) -> dict[str, Any]:
        result = self.result
        return {"ranks": dict(result.ranks), "eva_forwards": result.forwards, "unconverged": list(result.unconverged)}

    def summary(self, adapted) -> dict[str, Any]:
        if self.result is None:
            return {}
        return {"ranks": dict(self.result.ranks), "rank_total": sum(self.result.ranks.values()),
                "unconverged": len(self.result.unconverged)}

    def state_dict(self) -> dict[str, Any]:
        return {"initial_A": dict(self.initial)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A resumed run recalibrates (deterministic): its components must be the checkpoint's."""
        saved = state.get("initial_A")
        if saved is None:
            return
        if set(saved) != set(self.initial) or any(not torch.equal(saved[n].to(self.initial[n]), self.initial[n])
                                                  for n in saved):
            raise ValueError("init=eva: the calibrated components differ from the checkpoint's "
                             "(other calibration batches, options or hardware); calibrate as the run did")
