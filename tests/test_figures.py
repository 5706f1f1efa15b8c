"""Figures: labelled map grids with images sampled across defect types, one colour scale, PDF and
200 dpi PNG; curves with their data as CSV; matplotlib only imported when a figure is drawn."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from harness import figures
from harness.figures import Sample

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def test_images_are_sampled_across_defect_types() -> None:
    defects = ["crack"] * 6 + ["good"] * 5 + ["hole"] * 3 + ["scratch"] * 2
    picks = figures.sample_across_defects(defects, count=8, good=2)
    chosen = [defects[i] for i in picks]
    assert len(picks) == len(set(picks)) == 8
    assert chosen.count("good") == 2 and {"crack", "hole", "scratch"} <= set(chosen)
    # one defect type and few images: the rest are good ones, never repeated
    assert sorted(figures.sample_across_defects(["good"] * 4 + ["cut"], count=8)) == [0, 1, 2, 3, 4]


def _png_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        return image.size


def _samples(n: int, rng: np.random.Generator) -> list[Sample]:
    out = []
    for i in range(n):
        mask = np.zeros((32, 32))
        mask[8:16, 8:16] = i % 2
        raw = rng.random((8, 8)).astype(np.float32)
        out.append(Sample(image=rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), mask=mask,
                          anomaly_map=raw, predicted=raw > 0.7, defect="good" if i % 2 == 0 else "crack",
                          name=f"{i:03d}.png", score=float(raw.max())))
    return out


def test_map_grid_is_labelled_and_written_as_pdf_and_200_dpi_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    paths = figures.map_grid(_samples(4, rng), tmp_path / "grid", title="washer")
    assert [p.suffix for p in paths] == [".png", ".pdf"]
    assert paths[1].read_bytes()[:5] == b"%PDF-"
    from PIL import Image

    with Image.open(paths[0]) as image:
        dpi = image.info.get("dpi")
    assert dpi is not None and round(dpi[0]) == figures.DPI
    width, height = _png_size(paths[0])
    assert width > 4 * 1.6 * 150 and height > 4 * 1.6 * 150  # four rows at 200 dpi
    # labels: the row names and each column's defect type, file and score
    samples = _samples(4, np.random.default_rng(0))
    fig = figures.map_grid_figure(samples, title="washer")
    texts = _texts(fig)
    assert {"image", "ground truth", "predicted mask\n(fair threshold)", "anomaly map"} <= texts
    assert f"crack\n001.png\nscore {samples[1].score:.3g}" in texts
    # one colour scale: every map panel is drawn on [0, 1]
    assert {im.get_clim() for ax in fig.axes for im in ax.get_images() if im.get_cmap().name == "jet"} == {(0, 1)}


def _texts(fig) -> set[str]:
    return {t for ax in fig.axes for t in (ax.get_title(), ax.get_ylabel())} | {fig.get_suptitle()}


def test_class_figure_has_a_row_per_method(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    samples = _samples(3, rng)
    methods = {"msflow": samples, "cflow": _samples(3, rng)}
    two = figures.class_figure([s.image for s in samples], [s.mask for s in samples],
                               ["crack\n000.png"] * 3, methods, tmp_path / "two", by_format=True)
    one = figures.class_figure([s.image for s in samples], [s.mask for s in samples],
                               ["crack\n000.png"] * 3, {"msflow": samples}, tmp_path / "one")
    assert two[0] == tmp_path / "png" / "two.png" and two[1] == tmp_path / "pdf" / "two.pdf"
    assert _png_size(two[0])[1] > _png_size(one[0])[1]  # one more row
    fig = figures.class_figure_figure([s.image for s in samples], [s.mask for s in samples],
                                      ["crack\n000.png"] * 3, methods)
    assert {"msflow", "cflow", "image", "ground truth"} <= _texts(fig)


def test_curves_come_with_their_data(tmp_path: Path) -> None:
    labels = np.r_[np.zeros(20), np.ones(20)]
    scores = labels + np.random.default_rng(0).normal(0, 0.7, 40)
    roc = figures.roc_figure(labels, scores, tmp_path / "roc", title="bottle")
    assert [p.suffix for p in roc] == [".png", ".pdf", ".csv"]
    with roc[2].open() as f:
        rows = list(csv.DictReader(f))
    assert set(rows[0]) == {"fpr", "tpr"} and float(rows[-1]["tpr"]) == 1.0
    fpr = np.linspace(0, 1, 200)
    pro = figures.pro_figure(fpr, np.sqrt(fpr), tmp_path / "pro")
    with pro[2].open() as f:
        rows = list(csv.DictReader(f))
    assert float(rows[-1]["fpr"]) == pytest.approx(figures.FPR_LIMIT)
    with pytest.raises(ValueError, match="both"):
        figures.roc_figure(np.zeros(5), np.zeros(5), tmp_path / "bad")


def test_a_run_without_figures_keeps_the_same_curve_data(tmp_path: Path) -> None:
    from harness import metrics as M

    rng = np.random.default_rng(1)
    labels = np.r_[np.zeros(4), np.ones(4)]
    masks = np.zeros((8, 16, 16), dtype=bool)
    masks[4:, 4:9, 4:9] = True
    maps = masks + rng.normal(0, 0.6, masks.shape)
    scores = maps.reshape(8, -1).max(1)
    written = figures.run_curves(tmp_path / "data", labels, scores, maps, masks)
    assert sorted(p.name for p in written) == ["pro_curve.csv", "roc_image.csv"]
    assert not list((tmp_path / "data").glob("*.p[nd][gf]"))  # nothing drawn
    drawn = tmp_path / "drawn"
    figures.roc_figure(labels, scores, drawn / "roc_image")
    figures.pro_figure(*M.pro_curve(masks, maps.astype(np.float32)), drawn / "pro_curve")
    for name in ("roc_image.csv", "pro_curve.csv"):
        assert (tmp_path / "data" / name).read_text() == (drawn / name).read_text()
    assert [p.name for p in figures.run_curves(tmp_path / "good", labels, scores, maps, np.zeros_like(masks))] \
        == ["roc_image.csv"]  # no PRO curve without defect pixels


def test_importing_figures_does_not_import_matplotlib() -> None:
    script = "import sys, harness.figures, harness.tracking; assert 'matplotlib' not in sys.modules"
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("setting, main, ablation", [("main", True, False), ("all", True, True), (True, True, True),
                                                     ("none", False, False), (False, False, False)])
def test_which_runs_draw_their_own_figures(setting, main: bool, ablation: bool) -> None:
    """runtime.figures: by default only the main comparison's runs draw; an ablation run is a
    table row (its maps are stored, and the figures stage draws from them)."""
    import yaml

    from harness import grid
    from harness.errors import ConfigError

    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    assert params["runtime"]["figures"] == "main"
    params["runtime"]["figures"] = setting
    main_run = grid.main_run(params, "official", "mvtec_ad", "msflow", "bottle", 0)
    ablation_run = grid.ablation_run(params, "pool_max", "bottle", 0)
    assert grid.run_settings(params, main_run).figures is main
    assert grid.run_settings(params, ablation_run).figures is ablation
    params["runtime"]["figures"] = "some"
    with pytest.raises(ConfigError, match="runtime.figures"):
        grid.run_settings(params, main_run)
