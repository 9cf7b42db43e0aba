"""The grid across machines (issue 12): `python -m pipeline.grid` on a Ray cluster this test starts itself
(a head and a second node, separate processes, loopback only), a local-folder DVC remote and an MLflow
server with a sqlite store on 127.0.0.1.

One grid of 2 methods x 2 seeds on the tiny model, during which the worker of one training cell is
SIGKILLed once its MLflow run exists: the grid still completes, the head's final `dvc repro` runs no
training or evaluation stage, the metrics equal a single-machine `dvc repro` of the same params, and
MLflow holds each cell exactly once. Plus the checks that refuse bad input before anything is
dispatched, and the watchdog that takes a cell's processes down with its dead worker.

Ray is the optional extra `.[cluster]`: without it the cluster test skips, unless
LORA_REQUIRE_CLUSTER_EXTRA=1 (set by .ci/run), which turns the missing extra into a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml
from tiny_assets import command_env, project_repo, run_command, save_tiny_model, small_pipeline_params

from pipeline import grid_plan, grid_worker
from pipeline.grid import check_tracking_server
from pipeline.grid_plan import GridError

ROOT = Path(__file__).resolve().parents[1]
RUN = ["lora", "lora_fa"]
SEEDS = [0, 1]
TIMEOUT = 600


def _env(extra: dict | None = None) -> dict:
    return command_env(extra)


def _run(args, cwd, check=True, timeout=TIMEOUT, env=None):
    return run_command(args, cwd, check=check, timeout=timeout, env=env)


def _params(model_dir: Path, uri: str | None) -> dict:
    root = yaml.safe_load((ROOT / "params.yaml").read_text())
    # 40 steps keep a training cell's MLflow run open for a few seconds, long enough for _Killer to see it
    params = small_pipeline_params(root, model_dir, {name: {} for name in RUN}, steps=40, eval_interval=10)
    params.update(seeds=SEEDS, lr_grid=[1])
    params["tracking"] = {**params["tracking"], "uri": uri, "enabled": uri is not None}
    return params


def _grid_repo(path: Path, params: dict, remote: Path) -> Path:
    repo = project_repo(path, params, _run)
    _run(["dvc", "remote", "add", "-d", "shared", str(remote)], repo)
    _run(["git", "commit", "-qam", "DVC remote"], repo)
    return repo


# ----- bad input: refused before anything is dispatched ----------------------------------------------------
@pytest.fixture(scope="module")
def small_repo(tmp_path_factory):
    base = tmp_path_factory.mktemp("grid-checks")
    model_dir = save_tiny_model(base / "tiny-model")
    return _grid_repo(base / "repo", _params(model_dir, "http://127.0.0.1:9"), base / "remote"), base


def _edit_params(repo: Path, change) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    change(params)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_plan_checks_name_the_bad_value(small_repo):
    repo, _ = small_repo
    plan = grid_plan.plan(repo)
    assert [t.stages for t in plan.train] == [(f"train@{v}-{s}-1",) for v in RUN for s in SEEDS] + [("evaluate_base",)]
    assert [t.stages for t in plan.evaluate] == [(f"evaluate@{v}-{s}",) for v in RUN for s in SEEDS]
    assert plan.selects == tuple(f"select@{v}" for v in RUN)
    assert plan.remote == "shared" and plan.url == str(repo) and all(t.num_cpus == 1 for t in plan.train)
    start = _run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    try:
        _edit_params(repo, lambda p: p["train"].update(lr="fast"))
        with pytest.raises(GridError, match=r"train\.lr must be a positive number, got 'fast'"):
            grid_plan.plan(repo)
        _run(["git", "checkout", "params.yaml"], repo)
        _edit_params(repo, lambda p: p["tracking"].update(uri=None))
        _run(["git", "commit", "-qam", "sqlite"], repo)
        with pytest.raises(GridError, match=r"tracking\.uri is null .*MLflow server"):
            grid_plan.plan(repo)
        _run(["git", "reset", "-q", "--hard", "HEAD~1"], repo)
        (repo / "pipeline" / "select.py").write_text((repo / "pipeline" / "select.py").read_text() + "\n# edit\n")
        with pytest.raises(GridError, match=r"uncommitted changes .*pipeline/select\.py"):
            grid_plan.plan(repo)
        _run(["git", "checkout", "pipeline/select.py"], repo)
        _run(["dvc", "remote", "default", "--unset"], repo)
        _run(["git", "commit", "-qam", "no remote"], repo)
        with pytest.raises(GridError, match=r"no default DVC remote"):
            grid_plan.plan(repo)
    finally:
        _run(["git", "reset", "-q", "--hard", start], repo)


def test_cli_fails_before_contacting_the_cluster(small_repo):
    """A bad value ends the head with status 2 and its message, before Ray is contacted (the address
    given is no cluster: reaching it would be a different error)."""
    repo, _ = small_repo
    _edit_params(repo, lambda p: p["seeds"].append(0))
    try:
        done = _run([sys.executable, "-m", "pipeline.grid", "--address", "127.0.0.1:9"], repo, check=False, timeout=120)
    finally:
        _run(["git", "checkout", "params.yaml"], repo)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "params.yaml: seeds holds a seed twice: [0, 1, 0]" in done.stderr, done.stderr
    assert "[grid]" not in done.stdout  # nothing planned, nothing ran

    done = _run([sys.executable, "-m", "pipeline.grid", "--address", "127.0.0.1:9", "--plan"], repo, check=False,
                timeout=120)
    assert done.returncode == 2 and "tracking.uri http://127.0.0.1:9 is unreachable" in done.stderr, done.stderr


def test_resources_per_cell():
    """A training cell asks for one GPU per torchrun process on CUDA, that many CPUs otherwise; an
    evaluation is one process."""
    from types import SimpleNamespace

    def params(device):
        return SimpleNamespace(train=SimpleNamespace(device=device, distributed=SimpleNamespace(nproc_per_node=4)))

    assert grid_plan.resources(params("cuda"), "train") == (1, 4)
    assert grid_plan.resources(params("cuda"), "evaluate") == (1, 1)
    assert grid_plan.resources(params("cpu"), "train") == (4, 0)
    assert grid_plan.resources(params("auto"), "evaluate") == (1, 0)


def test_unreachable_tracking_server_is_named():
    from grid_services import free_port

    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(GridError, match=re.escape(f"tracking.uri {uri} is unreachable")):
        check_tracking_server(uri)


def test_watchdog_kills_the_cell_when_its_worker_dies(tmp_path):
    """The worker process (here a stand-in) is SIGKILLed: the command it ran in its own process
    group dies too, instead of training on beside the retry."""
    pid_file = tmp_path / "pid"
    script = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from pipeline.grid_worker import _guarded; "
              f"from pathlib import Path; import os; "
              f"_guarded(['sh', '-c', 'echo $$ > {pid_file}; exec sleep 120'], Path('.'), dict(os.environ), "
              f"Path({str(tmp_path / 'log')!r}), None)")
    worker = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not pid_file.exists() or not pid_file.read_text().strip():
            assert time.monotonic() < deadline and worker.poll() is None
            time.sleep(0.1)
        child = psutil.Process(int(pid_file.read_text()))
        assert child.is_running()
        worker.kill()
        worker.wait()
        gone, alive = psutil.wait_procs([child], timeout=10)
        assert not alive, "the cell's command outlived its worker"
    finally:
        if worker.poll() is None:
            worker.kill()


def test_why_and_stage_seconds_read_dvc_output():
    lines = [(0.0, "Running stage 'train@lora-0-1':"), (1.0, "> python -m pipeline.run train lora"),
             (2.0, "train@lora-0-1: lora: loss is nan at step 2"), (3.0, "ERROR: failed to reproduce 'train@lora-0-1'")]
    assert grid_worker.why(lines) == "train@lora-0-1: lora: loss is nan at step 2"
    assert grid_worker.why(lines[3:]) == "ERROR: failed to reproduce 'train@lora-0-1'"
    assert grid_worker.stage_seconds([(1.0, "Running stage 'a':"), (4.5, "Updating lock file 'dvc.lock'"),
                                      (5.0, "Running stage 'b':")]) == {"a": 3.5}


# ----- the grid on a two-node Ray cluster --------------------------------------------------------------------
class _Killer(threading.Thread):
    """SIGKILLs the Ray worker of the first training cell whose MLflow run is RUNNING (so the killed
    attempt has left a run behind), once."""

    def __init__(self, uri: str, workdir: Path):
        super().__init__(daemon=True)
        self.uri, self.workdir = uri, workdir
        self.killed: str | None = None
        self.stop = threading.Event()

    @staticmethod
    def _cell(cmd: list[str]) -> tuple[str, str, str] | None:
        """(variant, seed, lr multiple) of a `python -m pipeline.run train <v> --seed S --lr-multiple M ...`
        command (the stage's client, whose parents lead to the Ray worker), else None."""
        if "pipeline.run" not in cmd or cmd[cmd.index("pipeline.run") + 1:][:1] != ["train"]:
            return None
        args = cmd[cmd.index("pipeline.run") + 2:]
        return args[0], args[args.index("--seed") + 1], args[args.index("--lr-multiple") + 1]

    def _training_cells(self) -> dict[tuple[str, str, str], psutil.Process]:
        """Each training cell whose stage runs now in a cell's checkout under `workdir`, with the Ray
        worker above it."""
        found = {}
        for proc in psutil.process_iter(["cmdline", "cwd"]):
            try:
                cmd = proc.info["cmdline"] or []
                cell = self._cell(cmd)
                if cell is not None and str(self.workdir) in (proc.info["cwd"] or ""):
                    for parent in proc.parents():
                        if (parent.cmdline() or [""])[0].startswith("ray::"):
                            found[cell] = parent
            except psutil.Error:
                continue
        return found

    def run(self):
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.uri)
        # A training cell's run is open for ~2-3 s (40 steps, see _params): look often, on this machine
        # first (cheap), and ask the server only while a training stage runs.
        while not self.stop.is_set() and self.killed is None:
            time.sleep(0.1)
            cells = self._training_cells()
            if not cells:
                continue
            try:
                exp = client.get_experiment_by_name("lora-variants")
                runs = exp and client.search_runs([exp.experiment_id], "tags.stage = 'train' and "
                                                  "attributes.status = 'RUNNING'")
            except Exception:
                continue
            running = {(r.data.tags.get("variant"), r.data.tags.get("seed"), r.data.tags.get("lr_multiple"))
                       for r in runs or []}
            for cell in sorted(running & set(cells)):
                try:
                    cells[cell].send_signal(signal.SIGKILL)
                except psutil.NoSuchProcess:
                    continue  # the cell ended between the two looks
                self.killed = "train@{}-{}-{}".format(*cell)
                break


@pytest.fixture(scope="module")
def grid_run(ray_extra, tmp_path_factory):
    from grid_services import MlflowServer, RayCluster

    base = tmp_path_factory.mktemp("grid-cluster")
    model_dir = save_tiny_model(base / "tiny-model")
    # Ray's unix sockets live below its temp dir, and their paths must stay under 108 bytes
    ray_dir = Path(tempfile.mkdtemp(prefix="rg-", dir="/tmp"))
    # the same params on one machine, no cluster, no tracking (it records, it does not compute); it runs
    # beside the grid, whose head mostly waits for its workers
    reference = project_repo(base / "single", _params(model_dir, None), _run)
    with open(base / "single.log", "w") as log:
        single = subprocess.Popen(["dvc", "repro"], cwd=reference, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        with MlflowServer(base / "mlflow") as server, RayCluster(ray_dir, nodes=2, cpus=1) as cluster:
            grid = _grids(base, model_dir, server, cluster)
        single.wait(timeout=TIMEOUT)
        single_out = (base / "single.log").read_text()
        assert single.returncode == 0, single_out[-5000:]
    finally:
        if single.poll() is None:
            os.killpg(single.pid, signal.SIGKILL)
            single.wait()
        shutil.rmtree(ray_dir, ignore_errors=True)
    return {**grid, "reference": reference, "single": single_out}


def _grids(base: Path, model_dir: Path, server, cluster) -> dict:
    from grid_services import ray_client_env

    repo = _grid_repo(base / "repo", _params(model_dir, server.uri), base / "remote")
    killer = _Killer(server.uri, base / "cells")
    killer.start()
    try:
        done = _run([sys.executable, "-m", "pipeline.grid", "--address", cluster.address, "--workdir",
                     str(base / "cells")], repo, check=False, env=ray_client_env())
    finally:
        killer.stop.set()
        killer.join(timeout=10)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(server.uri)
    exp = client.get_experiment_by_name("lora-variants")
    runs = client.search_runs([exp.experiment_id], max_results=1000) if exp else []

    # A second grid on the same remote: seed 0 only, and LoRA's lr so large that its loss is not
    # finite. lora_fa's cells and evaluate_base are in the run-cache already (not dispatched);
    # train@lora-0-1 fails by itself (not retried), lora_fa still gets selected and evaluated.
    failing = _params(model_dir, server.uri)
    failing["seeds"] = [0]
    failing["variants"]["lora"]["lr"] = 1.0e30
    failing_repo = _grid_repo(base / "failing", failing, base / "remote")
    second = _run([sys.executable, "-m", "pipeline.grid", "--address", cluster.address], failing_repo,
                  check=False, env=ray_client_env())
    # A stage that meets a new experiment on the server creates it with the server's artifact store,
    # not a folder of its own checkout (which the server's other clients cannot read)
    from pipeline.tracking import Tracker

    Tracker(True, "created-by-a-stage", server.uri)
    created = client.get_experiment_by_name("created-by-a-stage")
    return {"done": done, "repo": repo, "runs": runs, "killed": killer.killed, "second": second,
            "failing_repo": failing_repo, "stage_created_artifacts": created.artifact_location if created else None,
            "server_default_artifacts": exp.artifact_location if exp else None}


MEASURED = re.compile(r"seconds|per_second|memory|bytes")  # time and memory: they differ from run to run


def _drop_measured(value):
    if isinstance(value, dict):
        return {k: _drop_measured(v) for k, v in value.items() if not MEASURED.search(k)}
    if isinstance(value, list):
        return [_drop_measured(v) for v in value]
    return value


def _quality(path: Path) -> dict:
    """Every metrics file (and focus.json), without the entries that measure time or memory."""
    files = sorted((path / "reports/metrics").rglob("*.json")) + [path / "reports/focus.json"]
    return {str(f.relative_to(path)): _drop_measured(json.loads(f.read_text())) for f in files}


@pytest.mark.slow
def test_grid_completes_after_a_killed_worker(grid_run):
    done = grid_run["done"]
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-6000:]
    assert grid_run["killed"] is not None, "the test never found a training cell to kill:\n" + log[-3000:]
    # the killed cell reached the remote all the same (its retry), once
    assert len(re.findall(rf"\[grid\] {re.escape(grid_run['killed'])} on \S+: done", log)) == 1, log
    cells = [f"train@{v}-{s}-1" for v in RUN for s in SEEDS] + ["evaluate_base"] + [f"evaluate@{v}-{s}" for v in RUN
                                                                                   for s in SEEDS]
    nodes = set()
    for cell in cells:
        match = re.search(rf"\[grid\] {re.escape(cell)} on \S+/(\w+): done", log)
        assert match, (cell, log[-4000:])
        nodes.add(match.group(1))
    assert len(nodes) == 2, nodes  # the cells crossed a node boundary


@pytest.mark.slow
def test_final_repro_runs_no_training_or_evaluation(grid_run):
    log = grid_run["done"].stdout
    final = log[log.index("[grid] head: dvc repro --pull"):]
    assert sorted(re.findall(r"Running stage '([^']+)'", final)) == ["compare", "focus"], final[-3000:]
    assert "[grid] head ran: compare, focus" in final or "[grid] head ran: focus, compare" in final
    # while the single-machine run trained and evaluated every cell
    assert len(re.findall(r"Running stage 'train@", grid_run["single"])) == len(RUN) * len(SEEDS)


@pytest.mark.slow
def test_metrics_equal_a_single_machine_repro(grid_run):
    grid, single = _quality(grid_run["repo"]), _quality(grid_run["reference"])
    assert len(grid) == len(RUN) * len(SEEDS) + 2  # every cell, the base, the focus
    assert grid == single
    for variant in RUN:
        path = f"reports/selection/{variant}.json"
        assert json.loads((grid_run["repo"] / path).read_text()) == json.loads((grid_run["reference"] / path).read_text())
        path = f"reports/validation/{variant}.csv"  # every cell's validation losses, to the last digit
        assert (grid_run["repo"] / path).read_text() == (grid_run["reference"] / path).read_text()
    _run(["dvc", "status", "--quiet"], grid_run["repo"])  # nothing left to run


@pytest.mark.slow
def test_mlflow_holds_each_cell_once(grid_run):
    runs = grid_run["runs"]
    train = [r for r in runs if r.data.tags.get("stage") == "train"]
    assert sorted((r.data.tags["variant"], r.data.tags["seed"]) for r in train) == sorted(
        (v, str(s)) for v in RUN for s in SEEDS)
    assert all(r.info.status == "FINISHED" for r in train)
    evaluate = [r for r in runs if r.data.tags.get("stage") == "evaluate"]
    assert sorted((r.data.tags["variant"], r.data.tags["seed"]) for r in evaluate) == sorted(
        (v, str(s)) for v in RUN for s in SEEDS)
    # the killed attempt's run existed (the killer waited for it) and was removed
    assert "removed 1 run(s) of killed attempts of retried cells" in grid_run["done"].stdout
    # every train run is the one its adapter names (the one evaluate logged the test metrics onto)
    for r in train:
        folder = grid_run["repo"] / f"models/adapters/{r.data.tags['variant']}/seed{r.data.tags['seed']}/lr1"
        assert json.loads((folder / "mlflow.json").read_text())["run_id"] == r.info.run_id
        assert "phoneme_error_rate" in r.data.metrics or "exact_match" in r.data.metrics



@pytest.mark.slow
def test_an_experiment_a_stage_creates_on_a_server_keeps_artifacts_there(grid_run):
    location = grid_run["stage_created_artifacts"]
    assert location is not None and not location.startswith("file:"), location
    # the same store as the experiment the grid's head created with the server's defaults
    assert location.split("/")[0] == grid_run["server_default_artifacts"].split("/")[0] == "mlflow-artifacts:"


@pytest.mark.slow
def test_a_failing_cell_is_named_and_the_others_finish(grid_run):
    done = grid_run["second"]
    out, err = done.stdout, done.stderr
    assert done.returncode == 1, out[-3000:] + err[-3000:]
    # cells the first grid left in the remote's run-cache are not dispatched again
    assert "wave 1 (training): 2 cell(s) already in the run-cache, not dispatched: evaluate_base, " \
           "train@lora_fa-0-1" in out, out[-4000:]
    assert "wave 2 (evaluation): 1 cell(s) already in the run-cache, not dispatched: evaluate@lora_fa-0" in out
    # the failed cell, named with its own error line, once (a deterministic failure is not retried)
    assert re.search(r"^  train@lora-0-1: train@lora-0-1: lora: (loss|gradient norm) is (nan|inf)", err, re.M), err
    assert len(re.findall(r"\[grid\] train@lora-0-1 on \S+: FAILED", out)) == 1, out
    assert "select@lora_fa" in out and "select@lora " not in out  # the variant whose cells all ran goes on
    repo = grid_run["failing_repo"]
    assert (repo / "reports/selection/lora_fa.json").exists() and not (repo / "reports/selection/lora.json").exists()
    assert not (repo / "reports/metrics/lora").exists()
    assert "head: dvc repro --pull" not in out  # no report from an incomplete grid
