"""Read an adapter saved by PEFT (`save_pretrained`) into our layers: `load_peft(model, folder)`.

The folder's `adapter_config.json` names the PEFT type (LORA with use_rslora / use_dora /
rank_pattern / alpha_pattern, VERA, ADALORA — the methods PEFT and we share); the codec of that
type (`peft_format`) turns the config into our spec and PEFT's tensor keys into ours, so the
returned AdaptedModel computes what `PeftModel.from_pretrained(model, folder)` computes.

Everything is checked before the model is touched: the adapter type, every config option (an
option that changes what the adapter computes and that we do not implement is refused by
name), the tensor keys, and every tensor's shape against the model's layers. Only
`adapter_model.safetensors` is read: a `.bin` adapter is a pickle, and we never unpickle.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from .core import in_out_features
from .model import AdaptedModel, build
from .peft_format import PREFIX, Codec, codec_for_type
from .targets import find_targets

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLED_WEIGHTS_NAME = "adapter_model.bin"
# PEFT keys of adapters we cannot read, and why (shown when such a key turns up)
FOREIGN_KEYS = {"lora_embedding_A": "LoRA on an embedding layer", "lora_embedding_B": "LoRA on an embedding layer",
                "lora_B.bias": "a bias on lora_B (lora_bias)"}


def read_peft_config(folder: Path) -> dict:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no PEFT adapter config at {path}")
    config = json.loads(path.read_text())
    if not isinstance(config, dict) or "peft_type" not in config:
        raise ValueError(f"{path} is not a PEFT adapter config (it has no peft_type)")
    return config


def read_peft_tensors(folder: Path) -> dict[str, torch.Tensor]:
    path = folder / WEIGHTS_NAME
    if not path.is_file():
        if (folder / PICKLED_WEIGHTS_NAME).is_file():
            raise ValueError(f"{folder}: only {WEIGHTS_NAME} is read; {PICKLED_WEIGHTS_NAME} is a pickle, which "
                             "load_peft never unpickles (save the adapter with safe_serialization=True)")
        raise FileNotFoundError(f"no PEFT adapter tensors at {path}")
    return load_file(str(path))


def split_keys(tensors: dict[str, torch.Tensor], codec: Codec,
               where: str) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """PEFT's flat keys as (module name -> {key suffix: tensor}, shared key -> tensor)."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    shared: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, tensor in tensors.items():
        if key in codec.shared:
            shared[key] = tensor
            continue
        rest = key[len(PREFIX):] if key.startswith(PREFIX) else None
        suffix = next((s for s in codec.keys if rest is not None and rest.endswith("." + s)), None)
        if suffix is None:
            unexpected.append(key)
        else:
            layers.setdefault(rest[: -len(suffix) - 1], {})[suffix] = tensor
    if unexpected:
        # name the reason of the most telling key (PEFT also saves the embedding weight next to its LoRA)
        foreign = [(key, why) for key in unexpected for k, why in FOREIGN_KEYS.items() if f".{k}" in key]
        key, hint = foreign[0] if foreign else (unexpected[0], f"not a key of a {codec.peft_type} adapter")
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        raise ValueError(f"{where}: unexpected tensor {key!r}{more} ({hint}"
                         f"{' is not supported' if foreign else ''})")
    if not layers:
        raise ValueError(f"{where}: the adapter file holds no {codec.peft_type} layer tensors")
    return layers, shared


def _check_shapes(expected: dict[str, tuple[int, ...]], got: dict[str, torch.Tensor], prefix: str, where: str) -> None:
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{where}: tensors of {prefix.rstrip('.') or 'the adapter'} do not match the config: "
                         f"missing {missing}, unexpected {unexpected}")
    for key, shape in expected.items():
        if tuple(got[key].shape) != tuple(shape):
            raise ValueError(f"{where}: {prefix}{key} has shape {tuple(got[key].shape)}, this model and config "
                             f"need {tuple(shape)}")


def load_peft(model: nn.Module, folder: str | os.PathLike) -> AdaptedModel:
    """Build the PEFT adapter saved in `folder` on `model` (its base, fresh) and load its tensors.

    Returns our AdaptedModel, in eval mode as PEFT returns its model; its logits equal those of
    `PeftModel.from_pretrained(model, folder)`.
    """
    folder = Path(folder)
    where = str(folder)
    config = read_peft_config(folder)
    codec = codec_for_type(config["peft_type"], where)
    cfg = codec.read_config(config, where)
    layers, shared = split_keys(read_peft_tensors(folder), codec, where)
    try:
        spec = codec.spec(cfg, sorted(layers))
        targets = dict(find_targets(model, spec.target_modules))
        dims = {name: in_out_features(module) for name, module in targets.items()}
        for name, tensors in layers.items():
            _check_shapes(codec.peft_shapes(cfg, spec, name, *dims[name]), tensors, f"{PREFIX}{name}.", where)
        expected_shared = codec.shared_shapes(spec, list(dims.values()))
        _check_shapes({k: s for k, s in expected_shared.items() if k in shared}, shared, "", where)
        rank_pattern = codec.rank_pattern(cfg, spec, list(layers))
        ours = {}
        for name, tensors in layers.items():
            ours.update(codec.our_layer_tensors(cfg, spec, name, tensors))
    except ValueError as err:
        if str(err).startswith(where):
            raise
        raise ValueError(f"{where}: {err}") from err

    # From here on the model changes (everything above was checked first).
    adapted = build(model, spec, rank_pattern=rank_pattern or None)
    if shared:
        (attr,) = adapted.layer_kind.shared_modules()
        ours.update({f"@shared.{attr}.{codec.shared[key]}": t for key, t in shared.items()})
    adapted.load_adapter_state_dict(ours)
    adapted.model.eval()  # as PeftModel.from_pretrained (dropout off); model.train() to train on
    return adapted
