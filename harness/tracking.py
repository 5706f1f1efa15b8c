"""Run tracking with MLflow, and the run record.

Every figure in a table traces back to a run: the run record (config, code revision, data hash,
package versions, device, seed) is stored as ``run_record.json`` in the run's artifacts and its main
items as tags. By default runs go to a local SQLite store, ``mlflow.db`` in the project root, and
artifacts to ``mlartifacts/`` beside it. Set ``MLFLOW_TRACKING_URI`` to log elsewhere.

Artifact locations in a SQLite store are ``mlflow-artifacts:/<experiment>/<run>/artifacts``, paths
relative to the store's ``mlartifacts/`` folder rather than absolute ones, so a folder holding a
store (the demo) can be copied or moved with its artifacts. The tracker writes them there itself;
``mlflow ui`` started in that folder serves them from ``./mlartifacts`` (its default
``--artifacts-destination``). To browse the runs, from the folder holding ``mlflow.db``:

    mlflow ui --backend-store-uri sqlite:///mlflow.db

and open http://127.0.0.1:5000.

MLflow is imported inside the functions that need it, so importing this module is cheap and a
disabled ``Tracker`` never touches MLflow. Figures are drawn by harness.figures.
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
import shutil
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
        self._artifacts: Path | None = None  # the run's artifact folder, where the tracker writes it

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
                run = self._client.get_run(self._resume_id)  # raises if there is no such run
                self._client.update_run(self._resume_id, status="RUNNING")
            self._run_id = self._resume_id
            self._artifacts = local_artifact_folder(run.info.artifact_uri, db_file)
            if self.tags:
                self.set_tags(self.tags)
            return
        experiment_id = self._experiment_id(db_file)
        tags = {**_source_tags(), **{_safe_key(k): str(v) for k, v in self.tags.items()}}
        with self._errors(f"starting a run in experiment {self.experiment!r}"):
            name = self._unique_name(experiment_id, self.run_name) if self.run_name else None
            run = self._client.create_run(experiment_id, run_name=name, tags=tags)
        self._run_id = run.info.run_id
        self._artifacts = local_artifact_folder(run.info.artifact_uri, db_file)

    def _unique_name(self, experiment_id: str, name: str) -> str:
        """``name``, or ``name (2)``, ``(3)``... when the experiment already has a run of that name
        (the same grid run trained again after a change of settings)."""
        quoted = name.replace("'", "\\'")
        runs = self._client.search_runs([experiment_id], filter_string=f"attributes.run_name LIKE '{quoted}%'",
                                        max_results=1000)
        taken = {run.info.run_name for run in runs}
        count = 1
        candidate = name
        while candidate in taken:
            count += 1
            candidate = f"{name} ({count})"
        return candidate

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
                # Artifacts beside the database rather than in ./mlruns of whatever the cwd is,
                # named relative to it (module docstring).
                location = None
                if db_file is not None:
                    folder = re.sub(r"[^\w\-.]", "_", self.experiment)
                    location = f"{PROXY_SCHEME}/{folder}"
                try:
                    # MLflow 3's UI opens an experiment of this kind on its run table
                    kind = {"mlflow.experimentKind": "custom_model_development"}
                    return self._client.create_experiment(self.experiment, artifact_location=location, tags=kind)
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
        if self._artifacts is not None:
            target = self._artifacts / (artifact_path or "")
            with self._errors(f"copying artifact {path} to {target}"):
                target.mkdir(parents=True, exist_ok=True)
                if path.is_dir():
                    shutil.copytree(path, target, dirs_exist_ok=True)
                else:
                    shutil.copy2(path, target / path.name)
            return
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
        config = record.get("config", {})
        tags = {
            "method": config.get("method"),
            "dataset": config.get("dataset"),
            "class": config.get("class"),
            "weights": weights_of(record),
            "code_revision": code.get("revision", "unknown"),
            "code_dirty": code.get("dirty"),
            "data_hash": record.get("data_hash"),
            "device": device,
            "seed": record.get("seed"),
        }
        if code.get("revision", "unknown") != "unknown":
            tags["mlflow.source.git.commit"] = code["revision"]  # the UI shows this one
        tags = {k: v for k, v in tags.items() if v is not None}
        tags[DESCRIPTION_TAG] = describe({**tags, **self.tags}, code)
        self.set_tags(tags)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / RECORD_FILE
            path.write_text(json.dumps(_jsonable(record), indent=2, sort_keys=True))
            self.log_artifact(path)


PROXY_SCHEME = "mlflow-artifacts:"  # artifact URIs relative to the artifact folder `mlflow ui` serves


def local_artifact_folder(artifact_uri: str, db_file: Path | None) -> Path | None:
    """Where a run's ``mlflow-artifacts:`` URI lives for a SQLite store: ``mlartifacts/...`` beside
    the database. None for other URIs (MLflow's own artifact repositories handle those)."""
    if db_file is None or not artifact_uri.startswith(PROXY_SCHEME):
        return None
    relative = artifact_uri[len(PROXY_SCHEME):].lstrip("/")
    folder = (db_file.parent / "mlartifacts" / relative).resolve()
    if (db_file.parent / "mlartifacts").resolve() not in folder.parents:
        raise TrackingError(f"artifact URI {artifact_uri!r} points outside {db_file.parent / 'mlartifacts'}")
    return folder


# --------------------------------------------------------------------------- names and tags

DESCRIPTION_TAG = "mlflow.note.content"  # the run description the MLflow UI shows


def run_name(method: str, dataset: str, class_name: str, variant: str, seed: Any) -> str:
    """What a run is, readable in the run table: ``msflow embedded/washer official seed 0``
    (``variant``: the protocol of a main run, the ablation variant of an ablation run)."""
    return f"{method} {dataset}/{class_name} {variant} seed {seed}"


def weights_of(record: Mapping[str, Any]) -> str:
    """The backbone weights a run record says the run used: its ``weights`` entry where the
    record has one (a name, or {model: source}), else ``random`` or ``pretrained:<backbone>``
    (``file:<name>`` for a local weights file) from the run's settings."""
    weights = record.get("weights")
    if isinstance(weights, list) and weights:  # harness.weights: one entry per backbone loaded
        labels = [f"{w.get('backbone')}={w.get('label')}" for w in weights if isinstance(w, Mapping)]
        if all(isinstance(w, Mapping) and w.get("source") == "random" for w in weights):
            return "random"
        return ", ".join(labels)
    if isinstance(weights, Mapping) and weights:
        return ", ".join(f"{name}={source}" for name, source in sorted(weights.items()))
    if isinstance(weights, str) and weights:
        return weights
    config = record.get("config", {})
    if not (config.get("settings") or {}).get("pretrained", True):
        return "random"
    method_config = config.get("method_config") or {}
    if method_config.get("weights_path"):
        return f"file:{Path(str(method_config['weights_path'])).name}"
    backbone = method_config.get("backbone")
    return f"pretrained:{backbone}" if backbone else "pretrained"


def describe(tags: Mapping[str, Any], code: Mapping[str, Any]) -> str:
    """The run description (Markdown): what was trained, with which weights, from which code."""
    what = f"**{tags.get('method', '?')}** on {tags.get('dataset', '?')}/{tags.get('class', '?')}"
    variant = tags.get("variant", "default")
    setting = f"{tags.get('protocol', 'no')} protocol" + ("" if variant == "default" else f", variant {variant}")
    lines = [f"{what} ({setting}), seed {tags.get('seed', '?')}."]
    weights = str(tags.get("weights", "?"))
    if weights == "random":
        lines.append("Backbone weights: **random**. The figures test the pipeline; they are not a "
                     "reproduction of any published number.")
    else:
        lines.append(f"Backbone weights: {weights}.")
    if str(tags.get("demo", "")).lower() == "true":
        lines.append("Part of the demo (generated data).")
    if tags.get("rescored_from"):
        lines.append(f"Re-scored from the stored maps of {tags['rescored_from']} (no retraining).")
    revision = code.get("revision", "unknown")
    dirty = " with uncommitted changes" if code.get("dirty") else ""
    lines.append(f"Code {revision}{dirty}.")
    return "\n\n".join(lines)


def _source_tags() -> dict[str, str]:
    """The tags MLflow's own ``start_run`` would add: who ran what."""
    tags = {"mlflow.source.type": "LOCAL", "mlflow.source.name": sys.argv[0] if sys.argv else ""}
    try:
        tags["mlflow.user"] = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry, e.g. in some containers
        pass
    return tags
