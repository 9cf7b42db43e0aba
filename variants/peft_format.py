"""PEFT's adapter format (PEFT 0.21), both ways: one codec per PEFT adapter type we share.

A PEFT adapter folder holds `adapter_config.json` (the PeftConfig: `peft_type` and its options)
and `adapter_model.safetensors`, whose keys are `base_model.model.<module>.<tensor>` (the adapter
name is not saved). A codec knows, for one `peft_type`, how that config and those keys
correspond to our spec and our layers' tensors:

  LORA     our layer kinds lora, dora (`use_dora`), sora; scaling rslora (`use_rslora`).
           PEFT computes each layer as  y = x W0ᵀ + s_k (x A_kᵀ) B_kᵀ,  s_k = alpha_k / r_k
           (alpha_k / √r_k with use_rslora), where r_k and alpha_k come from `rank_pattern` /
           `alpha_pattern` (regex keys matched as `(.*\\.)?key$`, first match wins) or r, lora_alpha.
           Our layers keep one scale s = factor(spec.r, spec.alpha) whatever their rank, so:
           export writes alpha_k = s / factor(r_k, 1) for a layer whose rank differs from r
           (SoRA after pruning), and import folds s_k / s into B (B' = B·s_k/s gives s·B'A = s_k·BA).
           SoRA's gate g (y = s·(x Aᵀ ⊙ g) Bᵀ) is folded on export: A' = A[g≠0], B' = (B·g)[:, g≠0],
           exact whether or not the adapter was pruned (`finalize`); a layer pruned to rank 0 adds
           nothing and is left out (PEFT's LoRA needs r ≥ 1).
  VERA     our layer kind vera: vera_lambda_b, vera_lambda_d per layer, the shared pair as
           base_model.vera_A / base_model.vera_B (absent with save_projection=false: both sides
           regenerate it from projection_prng_key).
  ADALORA  our layer kind adalora: ΔW = B (A ⊙ E) · alpha / (init_r + 1e-5). `rank_pattern` holds
           one boolean mask per layer (key `<module>.lora_E`) and the file only the kept triplets;
           PEFT shrinks the layer to them on load but keeps ranknum = init_r, so the scale is
           unchanged. We keep full init_r tensors: import puts the kept triplets at
           their mask positions (E = 0 elsewhere) and restores the mask as the allocator's final
           rank mask; export slices by that mask (no rank_pattern while the allocator fixed none).

Which layers are adapted is read from the tensor file, not re-derived from `target_modules`:
PEFT saves the tensors of every module it adapted, so the file names exactly those modules,
whatever `target_modules`, `exclude_modules` or `layers_to_transform` said.

Config options: each codec lists the keys it reads and the keys that only shape
initialisation or runtime (ignored); every other key must be off (None, false, "none", empty),
otherwise the import refuses with a ValueError naming the key and its value.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from . import parts as _parts
from .spec import AdapterSpec

PREFIX = "base_model.model."
# Options of every PEFT config that do not change the adapter's function here: bookkeeping, and
# which modules to target (the tensor file says which were adapted; see the module docstring).
COMMON_IGNORED = frozenset({
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
    "peft_version", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
    # PEFT sets it from the layer type (Conv1D: true, nn.Linear: false) whatever the file says; so do we
    "fan_in_fan_out",
})
# Why a refused option cannot be read, where a short reason helps.
WHY_REFUSED = {
    "bias": "it trains the base layers' biases, which the file then carries",
    "lora_bias": "it adds a bias to lora_B",
    "modules_to_save": "it saves full copies of whole modules",
    "trainable_token_indices": "it trains rows of the embedding",
    "layer_replication": "it changes the base model's layer stack",
    "alora_invocation_tokens": "Activated LoRA applies the adapter only after its invocation tokens",
    "megatron_config": "it targets Megatron-parallel layers",
    "target_parameters": "it adapts parameters, not linear layers",
    "use_qalora": "QA-LoRA pools the input before A",
}
# init_lora_weights values that only decide the starting values of A and B (overwritten by the
# file); the others (pissa, olora, corda, loftq, lora_ga, mica) change the base weights or the
# layer when PEFT builds it, so the file only fits a base we do not have.
LORA_INITS = (True, False, "gaussian", "eva", "orthogonal")


def _is_off(value: Any) -> bool:
    return value is None or value is False or value == "none" or (isinstance(value, (dict, list, tuple)) and not value)


def pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's per-module lookup (peft.utils.other.get_pattern_key): the first key that matches the
    end of the module name as a regex, `(.*\\.)?key$`, gives the value."""
    for key, value in patterns.items():
        try:
            hit = re.match(rf"(.*\.)?({key})$", module)
        except re.error as err:
            raise ValueError(f"pattern key {key!r} is not a valid regular expression ({err})") from None
        if hit:
            return value
    return default


class Codec:
    """One PEFT adapter type: its config keys, its tensor keys, and the mapping to our spec."""

    peft_type: ClassVar[str]
    layer_kinds: ClassVar[tuple[str, ...]]  # our layer kinds this PEFT type expresses
    defaults: ClassVar[dict[str, Any]]  # the config keys read, with PEFT's default values
    ignored: ClassVar[frozenset[str]] = frozenset()  # keys that only affect initialisation or runtime
    keys: ClassVar[dict[str, str]]  # PEFT's key suffix inside a module -> our tensor name
    shared: ClassVar[dict[str, str]] = {}  # PEFT's key of a tensor shared by all layers -> our buffer name

    # ----- config -------------------------------------------------------------------------------
    def read_config(self, config: Mapping[str, Any], where: str) -> dict[str, Any]:
        """The values this codec reads (PEFT's defaults where absent); refuse options it cannot honour."""
        for key, value in config.items():
            if key in self.defaults or key in self.ignored or key in COMMON_IGNORED or _is_off(value):
                continue
            why = WHY_REFUSED.get(key, f"load_peft does not implement it for {self.peft_type} adapters")
            raise ValueError(f"{where}: PEFT option {key}={value!r} is not supported ({why})")
        return {key: config.get(key, default) for key, default in self.defaults.items()}

    # ----- import -------------------------------------------------------------------------------
    def spec(self, cfg: dict[str, Any], layers: list[str]) -> AdapterSpec:  # pragma: no cover - abstract
        raise NotImplementedError

    def layer_rank(self, cfg: dict[str, Any], spec: AdapterSpec, name: str) -> int:
        """The rank of module `name` as PEFT builds it (the shapes the file must have)."""
        return spec.r

    def peft_shapes(self, cfg: dict[str, Any], spec: AdapterSpec, name: str, in_features: int,
                    out_features: int) -> dict[str, tuple[int, ...]]:  # pragma: no cover - abstract
        """PEFT's key suffix -> the shape of that tensor for module `name`."""
        raise NotImplementedError

    def shared_shapes(self, spec: AdapterSpec, dims: list[tuple[int, int]]) -> dict[str, tuple[int, ...]]:
        """PEFT's key -> shape of the shared tensors, given (in, out) of every adapted layer."""
        return {}

    def our_layer_tensors(self, cfg: dict[str, Any], spec: AdapterSpec, name: str,
                          tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Our `adapter_state_dict` entries of one layer, from its PEFT tensors (keyed by our names)."""
        return {f"{name}.{self.keys[suffix]}": t for suffix, t in tensors.items()}

    def rank_pattern(self, cfg: dict[str, Any], spec: AdapterSpec, layers: list[str]) -> dict[str, int]:
        """Per-layer ranks for `build` (layers whose rank differs from spec.r)."""
        return {}

    # ----- export -------------------------------------------------------------------------------
    def export(self, adapted) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:  # pragma: no cover - abstract
        """(adapter_config.json values, tensors under PEFT's saved key names)."""
        raise NotImplementedError

    @staticmethod
    def common_config(adapted, layers: list[str]) -> dict[str, Any]:
        fan_in_fan_out = any(adapted.layers[name].fan_in_fan_out for name in layers)
        return {"target_modules": sorted(layers), "fan_in_fan_out": fan_in_fan_out, "bias": "none",
                "inference_mode": True, "task_type": None, "base_model_name_or_path": None, "modules_to_save": None}


def _factor(scaling: str, r: int) -> float:
    """factor(r, alpha) / alpha of a scaling part (both of ours are linear in alpha, as PEFT's)."""
    return _parts.part_class("scaling", scaling).factor(r, 1.0)


class LoraCodec(Codec):
    peft_type = "LORA"
    layer_kinds = ("lora", "dora", "sora")
    defaults = {"r": 8, "lora_alpha": 8, "lora_dropout": 0.0, "use_rslora": False, "use_dora": False,
                "rank_pattern": {}, "alpha_pattern": {}, "init_lora_weights": True}
    # initialisation recipes (their effect on A and B is overwritten by the file) and runtime knobs
    ignored = frozenset({"loftq_config", "eva_config", "corda_config", "lora_ga_config", "megatron_core",
                         "runtime_config", "qalora_group_size", "ensure_weight_tying"})
    keys = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B", "lora_magnitude_vector": "magnitude"}

    def read_config(self, config, where):
        cfg = super().read_config(config, where)
        init = cfg["init_lora_weights"]
        if init not in LORA_INITS or isinstance(init, (int, float)) and not isinstance(init, bool):
            raise ValueError(f"{where}: PEFT option init_lora_weights={init!r} is not supported (it changes the base "
                             f"weights or the layer when PEFT builds it; readable: {', '.join(map(repr, LORA_INITS))})")
        for key in ("rank_pattern", "alpha_pattern"):
            cfg[key] = dict(cfg[key] or {})
        return cfg

    def spec(self, cfg, layers):
        return AdapterSpec(layer="dora" if cfg["use_dora"] else "lora",
                           scaling="rslora" if cfg["use_rslora"] else "standard", r=cfg["r"], alpha=cfg["lora_alpha"],
                           dropout=cfg["lora_dropout"], target_modules=tuple(layers))

    def layer_rank(self, cfg, spec, name):
        return pattern_value(cfg["rank_pattern"], name, cfg["r"])

    def peft_scale(self, cfg, spec, name) -> float:
        """s_k of module `name` as PEFT computes it."""
        r_k = self.layer_rank(cfg, spec, name)
        return pattern_value(cfg["alpha_pattern"], name, cfg["lora_alpha"]) * _factor(spec.scaling, r_k)

    def peft_shapes(self, cfg, spec, name, in_features, out_features):
        r_k = self.layer_rank(cfg, spec, name)
        shapes = {"lora_A.weight": (r_k, in_features), "lora_B.weight": (out_features, r_k)}
        if cfg["use_dora"]:
            shapes["lora_magnitude_vector"] = (out_features,)
        return shapes

    def our_layer_tensors(self, cfg, spec, name, tensors):
        out = super().our_layer_tensors(cfg, spec, name, tensors)
        ratio = self.peft_scale(cfg, spec, name) / spec.scale
        if ratio != 1.0:  # our layer scales by spec.scale: fold PEFT's per-layer scale into B
            out[f"{name}.lora_B"] = out[f"{name}.lora_B"].double() * ratio  # cast to the layer's dtype on load
        return out

    def rank_pattern(self, cfg, spec, layers):
        ranks = {name: self.layer_rank(cfg, spec, name) for name in layers}
        return {name: r for name, r in ranks.items() if r != spec.r}

    # ----- export -------------------------------------------------------------------------------
    @staticmethod
    def factors(layer) -> dict[str, torch.Tensor]:
        """lora_A, lora_B (and magnitude) of a layer as a plain LoRA/DoRA: a gate between A and B
        (SoRA) is folded into B and its closed (zero) entries dropped — exact, as g_i = 0 removes
        the i-th rank-one term."""
        state = dict(layer.adapter_state())
        gate = state.pop("gate", None)
        if gate is not None:
            keep = gate.detach() != 0
            state["lora_A"] = state["lora_A"][keep]
            state["lora_B"] = (state["lora_B"] * gate)[:, keep]
        return state

    def export(self, adapted):
        spec = adapted.spec
        init = adapted.part("init")
        # A base-rewriting init (PiSSA, OLoRA, ...) exports PEFT's conversion against the original
        # base: rank r·2 per layer ([A; A0], [B, −B0], init.peft_factors) and the alpha that keeps
        # s (2·alpha standard, √2·alpha rsLoRA), as PEFT's path_initial_model_for_weight_conversion.
        mult = init.peft_rank_multiplier
        r_conf = spec.r * mult
        alpha_conf = spec.alpha if mult == 1 else spec.alpha * (_factor(spec.scaling, spec.r) /
                                                                _factor(spec.scaling, r_conf))
        rank_pattern: dict[str, int] = {}
        alpha_pattern: dict[str, float] = {}
        tensors: dict[str, torch.Tensor] = {}
        layers = []
        for name, layer in adapted.layers.items():
            factors = init.peft_factors(name, layer, self.factors(layer))
            r_k = factors["lora_A"].shape[0]
            if r_k == 0:  # pruned away: no update, and PEFT's LoRA cannot hold rank 0
                continue
            layers.append(name)
            if r_k != r_conf:
                rank_pattern[name] = r_k
            if r_k != r_conf or layer.scale != spec.scale:
                alpha_k = layer.scale / _factor(spec.scaling, r_k)  # PEFT's alpha_k · factor(r_k) = our scale
                if alpha_k != alpha_conf:
                    alpha_pattern[name] = alpha_k
            ours = {v: k for k, v in self.keys.items()}
            for key, tensor in factors.items():
                tensors[f"{PREFIX}{name}.{ours[key]}"] = tensor
        if not layers:
            raise ValueError(f"{spec.label}: every layer was pruned to rank 0, there is no adapter to export")
        config = {**self.common_config(adapted, layers), "peft_type": "LORA", "r": r_conf, "lora_alpha": alpha_conf,
                  "lora_dropout": spec.dropout, "use_rslora": spec.scaling == "rslora",
                  "use_dora": any("lora_magnitude_vector" in k for k in tensors), "init_lora_weights": True,
                  "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}
        return config, tensors


class VeraCodec(Codec):
    peft_type = "VERA"
    layer_kinds = ("vera",)
    defaults = {"r": 256, "vera_dropout": 0.0, "d_initial": 0.1, "projection_prng_key": 0, "save_projection": True}
    ignored = frozenset({"init_weights"})  # only how λ_b, λ_d start
    keys = {"vera_lambda_b": "lambda_b", "vera_lambda_d": "lambda_d"}
    shared = {"base_model.vera_A": "A", "base_model.vera_B": "B"}  # the shared pair's keys -> buffer names

    def spec(self, cfg, layers):
        return AdapterSpec(layer="vera", r=cfg["r"], dropout=cfg["vera_dropout"], target_modules=tuple(layers),
                           options={"d_initial": cfg["d_initial"], "projection_prng_key": cfg["projection_prng_key"],
                                    "save_projection": cfg["save_projection"]})

    def peft_shapes(self, cfg, spec, name, in_features, out_features):
        return {"vera_lambda_b": (out_features,), "vera_lambda_d": (spec.r,)}

    def shared_shapes(self, spec, dims):
        """The shared pair: (r, largest in) and (largest out, r) over the adapted layers."""
        return {"base_model.vera_A": (spec.r, max(i for i, _ in dims)),
                "base_model.vera_B": (max(o for _, o in dims), spec.r)}

    def export(self, adapted):
        spec, opts = adapted.spec, adapted.layer_kind.opts
        ours = {v: k for k, v in self.keys.items()}
        tensors = {f"{PREFIX}{name}.{ours[key]}": t for name, layer in adapted.layers.items()
                   for key, t in layer.adapter_state().items()}
        if opts.save_projection:
            (projections,) = adapted.layer_kind.shared_modules().values()
            for key, buffer in self.shared.items():
                tensors[key] = getattr(projections, buffer)
        config = {**self.common_config(adapted, list(adapted.layers)), "peft_type": "VERA", "r": spec.r,
                  "vera_dropout": spec.dropout, "d_initial": opts.d_initial,
                  "projection_prng_key": opts.projection_prng_key, "save_projection": opts.save_projection,
                  "init_weights": True}
        return config, tensors


def _mask_key(name: str) -> str:
    return f"{name}.lora_E"


class AdaLoraCodec(Codec):
    peft_type = "ADALORA"
    layer_kinds = ("adalora",)
    defaults = {"init_r": 12, "target_r": 8, "tinit": 0, "tfinal": 0, "deltaT": 1, "beta1": 0.85, "beta2": 0.85,
                "orth_reg_weight": 0.5, "total_step": None, "lora_alpha": 8, "lora_dropout": 0.0,
                "rank_pattern": None, "init_lora_weights": True}
    # AdaLoRA ignores r (init_r is its rank) and use_rslora (its scale is alpha/ranknum by definition)
    ignored = frozenset({"r", "use_rslora", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
                         "megatron_core", "runtime_config", "qalora_group_size", "ensure_weight_tying", "alpha_pattern"})
    keys = {"lora_A": "lora_A", "lora_E": "lora_E", "lora_B": "lora_B"}

    def read_config(self, config, where):
        cfg = super().read_config(config, where)
        masks = {}
        for key, mask in (cfg["rank_pattern"] or {}).items():
            # PEFT saves "<module>.lora_E" (the adapter name removed); accept it still present too
            module = key.split(".lora_E", 1)[0]
            if not isinstance(mask, list) or not all(isinstance(v, bool) for v in mask):
                raise ValueError(f"{where}: AdaLoRA rank_pattern[{key!r}] must be a list of booleans, got {mask!r}")
            masks[module] = mask
        cfg["rank_pattern"] = masks
        return cfg

    def spec(self, cfg, layers):
        # PEFT's AdaLoRA scale is lora_alpha, or init_r when lora_alpha is 0, over ranknum
        alpha = cfg["lora_alpha"] if cfg["lora_alpha"] and cfg["lora_alpha"] > 0 else cfg["init_r"]
        return AdapterSpec(layer="adalora", r=cfg["init_r"], alpha=alpha, dropout=cfg["lora_dropout"],
                           target_modules=tuple(layers),
                           options={"target_r": cfg["target_r"], "tinit": cfg["tinit"], "tfinal": cfg["tfinal"],
                                    "delta_t": cfg["deltaT"], "beta1": cfg["beta1"], "beta2": cfg["beta2"],
                                    "orth_reg_weight": cfg["orth_reg_weight"], "total_step": cfg["total_step"]})

    def mask(self, cfg, spec, name) -> torch.Tensor | None:
        mask = cfg["rank_pattern"].get(name)
        if mask is None:
            return None
        if len(mask) != spec.r:
            raise ValueError(f"AdaLoRA rank_pattern of {name} has {len(mask)} entries, init_r is {spec.r}")
        return torch.tensor(mask, dtype=torch.bool)

    def layer_rank(self, cfg, spec, name):
        mask = self.mask(cfg, spec, name)
        return spec.r if mask is None else int(mask.sum())

    def peft_shapes(self, cfg, spec, name, in_features, out_features):
        k = self.layer_rank(cfg, spec, name)
        return {"lora_A": (k, in_features), "lora_E": (k, 1), "lora_B": (out_features, k)}

    def our_layer_tensors(self, cfg, spec, name, tensors):
        mask = self.mask(cfg, spec, name)
        if mask is None:
            return super().our_layer_tensors(cfg, spec, name, tensors)
        # the kept triplets go back to their positions; pruned ones get E = 0 (and A, B rows 0: unused)
        A = tensors["lora_A"].new_zeros((spec.r, tensors["lora_A"].shape[1]))
        E = tensors["lora_E"].new_zeros((spec.r, 1))
        B = tensors["lora_B"].new_zeros((tensors["lora_B"].shape[0], spec.r))
        A[mask], E[mask], B[:, mask] = tensors["lora_A"], tensors["lora_E"], tensors["lora_B"]
        return {f"{name}.lora_A": A, f"{name}.lora_E": E, f"{name}.lora_B": B,
                f"@layer.{name}.rank_mask": mask.to(torch.uint8)}

    def export(self, adapted):
        spec, opts = adapted.spec, adapted.layer_kind.opts
        # the allocator's fixed mask, as the layer kind persists it ("<layer>.rank_mask")
        masks = {key.rsplit(".", 1)[0]: t.bool() for key, t in adapted.layer_kind.adapter_tensors(adapted).items()
                 if key.endswith(".rank_mask")}
        tensors = {}
        for name, layer in adapted.layers.items():
            state = layer.adapter_state()
            mask = masks.get(name)
            if mask is not None:
                state = {"lora_A": state["lora_A"][mask], "lora_E": state["lora_E"][mask],
                         "lora_B": state["lora_B"][:, mask]}
            tensors.update({f"{PREFIX}{name}.{key}": t for key, t in state.items()})
        config = {**self.common_config(adapted, list(adapted.layers)), "peft_type": "ADALORA",
                  "init_r": spec.r, "target_r": opts.target_r, "tinit": opts.tinit, "tfinal": opts.tfinal,
                  "deltaT": opts.delta_t, "beta1": opts.beta1, "beta2": opts.beta2,
                  "orth_reg_weight": opts.orth_reg_weight, "total_step": opts.total_step, "lora_alpha": spec.alpha,
                  "lora_dropout": spec.dropout, "init_lora_weights": True,
                  "rank_pattern": {_mask_key(n): m.tolist() for n, m in masks.items()} or None}
        return config, tensors


CODECS: dict[str, Codec] = {c.peft_type: c for c in (LoraCodec(), VeraCodec(), AdaLoraCodec())}


def codec_for_type(peft_type: Any, where: str) -> Codec:
    """The codec of a PEFT adapter type, or a ValueError naming the type."""
    codec = CODECS.get(peft_type)
    if codec is None:
        raise ValueError(f"{where}: PEFT adapter type {peft_type!r} cannot be read "
                         f"(readable: {', '.join(sorted(CODECS))})")
    return codec


def to_peft(adapted) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(adapter_config.json, tensors by PEFT key) of an adapter, or a ValueError saying why PEFT cannot hold it."""
    spec = adapted.spec
    kind = adapted.layer_kind
    peft_type = kind.peft_type  # the PEFT type a layer kind exports as (None: PEFT lacks it)
    blockers = [f"{p.slot}={p.name}" for p in adapted.parts if not p.peft_exportable]
    codec = CODECS.get(peft_type)
    if codec is None or kind.name not in codec.layer_kinds or blockers:
        why = ", ".join(blockers) or f"layer={spec.layer}"
        raise ValueError(f"{spec.label} cannot be exported in PEFT's format ({why} has no PEFT equivalent)")
    return codec.export(adapted)
