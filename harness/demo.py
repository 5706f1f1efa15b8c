"""The main job on the embedded dataset: the real pipeline (dvc.yaml), offline, on a CPU.

The demo is a DVC project of its own in ``demo/``: ``dvc.yaml`` there is a link to the project's
dvc.yaml (the same stages and the same code), and ``demo/params.yaml`` is the project's
params.yaml with small settings: the generated embedded dataset instead of MVTec AD / MTD / mSTC,
ResNet-18 with random weights at 64 px, two epochs, every registered method, every ablation on one
class. The pipeline is then reproduced there as for real data, one training run per CPU core at a
time (harness.repro: each stage is still run by ``dvc repro``), so running the demo again does
nothing, and editing one setting in demo/params.yaml re-runs only the stages it affects.

The backbone has random weights because no pretrained weights can be assumed offline: the figures
show that the machinery works end to end and nothing more; every table says so.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from filelock import FileLock

from harness.errors import HarnessError
from harness.repro import dvc_environment, reproduce

PROJECT = Path(__file__).resolve().parents[1]
NOTICE = (
    "Embedded demo data (procedurally generated) and random backbone weights: these figures test "
    "the pipeline; they are not a reproduction of any published number."
)
PAPER_ORDER = ["msflow", "cflow", "fastflow", "csflow", "uflow"]  # table order
DEMO_CLASSES = ["washer"]  # one object class keeps the demo within minutes on 2 CPU cores
ABLATION_CLASSES = ["washer"]
EPOCHS = 2

# Every method at toy size: ResNet-18 (random weights) at 64 px, two epochs. Only sizes and
# budgets shrink; each method's architecture and scoring stay its own.
DEMO_METHOD_SETTINGS: dict[str, dict[str, Any]] = {
    "msflow": {"backbone": "resnet18.tv_in1k", "input_size": [64, 64], "input_size_overrides": {},
               "batch_size": 8, "meta_epochs": 1, "sub_epochs": EPOCHS, "warmup_meta_epochs": 0},
    "cflow": {"backbone": "resnet18.tv_in1k", "input_size": [64, 64], "input_size_overrides": {},
              "coupling_blocks": 2, "cond_channels": 16, "fiber_batch_size": 16, "batch_size": 8,
              "meta_epochs": 1, "sub_epochs": EPOCHS, "warmup_meta_epochs": 0},
    "fastflow": {"backbone": "resnet18.tv_in1k", "input_size": [64, 64], "flow_steps": 2, "batch_size": 8,
                 "epochs": EPOCHS, "eval_every": EPOCHS},
    # CS-Flow sees the image at 1, 1/2 and 1/4 size through one stride-32 stage: 128 px is the least.
    "csflow": {"backbone": "efficientnet_b0.ra_in1k", "block_stage": 5, "input_size": [128, 128],
               "kernel_sizes": [3, 3], "hidden_channels": 32, "batch_size": 8, "meta_epochs": 1,
               "sub_epochs": EPOCHS},
    "uflow": {"backbone": "resnet18.tv_in1k", "input_size": [64, 64], "blocks_per_stage": 2, "batch_size": 8,
              "lr": 1e-3, "epochs": EPOCHS, "eval_every": EPOCHS, "nfa_size": None},
}


def demo_params(out: Path, methods: list[str]) -> dict[str, Any]:
    """The project's params.yaml with the demo's data, sizes and budgets."""
    with (PROJECT / "params.yaml").open() as f:
        params = yaml.safe_load(f)
    demo = copy.deepcopy(params)
    demo["profile"] = "demo"
    code = os.path.relpath(PROJECT, out.resolve())
    demo["paths"] = {"code": Path(code).as_posix(), "data": "data", "runs": "runs",
                     "published": (Path(code) / "results" / "published").as_posix(), "tables": "results"}
    demo["prepare"] = {"embedded": "harness/synthetic.py"}
    for card in demo["datasets"].values():
        card["classes"] = []
    demo["datasets"]["embedded"]["classes"] = list(DEMO_CLASSES)
    demo["runtime"] = {"device": "cpu", "precision": "fp32", "workers": 0, "feature_cache": "auto",
                       "pretrained": False, "progress": False, "keep_checkpoints": False}
    demo["tracking"] = {"enabled": True, "uri": None, "experiment": "demo"}
    demo["methods"] = {m: {"all": dict(DEMO_METHOD_SETTINGS.get(m, {})), "mvtec_ad": {}, "mtd": {}, "mstc": {},
                           "embedded": {}} for m in methods}
    demo["seeds"] = [0]
    demo["protocols"] = {
        "official": {"settings": {}, "methods": {m: {} for m in methods}},
        # One backbone (ResNet-18 via each method's demo settings), one budget (a single epoch, so
        # that its rows differ from the official ones), one precision.
        "unified": {"settings": {"epochs": 1, "eval_every": 1, "precision": "fp32"},
                    "methods": {m: {} for m in methods}},
    }
    ablations = demo["ablations"]
    ablations["dataset"] = "embedded"
    ablations["classes"] = list(ABLATION_CLASSES)
    # The demo's default backbone is ResNet-18, so the backbone ablation flips to WRN-50.
    ablations["groups"]["backbone"]["default"] = "ResNet-18"
    # It is the slowest run, so it comes first: started early, it does not hold up the end.
    wide = {"group": "backbone", "label": "WRN-50", "set": {"backbone": "wide_resnet50_2.tv_in1k"}}
    ablations["train"] = {"wide_resnet50_2": wide, **{k: v for k, v in ablations["train"].items()
                                                      if v.get("group") != "backbone"}}
    return demo


def _write_params(path: Path, params: dict[str, Any]) -> None:
    header = (f"# Demo settings, written by `flowad demo` from the project's params.yaml. {NOTICE}\n"
              "# Edit freely: `flowad demo` (or `dvc repro` in this folder) re-runs only what changed.\n")
    path.write_text(header + yaml.safe_dump(params, sort_keys=False, default_flow_style=None, width=110))


def init_project(out: Path, methods: list[str] | None = None) -> Path:
    """Create the demo's DVC project (once): dvc init, the link to dvc.yaml, demo params.yaml.
    An existing params.yaml is kept, so that edits to it survive."""
    from methods.registry import list_methods

    out.mkdir(parents=True, exist_ok=True)
    env = dvc_environment()
    if not (out / ".dvc").exists():
        subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "--quiet"], cwd=out, env=env, check=True)
        subprocess.run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], cwd=out, env=env,
                       check=True)
    link = out / "dvc.yaml"
    if not link.exists():
        try:
            link.symlink_to(os.path.relpath(PROJECT / "dvc.yaml", out.resolve()))
        except OSError:  # no symbolic links (some Windows setups): a copy of the same file
            shutil.copyfile(PROJECT / "dvc.yaml", link)
    if not (out / "params.yaml").exists():
        registered = list_methods()
        ordered = [m for m in PAPER_ORDER if m in registered] + [m for m in registered if m not in PAPER_ORDER]
        _write_params(out / "params.yaml", demo_params(out, methods or ordered))
    return out


def default_jobs() -> int:
    """Training runs at a time: one per CPU core (the runs are small), at most four."""
    return max(1, min(4, os.cpu_count() or 1))


def run_demo(out: Path = Path("demo"), progress: bool = True, jobs: int | None = None) -> Path:
    """Run the demo pipeline in ``out``, ``jobs`` training runs at a time (default: one per CPU
    core, at most four); returns the folder of its tables."""
    if not (PROJECT / "dvc.yaml").exists():
        raise HarnessError(f"{PROJECT / 'dvc.yaml'} not found: run the demo from a checkout of the project")
    out = Path(out)
    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    # Two demos started at once in one folder take turns (dvc init and DVC's own lock would
    # otherwise fail the second one); the second then finds the pipeline up to date.
    with FileLock(out.parent / f".{out.name}.lock"):
        init_project(out)
        reproduce(out, jobs=jobs or default_jobs(), progress=progress)
    tables = out / "results"
    print(f"\n{NOTICE}\n\nDemo pipeline finished in {time.perf_counter() - start:.0f} s. Tables: "
          f"{tables / 'README.md'}; runs: {out / 'runs'}; settings: {out / 'params.yaml'}.\n"
          f"MLflow: mlflow ui --backend-store-uri sqlite:///{(out / 'mlflow.db').as_posix()}")
    return tables
