"""A warm interpreter for the pipeline's stages.

Every dvc.yaml stage is a fresh ``python -m harness ...`` process, and on a small machine most of
a demo stage is spent importing torch, timm, scikit-learn, MLflow and matplotlib, not training.
While ``flowad repro`` runs, a fork server holds those imports:

- ``server(...)`` starts it (``python harness/warmstart.py SOCKET``) and names its Unix socket in
  ``FLOWAD_WARM_SOCKET`` for every ``dvc`` it starts; the server listens at once and imports
  ``PRELOAD`` while the first stages queue up.
- ``python -m harness ...`` (harness/__main__.py) finds that variable and calls ``run``: it sends its
  arguments, working folder, environment, ``sys.path`` and its three standard streams (as file
  descriptors) to the server and waits. The server forks a child that becomes that command: same
  folder, environment, streams and exit status; the client forwards SIGINT and SIGTERM to it, and
  the server ends the child if the client goes away.

Only third-party modules are preloaded, and the server runs as a plain script so that not even the
``harness`` package is imported there: each child imports the project's code afresh from the
client's ``sys.path``, so an edit between two stages takes effect as it would without the server,
and what a stage computes does not depend on it. Without the server (no variable, or the socket
does not answer, or another interpreter) the command runs in its own process as before.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and sys.path and os.path.realpath(sys.path[0]) == os.path.dirname(os.path.realpath(__file__)):
    # Run as a script, its folder (harness/) would come first on sys.path, and its modules would
    # shadow the standard library's (harness/profile.py for cProfile's `profile`).
    del sys.path[0]

import contextlib
import json
import signal
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ENV = "FLOWAD_WARM_SOCKET"
# What a stage imports that costs seconds (python -X importtime); optional ones may be missing.
PRELOAD = ("numpy", "pandas", "scipy.ndimage", "sklearn.metrics", "skimage.measure", "torch", "torchvision",
           "timm", "FrEIA.framework", "FrEIA.modules", "mlflow", "mlflow.tracking",
           "mlflow.store.tracking.sqlalchemy_store", "matplotlib.figure", "matplotlib.backends.backend_agg",
           "matplotlib.backends.backend_pdf", "yaml", "filelock")
PROJECT_PACKAGES = ("harness", "methods", "datasets")  # never preloaded: children import them fresh
_HEADER = struct.Struct("!I")  # byte length of the JSON that follows


# --------------------------------------------------------------------------- messages


def _send(sock: socket.socket, message: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode()
    if fds:
        socket.send_fds(sock, [_HEADER.pack(len(data))], fds)
    else:
        sock.sendall(_HEADER.pack(len(data)))
    sock.sendall(data)


def _receive(sock: socket.socket, max_fds: int = 0) -> tuple[dict | None, list[int]]:
    """One message (None at end of stream) and the descriptors that came with it."""
    if max_fds:
        head, fds, _, _ = socket.recv_fds(sock, _HEADER.size, max_fds)
    else:
        head, fds = sock.recv(_HEADER.size, socket.MSG_WAITALL), []
    if len(head) < _HEADER.size:
        return None, fds
    (length,) = _HEADER.unpack(head)
    data = b""
    while len(data) < length:
        chunk = sock.recv(length - len(data))
        if not chunk:
            return None, fds
        data += chunk
    return json.loads(data), fds


def _identity() -> dict:
    """What must match between client and server for a child to be the command it stands for."""
    return {"executable": os.path.realpath(sys.executable), "prefix": sys.prefix, "version": sys.version}


# --------------------------------------------------------------------------- client


def run(argv: list[str], socket_path: str | None = None) -> int | None:
    """Run ``python -m harness argv`` in a child of the warm server and return its exit status;
    None when there is no server to use (the caller then runs the command itself)."""
    socket_path = socket_path or os.environ.get(ENV)
    if not socket_path:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(socket_path)
        _send(sock, {"kind": "run", "argv": [sys.argv[0], *argv], "cwd": os.getcwd(), "env": dict(os.environ),
                     "path": list(sys.path), "identity": _identity()}, fds=[0, 1, 2])
        reply, _ = _receive(sock)
    except OSError:
        sock.close()
        return None  # no server (it has ended, or never started): run here
    if reply is None or "refused" in reply:
        sock.close()
        if reply is not None:
            print(f"warm start refused ({reply['refused']}); running in this process", file=sys.stderr)
        return None
    child = int(reply["pid"])
    forward = {sig: signal.signal(sig, lambda s, _f: _signal(child, s)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        reply, _ = _receive(sock)
        if reply is None:  # the server ended first: wait for the stage itself, its outputs are its own
            while _alive(child):
                time.sleep(0.2)
    finally:
        for sig, handler in forward.items():
            signal.signal(sig, handler)
        sock.close()
    if reply is None:
        print(f"the warm server ended before stage process {child} reported its exit status", file=sys.stderr)
        return 1
    return int(reply["status"])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def status(socket_path: str) -> dict:
    """The server's pid, its running children and the project modules it holds (none)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(socket_path)
        _send(sock, {"kind": "status"})
        reply, _ = _receive(sock)
    return reply or {}


# --------------------------------------------------------------------------- server


@contextlib.contextmanager
def server(log: Path | None = None, python: str = sys.executable) -> Iterator[str]:
    """A warm server for the duration of the block; its socket is in ``os.environ[ENV]`` (so every
    process started meanwhile finds it) and is yielded. Its output goes to ``log``."""
    folder = Path(tempfile.mkdtemp(prefix="flowad-warm-"))  # mode 0700: only this user can connect
    path = str(folder / "socket")
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 (closed below)
    process = subprocess.Popen([python, str(Path(__file__).resolve()), path], stdin=subprocess.DEVNULL,
                               stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    previous = os.environ.get(ENV)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(path) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)  # it binds before importing anything heavy
        if os.path.exists(path):
            os.environ[ENV] = path
        yield path
    finally:
        if previous is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = previous
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if log:
            out.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
        with contextlib.suppress(OSError):
            folder.rmdir()


def serve(socket_path: str, preload: tuple[str, ...] = PRELOAD) -> None:
    """Listen on ``socket_path``, import ``preload``, then fork a child per request. One thread
    only: a process forked while other threads hold locks could deadlock in the child."""
    import selectors
    import threading

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path)
    listener.listen(64)  # stages arriving during the imports wait in the backlog
    refused = _preload(preload)
    if threading.active_count() > 1:
        refused = refused or f"{threading.active_count()} threads after the imports; forking is unsafe"
    print(f"warm server {os.getpid()} ready on {socket_path}" + (f" (refusing: {refused})" if refused else ""),
          flush=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    children: dict[int, socket.socket] = {}  # child pid -> its client's connection
    while not stop:
        for key, _ in selector.select(timeout=0.2):
            if key.fileobj is listener:
                connection, _ = listener.accept()
                pid = _answer(connection, refused, children, inherited=[listener, *children.values()])
                if pid is not None:
                    children[pid] = connection
                    selector.register(connection, selectors.EVENT_READ, pid)
                else:
                    connection.close()
            else:  # a client went away (killed) while its child runs: end the child too
                _signal(key.data, signal.SIGTERM)
                selector.unregister(key.fileobj)
        _reap(children, selector)
    for pid in children:
        _signal(pid, signal.SIGTERM)
    listener.close()


def _preload(modules: tuple[str, ...]) -> str | None:
    import importlib

    for name in modules:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    ours = _project_modules()
    if ours:
        return f"project modules imported by the preload: {', '.join(ours)}"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return "CUDA was initialised by the preload; a forked child could not use it"
    return None


def _project_modules() -> list[str]:
    return sorted(n for n in sys.modules if n.split(".")[0] in PROJECT_PACKAGES)


def _answer(connection: socket.socket, refused: str | None, children: dict[int, socket.socket],
            inherited: list[socket.socket]) -> int | None:
    """Handle one request; the pid of the child started for it, or None. The child closes the
    server's sockets (``inherited`` and its own connection) before it becomes the command."""
    try:
        request, fds = _receive(connection, max_fds=3)
    except OSError:
        return None
    if request is None:
        return None
    if request.get("kind") == "status":
        _send(connection, {"pid": os.getpid(), "children": sorted(children), "project_modules": _project_modules()})
        return None
    if request.get("identity") != _identity():
        refused = refused or "the stage runs another Python interpreter"
    if refused or len(fds) != 3:
        _send(connection, {"refused": refused or "the standard streams did not arrive"})
        for fd in fds:
            os.close(fd)
        return None
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        for sock in (*inherited, connection):
            sock.close()
        os._exit(_child(request, fds))
    for fd in fds:
        os.close(fd)
    _send(connection, {"pid": pid})
    return pid


def _reap(children: dict[int, socket.socket], selector) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        connection = children.pop(pid, None)
        if connection is None:
            continue
        with contextlib.suppress(KeyError, ValueError):
            selector.unregister(connection)
        code = os.waitstatus_to_exitcode(status)
        with contextlib.suppress(OSError):
            _send(connection, {"status": code if code >= 0 else 128 - code})
        connection.close()


def _child(request: dict, fds: list[int]) -> int:
    """Become ``python -m harness`` for the request: its folder, environment, path and streams."""
    for sig in (signal.SIGTERM, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.path[:] = request["path"]
    sys.argv = list(request["argv"])
    import random

    random.seed()  # a fresh interpreter's entropy, not the server's state (every run seeds its own)
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and threads.isdigit():
        # The worker's share of the cores: the thread pools were sized from the server's
        # environment when the libraries loaded, so size them again from the stage's.
        with contextlib.suppress(ImportError):
            from threadpoolctl import threadpool_limits

            threadpool_limits(int(threads))
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(int(threads))
    import atexit
    import traceback

    try:
        from harness.cli import main

        code = main(sys.argv[1:])
    except SystemExit as exit_:
        code = exit_.code
    except KeyboardInterrupt:
        code = 130
    except BaseException:  # as an uncaught exception would end the interpreter
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    if code is None or isinstance(code, int):
        return code or 0
    print(code, file=sys.stderr)  # SystemExit("message"), as the interpreter prints it
    return 1


if __name__ == "__main__":
    serve(sys.argv[1])
