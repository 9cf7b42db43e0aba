"""pipeline/run.py: stages started from a warm server behave as cold processes do.

A probe module (written into each test's folder) stands in for a stage, so that every behaviour
can be provoked: its arguments, working directory, environment and streams; exit codes, uncaught
exceptions and deaths by signal; a client killed with SIGKILL (the stage and the process it
started must die); a forwarded SIGTERM; edited code; per-environment servers; idle exit. The
servers preload a cheap module instead of torch (LORA_WARM_PRELOAD), so each starts in well under
a second. Each test uses its own socket folder and stops its servers, even when it fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline.run import stop_servers

ROOT = Path(__file__).resolve().parents[1]

PROBE = '''
import json, os, signal, subprocess, sys, time
mode = sys.argv[1]
if mode == "echo":
    print(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(), "probe": os.environ.get("PROBE"),
                      "dvc_stage": os.environ.get("DVC_STAGE"), "name": __name__, "server": os.getppid(),
                      "preloaded": "wave" in sys.modules, "pid": os.getpid(), "pgid": os.getpgid(0)}))
    print("to stderr", file=sys.stderr)
elif mode == "exit":
    sys.exit(int(sys.argv[2]))
elif mode == "raise":
    raise RuntimeError("probe failure")
elif mode == "message":
    sys.exit("a message for stderr")
elif mode == "signal":
    os.kill(os.getpid(), signal.SIGUSR1)
elif mode == "sleep":
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    open("pids.json", "w").write(json.dumps([os.getpid(), child.pid]))
    time.sleep(120)
elif mode == "spawn":  # a helper forked by the same server (pipeline/tracking.py's MLflow worker is one)
    from pipeline import run
    read_end, write_end = os.pipe()
    helper = run.spawn(os.path.abspath("helper.py"), [str(write_end), sys.argv[2]], {write_end: write_end, 2: 2})
    os.close(write_end)
    with os.fdopen(read_end) as replies:
        line = replies.readline()
    if sys.argv[2] == "hang":
        open("helper_pid", "w").write(str(helper.pid))
        time.sleep(120)
    print(json.dumps({"reply": json.loads(line), "code": helper.wait(10), "me": os.getpid(),
                      "server": os.getppid(), "helper": helper.pid}))
elif mode == "term":
    def on_term(signum, frame):
        open("got_term", "w").write(str(signum))
        sys.exit(7)
    signal.signal(signal.SIGTERM, on_term)
    open("ready", "w").write("1")
    time.sleep(120)
'''

HELPER = '''
import json, os, sys, time
with os.fdopen(int(sys.argv[1]), "w") as out:
    out.write(json.dumps({"pid": os.getpid(), "parent": os.getppid(), "name": __name__,
                          "preloaded": "wave" in sys.modules, "path0": sys.path[0]}) + "\\n")
if sys.argv[2] == "hang":
    time.sleep(120)
sys.exit(5)
'''

# A client, as `python -m pipeline.run <stage>` is, for a module that is not a pipeline stage.
DRIVER = "import sys; from pipeline import run; run.launch('probe', sys.argv[1:], starts_server=True)"


@pytest.fixture
def warm(tmp_path):
    folder = tmp_path / "sockets"
    folder.mkdir(mode=0o700)
    work = tmp_path / "work"
    work.mkdir()
    (work / "probe.py").write_text(PROBE)
    (work / "helper.py").write_text(HELPER)
    env = {**os.environ, "LORA_WARM_DIR": str(folder), "LORA_WARM_PRELOAD": "wave", "LORA_WARM_IDLE": "60",
           "PYTHONPATH": str(ROOT)}
    env.pop("LORA_WARM_STAGES", None)
    yield folder, work, env
    stop_servers(folder, timeout=5)


def _client(work: Path, env: dict, *args: str, extra: dict | None = None, driver: bool = True,
            cwd: Path | None = None):
    """The probe through DRIVER, or (driver=False) `python -m pipeline.run <args>`."""
    command = [sys.executable, "-c", DRIVER, *args] if driver else [sys.executable, "-m", "pipeline.run", *args]
    return subprocess.run(command, cwd=cwd or work, env={**env, **(extra or {})}, capture_output=True, text=True,
                          timeout=60)


@contextlib.contextmanager
def _running_client(work: Path, env: dict, *args: str):
    """A client of the probe left running (to be killed or signalled), killed in the end whatever happens."""
    client = subprocess.Popen([sys.executable, "-c", DRIVER, *args], cwd=work, env=env)
    try:
        yield client
    finally:
        client.kill()
        client.wait(10)


def _echo(work, env, *args, extra=None) -> dict:
    done = _client(work, env, "echo", *args, extra=extra)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().endswith("to stderr"), done.stderr
    return json.loads(done.stdout)


def _wait(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def test_the_stage_sees_its_own_arguments_folder_environment_and_streams(warm):
    folder, work, env = warm
    first = _echo(work, env, "a b", "--x")
    second = _echo(work, env, "again", extra={"DVC_STAGE": "train@lora-0-1"})
    assert first["argv"] == ["echo", "a b", "--x"] and second["argv"] == ["echo", "again"]
    assert first["cwd"] == second["cwd"] == str(work)
    assert first["name"] == "__main__" and first["preloaded"]  # forked from the server, which imported `wave`
    assert first["server"] == second["server"] != first["pid"]  # one server; DVC_STAGE is not part of its key
    assert second["dvc_stage"] == "train@lora-0-1" and first["dvc_stage"] is None
    assert first["pgid"] == first["pid"]  # its own process group
    assert len(list(folder.glob("*.sock"))) == 1


def test_a_different_environment_gets_its_own_server(warm):
    folder, work, env = warm
    one = _echo(work, env, extra={"PROBE": "one"})
    two = _echo(work, env, extra={"PROBE": "two"})
    assert (one["probe"], two["probe"]) == ("one", "two")
    assert one["server"] != two["server"]
    assert len(list(folder.glob("*.sock"))) == 2


def test_exit_codes_exceptions_and_signals_end_the_client_as_they_end_the_stage(warm):
    _, work, env = warm
    assert _client(work, env, "exit", "3").returncode == 3
    raised = _client(work, env, "raise")
    assert raised.returncode == 1
    assert "Traceback" in raised.stderr and "RuntimeError: probe failure" in raised.stderr
    message = _client(work, env, "message")
    assert message.returncode == 1 and "a message for stderr" in message.stderr
    assert _client(work, env, "signal").returncode == -signal.SIGUSR1


def test_edited_code_takes_effect_on_the_same_server(warm):
    _, work, env = warm
    before = _echo(work, env)
    (work / "probe.py").write_text(PROBE.replace('"to stderr"', '"edited"'))
    done = _client(work, env, "echo")
    assert done.returncode == 0 and done.stderr.strip() == "edited"
    assert json.loads(done.stdout)["server"] == before["server"]


def test_a_client_killed_with_sigkill_takes_the_stage_and_its_children_with_it(warm):
    _, work, env = warm
    with _running_client(work, env, "sleep") as client:
        assert _wait(lambda: (work / "pids.json").exists() and (work / "pids.json").read_text().endswith("]"))
        stage, grandchild = json.loads((work / "pids.json").read_text())
        assert _alive(stage) and _alive(grandchild)
        client.kill()
        client.wait(10)
        assert _wait(lambda: not _alive(stage) and not _alive(grandchild)), "the stage outlived its client"


def test_a_stage_forks_its_helper_from_the_same_server_and_it_dies_with_the_stage(warm):
    _, work, env = warm
    done = _client(work, env, "spawn", "exit")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    reply = out["reply"]
    assert reply["parent"] == out["server"] and reply["pid"] == out["helper"] != out["me"]
    assert reply["name"] == "__main__" and reply["preloaded"] and reply["path0"] != str(work)  # run as `python -P`
    assert out["code"] == 5
    with _running_client(work, env, "spawn", "hang") as client:
        assert _wait(lambda: (work / "helper_pid").exists() and (work / "helper_pid").read_text())
        helper = int((work / "helper_pid").read_text())
        assert _alive(helper)
        client.kill()
        assert _wait(lambda: not _alive(helper)), "the helper outlived the stage that spawned it"


def test_sigterm_to_the_client_reaches_the_stage(warm):
    _, work, env = warm
    with _running_client(work, env, "term") as client:
        assert _wait(lambda: (work / "ready").exists())
        client.send_signal(signal.SIGTERM)
        assert client.wait(10) == 7
        assert (work / "got_term").read_text() == str(int(signal.SIGTERM))


def test_stop_servers_kills_a_busy_server_and_the_stage_it_runs(warm):
    folder, work, env = warm
    with _running_client(work, env, "sleep") as client:
        assert _wait(lambda: (work / "pids.json").exists() and (work / "pids.json").read_text().endswith("]"))
        stage, _ = json.loads((work / "pids.json").read_text())
        killed = stop_servers(folder, timeout=1)
        assert len(killed) == 1
        assert _wait(lambda: not _alive(stage))
        assert client.wait(10) != 0  # the stage did not finish, and its client says so
    assert not list(folder.glob("*.pid"))


def test_an_idle_server_exits_and_removes_its_socket(warm):
    folder, work, env = warm
    server = _echo(work, env, extra={"LORA_WARM_IDLE": "0.5"})["server"]
    assert _wait(lambda: not _alive(server), 15)
    assert not list(folder.glob("*.sock")) and not list(folder.glob("*.pid"))


def test_stages_start_together_with_one_server(warm):
    folder, work, env = warm
    clients = [subprocess.Popen([sys.executable, "-c", DRIVER, "echo"], cwd=work, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True) for _ in range(3)]
    outputs = [json.loads(c.communicate(timeout=60)[0]) for c in clients]
    assert len({o["server"] for o in outputs}) == 1
    assert len(list(folder.glob("*.pid"))) == 1


def test_light_stages_run_cold_without_a_server_and_lora_warm_stages_0_turns_it_off(warm):
    folder, work, env = warm
    assert _client(work, env, "focus", "--help", driver=False, cwd=ROOT).returncode == 0
    assert not list(folder.glob("*.sock"))  # focus imports no torch: it does not start a server
    off = _client(work, env, "train", "--help", driver=False, cwd=ROOT, extra={"LORA_WARM_STAGES": "0"})
    assert off.returncode == 0 and "usage: python -m pipeline.train" in off.stdout
    assert not list(folder.glob("*.sock"))
    on = _client(work, env, "train", "--help", driver=False, cwd=ROOT)
    assert on.returncode == 0 and "usage: python -m pipeline.train" in on.stdout
    assert len(list(folder.glob("*.sock"))) == 1


def test_bad_input_is_named(warm, tmp_path):
    folder, work, env = warm
    unknown = _client(work, env, "trian", driver=False, cwd=ROOT)
    assert unknown.returncode == 2 and "unknown stage 'trian'" in unknown.stderr
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    cold = _client(work, env, "echo", extra={"LORA_WARM_DIR": str(shared)})
    assert cold.returncode == 0 and "not a private folder" in cold.stderr and "running probe cold" in cold.stderr
    assert not json.loads(cold.stdout)["preloaded"]


def test_the_server_code_is_standard_library_only():
    """The client must start in milliseconds: nothing it imports may pull in torch or pandas."""
    code = textwrap.dedent("""
        import sys
        import pipeline.run
        heavy = [m for m in ("torch", "numpy", "pandas", "transformers", "yaml") if m in sys.modules]
        print(heavy)
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
