"""Does each published number hold? A verdict for every published figure the grid covers and for
every qualitative ablation claim of the MSFlow paper.

Figures. Ours are the official-protocol runs (each method with its published settings), as mean
± standard deviation over seeds of the class mean (or of one class). A published figure is
compared with ours at its own epoch selection: a per-metric best epoch on the test set (what the
papers report) with our best epoch, a last-epoch or unstated one with our last epoch; both of ours
are always reported. A metric computed on the final model only (FINAL_MODEL_METRICS: the mIoU,
CFlow's own PRO) has no best epoch and is compared at our last epoch. It is comparable only where
its setting matches ours: the backbone must be stated and equal, the input size equal where
stated; another implementation's figure, random backbone weights, or a mean over other classes
are not comparable either.

Tolerance. max(FLOOR, K x the seed standard deviation), in points (x100): FLOOR = 0.5 (published
figures are rounded to 0.1 and one seed's spread is unknown), K = 2. For a difference of two of
our figures the standard deviations add in quadrature. Verdicts:
  reproduced  |ours - published| <= tolerance
  lower       ours < published - tolerance;   higher: ours > published + tolerance
  not comparable (reason);  not run (reason: missing runs, classes or seeds).

Claims. Each is one or more checks between our runs; a directional check holds when the claimed
difference exceeds the tolerance, is contradicted when it goes the other way by more than the
tolerance, and is "within tolerance" otherwise; a threshold check ("above 99.2") holds at or above
the threshold and is contradicted below threshold - tolerance; a value check (86.46, +2.3) holds
within the tolerance. A claim holds when every check holds, is contradicted when one is. Claims
that compare with a published number (86.46, 99.2) need the ablations on the whole of MVTec AD.
The cost claim (-93 % flow compute against CS-Flow's cross-scale flows) is computed from shapes
(harness.profile.fusion_vs_cross_scale) and holds at a saving of at least 93 - 2 %.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from harness import grid
from harness.errors import ConfigError
from harness.results import RANDOM_WEIGHTS, RunResult, Stat, class_mean_stat, collect, write_tidy_runs

FLOOR = 0.5
K = 2.0
FIGURE_VERDICTS = ("reproduced", "lower", "higher", "not comparable", "not run")
CLAIM_VERDICTS = ("holds", "contradicted", "within tolerance", "not comparable", "not run")
SOURCE_KINDS = {
    "own paper": "the method's own paper",
    "own README": "the method's own repository README",
    "own log": "the authors' shipped training log",
    "other paper": "another paper's table (quoted or computed by its authors)",
    "third-party code": "an independent implementation's README",
    "derived": "our arithmetic: from a relative statement, or a mean of per-class values",
}
PUBLISHED_COLUMNS = ["dataset", "method", "class", "metric", "value", "epoch_selection", "source_kind", "backbone",
                     "input_size", "setting", "reference", "source", "note"]
METRICS = ("image_auroc", "pixel_auroc", "aupro", "aupro_code", "aupro_cflow", "miou_fair", "miou_oracle",
           "miou_nfa_fair", "miou_nfa_oracle")
# Computed once, on the final model (harness.train: the loop's mIoU and a method's extra_metrics),
# so a run has no best epoch for them: they are compared at the last epoch whatever the published
# figure's epoch selection, and the reason says so. aupro_cflow: CFlow's PRO in its own code's
# convention; miou_fair / miou_oracle: the likelihood map's mIoU (every method);
# miou_nfa_fair / miou_nfa_oracle: U-Flow's a contrario (NFA) segmentation.
FINAL_MODEL_METRICS = ("aupro_cflow", "miou_fair", "miou_oracle", "miou_nfa_fair", "miou_nfa_oracle")
FIGURES_FILE, CLAIMS_FILE, SUMMARY_FILE, RUNS_FILE = "verify.csv", "verify_claims.csv", "verify.json", "runs.csv"


# --------------------------------------------------------------------------- published figures


def load_published(folder: Path) -> pd.DataFrame:
    """Every published figure (results/published/*.csv), one row per figure; ``value`` in percent."""
    frames = []
    for path in sorted(Path(folder).glob("*.csv")):
        frame = pd.read_csv(path, dtype={"input_size": str, "backbone": str}, keep_default_na=False,
                            na_values={"value": [""]})
        missing = set(PUBLISHED_COLUMNS) - set(frame.columns)
        if missing:
            raise ConfigError(f"{path}: missing columns {sorted(missing)}; every published CSV has "
                              f"{', '.join(PUBLISHED_COLUMNS)}")
        frames.append(frame[PUBLISHED_COLUMNS])
    if not frames:
        return pd.DataFrame(columns=PUBLISHED_COLUMNS)
    published = pd.concat(frames, ignore_index=True)
    published["value"] = pd.to_numeric(published["value"])
    published["reference"] = published["reference"].astype(str).str.lower().eq("true")
    return published


# --------------------------------------------------------------------------- our settings


@dataclass(frozen=True)
class Setting:
    backbone: str  # architecture without the weight tag: wide_resnet50_2, mcait, ...
    input_size: str  # "512" or "256x384"


def size_label(size: Iterable[int]) -> str:
    height, width = (int(s) for s in size)
    return str(height) if height == width else f"{height}x{width}"


def our_setting(params: dict[str, Any], dataset: str, method: str, class_name: str) -> Setting:
    """The backbone and input size an official-protocol run trains with (a mean: the method's
    default size for the dataset)."""
    config_class = class_name
    if class_name == "mean":  # per-class tuned settings (U-Flow) need a class; the size is the default
        config_class = ((params.get("datasets") or {}).get(dataset, {}).get("classes") or [""])[0]
    run = grid.main_run(params, grid.REFERENCE_PROTOCOL, dataset, method, config_class, 0)
    config = grid.method_config(grid.run_spec(params, run))
    size = config.input_size_for("" if class_name == "mean" else class_name)
    return Setting(str(config.backbone).partition(".")[0], size_label(size))


def dataset_classes(params: dict[str, Any], dataset: str) -> list[str]:
    """Every class of a dataset: its card's list where the card has one, else the grid's."""
    card = Path(params.get("paths", {}).get("code", ".")) / "datasets" / f"{dataset}.yaml"
    if card.exists():
        listed = (yaml.safe_load(card.read_text()) or {}).get("classes")
        if listed:
            return [str(c) for c in listed]
    return list((params.get("datasets") or {}).get(dataset, {}).get("classes") or [])


# --------------------------------------------------------------------------- the verdict rule


def tolerance(*stds: float) -> float:
    spread = math.sqrt(sum(0.0 if math.isnan(s) else s * s for s in stds))
    return max(FLOOR, K * spread)


def figure_verdict(ours: float, published: float, tol: float) -> str:
    delta = ours - published
    if abs(delta) <= tol:
        return "reproduced"
    return "lower" if delta < 0 else "higher"


@dataclass
class FigureCheck:
    dataset: str
    method: str
    class_name: str
    metric: str
    published: float
    epoch_selection: str  # the published figure's
    source_kind: str
    source: str
    reference: bool
    ours_last: float = math.nan
    ours_last_std: float = math.nan
    ours_best: float = math.nan
    ours_best_std: float = math.nan
    seeds: int = 0
    compared_at: str = ""  # "last" | "best"
    delta: float = math.nan
    tolerance: float = math.nan
    verdict: str = "not run"
    reason: str = ""


def _comparability(row: pd.Series, ours: Setting | None) -> str:
    """Why a published figure's setting differs from ours ("" when it matches)."""
    if row["source_kind"] == "third-party code":
        return "another implementation's figure, not the method's reference code"
    if ours is None:
        return ""
    if not row["backbone"]:
        return "the source does not state the backbone"
    if row["backbone"] != ours.backbone:
        return f"backbone {row['backbone']}, ours {ours.backbone}"
    if row["input_size"] and row["input_size"] != ours.input_size:
        return f"input {row['input_size']} px, ours {ours.input_size} px"
    return ""


def check_figures(params: dict[str, Any], results: list[RunResult], published: pd.DataFrame) -> list[FigureCheck]:
    """A verdict for every published figure of a method, dataset, class and metric the grid runs."""
    datasets = {d: list(c.get("classes") or []) for d, c in (params.get("datasets") or {}).items()}
    methods = set(params.get("methods") or {})
    main = [r for r in results if r.run.part == "main" and r.run.protocol == grid.REFERENCE_PROTOCOL]
    settings: dict[tuple[str, str, str], Setting | None] = {}
    every_class = {d: dataset_classes(params, d) for d in datasets}
    checks = []
    for _, row in published.iterrows():
        dataset, method, class_name, metric = row["dataset"], row["method"], row["class"], row["metric"]
        classes = datasets.get(dataset) or []
        if (not classes or method not in methods or metric not in METRICS
                or not (class_name in classes or class_name == "mean")):
            continue
        check = FigureCheck(dataset, method, class_name, metric, float(row["value"]), row["epoch_selection"],
                            row["source_kind"], row["source"], bool(row["reference"]))
        runs = [r for r in main if r.run.dataset == dataset and r.run.method == method
                and (class_name == "mean" or r.run.class_name == class_name)]
        last, best = class_mean_stat(runs, metric), class_mean_stat(runs, metric, "best")
        check.ours_last, check.ours_last_std, check.ours_best, check.ours_best_std = last.mean, last.std, best.mean, best.std
        check.seeds = last.seeds
        final_only = metric in FINAL_MODEL_METRICS
        check.compared_at = "best" if row["epoch_selection"] == "best" and not final_only else "last"
        stat = best if check.compared_at == "best" else last
        key = (dataset, method, class_name if class_name != "mean" else "")
        if key not in settings:
            settings[key] = our_setting(params, dataset, method, class_name)
        everything = every_class[dataset]
        differs = _comparability(row, settings[key])
        if differs:
            check.verdict, check.reason = "not comparable", f"setting differs: {differs}"
        elif class_name == "mean" and set(everything) - set(classes):
            check.verdict, check.reason = "not comparable", f"the grid runs {len(classes)} of {len(everything)} classes"
        elif any(r.weights == RANDOM_WEIGHTS for r in runs if r.finished):
            check.verdict, check.reason = "not comparable", "random backbone weights"
        elif stat.missing:
            check.reason = "no finished run" if not any(r.finished for r in runs) else f"no {metric} in the runs"
        elif not stat.complete:
            check.reason = f"{stat.classes} of {stat.expected_classes} classes, {stat.seeds} of {stat.expected_seeds} seeds finished"
        else:
            check.delta = stat.mean - check.published
            check.tolerance = tolerance(stat.std)
            check.verdict = figure_verdict(stat.mean, check.published, check.tolerance)
            check.reason = f"{check.compared_at} epoch vs published {row['epoch_selection']}"
            if final_only:
                check.reason += " (computed on the final model only)"
        checks.append(check)
    return checks


# --------------------------------------------------------------------------- ablation claims


@dataclass
class Check:
    """One comparison inside a claim: ``a`` (and ``b``) are ablation rows (variant names, "default"
    for the reference run), ``kind`` greater | at_least | above | value."""

    metric: str
    a: str
    b: str = ""
    kind: str = "greater"  # a > b; at_least: a >= b; above: a >= target; value: a (- b) == target
    target: float = math.nan


@dataclass
class Claim:
    key: str
    statement: str
    checks: list[Check]
    absolute: bool = False  # compares with a published number: needs the whole dataset


@dataclass
class ClaimResult:
    key: str
    statement: str
    verdict: str
    detail: str
    difference: float = math.nan  # of the first check
    tolerance: float = math.nan


PRO = "aupro_code"  # MSFlow's PRO, in its code's convention


def claims(params: dict[str, Any]) -> list[Claim]:
    """The MSFlow paper's ablation conclusions (msflow.md 9.4), on the variants of params.yaml."""
    wide, small = _backbone_rows(params)
    top_k = [name for name, v in (params.get("ablations", {}).get("rescore") or {}).items()
             if 0.01 <= float((v.get("set") or {}).get("top_k", 0)) <= 0.10]
    return [
        Claim("stages_123_beat_23", "stages {1,2,3} beat {2,3} (detection and localisation)",
              [Check(m, "default", "stages_23") for m in ("image_auroc", "pixel_auroc")]),
        Claim("stage_4_hurts", "adding stage 4 is worse ({1,2,3} over {1,2,3,4}, {2,3} over {2,3,4})",
              [Check(m, a, b) for m in ("image_auroc", "pixel_auroc")
               for a, b in (("default", "stages_1234"), ("stages_23", "stages_234"))]),
        Claim("avg_pool_beats_max_for_pro", "average pooling beats max pooling for PRO (kernels 3, 5, 7)",
              [Check(PRO, "default", "pool_max"), Check(PRO, "pool_avg_k5", "pool_max_k5"),
               Check(PRO, "pool_avg_k7", "pool_max_k7")]),
        Claim("layernorm_beats_none_and_bn", "LayerNorm in the subnets beats none and BatchNorm",
              [Check(m, "default", b) for m in ("image_auroc", "pixel_auroc", PRO) for b in ("norm_none", "norm_bn")]),
        Claim("mul_for_image_add_for_pixel", "multiplication is better for image AUROC, addition for pixel AUROC",
              [Check("image_auroc", "default", "agg_add_add"), Check("pixel_auroc", "default", "agg_mul_mul")]),
        Claim("top_k_1_to_10_above_99_2", "every top-K from 1 % to 10 % keeps image AUROC above 99.2",
              [Check("image_auroc", name, kind="above", target=99.2) for name in ["default", *top_k]], absolute=True),
        Claim("full_mean_86_46", "the full-image mean gives image AUROC 86.46",
              [Check("image_auroc", "full_mean", kind="value", target=86.46)], absolute=True),
        Claim("fusion_raises_pro_2_3", "the fusion flow raises PRO by about 2.3",
              [Check(PRO, "default", "fusion_off", kind="value", target=2.3)]),
        Claim("fusion_keeps_detection", "the fusion flow does not lower detection",
              [Check("image_auroc", "default", "fusion_off", kind="at_least")]),
        Claim("wrn50_beats_resnet18", "WRN-50 beats ResNet-18",
              [Check(m, wide, small) for m in ("image_auroc", "pixel_auroc", PRO)]),
    ]


def _backbone_rows(params: dict[str, Any]) -> tuple[str, str]:
    """(WRN-50 row, ResNet-18 row) of the backbone ablation: the default is whichever the
    reference runs use (the demo's default is ResNet-18)."""
    variants = {n: v for n, v in (params.get("ablations", {}).get("train") or {}).items() if v.get("group") == "backbone"}
    wide = next((n for n, v in variants.items() if str(v.get("set", {}).get("backbone", "")).startswith("wide_resnet50")), "")
    small = next((n for n, v in variants.items() if str(v.get("set", {}).get("backbone", "")).startswith("resnet18")), "")
    return wide or "default", small or "default"


def check_claims(params: dict[str, Any], results: list[RunResult]) -> list[ClaimResult]:
    """Every claim of ``claims`` on the ablation runs (the fusion cost claim is separate)."""
    ablations = params.get("ablations") or {}
    dataset = ablations.get("dataset", "mvtec_ad")
    classes = list(ablations.get("classes") or [])
    rows = {"default": [r for r in results if r.run.part == "main" and r.run.method == grid.REFERENCE_METHOD
                        and r.run.protocol == grid.REFERENCE_PROTOCOL and r.run.dataset == dataset
                        and r.run.class_name in classes]}
    for r in results:
        if r.run.variant:
            rows.setdefault(r.run.variant, []).append(r)
    whole = dataset == "mvtec_ad" and set(dataset_classes(params, dataset)) <= set(classes)
    random = any(r.weights == RANDOM_WEIGHTS for runs in rows.values() for r in runs if r.finished)
    out = []
    for claim in claims(params):
        if random:
            out.append(ClaimResult(claim.key, claim.statement, "not comparable", "random backbone weights"))
            continue
        if claim.absolute and not whole:
            out.append(ClaimResult(claim.key, claim.statement, "not comparable",
                                   f"a published MVTec AD figure; the ablations run {len(classes)} classes of {dataset}"))
            continue
        out.append(_evaluate(claim, rows))
    return out


def _stat(rows: dict[str, list[RunResult]], name: str, metric: str) -> Stat | None:
    return class_mean_stat(rows[name], metric) if rows.get(name) else None


def _evaluate(claim: Claim, rows: dict[str, list[RunResult]]) -> ClaimResult:
    verdicts, details, first = [], [], (math.nan, math.nan)
    for check in claim.checks:
        a = _stat(rows, check.a, check.metric)
        b = _stat(rows, check.b, check.metric) if check.b else None
        label = f"{check.a}" + (f" - {check.b}" if check.b else "") + f" ({check.metric})"
        if a is None or (check.b and b is None):
            missing = check.a if a is None else check.b
            verdicts.append("not run")
            details.append(f"{label}: {missing} not in the grid")
            continue
        if not a.complete or (b is not None and not b.complete):
            verdicts.append("not run")
            details.append(f"{label}: runs not finished")
            continue
        value = a.mean - (b.mean if b is not None else 0.0)
        tol = tolerance(a.std, b.std if b is not None else math.nan)
        if check.kind == "greater":
            verdict = "holds" if value > tol else "contradicted" if value < -tol else "within tolerance"
        elif check.kind == "at_least":
            verdict = "holds" if value >= -tol else "contradicted"
        elif check.kind == "above":
            verdict = "holds" if value >= check.target else "contradicted" if value < check.target - tol \
                else "within tolerance"
        else:  # value
            verdict = "holds" if abs(value - check.target) <= tol else "contradicted"
        if math.isnan(first[0]):
            first = (value, tol)
        verdicts.append(verdict)
        target = "" if math.isnan(check.target) else f" vs {check.target:g}"
        details.append(f"{label} = {value:+.2f}{target} (tol {tol:.2f}): {verdict}")
    return ClaimResult(claim.key, claim.statement, combine(verdicts), "; ".join(details), *first)


def combine(verdicts: list[str]) -> str:
    for verdict in ("contradicted", "not run", "within tolerance"):
        if verdict in verdicts:
            return verdict
    return "holds" if verdicts else "not run"


@functools.lru_cache(maxsize=1)
def official_fusion_cost() -> dict[str, Any]:
    """harness.profile.fusion_vs_cross_scale for MSFlow's official configuration (shapes only, so
    the same for every grid: computed once per process)."""
    from harness.profile import fusion_vs_cross_scale

    return fusion_vs_cross_scale()


def fusion_cost_claim(cost: dict[str, Any]) -> ClaimResult:
    """-93 % flow compute of the fusion flow against CS-Flow's cross-scale flows on the same
    features, computed (not trained; harness.profile.fusion_vs_cross_scale)."""
    reduction = 100 * (1 - cost["fusion_flow"]["gmacs"] / cost["cross_scale_flow"]["gmacs"])
    tol = 2.0  # compute counted here (convolutions and matrix products) may differ from the paper's counter
    verdict = "holds" if reduction >= 93 - tol else "contradicted"
    return ClaimResult("fusion_flow_93pct_less_compute_than_cs_flow",
                       "the fusion flow needs 93 % less flow compute than CS-Flow's cross-scale flows",
                       verdict, f"fusion {cost['fusion_flow']['gmacs']:.2f} GMAC vs cross-scale "
                       f"{cost['cross_scale_flow']['gmacs']:.2f} GMAC at {size_label(cost['input_size'])} px: "
                       f"-{reduction:.1f} % (holds at a saving of at least 93 - {tol:.0f} %; computed by "
                       "`flowad info msflow --vs-csflow`)", -reduction, tol)


# --------------------------------------------------------------------------- the report


@dataclass
class Report:
    figures: list[FigureCheck]
    claims: list[ClaimResult]
    random_weight_runs: int = 0
    finished_runs: int = 0
    runs: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def figures_frame(self) -> pd.DataFrame:
        frame = pd.DataFrame([asdict(c) for c in self.figures], columns=list(FigureCheck.__dataclass_fields__))
        return frame.rename(columns={"class_name": "class"})

    def claims_frame(self) -> pd.DataFrame:
        return pd.DataFrame([asdict(c) for c in self.claims], columns=list(ClaimResult.__dataclass_fields__))

    def summary(self) -> dict[str, Any]:
        """verify.json: counts (DVC metrics) and the headline figures."""
        counts = {v.replace(" ", "_"): sum(c.verdict == v for c in self.figures) for v in FIGURE_VERDICTS}
        headline = {}
        for c in self.figures:
            if c.reference and c.class_name == "mean" or c.reference and c.dataset == "mtd":
                headline[f"{c.method}/{c.dataset}/{c.metric}"] = {
                    "published": c.published, "ours_last": _num(c.ours_last), "ours_best": _num(c.ours_best),
                    "delta": _num(c.delta), "tolerance": _num(c.tolerance), "verdict": c.verdict}
        return {
            "tolerance": {"floor": FLOOR, "seed_std_factor": K},
            "runs": {"finished": self.finished_runs, "expected": self.runs, "random_weights": self.random_weight_runs},
            "figures": {"total": len(self.figures), **counts},
            "claims": {"total": len(self.claims),
                       **{v.replace(" ", "_"): sum(c.verdict == v for c in self.claims) for v in CLAIM_VERDICTS}},
            "headline": headline,
            **self.extra,
        }


def _num(value: float) -> float | None:
    return None if value is None or math.isnan(value) else round(float(value), 4)


def verify(params: dict[str, Any], results: list[RunResult] | None = None,
           published: pd.DataFrame | None = None) -> Report:
    results = collect(params) if results is None else results
    if published is None:
        published = load_published(Path(params.get("paths", {}).get("published", "results/published")))
    # The paper's cost claim is about its own configuration (WRN-50 at 512 px), whatever the grid runs.
    cost = official_fusion_cost()
    return Report(check_figures(params, results, published),
                  [*check_claims(params, results), fusion_cost_claim(cost)],
                  random_weight_runs=sum(r.finished and r.weights == RANDOM_WEIGHTS for r in results),
                  finished_runs=sum(r.finished for r in results), runs=len(results),
                  extra={"fusion_cost": cost})


def results_folder(params: dict[str, Any]) -> Path:
    return Path(params.get("paths", {}).get("results", "results"))


def write_report(params_path: Path | str = grid.PARAMS) -> Report:
    """`flowad verify`: verify.csv (figures), verify_claims.csv, verify.json (counts, headline) and
    runs.csv (every run's metrics, tidy) in params.yaml paths.results."""
    params = grid.load(Path(params_path))
    results = collect(params)
    report = verify(params, results)
    out = results_folder(params)
    out.mkdir(parents=True, exist_ok=True)
    report.figures_frame().to_csv(out / FIGURES_FILE, index=False, float_format="%.4f")
    report.claims_frame().to_csv(out / CLAIMS_FILE, index=False, float_format="%.4f")
    (out / SUMMARY_FILE).write_text(json.dumps(report.summary(), indent=2) + "\n")
    write_tidy_runs(results, out / RUNS_FILE)
    return report


def read_report(params: dict[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """What `flowad verify` wrote, for the tables."""
    out = results_folder(params)
    paths = [out / FIGURES_FILE, out / CLAIMS_FILE, out / SUMMARY_FILE]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise ConfigError(f"{', '.join(missing)} not found: run `python -m harness verify` first "
                          "(`dvc repro` runs it before the tables)")
    figures = pd.read_csv(paths[0], keep_default_na=False, na_values={c: [""] for c in (
        "ours_last", "ours_last_std", "ours_best", "ours_best_std", "delta", "tolerance")})
    claims_frame = pd.read_csv(paths[1], keep_default_na=False, na_values={"difference": [""], "tolerance": [""]})
    return figures, claims_frame, json.loads(paths[2].read_text())

