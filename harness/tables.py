"""Run results, verdicts and published figures -> the study's tables, as CSV, LaTeX and Markdown.

Layout follows the papers' comparison tables: one table per metric with classes as rows and
methods as columns, a compact summary, one row per variant in the ablation tables. Every figure
is in percent; "last" (the final epoch) is the primary figure, "best†" the per-metric best epoch on
the test set (what the papers report). Which runs a table expects comes from the grid in
params.yaml, so a cell is a figure, "not run" (in the grid, not finished) or "–" (no published
figure). Each published figure carries a note letter naming its source and setting; its verdict
and delta come from `flowad verify` (harness.verify), whose outputs the tables read.

A LaTeX file is a booktabs table at \\small (\\footnotesize where \\small would not fit) that
fits an article's text width; a table too wide for either is split into stacked tabulars, each
with the row labels. CSV files have one header row and numeric columns hold numbers only.

Tables (name -> what):
  summary_<protocol>                   class means of every method on every dataset
  main_official_<dataset>              headline figures next to published: delta, tolerance, verdict
  main_<protocol>_<dataset>_<metric>   per class, every method (official: with published); a method's own
                                       metric (CFlow's aupro_cflow) with that method only
  main_official_<dataset>_miou         mIoU class means against published: the likelihood map's of every
                                       method, U-Flow's NFA segmentation's beside it
  uflow_<dataset>_miou_per_class       U-Flow per class: likelihood-map and NFA mIoU side by side
  msflow_<dataset>_per_class           MSFlow per class: ours (last, best), README, the authors' log
  ablation_<group>                     one MSFlow ablation (msflow.md 9.4), a row per variant
  claims                               the paper's ablation claims with verdicts
  cost, fusion_cost                    size, compute and speed; the fusion flow vs CS-Flow's flows
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from harness import grid
from harness.results import RunResult, Stat, class_mean_stat, collect, random_weight_runs, weights_in_use
from harness.verify import FIGURE_VERDICTS, FINAL_MODEL_METRICS, load_published, read_report

NOT_RUN = "not run"
NOT_PUBLISHED = "–"
DEMO_NOTICE = ("Demo: procedurally generated embedded data, tiny budgets. These figures test "
               "the pipeline; they reproduce nothing and must not be compared with published numbers.")
RANDOM_NOTICE = ("Random backbone weights in {n} of the runs: their figures test the pipeline and reproduce "
                 "nothing.")
METRIC_LABELS = {"image_auroc": "Image AUROC", "pixel_auroc": "Pixel AUROC", "aupro": "AU-PRO (MVTec)",
                 "aupro_code": "PRO (code)", "aupro_cflow": "PRO (CFlow code)",
                 "miou_fair": "mIoU (map, fair)", "miou_oracle": "mIoU (map, oracle)",
                 "miou_nfa_fair": "mIoU (NFA, fair)", "miou_nfa_oracle": "mIoU (NFA, oracle)"}
SHORT_METRIC = {"image_auroc": "Image", "pixel_auroc": "Pixel", "aupro": "AU-PRO", "aupro_code": "PRO (code)",
                "aupro_cflow": "PRO (CFlow)"}
DATASET_METRICS = {"mtd": ["image_auroc"], "mstc": ["pixel_auroc", "image_auroc"]}
DEFAULT_METRICS = ["image_auroc", "pixel_auroc", "aupro", "aupro_code"]
# A method's own metrics (its extra_metrics), shown for that method only, on the datasets with the
# localisation metrics (DEFAULT_METRICS): CFlow-AD's PRO in its own code's convention, the one its
# published PRO figures use.
METHOD_METRICS = {"cflow": ["aupro_cflow"]}
# The mIoU tables (datasets with the localisation metrics): the likelihood map's mIoU of every
# method and, for the methods with an a contrario (NFA) segmentation, the NFA one beside it.
MIOU_METRICS = ["miou_fair", "miou_oracle"]
MIOU_NFA = {"miou_fair": "miou_nfa_fair", "miou_oracle": "miou_nfa_oracle"}
NFA_METHODS = ("uflow",)
MIOU_COLUMNS = {"miou_fair": ("fair", "map"), "miou_nfa_fair": ("fair", "NFA"), "miou_oracle": ("oracle", "map"),
                "miou_nfa_oracle": ("oracle", "NFA")}  # (group, column) in the per-class table
METHOD_LABELS = {"msflow": "MSFlow", "cflow": "CFlow-AD", "fastflow": "FastFlow", "csflow": "CS-Flow",
                 "uflow": "U-Flow", "patchcore": "PatchCore"}
# What fits: an article's \textwidth (345 pt at 10 pt), with a margin for the estimate.
TEXT_WIDTH_PT = 340.0
CHAR_PT = {"small": 4.5, "footnotesize": 4.0}  # a generous mean glyph width (digits are 4.5 / 4.0 pt)
COLUMN_SEP_PT = 8.0  # 2 x \tabcolsep, set to 4 pt


# --------------------------------------------------------------------------- cells


def cell(stat: Stat) -> str:
    if stat.missing:
        return NOT_RUN
    text = f"{stat.mean:.2f}"
    if stat.seeds > 1:
        text += f" ± {stat.std:.2f}"
    if stat.classes < stat.expected_classes:
        text += f" [{stat.classes}/{stat.expected_classes}]"
    if stat.seeds < stat.expected_seeds:
        text += f" [{stat.seeds}/{stat.expected_seeds} seeds]"
    return text


def _number(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _fmt(value: float, signed: bool = False) -> str:
    if value is None or math.isnan(value):
        return NOT_PUBLISHED
    return f"{value:+.2f}" if signed else f"{value:.2f}"


# --------------------------------------------------------------------------- a table


@dataclass
class Table:
    """Rows of display strings under (group, column) headers, with the numbers behind them.

    ``values`` holds the CSV: one header row, numeric columns numeric (NaN where a display cell
    says "not run" or "–"), text columns (verdicts, labels) text."""

    name: str
    caption: str
    row_header: str
    columns: list[tuple[str, str]] = field(default_factory=list)  # (group, column); group "" = none
    rows: list[tuple[str, list[str]]] = field(default_factory=list)  # (label, cells); label "" + 1 cell = section
    values: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    label_width_pt: float | None = None  # a paragraph column for long labels (the claims)

    def add(self, label: str, cells: list[str], values: dict[str, Any] | None = None) -> None:
        self.rows.append((label, cells))
        if values is not None:
            self.values.append({self.row_header: label, **values})

    def section(self, title: str) -> None:
        self.rows.append(("", [title]))

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.values)

    def display(self) -> pd.DataFrame:
        """The rows as one frame; a section's title prefixes the labels of its rows."""
        body, section = [], ""
        for label, cells in self.rows:
            if not label and len(cells) == 1:
                section = cells[0]
            else:
                body.append((f"{section}: {label}" if section else label, cells))
        names = [" ".join(p for p in col if p) for col in self.columns]
        return pd.DataFrame([cells for _, cells in body], index=[label for label, _ in body], columns=names)


class Notes:
    """Note letters for the published figures of one table: one per distinct source and setting."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def mark(self, text: str) -> str:
        if text not in self.texts:
            self.texts.append(text)
        return "abcdefghijklmnopqrstuvwxyz"[self.texts.index(text) % 26]

    def lines(self) -> list[str]:
        return [f"({'abcdefghijklmnopqrstuvwxyz'[i % 26]}) {t}" for i, t in enumerate(self.texts)]


def source_note(row: pd.Series | dict[str, Any]) -> str:
    setting = ", ".join(p for p in (str(row.get("backbone") or "backbone not stated"),
                                    f"{row['input_size']} px" if row.get("input_size") else "",
                                    f"{row['epoch_selection']} epoch") if p)
    kind = row["source_kind"]
    if kind == "derived" and str(row.get("note") or "").startswith("derived"):
        kind = row["note"]  # says how it was derived
    # The CSVs point to the specification section each figure was taken from; the tables name
    # the publication only.
    source = re.sub(r"\s*\[[a-z_]+\.md[^\]]*\]", "", str(row["source"]))
    return f"{source}; {kind}; {setting}"


# --------------------------------------------------------------------------- LaTeX


_ESCAPES = (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("$", r"\$"), ("#", r"\#"), ("_", r"\_"),
            ("{", r"\{"), ("}", r"\}"), ("~", r"\textasciitilde{}"), ("^", r"\textasciicircum{}"))


def latex_escape(text: str) -> str:
    text = str(text)
    for char, repl in _ESCAPES:
        text = text.replace(char, repl)
    text = (text.replace("±", r"$\pm$").replace("Δ", r"$\Delta$").replace("†", r"$^\dagger$")
            .replace("×", r"$\times$").replace("–", "--"))
    # A note letter: "99.40^a" is written "99.40 (a)" in Markdown; in LaTeX a superscript.
    text = re.sub(r" \(([a-z])\)$", r"\\textsuperscript{\1}", text)
    # "[2,5,8]" first in a row would be read as the optional argument of \\ or \midrule.
    return "{}" + text if text.startswith("[") else text


def _width(text: str, size: str) -> float:
    text = re.sub(r" \([a-z]\)$", "x", str(text))
    return len(text) * CHAR_PT[size] + COLUMN_SEP_PT


def _chunks(table: Table, size: str) -> list[list[int]] | None:
    """Column indices per stacked tabular, keeping groups together, or None if a group alone
    does not fit."""
    body = [cells for label, cells in table.rows if label or len(cells) != 1]
    label_w = table.label_width_pt + COLUMN_SEP_PT if table.label_width_pt else max(
        [_width(table.row_header, size), *(_width(label, size) for label, _ in table.rows if label)])
    widths = [max([_width(col[1], size), *(_width(c[i], size) for c in body)]) for i, col in enumerate(table.columns)]
    groups: list[list[int]] = []
    for i, (group, _) in enumerate(table.columns):
        if groups and group and table.columns[groups[-1][0]][0] == group:
            groups[-1].append(i)
        else:
            groups.append([i])
    chunks: list[list[int]] = [[]]
    current = 0.0  # of the last chunk: its groups, each as wide as its columns or its header
    for members in groups:
        need = max(sum(widths[i] for i in members), _width(table.columns[members[0]][0], size))
        if label_w + need > TEXT_WIDTH_PT:
            return None
        if chunks[-1] and label_w + current + need > TEXT_WIDTH_PT:
            chunks.append([])
            current = 0.0
        chunks[-1].extend(members)
        current += need
    return chunks


def _tabular(table: Table, columns: list[int]) -> str:
    label_spec = f"p{{{table.label_width_pt:.0f}pt}}" if table.label_width_pt else "l"
    spec = label_spec + "".join("l" if table.columns[i][1] in TEXT_COLUMNS else "r" for i in columns)
    lines = [rf"\begin{{tabular}}{{{spec}}}", r"\toprule"]
    groups = [(g, [i for i in columns if table.columns[i][0] == g]) for g in dict.fromkeys(table.columns[i][0] for i in columns)]
    if any(g for g, _ in groups):
        head, rules, position = [""], [], 2
        for group, members in groups:
            head.append(rf"\multicolumn{{{len(members)}}}{{c}}{{{latex_escape(group)}}}" if group
                        else " & ".join([""] * len(members)) if len(members) > 1 else "")
            if group:
                rules.append(rf"\cmidrule(lr){{{position}-{position + len(members) - 1}}}")
            position += len(members)
        lines += [" & ".join(head) + r" \\", " ".join(rules)]
    lines.append(" & ".join([latex_escape(table.row_header), *(latex_escape(table.columns[i][1]) for i in columns)])
                 + r" \\")
    lines.append(r"\midrule")
    for label, cells in table.rows:
        if not label and len(cells) == 1:
            lines.append(rf"\multicolumn{{{len(columns) + 1}}}{{l}}{{\textit{{{latex_escape(cells[0])}}}}} \\")
            continue
        lines.append(" & ".join([latex_escape(label), *(latex_escape(cells[i]) for i in columns)]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines)


TEXT_COLUMNS = {"verdict", "reason", "detail", "input (H×W)", "classes"}


def to_latex(table: Table, notice: str = "") -> str:
    """A booktabs table that fits an article's text width (see the module docstring)."""
    for size in ("small", "footnotesize"):
        chunks = _chunks(table, size)
        if chunks is not None and (len(chunks) == 1 or size == "footnotesize"):
            break
    if chunks is None:
        chunks = [[i] for i in range(len(table.columns))]
    packages = ["booktabs"]
    caption = latex_escape(table.caption)
    if notice:
        caption = rf"\textbf{{{latex_escape(notice)}}} " + caption
    body = "\n\\par\\medskip\n".join(_tabular(table, chunk) for chunk in chunks)
    notes = ""
    if table.notes:
        notes = ("\n\\par\\smallskip\n\\parbox{\\linewidth}{\\footnotesize\\raggedright "
                 + r" \\ ".join(latex_escape(n) for n in table.notes) + "}")
    return (f"% requires: {','.join(packages)}\n"
            "\\begin{table}[htbp]\n\\centering\n"
            f"\\{size}\n\\setlength{{\\tabcolsep}}{{4pt}}\n"
            f"\\caption{{{caption}}}\n\\label{{tab:{table.name}}}\n{body}{notes}\n\\end{{table}}\n")


def to_markdown(table: Table) -> str:
    frame = table.display()
    frame.index.name = table.row_header
    text = frame.to_markdown(disable_numparse=True)
    if table.notes:
        text += "\n\n" + "\n".join(f"- {n}" for n in table.notes)
    return text


def write_table(table: Table, out: Path, notice: str) -> str:
    """CSV and LaTeX files; returns the Markdown section for the summary."""
    out.mkdir(parents=True, exist_ok=True)
    table.frame().to_csv(out / f"{table.name}.csv", index=False, float_format="%.4f")
    (out / f"{table.name}.tex").write_text(to_latex(table, notice))
    prefix = f"**{notice}** " if notice else ""
    return (f"### {table.caption}\n\n{prefix}Files: [{table.name}.csv]({table.name}.csv), "
            f"[{table.name}.tex]({table.name}.tex)\n\n{to_markdown(table)}\n")


# --------------------------------------------------------------------------- the tables


def _metrics_of(dataset: str, method: str | None = None) -> list[str]:
    """The metrics of a dataset's tables; with ``method``, that method's own metrics too."""
    common = DATASET_METRICS.get(dataset, DEFAULT_METRICS)
    if method is None or not _localisation(dataset):
        return common
    return [*common, *METHOD_METRICS.get(method, [])]


def _localisation(dataset: str) -> bool:
    """Whether a dataset's tables hold the localisation metrics (AU-PRO, and the mIoU tables)."""
    return "aupro" in DATASET_METRICS.get(dataset, DEFAULT_METRICS)


def _label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def _datasets(params: dict[str, Any]) -> list[tuple[str, str, list[str]]]:
    return [(d, c.get("label", d), list(c.get("classes") or [])) for d, c in (params.get("datasets") or {}).items()
            if c.get("classes")]


def _main_runs(results: list[RunResult], protocol: str, dataset: str, method: str,
               class_name: str = "mean") -> list[RunResult]:
    return [r for r in results if r.run.part == "main" and r.run.protocol == protocol and r.run.dataset == dataset
            and r.run.method == method and (class_name == "mean" or r.run.class_name == class_name)]


def _stat_values(prefix: str, stat: Stat) -> dict[str, float]:
    return {prefix: stat.mean, f"{prefix} std": stat.std, f"{prefix} seeds": float(stat.seeds)}


def summary_table(params: dict[str, Any], results: list[RunResult], protocol: str) -> Table:
    table = Table(f"summary_{protocol}", f"Summary, {protocol} protocol: class means, last epoch", "method")
    datasets = _datasets(params)
    table.columns = [(label, SHORT_METRIC.get(m, m)) for d, label, _ in datasets for m in _metrics_of(d)]
    for method in params.get("methods") or {}:
        cells, values = [], {}
        for dataset, label, _ in datasets:
            for metric in _metrics_of(dataset):
                stat = class_mean_stat(_main_runs(results, protocol, dataset, method), metric)
                cells.append(cell(stat))
                values.update(_stat_values(f"{dataset} {metric}", stat))
        table.add(_label(method), cells, values)
    return table


def _reference(figures: pd.DataFrame, dataset: str, method: str, class_name: str, metric: str) -> dict | None:
    rows = figures[(figures["dataset"] == dataset) & (figures["method"] == method) & (figures["class"] == class_name)
                   & (figures["metric"] == metric) & figures["reference"].astype(bool)]
    return rows.iloc[0].to_dict() if len(rows) else None


def _published_row(published: pd.DataFrame, check: dict) -> dict:
    rows = published[(published["dataset"] == check["dataset"]) & (published["method"] == check["method"])
                     & (published["class"] == check["class"]) & (published["metric"] == check["metric"])
                     & published["reference"]]
    return rows.iloc[0].to_dict()


def verdict_cell(check: dict, notes: Notes) -> str:
    if check["verdict"] == "not comparable" or check["verdict"] == "not run" and check["reason"] != "no finished run":
        return f"{check['verdict']} ({notes.mark(check['reason'])})"
    return check["verdict"]


def _comparison_rows(table: Table, notes: Notes, runs: list[RunResult], figures: pd.DataFrame,
                     published: pd.DataFrame, dataset: str, method: str, class_name: str, metrics: list[str],
                     with_best: bool = True) -> list[str]:
    """One row per metric: ours (last, and best† with ``with_best``) against the reference published
    figure with its delta, tolerance and verdict. Returns the labels of the final-model metrics shown."""
    final = []
    for metric in metrics:
        last, best = class_mean_stat(runs, metric), class_mean_stat(runs, metric, "best")
        check = _reference(figures, dataset, method, class_name, metric)
        values = {"method": method, **_stat_values("last", last)}
        ours = [cell(last)]
        if with_best:
            values.update(_stat_values("best", best))
            ours.append(cell(best) if metric not in FINAL_MODEL_METRICS else NOT_PUBLISHED)
        if metric in FINAL_MODEL_METRICS:  # no best epoch: computed on the final model only
            final.append(METRIC_LABELS[metric])
        if check is None:
            cells = [*ours, NOT_PUBLISHED, NOT_PUBLISHED, NOT_PUBLISHED, "not published"]
            values.update(published=math.nan, delta=math.nan, tolerance=math.nan, verdict="not published")
        else:
            mark = notes.mark(source_note(_published_row(published, check)))
            cells = [*ours, f"{check['published']:.2f} ({mark})", _fmt(check["delta"], signed=True),
                     _fmt(check["tolerance"]), verdict_cell(check, notes)]
            values.update(published=check["published"], delta=check["delta"], tolerance=check["tolerance"],
                          verdict=check["verdict"], compared_at=check["compared_at"])
        table.add(METRIC_LABELS[metric], cells, values)
    return final


DELTA_NOTE = "Δ = ours - published at the published figure's epoch selection; tol. = max(0.5, 2 × seed std)."


def headline_table(params: dict[str, Any], dataset: str, label: str, classes: list[str],
                   figures: pd.DataFrame, published: pd.DataFrame, results: list[RunResult]) -> Table:
    """The official protocol's class means next to each method's reference published figure."""
    class_name = "mean" if len(classes) > 1 else classes[0]
    table = Table(f"main_official_{dataset}", f"{label}, official protocol: ours against the published figures",
                  "metric", [("ours", "last"), ("ours", "best†"), ("", "published"), ("", "Δ"), ("", "tol."),
                             ("", "verdict")])
    notes, final = Notes(), []
    for method in params.get("methods") or {}:
        table.section(_label(method))
        runs = _main_runs(results, grid.REFERENCE_PROTOCOL, dataset, method, class_name)
        final += _comparison_rows(table, notes, runs, figures, published, dataset, method, class_name,
                                  _metrics_of(dataset, method))
    table.notes = [DELTA_NOTE, *notes.lines()]
    if final:
        table.notes.insert(1, f"{', '.join(dict.fromkeys(final))}: computed on the final model only (no best "
                              "epoch), compared at the last epoch.")
    return table


def _miou_metrics(method: str) -> list[str]:
    """The likelihood map's mIoU (every method), each followed by the NFA segmentation's where the
    method has one (U-Flow): the fair figures side by side, then the oracle ones."""
    nfa = method in NFA_METHODS
    return [m for fair in MIOU_METRICS for m in (fair, *([MIOU_NFA[fair]] if nfa else []))]


MIOU_NOTES = [
    "mIoU: U-Flow's definition (all test images, 256x256), computed on the final model only (no best epoch), "
    "so compared at the last epoch.",
    "map: thresholds on the likelihood map, every method (fair: one false-positive pixel per training image on "
    "average; oracle: the best threshold). NFA: U-Flow's a contrario segmentation (fair: log10 NFA = 0; oracle: "
    "the best -log10 NFA threshold). U-Flow publishes the NFA figures for itself, the map figures for the others.",
]


def miou_table(params: dict[str, Any], dataset: str, label: str, classes: list[str],
               figures: pd.DataFrame, published: pd.DataFrame, results: list[RunResult]) -> Table:
    """The official protocol's class-mean mIoU of every method against the published figures, the
    likelihood map's and, for U-Flow, the NFA segmentation's next to it."""
    class_name = "mean" if len(classes) > 1 else classes[0]
    table = Table(f"main_official_{dataset}_miou", f"{label}, official protocol: mIoU of the likelihood map "
                  "and of U-Flow's NFA segmentation against the published figures", "metric",
                  [("ours", "last"), ("", "published"), ("", "Δ"), ("", "tol."), ("", "verdict")])
    notes = Notes()
    for method in params.get("methods") or {}:
        table.section(_label(method))
        runs = _main_runs(results, grid.REFERENCE_PROTOCOL, dataset, method, class_name)
        _comparison_rows(table, notes, runs, figures, published, dataset, method, class_name,
                         _miou_metrics(method), with_best=False)
    table.notes = [DELTA_NOTE, *MIOU_NOTES, *notes.lines()]
    return table


def nfa_miou_per_class_tables(params: dict[str, Any], dataset: str, label: str, classes: list[str],
                              results: list[RunResult], figures: pd.DataFrame,
                              published: pd.DataFrame) -> list[Table]:
    """Per class, for each method with an NFA segmentation (U-Flow), official protocol: the
    likelihood map's mIoU next to the NFA segmentation's, with the published figures."""
    rows = [*classes, "mean"] if len(classes) > 1 else classes
    tables = []
    for method in (m for m in params.get("methods") or {} if m in NFA_METHODS):
        metrics = _miou_metrics(method)
        checks = {(c, m): _reference(figures, dataset, method, c, m) for c in rows for m in metrics}
        shown = [m for m in metrics if any(checks[(c, m)] is not None for c in rows)]  # a "pub." column
        table = Table(f"{method}_{dataset}_miou_per_class", f"{_label(method)} on {label}, official protocol: "
                      "mIoU per class, likelihood map and NFA segmentation, final model", "class",
                      [(group, c) for m in metrics for group, kind in [MIOU_COLUMNS[m]]
                       for c in (kind, *([f"{kind} pub."] if m in shown else []))])
        notes = Notes()
        for class_name in rows:
            runs = _main_runs(results, grid.REFERENCE_PROTOCOL, dataset, method, class_name)
            cells, values = [], {}
            for metric in metrics:
                stat = class_mean_stat(runs, metric)
                cells.append(cell(stat))
                values.update(_stat_values(f"{metric} last", stat))
                if metric in shown:
                    check = checks[(class_name, metric)]
                    if check is None:
                        cells.append(NOT_PUBLISHED)
                        values[f"{metric} published"] = math.nan
                    else:
                        cells.append(f"{check['published']:.2f} ({notes.mark(source_note(_published_row(published, check)))})")
                        values[f"{metric} published"] = check["published"]
            table.add(class_name, cells, values)
        table.notes = [MIOU_NOTES[1], *notes.lines()]
        tables.append(table)
    return tables


def per_class_tables(params: dict[str, Any], dataset: str, label: str, classes: list[str], protocol: str,
                     results: list[RunResult], figures: pd.DataFrame, published: pd.DataFrame) -> list[Table]:
    every = list(params.get("methods") or {})
    official = protocol == grid.REFERENCE_PROTOCOL
    rows = [*classes, "mean"] if len(classes) > 1 else classes
    tables = []
    # A method's own metric gets a table of its own, with the methods that compute it only.
    own = list(dict.fromkeys(m for method in every for m in _metrics_of(dataset, method)
                             if m not in _metrics_of(dataset)))
    for metric in [*_metrics_of(dataset), *own]:
        methods = [m for m in every if metric in _metrics_of(dataset, m)]
        table = Table(f"main_{protocol}_{dataset}_{metric}",
                      f"{label}, {protocol} protocol: {METRIC_LABELS[metric]} per class, last epoch", "class")
        table.columns = ([(_label(m), c) for m in methods for c in ("ours", "pub.")] if official
                         else [("", _label(m)) for m in methods])
        notes = Notes()
        for class_name in rows:
            cells, values = [], {}
            for method in methods:
                stat = class_mean_stat(_main_runs(results, protocol, dataset, method, class_name), metric)
                cells.append(cell(stat))
                values.update(_stat_values(f"{method} last", stat))
                if official:
                    check = _reference(figures, dataset, method, class_name, metric)
                    if check is None:
                        cells.append(NOT_PUBLISHED)
                        values[f"{method} published"] = math.nan
                    else:
                        mark = notes.mark(source_note(_published_row(published, check)))
                        cells.append(f"{check['published']:.2f} ({mark})")
                        values[f"{method} published"] = check["published"]
            table.add(class_name, cells, values)
        table.notes = notes.lines()
        tables.append(table)
    return tables


def msflow_tables(params: dict[str, Any], results: list[RunResult], published: pd.DataFrame) -> list[Table]:
    """MSFlow per class (official protocol): ours next to the README and the authors' log."""
    if "msflow" not in (params.get("methods") or {}):
        return []
    tables = []
    for dataset, label, classes in _datasets(params):
        rows = [*classes, "mean"] if len(classes) > 1 else classes
        mine = published[(published["dataset"] == dataset) & (published["method"] == "msflow")]
        table = Table(f"msflow_{dataset}_per_class", f"MSFlow on {label}, per class: ours, the paper or README, "
                      "the authors' log", "class")
        metrics = _metrics_of(dataset)
        table.columns = [(METRIC_LABELS[m], c) for m in metrics for c in ("last", "best†", "paper", "log last",
                                                                          "log best†")]
        notes = Notes()
        for class_name in rows:
            runs = _main_runs(results, grid.REFERENCE_PROTOCOL, dataset, "msflow", class_name)
            cells, values = [], {}
            for metric in metrics:
                last, best = class_mean_stat(runs, metric), class_mean_stat(runs, metric, "best")
                here = mine[(mine["class"] == class_name) & (mine["metric"] == metric)]
                paper = here[here["reference"]]
                logs = {s: here[(here["source_kind"] != "third-party code") & ~here["reference"]
                                & (here["epoch_selection"] == s)] for s in ("last", "best")}
                cells += [cell(last), cell(best)]
                values.update({**_stat_values(f"{metric} last", last), **_stat_values(f"{metric} best", best)})
                for key, rows_ in (("paper", paper), ("log last", logs["last"]), ("log best", logs["best"])):
                    if len(rows_):
                        row = rows_.iloc[0]
                        cells.append(f"{row['value']:.2f} ({notes.mark(source_note(row))})")
                        values[f"{metric} {key}"] = row["value"]
                    else:
                        cells.append(NOT_PUBLISHED)
                        values[f"{metric} {key}"] = math.nan
            table.add(class_name, cells, values)
        table.notes = notes.lines()
        tables.append(table)
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
    rescored = {v.get("group") for v in (ablations.get("rescore") or {}).values()}
    whole = dataset == "mvtec_ad" and set(classes) >= set(params["datasets"].get(dataset, {}).get("classes") or [])
    tables = []
    for group, meta in (ablations.get("groups") or {}).items():
        members = [(name, v) for name, v in variants.items() if v.get("group") == group]
        if not members:
            continue
        title = meta.get("title", group)
        how = "re-scored from the default run's maps" if group in rescored else "retrained"
        table = Table(f"ablation_{group}", f"MSFlow ablation, {title}: last epoch, {how}", "variant",
                      [("", SHORT_METRIC[m]) for m in metrics])
        entries = [("default", f"{label_text(meta.get('default', 'default'))} (default)", reference, None),
                   *[(n, label_text(v.get("label", n)), [r for r in results if r.run.variant == n], v.get("set"))
                     for n, v in members]]
        notes, paper = Notes(), {}
        for name, _, _, setting in entries:
            row = _ablation_published(published, dataset, name, setting) if whole else None
            if row is not None:
                paper[name] = row
        if paper:
            table.columns.append(("", "paper"))
        for name, label, runs, _ in entries:
            cells, values = [], {"variant name": name}
            for metric in metrics:
                stat = class_mean_stat(runs, metric)
                cells.append(cell(stat))
                values.update(_stat_values(metric, stat))
            if paper:
                row = paper.get(name)
                cells.append(NOT_PUBLISHED if row is None else f"{row['value']:.2f} ({notes.mark(source_note(row))})")
                values["paper image_auroc"] = math.nan if row is None else row["value"]
            table.add(label, cells, values)
        table.notes = [f"Mean over {len(classes)} classes of {dataset}; Image, Pixel: AUROC; paper: image AUROC.",
                       *notes.lines()]
        tables.append(table)
    return tables


def label_text(value: Any) -> str:
    """A label from params.yaml: DVC rewrites the file without quotes, and a YAML 1.1 reader
    then turns on / off into booleans."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _ablation_published(published: pd.DataFrame, dataset: str, name: str, setting: dict | None) -> dict | None:
    """The published image AUROC of an ablation row (msflow.md 9.4): the default row's headline
    and the full-mean score, both means over the whole dataset."""
    rows = published[(published["dataset"] == dataset) & (published["method"] == "msflow")
                     & (published["class"] == "mean") & (published["metric"] == "image_auroc")]
    if name == "default":
        rows = rows[rows["reference"] & ~rows["setting"].astype(str).str.contains("ablation")]
    elif setting and setting.get("top_k") == 1.0:
        rows = rows[rows["setting"].astype(str).str.contains("top_k = 1.0", regex=False)]
    else:
        return None
    return rows.iloc[0].to_dict() if len(rows) else None


def claims_table(claims: pd.DataFrame) -> Table:
    table = Table("claims", "The MSFlow paper's ablation claims: verdicts from our ablation runs", "claim",
                  [("", "difference"), ("", "tol."), ("", "verdict")], label_width_pt=190)
    for _, row in claims.iterrows():
        table.add(row["statement"], [_fmt(row["difference"], signed=True), _fmt(row["tolerance"]), row["verdict"]],
                  {"key": row["key"], "difference": row["difference"], "tolerance": row["tolerance"],
                   "verdict": row["verdict"], "detail": row["detail"]})
    table.notes = ["Difference: of the first check of the claim (details in results/verify_claims.csv)."]
    return table


def cost_table(params: dict[str, Any], results: list[RunResult]) -> Table | None:
    """Size, compute and speed of every method (main official runs of the ablation dataset) and
    of every retrained ablation variant."""
    from harness.profile import method_info

    ablations = params.get("ablations") or {}
    dataset = ablations.get("dataset", "mvtec_ad")
    entries: list[tuple[str, list[RunResult]]] = []
    for method in params.get("methods") or {}:
        entries.append((_label(method), _main_runs(results, grid.REFERENCE_PROTOCOL, dataset, method)))
    for name, v in (ablations.get("train") or {}).items():
        entries.append((f"MSFlow {label_text(v.get('label', name))}", [r for r in results if r.run.variant == name]))
    if not entries:
        return None
    table = Table("cost", f"Cost on {dataset}: size, compute (one image) and speed", "configuration",
                  [("", "input (H×W)"), ("", "params (M)"), ("GFLOPs", "flows"), ("GFLOPs", "backbone"),
                   ("speed", "train s/ep."), ("speed", "test img/s"), ("", "classes")])
    for label, runs in entries:
        done = [r for r in runs if r.finished]
        values: dict[str, Any] = {"input height": math.nan, "input width": math.nan, "params (M)": math.nan,
                                  "GFLOPs flows": math.nan, "GFLOPs backbone": math.nan}
        sizes = [r.image_size for r in done if r.image_size]
        if sizes:
            # Classes may differ in input size (MSFlow's transistor): report the most common size.
            common = max(set(sizes), key=sizes.count)
            # Size and compute depend on the settings and the input size only: one count per row.
            run = next(r.run for r in done if r.image_size == common)
            c = method_info(run.method, grid.run_spec(params, run).overrides, common)
            values.update({"input height": common[0], "input width": common[1],
                           "params (M)": c["trainable_parameters"]["total"] / 1e6,
                           "GFLOPs flows": c["gflops"]["flows"], "GFLOPs backbone": c["gflops"]["backbone"]})
        train = _mean_of(r.train_seconds_per_epoch for r in done)
        test = _mean_of(r.test_images_per_second for r in done)
        values.update({"train s/epoch": train, "test images/s": test, "classes finished": len(done),
                       "classes": len(runs)})
        size = NOT_RUN if not sizes else f"{values['input height']}×{values['input width']}"
        cells = [size, *(NOT_RUN if math.isnan(values[k]) else f"{values[k]:.2f}"
                         for k in ("params (M)", "GFLOPs flows", "GFLOPs backbone", "train s/epoch")),
                 NOT_RUN if math.isnan(test) else f"{test:.1f}", f"{len(done)}/{len(runs)}"]
        table.add(label, cells, values)
    device = params.get("runtime", {}).get("device", "auto")
    table.notes = [f"GFLOPs = 2 × multiply-accumulates of one forward pass (torch FlopCounterMode). Speeds from the "
                   f"runs (device setting {device}), mean over classes; training with cached features where "
                   "the method allows."]
    return table


def _mean_of(values: Iterable[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def fusion_cost_table(cost: dict[str, Any] | None) -> Table | None:
    if not cost:
        return None
    size = "×".join(str(s) for s in cost["input_size"])
    table = Table("fusion_cost", f"Flow compute on the same features (MSFlow WRN-50, {size} px): the fusion flow "
                  "against CS-Flow's cross-scale flows", "flow", [("", "params (M)"), ("", "GMAC"),
                                                                  ("", "vs cross-scale")])
    reference = cost["cross_scale_flow"]["gmacs"]
    for key, label in (("parallel_flows", "MSFlow parallel flows"), ("fusion_flow", "MSFlow fusion flow"),
                       ("cross_scale_flow", f"CS-Flow cross-scale flows ({cost['cross_scale_flow']['blocks']} blocks)")):
        part = cost[key]
        relative = 100 * (part["gmacs"] / reference - 1)
        table.add(label, [f"{part['parameters'] / 1e6:.2f}", f"{part['gmacs']:.2f}", f"{relative:+.1f} %"],
                  {"component": key, "params (M)": part["parameters"] / 1e6, "GMAC": part["gmacs"],
                   "vs cross-scale (%)": relative})
    table.notes = ["Computed by `flowad info msflow --vs-csflow` (shapes only). The paper: -93 % flow compute."]
    return table


# --------------------------------------------------------------------------- entry point


def _verification_section(figures: pd.DataFrame, claims: pd.DataFrame, summary: dict[str, Any]) -> list[str]:
    counts = summary["figures"]
    lines = ["## Verification", "",
             f"`flowad verify` compared {counts['total']} published figures the grid covers: "
             + ", ".join(f"{counts[v.replace(' ', '_')]} {v}" for v in FIGURE_VERDICTS)
             + ". Rule: ours at the published figure's epoch selection (best epoch on the test set where the "
             "paper reports it, else the last epoch; the last epoch for what only the final model is evaluated "
             "on: mIoU, CFlow's own PRO), tolerance max(0.5, 2 × seed std) points; a figure whose "
             "setting (backbone, input size, implementation) differs from ours is not comparable. All figures "
             "with their verdicts: [verify.csv](../verify.csv).", ""]
    head = figures[figures["reference"].astype(bool) & ((figures["class"] == "mean") | (figures["dataset"] == "mtd"))]
    if len(head):
        frame = pd.DataFrame({
            "figure": [f"{_label(r['method'])} {r['dataset']} {METRIC_LABELS.get(r['metric'], r['metric'])}"
                       for _, r in head.iterrows()],
            "published": [f"{v:.2f}" for v in head["published"]],
            "ours last": [_fmt(v) for v in head["ours_last"]], "ours best†": [_fmt(v) for v in head["ours_best"]],
            "Δ": [_fmt(v, signed=True) for v in head["delta"]], "verdict": head["verdict"],
            "reason": head["reason"]})
        lines += [frame.to_markdown(index=False, disable_numparse=True), ""]
    if len(claims):
        lines += ["Claims of the MSFlow paper's ablations, from our ablation runs:", "",
                  pd.DataFrame({"claim": claims["statement"], "verdict": claims["verdict"],
                                "detail": claims["detail"]}).to_markdown(index=False, disable_numparse=True), ""]
    return lines


LEGEND = """## Legend

- **Figures** are percent (x100). **last**: the final epoch, our primary figure. **best†**: the best epoch per
  metric on the test set, which is what the papers report (optimistic: the test set chooses the epoch).
- **Image AUROC**: AUROC of the image scores. **Pixel AUROC**: AUROC over every test pixel.
- **AU-PRO (MVTec)** (`aupro`): the MVTec convention: PRO integrated over FPR in [0, 0.3] and divided by 0.3.
  **PRO (code)** (`aupro_code`): the MSFlow code convention: 800 equal score thresholds rising from the minimum,
  the FPRs below 0.3 kept and min-max rescaled to [0, 1]. **PRO (CFlow code)** (`aupro_cflow`, CFlow-AD only,
  final model): CFlow-AD's own code, the convention of its published PRO: 1000 thresholds descending from the
  maximum, FPR <= 0.3 kept and rescaled as in the MSFlow code, a region's overlap counted on its hole-filled
  shape but divided by its own area. The three are not interchangeable.
- **mIoU**: U-Flow's definition, per-image IoU averaged over all test images (defect-free ones included), at
  256x256, final model. **mIoU (map, fair / oracle)** (`miou_fair`, `miou_oracle`): thresholds on the
  likelihood (anomaly) map, every method: fair = one false-positive pixel per training image on average (U-Flow's
  rule for methods without an automatic threshold), oracle = the best of 1000 thresholds. **mIoU (NFA, fair /
  oracle)** (`miou_nfa_fair`, `miou_nfa_oracle`, U-Flow only): U-Flow's a contrario segmentation, at its
  automatic threshold log10 NFA = 0 and at the best of -log10 NFA = -400 ... 1000. U-Flow publishes the NFA
  figures for itself and the likelihood-map ones for the other methods.
- **pub.**, **published**, **paper**: a published figure, with a note letter naming its source, who computed
  it (own paper, own README, own log, other paper, third-party code, derived) and its setting (backbone,
  input size, epoch selection). **log**: the MSFlow authors' shipped training log (last and best epoch).
- **Δ**: ours minus published, at the published figure's epoch selection (at the last epoch for what only the
  final model is evaluated on: mIoU, PRO (CFlow code)), shown only where the setting matches ours. **tol.**: the tolerance of the verdict, max(0.5, 2 × seed standard deviation) points.
- **Verdicts**: reproduced (within the tolerance), lower, higher, not comparable (the setting differs, with the
  reason), not run. Claims: holds, contradicted, within tolerance, not comparable, not run.
- **±**: standard deviation over seeds of the class mean. **[k/n]**: a mean over k of the n classes the grid
  holds; **[k/n seeds]**: k of n seeds finished. **not run**: in the grid, not finished. **–**: no figure.
- **GFLOPs**: 2 × multiply-accumulates of one forward pass (torch FlopCounterMode); papers often call the
  multiply-accumulates FLOPs. **GMAC**: 10^9 multiply-accumulates.
"""


def build_tables(params_path: Path | str = grid.PARAMS, out: Path | None = None) -> list[Path]:
    """Write every table (CSV + LaTeX) and README.md (verification report, legend and every table
    in Markdown) to ``out`` (default: params.yaml paths.tables); returns the CSV paths. Reads
    what `flowad verify` wrote."""
    params = grid.load(Path(params_path))
    demo = params.get("profile") == "demo"
    out = Path(out or params.get("paths", {}).get("tables", "results/tables"))
    published = load_published(Path(params.get("paths", {}).get("published", "results/published")))
    figures, claims, summary = read_report(params)
    results = collect(params)
    random_runs = random_weight_runs(results)
    notice = " ".join(([DEMO_NOTICE] if demo else []) + ([RANDOM_NOTICE.format(n=random_runs)] if random_runs else []))
    weights = weights_in_use(results)
    tables: list[Table] = []
    for protocol in params.get("protocols") or {}:
        tables.append(summary_table(params, results, protocol))
    for dataset, label, classes in _datasets(params):
        tables.append(headline_table(params, dataset, label, classes, figures, published, results))
        for protocol in params.get("protocols") or {}:
            tables += per_class_tables(params, dataset, label, classes, protocol, results, figures, published)
        if _localisation(dataset):
            tables.append(miou_table(params, dataset, label, classes, figures, published, results))
            tables += nfa_miou_per_class_tables(params, dataset, label, classes, results, figures, published)
    tables += msflow_tables(params, results, published)
    tables += ablation_tables(params, results, published)
    if len(claims):
        tables.append(claims_table(claims))
    for extra in (cost_table(params, results), fusion_cost_table(summary.get("fusion_cost"))):
        if extra is not None:
            tables.append(extra)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.csv"), *out.glob("*.tex")]:
        stale.unlink()  # tables of settings no longer in the grid must not linger
    sections = [write_table(t, out, notice) for t in tables]
    finished = sum(r.finished for r in results)
    title = "# Tables (DEMO: embedded data)" if demo else "# Tables"
    header = [title, ""]
    if notice:
        header += [f"**{notice}**", ""]
    if weights:
        header += [f"Backbone weights of the finished runs (from their records): {weights}.", ""]
    header += [f"Generated by `python -m harness tables` from {finished} of {len(results)} runs of the grid in "
               "params.yaml, the published figures in results/published/ and the verdicts of `python -m harness "
               "verify`.", ""]
    header += _verification_section(figures, claims, summary)
    header += [LEGEND, "## Tables", "", "Contents: " + ", ".join(f"[{t.caption}](#{_anchor(t.caption)})" for t in tables), ""]
    (out / "README.md").write_text("\n".join(header) + "\n" + "\n".join(sections))
    return [out / f"{t.name}.csv" for t in tables]


def _anchor(title: str) -> str:
    """GitHub's heading anchor for a Markdown title."""
    return re.sub(r"[^a-z0-9 _-]", "", title.lower()).replace(" ", "-")
