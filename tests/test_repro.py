"""Several `dvc repro` at once (harness.repro) on a toy DVC project whose stages only write files:
the runs that are out of date run on the workers, the rest through `dvc repro`, the result is what
a plain `dvc repro` gives, and a failing stage stops the hand-out and is named with its log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from harness import repro
from harness.errors import HarnessError

# Each run stage records the worker's environment (threads, GPU, warm server) in its output file.
RECORD = ("python -c \"import os, sys; open(sys.argv[1], 'w').write("
          "os.environ['OMP_NUM_THREADS'] + ' ' + os.environ.get('CUDA_VISIBLE_DEVICES', '-') + ' ' + "
          "os.environ.get('FLOWAD_WARM_SOCKET', '-'))\"")


def toy_project(root: Path, runs: list[str], failing: str | None = None) -> Path:
    stages = {"prepare": {"foreach": ["data"], "do": {  # prepare@data, as in the project's dvc.yaml
        "cmd": "python -c \"open('${item}.txt', 'w').write('x')\"", "outs": ["${item}.txt"]}}}
    for name in runs:
        cmd = "python -c \"raise SystemExit('broken run')\"" if name == failing else f"{RECORD} {name}.txt"
        stages[f"main_{name}"] = {"cmd": cmd, "deps": ["data.txt"], "outs": [f"{name}.txt"]}
    stages["tables"] = {"cmd": "python -c \"open('tables.txt', 'w').write('t')\"",
                        "deps": [f"{name}.txt" for name in runs], "outs": ["tables.txt"]}
    root.mkdir(parents=True, exist_ok=True)
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=root, check=True,
                   env=repro.dvc_environment())
    return root


def dvc_status(root: Path) -> dict:
    result = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=root, capture_output=True,
                            text=True, env=repro.dvc_environment(), check=True)
    return json.loads(result.stdout)


def test_workers_share_the_cores_and_the_gpus():
    workers = repro.make_workers(3, gpus=["0", "1"], cpus=8)
    assert [w.threads for w in workers] == [2, 2, 2]
    assert [w.gpu for w in workers] == ["0", "1", "0"]
    env = workers[2].environment()
    assert env["OMP_NUM_THREADS"] == "2" and env["CUDA_VISIBLE_DEVICES"] == "0"
    assert repro.make_workers(4, cpus=2)[0].threads == 1
    assert repro.make_workers(1, cpus=2)[0].gpu is None
    with pytest.raises(HarnessError, match="--jobs 0"):
        repro.make_workers(0)


@pytest.mark.slow
def test_parallel_repro_equals_dvc_repro(tmp_path, capsys):
    root = toy_project(tmp_path / "toy", ["a", "b", "c"])
    repro.reproduce(root, jobs=2, gpus=["7"], progress=True)
    printed = capsys.readouterr().out
    assert "3 training runs to do, 2 at a time" in printed
    assert printed.count("done in") == 3
    assert dvc_status(root) == {}  # dvc.lock holds every stage, as after a plain `dvc repro`
    assert (root / "tables.txt").exists()
    # every run ran on a worker: one thread each (2 jobs on the test's cores or fewer) and the GPU
    for name in "abc":
        threads, gpu, warm = (root / f"{name}.txt").read_text().split()
        assert gpu == "7" and int(threads) >= 1
        assert (root / repro.LOGS / f"main_{name}.log").exists()
        # `python -m harness` stages would be served by the warm server (tests/test_warmstart.py)
        assert warm.endswith("socket") and not os.path.exists(warm)  # gone with the reproduction
    # a second time there is nothing to do
    repro.reproduce(root, jobs=2, progress=True)
    assert "0 training runs to do" in capsys.readouterr().out
    # an out-of-date run is found and only it runs; without the warm start, no server
    (root / "b.txt").unlink()
    assert repro.stages_to_run(root) == ["main_b"]
    cold = toy_project(tmp_path / "cold", ["d"])
    repro.reproduce(cold, jobs=2, progress=False, warm_start=False)
    assert (cold / "d.txt").read_text().split()[2] == "-"


@pytest.mark.slow
def test_a_failing_run_is_named_and_the_finished_ones_are_kept(tmp_path):
    root = toy_project(tmp_path / "toy", ["a", "b"], failing="b")
    with pytest.raises(HarnessError) as err:
        repro.reproduce(root, jobs=2, progress=False)
    message = str(err.value)
    assert "main_b" in message and "broken run" in message and str(repro.LOGS / "main_b.log") in message
    assert not (root / "tables.txt").exists()  # nothing downstream of a failed run
    assert "main_a" not in dvc_status(root)  # the finished run is recorded in dvc.lock


def test_the_warm_start_is_for_linux_only(tmp_path, monkeypatch):
    """Elsewhere (macOS) a forked child of a process that loaded torch may abort: no server."""
    monkeypatch.setattr(repro.sys, "platform", "darwin")
    root = toy_project(tmp_path / "toy", ["a"])
    repro.reproduce(root, jobs=2, progress=False)
    assert (root / "a.txt").read_text().split()[2] == "-"
