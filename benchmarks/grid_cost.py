"""GPU-hours of the whole grid in params.yaml, from measured seconds per training epoch.

    python benchmarks/grid_cost.py                          # every run at the reference log's MSFlow epoch
    python benchmarks/grid_cost.py --measured runs          # per-epoch seconds of the runs finished there
    python benchmarks/grid_cost.py --seconds-per-epoch 4.2  # one figure of your own

Every run of the grid (main comparison and retrained ablations, all seeds) is listed with its
epoch budget, resolved as the loop resolves it (the method's defaults, params.yaml overrides, the
protocol's settings). Its seconds per epoch come, in this order, from: finished runs under
``--measured`` (the mean ``train_seconds`` of their epochs, per method, protocol and dataset: run
a few classes on your cluster first), else ``--seconds-per-epoch``, else the one GPU figure
published for this grid's settings, MSFlow's own log: 16-51 minutes for 100 epochs of an MVTec AD
class at 512 px, i.e. 9.6-30.6 s per epoch on the authors' (unnamed) GPU, evaluations and the
recomputed backbone included. Which source each group used is printed, so an estimate is never
mistaken for a measurement. Writes benchmarks/results/grid_cost.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from harness import grid

RESULTS = Path(__file__).resolve().parent / "results"
REFERENCE_LOG = (9.6, 30.6)  # MSFlow, MVTec AD, 512 px: 16 and 51 minutes / 100 epochs
REFERENCE_SOURCE = "MSFlow reference log: 16-51 min / 100 epochs per MVTec AD class, 512 px (authors' GPU)"


def run_epochs(params: dict, run: grid.GridRun) -> int:
    settings = grid.run_settings(params, run)
    return settings.epochs or grid.method_config(grid.run_spec(params, run)).epochs


def measured_seconds(folder: Path) -> dict[tuple[str, str, str], float]:
    """Mean seconds per training epoch of the finished runs under ``folder``, per
    (method, protocol or ablation, dataset)."""
    found: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for metrics in folder.rglob("metrics.json"):
        summary = json.loads(metrics.read_text())
        seconds = [row["train_seconds"] for row in summary.get("history", []) if "train_seconds" in row]
        parts = metrics.relative_to(folder).parts
        part = parts[1] if parts[0] == "main" else "ablation" if parts[0] == "ablations" else None
        if seconds and part and summary.get("method") and summary.get("dataset"):
            found[(summary["method"], part, summary["dataset"])].append(statistics.mean(seconds))
    return {key: statistics.mean(values) for key, values in found.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--measured", type=Path, default=None, help="a runs folder holding finished runs")
    parser.add_argument("--seconds-per-epoch", type=float, default=None)
    args = parser.parse_args()

    params = grid.load(args.params)
    train = params["ablations"]["train"]
    runs = list(grid.main_runs(params)) + [r for r in grid.ablation_runs(params) if r.variant in train]
    measured = measured_seconds(args.measured) if args.measured else {}
    groups: dict[tuple[str, str, str], dict] = {}
    for run in runs:
        key = (run.method, run.protocol if run.part == "main" else "ablation", run.dataset)
        group = groups.setdefault(key, {"runs": 0, "epochs": 0})
        group["runs"] += 1
        group["epochs"] += run_epochs(params, run)
    rows, low, high = [], 0.0, 0.0
    for (method, part, dataset), group in groups.items():
        if (method, part, dataset) in measured:
            lo = hi = measured[(method, part, dataset)]
            source = f"measured: {args.measured}"
        elif args.seconds_per_epoch:
            lo = hi = args.seconds_per_epoch
            source = "--seconds-per-epoch"
        else:
            lo, hi = REFERENCE_LOG
            source = "estimate: " + REFERENCE_SOURCE
        low += group["epochs"] * lo / 3600
        high += group["epochs"] * hi / 3600
        rows.append({"method": method, "part": part, "dataset": dataset, **group,
                     "gpu_hours": [round(group["epochs"] * lo / 3600, 1), round(group["epochs"] * hi / 3600, 1)],
                     "seconds_per_epoch_source": source})
    result = {"runs": len(runs), "epochs": sum(g["epochs"] for g in groups.values()),
              "gpu_hours": [round(low), round(high)], "groups": rows}
    for row in rows:
        print(f"{row['method']:9s} {row['part']:9s} {row['dataset']:9s} {row['runs']:4d} runs {row['epochs']:6d} "
              f"epochs  {row['gpu_hours'][0]:7.1f}-{row['gpu_hours'][1]:7.1f} GPU-h  ({row['seconds_per_epoch_source']})")
    print(f"whole grid: {result['runs']} runs, {result['epochs']} epochs, {low:.0f}-{high:.0f} GPU-hours")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "grid_cost.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
