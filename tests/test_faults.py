"""Fault injection: SIGKILL a fetch, a checkpoint write, a training stage, the re-scoring and the
tables stage at seeded random points, rerun, and check that nothing half-written is taken as
complete, a resumed run ends with the same metrics, `dvc status` is clean and no MLflow run is
left RUNNING. Loopback only; the kill points come from one seed, so a failure can be replayed."""

from __future__ import annotations

import json
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from harness import checkpoint as ckpt
from harness import repro
from harness.fetch import fetch, read_marker
from harness.manifest import damage

PROJECT = Path(__file__).resolve().parents[1]
SEED = 20261203
RNG = random.Random(SEED)
CASES: list[str] = []

pytestmark = pytest.mark.slow


def _kill_after(command: list[str], cwd: Path, delay: float, until=None, env=None) -> bool:
    """Start ``command``; SIGKILL it after ``delay`` seconds (or as soon as ``until()`` holds).
    True when it was killed, False when it finished first."""
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True)
    deadline = time.monotonic() + delay
    while process.poll() is None:
        if time.monotonic() >= deadline or (until is not None and until()):
            import os

            os.killpg(process.pid, signal.SIGKILL)  # the stage's own python process too
            process.wait()
            return True
        time.sleep(0.01)
    assert process.returncode == 0, process.stderr.read().decode()[-2000:]
    return False


def _record(case: str, killed: bool) -> None:
    CASES.append(f"{case}: {'killed' if killed else 'finished before the kill point'}")


# --------------------------------------------------------------------------- fetch


class _Slow(BaseHTTPRequestHandler):
    """Serves one archive in small chunks with pauses, so a kill lands mid-transfer."""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        data = self.server.archive  # type: ignore[attr-defined]
        start = 0
        wanted = self.headers.get("Range")
        if wanted:
            start = int(wanted.split("=")[1].rstrip("-"))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        try:
            for i in range(start, len(data), 4096):
                self.wfile.write(data[i:i + 4096])
                time.sleep(0.002)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture
def slow_server(tmp_path):
    rng = np.random.default_rng(SEED)
    archive = tmp_path / "toy.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        import io

        for i in range(40):
            for split in ("train/good", "test/good", "test/crack"):
                data = rng.integers(0, 256, 2000, dtype=np.uint8).tobytes()  # incompressible
                info = tarfile.TarInfo(f"toy/widget/{split}/{i:03d}.png")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            info = tarfile.TarInfo(f"toy/widget/ground_truth/crack/{i:03d}_mask.png")
            info.size = 4
            tar.addfile(info, io.BytesIO(b"mask"))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Slow)
    httpd.daemon_threads = True
    httpd.archive = archive.read_bytes()  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    cards = tmp_path / "cards"
    cards.mkdir()
    (cards / "toy.yaml").write_text(json.dumps({
        "name": "toy", "format": "mvtec", "revision": "r1", "classes": ["widget"],
        "files": [{"role": "archive", "filename": "toy.tar.gz", "sha256": None, "extract": True,
                   "url": f"http://127.0.0.1:{httpd.server_address[1]}/toy.tar.gz"}],
    }))
    try:
        yield cards
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_killed_fetch_is_never_taken_as_installed(slow_server, tmp_path):
    data = tmp_path / "data"
    script = f"from harness.fetch import fetch; fetch('toy', {str(data)!r}, cards_dir={str(slow_server)!r}, progress=False)"
    for attempt in range(3):
        delay = RNG.uniform(0.3, 3.0)
        killed = _kill_after([sys.executable, "-c", script], PROJECT, delay)
        _record(f"fetch killed at {delay:.2f} s", killed)
        if killed:
            assert read_marker(data / "toy") is None or damage(data / "toy") == []
    root = fetch("toy", data, cards_dir=slow_server, progress=False)
    assert damage(root) == [] and read_marker(root)["classes"]["widget"]["train"] == 40
    assert [p.name for p in data.iterdir() if ".tmp-" in p.name or ".raw-" in p.name] == []


# --------------------------------------------------------------------------- checkpoint write


def test_a_checkpoint_write_killed_midway_leaves_the_previous_one(tmp_path):
    import torch

    path = tmp_path / "checkpoint.pt"
    with open(path, "wb") as f:
        ckpt.save({"epoch": 1, "model": {"w": torch.zeros(4)}}, f)
    script = textwrap.dedent(f"""
        import time, torch
        from pathlib import Path
        from harness import checkpoint as ckpt
        from harness.train import atomic_write_bytes

        def slowly(f):
            ckpt.save({{"epoch": 2, "model": {{"w": torch.ones(4_000_000)}}}}, f)
            f.flush()
            time.sleep(30)  # killed here: the new file is complete but not yet renamed into place
        atomic_write_bytes(Path({str(path)!r}), slowly)
    """)
    leftovers = lambda: list(tmp_path.glob(".checkpoint.pt.*"))  # noqa: E731
    delay = RNG.uniform(0.0, 0.5)
    killed = _kill_after([sys.executable, "-c", script], PROJECT, 60,
                         until=lambda: leftovers() and leftovers()[0].stat().st_size > 1_000_000 and
                         time.sleep(delay) is None)
    _record(f"checkpoint write killed {delay:.2f} s after its temporary file filled", killed)
    assert killed
    assert ckpt.load(path)["epoch"] == 1  # the previous checkpoint, whole
    from harness.train import RUN_FILES, remove_partial_writes

    remove_partial_writes(tmp_path, RUN_FILES)  # what the next run does first
    assert leftovers() == []


# --------------------------------------------------------------------------- the pipeline


def _dvc(*args: str, cwd: Path) -> str:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=repro.dvc_environment(),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _snapshot(project: Path) -> dict[str, object]:
    """Every run's final metrics and every table, to compare a rerun with."""
    runs = {str(p.relative_to(project)): json.loads(p.read_text())["last"]
            for p in sorted((project / "runs").rglob("metrics.json"))}
    # cost.csv holds measured seconds per epoch and images per second: it differs run to run.
    tables = {str(p.relative_to(project)): p.read_bytes() for p in sorted((project / "results").glob("*.csv"))
              if p.name != "cost.csv"}
    return {"runs": runs, "tables": tables}


def _running_mlflow_runs(project: Path) -> int:
    with sqlite3.connect(project / "mlflow.db") as db:
        return db.execute("SELECT COUNT(*) FROM runs WHERE status = 'RUNNING'").fetchone()[0]


def _assert_consistent(project: Path, reference: dict) -> None:
    assert json.loads(_dvc("status", "--json", cwd=project)) == {}, "dvc status is not clean"
    assert _snapshot(project) == reference
    assert _running_mlflow_runs(project) == 0
    half_written = [p for p in (project / "runs").rglob(".*") if p.is_file() and "." in p.name[1:]]
    assert half_written == []


@pytest.fixture(scope="module")
def project(tiny_pipeline, tmp_path_factory) -> Path:
    """A copy of the tiny pipeline (same depth, so its relative link to the code still holds)."""
    copy = tmp_path_factory.mktemp("faults") / "demo"
    shutil.copytree(tiny_pipeline, copy, symlinks=True)
    return copy


STAGE_RUN = "runs/ablations/fusion_off/washer/seed-0"


def test_a_training_stage_killed_at_a_random_point_and_after_its_metrics(project):
    """Killed mid-training, then (resumed) killed as its metrics.json appears: the final rerun
    keeps that finished run instead of training it again, and ends with the same metrics."""
    reference = _snapshot(project)
    shutil.rmtree(project / STAGE_RUN)  # the stage must train again
    delay = RNG.uniform(2.0, 12.0)
    killed = _kill_after([sys.executable, "-m", "dvc", "repro"], project, delay, env=repro.dvc_environment())
    _record(f"training stage killed at {delay:.2f} s", killed)
    metrics = project / STAGE_RUN / "metrics.json"
    killed = _kill_after([sys.executable, "-m", "dvc", "repro"], project, 600, until=metrics.exists,
                         env=repro.dvc_environment())
    _record("training stage (resumed) killed as its metrics.json appeared", killed)
    written = metrics.stat().st_mtime_ns
    _dvc("repro", cwd=project)
    assert metrics.stat().st_mtime_ns == written, "the finished run was discarded and trained again"
    _assert_consistent(project, reference)


@pytest.mark.parametrize("stage", ["rescore", "tables"])
def test_rescoring_and_tables_killed_at_random_points(project, stage):
    reference = _snapshot(project)
    delay = RNG.uniform(1.0, 8.0)
    killed = _kill_after([sys.executable, "-m", "dvc", "repro", "--force", "--single-item", stage], project,
                         delay, env=repro.dvc_environment())
    _record(f"{stage} stage killed at {delay:.2f} s", killed)
    _dvc("repro", cwd=project)
    _assert_consistent(project, reference)


def test_zz_case_count(capsys):
    with capsys.disabled():
        print(f"\nfault injection (seed {SEED}): {len(CASES)} cases, "
              f"{sum('killed' in c and 'before' not in c for c in CASES)} killed mid-way")
        for case in CASES:
            print(f"  {case}")
    assert len(CASES) >= 8
