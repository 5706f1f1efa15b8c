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
