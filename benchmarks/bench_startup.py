"""The fixed cost of one pipeline stage: what a training stage spends besides training and testing.

    python benchmarks/bench_startup.py                    # MSFlow's demo stages (official protocol)
    python benchmarks/bench_startup.py --method cflow --repeats 3

A stage is one process (`python -m harness run main ...`, as dvc.yaml runs it). This script builds
a folder with the demo's settings (harness.demo.demo_params: embedded data, ResNet-18 with random
weights at 64 px, MLflow tracking on), generates one embedded class, and runs two stage commands ``--repeats`` times each in fresh
processes (each run in a new runs folder, so nothing is resumed): a main-comparison run (which
draws its figures) and an MSFlow ablation run (``--variant``; ablation runs draw none by default),
each in a fresh interpreter (cold) and forked from the warm server that ``flowad repro`` starts
(warm, harness.warmstart; the server's own start is not counted, it is paid once per pipeline):

  wall        the whole process, interpreter start to exit
  work        training epochs and evaluations as the run records them (metrics.json:
              train_seconds, and test set size / test_images_per_second)
  fixed       wall - work: imports, settings, data checks and hash, model building, feature
              extraction, final metrics, maps, MLflow, figures

Then the main stage once more, cold, under cProfile, for the phases of the fixed part (cumulative seconds; cProfile
slows Python-heavy code, so the shares matter more than the sums). Writes
benchmarks/results/bench_startup.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness import warmstart  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# Functions whose cumulative time is a phase of a stage (matched on "file:function").
PHASES = {
    "imports (all)": ("<frozen importlib._bootstrap>", "_find_and_load"),
    "import mlflow": None,  # filled in from the import-time report
    "run set-up (with feature extraction)": ("harness/train.py", "_setup"),
    "feature extraction": ("harness/train.py", "extract_features"),
    "training epochs": ("harness/train.py", "_train_epoch"),
    "evaluations": ("harness/train.py", "evaluate"),
    "final metrics (fair threshold, mIoU)": ("harness/train.py", "_final_metrics"),
    "maps.npz": ("harness/train.py", "save_maps"),
    "figures": ("harness/train.py", "write_figures"),
    "mlflow run start": ("harness/tracking.py", "__enter__"),
    "mlflow logging": ("harness/tracking.py", "log_artifact"),
}


def stage_command(args, python: str, part: str = "main") -> list[str]:
    if part == "ablation":
        return [python, "-m", "harness", "run", "ablation", "--variant", args.variant, "--class", args.class_name,
                "--seed", "0"]
    return [python, "-m", "harness", "run", "main", "--protocol", args.protocol, "--dataset", "embedded",
            "--method", args.method, "--class", args.class_name, "--seed", "0"]


def make_project(folder: Path, methods: list[str], class_name: str) -> None:
    from harness.demo import demo_params
    from harness.synthetic import generate_embedded

    params = demo_params(folder, methods)
    params["datasets"]["embedded"]["classes"] = [class_name]
    params["ablations"]["classes"] = [class_name]
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    generate_embedded(folder / params["paths"]["data"] / "embedded", seed=0, classes=[class_name])


def work_seconds(run_dir: Path) -> float:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    work = 0.0
    for row in metrics["history"]:
        work += row["train_seconds"]
        if "test_images_per_second" in row:
            work += n_test_images(run_dir) / row["test_images_per_second"]
    return work


def n_test_images(run_dir: Path) -> int:
    import numpy as np

    with np.load(run_dir / "maps.npz") as maps:
        return len(maps["labels"])


def find_run(folder: Path) -> Path:
    (metrics,) = folder.glob("runs/**/metrics.json")
    return metrics.parent


def phases(profile: Path) -> dict[str, float]:
    stats = pstats.Stats(str(profile)).stats  # {(file, line, function): (cc, nc, tt, ct, callers)}
    out: dict[str, float] = {}
    for name, key in PHASES.items():
        if key is None:
            continue
        file_part, function = key
        times = [ct for (file, _, fn), (_, _, _, ct, _) in stats.items() if fn == function and file_part in file]
        out[name] = max(times, default=0.0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="msflow")
    parser.add_argument("--protocol", default="official")
    parser.add_argument("--class", dest="class_name", default="granite")
    parser.add_argument("--variant", default="pool_max", help="the MSFlow ablation variant to time")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="bench_startup_"))
    make_project(folder, sorted({args.method, "msflow"}), args.class_name)
    env = {k: v for k, v in os.environ.items() if k != warmstart.ENV}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    stages = {}
    with warmstart.server() as socket_path:
        time.sleep(20)  # let the server finish its imports, as it has by a pipeline's first training stage
        for part in ("main", "ablation"):
            for warm in (False, True):
                runs = []
                stage_env = {**env, warmstart.ENV: socket_path} if warm else env
                for i in range(args.repeats):
                    for old in folder.glob("runs/*"):
                        subprocess.run(["rm", "-rf", str(old)], check=True)
                    start = time.perf_counter()
                    subprocess.run(stage_command(args, args.python, part), cwd=folder, env=stage_env, check=True,
                                   capture_output=True)
                    wall = time.perf_counter() - start
                    work = work_seconds(find_run(folder))
                    runs.append({"wall_s": wall, "work_s": work, "fixed_s": wall - work})
                    print(f"{part} {'warm' if warm else 'cold'} run {i + 1}: wall {wall:.1f} s, training and tests "
                          f"{work:.1f} s, fixed {wall - work:.1f} s", flush=True)
                stages[f"{part}_{'warm' if warm else 'cold'}"] = {"runs": runs,
                                                                   "best": min(runs, key=lambda r: r["wall_s"])}

    for old in folder.glob("runs/*"):
        subprocess.run(["rm", "-rf", str(old)], check=True)
    profile = folder / "stage.prof"
    command = stage_command(args, args.python)
    command[1:1] = ["-m", "cProfile", "-o", str(profile)]
    subprocess.run(command, cwd=folder, env=env, check=True, capture_output=True)
    importtime = subprocess.run([args.python, "-X", "importtime", "-c", "import mlflow"], cwd=folder, env=env,
                                capture_output=True, text=True).stderr.strip().splitlines()
    mlflow_import = int(importtime[-1].split("|")[1]) / 1e6 if importtime else None
    breakdown = {**phases(profile), "import mlflow": mlflow_import}

    result = {"method": args.method, "protocol": args.protocol, "variant": args.variant, "class": args.class_name,
              "cpu_count": os.cpu_count(), "load_average_1min": os.getloadavg()[0], "stages": stages,
              "profiled_phases_s": breakdown}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_startup.json").write_text(json.dumps(result, indent=2) + "\n")
    for part, stage in stages.items():
        best = stage["best"]
        print(f"{part}: best of {args.repeats}: wall {best['wall_s']:.1f} s, fixed {best['fixed_s']:.1f} s")
    for name, seconds in breakdown.items():
        if seconds is not None:
            print(f"  {name:<40}{seconds:>7.2f} s (profiled)")
    print(f"wrote {args.out / 'bench_startup.json'}")


if __name__ == "__main__":
    main()
