"""The one place that talks to MLflow: a mirror of the DVC files, never their source of truth.

Store: `sqlite:///<repository>/mlflow.db`, artifacts in `<repository>/mlartifacts`, both with
absolute paths so DVC's queued experiments (which run in temporary copies under
.dvc/tmp/exps) write to the same store. `tracking.uri` in params.yaml or the
MLFLOW_TRACKING_URI environment variable override it.

One MLflow run per stage, so that a run's start, end and duration are its stage's:

- `train@<v>` opens the variant's run (params, tags, per-step curves, training costs) and
  records its id in the adapter folder (a declared output); a resumed training continues it.
  A run whose training fails ends as FAILED.
- `evaluate@<v>` logs the variant's metrics onto that run (so the runs table shows them next to
  its params, and each chart has one bar per variant), and opens a child run of it (tag
  `mlflow.parentRunId`, `stage=evaluate`) that spans the evaluation: its time and predictions.

Each run starts when its stage's process started and ends when the stage is done.

Only `MlflowClient` is used (no fluent API): no process-wide active run, no exported
MLFLOW_TRACKING_URI, no git/source context lookups; one client (one store connection) per
stage, and mlflow is imported only when tracking is on.

If the store cannot be reached, the stages print one warning and go on: the DVC metrics
files are still written.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pipeline.runtime import process_start_time, repo_root

_DISABLED_REASON: str | None = None
LOCK_RETRIES = 20
BATCH = 900  # MLflow accepts at most 1000 metrics per log_batch call


def _warn_once(reason: str) -> None:
    global _DISABLED_REASON
    if _DISABLED_REASON is None:
        _DISABLED_REASON = reason
        print(f"WARNING: MLflow tracking is off for this stage: {reason}. The DVC metrics files are still written.",
              file=sys.stderr, flush=True)


def _first_line(err: BaseException) -> str:
    return str(err).splitlines()[0][:200] if str(err) else ""


def default_uri() -> str:
    return f"sqlite:///{Path(repo_root()) / 'mlflow.db'}"


def artifact_root() -> str:
    return (Path(repo_root()) / "mlartifacts").as_uri()


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


class Tracker:
    """A thin, failure-tolerant wrapper around one MLflow run (one stage's)."""

    def __init__(self, enabled: bool, experiment: str, uri: str | None):
        self.enabled = enabled
        self.experiment = experiment
        self.uri = os.environ.get("MLFLOW_TRACKING_URI") or uri or default_uri()
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self._client = None
        if enabled:
            os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
            # An unreachable server must cost seconds, not minutes of retries with backoff.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
            try:
                from mlflow.tracking import MlflowClient  # ~1.5 s of imports: only when tracking is on

                client = MlflowClient(tracking_uri=self.uri)
                self.experiment_id = self._experiment_id(client, experiment)
                self._client = client
            except Exception as err:  # any failure to reach the store: warn once, go on
                _warn_once(f"{type(err).__name__}: {_first_line(err)} ({self.uri})")

    @staticmethod
    def _experiment_id(client, name: str) -> str:
        found = client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return client.create_experiment(name, artifact_location=artifact_root())
        except Exception:
            found = client.get_experiment_by_name(name)  # a parallel stage created it first
            if found is None:
                raise
            return found.experiment_id

    @property
    def active(self) -> bool:
        return self._client is not None

    def _call(self, what: str, fn, *args, **kwargs) -> Any:
        if self._client is None:
            return None
        for attempt in range(LOCK_RETRIES + 1):
            try:
                return fn(*args, **kwargs)
            except Exception as err:
                # Parallel experiments (dvc queue start -j 2) share the sqlite store: a writer
                # may find it locked for a moment. Wait and retry; give up on anything else.
                if "database is locked" in str(err) and attempt < LOCK_RETRIES:
                    time.sleep(0.2 * (attempt + 1))
                    continue
                _warn_once(f"{what} failed: {type(err).__name__}: {_first_line(err)}")
                self._client = None
                return None

    def start(self, run_name: str, tags: Mapping[str, str], run_id: str | None = None,
              parent_run_id: str | None = None, started_at: float | None = None) -> str | None:
        """Open a new run, or continue `run_id` (a resumed training).

        The new run starts at `started_at` (Unix seconds; default: when this stage's process
        started), so its duration in the UI is the stage's. `parent_run_id` nests it under
        another run (an evaluation under its training)."""
        def go():
            client = self._client
            if run_id is not None:
                try:
                    client.get_run(run_id)
                    client.update_run(run_id, status="RUNNING")
                    return run_id
                except Exception as err:
                    if "database is locked" in str(err):
                        raise
                    print(f"WARNING: MLflow run {run_id} cannot be continued ({type(err).__name__}); "
                          "starting a new one", file=sys.stderr, flush=True)
            all_tags = {**tags, "mlflow.runName": run_name}
            if parent_run_id is not None:
                all_tags["mlflow.parentRunId"] = parent_run_id
            run = client.create_run(self.experiment_id, start_time=_ms(started_at or process_start_time()),
                                    tags=all_tags, run_name=run_name)
            return run.info.run_id
        self.run_id = self._call("create_run", go)
        return self.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.run_id or self._client is None:
            return
        from mlflow.entities import Param

        flat = [Param(k, str(v)[:6000]) for k, v in params.items()]
        self._call("log_params", lambda: self._client.log_batch(self.run_id, params=flat))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None, run_id: str | None = None) -> None:
        """Log onto this stage's run, or onto `run_id` (the quality metrics onto the training run)."""
        target = run_id or self.run_id
        if not target or self._client is None:
            return
        from mlflow.entities import Metric

        now = _ms(time.time())
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        self._call("log_metrics", lambda: self._client.log_batch(target, metrics=batch))

    def log_curve(self, rows: Iterable[Mapping[str, float]], keys: Iterable[str]) -> None:
        """Per-step series (loss, lr, grad norm, ...) in as few batch calls as MLflow allows."""
        if not self.run_id or self._client is None:
            return
        from mlflow.entities import Metric

        now = _ms(time.time())
        metrics = [Metric(key, float(row[key]), now, int(row["step"])) for row in rows for key in keys
                   if row.get(key) is not None and row[key] == row[key]]

        def go():
            for i in range(0, len(metrics), BATCH):
                self._client.log_batch(self.run_id, metrics=metrics[i:i + BATCH])
        self._call("log_batch", go)

    def log_artifacts(self, folder: str | os.PathLike, artifact_path: str) -> None:
        if self.run_id:
            self._call("log_artifacts", lambda: self._client.log_artifacts(self.run_id, str(folder), artifact_path))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if self.run_id:
            self._call("log_artifact", lambda: self._client.log_artifact(self.run_id, str(path), artifact_path))

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id:
            self._call("set_terminated", lambda: self._client.set_terminated(self.run_id, status, _ms(time.time())))


def standard_tags(variant: str, stage: str) -> dict[str, str]:
    commit = git_commit()
    return {
        "variant": variant,
        "stage": stage,
        "git_commit": commit,
        "mlflow.source.git.commit": commit,
        "dvc_exp_name": os.environ.get("DVC_EXP_NAME", "not_a_dvc_experiment"),
    }


def quiet_mlflow_warnings() -> None:
    warnings.filterwarnings("ignore", module="mlflow")
