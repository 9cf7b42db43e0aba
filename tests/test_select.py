"""select@<variant>: each variant's lr multiple, chosen from the training curves' validation losses
(mean over seeds; final or lowest; ties to the multiple nearest 1), on constructed curves with known answers."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from stage_cmds import stage_argv, stage_cmd

from pipeline import select
from pipeline.schemas import VALIDATION_COLUMNS, validate_validation
from pipeline.train import CURVE_COLUMNS

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_params(root: Path, seeds, lr_grid, lr_selection="final_val_loss") -> None:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw.update(seeds=list(seeds), lr_grid=list(lr_grid), lr_selection=lr_selection)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def write_curve(root: Path, variant: str, seed: int, label: str, val_losses, adapter: bool = True) -> None:
    """A curve whose steps validate with `val_losses` (None: no validation at that step), and the cell's
    adapter folder beside it (as its train stage writes both)."""
    if adapter:
        folder = root / "models/adapters" / variant / f"seed{seed}" / f"lr{label}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "train_summary.json").write_text(json.dumps({"variant": variant, "seed": seed, "lr_multiple": label}))
        (folder / "adapter.safetensors").write_bytes(f"{variant}/{seed}/{label}".encode())
    path = root / "reports/curves" / variant / f"seed{seed}-lr{label}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CURVE_COLUMNS)
        writer.writeheader()
        for step, val in enumerate(val_losses, 1):
            writer.writerow({"step": step, "loss": 3.0, "lr": 1e-3, "grad_norm": 1.0,
                             "val_loss": "" if val is None else val, "tokens": 10, "seconds": 0.1})


def run_select(variant="lora") -> dict:
    assert select.main(stage_argv(f"select@{variant}")) == 0
    return json.loads(Path(f"reports/selection/{variant}.json").read_text())


def validation_table(variant="lora") -> pd.DataFrame:
    return validate_validation(pd.read_csv(f"reports/validation/{variant}.csv", dtype={"lr_multiple": str}))


def test_the_criterion_is_the_final_or_the_lowest_validation_loss(workspace):
    # x0.5 dips to 1.0 and ends at 2.0; x1 ends at 1.5 without dipping
    write_curve(workspace, "lora", 0, "0.5", [3.0, 1.0, 2.0])
    write_curve(workspace, "lora", 0, "1", [2.5, None, 1.5])
    write_params(workspace, [0], [0.5, 1], "final_val_loss")
    assert run_select() == {"variant": "lora", "lr_multiple": "1", "lr": 2e-3, "criterion": "final_val_loss"}
    write_params(workspace, [0], [0.5, 1], "min_val_loss")
    assert run_select() == {"variant": "lora", "lr_multiple": "0.5", "lr": 1e-3, "criterion": "min_val_loss"}
    table = validation_table()
    assert list(table.columns) == list(VALIDATION_COLUMNS) == list(select.VALIDATION_COLUMNS)
    assert table[["lr_multiple", "val_loss_final", "val_loss_min", "chosen"]].values.tolist() == [
        ["0.5", 2.0, 1.0, True], ["1", 1.5, 1.5, False]]


def test_the_score_is_the_mean_over_seeds(workspace):
    # seed 0 alone prefers x0.5 (1.0 < 2.0); the mean over both seeds prefers x2 (2.25 < 2.5)
    for seed, losses in ((0, {"0.5": 1.0, "2": 2.0}), (1, {"0.5": 4.0, "2": 2.5})):
        for label, loss in losses.items():
            write_curve(workspace, "lora", seed, label, [5.0, loss])
    write_params(workspace, [0], [0.5, 2])
    assert run_select()["lr_multiple"] == "0.5"
    write_params(workspace, [0, 1], [0.5, 2])
    assert run_select()["lr_multiple"] == "2"
    table = validation_table()
    assert table[["seed", "lr_multiple", "chosen"]].values.tolist() == [
        [0, "0.5", False], [0, "2", True], [1, "0.5", False], [1, "2", True]]


def test_ties_go_to_the_multiple_nearest_one_then_to_the_smaller(workspace):
    assert select.choose({0.5: 1.0, 2.0: 1.0, 4.0: 1.0}) == 0.5   # |log 0.5| == |log 2|: the smaller
    assert select.choose({0.25: 1.0, 2.0: 1.0, 4.0: 1.0}) == 2.0
    assert select.choose({0.5: 1.0, 1.0: 1.0, 2.0: 0.9}) == 2.0   # no tie: the lowest wins
    assert select.choose({0.5: None, 1.0: None, 2.0: None}) == 1.0  # nothing validated (imported): nearest 1
    for label in ("0.25", "2", "4"):
        write_curve(workspace, "lora", 0, label, [1.25])
    write_params(workspace, [0], [4, 0.25, 2])
    assert run_select()["lr_multiple"] == "2"


def test_a_stale_curve_of_an_earlier_grid_is_ignored(workspace):
    write_curve(workspace, "lora", 0, "1", [2.0])
    write_curve(workspace, "lora", 0, "2", [1.9])
    write_curve(workspace, "lora", 0, "4", [0.1])  # an earlier grid's cell: better, but no longer in lr_grid
    write_curve(workspace, "lora", 5, "1", [0.1])  # an earlier seed's
    write_params(workspace, [0], [1, 2])
    assert run_select()["lr_multiple"] == "2"
    assert validation_table()[["seed", "lr_multiple"]].values.tolist() == [[0, "1"], [0, "2"]]


def test_a_missing_curve_names_the_train_stage_to_run(workspace, capsys):
    write_curve(workspace, "lora", 0, "1", [2.0])
    write_curve(workspace, "lora", 0, "2", [1.9])
    write_params(workspace, [0, 1], [1, 2])
    assert select.main(stage_argv("select@lora")) == 1
    err = capsys.readouterr().err
    assert "run train@lora-1-1, train@lora-1-2 first" in err, err
    assert not Path("reports/selection/lora.json").exists() and not Path("reports/validation").exists()


def test_a_curve_without_validation_at_its_last_step_is_refused(workspace, capsys):
    write_curve(workspace, "lora", 0, "1", [2.0, None])  # written before train validated at the final step
    write_params(workspace, [0], [1])
    assert select.main(stage_argv("select@lora")) == 1
    err = capsys.readouterr().err
    assert "seed0-lr1.csv has no validation loss at its last step (step 2)" in err and "rerun train@lora-0-1" in err


def test_the_selection_is_byte_identical_when_an_added_seed_keeps_the_choice(workspace):
    write_curve(workspace, "lora", 0, "0.5", [2.0])
    write_curve(workspace, "lora", 0, "1", [1.8])
    write_params(workspace, [0], [0.5, 1])
    run_select()
    before = Path("reports/selection/lora.json").read_bytes()
    write_curve(workspace, "lora", 1, "0.5", [2.1])
    write_curve(workspace, "lora", 1, "1", [1.7])
    write_params(workspace, [0, 1], [0.5, 1])
    run_select()
    assert Path("reports/selection/lora.json").read_bytes() == before  # evaluate@lora-0 is not rerun
    assert len(validation_table()) == 4  # while the table has the new seed's cells


def test_the_lr_is_the_variants_own_times_the_multiple(workspace):
    write_curve(workspace, "vera", 0, "0.5", [1.0])
    write_params(workspace, [0], [0.5])
    selection = run_select("vera")
    assert math.isclose(selection["lr"], 0.5 * 2e-2) and selection["lr_multiple"] == "0.5"


def test_select_reads_no_test_data_and_imports_neither_torch_nor_pandas(workspace):
    words = stage_cmd("select@lora")
    assert not any(w.startswith("data") for w in words)  # the test split is not on its command line
    deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["select"]["do"]["deps"]
    assert not any(d.startswith("data") for d in deps)
    write_curve(workspace, "lora", 0, "1", [2.0])
    write_params(workspace, [0], [1])
    code = ("import sys; from stage_cmds import stage_argv; from pipeline import select; "
            "code = select.main(stage_argv('select@lora')); "
            "print(code, sorted(m for m in ('torch', 'pandas', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "PATH": "/usr/bin:/bin"})
    assert done.stdout.strip().splitlines()[-1] == "0 []", done.stdout + done.stderr


def test_the_validation_schema_refuses_two_chosen_multiples_a_cell_twice_and_a_min_above_the_final():
    from pipeline.errors import DataError

    good = pd.DataFrame({"variant": ["lora"] * 4, "seed": [0, 0, 1, 1], "lr_multiple": ["1", "2", "1", "2"],
                         "lr": [2e-3, 4e-3, 2e-3, 4e-3], "val_loss_final": [1.0, 2.0, 1.1, 2.1],
                         "val_loss_min": [0.9, 2.0, 1.1, 2.0], "chosen": [True, False, True, False]})
    assert len(validate_validation(good)) == 4
    for change, check in (
            (lambda df: df.assign(chosen=[True, True, True, False]), "one_chosen_multiple_per_variant"),  # 2 chosen
            (lambda df: df.assign(chosen=[True, False, False, False]), "one_chosen_multiple_per_variant"),  # 1 seed
            (lambda df: df.assign(seed=[0, 0, 0, 1]), "one_row_per_cell"),
            (lambda df: df.assign(val_loss_min=[1.5, 2.0, 1.1, 2.0]), "min_not_above_final")):
        with pytest.raises(DataError, match=check):
            validate_validation(change(good))


def test_the_chosen_cell_of_every_seed_is_copied_for_evaluate(workspace):
    write_params(workspace, seeds=[0, 1], lr_grid=[0.5, 2])
    for seed in (0, 1):
        write_curve(workspace, "lora", seed, "0.5", [3.0, 2.9])
        write_curve(workspace, "lora", seed, "2", [3.0, 2.5])
    assert run_select()["lr_multiple"] == "2"
    chosen = workspace / "models/selected/lora"
    assert sorted(p.name for p in chosen.iterdir()) == ["seed0", "seed1"]
    for seed in (0, 1):
        assert (chosen / f"seed{seed}/adapter.safetensors").read_bytes() == f"lora/{seed}/2".encode()
        assert json.loads((chosen / f"seed{seed}/train_summary.json").read_text())["lr_multiple"] == "2"


def test_a_new_multiple_that_does_not_win_leaves_the_copies_byte_identical(workspace):
    write_params(workspace, seeds=[0], lr_grid=[1])
    write_curve(workspace, "lora", 0, "1", [3.0, 2.5])
    run_select()
    before = {p.relative_to(workspace): p.read_bytes() for p in (workspace / "models/selected").rglob("*") if p.is_file()}
    write_params(workspace, seeds=[0], lr_grid=[1, 4])
    write_curve(workspace, "lora", 0, "4", [3.0, 2.8])
    assert run_select()["lr_multiple"] == "1"
    after = {p.relative_to(workspace): p.read_bytes() for p in (workspace / "models/selected").rglob("*") if p.is_file()}
    assert after == before


def test_a_missing_adapter_of_the_chosen_cell_names_its_train_stage_and_writes_nothing(workspace, capsys):
    write_params(workspace, seeds=[0], lr_grid=[1])
    write_curve(workspace, "lora", 0, "1", [3.0, 2.5], adapter=False)
    assert select.main(stage_argv("select@lora")) == 1
    assert "run train@lora-0-1" in capsys.readouterr().err
    assert not (workspace / "reports/selection/lora.json").exists() and not (workspace / "models/selected").exists()
