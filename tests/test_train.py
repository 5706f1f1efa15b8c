"""The shared training loop, on the embedded dataset with a small random-weight MSFlow."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from harness.config import RunSettings, RunSpec
from harness.errors import HarnessError, TrainingError
from harness.train import CHECKPOINT, EVAL_METRICS, MAPS, METRICS, Trainer, rescore_maps, run_training

# MSFlow's architecture at toy size: resnet18 stages 1-3 at 64 px (maps 8/4/2 after pooling).
SMALL = {
    "backbone": "resnet18.tv_in1k",
    "input_size": (64, 64),
    "parallel_blocks": (1, 1, 2),
    "batch_size": 8,
    "warmup_meta_epochs": 0,
    "lr": 1e-3,
}
CLASS = "granite"


def settings(**kw) -> RunSettings:
    base = dict(device="cpu", pretrained=False, progress=False, tracking=False, seed=0, workers=0,
                figures=False)
    return RunSettings(**{**base, **kw})


def spec(data: Path, out: Path, **overrides) -> RunSpec:
    return RunSpec(method="msflow", data_root=data, class_name=CLASS, out_dir=out,
                   overrides={**SMALL, **overrides})


@pytest.fixture(scope="module")
def tracked_run(embedded_root, tmp_path_factory):
    """One 4-epoch run with MLflow tracking into a temporary SQLite store."""
    tmp = tmp_path_factory.mktemp("tracked")
    uri = f"sqlite:///{(tmp / 'mlflow.db').as_posix()}"
    run_spec = spec(embedded_root, tmp / "run")
    summary = run_training(run_spec, settings(tracking=True, tracking_uri=uri, epochs=4, eval_every=2, figures=True))
    return run_spec, summary, uri


def test_short_run_lowers_loss_and_scores_above_chance(tracked_run):
    _, summary, _ = tracked_run
    losses = [row["loss"] for row in summary["history"]]
    assert losses[-1] < losses[0]
    assert summary["last"]["image_auroc"] > 0.7
    assert summary["last"]["pixel_auroc"] > 0.7
    assert [row["epoch"] for row in summary["history"] if "image_auroc" in row] == [2, 4]


def test_run_folder_holds_the_record_maps_and_figures(tracked_run):
    run_spec, summary, _ = tracked_run
    out = run_spec.out_dir
    record = json.loads((out / "record.json").read_text())
    for key in ("code", "packages", "device", "seed", "data_hash", "config"):
        assert key in record, key
    assert record["seed"] == 0 and record["config"]["class"] == CLASS
    with __import__("numpy").load(out / MAPS) as maps:
        assert maps["scale0"].dtype.name == "float16"
        assert maps["scale0"].shape[1:] == (8, 8)
        assert maps["channels"].tolist() == [64, 128, 256]
    for name in ("roc_image.png", "pro_curve.png", "anomaly_maps.png"):
        assert (out / "artifacts" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"miou_fair", "miou_oracle", "fair_threshold"} <= set(summary["last"])


def test_stored_maps_reproduce_the_reported_metrics(tracked_run):
    run_spec, summary, _ = tracked_run
    rescored = rescore_maps(run_spec)
    for name in EVAL_METRICS:
        assert rescored[name] == summary["last"][name], name


def test_mlflow_has_params_per_epoch_metrics_and_artifacts(tracked_run):
    from mlflow.tracking import MlflowClient

    run_spec, _, uri = tracked_run
    client = MlflowClient(tracking_uri=uri)
    run_id = (run_spec.out_dir / "tracking_run_id.txt").read_text().strip()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["method"] == "msflow"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == list(range(1, 5))
    assert [m.step for m in client.get_metric_history(run_id, "image_auroc")] == [2, 4]
    # the final model's extras and the best epochs once, under their own names; nothing twice
    assert not [k for k in run.data.metrics if k.startswith("final_")]
    assert [m.step for m in client.get_metric_history(run_id, "miou_fair")] == [4]
    assert run.data.metrics["best_image_auroc_epoch"] in (2, 4)
    # a run outside the grid is named by its overrides
    name = run.info.run_name
    assert name.startswith(f"msflow {run_spec.dataset}/{CLASS} ") and name.endswith(" seed 0")
    assert "parallel_blocks=[1,1,2]" in name and run.data.tags["variant"] in name
    from harness.tracking import local_artifact_folder

    folder = local_artifact_folder(run.info.artifact_uri, Path(uri[len("sqlite:///"):]))
    artifacts = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert {"figures/anomaly_maps.png", "figures/anomaly_maps.pdf", "figures/roc_image.csv", "metrics.json"} <= artifacts


def test_a_finished_run_is_never_overwritten(tracked_run):
    run_spec, _, _ = tracked_run
    with pytest.raises(HarnessError, match="already holds a finished run"):
        Trainer(run_spec, settings(epochs=4, eval_every=2)).fit()


@pytest.fixture(scope="module")
def reference_run(embedded_root, tmp_path_factory):
    """2 epochs, evaluated after each, uninterrupted."""
    out = tmp_path_factory.mktemp("reference") / "run"
    return Trainer(spec(embedded_root, out), settings(epochs=2, eval_every=1)).fit()


def test_same_seed_gives_the_same_metrics(embedded_root, tmp_path, reference_run):
    again = Trainer(spec(embedded_root, tmp_path / "run"), settings(epochs=2, eval_every=1)).fit()
    assert again["last"] == reference_run["last"]
    assert [r["loss"] for r in again["history"]] == [r["loss"] for r in reference_run["history"]]


def test_feature_cache_does_not_change_the_result(embedded_root, tmp_path, reference_run):
    uncached = Trainer(spec(embedded_root, tmp_path / "run"),
                       settings(epochs=2, eval_every=1, feature_cache=False)).fit()
    for name in EVAL_METRICS:
        assert uncached["last"][name] == pytest.approx(reference_run["last"][name], abs=1e-6), name


def test_killed_run_resumes_to_the_same_metrics(embedded_root, tmp_path, reference_run):
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "harness", "train", "--method", "msflow", "--data", str(embedded_root),
        "--class", CLASS, "--out", str(out), "--device", "cpu", "--random-weights", "--no-tracking",
        "--quiet", "--seed", "0", "--epochs", "2", "--eval-every", "1",
        *[f"--set={k}={json.dumps(list(v) if isinstance(v, tuple) else v)}" for k, v in SMALL.items()],
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not (out / CHECKPOINT).exists():
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = torch.load(out / CHECKPOINT, weights_only=False)["epoch"]
    assert killed_at < 2 and not (out / METRICS).exists(), "the run finished before it was killed"

    with pytest.raises(HarnessError, match="--resume"):
        Trainer(spec(embedded_root, out), settings(epochs=2, eval_every=1)).fit()
    resumed = Trainer(spec(embedded_root, out), settings(epochs=2, eval_every=1)).fit(resume=True)
    assert resumed["last"] == reference_run["last"]
    assert [r["loss"] for r in resumed["history"]] == [r["loss"] for r in reference_run["history"]]


def test_nan_loss_stops_with_epoch_and_batch_and_keeps_the_checkpoint(embedded_root, tmp_path, monkeypatch):
    from methods.msflow import MSFlow

    real_loss = MSFlow.loss
    calls = {"n": 0}
    batches_per_epoch = math.ceil(40 / SMALL["batch_size"])

    def loss_that_breaks(self, out):
        calls["n"] += 1
        value = real_loss(self, out)
        # second epoch, third batch
        return value * float("nan") if calls["n"] == batches_per_epoch + 3 else value

    monkeypatch.setattr(MSFlow, "loss", loss_that_breaks)
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"epoch 2, batch 2"):
        Trainer(spec(embedded_root, out), settings(epochs=2, eval_every=1)).fit()
    state = torch.load(out / CHECKPOINT, weights_only=False)
    assert state["epoch"] == 1
    assert not (out / METRICS).exists()
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_resume_with_other_settings_is_refused(embedded_root, tmp_path):
    out = tmp_path / "run"
    trainer = Trainer(spec(embedded_root, out), settings(epochs=1, eval_every=1))
    trainer.fit()
    (out / METRICS).unlink()  # as if interrupted after the checkpoint
    with pytest.raises(HarnessError, match="other settings"):
        Trainer(spec(embedded_root, out, pool="max"), settings(epochs=1, eval_every=1)).fit(resume=True)


@pytest.mark.parametrize("cache", [True, False])
def test_a_partial_last_batch_is_dropped_where_the_reference_drops_it(embedded_root, tmp_path, cache):
    small = {"backbone": "resnet18", "input_size": (32, 32), "flow_steps": 1, "batch_size": 7}

    def batch_sizes(**overrides) -> list[int]:
        run = RunSpec(method="fastflow", data_root=embedded_root, class_name=CLASS, out_dir=tmp_path / "run",
                      overrides={**small, **overrides})
        trainer = Trainer(run, settings(feature_cache=cache))
        trainer._setup()
        return [features[0].shape[0] for features in trainer._train_batches()], len(trainer.train_set)

    kept, n_train = batch_sizes()  # FastFlow's reference loader drops the partial batch
    assert n_train % 7 and kept == [7] * (n_train // 7)
    everything, _ = batch_sizes(drop_last=False)
    assert sum(everything) == n_train and everything[-1] == n_train % 7
    with pytest.raises(HarnessError, match=f"{n_train} training images, fewer than batch_size={n_train + 1}"):
        batch_sizes(batch_size=n_train + 1)
