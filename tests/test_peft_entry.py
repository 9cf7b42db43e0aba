"""A params entry `variants.<name>: {peft_adapter: <folder>}`: a PEFT adapter trained elsewhere is
imported by `train@<name>` (not trained), evaluated by `evaluate@<name>` like any variant, and shown
in the comparison with its quality and "imported" training columns."""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import os
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from stage_cmds import stage_argv
from tiny_assets import save_tiny_model, small_pipeline_params

import variants
from pipeline.params import ParamsError, params_from_dict
from pipeline.schemas import METRIC_COLUMNS, validate_metrics

ROOT = Path(__file__).resolve().parents[1]


def save_peft_lora(base_dir: Path, folder: Path, seed: int = 3) -> Path:
    """A PEFT LoRA adapter (random, non-zero B) on the base model, saved with save_pretrained."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    peft_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """params.yaml with a trained `lora` and an imported `mine`; prepared data; the tiny base; the PEFT folder."""
    root = tmp_path_factory.mktemp("peft_entry")
    model_dir = save_tiny_model(root / "tiny-model")
    save_tiny_model(root / "models" / "base")
    (root / "models" / "base" / "summary.json").write_text("{}")
    save_peft_lora(root / "models" / "base", root / "elsewhere" / "mine")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = small_pipeline_params(raw, model_dir, {"lora": {"r": 2}, "mine": {}}, steps=2, eval_interval=1,
                                   checkpoint_interval=0)
    params["variants"]["mine"] = {"peft_adapter": "elsewhere/mine"}  # relative: to the repository root
    params["tracking"]["enabled"] = False
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        from pipeline import evaluate, prepare, select, train

        assert prepare.main(stage_argv("prepare")) == 0
        for name in ("lora", "mine"):
            assert train.main(stage_argv(f"train@{name}-0-1")) == 0, name
            assert select.main(stage_argv(f"select@{name}")) == 0, name
            assert evaluate.main(stage_argv(f"evaluate@{name}-0")) == 0, name
        assert evaluate.main(stage_argv("evaluate_base")) == 0
    finally:
        os.chdir(cwd)
    return root


def test_the_imported_adapter_evaluates_as_pefts_own_model(workspace):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from pipeline.gguf_base import load_base
    from pipeline.lm import encode_records, mean_response_loss
    from pipeline.splits import read_split

    base = workspace / "models" / "base"
    model, tokenizer = load_base(str(base), "float32", False)
    ours = variants.load(model, workspace / "models/adapters/mine/seed0/lr1")  # what evaluate@mine-0 loads
    oracle = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), workspace / "elsewhere" / "mine").eval()
    ids = torch.randint(3, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = oracle(input_ids=ids).logits
        plain = LlamaForCausalLM.from_pretrained(base).eval()(input_ids=ids).logits
        got = ours.model(input_ids=ids).logits
    assert (expected - plain).abs().max() > 1e-3  # the adapter changes the output
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)

    # and the stage's own number: the eval loss it wrote is PEFT's model's eval loss on the test split
    metrics = json.loads((workspace / "reports/metrics/mine/seed0.json").read_text())
    test = encode_records(tokenizer, read_split(str(workspace / "data" / "prepared"), "test"), 32)
    peft_loss = mean_response_loss(oracle, test, 8, tokenizer.pad_token_id, torch.device("cpu"))
    assert metrics["eval_loss"] == pytest.approx(peft_loss, rel=1e-5)


def test_the_train_stage_imports_records_the_source_and_trains_nothing(workspace):
    adapter = workspace / "models/adapters/mine/seed0/lr1"
    summary = json.loads((adapter / "train_summary.json").read_text())
    source = workspace / "elsewhere" / "mine"
    assert summary["imported_from"] == {"path": "elsewhere/mine", "sha256": {
        f: hashlib.sha256((source / f).read_bytes()).hexdigest()
        for f in ("adapter_config.json", "adapter_model.safetensors")}}
    assert (summary["steps"], summary["train_seconds"], summary["tokens"], summary["tokens_per_second"]) == (0, 0, 0, 0)
    assert summary["training_memory_bytes"] is None and summary["peak_memory_bytes"] is None
    # LoRA r=4 on q_proj (32->32), v_proj (32->16: 2 kv heads of 8), down_proj (48->32) in 2 layers
    assert summary["trainable_params"] == 2 * 4 * ((32 + 32) + (32 + 16) + (48 + 32))
    assert summary["spec"]["r"] == 4 and summary["spec"]["alpha"] == 8
    with open(workspace / "reports/curves/mine/seed0-lr1.csv", newline="") as handle:
        assert list(csv.reader(handle)) == [["step", "loss", "lr", "grad_norm", "val_loss", "tokens", "seconds"]]
    # nothing was validated: select keeps the multiple nearest 1, with no lr (the adapter was not trained here)
    selection = json.loads((workspace / "reports/selection/mine.json").read_text())
    assert (selection["lr_multiple"], selection["lr"]) == ("1", None)
    assert (summary["seed"], summary["lr_multiple"], summary["val_loss_final"]) == (0, "1", None)
    assert json.loads((adapter / "mlflow.json").read_text())["run_id"] is None  # tracking is off here

    metrics = json.loads((workspace / "reports/metrics/mine/seed0.json").read_text())
    validate_metrics(pd.DataFrame([{k: metrics[k] for k in METRIC_COLUMNS}], columns=list(METRIC_COLUMNS)))
    assert metrics["trainable_params"] == summary["trainable_params"] and metrics["steps"] == 0
    assert metrics["training_memory_bytes"] is None and metrics["phoneme_error_rate"] is not None


def test_compare_shows_the_imported_row_with_its_quality_and_no_training_numbers(workspace, monkeypatch):
    from pipeline import compare

    monkeypatch.chdir(workspace)
    plotted = {}
    monkeypatch.setattr(compare, "make_plots", lambda folder, rows, curves, g2p: plotted.update(curves=dict(curves),
                                                                                               rows=dict(rows)))
    assert compare.main(stage_argv("compare")) == 0
    table = pd.read_csv(workspace / "reports" / "comparison.csv").set_index("variant")
    assert table.loc["mine", "memory_label"] == "imported"
    assert table.loc["mine", "quality_label"] in ("better", "comparable", "worse")  # compared with LoRA
    assert pd.isna(table.loc["mine", "training_memory_bytes"]) and table.loc["lora", "memory_label"] != "imported"
    assert sorted(plotted["curves"]) == ["lora"]  # no loss curve for an adapter not trained here

    md = (workspace / "reports" / "comparison.md").read_text()
    zh = (workspace / "reports" / "comparison.zh.md").read_text()
    (row,) = [line for line in md.splitlines() if line.startswith("| mine |") and "%" in line]  # section 2
    assert row.endswith("| imported | imported | imported | imported | imported |")
    assert f"{json.loads((workspace / 'reports/metrics/mine/seed0.json').read_text())['phoneme_error_rate']:.3f}" in row
    (row_zh,) = [line for line in zh.splitlines() if line.startswith("| mine |") and "%" in line]
    assert row_zh.endswith("| 导入 | 导入 | 导入 | 导入 | 导入 |")
    (t1,) = [line for line in md.splitlines() if line.startswith("| mine |") and "%" not in line]
    assert "| imported |" in t1  # the memory column of section 1
    assert "Imported, not trained here: mine" in md
    assert not any(line.startswith("| mine |") for line in md.split("## 3.")[1].split("## 4.")[0].splitlines())


# ----- bad entries fail at params load, naming the key and the value ------------------------------------------
@pytest.fixture
def base_params(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["variants"] = {"lora": raw["variants"]["lora"]}
    raw["run"] = ["lora"]
    return raw


def _with(raw, entry):
    raw = copy.deepcopy(raw)
    raw["variants"]["mine"] = entry
    raw["run"] = ["lora", "mine"]
    return raw


def test_a_good_entry_gives_the_folders_spec(tmp_path, base_params):
    folder = save_peft_lora(save_tiny_model(tmp_path / "m"), tmp_path / "peft")
    v = params_from_dict(_with(base_params, {"peft_adapter": str(folder)})).variants["mine"]
    assert v.peft_adapter == str(folder)
    assert (v.spec.layer, v.spec.r, v.spec.alpha) == ("lora", 4, 8)
    assert v.spec == variants.peft_spec(folder)


def test_a_missing_folder_is_refused_naming_key_and_path(base_params):
    with pytest.raises(ParamsError, match=r"variants\.mine\.peft_adapter: no such folder 'nowhere/adapter'"):
        params_from_dict(_with(base_params, {"peft_adapter": "nowhere/adapter"}))
    with pytest.raises(ParamsError, match=r"variants\.mine\.peft_adapter must name a PEFT adapter folder, got 3"):
        params_from_dict(_with(base_params, {"peft_adapter": 3}))


def test_other_keys_next_to_peft_adapter_are_refused_by_name(tmp_path, base_params):
    folder = save_peft_lora(save_tiny_model(tmp_path / "m"), tmp_path / "peft")
    with pytest.raises(ParamsError, match=r"variants\.mine: peft_adapter takes no other key, got r=16, lr=0\.01"):
        params_from_dict(_with(base_params, {"peft_adapter": str(folder), "r": 16, "lr": 0.01}))
    with pytest.raises(ParamsError, match=r"got preset='lora'"):
        params_from_dict(_with(base_params, {"preset": "lora", "peft_adapter": str(folder)}))


def test_an_unreadable_peft_folder_is_refused_naming_key_path_and_problem(tmp_path, base_params):
    folder = save_peft_lora(save_tiny_model(tmp_path / "m"), tmp_path / "peft")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(ParamsError, match=rf"variants\.mine\.peft_adapter \('{folder}'\): .*IA3"):
        params_from_dict(_with(base_params, {"peft_adapter": str(folder)}))
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(ParamsError, match=r"variants\.mine\.peft_adapter .*not valid JSON"):
        params_from_dict(_with(base_params, {"peft_adapter": str(folder)}))
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "adapter_model.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(ParamsError, match=r"variants\.mine\.peft_adapter .*not a readable safetensors file"):
        params_from_dict(_with(base_params, {"peft_adapter": str(folder)}))
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(ParamsError, match=r"variants\.mine\.peft_adapter .*no PEFT adapter tensors"):
        params_from_dict(_with(base_params, {"peft_adapter": str(folder)}))


def test_peft_spec_reads_keys_only(tmp_path, monkeypatch):
    folder = save_peft_lora(save_tiny_model(tmp_path / "m"), tmp_path / "peft")
    from variants import peft_load

    monkeypatch.setattr(peft_load, "load_file", lambda *a, **k: pytest.fail("peft_spec loaded the tensors"))
    spec = variants.peft_spec(folder)
    # the adapted modules come from the file's keys (its header), not from target_modules
    assert spec.target_modules == tuple(f"model.layers.{i}.{m}" for i in (0, 1)
                                        for m in ("mlp.down_proj", "self_attn.q_proj", "self_attn.v_proj"))


def test_an_adapter_for_another_model_fails_the_train_stage_naming_the_entry_and_writes_nothing(
        workspace, tmp_path, monkeypatch, capsys):
    from conftest import tiny_llama
    from peft import LoraConfig, get_peft_model

    from pipeline import train

    # the same module names, other shapes: the params check (config + keys) passes, the base does not fit
    other = get_peft_model(tiny_llama(hidden_size=64, intermediate_size=96), LoraConfig(r=4, target_modules=["q_proj"]))
    other.save_pretrained(tmp_path / "other")
    raw = yaml.safe_load((workspace / "params.yaml").read_text())
    raw["variants"] = {"lora": raw["variants"]["lora"], "other": {"peft_adapter": str(tmp_path / "other")}}
    raw["run"] = ["lora", "other"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "base").symlink_to(workspace / "models" / "base")
    monkeypatch.chdir(tmp_path)
    assert train.main(stage_argv("train@other-0-1")) == 1
    err = capsys.readouterr().err
    assert f"variants.other.peft_adapter ('{tmp_path / 'other'}')" in err and "shape" in err
    assert not (tmp_path / "models" / "adapters").exists() and not (tmp_path / "reports").exists()
