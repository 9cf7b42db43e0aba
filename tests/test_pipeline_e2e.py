"""End to end: the real stage scripts through `dvc repro` in a temporary git repository, on a
tiny random model and 64 training rows (params overrides), then the experiment commands."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from tiny_assets import project_repo, save_tiny_model, small_pipeline_params

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def _run(args, cwd, check=True, timeout=900):
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONWARNINGS": "ignore",
           "MLFLOW_DISABLE_TELEMETRY": "true", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done


def small_params(model_dir: Path) -> dict:
    root = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = small_pipeline_params(root, model_dir, {"lora": {}, "dora": {}, "vera": {"r": 16}}, steps=3)
    # in the catalog, not in `run` (as in params.yaml): an experiment selects them
    params["variants"].update({name: root["variants"][name] for name in ("pissa", "eva")})
    return params


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    base = tmp_path_factory.mktemp("e2e")
    model_dir = save_tiny_model(base / "tiny-model")
    repo = project_repo(base / "repo", small_params(model_dir), _run)
    first = _run(["dvc", "repro"], repo)
    # a user commits the results before experimenting (queued experiments start from HEAD)
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "results"], repo)
    return {"path": repo, "first": first.stdout + first.stderr}


def test_repro_writes_a_validated_report(repo):
    from pipeline.schemas import METRIC_COLUMNS, validate_comparison, validate_metrics

    path = repo["path"]
    for stage in ("prepare", "base", "quantize", "train@lora-0-1", "train@dora-0-1", "train@vera-0-1", "select@vera",
                  "evaluate@vera-0", "evaluate_base", "compare", "focus"):
        assert f"Running stage '{stage}'" in repo["first"]
    table = validate_comparison(pd.read_csv(path / "reports/comparison.csv"))
    assert list(table["variant"]) == ["lora", "dora", "vera", "base"]
    assert table.loc[table["variant"] == "lora", "quality_label"].item() == "baseline"
    for name in ("lora/seed0", "dora/seed0", "vera/seed0", "base"):
        row = json.loads((path / f"reports/metrics/{name}.json").read_text())
        validate_metrics(pd.DataFrame([{k: row[k] for k in METRIC_COLUMNS}]))
        assert row["n_test"] == 8
    vera = json.loads((path / "reports/metrics/vera/seed0.json").read_text())
    assert vera["trainable_params"] > 0 and (vera["seed"], vera["lr_multiple"], vera["lr"]) == (0, "1", 2e-2)
    assert json.loads((path / "reports/selection/vera.json").read_text()) == {
        "variant": "vera", "lr_multiple": "1", "lr": 2e-2, "criterion": "final_val_loss"}
    for lang in ("comparison.md", "comparison.zh.md"):
        text = (path / "reports" / lang).read_text()
        assert "| vera |" in text and "GiB" in text
    assert "| Variant | Core idea | Memory | Quality | Use case |" in (path / "reports/comparison.md").read_text()
    assert "| 变体 | 核心改进 | 显存 | 效果 | 适用场景 |" in (path / "reports/comparison.zh.md").read_text()
    for png in ("loss_curves.png", "quality_vs_params.png", "quality_vs_memory.png"):
        assert (path / "reports/plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curve = pd.read_csv(path / "reports/curves/dora/seed0-lr1.csv")
    assert list(curve["step"]) == [1, 2, 3] and curve["val_loss"].notna().sum() == 2
    assert json.loads((path / "reports/focus.json").read_text())["variant"] == "lora"
    # only declared outputs: no temporary folders left behind
    assert not list(path.glob("models/.*tmp*")) and not list(path.glob("reports/.*tmp*"))


def test_second_repro_does_nothing(repo):
    again = _run(["dvc", "repro"], repo["path"])
    assert "Running stage" not in again.stdout
    status = _run(["dvc", "status"], repo["path"])
    assert "up to date" in status.stdout
    assert _run(["git", "status", "--porcelain"], repo["path"]).stdout == ""  # nothing undeclared was written


def test_the_torch_stages_were_forked_from_a_warm_server(repo):
    """pipeline/run.py: the stages that import torch ran in children of a server that had imported it
    (its log names each one with this checkout as working directory), none fell back to a cold start."""
    started = [line for log in Path(os.environ["LORA_WARM_DIR"]).glob("*.log")
               for line in log.read_text().splitlines() if line.endswith(f" in {repo['path']}")]
    modules = [line.split(" started ", 1)[1].split(" ", 1)[0] for line in started]
    assert sorted(m for m in modules if m in ("pipeline.base", "pipeline.quantize", "pipeline.train",
                                             "pipeline.evaluate")) == [
        "pipeline.base", *["pipeline.evaluate"] * 4, "pipeline.quantize", *["pipeline.train"] * 3], modules
    assert "pipeline.run: running" not in repo["first"]  # no "running <stage> cold: <why>"


def test_no_stage_warns_about_an_empty_output(repo):
    assert "is empty" not in repo["first"]  # (the checkpoints used to be an out, empty after every run)


def _status(path) -> dict:
    return json.loads(_run(["dvc", "status", "--json"], path).stdout or "{}")


def test_a_dtype_change_reaches_every_stage_that_reads_the_dtype(repo):
    path = repo["path"]
    params = path / "params.yaml"
    original = params.read_text()
    try:
        params.write_text(original.replace("dtype: float32", "dtype: bfloat16"))
        changed = set(_status(path))  # everything was up to date before
    finally:
        params.write_text(original)
    assert changed == {"base", "evaluate_base"} | {f"{s}@{v}{cell}" for s, cell in (("train", "-0-1"), ("evaluate", "-0"))
                                                   for v in ("lora", "dora", "vera")}, changed
    assert _status(path) == {}


def test_staging_leftovers_and_checkpoints_change_nothing_for_git_or_dvc(repo):
    path = repo["path"]
    planted = [path / p for p in ("reports/curves/lora/.seed0-lr1.csv.tmp-k1ll3d",
                                  "reports/metrics/lora/.seed0.json.tmp-k1ll3d",
                                  "models/adapters/lora/seed0/.lr1.old-k1ll3d/previous/adapter.safetensors",
                                  "models/checkpoints/lora/seed0-lr1/current/state.json")]
    for leftover in planted:
        leftover.parent.mkdir(parents=True, exist_ok=True)
        leftover.write_text("left by a killed run")
    try:
        assert _status(path) == {}  # reports/curves and reports/metrics are compare's deps: hashes unchanged
        assert _run(["git", "status", "--porcelain"], path).stdout == ""
    finally:
        for folder in ("models/adapters/lora/seed0/.lr1.old-k1ll3d", "models/checkpoints"):
            shutil.rmtree(path / folder, ignore_errors=True)
        for leftover in planted[:2]:
            leftover.unlink()


def test_a_train_stage_is_restored_from_the_run_cache(repo):
    path = repo["path"]
    lock = yaml.safe_load((path / "dvc.lock").read_text())
    entry = lock["stages"].pop("train@lora-0-1")
    (path / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))
    shutil.rmtree(path / "models/adapters/lora/seed0/lr1")
    (path / "reports/curves/lora/seed0-lr1.csv").unlink()
    out = _run(["dvc", "repro"], path)
    text = out.stdout + out.stderr
    assert "Stage 'train@lora-0-1' is cached - skipping run, checking out outputs" in text, text
    assert "Running stage" not in text, text
    assert (path / "models/adapters/lora/seed0/lr1/adapter.safetensors").is_file()
    assert yaml.safe_load((path / "dvc.lock").read_text())["stages"]["train@lora-0-1"] == entry  # as it was
    _run(["git", "checkout", "dvc.lock"], path)  # (DVC wrote the entry back at the end of the file)
    assert _run(["git", "status", "--porcelain"], path).stdout == ""


def test_mlflow_holds_one_finished_run_per_cell(repo):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{repo['path'] / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["lora-variants"], filter_string="tags.stage = 'train'")
    assert sorted(runs["tags.variant"]) == ["dora", "lora", "vera"]
    assert set(runs["status"]) == {"FINISHED"} and set(runs["tags.seed"]) == {"0"} and set(runs["tags.lr_multiple"]) == {"1"}
    assert sorted(runs["tags.mlflow.runName"]) == ["dora seed=0 lr=2e-03", "lora seed=0 lr=2e-03", "vera seed=0 lr=2e-02"]
    assert runs["metrics.phoneme_error_rate"].notna().all() and runs["metrics.eval_loss"].notna().all()
    assert set(runs["tags.dvc_exp_name"]) == {"not_a_dvc_experiment"}
    history = mlflow.MlflowClient().get_metric_history(runs.iloc[0]["run_id"], "loss")
    assert [m.step for m in history] == [1, 2, 3]
    # each evaluation is a run of its own under its variant's run, and each run spans its stage:
    # the training run ends before its evaluation starts (not after every other variant trained)
    evals = mlflow.search_runs(experiment_names=["lora-variants"], filter_string="tags.stage = 'evaluate'")
    assert sorted(evals["tags.mlflow.parentRunId"]) == sorted(runs["run_id"])
    for _, run in runs.iterrows():
        child = evals[evals["tags.mlflow.parentRunId"] == run["run_id"]].iloc[0]
        assert run["start_time"] < run["end_time"] <= child["start_time"] < child["end_time"]


def test_exp_run_variant_retrains_nothing_and_shows_its_metrics(repo):
    path = repo["path"]
    out = _run(["dvc", "exp", "run", "-S", "variant=vera"], path)
    text = out.stdout + out.stderr
    assert "Running stage 'focus'" in text
    assert "Running stage 'train@" not in text and "Running stage 'evaluate@" not in text
    assert json.loads((path / "reports/focus.json").read_text())["variant"] == "vera"
    shown = json.loads(_run(["dvc", "exp", "show", "--json"], path).stdout)
    assert "vera" in json.dumps(shown)


def test_exp_run_with_a_variant_param_retrains_that_variant_only(repo):
    path = repo["path"]
    out = _run(["dvc", "exp", "run", "-S", "variant=vera", "-S", "variants.vera.r=8"], path)
    text = out.stdout + out.stderr
    assert "Running stage 'train@vera-0-1'" in text and "Running stage 'evaluate@vera-0'" in text
    assert "Running stage 'train@lora" not in text and "Running stage 'train@dora" not in text
    assert json.loads((path / "reports/metrics/vera/seed0.json").read_text())["trainable_params"] == sum(
        layer_out + 8 for layer_out in [32, 16, 16, 32, 48, 48, 32] * 2)


def _wait_for_queue(path, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = _run(["dvc", "queue", "status"], path).stdout
        if not re.search(r"\b(Queued|Running)\b", status):
            return status
        time.sleep(3)
    raise AssertionError(f"queue still busy after {timeout}s:\n{status}")


def test_queued_sweep_over_the_headline_variant(repo):
    path = repo["path"]
    _run(["dvc", "exp", "run", "--queue", "-S", "variant=lora,dora,vera"], path)
    _run(["dvc", "queue", "start"], path)
    status = _wait_for_queue(path)
    assert status.count("Success") == 3 and "Failed" not in status, status
    shown = json.dumps(json.loads(_run(["dvc", "exp", "show", "--json"], path).stdout))
    for name in ("lora", "dora", "vera"):
        assert f'"variant": "{name}"' in shown


def test_two_queued_experiments_run_in_parallel_and_both_reach_mlflow(repo):
    import mlflow

    path = repo["path"]
    _run(["dvc", "exp", "run", "--queue", "-n", "lora-r2", "-S", "variants.lora.r=2"], path)
    _run(["dvc", "exp", "run", "--queue", "-n", "dora-r2", "-S", "variants.dora.r=2"], path)
    _run(["dvc", "queue", "start", "-j", "2"], path)
    status = _wait_for_queue(path)
    assert "Failed" not in status, status
    mlflow.set_tracking_uri(f"sqlite:///{path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["lora-variants"], filter_string="tags.stage = 'train'")
    by_exp = runs[runs["tags.dvc_exp_name"].isin(["lora-r2", "dora-r2"])]
    assert sorted(by_exp["tags.variant"]) == ["dora", "lora"], runs[["tags.variant", "tags.dvc_exp_name"]]
    assert set(by_exp["status"]) == {"FINISHED"} and by_exp["metrics.eval_loss"].notna().all()
    assert set(by_exp["params.spec.r"]) == {"2"}


def test_exp_run_with_fsdp_on_two_processes_trains_every_variant_under_torchrun(repo):
    """The issue's end-to-end check: `-S train.distributed.strategy=fsdp -S ...nproc_per_node=2` retrains each
    variant as two gloo ranks (the dvc.yaml cmd unchanged), rank 0 alone writes, and the report says so."""
    path = repo["path"]
    out = _run(["dvc", "exp", "run", "-S", "train.distributed.strategy=fsdp",
                "-S", "train.distributed.nproc_per_node=2"], path)
    text = out.stdout + out.stderr
    for name in ("lora", "dora", "vera"):
        assert f"Running stage 'train@{name}-0-1'" in text
        assert f"[{name} rank 1/2]" in text, text[-3000:]  # the second rank trained and reported progress
        summary = json.loads((path / f"models/adapters/{name}/seed0/lr1/train_summary.json").read_text())
        record = summary["distributed"]
        assert (record["strategy"], record["world_size"]) == ("fsdp", 2)
        held = [rank["base_weight_bytes"] for rank in record["per_rank"]]
        assert len(held) == 2 and max(held) <= 0.55 * summary["base_weight_bytes"], record  # FSDP2 shards the base
        curve = pd.read_csv(path / f"reports/curves/{name}/seed0-lr1.csv")
        assert list(curve["step"]) == [1, 2, 3]  # written once, by rank 0
    report = (path / "reports/comparison.md").read_text()
    assert "Distributed training" in report and "fsdp" in report
    assert not list(path.glob("reports/**/.*.tmp-*")) and not list(path.glob("models/**/.*.tmp-*"))


def test_exp_run_selecting_init_family_entries_reports_them(repo):
    """Issue 13's end-to-end check in miniature: catalog entries of the initialisation family, selected by
    `dvc exp run -S run=[...]`, train (PiSSA rewrites W0; EVA calibrates on training batches), are evaluated
    and appear in the report with their init time; LoRA is restored, not retrained."""
    path = repo["path"]
    out = _run(["dvc", "exp", "run", "-S", "run=[lora,pissa,eva]", "-S", "variant=lora", "-S", "train.distributed.strategy=none",
                "-S", "train.distributed.nproc_per_node=1"], path)
    text = out.stdout + out.stderr
    assert "Running stage 'train@pissa-0-1'" in text and "Running stage 'train@eva-0-1'" in text
    assert "[eva] init=eva: calibrated on 4 training batches" in text
    for name in ("pissa", "eva"):
        summary = json.loads((path / f"models/adapters/{name}/seed0/lr1/train_summary.json").read_text())
        assert summary["init_seconds"] > 0 and summary["spec"]["init"] == name
        assert json.loads((path / f"reports/metrics/{name}/seed0.json").read_text())["n_test"] == 8
    eva = json.loads((path / "models/adapters/eva/seed0/lr1/train_summary.json").read_text())
    assert eva["init"]["batches"] == 4 and eva["init"]["forwards"] >= 4
    table = pd.read_csv(path / "reports/comparison.csv")
    assert list(table["variant"]) == ["lora", "pissa", "eva", "base"]
    report = (path / "reports/comparison.md").read_text()
    assert "| pissa |" in report and "| eva |" in report
    assert "Initialisation family (pissa: init=pissa, build + init" in report and "eva: init=eva" in report
