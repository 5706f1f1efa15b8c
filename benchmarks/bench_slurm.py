"""The cluster executor's cost: a tiny grid reproduced with ``flowad repro --executor slurm`` on a
single-node SLURM cluster started on this machine (tests/local_slurm.py; needs root and the
Debian packages slurm-wlm and munge), against ``flowad repro --jobs 2`` on the same machine.

    python benchmarks/bench_slurm.py                 # MSFlow, one class, official protocol + 3 ablations
    python benchmarks/bench_slurm.py --ablations 1   # smaller

Each side runs in a new folder from scratch (data stage, runs, re-scoring, tables). Per SLURM job
it reports the time from submission to the job's Python starting (scheduling, sbatch, srun, the
interpreter and submitit) and from there to ``dvc repro`` of its stage being done. Writes
benchmarks/results/bench_slurm.json. Random backbone weights, embedded data: this measures the
machinery, not training.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

from harness import demo, repro, slurm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import local_slurm  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SMALL_ABLATIONS = ["fusion_off", "pool_max", "norm_none", "blocks_222", "pool_avg_k5"]
TINY = {"backbone": "resnet18.tv_in1k", "input_size": [32, 32], "input_size_overrides": {},
        "parallel_blocks": [1, 1, 1], "batch_size": 20, "meta_epochs": 1, "sub_epochs": 1,
        "warmup_meta_epochs": 0}


def tiny_grid(out: Path, ablations: int, cpus_per_run: int) -> Path:
    demo.init_project(out, methods=["msflow"])
    params = yaml.safe_load((out / "params.yaml").read_text())
    params["datasets"]["embedded"]["classes"] = ["washer"]
    params["methods"]["msflow"]["all"] = dict(TINY)
    params["protocols"] = {"official": params["protocols"]["official"]}
    params["ablations"]["classes"] = ["washer"]
    train = SMALL_ABLATIONS[:ablations]  # variants that work at 32 px (stage 4 would be 1x1)
    params["ablations"]["train"] = {k: params["ablations"]["train"][k] for k in train}
    params["ablations"]["rescore"] = {"full_mean": params["ablations"]["rescore"]["full_mean"]}
    params["runtime"]["slurm"] = {"time": "30", "gpus_per_run": 0, "cpus_per_run": cpus_per_run,
                                  "mem_gb_per_run": 2, "max_jobs": 2, "poll_seconds": 1}
    (out / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return out


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ablations", type=int, default=3, help="MSFlow ablation runs besides the main run")
    parser.add_argument("--keep", action="store_true", help="keep the project folders")
    args = parser.parse_args()
    missing = local_slurm.missing()
    if missing:
        sys.exit(f"cannot start a local SLURM cluster: {missing}")

    root = Path(tempfile.mkdtemp(prefix="bench-slurm-"))
    cluster = local_slurm.LocalSlurm(root / "cluster").start()
    cpus = os.cpu_count() or 1
    try:
        local = tiny_grid(root / "jobs-2", args.ablations, max(1, cpus // 2))
        local_s = timed(lambda: repro.reproduce(local, jobs=2, progress=False))
        print(f"--jobs 2: {local_s:.1f} s", flush=True)
        on_slurm = tiny_grid(root / "slurm", args.ablations, max(1, cpus // 2))
        slurm_s = timed(lambda: repro.reproduce(on_slurm, executor="slurm", progress=False))
        print(f"--executor slurm: {slurm_s:.1f} s", flush=True)
        jobs = json.loads((on_slurm / slurm.SLURM_LOGS / "jobs.json").read_text())
    finally:
        cluster.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    # A job waits for a free slot (2 at a time): its overhead counts from when the slot was free.
    jobs.sort(key=lambda j: j["started"])
    finishes = sorted(j["finished"] for j in jobs)
    rows = []
    for i, j in enumerate(jobs):
        free = max(j["submitted"], finishes[i - 2]) if i >= 2 else j["submitted"]
        rows.append({"job_id": j["job_id"], "stages": j["stages"],
                     "slot_free_to_start_s": round(j["started"] - free, 2),
                     "start_to_dvc_done_s": round(j["finished"] - j["started"], 2),
                     "dvc_repro_s": j["stage_seconds"]})
    queue = [r["slot_free_to_start_s"] for r in rows]
    run = [r["start_to_dvc_done_s"] for r in rows]
    result = {
        "machine": platform.platform(), "cpus": cpus, "runs": len(rows), "max_jobs_at_once": 2,
        "wall_s": {"jobs_2": round(local_s, 1), "executor_slurm": round(slurm_s, 1)},
        "per_job": {"submit_to_start_s_median": round(statistics.median(queue), 2),
                    "submit_to_start_s_max": round(max(queue), 2),
                    "start_to_dvc_done_s_median": round(statistics.median(run), 2)},
        "jobs": rows,
        "note": "submit to start: from submission (or, for a job waiting for one of the 2 slots, from the "
                "end of the job that freed it) to the job's Python running our function: scheduling, "
                "sbatch, srun, interpreter and submitit start-up. Start to dvc done: `dvc repro` of the stage.",
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_slurm.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
