"""Fixtures shared across test files."""

from __future__ import annotations

import pytest

from harness.synthetic import generate_embedded


@pytest.fixture(scope="session")
def embedded_root(tmp_path_factory):
    """The embedded dataset (all classes, default settings), generated once per test session."""
    return generate_embedded(tmp_path_factory.mktemp("embedded") / "data", seed=0)
