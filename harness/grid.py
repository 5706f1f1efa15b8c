"""The experiment grid of params.yaml: which runs exist, where they live, and how one is executed.

dvc.yaml has one stage per run; each stage calls ``python -m harness run ...`` with the run's
coordinates, and this module turns them into a RunSpec and RunSettings from params.yaml. The
tables read the same module to know which runs the grid expects, so a missing run is reported as
"not run" rather than silently dropped.

Runs folder layout (under ``paths.runs``):
  main/<protocol>/<dataset>/<method>/<class>/seed-<seed>/   the main comparison
  ablations/<variant>/<class>/seed-<seed>/                  MSFlow ablations that retrain
  rescored/<variant>/<class>/seed-<seed>/                   MSFlow ablations re-scored from stored maps

Each run folder is what harness.train writes, plus ``cost.json`` (trainable parameters and forward
compute of that configuration).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.config import RunSettings, RunSpec, load_params, to_dict
from harness.errors import ConfigError

PARAMS = Path("params.yaml")
COST = "cost.json"
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
    entry = _get(params, f"ablations.train.{variant}")
    reference = reference_run(params, class_name, seed)
    return dataclasses.replace(
        reference, part="ablation", variant=variant, group=entry["group"],
        overrides={**reference.overrides, **(entry.get("set") or {})},
        out_dir=_runs_root(params) / "ablations" / variant / class_name / f"seed-{seed}",
    )


def rescored_run(params: dict[str, Any], variant: str, class_name: str, seed: int | str) -> GridRun:
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


def run_settings(params: dict[str, Any], run: GridRun) -> RunSettings:
    runtime = dict(params.get("runtime") or {})
    tracking = dict(params.get("tracking") or {})
    loop = run.loop_settings
    cache = runtime.get("feature_cache", "auto")
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
        compile=bool(runtime.get("compile", False)),
        channels_last=bool(runtime.get("channels_last", False)),
        image_cache=runtime.get("image_cache"),
        figures=bool(runtime.get("figures", True)),
        workers=int(runtime.get("workers", 0)),
        seed=seed_value(run.seed),
        feature_cache={"auto": None, "on": True, "off": False, True: True, False: False}[cache],
        epochs=loop.get("epochs"),
        eval_every=loop.get("eval_every"),
        pretrained=bool(runtime.get("pretrained", True)),
        progress=bool(runtime.get("progress", False)),
        tracking=bool(tracking.get("enabled", True)),
        tracking_uri=tracking.get("uri"),
        experiment=experiment,
    )


def run_spec(params: dict[str, Any], run: GridRun) -> RunSpec:
    return RunSpec(method=run.method, data_root=_data_root(params, run.dataset), class_name=run.class_name,
                   out_dir=run.out_dir, overrides=run.overrides, dataset=run.dataset)


def method_config(spec: RunSpec) -> Any:
    """The config a run trains with (as the loop builds it)."""
    from harness.train import Trainer
    from methods.registry import create_method

    return create_method(spec.method, **Trainer._class_settings(spec))


def _matches(out_dir: Path, spec: RunSpec, settings: RunSettings) -> bool:
    """Whether an unfinished run folder was started with these settings (so it can be resumed)."""
    record_path = out_dir / "record.json"
    if not record_path.exists():
        return True  # nothing recorded yet: nothing to contradict
    record = json.loads(record_path.read_text())
    config = method_config(spec)
    seed = settings.seed if settings.seed is not None else config.seed
    recorded = record.get("config", {})
    return (recorded.get("method_config") == json.loads(json.dumps(to_dict(config)))
            and int(record.get("seed", -1)) == int(seed)
            and recorded.get("epochs") == (settings.epochs or config.epochs))


def execute(params: dict[str, Any], run: GridRun, resume: bool = True) -> dict[str, Any]:
    """Train one run of the grid (the body of a dvc.yaml run stage) and write its cost.json.

    DVC runs a stage when the run is missing or out of date. Run folders persist across stage
    runs, so: an unfinished folder with the same settings is continued (``resume``); a folder
    with other settings, or a finished one (DVC re-runs a finished run only when its settings,
    data or code changed), is started afresh."""
    from harness.profile import method_info
    from harness.train import atomic_write_json, run_training

    spec, settings = run_spec(params, run), run_settings(params, run)
    if run.out_dir.exists() and (run.finished or not resume or not _matches(run.out_dir, spec, settings)):
        shutil.rmtree(run.out_dir)
    summary = run_training(spec, settings, resume=resume)
    cost = method_info(run.method, spec.overrides, class_name=run.class_name)
    atomic_write_json(run.out_dir / COST, cost)
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
                out = rescored_run(params, variant, class_name, seed).out_dir
                atomic_write_json(out / "metrics.json", {
                    "method": reference.method, "dataset": reference.dataset, "class": class_name,
                    "seed": seed, "variant": variant, "scoring": dataclasses.asdict(scoring),
                    "rescored_from": str(reference.out_dir), "last": metrics, "best": {}, "history": [],
                })
                written.append(out)
    return written


def prepare_dataset(name: str, data_root: Path) -> Path:
    """Install one dataset of the grid: the embedded one is generated, the others fetched."""
    if name == "embedded":
        from harness.synthetic import generate_embedded

        return generate_embedded(Path(data_root) / name, seed=0)
    from harness.fetch import fetch

    return fetch(name, data_root=data_root)
