"""Wall time of the whole demo pipeline from an empty folder: every stage one after another (a plain
``dvc repro``, ``--jobs 1``) against several training runs at a time (``--jobs N``), each with the
stages forked from the warm server (harness.warmstart) and, with ``--cold``, also each stage in a
fresh interpreter; and the second run, which has nothing to do.

    python benchmarks/bench_pipeline.py --jobs 1 2
    python benchmarks/bench_pipeline.py --jobs 2 --cold

Each setting runs in its own new folder under a temporary directory (deleted afterwards unless
--keep). Writes benchmarks/results/bench_pipeline.json. Random backbone weights, embedded data:
this measures the pipeline's machinery (process start-up, DVC, training at toy size, tables).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from harness.demo import run_demo

RESULTS = Path(__file__).resolve().parent / "results"


def timed_demo(out: Path, jobs: int, warm_start: bool = True) -> float:
    start = time.perf_counter()
    run_demo(out, progress=False, jobs=jobs, warm_start=warm_start)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cold", action="store_true", help="also time every setting without the warm server")
    parser.add_argument("--keep", action="store_true", help="keep the demo folders")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    rows = []
    try:
        for jobs in args.jobs:
            for warm in (True, False) if args.cold else (True,):
                out = root / f"demo-jobs-{jobs}-{'warm' if warm else 'cold'}"
                first = timed_demo(out, jobs, warm)
                second = timed_demo(out, jobs, warm)
                rows.append({"jobs": jobs, "warm_start": warm, "first_run_s": round(first, 1),
                             "second_run_s": round(second, 1)})
                print(f"--jobs {jobs} {'warm' if warm else 'cold'}: {first:.0f} s from an empty folder, "
                      f"{second:.0f} s the second time", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    base = next((r["first_run_s"] for r in rows if r["jobs"] == 1 and r["warm_start"]), None)
    cold = {r["jobs"]: r["first_run_s"] for r in rows if not r["warm_start"]}
    for row in rows:
        row["speed_up_vs_jobs_1"] = round(base / row["first_run_s"], 2) if base else None
        if row["warm_start"] and row["jobs"] in cold:
            row["speed_up_vs_cold"] = round(cold[row["jobs"]] / row["first_run_s"], 2)
    result = {"cpus": os.cpu_count(), "machine": platform.platform(), "load_average_1min": os.getloadavg()[0],
              "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_pipeline.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
