"""The one place that talks to MLflow: a mirror of the DVC files, never their source of truth.

Store: `sqlite:///<repository>/mlflow.db`, artifacts in `<repository>/mlartifacts`, both with
absolute paths so DVC's queued experiments (which run in temporary copies under
.dvc/tmp/exps) write to the same store. `tracking.uri` in params.yaml or the
MLFLOW_TRACKING_URI environment variable override it.

One run per variant per pipeline run: `train@<v>` opens it (params, tags, per-step curves),
records its id in the adapter folder (a declared output), and `evaluate@<v>` reopens it to
add the final metrics and the adapter. A run whose training fails ends as FAILED.

If the store cannot be reached, the stages print one warning and go on: the DVC metrics
files are still written.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

from pipeline.runtime import repo_root

_DISABLED_REASON: str | None = None
LOCK_RETRIES = 20


def _warn_once(reason: str) -> None:
    global _DISABLED_REASON
    if _DISABLED_REASON is None:
        _DISABLED_REASON = reason
        print(f"WARNING: MLflow tracking is off for this stage: {reason}. The DVC metrics files are still written.",
              file=sys.stderr, flush=True)


def default_uri() -> str:
    return f"sqlite:///{Path(repo_root()) / 'mlflow.db'}"


def artifact_root() -> str:
    return (Path(repo_root()) / "mlartifacts").as_uri()


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Tracker:
    """A thin, failure-tolerant wrapper around one MLflow run."""

    def __init__(self, enabled: bool, experiment: str, uri: str | None):
        self.enabled = enabled
        self.experiment = experiment
        self.uri = os.environ.get("MLFLOW_TRACKING_URI") or uri or default_uri()
        self.run_id: str | None = None
        self._mlflow = None
        if enabled:
            os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
            # An unreachable server must cost seconds, not minutes of retries with backoff.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
            try:
                import mlflow

                mlflow.set_tracking_uri(self.uri)
                if mlflow.get_experiment_by_name(experiment) is None:
                    mlflow.create_experiment(experiment, artifact_location=artifact_root())
                mlflow.set_experiment(experiment)
                self._mlflow = mlflow
            except Exception as err:  # any failure to reach the store: warn once, go on
                _warn_once(f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''} ({self.uri})")

    @property
    def active(self) -> bool:
        return self._mlflow is not None

    def _call(self, what: str, fn, *args, **kwargs) -> Any:
        if self._mlflow is None:
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
                _warn_once(f"{what} failed: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}")
                self._mlflow = None
                return None

    def start(self, run_name: str, tags: Mapping[str, str], run_id: str | None = None) -> str | None:
        """Open a new run, or continue `run_id` (a resumed training, an evaluation)."""
        def go():
            mlflow = self._mlflow
            if run_id is not None:
                try:
                    return mlflow.start_run(run_id=run_id).info.run_id
                except Exception as err:
                    if "database is locked" in str(err):
                        raise
                    print(f"WARNING: MLflow run {run_id} cannot be continued ({type(err).__name__}); "
                          "starting a new one", file=sys.stderr, flush=True)
            return mlflow.start_run(run_name=run_name, tags=dict(tags)).info.run_id
        self.run_id = self._call("start_run", go)
        return self.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        flat = {k: str(v)[:6000] for k, v in params.items()}
        self._call("log_params", lambda: self._mlflow.log_params(flat))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self._call("log_metrics", lambda: self._mlflow.log_metrics(clean, step=step))

    def log_curve(self, rows: Iterable[Mapping[str, float]], keys: Iterable[str]) -> None:
        """Per-step series (loss, lr, grad norm, ...) in one batch call."""
        def go():
            from mlflow.entities import Metric
            import time

            now = int(time.time() * 1000)
            metrics = [Metric(key, float(row[key]), now, int(row["step"])) for row in rows for key in keys
                       if row.get(key) is not None and row[key] == row[key]]
            client = self._mlflow.MlflowClient()
            for i in range(0, len(metrics), 900):
                client.log_batch(self.run_id, metrics=metrics[i:i + 900])
        if self.run_id:
            self._call("log_batch", go)

    def log_artifacts(self, folder: str | os.PathLike, artifact_path: str) -> None:
        self._call("log_artifacts", lambda: self._mlflow.log_artifacts(str(folder), artifact_path))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._call("log_artifact", lambda: self._mlflow.log_artifact(str(path), artifact_path))

    def end(self, status: str = "FINISHED") -> None:
        self._call("end_run", lambda: self._mlflow.end_run(status=status))


def standard_tags(variant: str, stage: str) -> dict[str, str]:
    return {
        "variant": variant,
        "stage": stage,
        "git_commit": git_commit(),
        "mlflow.source.git.commit": git_commit(),
        "dvc_exp_name": os.environ.get("DVC_EXP_NAME", "not_a_dvc_experiment"),
    }


def quiet_mlflow_warnings() -> None:
    warnings.filterwarnings("ignore", module="mlflow")
