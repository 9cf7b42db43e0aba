"""The compare stage on constructed files in the grid's layout (variant x seed x lr multiple): what it reads,
the statistics its context carries (seed and item effects, Holm labels, the one-seed case), the lr plot,
and the two templates. No model, no DVC: tests/compare_files.py writes what the other stages would."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from compare_files import GIB, grid_params, write_run

from pipeline import compare
from pipeline.errors import DataError
from pipeline.schemas import COMPARISON_COLUMNS


@pytest.fixture(autouse=True)
def no_projection(monkeypatch):
    """The 7B projection builds a meta-device Llama per variant (~0.4 s each); tests that need it say so."""
    monkeypatch.setattr(compare, "projections", lambda params: {})


def _items(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(3, 9, size=n), rng.integers(0, 4, size=n)


def _context(params, args):
    return compare.build_context(params, compare.load_inputs(params, args), True, "CPU", compare.projections(params),
                                 "2026-11-29", "0123456789abcdef")


def _method(ctx, name):
    return next(m for m in ctx["methods"] if m["name"] == name)


# ----- reading the grid --------------------------------------------------------------------------------
def test_compare_reads_the_chosen_cells_of_every_seed_and_writes_means_over_seeds(tmp_path):
    params = grid_params(["lora", "dora"], seeds=(0, 1), lr_grid=(0.5, 1))
    lengths, edits = _items()
    # dora's two seeds differ: its row is their mean; lora was chosen at 0.5, dora at 1
    args = write_run(tmp_path, params, {"lora": [edits, edits], "dora": [edits + 1, edits]}, lengths,
                     chosen={"lora": "0.5", "dora": "1"}, memory={"dora": [1.70 * GIB, 1.80 * GIB]})
    # files of another grid (a seed and a multiple no longer in params) are never read
    (tmp_path / "reports/metrics/dora/seed7.json").write_text("not json")
    ctx = compare.run(args, params)

    table = pd.read_csv(args.csv, dtype={"lr_multiple": str}).set_index("variant")
    assert tuple(table.reset_index().columns) == COMPARISON_COLUMNS
    assert list(table.index) == ["lora", "dora", "base"]
    per_seed = [(edits + 1).sum() / lengths.sum(), edits.sum() / lengths.sum()]
    assert table.loc["dora", "phoneme_error_rate"] == pytest.approx(np.mean(per_seed))
    assert table.loc["dora", "error_rate"] == pytest.approx(np.mean(per_seed))
    assert table.loc["dora", "training_memory_bytes"] == round(1.75 * GIB)
    assert table.loc["dora", "seeds"] == 2 and table.loc["dora", "lr_multiple"] == "1"
    assert table.loc["lora", "lr_multiple"] == "0.5" and table.loc["lora", "lr"] == pytest.approx(1e-3)
    assert pd.isna(table.loc["base", "seeds"]) and table.loc["base", "quality_label"] == "not_compared"
    assert table.loc["dora", "error_low"] < table.loc["dora", "error_rate"] < table.loc["dora", "error_high"]

    md = (tmp_path / "reports/comparison.md").read_text()
    (row,) = [line for line in md.splitlines() if line.startswith("| dora |") and "%" in line]
    assert f"{np.mean(per_seed):.3f} [" in row and row.endswith("| 2e-03 (×1) |")
    assert "| lora |" in md and "1e-03 (×0.5)" in md
    assert ctx["seeds"] == [0, 1] and ctx["lr_grid"] == ["0.5", "1"]
    assert sorted(p.name for p in (tmp_path / "reports/plots").iterdir()) == [
        "loss_curves.png", "lr_sensitivity.png", "quality_vs_memory.png", "quality_vs_params.png"]


def test_a_missing_cell_names_the_stage_to_run_and_writes_nothing(tmp_path):
    params = grid_params(["lora", "dora"], seeds=(0, 1))
    lengths, edits = _items()
    args = write_run(tmp_path, params, {"lora": [edits, edits], "dora": [edits, edits]}, lengths)
    (tmp_path / "reports/metrics/dora/seed1.json").unlink()
    with pytest.raises(DataError, match=r"dora/seed1\.json is missing: run `dvc repro evaluate@dora-1`"):
        compare.run(args, params)
    assert not (tmp_path / "reports/comparison.md").exists()


def test_a_selection_outside_the_grid_or_a_stale_evaluation_is_refused(tmp_path):
    params = grid_params(["lora"], seeds=(0,), lr_grid=(1, 2))
    lengths, edits = _items()
    args = write_run(tmp_path, params, {"lora": [edits]}, lengths)
    (tmp_path / "reports/selection/lora.json").write_text(json.dumps({"variant": "lora", "lr_multiple": "4"}))
    with pytest.raises(DataError, match=r"lr multiple '4' is not in lr_grid \(1, 2\); run `dvc repro select@lora`"):
        compare.load_inputs(params, args)
    (tmp_path / "reports/selection/lora.json").write_text(json.dumps({"variant": "lora", "lr_multiple": "2"}))
    # the metrics on disk were evaluated at the old choice (1): evaluate must rerun first
    with pytest.raises(DataError, match=r"not at the chosen 0 and 2: run `dvc repro evaluate@lora-0`"):
        compare.load_inputs(params, args)
