"""The warm server for pipeline stages: a stage forked from it is the command it stands for (same
output, exit status, folder and environment), the project's code is never preloaded, a stage
ends when its client goes, and without a server the command runs in its own process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import warmstart
from harness.synthetic import generate_embedded

REPO = Path(__file__).resolve().parents[1]
CLASS = "granite"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("warm") / "server.log"
    with warmstart.server(log=log) as path:
        assert os.environ[warmstart.ENV] == path
        yield path
    assert warmstart.ENV not in os.environ and not os.path.exists(path)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    generate_embedded(root / "embedded", seed=0, classes=[CLASS])
    return root


def harness(args: list[str], cwd: Path, socket_path: str | None, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != warmstart.ENV}
    env["PYTHONPATH"] = str(REPO)
    if socket_path:
        env[warmstart.ENV] = socket_path
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, **kwargs)


def test_a_forked_stage_is_the_command_it_stands_for(server, dataset):
    cold = harness(["validate", "embedded", "--classes", CLASS], dataset, None)
    warm = harness(["validate", "embedded", "--classes", CLASS], dataset, server)
    assert cold.returncode == warm.returncode == 0
    assert warm.stdout == cold.stdout and CLASS in warm.stdout
    # the stage's working folder: the relative path above resolved there, and fails elsewhere
    elsewhere = harness(["validate", "embedded", "--classes", CLASS], dataset.parent, server)
    assert elsewhere.returncode != 0 and "embedded" in elsewhere.stderr
    # a failing command: the same message on stderr and the same exit status
    cold = harness(["validate", "no-such-folder"], dataset, None)
    warm = harness(["validate", "no-such-folder"], dataset, server)
    assert warm.returncode == cold.returncode != 0 and warm.stderr == cold.stderr
    state = warmstart.status(server)
    assert state["children"] == [] and state["project_modules"] == []  # children import the project afresh


def test_a_forked_run_gives_the_same_numbers(server, dataset, tmp_path):
    """Every run seeds what it draws, so a run forked from the server trains to the same numbers."""
    import json

    summaries = []
    for name, socket_path in (("cold", None), ("warm", server)):
        out = tmp_path / name
        result = harness(["train", "--method", "msflow", "--data", "embedded", "--class", CLASS, "--out", str(out),
                          "--random-weights", "--epochs", "1", "--no-tracking", "--quiet", "--seed", "3",
                          "--set", "input_size=[64,64]", "--set", "backbone=resnet18.tv_in1k",
                          "--set", "sub_epochs=1"], dataset, socket_path)
        assert result.returncode == 0, result.stderr
        summaries.append(json.loads((out / "metrics.json").read_text()))
    cold, warm = summaries
    assert warm["last"] == cold["last"] and warm["seed"] == cold["seed"] == 3
    assert [row["loss"] for row in warm["history"]] == [row["loss"] for row in cold["history"]]


def test_the_stage_sees_its_own_environment(server, dataset, tmp_path):
    # the dataset mirror is read from the environment of the stage, not of the server
    env = {"env": {**os.environ, "PYTHONPATH": str(REPO), warmstart.ENV: server, "FLOWAD_MIRROR": "/no/mirror"}}
    result = subprocess.run([sys.executable, "-m", "harness", "fetch", "mtd", "--data-root", str(tmp_path)],
                            cwd=dataset, capture_output=True, text=True, **env)
    assert result.returncode != 0 and "FLOWAD_MIRROR=/no/mirror is neither" in result.stderr


def test_a_stage_ends_with_its_client(server, dataset, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), warmstart.ENV: server}
    client = subprocess.Popen([sys.executable, "-m", "harness", "train", "--method", "msflow", "--data",
                               str(dataset / "embedded"), "--class", CLASS, "--out", str(tmp_path / "run"),
                               "--random-weights", "--epochs", "500", "--no-tracking", "--quiet",
                               "--set", "input_size=[64,64]"], cwd=dataset, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not warmstart.status(server)["children"] and time.monotonic() < deadline:
        time.sleep(0.1)
    (child,) = warmstart.status(server)["children"]
    client.send_signal(signal.SIGTERM)  # forwarded to the stage
    assert client.wait(timeout=30) == 128 + signal.SIGTERM
    while warmstart.status(server)["children"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert warmstart.status(server)["children"] == []
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)


def test_without_a_server_the_command_runs_in_its_own_process(dataset, tmp_path):
    cold = harness(["validate", "embedded", "--classes", CLASS], dataset, None)
    missing = harness(["validate", "embedded", "--classes", CLASS], dataset, str(tmp_path / "no-socket"))
    assert missing.returncode == 0 and missing.stdout == cold.stdout


def test_another_interpreter_is_refused(server, tmp_path):
    """A stage run by another Python (another venv) would get the server's libraries: refused, and
    the client runs the command itself."""
    import json
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(server)
        request = {"kind": "run", "argv": ["x", "--help"], "cwd": str(tmp_path), "env": {}, "path": [],
                   "identity": {"executable": "/other/python"}}
        warmstart._send(sock, request, fds=[0, 1, 2])
        reply, _ = warmstart._receive(sock)
    assert "another Python interpreter" in reply["refused"]
    assert json.dumps(warmstart.status(server)["children"]) == "[]"
