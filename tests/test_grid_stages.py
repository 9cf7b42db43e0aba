"""The grid's cells at the stage scripts: train takes its cell from the command line (seed, lr multiple),
always validates at its last step and keeps cells' checkpoints apart; evaluate tests only the cell that
select chose, and refuses a selection or an adapter that does not match, before loading any model."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from stage_cmds import stage_argv
from tiny_assets import prepared_workspace, small_pipeline_params

from pipeline import evaluate, train
from pipeline.params import load_params

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("flag, value, fragment", [
    ("--lr-multiple", "-1", "argument --lr-multiple: must be a positive, finite number (a multiple of the "
                            "variant's lr), got '-1'"),
    ("--lr-multiple", "0", "got '0'"), ("--lr-multiple", "nan", "got 'nan'"), ("--lr-multiple", "inf", "got 'inf'"),
    ("--lr-multiple", "fast", "got 'fast'"),
    ("--seed", "-3", "argument --seed: must be a non-negative integer, got '-3'"), ("--seed", "1.5", "got '1.5'"),
])
def test_a_bad_cell_on_the_command_line_is_refused_naming_the_value(flag, value, fragment, capsys):
    with pytest.raises(SystemExit) as exited:
        train.parse(stage_argv("train@lora-0-1", flag, value))
    assert exited.value.code == 2 and fragment in capsys.readouterr().err


def test_the_cell_names_the_stage_and_keeps_its_label_as_given(monkeypatch):
    monkeypatch.chdir(ROOT)
    args, params = train.parse(stage_argv("train@vera-3-2.0"))
    assert (args.seed, args.lr_multiple, train.stage_name(args)) == (3, "2.0", "train@vera-3-2.0")
    assert params.get_variant("vera").learning_rate(params.train, float(args.lr_multiple)) == 4e-2
    assert "seed" not in params.declared and "lr_grid" not in params.declared and "seeds" not in params.declared


def test_a_checkpoint_resumes_only_its_own_cell():
    params = load_params(ROOT / "params.yaml")
    lora = params.get_variant("lora")

    def fingerprint(seed, factor):
        return train.run_fingerprint(params, lora, "no/data", "no/base", "no/quantized", seed, factor)

    assert fingerprint(0, 1.0) == fingerprint(0, 1.0)
    assert len({fingerprint(0, 1.0), fingerprint(1, 1.0), fingerprint(0, 2.0)}) == 3


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("grid-stages")
    params = small_pipeline_params(yaml.safe_load((ROOT / "params.yaml").read_text()), root / "models" / "base",
                                   {"lora": {"r": 2}}, steps=3, eval_interval=0, checkpoint_interval=0)
    params["tracking"]["enabled"] = False
    return prepared_workspace(root, params)


def test_train_validates_at_the_last_step_even_with_no_interval(workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    assert train.main(stage_argv("train@lora-2-0.5")) == 0
    curve = pd.read_csv(workspace / "reports/curves/lora/seed2-lr0.5.csv")
    assert list(curve["step"]) == [1, 2, 3] and list(curve["val_loss"].notna()) == [False, False, True]
    summary = json.loads((workspace / "models/adapters/lora/seed2/lr0.5/train_summary.json").read_text())
    assert (summary["seed"], summary["lr_multiple"], summary["lr"]) == (2, "0.5", 1e-3)
    assert summary["val_loss_final"] == summary["val_loss_min"] == curve["val_loss"].iloc[-1]
    # another seed is another batch order and initialisation: another curve
    assert train.main(stage_argv("train@lora-3-0.5")) == 0
    other = pd.read_csv(workspace / "reports/curves/lora/seed3-lr0.5.csv")
    assert list(other["loss"]) != list(curve["loss"])


def _selection(workspace, **fields):
    path = workspace / "reports/selection/lora.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"variant": "lora", "lr_multiple": "0.5", "lr": 1e-3, "criterion": "final_val_loss",
                                **fields}))


@pytest.mark.parametrize("fields, copied, fragment", [
    ({"variant": "dora"}, True, "holds the selection of 'dora', not of 'lora'"),
    ({"lr_multiple": "4"}, True, "holds the adapter of variant, seed, lr multiple ('lora', 2, '0.5'), not "
                                 "('lora', 2, '4'): rerun select@lora (it copies the chosen cell)"),
    ({"lr_multiple": "4"}, False, "no trained adapter in models/selected/lora/seed2 (train_summary.json is missing): "
                                  "select@lora chose lr multiple 4; run train@lora-2-4, then select@lora"),
])
def test_evaluate_refuses_a_selection_that_does_not_fit_before_loading_a_model(workspace, monkeypatch, capsys,
                                                                                fields, copied, fragment):
    import shutil

    monkeypatch.chdir(workspace)
    if not (workspace / "models/adapters/lora/seed2/lr0.5").exists():
        assert train.main(stage_argv("train@lora-2-0.5")) == 0
    chosen = workspace / "models/selected/lora/seed2"
    shutil.rmtree(chosen, ignore_errors=True)
    if copied:  # select's copy of the cell it chose (here: 0.5, whatever the selection file says)
        shutil.copytree(workspace / "models/adapters/lora/seed2/lr0.5", chosen)
    _selection(workspace, **fields)
    monkeypatch.setattr(evaluate, "load_base", lambda *a, **k: pytest.fail("a model was loaded"))
    assert evaluate.main(stage_argv("evaluate@lora-2")) == 1
    assert fragment in capsys.readouterr().err


def test_evaluate_refuses_an_adapter_of_another_cell(workspace, monkeypatch, capsys):
    """A stale folder (e.g. copied by hand) is not tested under another cell's name."""
    import shutil

    monkeypatch.chdir(workspace)
    if not (workspace / "models/adapters/lora/seed2/lr0.5").exists():
        assert train.main(stage_argv("train@lora-2-0.5")) == 0
    shutil.copytree(workspace / "models/adapters/lora/seed2/lr0.5", workspace / "models/selected/lora/seed5")
    _selection(workspace)
    monkeypatch.setattr(evaluate, "load_base", lambda *a, **k: pytest.fail("a model was loaded"))
    assert evaluate.main(stage_argv("evaluate@lora-5")) == 1
    assert ("holds the adapter of variant, seed, lr multiple ('lora', 2, '0.5'), not ('lora', 5, '0.5'): "
            "rerun select@lora (it copies the chosen cell)") in capsys.readouterr().err
