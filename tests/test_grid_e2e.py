"""End to end over the comparison grid (issue 11): 2 methods x 2 training seeds x 2 lr multiples on a
tiny random model, through one `dvc repro` in a temporary git repository; then what `dvc status`
says a new seed, a new lr multiple or another headline variant would rerun, that the lr
selection never reads the test split, and (last) a `dvc repro` after adding an lr multiple."""

from __future__ import annotations

import json
import math
import re
import shlex
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from tiny_assets import project_repo, run_command, save_tiny_model, small_pipeline_params

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

RUN = ["lora", "vera"]
SEEDS = [0, 1]
LR_GRID = [0.5, 2]
LABELS = ["0.5", "2"]  # DVC's names of the lr_grid values (pipeline.params.lr_label)


def _run(args, cwd, check=True, timeout=900):
    return run_command(args, cwd, check=check, timeout=timeout)


def _ran(text: str) -> list[str]:
    """The stages a `dvc repro` ran, from its output."""
    return re.findall(r"Running stage '([^']+)'", text)


def _status(path) -> dict:
    return json.loads(_run(["dvc", "status", "--json"], path, timeout=300).stdout or "{}")


def grid_params(model_dir: Path) -> dict:
    root = yaml.safe_load((ROOT / "params.yaml").read_text())
    # dora stays in the catalog but out of `run`: the run trains only what `run` names
    params = small_pipeline_params(root, model_dir, {"lora": {}, "vera": {"r": 16}, "dora": {}}, steps=3)
    params.update(run=RUN, seeds=SEEDS, lr_grid=LR_GRID, lr_selection="final_val_loss")
    return params


def _cells():
    return [(v, s, label) for v in RUN for s in SEEDS for label in LABELS]


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    base = tmp_path_factory.mktemp("grid")
    model_dir = save_tiny_model(base / "tiny-model")
    params = grid_params(model_dir)
    repo = project_repo(base / "repo", params, _run)
    first = _run(["dvc", "repro"], repo, timeout=1500)
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "results"], repo)
    from pipeline.params import params_from_dict

    return {"path": repo, "first": first.stdout + first.stderr, "params": params_from_dict(params)}


def _selection(path, variant) -> dict:
    return json.loads((path / f"reports/selection/{variant}.json").read_text())


def _expected_lr(grid, variant, label) -> float:
    from pipeline.cells import find_point

    params = grid["params"]
    return params.get_variant(variant).learning_rate(params.train, find_point(params.lr_grid, label).factor)


# ----- one dvc repro ----------------------------------------------------------------------------------
def test_repro_runs_each_cell_once_and_evaluates_only_the_chosen_lr(grid):
    ran = _ran(grid["first"])
    assert len(ran) == len(set(ran)), ran  # no stage twice
    assert sorted(s for s in ran if s.startswith("train@")) == sorted(f"train@{v}-{s}-{lab}" for v, s, lab in _cells())
    assert sorted(s for s in ran if s.startswith("select@")) == ["select@lora", "select@vera"]
    assert sorted(s for s in ran if s.startswith("evaluate@")) == sorted(f"evaluate@{v}-{s}" for v in RUN for s in SEEDS)
    for stage in ("prepare", "base", "quantize", "evaluate_base", "compare", "focus"):
        assert stage in ran, ran
    assert not (grid["path"] / "models/adapters/dora").exists()  # in the catalog, not in `run`
    assert _status(grid["path"]) == {}


def test_selection_picks_the_lowest_mean_final_validation_loss(grid):
    """select@<v>: per multiple, the final validation loss of each seed's curve, averaged over the
    seeds; the lowest wins. Recomputed here from the curves train wrote."""
    from pipeline.schemas import validate_validation

    path = grid["path"]
    for variant in RUN:
        selection = _selection(path, variant)
        assert set(selection) == {"variant", "lr_multiple", "lr", "criterion"}, selection
        assert selection["variant"] == variant and selection["criterion"] == "final_val_loss"
        assert selection["lr_multiple"] in LABELS
        assert math.isclose(selection["lr"], _expected_lr(grid, variant, selection["lr_multiple"]), rel_tol=1e-9)

        table = validate_validation(pd.read_csv(path / f"reports/validation/{variant}.csv",
                                                dtype={"lr_multiple": str}))
        assert len(table) == len(SEEDS) * len(LABELS)
        assert set(table["variant"]) == {variant}
        assert sorted(zip(table["seed"], table["lr_multiple"])) == sorted((s, lab) for s in SEEDS for lab in LABELS)
        means = {}
        for _, row in table.iterrows():
            curve = pd.read_csv(path / f"reports/curves/{variant}/seed{row['seed']}-lr{row['lr_multiple']}.csv")
            assert list(curve["step"]) == [1, 2, 3]
            assert pd.notna(curve["val_loss"].iloc[-1])  # train validates at its final step
            assert math.isclose(row["val_loss_final"], curve["val_loss"].iloc[-1], rel_tol=1e-9)
            assert math.isclose(row["val_loss_min"], curve["val_loss"].min(), rel_tol=1e-9)
            assert math.isclose(row["lr"], _expected_lr(grid, variant, row["lr_multiple"]), rel_tol=1e-9)
            means.setdefault(row["lr_multiple"], []).append(row["val_loss_final"])
        best = min(means, key=lambda lab: sum(means[lab]) / len(means[lab]))
        assert selection["lr_multiple"] == best, means
        assert sorted(table.loc[table["chosen"], "lr_multiple"]) == [best] * len(SEEDS)


def test_each_seed_is_evaluated_with_its_chosen_adapter(grid):
    path = grid["path"]
    for variant in RUN:
        chosen = _selection(path, variant)["lr_multiple"]
        for seed in SEEDS:
            row = json.loads((path / f"reports/metrics/{variant}/seed{seed}.json").read_text())
            assert (row["seed"], row["lr_multiple"]) == (seed, chosen)
            assert math.isclose(row["lr"], _expected_lr(grid, variant, chosen), rel_tol=1e-9)
            assert row["n_test"] == 8
            lines = (path / f"reports/predictions/{variant}/seed{seed}.jsonl").read_text().splitlines()
            assert len(lines) == 8
            # the adapter a cell trained sits in its own folder
            for label in LABELS:
                assert (path / f"models/adapters/{variant}/seed{seed}/lr{label}/train_summary.json").is_file()
    focus = json.loads((path / "reports/focus.json").read_text())
    assert focus["variant"] == "lora"


def test_the_report_carries_intervals_over_seeds_chosen_lrs_and_adjusted_p(grid):
    from pipeline.schemas import validate_comparison

    path = grid["path"]
    table = validate_comparison(pd.read_csv(path / "reports/comparison.csv", dtype={"lr_multiple": str}))
    assert list(table["variant"]) == [*RUN, "base"]  # dora is in the catalog, not in `run`
    rows = table.set_index("variant")
    per_seed = {v: [json.loads((path / f"reports/metrics/{v}/seed{s}.json").read_text()) for s in SEEDS] for v in RUN}
    for variant in RUN:
        row = rows.loc[variant]
        chosen = _selection(path, variant)
        assert (row["seeds"], row["lr_multiple"]) == (len(SEEDS), chosen["lr_multiple"])
        assert math.isclose(row["lr"], chosen["lr"], rel_tol=1e-9)
        # the mean over seeds, inside its own 95% interval
        mean = sum(m["phoneme_error_rate"] for m in per_seed[variant]) / len(SEEDS)
        assert math.isclose(row["error_rate"], mean, rel_tol=1e-9, abs_tol=1e-12), (row["error_rate"], mean)
        assert row["error_low"] <= row["error_rate"] <= row["error_high"]
    lora, vera = rows.loc["lora"], rows.loc["vera"]
    assert lora["quality_label"] == "baseline" and pd.isna(lora["p_holm"])
    assert math.isclose(vera["delta_vs_lora"], vera["error_rate"] - lora["error_rate"], abs_tol=1e-12)
    assert vera["delta_low"] <= vera["delta_vs_lora"] <= vera["delta_high"] and 0 <= vera["p_holm"] <= 1
    # the label follows the Holm-adjusted p (report.ALPHA = 0.05)
    expected = ("worse" if vera["delta_vs_lora"] > 0 else "better") if vera["p_holm"] <= 0.05 else "comparable"
    assert vera["quality_label"] == expected, (vera["quality_label"], vera["p_holm"])

    md = (path / "reports/comparison.md").read_text()
    zh = (path / "reports/comparison.zh.md").read_text()
    assert "**2 seed(s)** (0, 1)" in md and "p (Holm)" in md and "p_Holm" in md
    for variant in RUN:
        shown = f"(×{rows.loc[variant, 'lr_multiple']})"
        assert re.search(rf"^\| {variant} \|.*{re.escape(shown)} \|$", md, re.M), md  # its chosen lr
        assert f"| {variant} |" in zh
    assert "| dora |" not in md
    assert (path / "reports/plots/lr_sensitivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mlflow_holds_each_cell_once_and_one_comparison_run(grid):
    import mlflow

    path = grid["path"]
    mlflow.set_tracking_uri(f"sqlite:///{path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["lora-variants"], filter_string="tags.stage = 'train'")
    assert set(runs["status"]) == {"FINISHED"}
    for key in ("variant", "seed", "lr", "lr_multiple"):
        assert (runs[f"params.{key}"] == runs[f"tags.{key}"]).all(), key
    cells = sorted(zip(runs["tags.variant"], runs["tags.seed"].astype(int), runs["tags.lr_multiple"]))
    assert cells == sorted(_cells()), cells  # each cell exactly once
    for _, run in runs.iterrows():
        assert math.isclose(float(run["tags.lr"]), _expected_lr(grid, run["tags.variant"], run["tags.lr_multiple"]),
                            rel_tol=1e-6)
        # the cell's run id is the one its adapter folder records
        record = json.loads((path / f"models/adapters/{run['tags.variant']}/seed{run['tags.seed']}/"
                                    f"lr{run['tags.lr_multiple']}/mlflow.json").read_text())
        assert run["run_id"] in json.dumps(record)

    comparisons = mlflow.search_runs(experiment_names=["lora-variants"], filter_string="tags.kind = 'comparison'")
    assert len(comparisons) == 1
    comparison = comparisons.iloc[0]
    assert set(runs["tags.comparison_run"]) == {comparison["run_id"]}
    client = mlflow.MlflowClient()
    members_file = client.download_artifacts(comparison["run_id"], "members.json", str(path / ".members"))
    members = json.loads(Path(members_file).read_text())
    shutil.rmtree(path / ".members")
    assert sorted(_ids(members)) == sorted(runs["run_id"]), members
    logged = {a.path for folder in ("report", "plots", "validation") for a in client.list_artifacts(comparison["run_id"], folder)}
    assert {"report/comparison.md", "report/comparison.zh.md", "report/comparison.csv", "plots/lr_sensitivity.png",
            "validation/lora.csv", "validation/vera.csv"} <= logged, logged
    assert comparison["tags.stage"] == "compare" and comparison["params.seeds"] == "0,1", comparison.to_dict()
    # evaluate tags the cells whose adapter it evaluated (the chosen multiple, every seed)
    selected = sorted((r["tags.variant"], int(r["tags.seed"]), r["tags.lr_multiple"]) for _, r in runs.iterrows()
                      if r.get("tags.selected") == "true")
    assert selected == sorted((v, s, _selection(path, v)["lr_multiple"]) for v in RUN for s in SEEDS), selected


def _ids(members) -> list[str]:
    """Every run id in members.json (a list of ids, or records that carry one)."""
    if isinstance(members, dict):
        members = members.get("members", list(members.values()))
    return [m if isinstance(m, str) else m["run_id"] for m in members]


# ----- what a change would rerun ------------------------------------------------------------------------
def _status_with(grid, **changes) -> dict:
    params_file = grid["path"] / "params.yaml"
    original = params_file.read_text()
    try:
        params_file.write_text(yaml.safe_dump({**yaml.safe_load(original), **changes}, sort_keys=False))
        return _status(grid["path"])
    finally:
        params_file.write_text(original)
        assert params_file.read_text() == original


def test_a_new_seed_reruns_only_its_cells_and_whats_downstream(grid):
    changed = set(_status_with(grid, seeds=[0, 1, 2]))
    assert changed == ({f"train@{v}-2-{lab}" for v in RUN for lab in LABELS} | {f"select@{v}" for v in RUN}
                       | {f"evaluate@{v}-2" for v in RUN} | {"compare", "focus"}), changed


def test_a_new_lr_multiple_trains_only_its_cells(grid):
    changed = set(_status_with(grid, lr_grid=[0.5, 2, 4]))
    assert {s for s in changed if s.startswith("train@")} == {f"train@{v}-{s}-4" for v in RUN for s in SEEDS}, changed
    assert not {s for s in changed if s.startswith("evaluate")}, changed  # until a selection changes
    assert {f"select@{v}" for v in RUN} <= changed


def test_another_headline_variant_reruns_only_focus(grid):
    assert set(_status_with(grid, variant="vera")) == {"focus"}
    assert _status(grid["path"]) == {}


# ----- selection never reads the test split ----------------------------------------------------------
def test_select_has_no_data_path_on_its_command_line_nor_in_its_deps(grid):
    lock = yaml.safe_load((grid["path"] / "dvc.lock").read_text())["stages"]
    for variant in RUN:
        entry = lock[f"select@{variant}"]
        assert "data/" not in entry["cmd"] and "test" not in entry["cmd"], entry["cmd"]
        assert not [d["path"] for d in entry["deps"] if d["path"].startswith("data")], entry["deps"]


def test_a_poisoned_test_split_changes_no_selection(grid):
    path = grid["path"]
    test_split = path / "data/prepared/test.jsonl"
    original = test_split.read_bytes()
    before = {v: (path / f"reports/selection/{v}.json").read_bytes() for v in RUN}
    before_csv = {v: (path / f"reports/validation/{v}.csv").read_bytes() for v in RUN}
    lock = yaml.safe_load((path / "dvc.lock").read_text())["stages"]
    rows = [json.loads(line) for line in original.decode().splitlines() if line.strip()]
    poisoned = [{**row, "prompt": "Spell: z z z\nARPAbet:", "response": "ZH ZH ZH"} for row in rows]
    try:
        test_split.unlink()  # (an out may be a link into DVC's cache: never write through it)
        test_split.write_text("".join(json.dumps(r) + "\n" for r in poisoned))
        changed = set(_status(path))
        assert "prepare" in changed and any(s.startswith("evaluate@") for s in changed), changed  # DVC saw it
        assert not {s for s in changed if s.startswith("select@")}, changed
        for variant in RUN:
            _run(shlex.split(lock[f"select@{variant}"]["cmd"]), path)
            assert (path / f"reports/selection/{variant}.json").read_bytes() == before[variant]
            assert (path / f"reports/validation/{variant}.csv").read_bytes() == before_csv[variant]
    finally:
        test_split.unlink(missing_ok=True)
        test_split.write_bytes(original)
    assert _status(path) == {}


# ----- a new lr multiple, run -------------------------------------------------------------------------
def test_a_losing_lr_multiple_trains_its_cells_and_reruns_no_evaluation(grid):
    """A multiple of 0.01 cannot win in 3 steps: its cells train, select reruns and copies the same
    chosen cells, so no evaluate@ stage runs and every metrics file stays byte-identical (evaluate
    depends on select's copy of the chosen cell, not on the seed's folder of cells)."""
    path = grid["path"]
    params_file = path / "params.yaml"
    original = params_file.read_text()
    before = {v: _selection(path, v)["lr_multiple"] for v in RUN}
    metrics = {p: p.read_bytes() for p in (path / "reports/metrics").rglob("*.json")}
    try:
        params_file.write_text(yaml.safe_dump({**yaml.safe_load(original), "lr_grid": [*LR_GRID, 0.01]},
                                              sort_keys=False))
        out = _run(["dvc", "repro"], path, timeout=900)
        ran = _ran(out.stdout + out.stderr)
        assert {s for s in ran if s.startswith("train@")} == {f"train@{v}-{s}-0.01" for v in RUN for s in SEEDS}
        assert {s for s in ran if s.startswith("select@")} == {f"select@{v}" for v in RUN}
        assert not [s for s in ran if s.startswith("evaluate")], ran
        assert {v: _selection(path, v)["lr_multiple"] for v in RUN} == before
        assert {p: p.read_bytes() for p in (path / "reports/metrics").rglob("*.json")} == metrics
    finally:
        params_file.write_text(original)
        out = _run(["dvc", "repro"], path, timeout=900)
    assert not [s for s in _ran(out.stdout + out.stderr) if s.startswith(("train@", "evaluate"))]
    assert _status(path) == {}


def test_repro_with_a_new_lr_multiple_trains_its_cells_only_and_moves_the_selection_everywhere(grid):
    """Runs last (it leaves lr_grid [0.5, 2, 4] in the repository). `dvc repro` trains exactly the cells
    `dvc status` listed, none of the old multiples; then every file and MLflow agree on the chosen
    multiple: each seed's metrics, the report, and `selected=true` on exactly the chosen cells, even
    when the new multiple took the choice from an old one (3 steps from a random start: the largest
    lr usually wins, so the tags must move)."""
    import mlflow

    path = grid["path"]
    params_file = path / "params.yaml"
    params_file.write_text(yaml.safe_dump({**yaml.safe_load(params_file.read_text()), "lr_grid": [*LR_GRID, 4]},
                                          sort_keys=False))
    listed = {s for s in _status(path) if s.startswith("train@")}
    out = _run(["dvc", "repro"], path, timeout=900)
    ran = _ran(out.stdout + out.stderr)
    assert {s for s in ran if s.startswith("train@")} == listed == {f"train@{v}-{s}-4" for v in RUN for s in SEEDS}
    assert _status(path) == {}

    chosen = {v: _selection(path, v)["lr_multiple"] for v in RUN}
    for variant in RUN:
        for seed in SEEDS:
            row = json.loads((path / f"reports/metrics/{variant}/seed{seed}.json").read_text())
            assert row["lr_multiple"] == chosen[variant], (variant, seed, row["lr_multiple"], chosen)
    table = pd.read_csv(path / "reports/comparison.csv", dtype={"lr_multiple": str}).set_index("variant")
    assert {v: table.loc[v, "lr_multiple"] for v in RUN} == chosen

    mlflow.set_tracking_uri(f"sqlite:///{path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["lora-variants"], filter_string="tags.stage = 'train'")
    runs = runs[runs["tags.lr_multiple"] != "0.01"]  # (the losing multiple of the test before, no longer in the grid)
    assert len(runs) == len(RUN) * len(SEEDS) * 3  # the old cells were not trained again
    selected = sorted((r["tags.variant"], int(r["tags.seed"]), r["tags.lr_multiple"]) for _, r in runs.iterrows()
                      if r.get("tags.selected") == "true")
    assert selected == sorted((v, s, chosen[v]) for v in RUN for s in SEEDS), (selected, chosen)
