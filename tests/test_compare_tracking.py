"""compare's MLflow run against a real sqlite store: the comparison run with the report, table, plots and
validation tables as artifacts, members.json naming every cell's run, and the `comparison_run` tag on each
member run; with tracking off, nothing at all."""

from __future__ import annotations

import json

import numpy as np
import pytest
from compare_files import grid_params, write_run

from pipeline import compare


@pytest.fixture(autouse=True)
def no_projection(monkeypatch):
    monkeypatch.setattr(compare, "projections", lambda params: {})
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _store(tmp_path, monkeypatch):
    """A store in tmp_path (named by MLFLOW_TRACKING_URI, as tracking.uri may only name one in the repository)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("grid", artifact_location=(tmp_path / "mlartifacts").as_uri())
    return uri, client, experiment


def test_the_comparison_run_holds_the_report_and_tags_every_member_run(tmp_path, monkeypatch):
    uri, client, experiment = _store(tmp_path, monkeypatch)
    params = grid_params(["lora", "dora"], seeds=(0, 1), lr_grid=(1, 2), tracking={"enabled": True, "experiment": "grid"})
    run_ids = {}
    for name in params.run:
        for seed in params.seeds:
            for point in params.lr_grid:
                run = client.create_run(experiment, run_name=f"{name} seed={seed} lr={point.label}")
                run_ids[(name, seed, point.label)] = run.info.run_id
    elsewhere = client.create_run(experiment, run_name="another pipeline run").info.run_id
    rng = np.random.default_rng(0)
    lengths, edits = rng.integers(3, 9, size=30), rng.integers(0, 4, size=30)
    args = write_run(tmp_path, params, {"lora": [edits] * 2, "dora": [edits] * 2}, lengths, run_ids=run_ids, uri=uri,
                     chosen={"lora": "1", "dora": "2"})
    for key in (("lora", 0, "2"), ("dora", 1, "2")):  # left tagged by an earlier grid whose choice was another
        client.set_tag(run_ids[key], "selected", "true" if key[0] == "lora" else "false")
    compare.run(args, params)

    (comparison,) = client.search_runs([experiment], "tags.kind = 'comparison'")
    cid = comparison.info.run_id
    assert comparison.info.status == "FINISHED" and comparison.info.run_name == "comparison"
    assert comparison.data.params == {"run": "lora,dora", "seeds": "0,1", "lr_grid": "1,2",
                                      "lr_selection": "final_val_loss"}
    files = {f.path for f in client.list_artifacts(cid)} | {f.path for d in ("report", "plots", "validation")
                                                           for f in client.list_artifacts(cid, d)}
    assert {"members.json", "report/comparison.md", "report/comparison.zh.md", "report/comparison.csv",
            "plots/loss_curves.png", "plots/lr_sensitivity.png", "validation/lora.csv", "validation/dora.csv"} <= files
    members = json.loads(open(client.download_artifacts(cid, "members.json", str(tmp_path))).read())
    assert members["comparison_run"] == cid
    assert {m["run_id"] for m in members["members"]} == set(run_ids.values())  # every cell, chosen or not
    assert {(m["variant"], m["seed"], m["lr_multiple"]) for m in members["members"]} == set(run_ids)
    for (name, _seed, label), run_id in run_ids.items():
        tags = client.get_run(run_id).data.tags
        assert tags["comparison_run"] == cid
        assert tags["selected"] == ("true" if label == {"lora": "1", "dora": "2"}[name] else "false")
    assert "comparison_run" not in client.get_run(elsewhere).data.tags


def test_tracking_off_opens_no_run_and_tags_nothing(tmp_path, monkeypatch):
    uri, client, experiment = _store(tmp_path, monkeypatch)
    params = grid_params(["lora"], seeds=(0,), tracking={"enabled": False, "experiment": "grid"})
    member = client.create_run(experiment).info.run_id
    rng = np.random.default_rng(0)
    lengths, edits = rng.integers(3, 9, size=30), rng.integers(0, 4, size=30)
    args = write_run(tmp_path, params, {"lora": [edits]}, lengths, run_ids={("lora", 0, "1"): member}, uri=uri)
    compare.run(args, params)
    assert [r.info.run_id for r in client.search_runs([experiment])] == [member]
    assert "comparison_run" not in client.get_run(member).data.tags
