"""Start a stage from a warm process: `python -m pipeline.run <stage> <arguments>` (every dvc.yaml `cmd:`).

A stage process of the default comparison used to spend ~5 of its ~7 s of overhead importing torch,
transformers and pandas, and ~0.6 s tearing the interpreter down at exit (bench/stage_overhead.py),
around 5-15 s of compute. So the stages are started from a server that has imported those libraries
once:

- This module, when run as `python -m pipeline.run`, is the client. It uses the standard library
  only. It connects to a Unix socket and sends the stage's module, arguments, working directory and
  environment, with its stdin/stdout/stderr (SCM_RIGHTS).
- The server is this same file, run as `python -P pipeline/run.py --serve <socket>`. It forks one
  child per request. The child runs `python -m pipeline.<stage>` the way a fresh interpreter would, and
  writes straight to the client's stdout/stderr. The client exits with the child's exit status, or
  with the signal that ended it.
- A stage's own helper process, its MLflow worker (pipeline/tracking.py), is forked by the same
  server with mlflow already imported (`spawn`). It dies with the stage.
- The first stage that imports torch (`WARM_STAGES`) starts the server when none is running. The
  other stages (prepare, select, compare, focus) use a running server, or run cold in the client
  itself.

What a stage sees is what a cold start would give it:
- **Code:** the server imports no module of this project. The child imports pipeline/ and variants/
  from the client's working directory, so edits take effect at the next stage.
- **Environment and interpreter:** libraries read environment variables when they are imported. A
  server therefore serves only clients whose interpreter, interpreter flags, installed packages
  (site-packages mtimes) and environment equal its own. `SERVER_KEY_IGNORES` lists the variables
  left out of the comparison, because they change from call to call and no library reads them at
  import. The child then gets the client's full environment.
- **Kill and signals:** the child runs in its own process group. A client that dies in any way, SIGKILL
  included (the server sees its connection close), takes the whole group with it: the stage, its
  MLflow worker, torchrun and its ranks. Signals the client can catch (INT, TERM, HUP, QUIT, USR1,
  USR2) are forwarded to the group, so Ctrl-C in a terminal and DVC's own termination reach the stage.
- **Exit:** non-daemon threads are joined and atexit handlers run. The process then ends with
  `os._exit`, as a multiprocessing child does, which skips the teardown of the ~400k objects the
  libraries created.

Settings (environment variables): `LORA_WARM_STAGES=0` runs every stage cold in its own process, as
before. `LORA_WARM_DIR` is where sockets and server logs go: by default a 0700 folder
/tmp/lora-warm-<uid>; its owner and mode are checked before use. `LORA_WARM_IDLE` is how many seconds
a server with no stage running waits before it exits (120). `LORA_WARM_MAX` is the number of servers
(one per distinct environment) kept per folder (3); when a new one starts, the least recently used
idle ones beyond it are stopped. `LORA_WARM_PRELOAD` replaces the list of modules the server imports
(`PRELOAD`, comma-separated), e.g. to add another architecture's transformers module.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import selectors
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

# The stages whose imports the server is there for (torch, transformers): they start one if none runs.
WARM_STAGES = frozenset({"base", "quantize", "train", "evaluate"})
STAGES = frozenset({"prepare", "base", "quantize", "train", "select", "evaluate", "compare", "focus"})

# What the server imports once (each optional: a library that is not installed is skipped), found
# with `python -X importtime` on the train and evaluate stages: everything that costs over ~20 ms.
PRELOAD = ("numpy", "yaml", "torch", "torch.nn.functional", "safetensors.torch", "transformers",
           "transformers.modeling_utils", "transformers.models.auto.modeling_auto",
           "transformers.models.auto.tokenization_auto", "transformers.models.llama.modeling_llama",
           "transformers.generation.utils", "tokenizers", "pandas", "pandera", "pandera.pandas", "jinja2",
           # what pipeline/tracking_worker.py imports (~1.5 s): its worker is forked from here too (`spawn`)
           "mlflow.tracking", "mlflow.entities", "mlflow.store.tracking.sqlalchemy_store")


def preload_modules() -> tuple[str, ...]:
    """`PRELOAD`, or the comma-separated modules of LORA_WARM_PRELOAD (e.g. to add another model
    architecture's transformers module; empty: none)."""
    given = os.environ.get("LORA_WARM_PRELOAD")
    return PRELOAD if given is None else tuple(m.strip() for m in given.split(",") if m.strip())


# Variables that differ between calls of the same pipeline and that no library reads at import.
# DVC sets DVC_ROOT and DVC_STAGE per stage, and pytest sets PYTEST_CURRENT_TEST per test. The shell
# sets the rest.
SERVER_KEY_IGNORES = ("PWD", "OLDPWD", "SHLVL", "_", "PYTEST_CURRENT_TEST", "LORA_WARM_SERVED_BY")
SERVER_KEY_IGNORED_PREFIXES = ("DVC_",)

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
MAX_FDS = 16  # descriptors one request may pass
START_TIMEOUT = 120.0  # seconds a client waits for a new server's imports before it runs the stage cold


class WarmUnavailable(RuntimeError):
    """The stage cannot be started warm here; the message says why (the client then runs it cold)."""


# ----- the messages: one JSON object per line --------------------------------------------------------------
# A connection carries one request from the client (with its stdin/stdout/stderr attached to the first
# bytes), then the server's replies: {"pid"} when the stage started and {"status"} when it ended.

def _send(sock: socket.socket, message: dict, fds: list[int] | tuple = ()) -> None:
    data = json.dumps(message).encode() + b"\n"
    sent = socket.send_fds(sock, [data], list(fds)) if fds else 0
    sock.sendall(data[sent:])


def _read_request(conn: socket.socket) -> tuple[dict, list[int]]:
    """The client's one request line and the descriptors sent with it (the client sends nothing after it)."""
    fds: list[int] = []
    data = b""
    while not data.endswith(b"\n"):
        if fds or data:
            chunk = conn.recv(1 << 16)
        else:
            chunk, received, _, _ = socket.recv_fds(conn, 1 << 16, MAX_FDS)
            fds.extend(received)
        if not chunk:
            for fd in fds:
                os.close(fd)
            raise EOFError("the client closed the connection mid-request")
        data += chunk
    request = json.loads(data)
    if len(request.get("fds", ())) != len(fds):
        for fd in fds:
            os.close(fd)
        raise ValueError(f"the request names {len(request.get('fds', ()))} descriptors, {len(fds)} arrived")
    return request, fds


def _read_reply(replies) -> dict:
    line = replies.readline()
    if not line:
        raise EOFError("the warm server closed the connection")
    return json.loads(line)


# ----- where servers live, and which one serves this client --------------------------------------------

def warm_dir() -> Path:
    """The socket folder, created 0700 if missing; an existing one must be ours and private."""
    folder = Path(os.environ.get("LORA_WARM_DIR") or f"/tmp/lora-warm-{os.getuid()}")
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = folder.stat()
    except OSError as err:
        raise WarmUnavailable(f"cannot use LORA_WARM_DIR {str(folder)!r}: {err}") from err
    if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
        raise WarmUnavailable(f"{folder} is not a private folder of this user (owner uid {info.st_uid}, "
                              f"mode {stat.S_IMODE(info.st_mode):o}); set LORA_WARM_DIR to one")
    return folder


def interpreter_flags() -> list[str]:
    """This interpreter's command-line flags (-u, -W, -X ...), which the server is started with too."""
    return subprocess._args_from_interpreter_flags()  # the helper multiprocessing uses for the same job


def server_key(environ: dict[str, str] | None = None) -> str:
    """What a server must share with a client: interpreter, flags, installed packages, environment."""
    environ = dict(os.environ if environ is None else environ)
    env = {k: v for k, v in environ.items()
           if k not in SERVER_KEY_IGNORES and not k.startswith(SERVER_KEY_IGNORED_PREFIXES)}
    packages = []
    for entry in sys.path:  # installing or removing a package changes its folder's mtime
        if entry and os.path.isdir(entry) and ("site-packages" in entry or "dist-packages" in entry):
            packages.append((entry, os.stat(entry).st_mtime_ns))
    this_code = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()  # a changed server is a new server
    identity = [sys.executable, sys.version, interpreter_flags(), packages, sorted(env.items()), this_code]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:20]


def stop_servers(folder: Path, timeout: float = 10.0) -> list[int]:
    """Stop every server of `folder` (tests, `make clean`): asked first, SIGKILLed (with the stages it
    still runs) after `timeout` seconds. Returns the pids that had to be killed."""
    deadline = time.monotonic() + timeout
    pids = {}
    for pid_file in folder.glob("*.pid"):
        try:
            pids[pid_file] = int(pid_file.read_text())
        except (OSError, ValueError):
            continue
    for path in folder.glob("*.sock"):
        _ask_to_quit(path)
    killed = []
    for pid_file, pid in pids.items():
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            for child in _children(pid):  # the stages it runs, each in its own process group
                try:
                    os.killpg(child, signal.SIGKILL)
                except OSError:
                    pass
            try:
                os.killpg(os.getpgid(pid), signal.SIGKILL)  # its own session and group (start_new_session)
                killed.append(pid)
            except OSError:
                pass
        pid_file.unlink(missing_ok=True)
    return killed


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) is not alive
        with open(f"/proc/{pid}/stat") as stat_file:
            return stat_file.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _ask_to_quit(path: Path) -> None:
    sock = _connect(path)
    if sock is None:
        path.unlink(missing_ok=True)  # a server that died without cleaning up
        return
    with sock, sock.makefile("rb") as replies:
        try:
            sock.settimeout(5)
            _send(sock, {"op": "quit"})
            _read_reply(replies)
        except (OSError, EOFError, ValueError):
            pass


# ----- the client -------------------------------------------------------------------------------------

def _connect(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
        return sock
    except OSError:
        sock.close()
        return None


def _stop_extra_servers(folder: Path, keep: int) -> None:
    """Ask the least recently used servers beyond `keep` to exit (each does so only when idle)."""
    sockets = sorted(folder.glob("*.sock"), key=lambda p: p.stat().st_mtime if p.exists() else 0.0)
    for path in sockets[:max(0, len(sockets) - keep)]:
        _ask_to_quit(path)


def _start_server(folder: Path, key: str, path: Path) -> socket.socket:
    """Start a server for `key` and wait until it listens (its imports take seconds)."""
    log = folder / f"{key}.log"
    _stop_extra_servers(folder, max(0, int(os.environ.get("LORA_WARM_MAX", "3")) - 1))
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, *interpreter_flags(), "-P", str(Path(__file__).resolve()),
                                 "--serve", str(path)], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                cwd="/", start_new_session=True, close_fds=True)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        sock = _connect(path) if path.exists() else None
        if sock is not None:
            return sock
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:].strip()
            raise WarmUnavailable(f"the warm server exited ({proc.returncode}) while starting: {tail or 'no output'} "
                                  f"(log {log})")
        time.sleep(0.05)
    proc.kill()
    raise WarmUnavailable(f"the warm server did not listen within {START_TIMEOUT:.0f} s (log {log})")


def _server_socket(starts_server: bool) -> socket.socket | None:
    """A connection to this client's server: a running one, or (with `starts_server`) a new one."""
    folder = warm_dir()
    key = server_key()
    path = folder / f"{key}.sock"
    sock = _connect(path)
    if sock is not None or not starts_server:
        return sock
    with open(folder / f"{key}.lock", "w") as lock:  # one start per key, even when stages start together
        fcntl.flock(lock, fcntl.LOCK_EX)
        sock = _connect(path)
        if sock is None:
            path.unlink(missing_ok=True)  # left by a server that was killed
            sock = _start_server(folder, key, path)
    return sock


def open_stdio() -> list[int]:
    """Which of stdin/stdout/stderr this process has open (the child gets /dev/null for the others)."""
    fds = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            fds.append(fd)
        except OSError:
            pass
    return fds


def _start_request(sock: socket.socket, target: dict, argv: list[str], fds: dict[int, int]) -> None:
    """Ask the server to fork `target` ({"module": name} or {"path": script}) with `fds`
    (descriptor number in the child -> this process's descriptor)."""
    _send(sock, {"op": "run", **target, "argv": argv, "cwd": os.getcwd(), "env": dict(os.environ),
                 "fds": list(fds)}, list(fds.values()))


def run_warm(sock: socket.socket, module: str, argv: list[str]) -> int | tuple[str, int]:
    """Have the server run `module`; the child's exit code, or ("signal", n) when a signal ended it."""
    with sock, sock.makefile("rb") as replies:
        _start_request(sock, {"module": module}, argv, {fd: fd for fd in open_stdio()})
        try:
            started = _read_reply(replies)
        except (OSError, EOFError, ValueError) as err:
            raise RuntimeError(f"the warm server failed before starting {module}: {err!r}") from err
        pid = started["pid"]

        def forward(signum, _frame):
            try:
                os.killpg(pid, signum)
            except ProcessLookupError:
                pass

        for sig in FORWARDED_SIGNALS:
            signal.signal(sig, forward)
        try:
            done = _read_reply(replies)
        except (OSError, EOFError, ValueError):
            # The server died under a running stage: take the stage down too, and say so.
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            print(f"pipeline.run: the warm server running {module} (pid {pid}) died; the stage was stopped",
                  file=sys.stderr)
            return 1
    status = done["status"]
    if os.WIFSIGNALED(status):
        return ("signal", os.WTERMSIG(status))
    return os.waitstatus_to_exitcode(status)


class WarmChild:
    """A process the warm server forked on behalf of this one (`spawn`): the subset of Popen a
    caller needs. It dies with this process: the server kills its process group when our end of
    the connection closes."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._buffer = b""
        self.pid: int | None = None
        self.returncode: int | None = None

    def _message(self, timeout: float | None) -> dict | None:
        """The server's next message; None if none came within `timeout` (0: do not wait)."""
        while b"\n" not in self._buffer:
            self._sock.settimeout(timeout)
            try:
                chunk = self._sock.recv(1 << 16)
            except (BlockingIOError, TimeoutError):
                return None
            finally:
                self._sock.settimeout(None)
            if not chunk:
                raise EOFError("the warm server closed the connection")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)

    def _started(self) -> None:
        self.pid = self._message(None)["pid"]

    def _collect(self, timeout: float | None) -> None:
        try:
            done = self._message(timeout)
        except (OSError, EOFError, ValueError):
            done = {"status": signal.SIGKILL}  # the server is gone, and took its children with it
        if done is not None:
            self.returncode = os.waitstatus_to_exitcode(done["status"])
            self._sock.close()

    def poll(self) -> int | None:
        if self.returncode is None:
            self._collect(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self._collect(timeout)
            if self.returncode is None:
                raise subprocess.TimeoutExpired(f"warm child {self.pid}", timeout)
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def spawn(path: str | os.PathLike, argv: list[str], fds: dict[int, int]) -> WarmChild | None:
    """Start the script `path` (as `python -P <path> <argv>`: its folder is not put on sys.path) as a
    child of the warm server that started this process, with `fds` (descriptor number in the
    child -> ours; 0, 1, 2 missing from it are /dev/null). None when no warm server started this
    process, or it cannot be reached: the caller then starts the script itself."""
    served = os.environ.get("LORA_WARM_SERVED_BY")
    sock = _connect(Path(served)) if served else None
    if sock is None:
        return None
    child = WarmChild(sock)
    try:
        _start_request(sock, {"path": str(path)}, argv, fds)
        child._started()
        return child
    except (OSError, EOFError, ValueError, KeyError):
        sock.close()
        return None


def run_cold(module: str, argv: list[str]) -> None:
    """The stage in this process, exactly as `python -m pipeline.<stage>` would run it."""
    import runpy

    sys.argv = ["-m", *argv]  # what `python -m` shows while the module is located (pipeline/__init__.py reads it)
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def main(args: list[str]) -> None:
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.split("\n\n")[0])
        print(f"usage: python -m pipeline.run <stage> [arguments]; stages: {', '.join(sorted(STAGES))}")
        sys.exit(0 if args else 2)
    stage, argv = args[0], args[1:]
    if stage not in STAGES:
        print(f"pipeline.run: unknown stage {stage!r}; stages: {', '.join(sorted(STAGES))}", file=sys.stderr)
        sys.exit(2)
    launch(f"pipeline.{stage}", argv, starts_server=stage in WARM_STAGES)


def launch(module: str, argv: list[str], starts_server: bool) -> None:
    """Run `module` as `python -m <module> <argv>` would, from a warm server when one serves this
    client (or, with `starts_server`, once one was started), else cold in this process. Ends the
    process with the module's exit status."""
    sock = None
    if os.environ.get("LORA_WARM_STAGES", "1") != "0":
        try:
            sock = _server_socket(starts_server)
        except WarmUnavailable as err:
            print(f"pipeline.run: running {module} cold: {err}", file=sys.stderr)
    if sock is None:
        run_cold(module, argv)
        return
    result = run_warm(sock, module, argv)
    sys.stdout.flush()
    sys.stderr.flush()
    if isinstance(result, tuple):  # end the way the stage ended, so DVC and shells see the same signal
        signal.signal(result[1], signal.SIG_DFL)
        os.kill(os.getpid(), result[1])
        time.sleep(1)
        os._exit(128 + result[1])
    os._exit(result)


# ----- the server ---------------------------------------------------------------------------------------

def _preload() -> list[str]:
    import gc
    import importlib

    missing = []
    for name in preload_modules():
        try:
            importlib.import_module(name)
        except ImportError as err:
            missing.append(f"{name} ({err})")
    # Objects the libraries made at import are never collected: frozen, no child's collection walks them
    # (and touches their pages, which the children otherwise share with the server).
    gc.collect()
    gc.freeze()
    return missing


def _stdio(fd: int, writing: bool, like) -> object:
    """A text stream over `fd` configured as Python configures stdin/stdout/stderr at start-up."""
    import io

    unbuffered = writing and like.write_through  # -u / PYTHONUNBUFFERED, which the server shares
    line = writing and (fd == 2 or os.isatty(fd))
    binary = open(fd, "wb" if writing else "rb", buffering=0 if unbuffered else -1, closefd=False)
    return io.TextIOWrapper(binary, encoding=like.encoding, errors=like.errors, line_buffering=line,
                            write_through=unbuffered)


def _child(request: dict, fds: list[int], server_handles: list, served_by: str) -> None:
    """In the forked child: become the stage's process (never returns). `server_handles`: the server's
    selector, sockets and pidfds, closed here (a copy of another stage's connection kept open in this
    child would hide that server's death from its client)."""
    code = 1
    try:
        os.setpgid(0, 0)
        for handle in server_handles:
            if isinstance(handle, int):
                os.close(handle)
            else:
                handle.close()
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        # the client's descriptors take the numbers it gave (its stdin/stdout/stderr: 0, 1, 2); moved
        # out of the way first, so that no received descriptor is overwritten before it is placed
        moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 1024) for fd in fds]
        for fd in fds:
            os.close(fd)
        wanted = dict(zip(request["fds"], moved))
        for target in (0, 1, 2):
            wanted.setdefault(target, os.open(os.devnull, os.O_RDWR))
        for target, fd in wanted.items():
            os.dup2(fd, target)
            os.close(fd)
        sys.stdin, sys.stdout, sys.stderr = (_stdio(0, False, sys.stdin), _stdio(1, True, sys.stdout),
                                             _stdio(2, True, sys.stderr))
        sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        os.environ["LORA_WARM_SERVED_BY"] = served_by  # where this process's own helpers are forked (`spawn`)
        if "module" in request:
            sys.path.insert(0, request["cwd"])  # what `python -m` puts first
        code = _run_as_main(request.get("module"), request.get("path"), request["argv"])
    except BaseException:  # noqa: BLE001 - whatever happens, this process must not return into the server loop
        try:
            sys.excepthook(*sys.exc_info())
        finally:
            os._exit(1)
    os._exit(code)


def _run_as_main(module: str | None, path: str | None, argv: list[str]) -> int:
    """Run `module` as `python -m` would (or the script `path` as `python -P path` would), then end
    as the interpreter does, less its teardown."""
    import atexit
    import runpy
    import threading

    interrupted = False
    code = 0
    sys.argv = ["-m", *argv] if module else [path, *argv]  # `python -m` shows "-m" while it locates the module
    try:
        if module:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(path, run_name="__main__")
    except SystemExit as exit_:
        if exit_.code is None:
            code = 0
        elif isinstance(exit_.code, int):
            code = exit_.code
        else:
            print(exit_.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        sys.excepthook(*sys.exc_info())
        interrupted = True
    except BaseException:  # noqa: BLE001 - reported as the interpreter reports an uncaught exception
        sys.excepthook(*sys.exc_info())
        code = 1
    threading._shutdown()  # join non-daemon threads, as interpreter shutdown does
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if interrupted:  # as CPython does after an uncaught KeyboardInterrupt: die of SIGINT
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    return code


def serve(path: Path) -> None:
    """Import the libraries, listen on `path`, fork a child per request; exit when idle."""
    started = time.monotonic()
    missing = _preload()
    idle_limit = float(os.environ.get("LORA_WARM_IDLE", "120"))
    print(f"pid {os.getpid()}: imported {len(preload_modules()) - len(missing)} libraries in {time.monotonic() - started:.1f} s"
          + (f"; not installed: {', '.join(missing)}" if missing else ""), flush=True)
    threads = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 1
    print(f"native threads after imports: {threads} (BLAS pools; they are fork-aware)", flush=True)

    pid_file = path.with_suffix(".pid")
    pid_file.write_text(str(os.getpid()))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    staging.unlink(missing_ok=True)
    listener.bind(str(staging))
    listener.listen(64)
    os.rename(staging, path)  # clients see the socket only once it listens
    inode = path.stat().st_ino
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, ("accept", None))
    children: dict[int, dict] = {}  # pid -> {"conn", "pidfd"}
    last_active = time.monotonic()
    quitting = False

    def finish(pid: int) -> None:
        child = children.pop(pid)
        selector.unregister(child["pidfd"])
        os.close(child["pidfd"])
        _, status = os.waitpid(pid, 0)
        how = (f"exit {os.waitstatus_to_exitcode(status)}" if os.WIFEXITED(status)
               else f"signal {os.WTERMSIG(status)}")
        print(f"{time.strftime('%H:%M:%S')} finished {child['module']} (pid {pid}, {how}) after "
              f"{time.monotonic() - child['started']:.1f} s", flush=True)
        conn = child["conn"]
        if conn is not None:
            selector.unregister(conn)
            try:
                _send(conn, {"status": status})
            except OSError:
                pass
            conn.close()

    while True:
        events = selector.select(timeout=1.0)
        for key, _ in events:
            kind, data = key.data
            if kind == "accept":
                conn, _ = listener.accept()
                last_active = time.monotonic()
                try:
                    conn.settimeout(10)
                    request, fds = _read_request(conn)
                    conn.settimeout(None)
                except (OSError, EOFError, ValueError) as err:
                    print(f"bad request: {err!r}", flush=True)
                    conn.close()
                    continue
                if request.get("op") == "quit":
                    quitting = quitting or not children
                    _send(conn, {"quitting": quitting})
                    conn.close()
                    continue
                if quitting:
                    for fd in fds:
                        os.close(fd)
                    conn.close()
                    continue
                pid = os.fork()
                if pid == 0:
                    _child(request, fds, [selector, listener, conn, *(c["conn"] for c in children.values() if c["conn"]),
                                          *(c["pidfd"] for c in children.values())], str(path))
                for fd in fds:
                    os.close(fd)
                try:
                    os.setpgid(pid, pid)  # also set by the child; whichever runs first
                except OSError:
                    pass
                pidfd = os.pidfd_open(pid)
                what = request.get("module") or Path(request.get("path", "?")).name
                children[pid] = {"conn": conn, "pidfd": pidfd, "module": what,
                                 "started": time.monotonic()}
                selector.register(pidfd, selectors.EVENT_READ, ("exited", pid))
                selector.register(conn, selectors.EVENT_READ, ("client", pid))
                try:
                    _send(conn, {"pid": pid})
                    os.utime(path)  # recently used (servers beyond LORA_WARM_MAX are stopped oldest first)
                except OSError:
                    pass
                print(f"{time.strftime('%H:%M:%S')} started {what} (pid {pid}) in {request['cwd']}", flush=True)
            elif kind == "exited":
                if data in children:
                    finish(data)
                last_active = time.monotonic()
            elif kind == "client":  # the client closed its connection before its stage ended: it is gone
                child = children.get(data)
                if child is None or child["conn"] is None:  # already finished in this same round of events
                    continue
                selector.unregister(child["conn"])
                child["conn"].close()
                child["conn"] = None
                try:
                    os.killpg(data, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                print(f"{time.strftime('%H:%M:%S')} client of pid {data} gone: its process group was killed", flush=True)
        if children:
            continue
        replaced = not path.exists() or path.stat().st_ino != inode
        if quitting or replaced or time.monotonic() - last_active > idle_limit:
            if not replaced:
                path.unlink(missing_ok=True)
                pid_file.unlink(missing_ok=True)
            print(f"{time.strftime('%H:%M:%S')} exiting ({'asked to' if quitting else 'replaced' if replaced else 'idle'})",
                  flush=True)
            return


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"] and len(sys.argv) == 3:
        serve(Path(sys.argv[2]))
    else:
        main(sys.argv[1:])
