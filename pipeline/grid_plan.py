"""What `python -m pipeline.grid` will run, and every check that must pass before anything is dispatched.

The comparison cannot be one wave of independent (method, seed, lr) cells: `select@<v>` needs every
cell of its variant, and `evaluate@<v>-<s>` needs select's choice. So the grid runs in steps:

    head    prepare, base, quantize                    cheap, one each; pushed with the run-cache
    wave 1  train@<v>-<s>-<lr> (one task per cell), evaluate_base
    head    select@<v>                                  torch-free, seconds
    wave 2  evaluate@<v>-<s> (one task per cell)
    head    `dvc repro --pull`: every stage above comes from the remote's run-cache; compare and focus run

This module only plans and checks (git, DVC remote, tracking URI, params); it imports no Ray, and
the check of the params file is the stages' own (pipeline.params), so a mistake fails here with
the same one-line message, before a cluster is touched.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.cells import cells, evaluate_stage, select_stage
from pipeline.params import ParamsError, load_params

UPSTREAM = ("prepare", "base", "quantize")
FINAL = ("compare", "focus")


class GridError(ValueError):
    """The grid cannot start (or go on); the message names the bad value and what to do."""


@dataclass(frozen=True)
class Task:
    """Stages one worker runs in its own clone (one cell), what it asks the cluster for, and which cell
    it is (kind "train" or "evaluate"; evaluate_base has no variant), so nothing parses stage names back."""

    stages: tuple[str, ...]
    num_cpus: float
    num_gpus: float = 0
    kind: str = ""
    variant: str | None = None
    seed: int | None = None
    lr_label: str | None = None      # the training cell's lr multiple, as DVC names it

    @property
    def name(self) -> str:
        return " ".join(self.stages)


@dataclass(frozen=True)
class Plan:
    repo: Path
    url: str               # what workers clone
    commit: str            # what they check out: the head's HEAD, clean
    remote: str            # the DVC remote (the project's config, so clones see it too)
    tracking_uri: str | None
    experiment: str
    variants: tuple[str, ...]  # params `run`
    train: tuple[Task, ...]
    evaluate: tuple[Task, ...]

    @property
    def selects(self) -> tuple[str, ...]:
        return tuple(select_stage(v) for v in self.variants)


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise GridError(f"git {' '.join(args)} failed in {repo}: {done.stderr.strip()[:300]}")
    return done.stdout.strip()


def _dvc_config(repo: Path, key: str) -> str | None:
    # --project: the committed .dvc/config, the one a worker's clone reads (not config.local)
    done = subprocess.run([sys.executable, "-m", "dvc", "config", "--project", key], cwd=repo, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def resources(params, stage_kind: str) -> tuple[float, float]:
    """(CPUs, GPUs) one cell asks for. A training cell on CUDA needs one GPU per torchrun process
    (train.distributed.nproc_per_node); on the CPU that many cores. Evaluation is one process.
    `device: auto` plans for the CPU: the head cannot see a worker's GPUs (set train.device: cuda)."""
    procs = params.train.distributed.nproc_per_node if stage_kind == "train" else 1
    if params.train.device == "cuda":
        return 1, procs
    return procs, 0


def check_tracking(params) -> str | None:
    """The tracking URI every worker logs to: a server they all reach, or tracking off."""
    if not params.tracking.enabled:
        return None
    uri = params.tracking.uri
    if uri is None or not uri.startswith(("http://", "https://")):
        shown = "null (sqlite:///<clone>/mlflow.db)" if uri is None else repr(uri)
        raise GridError(f"params.yaml: tracking.uri is {shown}: each worker would write its own store inside its "
                        "own clone and the runs would be scattered. The grid needs an MLflow server all workers "
                        "reach (tracking.uri: http://host:5000) or tracking.enabled: false")
    return uri


def check_repo(repo: Path) -> str:
    """The commit workers check out; refuses changes they would not see."""
    dirty = _git(repo, "diff", "--name-only", "HEAD").splitlines()  # tracked files, staged or not
    # results are no input of any stage: dvc.lock and the reports may differ from the commit
    dirty = [path for path in dirty if path != "dvc.lock" and not path.startswith("reports/")]
    if dirty:
        files = ", ".join(dirty[:8])
        raise GridError(f"uncommitted changes in {repo} ({files}): workers clone the commit, so they would run "
                        "other code or params than this head. Commit (and push) them first")
    return _git(repo, "rev-parse", "HEAD")


def worker_url(repo: Path, url: str | None) -> str:
    """Where workers clone from: --repo-url, else the git remote `origin`, else this folder (one machine,
    or a filesystem every node shares)."""
    if url:
        return url
    done = subprocess.run(["git", "remote", "get-url", "origin"], cwd=repo, capture_output=True, text=True, timeout=60)
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else str(repo)


def plan(repo: str | Path, url: str | None = None) -> Plan:
    """Every check, then the tasks of both waves (GridError or ParamsError naming the problem)."""
    repo = Path(repo).resolve()
    if not (repo / "dvc.yaml").is_file():
        raise GridError(f"{repo}: no dvc.yaml here (run the grid from the repository root)")
    try:
        params = load_params(repo / "params.yaml")
    except ParamsError as err:
        raise GridError(str(err)) from None
    tracking_uri = check_tracking(params)
    commit = check_repo(repo)
    remote = _dvc_config(repo, "core.remote")
    if remote is None:
        raise GridError("no default DVC remote in .dvc/config (the project config, committed): workers push their "
                        "results there and the head pulls them. Add one: dvc remote add -d <name> s3://... "
                        "(or a folder), then commit .dvc/config")
    train_cpu, train_gpu = resources(params, "train")
    eval_cpu, eval_gpu = resources(params, "evaluate")
    grid = [c for v in params.run for c in cells(v, params.seeds, params.lr_grid)]
    train = tuple(Task((c.stage,), train_cpu, train_gpu, "train", c.variant, c.seed, c.lr.label) for c in grid) + (
        Task(("evaluate_base",), eval_cpu, eval_gpu, "evaluate"),)
    evaluate = tuple(Task((evaluate_stage(v, s),), eval_cpu, eval_gpu, "evaluate", v, s)
                     for v in params.run for s in params.seeds)
    return Plan(repo=repo, url=worker_url(repo, url), commit=commit, remote=remote, tracking_uri=tracking_uri,
                experiment=params.tracking.experiment, variants=tuple(params.run), train=train, evaluate=evaluate)
