"""Run tracking with MLflow, the run record, and the figures logged next to each run.

Every figure in a table traces back to a run: the run record (config, code revision, data hash,
package versions, device, seed) is stored as ``run_record.json`` in the run's artifacts and its main
items as tags. By default runs go to a local SQLite store, ``mlflow.db`` in the project root, and
artifacts to ``mlartifacts/`` beside it. Set ``MLFLOW_TRACKING_URI`` to log elsewhere.

To browse the runs, from the project root:

    mlflow ui --backend-store-uri sqlite:///mlflow.db

and open http://127.0.0.1:5000.

MLflow and matplotlib are imported inside the functions that need them, so importing this module
is cheap and a disabled ``Tracker`` never touches MLflow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import getpass
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from harness.errors import HarnessError

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
RECORD_FILE = "run_record.json"
RECORD_SCHEMA = 1

# Packages whose versions change the numbers; looked up by distribution name.
TRACKED_PACKAGES = (
    "torch", "torchvision", "timm", "FrEIA", "numpy", "scikit-learn", "scikit-image",
    "pandas", "mlflow", "dvc", "pillow",
)

# MLflow's limits (mlflow.utils.validation); used when that module cannot tell us.
_PARAM_VALUE_LIMIT = 6000
_TAG_VALUE_LIMIT = 8000
_KEY_LIMIT = 250

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class TrackingError(HarnessError, RuntimeError):
    """The tracking store could not be reached or refused a write."""


# --------------------------------------------------------------------------- tracking URI


def default_tracking_uri(root: Path = Path(".")) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a SQLite store ``<root>/mlflow.db`` (absolute path)."""
    from_env = os.environ.get("MLFLOW_TRACKING_URI")
    if from_env:
        return from_env
    # Three slashes then the absolute path: sqlite:////home/... on POSIX, sqlite:///C:/... on Windows.
    return "sqlite:///" + (Path(root).resolve() / "mlflow.db").as_posix()


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, or None for other stores."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    if path in ("", ":memory:"):
        return None
    # sqlite:////abs/path has a leading slash left; sqlite:///rel/path is relative to the cwd.
    return Path(path).resolve()


# --------------------------------------------------------------------------- run record


def code_revision(root: Path = PROJECT_ROOT) -> dict[str, Any]:
    """Git revision of ``root``: commit, whether the tree differs from it, and a hash of the diff.

    ``diff_sha256`` covers tracked files (``git diff HEAD``); untracked files are listed by name so
    a reader knows what the hash does not cover. Outside git, revision is ``"unknown"``.
    """

    def git(*args: str) -> bytes:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, check=True, timeout=30
        ).stdout

    try:
        revision = git("rev-parse", "HEAD").decode().strip()
        status = git("status", "--porcelain", "--untracked-files=all").decode()
        diff = git("diff", "HEAD", "--no-color", "--no-ext-diff")
    except (OSError, subprocess.SubprocessError):
        return {"revision": "unknown", "dirty": None, "diff_sha256": None, "untracked": []}
    untracked = [line[3:] for line in status.splitlines() if line.startswith("?? ")]
    dirty = bool(status.strip())
    return {
        "revision": revision,
        "dirty": dirty,
        "diff_sha256": hashlib.sha256(diff).hexdigest() if diff else None,
        "untracked": untracked[:50],
    }


def package_versions(names: Sequence[str] = TRACKED_PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution; None where it is not installed."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def device_info(device: str) -> dict[str, Any]:
    """The device string plus what torch knows about it (GPU name, CUDA and cuDNN versions)."""
    info: dict[str, Any] = {"name": str(device), "cuda_device_name": None, "cuda": None, "cudnn": None}
    try:
        import torch
    except ImportError:
        return info
    info["cuda"] = torch.version.cuda
    info["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["cuda_device_name"] = torch.cuda.get_device_name(torch.device(device))
    return info


def run_record(config: dict, data_hash: str, seed: int, device: str) -> dict[str, Any]:
    """Everything needed to trace a figure to the run that produced it. JSON-serialisable."""
    return {
        "schema": RECORD_SCHEMA,
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": shlex.join(sys.argv),
        "code": _project_code(),
        "packages": package_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device_info(device),
        "seed": int(seed),
        "data_hash": str(data_hash),
        "config": _jsonable(config),
    }


def _project_code() -> dict[str, Any]:
    from harness import __version__

    # Only a source checkout has a meaningful revision; an installed copy may sit inside some
    # unrelated repository (a virtual environment in a project folder), so it reports "unknown".
    if (PROJECT_ROOT / "pyproject.toml").is_file():
        code = code_revision(PROJECT_ROOT)
    else:
        code = {"revision": "unknown", "dirty": None, "diff_sha256": None, "untracked": []}
    return {**code, "version": __version__}


def _jsonable(value: Any) -> Any:
    """Plain JSON types from configs holding dataclasses, paths, tuples, numpy or torch scalars."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)  # JSON has no NaN / inf
    if hasattr(value, "tolist"):  # numpy arrays and scalars, torch tensors
        return _jsonable(value.tolist())
    return str(value)  # Path, Enum, torch.device, ...


# --------------------------------------------------------------------------- params


def flatten_params(
    params: Mapping[str, Any], prefix: str = "", value_limit: int = _PARAM_VALUE_LIMIT
) -> dict[str, str]:
    """Nested dicts -> ``{"a.b.c": "value"}`` with values as MLflow stores them (strings).

    Lists and tuples become JSON strings. Values longer than MLflow's limit are cut, with a note
    saying how long they were; the full config is in the run record.
    """
    flat: dict[str, str] = {}
    if dataclasses.is_dataclass(params) and not isinstance(params, type):
        params = dataclasses.asdict(params)
    for key, value in params.items():
        name = f"{prefix}{key}"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, prefix=name + ".", value_limit=value_limit))
            continue
        if isinstance(value, (list, tuple, set, frozenset)):
            text = json.dumps(_jsonable(value))
        elif hasattr(value, "item") and getattr(value, "ndim", None) == 0:
            text = str(value.item())
        else:
            text = str(value)
        flat[_safe_key(name)] = _truncate(text, value_limit, what=f"param {name!r}")
    return flat


def _safe_key(key: str) -> str:
    # MLflow accepts letters, digits, _ - . space : / in keys.
    return re.sub(r"[^\w\-. :/]", "_", str(key))[:_KEY_LIMIT]


def _truncate(text: str, limit: int, what: str) -> str:
    if len(text) <= limit:
        return text
    note = f" ...[truncated, {len(text)} chars]"
    log.warning("%s is %d characters, over MLflow's %d; logged truncated", what, len(text), limit)
    return text[: limit - len(note)] + note


# --------------------------------------------------------------------------- tracker


PROBE_TIMEOUT_S = 5.0


def _check_reachable(uri: str) -> None:
    """An HTTP tracking server that does not answer fails in seconds: MLflow's own retries with
    backoff take about four minutes to give up."""
    import socket
    import urllib.parse

    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as exc:
        raise TrackingError(
            f"MLflow tracking server {uri} is not reachable ({exc}). Start it, fix the tracking "
            "URI (MLFLOW_TRACKING_URI or tracking.uri), or turn tracking off for this run."
        ) from exc


class Tracker:
    """One MLflow run, as a context manager.

        with Tracker(experiment="mvtec_ad", run_name="msflow/bottle/seed0") as tracker:
            tracker.log_record(run_record(config, data_hash, seed, device))
            tracker.log_params(config)
            tracker.log_metrics({"loss": 1.3}, step=epoch)
            tracker.log_artifact("roc.png", artifact_path="figures")

    The run ends FINISHED, or FAILED when the block raises (KILLED on Ctrl-C). ``run_id=...``
    continues an existing run (``--resume``). With ``enabled=False`` every method does nothing and
    MLflow is never imported.

    Calls go through an ``MlflowClient`` bound to this tracker's URI rather than MLflow's global
    active run, so trackers do not leak into each other and nothing is written to ``./mlruns``.
    Errors from the store are raised as ``TrackingError`` naming the tracking URI.
    """

    def __init__(
        self,
        uri: str | None = None,
        experiment: str = "flowad",
        run_name: str | None = None,
        enabled: bool = True,
        tags: Mapping[str, Any] | None = None,
        run_id: str | None = None,
    ) -> None:
        self.enabled = enabled
        self.uri = uri if uri is not None else default_tracking_uri()
        self.experiment = experiment
        self.run_name = run_name
        self.tags = dict(tags or {})
        self._resume_id = run_id
        self._run_id: str | None = None
        self._client: Any = None

    @property
    def run_id(self) -> str | None:
        """The MLflow run id; None when disabled or not started."""
        return self._run_id

    # -- lifecycle

    def __enter__(self) -> Tracker:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc_type is None:
            status = "FINISHED"
        elif issubclass(exc_type, KeyboardInterrupt):
            status = "KILLED"
        else:
            status = "FAILED"
        self.end(status)

    def start(self) -> None:
        """Open the store, get or create the experiment, and start (or resume) the run."""
        if not self.enabled or self._run_id is not None:
            return
        db_file = _sqlite_path(self.uri)
        if db_file is not None:
            # A missing folder would make MLflow retry the connection for minutes before failing.
            db_file.parent.mkdir(parents=True, exist_ok=True)
        _check_reachable(self.uri)
        with self._store_lock(db_file):
            self._open(db_file)

    @staticmethod
    def _store_lock(db_file: Path | None) -> contextlib.AbstractContextManager:
        """Runs started side by side (``flowad repro --jobs``) would each create the tables of a
        new SQLite store, or the same experiment, at once; one process at a time does it."""
        if db_file is None:
            return contextlib.nullcontext()
        from filelock import FileLock

        return FileLock(f"{db_file}.lock")

    def _open(self, db_file: Path | None) -> None:
        with self._errors("opening the tracking store"):
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        if self._resume_id is not None:
            with self._errors(f"resuming run {self._resume_id}"):
                self._client.get_run(self._resume_id)  # raises if there is no such run
                self._client.update_run(self._resume_id, status="RUNNING")
            self._run_id = self._resume_id
            if self.tags:
                self.set_tags(self.tags)
            return
        experiment_id = self._experiment_id(db_file)
        tags = {**_source_tags(), **{_safe_key(k): str(v) for k, v in self.tags.items()}}
        with self._errors(f"starting a run in experiment {self.experiment!r}"):
            run = self._client.create_run(experiment_id, run_name=self.run_name, tags=tags)
        self._run_id = run.info.run_id

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run FINISHED, FAILED or KILLED."""
        if not self.enabled or self._run_id is None:
            return
        with self._errors(f"ending run {self._run_id} as {status}"):
            self._client.set_terminated(self._run_id, status=status)
        self._run_id = None
        self._resume_id = None

    def _experiment_id(self, db_file: Path | None) -> str:
        with self._errors(f"getting or creating experiment {self.experiment!r}"):
            experiment = self._client.get_experiment_by_name(self.experiment)
            if experiment is None:
                # Artifacts beside the database rather than in ./mlruns of whatever the cwd is.
                location = None
                if db_file is not None:
                    folder = re.sub(r"[^\w\-.]", "_", self.experiment)
                    location = (db_file.parent / "mlartifacts" / folder).as_uri()
                try:
                    return self._client.create_experiment(self.experiment, artifact_location=location)
                except Exception:
                    # Another process may have created it in the meantime.
                    experiment = self._client.get_experiment_by_name(self.experiment)
                    if experiment is None:
                        raise
        if experiment.lifecycle_stage == "deleted":
            raise TrackingError(
                f"Experiment {self.experiment!r} in {self.uri} is deleted. Restore it with "
                f"`mlflow experiments restore --experiment-id {experiment.experiment_id}` "
                "or choose another experiment name."
            )
        return experiment.experiment_id

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except TrackingError:
            raise
        except Exception as exc:
            raise TrackingError(
                f"MLflow tracking at {self.uri} failed while {action}: {exc}. Check that the store "
                "is reachable and writable (MLFLOW_TRACKING_URI overrides the default), "
                "or turn tracking off for this run."
            ) from exc

    def _active(self) -> bool:
        if not self.enabled:
            return False
        if self._run_id is None:
            raise TrackingError("The tracker has no open run; use `with Tracker(...) as tracker:`.")
        return True

    # -- logging

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log a (nested) config as flat dotted params. MLflow params cannot change once set."""
        if not self._active():
            return
        from mlflow.entities import Param

        try:
            from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH as limit
        except ImportError:  # moved in some MLflow version
            limit = _PARAM_VALUE_LIMIT
        flat = flatten_params(params, value_limit=limit)
        with self._errors("logging params"):
            self._client.log_batch(self._run_id, params=[Param(k, v) for k, v in flat.items()])

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log numbers (floats, ints, numpy or 0-d torch values) at one step."""
        if not self._active():
            return
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        entries = []
        for key, value in metrics.items():
            try:
                number = float(value)
            except (TypeError, ValueError) as exc:
                raise TypeError(f"metric {key!r} is not a number: {value!r}") from exc
            entries.append(Metric(_safe_key(key), number, timestamp, int(step or 0)))
        with self._errors("logging metrics"):
            self._client.log_batch(self._run_id, metrics=entries)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (searchable in the UI, and, unlike params, overwritable)."""
        if not self._active():
            return
        from mlflow.entities import RunTag

        entries = [
            RunTag(_safe_key(k), _truncate(str(v), _TAG_VALUE_LIMIT, what=f"tag {k!r}"))
            for k, v in tags.items()
        ]
        with self._errors("setting tags"):
            self._client.log_batch(self._run_id, tags=entries)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a file (or a folder's contents) into the run's artifacts."""
        if not self._active():
            return
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"Cannot log artifact {path}: no such file or folder.")
        with self._errors(f"logging artifact {path}"):
            if path.is_dir():
                self._client.log_artifacts(self._run_id, str(path), artifact_path)
            else:
                self._client.log_artifact(self._run_id, str(path), artifact_path)

    def log_record(self, record: Mapping[str, Any]) -> None:
        """Store the run record as ``run_record.json`` and its main items as tags."""
        if not self._active():
            return
        code = record.get("code", {})
        device = record.get("device", {})
        if isinstance(device, Mapping):
            gpu = device.get("cuda_device_name")
            device = f"{device.get('name')} ({gpu})" if gpu else device.get("name")
        tags = {
            "code_revision": code.get("revision", "unknown"),
            "code_dirty": code.get("dirty"),
            "data_hash": record.get("data_hash"),
            "device": device,
            "seed": record.get("seed"),
        }
        if code.get("revision", "unknown") != "unknown":
            tags["mlflow.source.git.commit"] = code["revision"]  # the UI shows this one
        self.set_tags({k: v for k, v in tags.items() if v is not None})
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / RECORD_FILE
            path.write_text(json.dumps(_jsonable(record), indent=2, sort_keys=True))
            self.log_artifact(path)


def _source_tags() -> dict[str, str]:
    """The tags MLflow's own ``start_run`` would add: who ran what."""
    tags = {"mlflow.source.type": "LOCAL", "mlflow.source.name": sys.argv[0] if sys.argv else ""}
    try:
        tags["mlflow.user"] = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry, e.g. in some containers
        pass
    return tags


# --------------------------------------------------------------------------- figures


def image_grid_png(
    images: Any,
    masks: Any,
    maps: Any,
    path: str | Path,
    titles: Sequence[str] | None = None,
    max_items: int = 8,
    denormalize: bool = True,
) -> Path:
    """A grid with one column per test image and three rows: the image, its ground-truth region
    (red fill and outline), and the anomaly map as a heat overlay.

    ``images``: ImageNet-normalised float [N,3,H,W] (tensor or array; ``denormalize=False`` if
    already in [0, 1]) or uint8 [N,H,W,3]. ``masks``: [N,(1,)H,W] or None. ``maps``: [N,(1,)h,w],
    any resolution; all columns share one colour scale so scores compare across images.
    """
    from matplotlib.figure import Figure
    import numpy as np

    count = min(len(images), max_items)
    if count == 0:
        raise ValueError("image_grid_png needs at least one image")
    pictures = [_display_image(images[i], denormalize) for i in range(count)]
    heat = [_as_2d(maps[i]).astype(np.float32) for i in range(count)]
    vmin = float(min(m.min() for m in heat))
    vmax = float(max(m.max() for m in heat))
    if vmax <= vmin:
        vmax = vmin + 1e-6

    cell = 1.7
    fig = Figure(figsize=(cell * count + 1.2, cell * 3 + 0.3), dpi=90, layout="constrained")
    axes = fig.subplots(3, count, squeeze=False)
    mappable = None
    for col in range(count):
        picture = pictures[col]
        height, width = picture.shape[:2]
        extent = (-0.5, width - 0.5, height - 0.5, -0.5)
        label = titles[col] if titles is not None and col < len(titles) else f"#{col}"
        axes[0, col].imshow(picture)
        axes[0, col].set_title(_shorten(str(label), 22), fontsize=8)

        axes[1, col].imshow(picture)
        if masks is not None and masks[col] is not None:
            region = _resize_nearest(_as_2d(masks[col]) > 0.5, height, width)
            if region.any():
                fill = np.zeros((height, width, 4), dtype=np.float32)
                fill[region] = (1.0, 0.0, 0.0, 0.35)
                axes[1, col].imshow(fill)
                axes[1, col].contour(region.astype(np.float32), levels=[0.5], colors="red", linewidths=0.8)

        axes[2, col].imshow(picture)
        mappable = axes[2, col].imshow(
            heat[col], cmap="jet", alpha=0.5, vmin=vmin, vmax=vmax, extent=extent, interpolation="bilinear"
        )
        for row in range(3):
            axes[row, col].set_xticks([])
            axes[row, col].set_yticks([])
            axes[row, col].set_xlim(extent[0], extent[1])
            axes[row, col].set_ylim(extent[2], extent[3])
    for row, name in enumerate(("image", "ground truth", "anomaly map")):
        axes[row, 0].set_ylabel(name, fontsize=9)
    fig.colorbar(mappable, ax=axes[2, :].tolist(), shrink=0.9, label="anomaly score")
    return _save(fig, path)


def roc_curve_png(labels: Any, scores: Any, path: str | Path, title: str | None = None) -> Path:
    """Image-level ROC curve with the AUROC in the legend."""
    from matplotlib.figure import Figure
    import numpy as np
    from sklearn.metrics import roc_auc_score, roc_curve

    labels = np.asarray(_to_numpy(labels)).ravel().astype(int)
    scores = np.asarray(_to_numpy(scores)).ravel().astype(np.float64)
    if len(np.unique(labels)) < 2:
        raise ValueError("A ROC curve needs both normal (0) and anomalous (1) labels.")
    fpr, tpr, _ = roc_curve(labels, scores)
    auroc = roc_auc_score(labels, scores)

    fig = Figure(figsize=(4.2, 4.0), dpi=90, layout="constrained")
    ax = fig.subplots()
    ax.plot(fpr, tpr, color="tab:blue", lw=1.8, label=f"AUROC = {100 * auroc:.1f}%")
    ax.plot([0, 1], [0, 1], color="gray", lw=1, ls="--", label="chance")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="False positive rate", ylabel="True positive rate")
    ax.set_title(title or "ROC curve", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    return _save(fig, path)


def pro_curve_png(
    fpr: Any,
    pro: Any,
    path: str | Path,
    fpr_limit: float = 0.3,
    title: str | None = None,
    aupro: float | None = None,
) -> Path:
    """Per-region overlap against false positive rate up to ``fpr_limit``.

    The legend shows ``aupro`` when given (e.g. from ``harness.metrics.aupro`` in either
    convention), else the area under this curve up to the limit divided by the limit.
    """
    from matplotlib.figure import Figure
    import numpy as np

    fpr = np.asarray(_to_numpy(fpr), dtype=np.float64).ravel()
    pro = np.asarray(_to_numpy(pro), dtype=np.float64).ravel()
    order = np.argsort(fpr, kind="stable")
    fpr, pro = fpr[order], pro[order]
    inside = fpr <= fpr_limit
    x, y = fpr[inside], pro[inside]
    if len(fpr) and fpr[-1] > fpr_limit:
        # Close the curve exactly at the limit, as the MVTec definition integrates to it.
        x = np.append(x, fpr_limit)
        y = np.append(y, np.interp(fpr_limit, fpr, pro))
    if aupro is None:
        aupro = float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2) / fpr_limit) if len(x) > 1 else 0.0

    fig = Figure(figsize=(4.2, 4.0), dpi=90, layout="constrained")
    ax = fig.subplots()
    ax.plot(x, y, color="tab:orange", lw=1.8, label=f"AU-PRO (FPR \u2264 {fpr_limit:g}) = {100 * aupro:.1f}%")
    ax.fill_between(x, y, color="tab:orange", alpha=0.15)
    ax.set(xlim=(0, fpr_limit), ylim=(0, 1.01), xlabel="False positive rate", ylabel="Per-region overlap")
    ax.set_title(title or "PRO curve", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    return _save(fig, path)


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")  # a bare Figure renders with Agg: no screen, no pyplot state
    return path


def _to_numpy(value: Any) -> Any:
    import numpy as np

    if hasattr(value, "detach"):  # torch tensor, without importing torch
        value = value.detach().cpu()
        if not value.dtype.is_floating_point or value.dtype.itemsize >= 4:
            return value.numpy()
        return value.float().numpy()  # float16 / bfloat16
    return np.asarray(value)


def _as_2d(value: Any) -> Any:
    array = _to_numpy(value).squeeze()
    if array.ndim != 2:
        raise ValueError(f"expected a single-channel [H, W] map or mask, got shape {array.shape}")
    return array


def _display_image(value: Any, denormalize: bool) -> Any:
    """Any supported image -> float HxWx3 in [0, 1]."""
    import numpy as np

    array = _to_numpy(value)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = array.transpose(1, 2, 0)  # CHW -> HWC
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3):
        raise ValueError(f"expected an image [3,H,W] or [H,W,3], got shape {array.shape}")
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    array = array.astype(np.float32)
    if denormalize:
        array = array * np.asarray(_IMAGENET_STD, np.float32) + np.asarray(_IMAGENET_MEAN, np.float32)
    return np.clip(array, 0.0, 1.0)


def _resize_nearest(array: Any, height: int, width: int) -> Any:
    import numpy as np

    if array.shape == (height, width):
        return array
    rows = (np.arange(height) * array.shape[0] / height).astype(int)
    cols = (np.arange(width) * array.shape[1] / width).astype(int)
    return array[rows[:, None], cols[None, :]]


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else "\u2026" + text[-(limit - 1):]
