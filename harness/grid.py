"""The experiment grid of params.yaml: which runs exist, where they live, and how one is executed.

dvc.yaml has one stage per run; each stage calls ``python -m harness run ...`` with the run's
coordinates, and this module turns them into a RunSpec and RunSettings from params.yaml. The
tables read the same module to know which runs the grid expects, so a missing run is reported as
"not run" rather than silently dropped.

Runs folder layout (under ``paths.runs``):
  main/<protocol>/<dataset>/<method>/<class>/seed-<seed>/   the main comparison
  ablations/<variant>/<class>/seed-<seed>/                  MSFlow ablations that retrain
  rescored/<variant>/<class>/seed-<seed>/                   MSFlow ablations re-scored from stored maps

Each run folder is what harness.train writes. A configuration's size and compute (trainable
parameters, forward GFLOPs) depend on its settings and input size only, so the tables stage counts
them once per row of its cost table (harness.tables.cost_table) rather than every run stage.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.config import RunSettings, RunSpec, check_keys, check_name, load_params
from harness.errors import ConfigError, HarnessError

PARAMS = Path("params.yaml")
REFERENCE_METHOD = "msflow"  # the ablations are MSFlow's
REFERENCE_PROTOCOL = "official"


@dataclass
class GridRun:
    """One training run (or one re-scored run) of the grid."""

    part: str  # "main" or "ablation"
    method: str
    dataset: str
    class_name: str
    seed: int | str  # as written in params.yaml ("own" = the method's default seed)
    out_dir: Path
    protocol: str = REFERENCE_PROTOCOL
    variant: str = ""  # ablation variant name ("" = main run)
    group: str = ""  # ablation group (stages, pooling, ...)
    overrides: dict[str, Any] = field(default_factory=dict)
    loop_settings: dict[str, Any] = field(default_factory=dict)  # epochs, eval_every, precision

    @property
    def finished(self) -> bool:
        return (self.out_dir / "metrics.json").exists()


# --------------------------------------------------------------------------- params


def load(path: Path = PARAMS) -> dict[str, Any]:
    return load_params(Path(path))


def _get(params: dict[str, Any], dotted: str) -> Any:
    value: Any = params
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            raise ConfigError(f"params.yaml has no setting {dotted!r} (missing {key!r})")
        value = value[key]
    return value


def seed_value(seed: int | str) -> int | None:
    """``"own"`` -> None (the method's own default seed); anything else must be an integer."""
    if seed in ("own", None):
        return None
    try:
        return int(seed)
    except (TypeError, ValueError):
        raise ConfigError(f"seed {seed!r} in params.yaml `seeds` is not an integer or 'own'") from None


def _runs_root(params: dict[str, Any]) -> Path:
    return Path(_get(params, "paths.runs"))


def _data_root(params: dict[str, Any], dataset: str) -> Path:
    return Path(_get(params, "paths.data")) / dataset


def method_overrides(params: dict[str, Any], protocol: str, dataset: str, method: str) -> dict[str, Any]:
    """The method's settings for one protocol and dataset, in the order they apply: the method's
    own overrides for every dataset, then for this dataset, then the protocol's."""
    merged: dict[str, Any] = {}
    for dotted in (f"methods.{method}.all", f"methods.{method}.{dataset}",
                   f"protocols.{protocol}.methods.{method}"):
        merged.update(_get(params, dotted) or {})
    return merged


# --------------------------------------------------------------------------- the runs


def main_run(params: dict[str, Any], protocol: str, dataset: str, method: str, class_name: str,
             seed: int | str) -> GridRun:
    _get(params, f"protocols.{protocol}")
    for kind, name in (("protocol", protocol), ("dataset", dataset), ("method", method),
                       ("class", class_name), ("seed", str(seed))):
        check_name(kind, name)  # each names a folder under paths.runs
    out = _runs_root(params) / "main" / protocol / dataset / method / class_name / f"seed-{seed}"
    overrides = method_overrides(params, protocol, dataset, method)
    return GridRun(
        part="main", method=method, dataset=dataset, class_name=class_name, seed=seed, out_dir=out,
        protocol=protocol, overrides=overrides,
        loop_settings=dict(_get(params, f"protocols.{protocol}.settings") or {}),
    )


def reference_run(params: dict[str, Any], class_name: str, seed: int | str) -> GridRun:
    """The default row of every ablation: the main official MSFlow run on the ablation dataset."""
    return main_run(params, REFERENCE_PROTOCOL, _get(params, "ablations.dataset"), REFERENCE_METHOD,
                    class_name, seed)


def ablation_run(params: dict[str, Any], variant: str, class_name: str, seed: int | str) -> GridRun:
    """A retrained ablation: the reference run's settings with the variant's ``set`` applied."""
    check_name("ablation variant", variant)
    entry = _get(params, f"ablations.train.{variant}")
    reference = reference_run(params, class_name, seed)
    return dataclasses.replace(
        reference, part="ablation", variant=variant, group=entry["group"],
        overrides={**reference.overrides, **(entry.get("set") or {})},
        out_dir=_runs_root(params) / "ablations" / variant / class_name / f"seed-{seed}",
    )


def rescored_run(params: dict[str, Any], variant: str, class_name: str, seed: int | str) -> GridRun:
    check_name("ablation variant", variant)
    entry = _get(params, f"ablations.rescore.{variant}")
    reference = reference_run(params, class_name, seed)
    return dataclasses.replace(
        reference, part="ablation", variant=variant, group=entry["group"],
        out_dir=_runs_root(params) / "rescored" / variant / class_name / f"seed-{seed}",
    )


def main_runs(params: dict[str, Any]) -> Iterator[GridRun]:
    for dataset, card in (params.get("datasets") or {}).items():
        for protocol in params.get("protocols") or {}:
            for method in params.get("methods") or {}:
                for class_name in card.get("classes") or []:
                    for seed in params.get("seeds") or []:
                        yield main_run(params, protocol, dataset, method, class_name, seed)


def ablation_runs(params: dict[str, Any]) -> Iterator[GridRun]:
    ablations = params.get("ablations") or {}
    for class_name in ablations.get("classes") or []:
        for seed in params.get("seeds") or []:
            for variant in ablations.get("train") or {}:
                yield ablation_run(params, variant, class_name, seed)
            for variant in ablations.get("rescore") or {}:
                yield rescored_run(params, variant, class_name, seed)


# --------------------------------------------------------------------------- execution


RUNTIME_KEYS = ("device", "precision", "compile", "channels_last", "workers", "feature_cache", "image_cache",
                "figures", "pretrained", "weights", "progress", "keep_checkpoints", "slurm")
TRACKING_KEYS = ("enabled", "uri", "experiment")
LOOP_KEYS = ("epochs", "eval_every", "precision")
# Which runs draw their own figures (ROC and PRO curves, map grid) at the end of training. An
# ablation run is one row of a table; its maps are stored all the same, and drawing costs a stage
# seconds. true / false are read as all / none.
FIGURES = ("main", "all", "none", True, False)
FEATURE_CACHE = {"auto": None, "on": True, "off": False, True: True, False: False}


def run_settings(params: dict[str, Any], run: GridRun) -> RunSettings:
    runtime = dict(params.get("runtime") or {})
    tracking = dict(params.get("tracking") or {})
    loop = run.loop_settings
    check_keys("params.yaml runtime", runtime, RUNTIME_KEYS)
    check_keys("params.yaml tracking", tracking, TRACKING_KEYS)
    check_keys(f"params.yaml protocols.{run.protocol}.settings", loop, LOOP_KEYS)
    cache = runtime.get("feature_cache", "auto")
    if not isinstance(cache, (str, bool)) or cache not in FEATURE_CACHE:
        raise ConfigError(f"params.yaml runtime.feature_cache={cache!r} must be auto, on or off")
    keep = runtime.get("keep_checkpoints", True)
    if not isinstance(keep, bool):
        raise ConfigError(f"params.yaml runtime.keep_checkpoints={keep!r} must be true or false (no quotes)")
    figures = runtime.get("figures", "main")
    if not isinstance(figures, (str, bool)) or figures not in FIGURES:
        raise ConfigError(f"params.yaml runtime.figures={figures!r} must be main (the main comparison's runs "
                          "only), all or none")
    experiment = tracking.get("experiment") or "flowad"
    experiment = f"{experiment}/{run.protocol}" if run.part == "main" else f"{experiment}/ablations"
    # The official protocol (and the ablations, whose default row is an official run) keeps the
    # reference precision unless its own settings name another; runtime.precision is for the rest.
    if run.protocol == REFERENCE_PROTOCOL:
        precision = loop.get("precision") or "fp32"
    else:
        precision = loop.get("precision") or runtime.get("precision", "fp32")
    return RunSettings(
        device=runtime.get("device", "auto"),
        precision=precision,
        compile=runtime.get("compile", False),
        channels_last=runtime.get("channels_last", False),
        image_cache=runtime.get("image_cache"),
        figures=figures in ("all", True) or (figures == "main" and run.part == "main"),
        workers=runtime.get("workers", 0),
        seed=seed_value(run.seed),
        feature_cache=FEATURE_CACHE[cache],
        epochs=loop.get("epochs"),
        eval_every=loop.get("eval_every"),
        pretrained=runtime.get("pretrained", True),  # RunSettings checks the types
        weights=dict(runtime.get("weights") or {}),
        progress=runtime.get("progress", False),
        tracking=tracking.get("enabled", True),
        tracking_uri=tracking.get("uri"),
        experiment=experiment,
    )


def run_spec(params: dict[str, Any], run: GridRun) -> RunSpec:
    return RunSpec(method=run.method, data_root=_data_root(params, run.dataset), class_name=run.class_name,
                   out_dir=run.out_dir, overrides=run.overrides, dataset=run.dataset)


def method_config(spec: RunSpec, seed: int | None = None) -> Any:
    """The config a run trains with (as the loop builds it, with the run seed)."""
    from harness.train import Trainer
    from methods.registry import create_method

    return create_method(spec.method, **Trainer._class_settings(spec, seed))


def _matches(out_dir: Path, spec: RunSpec, settings: RunSettings) -> bool:
    """Whether an unfinished run folder's checkpoint was written with these settings and this data
    (so it can be resumed); the same check ``train --resume`` makes."""
    from harness import checkpoint
    from harness.data import dataset_hash
    from harness.train import CHECKPOINT, Trainer

    path = out_dir / CHECKPOINT
    if not path.exists():
        return True  # nothing trained yet: nothing to contradict
    try:
        state = checkpoint.load(path)
    except checkpoint.CheckpointError:
        return False  # damaged: the run starts afresh
    trainer = Trainer(spec, settings)
    trainer.data_hash = dataset_hash(spec.data_root, spec.class_name)
    return state.get("identity") == trainer.run_identity()


def _finished_here(out_dir: Path, spec: RunSpec, settings: RunSettings) -> dict[str, Any] | None:
    """A finished run of these settings, data and code (killed before DVC recorded its stage), or
    None. Its MLflow run is closed as FINISHED, since the kill may have come before that."""
    from harness.data import dataset_hash
    from harness.tracking import code_revision
    from harness.train import METRICS, RECORD, Trainer

    try:
        summary = json.loads((out_dir / METRICS).read_text())
        recorded_code = json.loads((out_dir / RECORD).read_text())["code"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    code = code_revision()
    if code["revision"] == "unknown" or any(recorded_code.get(k) != code[k] for k in ("revision", "diff_sha256")):
        return None  # other code (or unknown code): DVC re-ran the stage for a reason
    trainer = Trainer(spec, settings)
    trainer.data_hash = dataset_hash(spec.data_root, spec.class_name)
    if summary.get("identity") != trainer.run_identity():
        return None
    _end_tracking(out_dir, settings, "FINISHED")
    return summary


def _end_tracking(out_dir: Path, settings: RunSettings, status: str) -> None:
    """Close the MLflow run a run folder names (a killed process leaves it RUNNING)."""
    from harness.tracking import Tracker, default_tracking_uri
    from harness.train import TRACKING_ID

    id_file = out_dir / TRACKING_ID
    if not settings.tracking or not id_file.is_file():
        return
    tracker = Tracker(uri=settings.tracking_uri or default_tracking_uri(), experiment=settings.experiment,
                      run_id=id_file.read_text().strip())
    try:
        tracker.start()
    except HarnessError:
        return  # the run is gone from the store: nothing left RUNNING
    tracker.end(status)


def labels(params: dict[str, Any], run: GridRun) -> dict[str, Any]:
    """What a run is in the grid, for its MLflow tags and name."""
    return {"protocol": run.protocol, "variant": run.variant or "default",
            "demo": params.get("profile") == "demo", "part": run.part}


def execute(params: dict[str, Any], run: GridRun, resume: bool = True) -> dict[str, Any]:
    """Train one run of the grid (the body of a dvc.yaml run stage).

    DVC runs a stage when the run is missing or out of date. Run folders persist across stage
    runs, so: an unfinished folder with the same settings and data is continued (``resume``); a
    finished one of the same settings, data and code is kept (the stage was killed before DVC
    recorded it); a folder with other settings, data or code is started afresh."""
    from harness.train import run_training

    spec, settings = run_spec(params, run), run_settings(params, run)
    summary = _finished_here(run.out_dir, spec, settings)
    if summary is None:
        if run.out_dir.exists() and (run.finished or not resume or not _matches(run.out_dir, spec, settings)):
            _end_tracking(run.out_dir, settings, "KILLED")  # its MLflow run would stay RUNNING
            shutil.rmtree(run.out_dir)
        summary = run_training(spec, settings, resume=resume, labels=labels(params, run))
    if not (params.get("runtime") or {}).get("keep_checkpoints", True):
        # maps.npz keeps what the tables and the scoring ablations need; the checkpoint (model and
        # optimiser state) is only for re-evaluation and can be large.
        (run.out_dir / "checkpoint.pt").unlink(missing_ok=True)
    return summary


def rescore(params: dict[str, Any], variants: list[str] | None = None) -> list[Path]:
    """The scoring ablations: every reference run's stored maps re-scored with each variant's
    ScoringSpec fields (default: every variant of ``ablations.rescore``); writes a metrics.json
    per variant, class and seed (last epoch only: maps are stored for the final model)."""
    from harness.train import atomic_write_json, rescore_many

    entries = _get(params, "ablations.rescore") or {}
    for variant in variants or []:
        _get(params, f"ablations.rescore.{variant}")
    variants = list(variants or entries)
    written = []
    for class_name in _get(params, "ablations.classes") or []:
        for seed in params.get("seeds") or []:
            reference = reference_run(params, class_name, seed)
            spec = run_spec(params, reference)
            own = method_config(spec).scoring()
            scorings = []
            for variant in variants:
                try:
                    scorings.append(dataclasses.replace(own, **(entries[variant].get("set") or {})))
                except TypeError as err:
                    raise ConfigError(f"ablations.rescore.{variant}.set: {err}; use ScoringSpec fields "
                                      "(image_aggregation, pixel_aggregation, pro_aggregation, top_k, ...)") from err
            for variant, scoring, metrics in zip(variants, scorings, rescore_many(spec, scorings)):
                run = rescored_run(params, variant, class_name, seed)
                atomic_write_json(run.out_dir / "metrics.json", {
                    "method": reference.method, "dataset": reference.dataset, "class": class_name,
                    "seed": seed, "variant": variant, "scoring": dataclasses.asdict(scoring),
                    "rescored_from": str(reference.out_dir), "last": metrics, "best": {}, "history": [],
                })
                _track_rescored(params, run, reference, scoring, metrics)
                written.append(run.out_dir)
    return written


def _track_rescored(params: dict[str, Any], run: GridRun, reference: GridRun, scoring: Any,
                    metrics: dict[str, float]) -> None:
    """A re-scored variant as an MLflow run of its own, beside the retrained ablations: its
    scoring as params, its metrics, and the reference run's record (code, data, weights)."""
    from harness.tracking import Tracker, default_tracking_uri, run_name

    settings = run_settings(params, run)
    if not settings.tracking:
        return
    record_path = reference.out_dir / "record.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    seed = record.get("seed", run.seed)
    tags = {**labels(params, run), "part": "rescored", "rescored_from": str(reference.out_dir), "seed": seed}
    tags["demo"] = str(tags["demo"]).lower()
    with Tracker(uri=settings.tracking_uri or default_tracking_uri(), experiment=settings.experiment,
                 run_name=run_name(run.method, run.dataset, run.class_name, f"rescored:{run.variant}", seed),
                 tags=tags) as tracker:
        tracker.log_params({"method": run.method, "dataset": run.dataset, "class": run.class_name,
                            "scoring": dataclasses.asdict(scoring)})
        if record:
            tracker.log_record(record)
        tracker.log_metrics(metrics, step=0)


def prepare_dataset(name: str, data_root: Path) -> Path:
    """Install one dataset of the grid: the embedded one is generated, the others fetched."""
    if name == "embedded":
        from harness.synthetic import generate_embedded

        return generate_embedded(Path(data_root) / name, seed=0)
    from harness.fetch import fetch

    return fetch(name, data_root=data_root)


# --------------------------------------------------------------------------- DVC metrics and figures


def collect_metrics(params: dict[str, Any]) -> list[Path]:
    """Every finished run's figures, one small JSON file per run in ``paths.metrics``
    (``<run key>.json``: ``last`` = the last epoch, ``best`` and ``best_epoch`` = the per-metric
    best epoch), the folder dvc.yaml declares as metrics: ``dvc metrics show|diff`` and ``dvc exp
    show`` read these. The run folders hold more (history, records, checkpoints) than DVC
    should read as metrics."""
    from harness.train import METRICS, atomic_write_json

    folder = Path(_get(params, "paths.metrics"))
    if folder.exists():
        shutil.rmtree(folder)  # a stage output: written whole, nothing stale left behind
    written = []
    for run in [*main_runs(params), *ablation_runs(params)]:
        if not run.finished:
            continue
        summary = json.loads((run.out_dir / METRICS).read_text())
        numbers = {k: v for k, v in (summary.get("last") or {}).items() if isinstance(v, (int, float))}
        best = summary.get("best") or {}
        entry = {"last": numbers, "best": {k: b["value"] for k, b in best.items()},
                 "best_epoch": {k: b["epoch"] for k, b in best.items()}}
        key = run_key(run) if "rescored" not in run.out_dir.parts else f"rescored_{run_key(run)}"
        path = folder / f"{key}.json"
        atomic_write_json(path, entry)
        written.append(path)
    return written




def run_key(run: GridRun) -> str:
    """A run's name in file names: ``official-embedded-msflow-washer-seed-0``."""
    what = run.protocol if not run.variant else run.variant
    return f"{what}-{run.dataset}-{run.method}-{run.class_name}-seed-{run.seed}"


def figures(params: dict[str, Any]) -> list[Path]:
    """The pipeline's figures: per class and protocol, one map grid with a row per method, from
    the finished runs' stored maps (``paths.figures``, PNG and PDF); and every finished run's ROC
    and PRO curve data (``paths.plots``/roc, /pro; CSV), which ``dvc plots`` shows."""
    from harness.figures import class_figure

    figures_dir, plots_dir = Path(_get(params, "paths.figures")), Path(_get(params, "paths.plots"))
    for folder in (figures_dir, plots_dir):
        if folder.exists():
            shutil.rmtree(folder)  # a stage output: written whole, nothing stale left behind
    written: list[Path] = []
    groups: dict[tuple, list[GridRun]] = {}
    for run in [*main_runs(params), *(r for r in ablation_runs(params) if r.variant in
                                      (_get(params, "ablations").get("train") or {}))]:
        if not run.finished:
            continue
        for curve in ("roc_image", "pro_curve"):
            source = run.out_dir / "artifacts" / f"{curve}.csv"
            if source.exists():
                target = plots_dir / curve.split("_")[0] / f"{run_key(run)}.csv"
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
                written.append(target)
        if run.part == "main":
            groups.setdefault((run.protocol, run.dataset, run.class_name, run.seed), []).append(run)
    for (protocol, dataset, class_name, seed), runs in groups.items():
        panels = _class_panels(params, runs)
        if panels is None:
            continue
        images, masks, captions, methods = panels
        label = (params.get("datasets", {}).get(dataset) or {}).get("label", dataset)
        title = f"{label} / {class_name}, {protocol} protocol, seed {seed}"
        if params.get("profile") == "demo":
            title += " (demo: generated data, random weights)"
        written += class_figure(images, masks, captions, methods,
                                figures_dir / f"{protocol}-{dataset}-{class_name}-seed-{seed}", title=title,
                                by_format=True)
    return written


def _class_panels(params: dict[str, Any], runs: list[GridRun]):
    """The test images of one class, sampled across defect types, and each run's maps of them."""
    import numpy as np

    from harness.data import AnomalyDataset
    from harness.figures import Sample, normalise, sample_across_defects
    from harness.scoring import score
    from harness.train import MAPS, METRICS, Trainer, load_maps

    methods: dict[str, list[Any]] = {}
    picks = test_set = None
    for run in runs:
        spec = run_spec(params, run)
        if not (run.out_dir / MAPS).exists():
            continue
        trainer = Trainer(spec, RunSettings(tracking=False, progress=False, device="cpu"))
        stored = load_maps(run.out_dir / MAPS)
        scores = score(stored.log_likelihoods, trainer.image_size, trainer.config.scoring())
        threshold = json.loads((run.out_dir / METRICS).read_text())["last"].get("fair_threshold")
        if test_set is None:
            # the images at the first run's resolution; every map is resized to it when drawn
            test_set = AnomalyDataset(spec.data_root, run.class_name, "test", trainer.image_size, validate=False)
            picks = sample_across_defects([r.defect for r in test_set.records])
        maps = scores.pro_map.float().numpy()
        scale = normalise(maps)
        image_scores = scores.image.float().numpy()
        methods[run.method] = [
            Sample(image=None, mask=None, anomaly_map=scale[i],
                   predicted=None if threshold is None else maps[i] > threshold, defect="", name="",
                   score=float(image_scores[i])) for i in picks]
    if not methods:
        return None
    items = [test_set[i] for i in picks]
    images = [item["image"] for item in items]
    masks = [item["mask"][0].numpy() for item in items]
    captions = [f"{test_set.records[i].defect}\n{Path(test_set.records[i].path).name}" for i in picks]
    return images, masks, captions, methods
