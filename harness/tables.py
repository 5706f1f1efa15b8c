"""Run results + published figures -> every table of the study, as CSV, LaTeX and Markdown.

Which runs a table expects comes from the grid in params.yaml (harness.grid), so a cell is either
a figure, "not run" (the grid has the run but it has not finished) or "not published" (no paper
figure exists for it). Conventions:

- Figures are x100. "last" (the final epoch) is the primary figure; "best" is the per-metric best
  epoch on the test set (what the papers report), labelled as such.
- A class mean is taken per seed, then mean ± standard deviation over seeds (when several ran).
  A mean over fewer classes than the grid holds says so: "[k/n]".
- Delta = our last-epoch figure minus the published one.

Tables (name -> what):
  main_<protocol>_<dataset>            every method, class means, ours next to published
  main_<protocol>_<dataset>_<metric>   per class, every method
  msflow_<dataset>_per_class           MSFlow per class: ours (last, best), paper, logged re-run
  ablation_<group>                     one MSFlow ablation (msflow.md 9.4) against the default
  cost                                 trainable parameters, compute, train and test speed
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness import grid
from harness.grid import GridRun

NOT_RUN = "not run"
NOT_PUBLISHED = "not published"
DEMO_NOTICE = (
    "Demo: procedurally generated embedded data and {weights}. These figures test "
    "the pipeline; they reproduce nothing and must not be compared with published numbers."
)
METRIC_LABELS = {
    "image_auroc": "Image AUROC",
    "pixel_auroc": "Pixel AUROC",
    "aupro": "AU-PRO (MVTec)",
    "aupro_code": "PRO (code)",
    "miou_fair": "mIoU (fair)",
    "miou_oracle": "mIoU (oracle)",
}
# The metrics each dataset's tables show (MTD: image level only, as published).
DATASET_METRICS = {
    "mtd": ["image_auroc"],
    "mstc": ["pixel_auroc", "image_auroc"],
}
DEFAULT_METRICS = ["image_auroc", "pixel_auroc", "aupro", "aupro_code"]
METHOD_LABELS = {"msflow": "MSFlow", "cflow": "CFlow-AD", "fastflow": "FastFlow", "csflow": "CS-Flow",
                 "uflow": "U-Flow", "patchcore": "PatchCore"}
LEGEND = (
    f"x100. last = final epoch (primary); best = best epoch per metric on the test set (as the "
    f"papers report). Delta = ours (last) - published. '{NOT_RUN}': in the grid, not finished; "
    f"'{NOT_PUBLISHED}': no published figure. [k/n]: mean over k of n classes; [k/n seeds]: k of n "
    "seeds finished."
)


# --------------------------------------------------------------------------- reading results


@dataclass
class RunResult:
    run: GridRun
    last: dict[str, float] = field(default_factory=dict)
    best: dict[str, float] = field(default_factory=dict)
    train_seconds_per_epoch: float = math.nan
    test_images_per_second: float = math.nan
    cost: dict[str, Any] = field(default_factory=dict)
    finished: bool = False
    weights: list[str] = field(default_factory=list)  # "backbone: label" from record.json


def read_run(run: GridRun) -> RunResult:
    path = run.out_dir / "metrics.json"
    if not path.exists():
        return RunResult(run)
    summary = json.loads(path.read_text())
    history = summary.get("history") or []
    result = RunResult(
        run,
        last={k: float(v) for k, v in (summary.get("last") or {}).items() if isinstance(v, (int, float))},
        best={k: float(v["value"]) for k, v in (summary.get("best") or {}).items()},
        train_seconds_per_epoch=_mean(r.get("train_seconds") for r in history),
        test_images_per_second=_mean(r.get("test_images_per_second") for r in history),
        finished=True,
    )
    cost_path = run.out_dir / grid.COST
    if cost_path.exists():
        result.cost = json.loads(cost_path.read_text())
    record_path = run.out_dir / "record.json"
    if record_path.exists():
        used = json.loads(record_path.read_text()).get("weights") or []
        result.weights = [f"{w['backbone']}: {w['label']}" for w in used if isinstance(w, dict)]
    return result


def weights_in_use(params: dict[str, Any], results: list[RunResult]) -> tuple[str, str]:
    """(short, full) description of the backbone weights behind the tables: from the runs' records,
    or, before any run recorded them, from params.yaml runtime.pretrained."""
    used = sorted({w for r in results for w in r.weights})
    if not used:
        pretrained = bool((params.get("runtime") or {}).get("pretrained", True))
        return ("pretrained weights", "pretrained backbone weights") if pretrained else \
            ("random weights", "random backbone weights")
    random = [w for w in used if w.endswith(": random")]
    short = "random weights" if len(random) == len(used) else \
        "pretrained weights" if not random else "pretrained and random weights"
    full = ("random backbone weights" if len(random) == len(used) else
            "backbone weights " + "; ".join(used))
    return short, full


def _mean(values: Iterable[Any]) -> float:
    kept = [float(v) for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    return float(np.mean(kept)) if kept else math.nan


def load_published(folder: Path) -> pd.DataFrame:
    """Every published figure (results/published/*.csv), long format."""
    frames = [pd.read_csv(p) for p in sorted(Path(folder).glob("*.csv"))]
    if not frames:
        return pd.DataFrame(columns=["dataset", "method", "class", "metric", "value", "epoch_selection",
                                     "setting", "reference", "source", "note"])
    return pd.concat(frames, ignore_index=True)


def published_figure(published: pd.DataFrame, dataset: str, method: str, class_name: str,
                     metric: str) -> float | None:
    """The figure a table compares with: the row marked ``reference`` (the method's own paper)."""
    rows = published[(published["dataset"] == dataset) & (published["method"] == method)
                      & (published["class"] == class_name) & (published["metric"] == metric)
                      & published["reference"].astype(bool)]
    return float(rows["value"].iloc[0]) if len(rows) else None


# --------------------------------------------------------------------------- statistics and cells


@dataclass
class Stat:
    """A figure over seeds (each a class mean, or one class): mean, std, and coverage."""

    mean: float = math.nan
    std: float = math.nan
    seeds: int = 0
    classes: int = 0  # classes behind the mean (the smallest count over seeds)
    expected_classes: int = 0
    expected_seeds: int = 0

    @property
    def missing(self) -> bool:
        return self.seeds == 0


def class_mean_stat(results: list[RunResult], metric: str, which: str = "last") -> Stat:
    """Per seed: mean over the classes that finished; then mean and std over seeds."""
    by_seed: dict[str, list[float]] = {}
    expected = len({r.run.class_name for r in results})
    expected_seeds = len({str(r.run.seed) for r in results})
    for r in results:
        value = getattr(r, which).get(metric)
        if r.finished and value is not None and not math.isnan(value):
            by_seed.setdefault(str(r.run.seed), []).append(value)
    if not by_seed:
        return Stat(expected_classes=expected, expected_seeds=expected_seeds)
    means = [float(np.mean(v)) for v in by_seed.values()]
    return Stat(float(np.mean(means)), float(np.std(means, ddof=1)) if len(means) > 1 else math.nan,
                len(means), min(len(v) for v in by_seed.values()), expected, expected_seeds)


def cell(stat: Stat) -> str:
    if stat.missing:
        return NOT_RUN
    text = f"{100 * stat.mean:.2f}"
    if stat.seeds > 1:
        text += f" ± {100 * stat.std:.2f}"
    if stat.classes < stat.expected_classes:
        text += f" [{stat.classes}/{stat.expected_classes}]"
    if stat.seeds < stat.expected_seeds:
        text += f" [{stat.seeds}/{stat.expected_seeds} seeds]"
    return text


def published_cell(value: float | None) -> str:
    return NOT_PUBLISHED if value is None else f"{value:.2f}"


def delta_cell(stat: Stat, published: float | None) -> str:
    if published is None:
        return NOT_PUBLISHED
    if stat.missing:
        return NOT_RUN
    return f"{100 * stat.mean - published:+.2f}"


# --------------------------------------------------------------------------- a table and its files


@dataclass
class Table:
    name: str
    title: str
    frame: pd.DataFrame  # strings; index = row labels
    caption: str = ""


def _latex_escape(text: str) -> str:
    text = str(text)
    for char, repl in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("$", r"\$"),
                       ("#", r"\#"), ("_", r"\_"), ("{", r"\{"), ("}", r"\}"), ("~", r"\textasciitilde{}"),
                       ("^", r"\textasciicircum{}")):
        text = text.replace(char, repl)
    return text.replace("±", r"$\pm$").replace("Δ", r"$\Delta$").replace("†", r"$^\dagger$")


def to_latex(table: Table, demo: str) -> str:
    """A booktabs table ready for a paper: escaped text, caption (with the demo notice when it
    applies) and a label."""
    frame = table.frame.copy()
    frame.index = [_latex_escape(i) for i in frame.index]
    frame.index.name = _latex_escape(table.frame.index.name or "")
    if isinstance(frame.columns, pd.MultiIndex):
        frame.columns = pd.MultiIndex.from_tuples([tuple(_latex_escape(c) for c in col) for col in frame.columns])
    else:
        frame.columns = [_latex_escape(c) for c in frame.columns]
    frame = frame.map(_latex_escape)
    caption = _latex_escape(f"{demo} " if demo else "") + _latex_escape(f"{table.title}. {table.caption} {LEGEND}")
    styler = frame.style
    return styler.to_latex(
        caption=caption, label=f"tab:{table.name}", hrules=True, position="htbp",
        column_format="l" * frame.index.nlevels + "r" * frame.shape[1], multicol_align="c",
        position_float="centering",
    )


def write_table(table: Table, out: Path, demo: str, short: str = "") -> str:
    """CSV and LaTeX files; returns the Markdown section for the summary."""
    out.mkdir(parents=True, exist_ok=True)
    table.frame.to_csv(out / f"{table.name}.csv")
    (out / f"{table.name}.tex").write_text(to_latex(table, demo))
    frame = table.frame.copy()
    if isinstance(frame.columns, pd.MultiIndex):
        frame.columns = [" ".join(str(c) for c in col if c) for col in frame.columns]
    markdown = frame.to_markdown(disable_numparse=True)  # keep the figures exactly as formatted
    prefix = f"Demo data, {short}. " if demo else ""
    return (f"### {table.title}\n\n{prefix}{table.caption}\n"
            f"Files: [{table.name}.csv]({table.name}.csv), [{table.name}.tex]({table.name}.tex)\n\n{markdown}\n")


# --------------------------------------------------------------------------- the tables


def _metrics_of(dataset: str) -> list[str]:
    return DATASET_METRICS.get(dataset, DEFAULT_METRICS)


def _label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def main_tables(params: dict[str, Any], results: list[RunResult], published: pd.DataFrame) -> list[Table]:
    tables = []
    for dataset, card in (params.get("datasets") or {}).items():
        classes = list(card.get("classes") or [])
        if not classes:
            continue
        label = card.get("label", dataset)
        metrics = _metrics_of(dataset)
        for protocol in params.get("protocols") or {}:
            runs = [r for r in results if r.run.part == "main" and r.run.dataset == dataset
                    and r.run.protocol == protocol]
            methods = list(params.get("methods") or {})
            rows = {}
            for method in methods:
                mine = [r for r in runs if r.run.method == method]
                row = {}
                for metric in metrics:
                    last, best = class_mean_stat(mine, metric), class_mean_stat(mine, metric, "best")
                    pub = published_figure(published, dataset, method, "mean", metric)
                    name = METRIC_LABELS[metric]
                    row[(name, "last")] = cell(last)
                    row[(name, "best†")] = cell(best)
                    row[(name, "published")] = published_cell(pub)
                    row[(name, "Δ")] = delta_cell(last, pub)
                rows[_label(method)] = row
            frame = pd.DataFrame.from_dict(rows, orient="index")
            frame.columns = pd.MultiIndex.from_tuples(frame.columns)
            frame.index.name = "method"
            tables.append(Table(
                f"main_{protocol}_{dataset}", f"{label}, {protocol} protocol: class means",
                frame, f"Mean over {len(classes)} classes; † best epoch on the test set."
                + (" mSTC: one model per scene (per_scene protocol)." if dataset == "mstc" else ""),
            ))
            if len(classes) > 1:
                tables += per_class_tables(dataset, label, protocol, classes, methods, metrics, runs, published)
    return tables


def per_class_tables(dataset: str, label: str, protocol: str, classes: list[str], methods: list[str],
                     metrics: list[str], runs: list[RunResult], published: pd.DataFrame) -> list[Table]:
    tables = []
    for metric in metrics:
        rows = {}
        for class_name in [*classes, "mean"]:
            row = {}
            for method in methods:
                mine = [r for r in runs if r.run.method == method
                        and (class_name == "mean" or r.run.class_name == class_name)]
                stat = class_mean_stat(mine, metric)
                pub = published_figure(published, dataset, method, class_name, metric)
                row[(_label(method), "last")] = cell(stat)
                row[(_label(method), "published")] = published_cell(pub)
                row[(_label(method), "Δ")] = delta_cell(stat, pub)
            rows[class_name] = row
        frame = pd.DataFrame.from_dict(rows, orient="index")
        frame.columns = pd.MultiIndex.from_tuples(frame.columns)
        frame.index.name = "class"
        tables.append(Table(f"main_{protocol}_{dataset}_{metric}",
                            f"{label}, {protocol} protocol: {METRIC_LABELS[metric]} per class", frame,
                            "Last epoch; published = the method's own paper where it gives the class."))
    return tables


def msflow_tables(params: dict[str, Any], results: list[RunResult], published: pd.DataFrame) -> list[Table]:
    """MSFlow per class (official protocol): ours (last, best) next to the paper and the
    authors' logged re-run (last and best epoch)."""
    tables = []
    for dataset, card in (params.get("datasets") or {}).items():
        classes = list(card.get("classes") or [])
        if not classes or "msflow" not in (params.get("methods") or {}):
            continue
        runs = [r for r in results if r.run.part == "main" and r.run.dataset == dataset
                and r.run.protocol == grid.REFERENCE_PROTOCOL and r.run.method == "msflow"]
        logged = published[(published["dataset"] == dataset) & (published["method"] == "msflow")
                           & published["source"].str.contains("log_", regex=False)]
        rows = {}
        for class_name in [*classes, "mean"]:
            mine = [r for r in runs if class_name == "mean" or r.run.class_name == class_name]
            row = {}
            for metric in _metrics_of(dataset):
                name = METRIC_LABELS[metric]
                last, best = class_mean_stat(mine, metric), class_mean_stat(mine, metric, "best")
                pub = published_figure(published, dataset, "msflow", class_name, metric)
                log = {sel: logged[(logged["class"] == class_name) & (logged["metric"] == metric)
                                   & (logged["epoch_selection"] == sel)]["value"] for sel in ("last", "best")}
                row[(name, "ours last")] = cell(last)
                row[(name, "ours best†")] = cell(best)
                row[(name, "paper")] = published_cell(pub)
                row[(name, "log last")] = published_cell(float(log["last"].iloc[0]) if len(log["last"]) else None)
                row[(name, "log best†")] = published_cell(float(log["best"].iloc[0]) if len(log["best"]) else None)
                row[(name, "Δ")] = delta_cell(last, pub)
            rows[class_name] = row
        frame = pd.DataFrame.from_dict(rows, orient="index")
        frame.columns = pd.MultiIndex.from_tuples(frame.columns)
        frame.index.name = "class"
        tables.append(Table(f"msflow_{dataset}_per_class", f"MSFlow on {card.get('label', dataset)}, per class",
                            frame, "Official protocol. paper = README / paper table (best epoch); log = the "
                            "authors' shipped training log (msflow.md 9.3); † best epoch on the test set."))
    return tables


def ablation_tables(params: dict[str, Any], results: list[RunResult], published: pd.DataFrame) -> list[Table]:
    ablations = params.get("ablations") or {}
    classes = list(ablations.get("classes") or [])
    if not classes:
        return []
    dataset = ablations.get("dataset", "mvtec_ad")
    reference = [r for r in results if r.run.part == "main" and r.run.method == grid.REFERENCE_METHOD
                 and r.run.protocol == grid.REFERENCE_PROTOCOL and r.run.dataset == dataset
                 and r.run.class_name in classes]
    metrics = _metrics_of(dataset)
    variants = {**(ablations.get("train") or {}), **(ablations.get("rescore") or {})}
    tables = []
    for group, meta in (ablations.get("groups") or {}).items():
        members = [(name, v) for name, v in variants.items() if v.get("group") == group]
        if not members:
            continue
        rows = {}
        for name, label, runs, pub_setting in [("default", f"{meta.get('default', 'default')} (default)",
                                                reference, None),
                                               *[(n, v.get("label", n), [r for r in results if r.run.variant == n],
                                                  v.get("set")) for n, v in members]]:
            row = {}
            image_last = None
            for metric in metrics:
                stat = class_mean_stat(runs, metric)
                row[METRIC_LABELS[metric]] = cell(stat)
                if metric == "image_auroc":
                    image_last = stat
            whole = set(classes) >= set(params["datasets"].get(dataset, {}).get("classes") or [])
            pub = _ablation_published(published, dataset, name, pub_setting, whole)
            row["published (image AUROC)"] = published_cell(pub)
            row["Δ image AUROC"] = delta_cell(image_last, pub) if image_last is not None else NOT_RUN
            rows[label] = row
        frame = pd.DataFrame.from_dict(rows, orient="index")
        frame.index.name = meta.get("title", group)
        how = "re-scored from the default run's stored maps" if group in {
            v.get("group") for v in (ablations.get("rescore") or {}).values()} else "retrained"
        tables.append(Table(f"ablation_{group}", f"MSFlow ablation: {meta.get('title', group)}", frame,
                            f"Mean over {len(classes)} classes of {dataset}, last epoch; variants {how}. "
                            "The paper's ablation tables were not available: only the full-mean image score "
                            "(86.46) and the headline figures are published."))
    return tables


def _ablation_published(published: pd.DataFrame, dataset: str, name: str, setting: dict | None,
                        whole_dataset: bool) -> float | None:
    """The published image AUROC of an ablation row, where one exists (msflow.md 9.4): the
    default row's headline and the full-mean score, both means over the whole dataset."""
    if not whole_dataset:
        return None
    rows = published[(published["dataset"] == dataset) & (published["method"] == "msflow")
                     & (published["class"] == "mean") & (published["metric"] == "image_auroc")]
    if name == "default":
        rows = rows[rows["reference"].astype(bool) & ~rows["setting"].astype(str).str.contains("ablation")]
    elif setting and setting.get("top_k") == 1.0:
        rows = rows[rows["setting"].astype(str).str.contains("top_k = 1.0", regex=False)]
    else:
        return None
    return float(rows["value"].iloc[0]) if len(rows) else None


def cost_table(params: dict[str, Any], results: list[RunResult]) -> Table | None:
    """Size, compute and speed of every method (main official runs of the ablation dataset) and
    of every retrained ablation variant."""
    ablations = params.get("ablations") or {}
    dataset = ablations.get("dataset", "mvtec_ad")
    entries: list[tuple[str, list[RunResult]]] = []
    for method in params.get("methods") or {}:
        entries.append((_label(method), [r for r in results if r.run.part == "main" and r.run.method == method
                                         and r.run.protocol == grid.REFERENCE_PROTOCOL and r.run.dataset == dataset]))
    for name, v in (ablations.get("train") or {}).items():
        entries.append((f"MSFlow, {v.get('group', '')}: {v.get('label', name)}",
                        [r for r in results if r.run.variant == name]))
    rows = {}
    for label, runs in entries:
        done = [r for r in runs if r.finished]
        costed = [r.cost for r in done if r.cost]
        row: dict[str, str] = {}
        if costed:
            # Classes may differ in input size (MSFlow's transistor): report the most common size.
            sizes = [tuple(c["input_size"]) for c in costed]
            common = max(set(sizes), key=sizes.count)
            c = costed[sizes.index(common)]
            row["input (H×W)"] = f"{common[0]}×{common[1]}"
            row["trainable params (M)"] = f"{c['trainable_parameters']['total'] / 1e6:.2f}"
            row["GFLOPs flows"] = f"{c['gflops']['flows']:.2f}"
            row["GFLOPs backbone"] = f"{c['gflops']['backbone']:.2f}"
        else:
            for key in ("input (H×W)", "trainable params (M)", "GFLOPs flows", "GFLOPs backbone"):
                row[key] = NOT_RUN
        speed_train = _mean(r.train_seconds_per_epoch for r in done)
        speed_test = _mean(r.test_images_per_second for r in done)
        row["train s/epoch"] = NOT_RUN if math.isnan(speed_train) else f"{speed_train:.2f}"
        row["test images/s"] = NOT_RUN if math.isnan(speed_test) else f"{speed_test:.1f}"
        row["classes"] = f"{len(done)}/{len(runs)}"
        rows[label] = row
    if not rows:
        return None
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "configuration"
    device = params.get("runtime", {}).get("device", "auto")
    return Table("cost", "Cost: size, compute and speed", frame,
                 f"GFLOPs = 2 x multiply-accumulates of one forward pass per image (torch FlopCounterMode; "
                 f"papers often call the multiply-accumulates FLOPs). Speeds measured in the runs on {dataset} "
                 f"(device setting: {device}; see each run's record.json), averaged over classes: training "
                 "seconds per epoch (features cached where the method allows) and test images per second "
                 "(evaluation including scoring).")


# --------------------------------------------------------------------------- entry point


def collect(params: dict[str, Any]) -> list[RunResult]:
    return [read_run(run) for run in [*grid.main_runs(params), *grid.ablation_runs(params)]]


def build_tables(params_path: Path | str = grid.PARAMS, out: Path | None = None) -> list[Path]:
    """Write every table (CSV + LaTeX) and README.md (Markdown summary) to ``out`` (default:
    params.yaml paths.tables); returns the CSV paths."""
    params = grid.load(Path(params_path))
    demo = params.get("profile") == "demo"
    out = Path(out or params.get("paths", {}).get("tables", "results/tables"))
    published = load_published(Path(params.get("paths", {}).get("published", "results/published")))
    results = collect(params)
    tables = [*main_tables(params, results, published), *msflow_tables(params, results, published),
              *ablation_tables(params, results, published)]
    cost = cost_table(params, results)
    if cost is not None:
        tables.append(cost)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.csv"), *out.glob("*.tex")]:
        stale.unlink()  # tables of settings no longer in the grid must not linger
    short, weights = weights_in_use(params, results)
    notice = DEMO_NOTICE.format(weights=weights) if demo else ""
    sections = [write_table(t, out, notice, short) for t in tables]
    finished = sum(r.finished for r in results)
    title = f"# Tables (DEMO: embedded data, {short})" if demo else "# Tables"
    header = [title, ""]
    if demo:
        header += [f"**{notice}**", ""]
    else:
        header += [f"Backbone weights of these runs: {weights}.", ""]
    header += [f"Generated by `python -m harness tables` from {finished} of {len(results)} runs of the grid "
               "in params.yaml and the published figures in results/published/.", "", LEGEND, "",
               "Contents: " + ", ".join(f"[{t.title}](#{_anchor(t.title)})" for t in tables), ""]
    (out / "README.md").write_text("\n".join(header) + "\n" + "\n".join(sections))
    return [out / f"{t.name}.csv" for t in tables]


def _anchor(title: str) -> str:
    """GitHub's heading anchor for a Markdown title."""
    return re.sub(r"[^a-z0-9 _-]", "", title.lower()).replace(" ", "-")
