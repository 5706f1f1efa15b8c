"""The pipeline: dvc.yaml expands to one stage per run of the grid in params.yaml, each stage
depends on its own settings only, and a tiny pipeline (the demo's machinery, one class, MSFlow
only, one epoch) runs end to end, does nothing the second time, and re-runs only the stage whose
setting changed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from harness import grid, repro

PROJECT = Path(__file__).resolve().parents[1]


def dvc(*args: str, cwd: Path) -> str:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=repro.dvc_environment(),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def stages() -> dict:
    """Every stage of the project's dvc.yaml, expanded with params.yaml, via DVC's Python API."""
    from dvc.repo import Repo

    with Repo(str(PROJECT)) as repo:
        return {stage.addressing: {
            "cmd": stage.cmd,
            "params": sorted(key for dep in stage.deps if hasattr(dep, "params") for key in dep.params),
            "deps": [str(Path(d.def_path)) for d in stage.deps if not hasattr(d, "params")],
            "outs": [str(o.def_path) for o in stage.outs],
        } for stage in repo.index.stages}


def test_dvc_yaml_expands_to_the_grid(stages):
    params = grid.load(PROJECT / "params.yaml")
    runs = list(grid.main_runs(params))
    train = [r for r in grid.ablation_runs(params) if r.variant in params["ablations"]["train"]]
    assert sum(name.startswith("main_") for name in stages) == len(runs)
    assert sum(name.startswith("ablation@") for name in stages) == len(train)
    assert "rescore" in stages
    assert {n for n in stages if n.startswith("prepare@")} == {f"prepare@{d}" for d in params["prepare"]}
    assert "tables" in stages and "verify" in stages
    assert "results/verify.json" in stages["verify"]["outs"] and "results/verify.json" in stages["tables"]["deps"]
    # 15 MVTec AD classes, the MTD class, 12 mSTC scenes; 2 protocols; 5 methods; seeds.
    n_classes = sum(len(c["classes"]) for c in params["datasets"].values())
    assert len(runs) == n_classes * 2 * len(params["methods"]) * len(params["seeds"])
    # every run folder is one stage's output, and the grid module agrees on where it is
    outs = {o for s in stages.values() for o in s["outs"]}
    assert {str(r.out_dir) for r in runs} <= outs
    assert {str(r.out_dir) for r in train} <= outs
    for name, stage in stages.items():
        if name.startswith(("main_", "ablation@")):
            assert stage["cmd"].endswith("--resume"), name


def test_each_run_depends_on_its_own_settings_only(stages):
    params = grid.load(PROJECT / "params.yaml")
    cflow = stages["main_mvtec_ad@official-cflow-bottle-0"]
    assert cflow["params"] == sorted(["methods.cflow.all", "methods.cflow.mvtec_ad", "protocols.official.settings",
                                      "protocols.official.methods.cflow", "runtime.precision", "runtime.pretrained",
                                      "runtime.weights"])
    assert "datasets/mvtec_ad/bottle" in cflow["deps"]
    assert "methods/cflow.py" in cflow["deps"] and "methods/msflow.py" not in cflow["deps"]
    unified = stages["main_mtd@unified-msflow-magnetic_tile-0"]
    assert "methods.msflow.mtd" in unified["params"] and "protocols.unified.methods.msflow" in unified["params"]
    pooling = stages["ablation@pool_max-screw-0"]
    assert "ablations.train.pool_max.set" in pooling["params"]
    assert not [p for p in pooling["params"] if p.startswith("ablations.train.") and "pool_max" not in p]
    assert not [p for p in pooling["params"] if p.startswith("methods.") and "msflow" not in p]
    rescore = stages["rescore"]
    assert "runs/main/official/mvtec_ad/msflow" in rescore["deps"]
    assert "ablations.rescore" in rescore["params"]
    rescored = [r for r in grid.ablation_runs(params) if r.variant in params["ablations"]["rescore"]]
    assert all(Path(rescore["outs"][0]) in r.out_dir.parents for r in rescored)


# --------------------------------------------------------------------------- a tiny pipeline

@pytest.fixture(scope="module")
def tiny_project(tiny_pipeline) -> Path:
    return tiny_pipeline


@pytest.mark.slow
def test_tiny_pipeline_runs_end_to_end(tiny_project):
    tables = tiny_project / "results"
    summary = (tables / "README.md").read_text()
    assert "DEMO" in summary and "random backbone weights" in summary
    assert (tables / "ablation_fusion.csv").exists() and (tables / "ablation_top_k.tex").exists()
    run = tiny_project / "runs/main/official/embedded/msflow/washer/seed-0"
    assert (run / "metrics.json").exists() and (run / "maps.npz").exists()
    assert not (run / "checkpoint.pt").exists()  # the demo keeps no checkpoints
    rescored = json.loads((tiny_project / "runs/rescored/full_mean/washer/seed-0/metrics.json").read_text())
    assert rescored["scoring"]["top_k"] == 1.0
    assert (tiny_project / "mlflow.db").exists()


MAIN_RUN = "msflow embedded/washer official seed 0"


@pytest.mark.slow
def test_mlflow_runs_have_readable_names_tags_and_no_duplicated_metrics(tiny_project):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{(tiny_project / 'mlflow.db').as_posix()}")
    runs = {e.name: client.search_runs([e.experiment_id]) for e in client.search_experiments() if e.name != "Default"}
    assert {name: len(found) for name, found in runs.items()} == {"demo/official": 1, "demo/ablations": 2}
    names = {r.info.run_name: r for found in runs.values() for r in found}
    assert set(names) == {MAIN_RUN, "msflow embedded/washer fusion_off seed 0",
                          "msflow embedded/washer rescored:full_mean seed 0"}
    main = names[MAIN_RUN]
    tags = main.data.tags
    assert {k: tags[k] for k in ("method", "dataset", "class", "protocol", "variant", "seed", "weights", "demo")} == {
        "method": "msflow", "dataset": "embedded", "class": "washer", "protocol": "official", "variant": "default",
        "seed": "0", "weights": "random", "demo": "true"}
    assert tags["code_revision"] and "random" in tags["mlflow.note.content"]
    metrics = main.data.metrics
    assert not [k for k in metrics if k.startswith("final_")]
    assert {"image_auroc", "miou_fair", "best_image_auroc", "best_image_auroc_epoch"} <= set(metrics)
    rescored = names["msflow embedded/washer rescored:full_mean seed 0"].data
    assert rescored.tags["variant"] == "full_mean" and rescored.tags["part"] == "rescored"
    assert set(rescored.metrics) >= {"image_auroc", "aupro"}
    # artifacts in the project's own folder, named relative to it
    artifacts = tiny_project / "mlartifacts" / "demo_official" / main.info.run_id / "artifacts"
    assert main.info.artifact_uri.startswith("mlflow-artifacts:/demo_official/")
    assert (artifacts / "figures" / "anomaly_maps.pdf").exists() and (artifacts / "run_record.json").exists()


@pytest.mark.slow
def test_dvc_shows_the_metrics_plots_and_experiments(tiny_project):
    metrics = json.loads(dvc("metrics", "show", "--json", cwd=tiny_project))
    files = metrics[""]["data"]  # "" = the workspace
    main = files["metrics/official-embedded-msflow-washer-seed-0.json"]["data"]
    run = json.loads((tiny_project / "runs/main/official/embedded/msflow/washer/seed-0/metrics.json").read_text())
    assert main["last"]["image_auroc"] == pytest.approx(run["last"]["image_auroc"])
    assert main["best_epoch"]["image_auroc"] == run["best"]["image_auroc"]["epoch"]
    assert "metrics/rescored_full_mean-embedded-msflow-washer-seed-0.json" in files
    plots = json.loads(dvc("plots", "show", "--json", cwd=tiny_project))["data"]
    assert {"plots/roc/official-embedded-msflow-washer-seed-0.csv", "plots/pro/fusion_off-embedded-msflow-washer-seed-0.csv",
            "figures/png/official-embedded-washer-seed-0.png"} <= set(plots)
    assert plots["figures/png/official-embedded-washer-seed-0.png"][0]["type"] == "image"
    assert (tiny_project / "figures/pdf/official-embedded-washer-seed-0.pdf").exists()
    # an experiment with one setting changed (the tables only), listed with its metrics
    dvc("exp", "run", "--set-param", "ablations.groups.fusion.title=Fusion", cwd=tiny_project)
    shown = dvc("exp", "show", "--csv", "--drop", ".*", "--keep",
                r"Experiment|.*official.*:last\.image_auroc$|ablations\.groups\.fusion\.title", cwd=tiny_project)
    header, *rows = [line.split(",") for line in shown.strip().splitlines()]
    assert header == ["Experiment", "metrics/official-embedded-msflow-washer-seed-0.json:last.image_auroc",
                      "ablations.groups.fusion.title"]
    titles = [row[-1] for row in rows]  # the workspace, the baseline commit, the experiment
    assert titles.count("Fusion flow") == 1 and titles.count("Fusion") >= 2
    assert all(float(row[1]) == pytest.approx(run["last"]["image_auroc"], abs=1e-5) for row in rows)
    assert "figures" in dvc("dag", "--md", cwd=tiny_project)


@pytest.mark.slow
def test_second_repro_does_nothing_and_a_change_reruns_only_its_stage(tiny_project):
    assert "up to date" in dvc("status", cwd=tiny_project)
    repro = dvc("repro", cwd=tiny_project)
    assert "Running stage" not in repro
    original = (tiny_project / "params.yaml").read_text()
    params = yaml.safe_load(original)
    params["ablations"]["train"]["fusion_off"]["set"]["clamp"] = 1.5
    (tiny_project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        changed = set(json.loads(dvc("status", "--json", cwd=tiny_project)))
    finally:  # the shared project stays as reproduced for the tests that copy it
        (tiny_project / "params.yaml").write_text(original)
    # the verdicts, tables, figures and metrics read every setting of the ablations, so they are rebuilt as well
    assert changed == {"ablation@fusion_off-washer-0", "verify", "tables", "figures", "metrics"}
    assert "up to date" in dvc("status", cwd=tiny_project)
