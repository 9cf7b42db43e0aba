"""MLflow as a user sees it: the stages against a real sqlite store, one run per stage.

Each grid cell's train stage has a run (params, curves; and, for the cell that select chose, the
test metrics after evaluation); the evaluate stage's run is the chosen cell's child; each run starts when its stage started and ends when it
ended (a stage's start is its process's start).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from stage_cmds import stage_argv
from tiny_assets import prepared_workspace, small_pipeline_params

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A stage-ready folder: params.yaml (one LoRA variant), models/base (tiny random Llama), data/prepared."""
    root = tmp_path_factory.mktemp("track")
    params = small_pipeline_params(yaml.safe_load((ROOT / "params.yaml").read_text()), root / "models" / "base",
                                   {"lora": {"preset": "lora", "r": 4, "alpha": 8}}, steps=4, checkpoint_interval=0)
    params["lr_grid"] = [0.5, 1]  # two cells of one seed: only the chosen one is evaluated
    return prepared_workspace(root, params)


def _stage(monkeypatch, run):
    """Run one stage in-process as if it were its own process: (started, ended) in Unix seconds."""
    from pipeline import tracking

    started = time.time()
    monkeypatch.setattr(tracking, "process_start_time", lambda: started, raising=False)
    run()
    return started, time.time()


@pytest.fixture(scope="module")
def tracked(workspace):
    """train@lora-0-0.5, train@lora-0-1, select@lora, then evaluate@lora-0, each timed; the MLflow client on the
    workspace's store."""
    from mlflow.tracking import MlflowClient

    from pipeline import evaluate, select, train

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workspace)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        _stage(mp, lambda: train.run(*train.parse(stage_argv("train@lora-0-0.5"))))
        time.sleep(0.05)
        train_span = _stage(mp, lambda: train.run(*train.parse(stage_argv("train@lora-0-1"))))
        assert select.main(stage_argv("select@lora")) == 0
        chosen = json.loads((workspace / "reports/selection/lora.json").read_text())["lr_multiple"]
        time.sleep(0.05)  # the stages never share a millisecond
        eval_span = _stage(mp, lambda: evaluate.run(*evaluate.parse(stage_argv("evaluate@lora-0"))))
        exported = {k: os.environ[k] for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID") if k in os.environ}
    client = MlflowClient(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("lora-variants").experiment_id])
    return {"client": client, "runs": runs, "train": train_span, "evaluate": eval_span,
            "workspace": workspace, "exported": exported, "chosen": chosen}


def _by_stage(runs, stage, lr_multiple=None):
    found = [r for r in runs if r.data.tags.get("stage") == stage
             and (lr_multiple is None or r.data.tags.get("lr_multiple") == lr_multiple)]
    assert len(found) == 1, [(r.info.run_name, r.data.tags.get("stage")) for r in runs]
    return found[0]


def test_each_stage_has_its_own_run_the_evaluation_nested_under_the_chosen_cell(tracked):
    runs, chosen = tracked["runs"], tracked["chosen"]
    assert len(runs) == 3
    trained, evaluated = _by_stage(runs, "train", chosen), _by_stage(runs, "evaluate")
    lr = {"0.5": 1e-3, "1": 2e-3}[chosen]
    assert trained.info.run_name == f"lora seed=0 lr={lr:.0e}" and evaluated.info.run_name == "lora seed=0 evaluate"
    assert evaluated.data.tags["mlflow.parentRunId"] == trained.info.run_id
    assert "mlflow.parentRunId" not in trained.data.tags
    assert {trained.data.tags["variant"], evaluated.data.tags["variant"]} == {"lora"}
    assert trained.info.status == evaluated.info.status == "FINISHED"
    run_id = json.loads((tracked["workspace"] / f"models/adapters/lora/seed0/lr{chosen}/mlflow.json").read_text())
    assert run_id["run_id"] == trained.info.run_id


def test_every_cell_has_a_run_with_its_coordinates_as_params_and_tags(tracked):
    """variant, seed, lr and lr_multiple as params and as tags: the UI's "Group by" groups on either."""
    cells = [r for r in tracked["runs"] if r.data.tags.get("stage") == "train"]
    got = sorted((r.data.tags["lr_multiple"], r.data.tags["lr"], r.data.tags["seed"], r.data.tags["variant"])
                 for r in cells)
    assert got == [("0.5", "0.001", "0", "lora"), ("1", "0.002", "0", "lora")]
    for run in cells:
        assert {k: run.data.params[k] for k in ("variant", "seed", "lr", "lr_multiple")} == {
            k: run.data.tags[k] for k in ("variant", "seed", "lr", "lr_multiple")}
    # only the chosen cell was tested: the other has no test metrics
    other = _by_stage(tracked["runs"], "train", {"0.5": "1", "1": "0.5"}[tracked["chosen"]])
    assert "phoneme_error_rate" not in other.data.metrics and "eval_loss" not in other.data.metrics
    chosen = _by_stage(tracked["runs"], "train", tracked["chosen"])
    assert chosen.data.tags["selected"] == "true" and "selected" not in other.data.tags  # compare reconciles the rest


def test_the_stages_leave_no_process_wide_mlflow_state(tracked):
    # the fluent API exported the store and experiment to the environment (and so to later tests)
    assert tracked["exported"] == {}


def test_each_run_starts_and_ends_with_its_stage(tracked):
    trained, evaluated = _by_stage(tracked["runs"], "train", "1"), _by_stage(tracked["runs"], "evaluate")
    for run, (started, ended) in ((trained, tracked["train"]), (evaluated, tracked["evaluate"])):
        assert run.info.start_time == int(started * 1000)
        assert int(started * 1000) <= run.info.end_time <= int(ended * 1000) + 1
    # the training run's duration is training only, not "until evaluation after every other variant"
    assert trained.info.end_time < evaluated.info.start_time


def test_the_training_run_shows_params_curves_and_the_variants_final_quality(tracked):
    client = tracked["client"]
    trained = _by_stage(tracked["runs"], "train", tracked["chosen"])
    evaluated = _by_stage(tracked["runs"], "evaluate")
    assert trained.data.params["spec.r"] == "4" and trained.data.params["train.steps"] == "4"
    assert [m.step for m in client.get_metric_history(trained.info.run_id, "loss")] == [1, 2, 3, 4]
    metrics = json.loads((tracked["workspace"] / "reports/metrics/lora/seed0.json").read_text())
    for key in ("phoneme_error_rate", "exact_match", "eval_loss", "trainable_params"):
        assert trained.data.metrics[key] == pytest.approx(metrics[key]), key
    assert trained.data.metrics["train_seconds"] > 0
    # the evaluation's run holds what the evaluation cost; its results appear once, on the variant's run
    # (a copy on both would draw every bar twice in the UI's charts)
    assert evaluated.data.metrics["eval_seconds"] == pytest.approx(metrics["eval_seconds"])
    assert evaluated.data.metrics["n_test"] == 8
    assert not set(evaluated.data.metrics) & set(trained.data.metrics)
    assert not evaluated.data.params  # the evaluation's inputs are its parent's
    assert (metrics["seed"], metrics["lr_multiple"]) == (0, tracked["chosen"])
    train_files = {f.path for f in client.list_artifacts(trained.info.run_id, "adapter")}
    assert "adapter/adapter.safetensors" in train_files
    assert [f.path for f in client.list_artifacts(evaluated.info.run_id)] == ["predictions"]


def test_the_stage_start_is_the_process_start():
    code = ("import time; t = time.time(); from pipeline.runtime import process_start_time; "
            "print(t - process_start_time())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    # interpreter start-up happens before the first line: the process began a little earlier
    assert 0 <= float(out.stdout) < 5, out.stdout


def test_mlflow_runs_in_a_worker_process_started_ahead(tmp_path):
    # a stage's process never imports mlflow (~1.5 s of CPU): the client lives in a worker that
    # `preload` (stage.start) starts while the stage loads its model; the run is the same
    code = ("import sys; from pipeline.tracking import Tracker, preload; preload(); "
            "t = Tracker(True, 'exp', None); t.start('r', {'stage': 'train'}); t.log_params({'p': 3}); "
            "t.log_metrics({'m': 1.5}); t.log_curve([{'step': 1, 'loss': 2.0}, {'step': 2, 'loss': 1.0}], ['loss']); "
            "t.end(); print('mlflow' in sys.modules, t.run_id)")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": uri}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    imported, run_id = done.stdout.split()
    assert imported == "False"
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri=uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"p": "3"}
    assert run.data.metrics == {"m": 1.5, "loss": 1.0}
    assert [m.value for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, "loss")] == [2.0, 1.0]


def test_an_unreachable_store_is_reported_once_through_the_worker(capsys):
    from pipeline import tracking

    tracking._DISABLED_REASON = None
    try:
        tracking.preload()
        tracker = tracking.Tracker(True, "exp", "http://127.0.0.1:9")  # nothing listens there
        assert not tracker.active
        tracker.start("r", {})
        tracker.end()
        err = capsys.readouterr().err
        # the worker's error, with its type, and the store named
        assert err.count("WARNING: MLflow tracking is off") == 1, err
        assert "MlflowException: API request to http://127.0.0.1:9" in err, err
    finally:
        tracking._DISABLED_REASON = None


@pytest.mark.parametrize("stage, module, preloads", [("train@lora-0-1", "train", True),
                                                     ("evaluate@lora-0", "evaluate", True),
                                                     ("evaluate_base", "evaluate", False),
                                                     ("select@lora", "select", False)])
def test_a_stage_that_tracks_starts_the_mlflow_worker_when_it_starts(workspace, tmp_path, stage, module, preloads):
    # started by stage.start, before the model loads; evaluate_base has no run, so no worker
    code = (f"import sys; from pipeline import {module} as m, tracking; from stage_cmds import stage_argv; "
            f"args, params = m.parse(stage_argv({stage!r})); print(params is not None, tracking._WORKER is not None)")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    done = subprocess.run([sys.executable, "-c", code], cwd=workspace, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["True", str(preloads)]
