"""Services the grid tests start on this machine, on loopback addresses only, and always stop:
a two-node Ray cluster (a head and a second node, separate processes) and an MLflow server
with a sqlite store.

Ray 2.60's `ray start` turns --node-ip-address 127.0.0.1 into the machine's outward address and
then listens on it; the wrapper below keeps the loopback address (Ray binds its servers to the
node's address, so everything listens on 127.0.0.1 only). A driver on this machine then needs
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (`ray_client_env`), the switch that keeps its own address
on loopback. Stopping kills exactly the processes of this cluster (found by its own temp dir,
plus their children), never `ray stop`, which would stop every Ray on the machine.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil

# `ray start`, with the loopback node address kept as given
RAY_CLI = ("import sys\nfrom ray._private import services\nservices.resolve_ip_for_localhost = lambda host: host\n"
           "from ray.scripts.scripts import main\nsys.argv[0] = 'ray'\nmain()\n")
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


# Ray 2.60 turns token authentication on for every `ray start` of a machine once ~/.ray/auth_token
# exists (a plain `ray.init()` writes it): the test cluster and its drivers keep it off either way.
RAY_AUTH = {"RAY_AUTH_MODE": "disabled"}


def ray_client_env() -> dict[str, str]:
    return {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **RAY_AUTH}


def _env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_USAGE_STATS_ENABLED": "0", **RAY_AUTH}


class RayCluster:
    """`ray start --head` plus `nodes - 1` nodes joining it, each with `cpus` CPUs."""

    def __init__(self, temp_dir: Path, nodes: int = 2, cpus: int = 1):
        self.temp_dir = Path(temp_dir)
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.address = f"{LOOPBACK}:{self.port}"
        self.nodes, self.cpus = nodes, cpus

    def _start(self, *args: str) -> None:
        cmd = [sys.executable, "-c", RAY_CLI, "start", "--node-ip-address", LOOPBACK, "--num-cpus", str(self.cpus),
               "--temp-dir", str(self.temp_dir), "--disable-usage-stats", *args]
        done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"ray start {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")

    def __enter__(self) -> RayCluster:
        try:
            self._start("--head", "--port", str(self.port), "--include-dashboard=false")
            for _ in range(self.nodes - 1):
                self._start("--address", self.address)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def processes(self) -> list[psutil.Process]:
        """Every process of this cluster: those naming its temp dir, and all their descendants
        (workers rename themselves `ray::...`; cells run below them)."""
        mine = []
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if any(str(self.temp_dir) in part for part in proc.info["cmdline"] or ()):
                    mine.append(proc)
            except psutil.Error:
                continue
        found = {p.pid: p for p in mine}
        for proc in mine:
            try:
                found.update({c.pid: c for c in proc.children(recursive=True)})
            except psutil.Error:
                continue
        return list(found.values())

    def stop(self) -> None:
        procs = self.processes()
        for proc in procs:
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.Error:
                continue
        psutil.wait_procs(procs, timeout=20)


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a sqlite store (its job runner off: no stray consumers)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.uri = f"http://{LOOPBACK}:{self.port}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> MlflowServer:
        env = {**_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
        log = open(self.folder / "server.log", "w")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", LOOPBACK, "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
             "--artifacts-destination", str(self.folder / "artifacts"), "--workers", "1"],
            cwd=self.folder, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2):
                    return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"mlflow server did not start:\n{(self.folder / 'server.log').read_text()[-3000:]}") from None
                time.sleep(0.5)

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)
