"""One grid cell on a worker: clone the head's commit, `dvc repro --pull` its stages, push the results.

Runs inside a Ray task (pipeline/grid_dispatch.py), but imports nothing of Ray, the project or
torch: it is plain subprocess work, and the code it runs is the clone's own (the head's commit).

- Its own clone in a fresh temporary folder per attempt, so a retry after a killed worker never
  sees a half-written workspace.
- `dvc repro --pull <stages>` restores every upstream stage from the remote's run-cache (the head
  pushed them) and runs only the cell's own stages.
- `dvc push --run-cache` only after the stages succeeded: a failed or killed cell sends nothing
  to the remote.
- Each command runs in its own process group with a watchdog: if the Ray worker process dies
  (node lost, OOM-killed, SIGKILL), the watchdog sees its pipe close and kills the whole group
  (dvc and the stage under it), so no orphan keeps training or pushing beside the retry.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Reads its stdin until EOF (the parent holds the only write end), then kills the process group.
_WATCHDOG = ("import os, signal, sys\nsys.stdin.buffer.read()\n"
             "try:\n    os.killpg(int(sys.argv[1]), signal.SIGKILL)\nexcept OSError:\n    pass\n")

TAIL_LINES = 12


def _guarded(args: list[str], cwd: Path, env: dict, log: Path, timeout: float | None) -> tuple[int, list[tuple[float, str]]]:
    """Run `args` in its own process group, killed with it when this process dies; (exit code,
    output lines with the time each arrived). The output also goes to `log`."""
    lines: list[tuple[float, str]] = []
    read_end, write_end = os.pipe()
    with open(log, "a") as out:
        proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        watchdog = subprocess.Popen([sys.executable, "-S", "-c", _WATCHDOG, str(proc.pid)], stdin=read_end,
                                    start_new_session=True)
        os.close(read_end)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            for line in proc.stdout:
                lines.append((time.monotonic(), line.rstrip("\n")))
                out.write(line)
                if deadline is not None and time.monotonic() > deadline:
                    os.killpg(proc.pid, signal.SIGKILL)
                    lines.append((time.monotonic(), f"killed after {timeout:.0f} s (--cell-timeout)"))
                    break
            code = proc.wait()
        finally:
            os.close(write_end)  # the watchdog wakes up and kills the group (already ended: a no-op)
            watchdog.wait()
    return code, lines


def why(lines: list[tuple[float, str]]) -> str:
    """The reason a command failed, from its output: the stage's own error line (`<stage>: ...`),
    else DVC's ERROR line, else the last lines."""
    text = [line for _, line in lines if line.strip()]
    own = [line for line in text if re.match(r"^(train@|evaluate@|evaluate_base|select@)\S*: ", line)]
    errors = [line for line in text if line.startswith("ERROR")]
    if own:
        return own[-1]
    if errors:
        return errors[-1]
    return " | ".join(text[-3:]) or "no output"


def ran(output: str) -> list[str]:
    """The stages a `dvc repro` actually ran, from its output (restored ones print no such line)."""
    return re.findall(r"Running stage '([^']+)'", output)


def stage_seconds(lines: list[tuple[float, str]]) -> dict[str, float]:
    """How long each stage's own command ran, from DVC's output: from "Running stage 'x'" to the
    next lock-file update."""
    times: dict[str, float] = {}
    current = None
    for at, line in lines:
        match = re.search(r"Running stage '([^']+)'", line)
        if match:
            current = (match.group(1), at)
        elif current is not None and "Updating lock file" in line:
            times[current[0]] = at - current[1]
            current = None
    return times


def run_cell(url: str, commit: str, stages: list[str], env_extra: dict[str, str] | None = None,
             workdir: str | None = None, timeout: float | None = None) -> dict:
    """Run one cell's stages in a fresh clone; a dict saying what happened (never raises for a failed
    stage: that is a result, and Ray must not retry it)."""
    started = time.monotonic()
    env = {**os.environ, **(env_extra or {})}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # dvc and the stages' python
    parent = Path(workdir or tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    clone = Path(tempfile.mkdtemp(prefix="grid-cell-", dir=parent))
    log = clone.with_suffix(".log")
    ray = sys.modules.get("ray")  # loaded when Ray runs this: the node's id, to show where the cell ran
    node = ray.get_runtime_context().get_node_id()[:8] if ray is not None and ray.is_initialized() else "-"
    result = {"stages": list(stages), "host": f"{os.uname().nodename}/{node}", "pid": os.getpid(), "ok": False,
              "error": None,
              "ran": [], "seconds": {}}
    try:
        t0 = time.monotonic()
        for args in (["git", "clone", "--quiet", "--no-checkout", url, str(clone)],
                     ["git", "-C", str(clone), "checkout", "--quiet", commit]):
            code, lines = _guarded(args, parent, env, log, 600)
            if code != 0:
                result["error"] = f"{' '.join(args[:2])} failed: {why(lines)}"
                return result
        result["seconds"]["clone"] = time.monotonic() - t0

        t0 = time.monotonic()
        code, lines = _guarded([sys.executable, "-m", "dvc", "repro", "--pull", *stages], clone, env, log, timeout)
        result["seconds"]["repro"] = time.monotonic() - t0
        result["ran"] = ran("\n".join(line for _, line in lines))
        result["seconds"]["stage"] = sum(stage_seconds(lines).values())
        if code != 0:
            result["error"] = why(lines)
            return result

        t0 = time.monotonic()
        code, lines = _guarded([sys.executable, "-m", "dvc", "push", "--run-cache", *stages], clone, env, log, 600)
        result["seconds"]["push"] = time.monotonic() - t0
        if code != 0:
            result["error"] = f"dvc push failed: {why(lines)}"
            return result
        result["ok"] = True
        return result
    finally:
        result["seconds"]["total"] = time.monotonic() - started
        shutil.rmtree(clone, ignore_errors=True)
        if result["ok"]:
            log.unlink(missing_ok=True)
        else:
            result["log"] = str(log)  # kept for the failure summary
