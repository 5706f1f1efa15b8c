"""Hostile and clumsy input: crafted checkpoints, changed settings on resume, typos and wrong
types, damaged data folders, crash leftovers, paths outside their folders, file permissions."""

from __future__ import annotations

import json
import os
import shutil
import stat
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from harness import checkpoint as ckpt
from harness.config import RunSettings, RunSpec, check_value
from harness.data import check_both_labels, dataset_hash, validate_class
from harness.errors import ConfigError, DatasetError, HarnessError, TrainingError
from harness.train import CHECKPOINT, METRICS, RECORD, Trainer, atomic_write_json, evaluate_run
from methods.registry import create_method

REPO = Path(__file__).resolve().parent.parent
SMALL = {"backbone": "resnet18.tv_in1k", "input_size": (64, 64), "parallel_blocks": (1, 1, 2),
         "batch_size": 8, "warmup_meta_epochs": 0, "lr": 1e-3}
CLASS = "granite"


def settings(**kw) -> RunSettings:
    base = dict(device="cpu", pretrained=False, progress=False, tracking=False, seed=0, workers=0,
                figures=False, epochs=1, eval_every=1)
    return RunSettings(**{**base, **kw})


def spec(data: Path, out: Path, **overrides) -> RunSpec:
    return RunSpec(method="msflow", data_root=data, class_name=CLASS, out_dir=out,
                   overrides={**SMALL, **overrides})


@pytest.fixture(scope="module")
def finished_trainer(embedded_root, tmp_path_factory):
    """One finished 1-epoch MSFlow run; tests copy its folder rather than change it."""
    trainer = Trainer(spec(embedded_root, tmp_path_factory.mktemp("finished") / "run"), settings())
    trainer.fit()
    return trainer


@pytest.fixture(scope="module")
def finished(finished_trainer):
    return finished_trainer.out


def interrupted_copy(finished: Path, tmp_path: Path) -> Path:
    """The finished run as if killed after its checkpoint (no metrics.json)."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / METRICS).unlink()
    return out


# --------------------------------------------------------------------------- checkpoints


class _RunsCode:
    """Unpickling this calls os.system: what a crafted checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_checkpoint_runs_no_code_under_evaluate_or_resume(finished, embedded_root, tmp_path):
    out = interrupted_copy(finished, tmp_path)
    marker = tmp_path / "code-ran"
    torch.save({"format": ckpt.FORMAT, "model": _RunsCode(marker)}, out / CHECKPOINT)
    with pytest.raises(ckpt.CheckpointError, match="not loaded"):
        evaluate_run(spec(embedded_root, out), settings())
    with pytest.raises(ckpt.CheckpointError, match="not loaded"):
        Trainer(spec(embedded_root, out), settings()).fit(resume=True)
    assert not marker.exists(), "unpickling the checkpoint ran a shell command"


def test_checkpoints_hold_tensors_and_plain_values_only(finished):
    state = torch.load(finished / CHECKPOINT, weights_only=True)  # raises on any other type
    assert state["format"] == ckpt.FORMAT and state["epoch"] == 1


@pytest.mark.parametrize("damage", ["truncated", "foreign"])
def test_a_corrupt_or_foreign_checkpoint_is_a_clear_error(finished, embedded_root, tmp_path, damage):
    out = interrupted_copy(finished, tmp_path)
    path = out / CHECKPOINT
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:5000])
    else:
        torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(ckpt.CheckpointError, match="truncated or corrupt" if damage == "truncated" else "not a checkpoint"):
        evaluate_run(spec(embedded_root, out), settings())


# --------------------------------------------------------------------------- resume and evaluate


@pytest.mark.parametrize("change", [{"precision": "amp"}, {"feature_cache": False}, {"epochs": 2}])
def test_resume_refuses_a_changed_setting_and_leaves_the_record(finished, embedded_root, tmp_path, change):
    out = interrupted_copy(finished, tmp_path)
    record = (out / RECORD).read_bytes()
    with pytest.raises(ckpt.CheckpointError, match=f"changed:.*{next(iter(change))}"):
        Trainer(spec(embedded_root, out), settings(**change)).fit(resume=True)
    assert (out / RECORD).read_bytes() == record  # not rewritten to claim the new settings


def test_resume_refuses_changed_training_data(finished, embedded_root, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(embedded_root / CLASS, data / CLASS)  # no file list: the data hash decides
    out = interrupted_copy(finished, tmp_path)
    assert Trainer(spec(data, out), settings())._resumable_state()["epoch"] == 1  # same bytes
    first = sorted((data / CLASS / "train/good").iterdir())[0]
    first.write_bytes(sorted((data / CLASS / "train/good").iterdir())[1].read_bytes())
    with pytest.raises(ckpt.CheckpointError, match="data_hash"):
        Trainer(spec(data, out), settings()).fit(resume=True)


def test_evaluate_refuses_method_settings_the_run_was_not_trained_with(finished, embedded_root):
    with pytest.raises(ckpt.CheckpointError, match="pool"):
        evaluate_run(spec(embedded_root, finished, pool="max"), settings())
    with pytest.raises(HarnessError, match="pool"):
        evaluate_run(spec(embedded_root, finished, pool="max"), settings(), from_maps=True)
    rescored = evaluate_run(spec(embedded_root, finished, top_k=0.1), settings(), from_maps=True)
    assert 0 <= rescored["image_auroc"] <= 1  # a scoring setting re-scores the stored maps


@pytest.mark.parametrize("override", [{"meta_epochs": -1}, {"sub_epochs": 0}])
def test_an_empty_training_budget_is_refused(embedded_root, tmp_path, override):
    with pytest.raises(ConfigError, match="positive number of epochs"):
        Trainer(spec(embedded_root, tmp_path / "run", **override), settings(epochs=None, eval_every=None))


def test_non_finite_scores_stop_with_a_clear_error(finished_trainer, monkeypatch):
    trainer = finished_trainer
    real = trainer.log_likelihoods_float32

    def below_float16(split="test"):
        maps = real(split)
        maps[0][0] = -1e5  # float16, the stored maps' type, makes -inf of a value below -65504
        return maps

    monkeypatch.setattr(trainer, "log_likelihoods_float32", below_float16)
    with pytest.raises(TrainingError, match="not finite"):
        trainer.evaluate()


def test_partial_checkpoint_writes_are_removed_when_a_run_starts(embedded_root, tmp_path, finished,
                                                                monkeypatch):
    out = interrupted_copy(finished, tmp_path)
    leftover = out / f".{CHECKPOINT}.k2j3h4"
    leftover.write_bytes(b"half a checkpoint")

    def stop(self):
        raise RuntimeError("stopped before training")

    monkeypatch.setattr(Trainer, "_setup", stop)
    with pytest.raises(RuntimeError, match="stopped"):
        Trainer(spec(embedded_root, out), settings()).fit(resume=True)
    assert not leftover.exists() and (out / CHECKPOINT).exists()


# --------------------------------------------------------------------------- strict settings


def test_yaml_1_1_float_strings_are_read_as_numbers():
    assert yaml.safe_load("lr: 1e-4")["lr"] == "1e-4"  # why: PyYAML reads it as a string
    assert create_method("msflow", lr="1e-3").lr == pytest.approx(1e-3)
    assert create_method("msflow", lr=1).lr == 1.0


@pytest.mark.parametrize("make", [
    lambda: RunSettings(pretrained="false"),
    lambda: RunSettings(workers="4"),
    lambda: RunSettings(epochs=2.5),
    lambda: create_method("msflow", fusion="false"),
    lambda: create_method("msflow", batch_size="8"),
    lambda: create_method("msflow", parallel_blocks=[2, "x", 2]),
])
def test_wrong_types_and_quoted_booleans_are_refused(make):
    with pytest.raises(ConfigError, match="wrong type"):
        make()


def test_a_quoted_boolean_gets_a_hint():
    with pytest.raises(ConfigError, match="without quotes"):
        check_value("pretrained", "false", bool)


def test_unknown_params_keys_are_errors():
    from harness import grid

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    run = grid.main_run(params, "official", "mvtec_ad", "msflow", "bottle", 0)
    grid.run_settings(params, run)  # the shipped file is accepted
    params["runtime"]["precison"] = "amp"
    with pytest.raises(ConfigError, match="precison"):
        grid.run_settings(params, run)
    del params["runtime"]["precison"]
    params["runtime"]["pretrained"] = "false"
    with pytest.raises(ConfigError, match="pretrained"):
        grid.run_settings(params, run)


# --------------------------------------------------------------------------- paths


@pytest.mark.parametrize("name", ["../granite", "a/b", ".hidden", ".."])
def test_class_names_cannot_leave_their_folder(embedded_root, tmp_path, name):
    with pytest.raises(ConfigError, match="not allowed"):
        RunSpec(method="msflow", data_root=embedded_root, class_name=name, out_dir=tmp_path / "run")


def test_a_run_folder_cannot_be_inside_the_dataset(embedded_root):
    with pytest.raises(ConfigError, match="overlaps the dataset"):
        RunSpec(method="msflow", data_root=embedded_root, class_name=CLASS, out_dir=embedded_root / CLASS)


def test_grid_names_are_checked_before_any_folder_is_touched():
    from harness import grid

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    with pytest.raises(ConfigError, match="not allowed"):
        grid.main_run(params, "official", "mvtec_ad", "msflow", "../../etc", 0)


# --------------------------------------------------------------------------- data folders


@pytest.fixture
def one_class(embedded_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(embedded_root / CLASS, root / CLASS)
    return root


def _in_thread(call, seconds: float = 30):
    """Run ``call`` in a daemon thread; fail if it has not returned within ``seconds``."""
    outcome: dict = {}

    def target():
        try:
            call()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{call} still blocked after {seconds} s"
    return outcome.get("error")


def test_a_fifo_named_like_an_image_is_refused_not_waited_on(one_class):
    os.mkfifo(one_class / CLASS / "train/good/zz.png")
    for call in (lambda: validate_class(one_class, CLASS), lambda: dataset_hash(one_class, CLASS)):
        error = _in_thread(call)
        assert isinstance(error, DatasetError) and "not a regular file" in str(error)


@pytest.mark.parametrize("kind", ["loop", "broken", "outside", "folder loop"])
def test_bad_links_in_a_class_folder_are_clear_errors(one_class, tmp_path, kind):
    good = one_class / CLASS / "train/good"
    if kind == "loop":
        os.symlink("zz.png", good / "zz.png")
    elif kind == "broken":
        os.symlink("does-not-exist.png", good / "zz.png")
    elif kind == "outside":
        (tmp_path / "elsewhere.png").write_bytes(next(good.iterdir()).read_bytes())
        os.symlink(tmp_path / "elsewhere.png", good / "zz.png")
    else:
        os.symlink("..", good / "again")
    error = _in_thread(lambda: validate_class(one_class, CLASS))
    assert isinstance(error, DatasetError)
    assert {"loop": "broken or looping", "broken": "broken or looping", "outside": "outside the dataset",
            "folder loop": "a loop"}[kind] in str(error)


def test_a_test_set_with_one_label_fails_validation_before_training(one_class):
    for defect in (one_class / CLASS / "test").iterdir():
        if defect.name != "good":
            shutil.rmtree(defect)
    shutil.rmtree(one_class / CLASS / "ground_truth")
    validate_class(one_class, CLASS)  # readable: the reader may serve such a set
    with pytest.raises(DatasetError, match="one kind of image only"):
        check_both_labels(one_class, CLASS)
    with pytest.raises(DatasetError, match="one kind of image only"):
        Trainer(spec(one_class, one_class.parent / "run"), settings())._setup()
    from harness import cli

    assert cli.main(["validate", str(one_class)]) == 2


def test_training_on_a_damaged_install_is_refused(embedded_root, tmp_path):
    from harness.synthetic import generate_embedded

    root = generate_embedded(tmp_path / "embedded", seed=0, classes=[CLASS])
    next((root / CLASS / "test/good").iterdir()).unlink()
    with pytest.raises(DatasetError, match="missing[\\s\\S]*Reinstall"):
        Trainer(spec(root, tmp_path / "run"), settings()).fit()
    generate_embedded(root, seed=0, classes=[CLASS])  # generated data is repaired by generating it
    assert dataset_hash(root, CLASS) == dataset_hash(embedded_root, CLASS)


def test_generate_removes_leftovers_of_dead_processes_and_takes_turns(tmp_path):
    from harness.synthetic import generate_embedded

    dead = tmp_path / f".embedded.tmp-{2**22 + 12345}"  # above the usual pid range: not alive
    dead.mkdir()
    errors = []

    def generate():
        try:
            generate_embedded(tmp_path / "embedded", seed=0, classes=[CLASS], n_train=4)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=generate) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and not dead.exists()
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name] == []


# --------------------------------------------------------------------------- outputs


def test_run_files_follow_the_umask(tmp_path):
    old = os.umask(0o002)
    try:
        atomic_write_json(tmp_path / "metrics.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "metrics.json").stat().st_mode) == 0o664


def test_an_unreachable_tracking_server_fails_in_seconds():
    import socket

    from harness.tracking import Tracker, TrackingError

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(TrackingError, match="not reachable"):
        Tracker(uri=f"http://127.0.0.1:{port}", experiment="x").start()
    assert time.monotonic() - start < 15


def test_an_unwritable_folder_is_reported_not_a_traceback(monkeypatch, capsys):
    from harness import cli

    def read_only(args):
        raise PermissionError(13, "Permission denied", "runs/msflow/x/.record.json.abc")

    monkeypatch.setitem(cli.COMMANDS, "tables", read_only)
    assert cli.main(["tables"]) == 2
    assert "cannot write runs/msflow/x/.record.json.abc: Permission denied" in capsys.readouterr().err


def test_display_flags_are_not_tracking_parameters(embedded_root, tmp_path):
    # MLflow refuses a changed parameter value when a run is resumed.
    quiet, shown = (Trainer(spec(embedded_root, tmp_path / "run"), settings(progress=p, figures=p))
                    for p in (False, True))
    assert quiet.tracking_params() == shown.tracking_params()
    assert "progress" not in json.dumps(quiet.tracking_params())
    amp = Trainer(spec(embedded_root, tmp_path / "run"), settings(precision="amp"))
    assert amp.tracking_params() != quiet.tracking_params()


def test_two_demos_started_at_once_take_turns(tmp_path, monkeypatch):
    from filelock import FileLock

    from harness import demo

    calls = []
    monkeypatch.setattr(demo, "reproduce", lambda out, **kw: calls.append(out))
    monkeypatch.setattr(demo, "init_project", lambda out: calls.append("init"))
    out = tmp_path / "demo"
    with FileLock(tmp_path / ".demo.lock"):  # the first demo, still running
        thread = threading.Thread(target=demo.run_demo, args=(out,), kwargs={"progress": False}, daemon=True)
        thread.start()
        time.sleep(1.0)
        assert calls == []  # the second waits instead of failing in `dvc init`
    thread.join(30)
    assert calls == ["init", out]
