"""Fixtures shared across test files."""

from __future__ import annotations

import pytest

from harness.config import RunSettings, RunSpec
from harness.synthetic import generate_embedded
from harness.train import Trainer


@pytest.fixture(scope="session")
def embedded_root(tmp_path_factory):
    """The embedded dataset (all classes, default settings), generated once per test session."""
    return generate_embedded(tmp_path_factory.mktemp("embedded") / "data", seed=0)


@pytest.fixture(scope="session")
def train_small(embedded_root, tmp_path_factory):
    """``train_small(method, class_name, overrides, **settings) -> (trainer, summary)``: a short run
    of a method on one embedded class through the shared loop, with random backbone weights, on
    the CPU, seed 0, without tracking or figures (``settings`` override any of these)."""

    def train(method: str, class_name: str, overrides: dict, **settings):
        spec = RunSpec(method=method, data_root=embedded_root, class_name=class_name,
                       out_dir=tmp_path_factory.mktemp(method) / "run", overrides=overrides)
        base = dict(device="cpu", pretrained=False, progress=False, tracking=False, figures=False, seed=0,
                    workers=0)
        trainer = Trainer(spec, RunSettings(**{**base, **settings}))
        return trainer, trainer.fit()

    return train


TINY_PIPELINE_MSFLOW = {"backbone": "resnet18.tv_in1k", "input_size": [32, 32], "input_size_overrides": {},
                        "parallel_blocks": [1, 1, 1], "batch_size": 20, "meta_epochs": 1, "sub_epochs": 1,
                        "warmup_meta_epochs": 0}


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """The demo's DVC project cut down to one class, MSFlow only, one epoch, reproduced once (the
    training runs side by side, as in the demo). Tests that change it say so; others copy it."""
    import yaml

    from harness import demo, repro

    out = tmp_path_factory.mktemp("pipeline") / "demo"
    demo.init_project(out, methods=["msflow"])
    params = yaml.safe_load((out / "params.yaml").read_text())
    params["datasets"]["embedded"]["classes"] = ["washer"]
    params["methods"]["msflow"]["all"] = dict(TINY_PIPELINE_MSFLOW)
    params["protocols"] = {"official": params["protocols"]["official"]}
    params["ablations"]["classes"] = ["washer"]
    params["ablations"]["train"] = {"fusion_off": params["ablations"]["train"]["fusion_off"]}
    params["ablations"]["rescore"] = {"full_mean": params["ablations"]["rescore"]["full_mean"]}
    (out / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    repro.reproduce(out, jobs=2, progress=False)
    demo.commit(out, "tiny pipeline")  # the baseline `dvc exp` compares with, as `flowad demo` does
    return out
