"""Tracking: runs land in an MLflow store and read back; run records; figures.

One SQLite store serves the whole module: creating it runs MLflow's schema migrations (seconds).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from harness import tracking
from harness.tracking import (
    Tracker,
    TrackingError,
    code_revision,
    default_tracking_uri,
    flatten_params,
    image_grid_png,
    pro_curve_png,
    roc_curve_png,
    run_record,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    pytest.importorskip("mlflow")
    return "sqlite:///" + (tmp_path_factory.mktemp("mlflow") / "mlflow.db").as_posix()


@pytest.fixture(scope="module")
def client(store: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=store)


@pytest.fixture(scope="module")
def record() -> dict:
    config = {
        "method": "msflow",
        "image_size": (256, 256),
        "root": Path("datasets/mvtec_ad"),
        "lr": np.float32(1e-4),
    }
    return run_record(config, data_hash="d" * 64, seed=3, device="cpu")


# --------------------------------------------------------------------------- tracking URI


def test_default_uri_is_sqlite_in_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert default_tracking_uri(tmp_path) == "sqlite:///" + (tmp_path.resolve() / "mlflow.db").as_posix()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert default_tracking_uri(tmp_path) == "http://127.0.0.1:5000"


# --------------------------------------------------------------------------- params


def test_flatten_params_dots_lists_and_truncates() -> None:
    flat = flatten_params(
        {
            "flow": {"blocks": 8, "clamp": 1.9, "subnet": {"kind": "conv"}},
            "stages": (1, 2, 3),
            "note": "x" * 100,
        },
        value_limit=50,
    )
    assert flat["flow.blocks"] == "8"
    assert flat["flow.clamp"] == "1.9"
    assert flat["flow.subnet.kind"] == "conv"
    assert flat["stages"] == "[1, 2, 3]"
    assert len(flat["note"]) == 50 and flat["note"].endswith("[truncated, 100 chars]")


# --------------------------------------------------------------------------- tracker


def test_run_logs_params_metrics_artifacts_and_record(store, client, record, tmp_path: Path) -> None:
    artifact = tmp_path / "notes.txt"
    artifact.write_text("hello")
    tags = {"protocol": "official"}
    with Tracker(store, experiment="tests", run_name="msflow/bottle", tags=tags) as tracker:
        tracker.log_params({"flow": {"blocks": 8, "stages": [1, 2, 3]}, "long": "y" * 7000})
        for epoch, loss in enumerate([3.0, 2.0, 1.5]):
            tracker.log_metrics({"loss": loss, "image_auroc": np.float64(0.5 + epoch / 10)}, step=epoch)
        tracker.log_artifact(artifact, artifact_path="figures")
        tracker.log_record(record)
        run_id = tracker.run_id
        assert client.get_run(run_id).info.status == "RUNNING"

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "msflow/bottle"
    # Artifacts live beside the database, not in ./mlruns of the working directory.
    assert run.info.artifact_uri.startswith(Path(store[len("sqlite:///"):]).parent.as_uri())

    params = run.data.params
    assert params["flow.blocks"] == "8"
    assert params["flow.stages"] == "[1, 2, 3]"
    assert len(params["long"]) <= 6000 and "truncated, 7000 chars" in params["long"]

    history = client.get_metric_history(run_id, "loss")
    steps = [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)]
    assert steps == [(0, 3.0), (1, 2.0), (2, 1.5)]

    tags = run.data.tags
    assert tags["protocol"] == "official"
    assert tags["data_hash"] == "d" * 64
    assert tags["seed"] == "3"
    assert tags["device"] == "cpu"
    assert tags["code_revision"] == record["code"]["revision"]

    assert [a.path for a in client.list_artifacts(run_id, "figures")] == ["figures/notes.txt"]
    assert tracking.RECORD_FILE in [a.path for a in client.list_artifacts(run_id)]
    record_file = Path(client.download_artifacts(run_id, tracking.RECORD_FILE, str(tmp_path)))
    stored = json.loads(record_file.read_text())
    assert stored["seed"] == 3 and stored["config"]["image_size"] == [256, 256]


def test_failing_block_ends_run_failed(store, client) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with Tracker(store, experiment="tests", run_name="fails") as tracker:
            run_id = tracker.run_id
            raise RuntimeError("boom")
    assert client.get_run(run_id).info.status == "FAILED"


def test_resume_continues_the_same_run(store, client) -> None:
    with Tracker(store, experiment="tests", run_name="resumable") as tracker:
        tracker.log_metrics({"loss": 2.0}, step=0)
        run_id = tracker.run_id
    with Tracker(store, experiment="tests", run_id=run_id) as resumed:
        assert resumed.run_id == run_id
        assert client.get_run(run_id).info.status == "RUNNING"
        resumed.log_metrics({"loss": 1.0}, step=1)
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == [0, 1]
    assert client.get_run(run_id).info.status == "FINISHED"


def test_tracking_errors_name_the_store(store) -> None:
    with pytest.raises(TrackingError, match="sqlite:///"):
        with Tracker(store, run_id="0" * 32):
            pass
    with Tracker(store, experiment="tests") as tracker:
        with pytest.raises(FileNotFoundError, match="missing.png"):
            tracker.log_artifact("missing.png")


@pytest.mark.slow
def test_runs_started_side_by_side_share_a_new_store(tmp_path: Path) -> None:
    """Parallel pipeline jobs open the same, not yet created, SQLite store at once."""
    uri = f"sqlite:///{(tmp_path / 'mlflow.db').as_posix()}"
    script = (
        "import sys\n"
        "from harness.tracking import Tracker\n"
        "with Tracker(sys.argv[1], experiment='side-by-side', run_name=sys.argv[2]) as t:\n"
        "    t.log_metrics({'m': 1.0}, step=0)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    jobs = [subprocess.Popen([sys.executable, "-c", script, uri, f"run{i}"], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(3)]
    for job in jobs:
        output, _ = job.communicate(timeout=300)
        assert job.returncode == 0, output
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("side-by-side")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["run0", "run1", "run2"]


def test_disabled_tracker_does_nothing_and_never_imports_mlflow(tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "from harness.tracking import Tracker\n"
        "with Tracker(enabled=False, experiment='x') as t:\n"
        "    t.log_params({'a': {'b': 1}}); t.log_metrics({'m': 1.0}, step=0)\n"
        "    t.log_artifact('does-not-matter.txt'); t.log_record({'seed': 0}); t.set_tags({'k': 'v'})\n"
        "    assert t.run_id is None\n"
        "assert 'mlflow' not in sys.modules, 'mlflow was imported'\n"
        "assert 'matplotlib' not in sys.modules and 'torch' not in sys.modules\n"
    )
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- run record


def test_run_record_is_json_and_complete(record) -> None:
    text = json.dumps(record)
    assert json.loads(text) == record
    assert record["code"]["revision"]  # a commit hash, or "unknown" outside git
    assert "dirty" in record["code"] and record["code"]["version"]
    assert set(tracking.TRACKED_PACKAGES) <= set(record["packages"])
    assert record["packages"]["numpy"] == np.__version__
    assert record["seed"] == 3 and record["data_hash"] == "d" * 64
    assert record["device"]["name"] == "cpu"
    assert record["config"]["root"] == "datasets/mvtec_ad"
    assert record["timestamp_utc"].endswith("Z") and record["python"] and record["command"]


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_code_revision_tracks_commit_and_dirty_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    outside = tmp_path / "outside"
    outside.mkdir()
    assert code_revision(outside)["revision"] == "unknown"

    repo = tmp_path / "repo"
    repo.mkdir()

    def git(*args: str) -> str:
        command = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.org", *args]
        return subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (repo / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("commit", "-q", "-m", "first")
    clean = code_revision(repo)
    assert clean["revision"] == git("rev-parse", "HEAD") and clean["dirty"] is False
    assert clean["diff_sha256"] is None

    (repo / "a.py").write_text("x = 2\n")
    (repo / "new.py").write_text("")
    dirty = code_revision(repo)
    assert dirty["dirty"] is True and len(dirty["diff_sha256"]) == 64
    assert dirty["untracked"] == ["new.py"]


# --------------------------------------------------------------------------- figures


def _assert_png(path: Path, min_size: tuple[int, int], max_size: tuple[int, int]) -> None:
    from PIL import Image

    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        width, height = image.size
    assert min_size[0] <= width <= max_size[0] and min_size[1] <= height <= max_size[1], image.size
    assert path.stat().st_size < 2_000_000


def test_image_grid_from_normalised_tensors(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 64, 80, generator=generator)
    masks = torch.zeros(3, 1, 64, 80)
    masks[1, :, 20:40, 30:50] = 1
    maps = torch.rand(3, 16, 20, generator=generator)  # flow resolution, upsampled in the plot
    path = image_grid_png(images, masks, maps, tmp_path / "grid.png", titles=["good", "crack", "hole"])
    assert path == tmp_path / "grid.png"
    _assert_png(path, (300, 300), (1000, 700))


def test_image_grid_from_uint8_arrays_caps_columns(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (48, 48, 3), dtype=np.uint8) for _ in range(10)]
    maps = rng.random((10, 12, 12))
    few = _width(image_grid_png(images[:2], None, maps[:2], tmp_path / "two.png"))
    many = image_grid_png(images, None, maps, tmp_path / "many.png", max_items=8)
    _assert_png(many, (900, 300), (1800, 700))
    assert _width(many) > few


def _width(path: Path) -> int:
    from PIL import Image

    with Image.open(path) as image:
        return image.size[0]


def test_roc_and_pro_curves(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(20), np.ones(20)]
    scores = labels + rng.normal(0, 0.7, 40)
    _assert_png(roc_curve_png(labels, scores, tmp_path / "roc.png", title="bottle"), (250, 250), (600, 600))

    fpr = np.linspace(0, 1, 200)
    pro = np.sqrt(fpr)
    _assert_png(pro_curve_png(fpr, pro, tmp_path / "pro.png"), (250, 250), (600, 600))

    with pytest.raises(ValueError, match="both"):
        roc_curve_png(np.zeros(5), np.zeros(5), tmp_path / "bad.png")
