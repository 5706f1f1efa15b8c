"""The main job on the embedded dataset: offline, on a CPU, in a few minutes.

Generates the procedurally drawn dataset, validates it, trains MSFlow on every class with small
settings and writes a summary table. The backbone has random weights because no pretrained weights
can be assumed offline, so the figures show that the machinery works end to end and nothing more;
every file written says so.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from harness.config import RunSettings, RunSpec
from harness.data import validate_class
from harness.synthetic import EMBEDDED_CLASSES, generate_embedded
from harness.train import run_training

NOTICE = (
    "Embedded demo data (procedurally generated) and random backbone weights: these figures test "
    "the pipeline; they are not a reproduction of any published number."
)

# Small enough for 2 CPU cores; the architecture is MSFlow's, only sizes and budgets shrink.
DEMO_OVERRIDES = {
    "backbone": "resnet18.tv_in1k",
    "input_size": (128, 128),
    "input_size_overrides": {},
    "batch_size": 8,
    "meta_epochs": 3,
    "sub_epochs": 2,
    "warmup_meta_epochs": 1,
    "lr_milestones": (4, 5),
}


def run_demo(out: Path = Path("demo"), progress: bool = True) -> pd.DataFrame:
    data = generate_embedded(out / "data" / "embedded", seed=0)
    for name in EMBEDDED_CLASSES:
        validate_class(data, name)
    settings = RunSettings(device="cpu", pretrained=False, progress=progress, seed=0,
                           tracking_uri=f"sqlite:///{(out / 'mlflow.db').resolve().as_posix()}",
                           experiment="demo")
    rows = []
    for name in EMBEDDED_CLASSES:
        spec = RunSpec(method="msflow", data_root=data, class_name=name, dataset="embedded",
                       out_dir=out / "runs" / "msflow" / "embedded" / name, overrides=DEMO_OVERRIDES)
        summary = run_training(spec, settings, resume=True)  # a finished class is not re-run
        rows.append({"class": name, **{k: 100 * v for k, v in summary["last"].items()}})
    table = pd.DataFrame(rows).set_index("class")
    table.loc["mean"] = table.mean()
    results = out / "results"
    results.mkdir(parents=True, exist_ok=True)
    table.round(2).to_csv(results / "msflow_embedded.csv")
    markdown = table.round(2).to_markdown()
    (results / "msflow_embedded.md").write_text(
        f"# MSFlow on the embedded demo data (last epoch, x100)\n\n{NOTICE}\n\n{markdown}\n"
    )
    print(f"\n{NOTICE}\n\n{markdown}\n\nWritten to {results}; runs in {out / 'runs'}; "
          f"MLflow: mlflow ui --backend-store-uri sqlite:///{(out / 'mlflow.db').as_posix()}")
    return table
