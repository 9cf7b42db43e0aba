"""The one place that talks to MLflow: a mirror of the DVC files, never their source of truth.

Store: `sqlite:///<repository>/mlflow.db`, artifacts in `<repository>/mlartifacts`, both with
absolute paths so DVC's queued experiments (which run in temporary copies under
.dvc/tmp/exps) write to the same store. `tracking.uri` in params.yaml or the
MLFLOW_TRACKING_URI environment variable override it.

One MLflow run per stage, so that a run's start, end and duration are its stage's:

- `train@<v>-<seed>-<lr>` opens the cell's run, named `<v> seed=<s> lr=<lr>`, with variant,
  seed, lr and lr_multiple as params and as tags (the UI's "Group by"), its per-step curves and
  training costs, and records its id in the adapter folder (a declared output); a resumed
  training continues it. A run whose training fails ends as FAILED.
- `evaluate@<v>-<seed>` logs the test metrics onto the run of the cell that select chose (so the
  runs table shows them next to its params) and tags it `selected=true`, and opens a child run
  of it (tag `mlflow.parentRunId`, `stage=evaluate`) that spans the evaluation: its time and
  predictions.

- `compare` opens one "comparison" run (tag kind=comparison): the reports, table and plots as
  artifacts, members.json listing every cell's run, and the tag `comparison_run=<its id>` on
  each of those runs, so the runs of one pipeline run can be found together.

Each run starts when its stage's process started and ends when the stage is done.

Only `MlflowClient` is used (no fluent API): no process-wide active run, no exported
MLFLOW_TRACKING_URI, no git/source context lookups; one client (one store connection) per
stage. That client lives in a worker process (pipeline/tracking_worker.py) which `stage.start`
launches first thing when the stage tracks: mlflow's ~1.5 s of imports then run on the other
core while the stage imports transformers and loads its model, and the stage process never
imports mlflow. Every call waits for the worker's answer, so runs and failures are as they
would be with the client in the stage's process.

If the store cannot be reached, the stages print one warning and go on: the DVC metrics
files are still written.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import subprocess
import sys
import time
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


def _describe(err: BaseException) -> str:
    """'Type: first line' of an error (a StoreError's message already starts with its original type)."""
    return _first_line(err) if isinstance(err, StoreError) else f"{type(err).__name__}: {_first_line(err)}"


def _first_line(err: BaseException) -> str:
    return str(err).splitlines()[0][:200] if str(err) else ""


def default_uri() -> str:
    return f"sqlite:///{Path(repo_root()) / 'mlflow.db'}"


def artifact_root(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: <repo>/mlartifacts for a store inside the
    repository (sqlite); a tracking server's own artifact store otherwise (None: the server's
    default), since a folder of this checkout is not where the server's other clients look."""
    if uri.startswith(("http://", "https://")):
        return None
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


class StoreError(RuntimeError):
    """An MLflow call failed in the worker process; the message starts with the original error's type."""


class _Worker:
    """The MLflow client in its own process (pipeline/tracking_worker.py), called synchronously."""

    def __init__(self):
        read_fd, write_fd = os.pipe()
        script = Path(__file__).with_name("tracking_worker.py")
        try:
            # A stage started from a warm server (pipeline/run.py) has the worker forked there too, with
            # mlflow already imported; otherwise a process of its own. -P: the worker script's folder
            # (pipeline/) is not put on sys.path, where its modules could shadow libraries mlflow imports.
            self.process = self._warm_worker(script, write_fd)
            if self.process is None:
                self.process = subprocess.Popen([sys.executable, "-P", str(script), str(write_fd)],
                                                stdin=subprocess.PIPE, pass_fds=(write_fd,))
                self.stdin = self.process.stdin
        finally:
            os.close(write_fd)
        self.replies = os.fdopen(read_fd, "rb")
        self.sent = self.received = 0
        self.results: dict[int, tuple[bool, Any]] = {}

    def _warm_worker(self, script: Path, write_fd: int):
        from pipeline import run as warm  # the standard library only

        requests, self_end = os.pipe()
        try:
            outputs = {fd: fd for fd in warm.open_stdio() if fd in (1, 2)}
            child = warm.spawn(script, [str(write_fd)], {0: requests, **outputs, write_fd: write_fd})
        finally:
            os.close(requests)
        if child is None:
            os.close(self_end)
            return None
        self.stdin = os.fdopen(self_end, "wb")
        return child

    def send(self, operation: str, *args) -> int:
        self.stdin.write(json.dumps([operation, args]).encode() + b"\n")
        self.stdin.flush()
        self.sent += 1
        return self.sent

    def result(self, ticket: int) -> Any:
        """The reply to request number `ticket` (replies come in order; earlier ones are kept)."""
        while self.received < ticket:
            line = self.replies.readline()
            if not line:
                raise StoreError(f"the MLflow worker process ended (exit code {self.process.poll()})")
            reply = json.loads(line)
            self.received += 1
            self.results[self.received] = reply
        ok, value = self.results.pop(ticket)
        if not ok:
            raise StoreError(value)
        return value

    def call(self, operation: str, *args) -> Any:
        return self.result(self.send(operation, *args))

    def close(self) -> None:
        if not self.sent:
            # A preload the stage never used (it failed early, or exec'd torchrun): the worker
            # is only importing mlflow, and the stage need not wait until it is done.
            self.process.kill()
        with contextlib.suppress(OSError):
            self.stdin.close()  # end of requests: the worker exits
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.replies.close()


_WORKER: _Worker | None = None


def _mlflow_environment() -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # An unreachable server must cost seconds, not minutes of retries with backoff.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


def _worker() -> _Worker:
    global _WORKER
    if _WORKER is None or _WORKER.process.poll() is not None:
        _mlflow_environment()
        _WORKER = _Worker()
        atexit.register(_WORKER.close)
    return _WORKER


def resolve_uri(uri: str | None) -> str:
    """The store a Tracker for `uri` (tracking.uri, or the one an adapter folder records) uses."""
    return os.environ.get("MLFLOW_TRACKING_URI") or uri or default_uri()


def preload() -> None:
    """Start the MLflow worker now, without waiting for it: mlflow's imports run beside the
    stage's own start-up, and the stage's Tracker finds them done. Called by `stage.start` for
    every stage that tracks; a failure here is reported by that Tracker. (The store connection
    is left to the Tracker: until then the worker writes nothing, so it can always be stopped.)"""
    with contextlib.suppress(OSError, ValueError):
        _worker()


class Tracker:
    """A thin, failure-tolerant wrapper around one MLflow run (one stage's).

    The MLflow client lives in a worker process (see pipeline/tracking_worker.py); every call
    waits for its result, so runs, their order and their failures are as with a client here."""

    def __init__(self, enabled: bool, experiment: str, uri: str | None):
        self.enabled = enabled
        self.experiment = experiment
        self.uri = resolve_uri(uri)
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self._client: _Worker | None = None
        if enabled:
            try:
                worker = _worker()
                self.experiment_id = worker.call("connect", self.uri, experiment, artifact_root(self.uri))
                self._client = worker
            except Exception as err:  # any failure to reach the store: warn once, go on
                _warn_once(f"{_describe(err)} ({self.uri})")

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
                _warn_once(f"{what} failed: {_describe(err)}")
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
                    client.call("continue_run", run_id)
                    return run_id
                except Exception as err:
                    if "database is locked" in str(err):
                        raise
                    print(f"WARNING: MLflow run {run_id} cannot be continued ({_first_line(err)}); "
                          "starting a new one", file=sys.stderr, flush=True)
            all_tags = {**tags, "mlflow.runName": run_name}
            if parent_run_id is not None:
                all_tags["mlflow.parentRunId"] = parent_run_id
            return client.call("create_run", self.experiment_id, _ms(started_at or process_start_time()),
                               all_tags, run_name)
        self.run_id = self._call("create_run", go)
        return self.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.run_id or self._client is None:
            return
        flat = [(k, str(v)[:6000]) for k, v in params.items()]
        self._call("log_params", lambda: self._client.call("log_batch", self.run_id, [], flat))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None, run_id: str | None = None) -> None:
        """Log onto this stage's run, or onto `run_id` (the quality metrics onto the training run)."""
        target = run_id or self.run_id
        if not target or self._client is None:
            return
        now = _ms(time.time())
        batch = [(k, float(v), now, step or 0) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        self._call("log_metrics", lambda: self._client.call("log_batch", target, batch))

    def log_curve(self, rows: Iterable[Mapping[str, float]], keys: Iterable[str]) -> None:
        """Per-step series (loss, lr, grad norm, ...) in as few batch calls as MLflow allows."""
        if not self.run_id or self._client is None:
            return
        now = _ms(time.time())
        metrics = [(key, float(row[key]), now, int(row["step"])) for row in rows for key in keys
                   if row.get(key) is not None and row[key] == row[key]]

        def go():
            for i in range(0, len(metrics), BATCH):
                self._client.call("log_batch", self.run_id, metrics[i:i + BATCH])
        self._call("log_batch", go)

    def log_artifacts(self, folder: str | os.PathLike, artifact_path: str) -> None:
        if self.run_id:
            self._call("log_artifacts",
                       lambda: self._client.call("log_artifacts", self.run_id, os.path.abspath(folder), artifact_path))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if self.run_id:
            # absolute: the worker process keeps the directory it started in, the stage may not
            self._call("log_artifact",
                       lambda: self._client.call("log_artifact", self.run_id, os.path.abspath(path), artifact_path))

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        """Tag another run of the store (the comparison run's id onto each member run)."""
        if self.run_id and self._client is not None:
            values = {k: str(v) for k, v in tags.items()}
            self._call("set_tags", lambda: self._client.call("set_tags", run_id, values))

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id:
            self._call("set_terminated",
                       lambda: self._client.call("set_terminated", self.run_id, status, _ms(time.time())))


def standard_tags(variant: str, stage: str) -> dict[str, str]:
    commit = git_commit()
    return {
        "variant": variant,
        "stage": stage,
        "git_commit": commit,
        "mlflow.source.git.commit": commit,
        "dvc_exp_name": os.environ.get("DVC_EXP_NAME", "not_a_dvc_experiment"),
    }
