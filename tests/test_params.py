"""params.yaml -> typed configs: the committed file loads, and every kind of mistake fails with its key path."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.params import ParamsError, load_params, params_from_dict

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def raw():
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_committed_params_load_into_typed_configs():
    params = load_params(ROOT / "params.yaml")
    assert params.model.source == "smollm2" and params.data.source == "cmudict"
    assert isinstance(params.train.lr, float) and params.train.steps > params.train.warmup_steps
    default_run = ("lora", "rslora", "dora", "vera", "lora_fa", "lora_plus", "delta_lora", "qlora", "loftq", "adalora",
                   "sora")
    # the catalog holds more than the default run trains (the initialisation family: docs/init-family.md)
    assert list(params.variants) == [*default_run, "pissa", "olora", "pissa_dora", "olora_rslora", "eva", "corda",
                                     "lora_ga", "eva_lora_plus"]
    data_aware = {n: params.variants[n].spec for n in ("eva", "corda", "lora_ga", "eva_lora_plus")}
    assert {n: (sp.init, sp.layer, sp.optimizer) for n, sp in data_aware.items()} == {
        "eva": ("eva", "lora", "adamw"), "corda": ("corda", "lora", "adamw"), "lora_ga": ("lora_ga", "lora", "adamw"),
        "eva_lora_plus": ("eva", "lora", "lora_plus")}
    assert all(sp.options["init_batches"] == 4 and sp.r == 8 for sp in data_aware.values())
    assert data_aware["eva"].options["eva_max_passes"] == 15 and data_aware["corda"].options["corda_method"] == "ipm"
    family = {n: params.variants[n].spec for n in ("pissa", "olora", "pissa_dora", "olora_rslora")}
    assert {n: (sp.init, sp.layer, sp.scaling) for n, sp in family.items()} == {
        "pissa": ("pissa", "lora", "standard"), "olora": ("olora", "lora", "standard"),
        "pissa_dora": ("pissa", "dora", "standard"), "olora_rslora": ("olora", "lora", "rslora")}
    assert family["pissa"].options["pissa_niter"] == 4 and family["pissa"].r == 8 and family["pissa"].alpha == 16
    assert params.variants["adalora"].spec.options["total_step"] == params.train.steps
    assert params.variants["qlora"].spec.base == "nf4" and params.variants["loftq"].spec.init == "loftq"
    assert params.variant in params.variants
    vera = params.variants["vera"]
    assert vera.spec.layer == "vera" and vera.spec.r == 256 and vera.learning_rate(params.train) == 2e-2
    assert params.variants["lora"].learning_rate(params.train) == params.train.lr
    assert params.variants["lora_plus"].spec.options["loraplus_ratio"] == 16.0
    # the default grid: every catalog entry, one seed, each method's own lr, chosen on the final validation loss
    assert params.run == default_run and params.seeds == (0,)
    assert [(p.label, p.factor) for p in params.lr_grid] == [("1", 1.0)] and params.lr_selection == "final_val_loss"


def test_a_stage_that_builds_no_model_loads_params_without_torch():
    code = ("import sys; from pipeline.params import load_params; p = load_params('params.yaml', adapter_specs=False); "
            "print(p.variants['vera'].learning_rate(p.train, 0.5), p.variants['vera'].spec, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["0.01", "None", "False"], done.stdout + done.stderr
    with pytest.raises(ParamsError, match="variants.lora.lr must be a positive number"):  # lr is still checked
        params_from_dict(_mutate(yaml.safe_load((ROOT / "params.yaml").read_text()), "variants.lora.lr", 0),
                         adapter_specs=False)


def _mutate(raw, path: str, value):
    raw = copy.deepcopy(raw)
    node = raw
    keys = path.split(".")
    for key in keys[:-1]:
        node = node[key]
    if value is _DELETE:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return raw


_DELETE = object()


@pytest.mark.parametrize("path, value, fragment", [
    ("train.lr", "fast", "train.lr must be a positive number, got 'fast'"),
    ("train.lr", -1e-3, "train.lr must be a positive number, got -0.001"),
    ("train.steps", 0, "train.steps must be a positive integer, got 0"),
    ("train.steps", 2.5, "train.steps must be a positive integer, got 2.5"),
    ("train.batch_size", True, "train.batch_size must be a positive integer, got True"),
    ("train.schedule", "step", "train.schedule must be one of constant, linear, cosine, got 'step'"),
    ("train.device", "tpu", "train.device must be one of auto, cpu, cuda, got 'tpu'"),
    ("train.grad_clip", 0, "train.grad_clip must be a positive number, got 0"),
    ("train.warmup_steps", 999, "train.warmup_steps (999) must be smaller than train.steps"),
    ("train.tokens", 5, "train.tokens: unknown key"),
    ("trian", {}, "trian: unknown key"),
    ("data.n_test", -1, "data.n_test must be a positive integer, got -1"),
    ("data.source", "csv", "data.source must be one of cmudict, jsonl, hf, got 'csv'"),
    ("data.keep_stress", "no", "data.keep_stress must be true or false, got 'no'"),
    ("quantize.blocksize", 100, "quantize.blocksize must be one of 64, 128"),
    ("seed", -3, "seed must be a non-negative integer, got -3"),
    ("variants.vera.r", "eight", "variants.vera: r must be a positive integer, got 'eight'"),
    ("variants.vera.r", 0, "variants.vera: r must be a positive integer, got 0"),
    ("variants.lora.alpha", -2, "variants.lora: alpha must be a positive number, got -2"),
    ("variants.lora.dropout", 1.5, "variants.lora: dropout must be in [0, 1), got 1.5"),
    ("variants.lora.preset", "lorax", "variants.lora: unknown variant 'lorax'"),
    ("variants.lora.layer", "conv", "variants.lora: unknown layer kind 'conv'"),
    ("variants.lora.rank", 8, "variants.lora: unknown option 'rank'"),
    ("variants.lora.lr", 0, "variants.lora.lr must be a positive number, got 0"),
    ("variants.vera.optimizer", "lora_fa", "variants.vera: incompatible combination: optimizer=lora_fa with layer=vera"),
    ("variants.delta_lora.dropout", 0.1, "incompatible combination: step=delta_lora with dropout=0.1"),
    ("variant", "qdora", "variant must name an entry of run"),
    ("variants", {}, "variants must be a non-empty mapping"),
    ("model.source", "./no/such/folder", "model.source: no such model folder './no/such/folder'"),
    ("model.dtype", "int8", "model.dtype must be one of float32, bfloat16, float16, got 'int8'"),
    ("variants.adalora.total_step", 7, "variants.adalora.total_step (7) must equal train.steps"),
    ("variants.qlora.quant_blocksize", 128, "variants.qlora asks base=nf4, double_quant=True, quant_blocksize=128"),
    ("tracking.uri", "sqlite:////tmp/elsewhere.db", "tracking.uri must be null, an http(s):// server or a sqlite:///"),
    ("tracking.uri", "file:///tmp/mlruns", "tracking.uri must be null"),
    ("train.checkpoint_interval", -1, "train.checkpoint_interval must be a non-negative integer, got -1"),
])
def test_bad_params_fail_with_key_path_and_value(raw, path, value, fragment):
    with pytest.raises(ParamsError) as err:
        params_from_dict(_mutate(raw, path, value))
    assert fragment in str(err.value)


def test_variant_names_must_be_safe_file_names(raw):
    raw = copy.deepcopy(raw)
    raw["variants"]["../../etc"] = raw["variants"]["lora"]
    with pytest.raises(ParamsError, match="variant names must be lowercase identifiers"):
        params_from_dict(raw)


def test_jsonl_source_needs_an_existing_file(raw, tmp_path):
    raw = _mutate(raw, "data.source", "jsonl")
    with pytest.raises(ParamsError, match="data.path must name a JSONL file"):
        params_from_dict(raw)
    with pytest.raises(ParamsError, match="no such file"):
        params_from_dict(_mutate(raw, "data.path", str(tmp_path / "missing.jsonl")))
    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    assert params_from_dict(_mutate(raw, "data.path", str(tmp_path / "d.jsonl"))).data.path.endswith("d.jsonl")


def test_unreadable_files(tmp_path):
    with pytest.raises(ParamsError, match="no such params file"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(tmp_path / "params.yaml")
