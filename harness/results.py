"""The grid's finished runs as figures: one RunResult per run, statistics over classes and seeds,
and the tidy table of every run's metrics (results/runs.csv).

A run's figures are read from its metrics.json (x1 scale, as the loop writes them); everything
this module returns is in percent (x100), the scale of the published figures. Which weights a
run used and at which code revision come from its record.json, so a table built from runs with
random backbone weights can say so whatever the profile is.
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

RANDOM_WEIGHTS = "random"
PRETRAINED_WEIGHTS = "pretrained"
TIDY_COLUMNS = ["method", "dataset", "class", "protocol", "variant", "seed", "epoch_selection", "epoch",
                "metric", "value", "unit", "weights", "code_revision", "run"]
# Scores and rates (AUROC, PRO, mIoU, a detected fraction) are reported in percent; a run's other
# final numbers (its thresholds: log-likelihoods or log10 NFA) keep their own scale.
PERCENT = re.compile(r"auroc|aupro|miou|fraction")


def in_percent(metric: str) -> bool:
    return PERCENT.search(metric) is not None


@dataclass
class RunResult:
    run: GridRun
    last: dict[str, float] = field(default_factory=dict)  # percent
    best: dict[str, float] = field(default_factory=dict)  # percent, per-metric best epoch
    best_epoch: dict[str, float] = field(default_factory=dict)
    last_epoch: float = math.nan
    train_seconds_per_epoch: float = math.nan
    test_images_per_second: float = math.nan
    image_size: tuple[int, int] | None = None  # the input size the run trained at (metrics.json)
    weights: str = ""  # "pretrained" | "random" | "" (no record)
    weight_labels: list[str] = field(default_factory=list)  # "backbone: source label", from record.json
    code_revision: str = ""
    finished: bool = False


def _record_of(out_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """A run's record.json; a re-scored run has none and takes its reference run's."""
    for folder in (out_dir, Path(summary.get("rescored_from") or out_dir)):
        path = folder / "record.json"
        if path.exists():
            return json.loads(path.read_text())
    return {}


def weights_of(record: dict[str, Any]) -> str:
    """"random" when any frozen model of the run had random weights (a figure from partly random
    features is no reproduction either), else "pretrained"; "" for a run without a record."""
    used = [w for w in record.get("weights") or [] if isinstance(w, dict)]
    if used:
        return RANDOM_WEIGHTS if any(w.get("source") == "random" for w in used) else PRETRAINED_WEIGHTS
    settings = (record.get("config") or {}).get("settings") or {}
    if "pretrained" not in settings:
        return ""
    return PRETRAINED_WEIGHTS if settings["pretrained"] else RANDOM_WEIGHTS


def weight_labels_of(record: dict[str, Any]) -> list[str]:
    return [f"{w['backbone']}: {w['label']}" for w in record.get("weights") or [] if isinstance(w, dict)]


def weights_in_use(results: Iterable[RunResult]) -> str:
    """The backbone weights behind the finished runs, each with its run count, as a table says it."""
    counts: dict[str, int] = {}
    for r in results:
        if r.finished:
            for label in r.weight_labels or [r.weights or "unrecorded"]:
                counts[label] = counts.get(label, 0) + 1
    return "; ".join(f"{label} ({n} runs)" for label, n in sorted(counts.items()))


def read_run(run: GridRun) -> RunResult:
    path = run.out_dir / "metrics.json"
    if not path.exists():
        return RunResult(run)
    summary = json.loads(path.read_text())
    history = summary.get("history") or []
    record = _record_of(run.out_dir, summary)
    best = {k: v for k, v in (summary.get("best") or {}).items() if isinstance(v, dict)}
    result = RunResult(
        run,
        last={k: _scaled(k, v) for k, v in (summary.get("last") or {}).items() if _is_number(v)},
        best={k: _scaled(k, v["value"]) for k, v in best.items() if _is_number(v.get("value"))},
        best_epoch={k: float(v["epoch"]) for k, v in best.items() if _is_number(v.get("epoch"))},
        last_epoch=float(history[-1]["epoch"]) if history and _is_number(history[-1].get("epoch")) else math.nan,
        train_seconds_per_epoch=_mean(r.get("train_seconds") for r in history),
        test_images_per_second=_mean(r.get("test_images_per_second") for r in history),
        weights=weights_of(record),
        weight_labels=weight_labels_of(record),
        code_revision=str((record.get("code") or {}).get("revision", "")),
        image_size=tuple(summary["image_size"]) if len(summary.get("image_size") or []) == 2 else None,
        finished=True,
    )
    return result


def _scaled(metric: str, value: float) -> float:
    return 100 * float(value) if in_percent(metric) else float(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _mean(values: Iterable[Any]) -> float:
    kept = [float(v) for v in values if _is_number(v)]
    return float(np.mean(kept)) if kept else math.nan


def collect(params: dict[str, Any]) -> list[RunResult]:
    """Every run the grid expects, finished or not."""
    return [read_run(run) for run in [*grid.main_runs(params), *grid.ablation_runs(params)]]


def random_weight_runs(results: Iterable[RunResult]) -> int:
    return sum(r.finished and r.weights == RANDOM_WEIGHTS for r in results)


# --------------------------------------------------------------------------- statistics


@dataclass
class Stat:
    """A figure over seeds (each a class mean, or one class), in percent: mean, std and coverage."""

    mean: float = math.nan
    std: float = math.nan  # over seeds (ddof 1); nan with one seed
    seeds: int = 0
    classes: int = 0  # classes behind the mean (the smallest count over seeds)
    expected_classes: int = 0
    expected_seeds: int = 0

    @property
    def missing(self) -> bool:
        return self.seeds == 0

    @property
    def complete(self) -> bool:
        return not self.missing and self.classes == self.expected_classes and self.seeds == self.expected_seeds


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


# --------------------------------------------------------------------------- the tidy table


def tidy_runs(results: Iterable[RunResult]) -> pd.DataFrame:
    """One row per finished run, epoch selection and metric; ``value`` numeric only, in percent for
    scores and rates and on its own scale for thresholds (``unit``: percent | raw)."""
    rows = []
    for r in results:
        if not r.finished:
            continue
        run = r.run
        common = {"method": run.method, "dataset": run.dataset, "class": run.class_name,
                  "protocol": run.protocol, "variant": run.variant or "default",
                  "seed": grid.seed_value(run.seed) if run.seed != "own" else math.nan,
                  "weights": r.weights, "code_revision": r.code_revision, "run": run.out_dir.as_posix()}
        for selection, figures in (("last", r.last), ("best", r.best)):
            for metric, value in sorted(figures.items()):
                epoch = r.last_epoch if selection == "last" else r.best_epoch.get(metric, math.nan)
                rows.append({**common, "epoch_selection": selection, "epoch": epoch, "metric": metric,
                             "value": value, "unit": "percent" if in_percent(metric) else "raw"})
    frame = pd.DataFrame(rows, columns=TIDY_COLUMNS)
    return frame.astype({"seed": "float64", "epoch": "float64", "value": "float64"})


def write_tidy_runs(results: Iterable[RunResult], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tidy_runs(results).to_csv(path, index=False, float_format="%.6g")
    return path
