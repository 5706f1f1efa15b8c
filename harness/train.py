"""The fit / evaluate loop shared by every method.

One loop, so that "identical settings" is a property of the code: the same data pipeline, seeds,
precision, evaluation schedule, checkpoints and run record for MSFlow and every baseline.

Speed: the backbone is frozen and (for methods trained without augmentation) its pooled features
are computed once per class and reused every epoch, instead of recomputing them at every step with
autograd running through the backbone as the reference code does.

A run folder holds:
  checkpoint.pt   model, optimiser, scheduler, RNG states, history (written atomically at each eval)
  record.json     config, code revision, data hash, package versions, device, seed
  metrics.json    last and per-metric best epoch, per-epoch history; written last = run complete
  maps.npz        per-image per-scale log-likelihood maps at flow resolution (float16), last epoch
  artifacts/      image grid, ROC and PRO curves (PNG), also logged to MLflow
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from harness import checkpoint as ckpt
from harness import metrics as M
from harness.config import DISPLAY_SETTINGS, RunSettings, RunSpec, to_dict
from harness.data import AnomalyDataset, check_both_labels, dataset_hash, resize_masks
from harness.errors import ConfigError, HarnessError, TrainingError
from harness.manifest import check_installed
from harness.precision import prepare_model, to_channels_last
from harness.scoring import Scores, score
from harness.weights import weight_sources
from methods.registry import build_model, create_method

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"
RECORD = "record.json"
MAPS = "maps.npz"
TRACKING_ID = "tracking_run_id.txt"
RUN_FILES = (CHECKPOINT, METRICS, RECORD, MAPS, TRACKING_ID)
# Metrics where higher is better, in the order tables show them.
EVAL_METRICS = ("image_auroc", "pixel_auroc", "aupro", "aupro_code")
# One resolution for every method's mIoU and its fair threshold, so that the thresholds mean the
# same (U-Flow's evaluation size).
MIOU_SIZE = (256, 256)


# --------------------------------------------------------------------------- small utilities


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise HarnessError(f"device={name!r} but no CUDA device is visible; use device=cpu or auto")
    return torch.device(name)


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return the generator that orders training batches."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, write: Callable[[Any], None]) -> None:
    """Write through a temporary file in the same folder and rename: readers never see half a file.

    The file gets the permissions the user's umask gives (mkstemp alone makes it owner-only)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=True).encode()))


def remove_partial_writes(folder: Path, names: Sequence[str]) -> None:
    """Delete the temporary files a killed ``atomic_write_bytes`` left (``.<name>.<random>``)."""
    for name in names:
        for leftover in folder.glob(f".{name}.*"):
            if leftover.is_file():
                leftover.unlink(missing_ok=True)


def _differences(recorded: Any, current: Any, prefix: str = "") -> list[str]:
    """Dotted names of the values that differ between two nested dicts."""
    if isinstance(recorded, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(recorded) | set(current), key=str):
            out += _differences(recorded.get(key), current.get(key), f"{prefix}{key}.")
        return out
    return [] if recorded == current else [f"{prefix[:-1]} ({recorded!r} -> {current!r})"]


# --------------------------------------------------------------------------- features


@dataclass
class FeatureSet:
    """Pooled backbone features of a whole split, kept on the training device."""

    scales: list[torch.Tensor]  # per scale [N, C_l, h_l, w_l]

    def __len__(self) -> int:
        return self.scales[0].shape[0]

    def batch(self, index: torch.Tensor) -> list[torch.Tensor]:
        return [s[index] for s in self.scales]


@torch.no_grad()
def extract_features(extractor: torch.nn.Module, loader: DataLoader, device: torch.device,
                     progress: bool, desc: str) -> FeatureSet:
    from tqdm import tqdm

    parts: list[list[torch.Tensor]] = []
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
        parts.append(extractor(batch["image"].to(device, non_blocking=True)))
    return FeatureSet([torch.cat(scale) for scale in zip(*parts)])


def check_input_convention(extractor: torch.nn.Module, preprocessing: Any) -> None:
    """A backbone trained on other inputs than ImageNet-normalised ones (TF EfficientNet-Lite: [-1, 1])
    converts the loader's images itself, from ImageNet statistics: any other statistics would be
    converted wrongly, so they are refused."""
    from harness.data import IMAGENET_MEAN, IMAGENET_STD
    from harness.weights import InputConvention

    converts = any(isinstance(m, InputConvention) for m in extractor.modules())
    imagenet = all(abs(a - b) < 1e-6 for a, b in zip((*preprocessing.mean, *preprocessing.std),
                                                     (*IMAGENET_MEAN, *IMAGENET_STD)))
    if converts and not imagenet:
        raise ConfigError(
            f"the backbone takes its own input normalisation and converts it from ImageNet statistics, but this "
            f"method normalises with mean={preprocessing.mean} std={preprocessing.std}; set mean and std to "
            f"ImageNet's {IMAGENET_MEAN} / {IMAGENET_STD} for this backbone"
        )


# --------------------------------------------------------------------------- the run


@dataclass
class EvalResult:
    metrics: dict[str, float]
    log_likelihoods: list[torch.Tensor]  # per scale [N, h, w], float16, on cpu
    scores: Scores
    labels: np.ndarray
    masks: np.ndarray  # at the metric size
    log_likelihoods_float32: list[torch.Tensor] | None = None  # the same maps before float16 storage


@dataclass
class History:
    epochs: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, dict[str, float]] = field(default_factory=dict)

    def add(self, row: dict[str, float]) -> None:
        self.epochs.append(row)
        for name in EVAL_METRICS:
            value = row.get(name)
            if value is None or math.isnan(value):
                continue
            if name not in self.best or value > self.best[name]["value"]:
                self.best[name] = {"value": value, "epoch": row["epoch"]}


class Trainer:
    """Fits one method on one class and evaluates it; see module docstring for what it writes."""

    def __init__(self, spec: RunSpec, settings: RunSettings | None = None, tracker: Any = None):
        self.spec = spec
        self.settings = settings or RunSettings()
        self.config = create_method(spec.method, **self._class_settings(spec, self.settings.seed))
        self.device = resolve_device(self.settings.device)
        # One seed for the whole run: flow initialisation and permutations (the config's seed) and
        # the data order and augmentation (seed_everything below).
        self.seed = self.config.seed
        self.epochs = self.settings.epochs or self.config.epochs
        self.eval_every = self.settings.eval_every or self.config.eval_every
        for name, value in (("epochs", self.epochs), ("eval_every", self.eval_every)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"{spec.method} would run with {name}={value!r}: the training budget must be a "
                    f"positive number of epochs (check meta_epochs, sub_epochs, epochs and eval_every)"
                )
        self.image_size = tuple(self.config.input_size_for(spec.class_name))
        self.preprocessing = self.config.preprocessing()
        self.metric_size = tuple(getattr(self.config, "metric_size", None) or self.image_size)
        use_cache = self.settings.feature_cache
        self.feature_cache = (not self.config.augment) if use_cache is None else use_cache
        if self.feature_cache and self.config.augment:
            raise HarnessError(
                f"feature_cache=true with {spec.method}, which trains with augmentation: cached "
                "features would drop the augmentation; set feature_cache to false or auto"
            )
        self.tracker = tracker
        self.out = spec.out_dir

    @staticmethod
    def _class_settings(spec: RunSpec, seed: int | None = None) -> dict[str, Any]:
        """Overrides plus the class, for methods whose official settings differ per class
        (U-Flow's per-class learning rates, batches and epochs: the ``tuned_class`` field), plus
        the run seed, which replaces the method's own default seed (None keeps it)."""
        from methods.registry import config_fields

        overrides = dict(spec.overrides)
        if seed is not None:
            if "seed" in overrides and overrides["seed"] != seed:
                raise ConfigError(
                    f"{spec.method}: the method setting seed={overrides['seed']} and the run seed {seed} differ; "
                    "give the seed once (the run seed: --seed or params.yaml `seeds`)"
                )
            overrides["seed"] = seed
        if "tuned_class" in config_fields(spec.method):
            overrides.setdefault("tuned_class", spec.class_name)
        return overrides

    # -- set-up -----------------------------------------------------------------------------

    def _loader(self, dataset: AnomalyDataset, shuffle: bool = False) -> DataLoader:
        return DataLoader(
            dataset, batch_size=self.config.batch_size, shuffle=shuffle,
            num_workers=self.settings.workers, pin_memory=self.device.type == "cuda",
        )

    def _setup(self) -> None:
        root, cls = self.spec.data_root, self.spec.class_name
        self._check_data()
        self.train_set = AnomalyDataset(root, cls, "train", self.image_size, preprocessing=self.preprocessing)
        self.test_set = AnomalyDataset(root, cls, "test", self.image_size, validate=False,
                                       preprocessing=self.preprocessing)
        check_both_labels(root, cls)
        if self.drop_last and len(self.train_set) < self.config.batch_size:
            raise ConfigError(
                f"{self.spec.method} drops a partial last batch (drop_last=true, as its reference does), and "
                f"{root / cls} has {len(self.train_set)} training images, fewer than batch_size="
                f"{self.config.batch_size}: it would never train. Lower batch_size or set drop_last=false."
            )
        self.data_hash = dataset_hash(root, cls)
        if self.settings.image_cache and self.preprocessing.eight_bit:  # float resizing is not cached
            for dataset in (self.train_set, self.test_set):
                dataset.use_image_cache(self.settings.image_cache, self.data_hash)
        self.generator = seed_everything(self.seed)
        with weight_sources(self.settings.weights) as used:
            self.extractor = self.config.feature_extractor(pretrained=self.settings.pretrained).to(self.device)
        self.weights_used = [w.record() for w in used]  # the run record's "weights"
        check_input_convention(self.extractor, self.preprocessing)
        self.model = build_model(self.config, self.extractor.channels).to(self.device)
        self.optimizer = self.config.make_optimizer(p for p in self.model.parameters() if p.requires_grad)
        self.scheduler = self.config.make_scheduler(self.optimizer)
        # bf16 keeps float32's exponent range, so no loss scaling: the scaler stays a pass-through.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=False)
        prepare_model(self.model, self.device, self.settings.precision, compile=self.settings.compile,
                      channels_last=self.settings.channels_last)
        progress = self.settings.progress
        if self.feature_cache:
            self.train_features = extract_features(self.extractor, self._loader(self.train_set),
                                                   self.device, progress, "train features")
            self.test_features = extract_features(self.extractor, self._loader(self.test_set),
                                                  self.device, progress, "test features")

    def _check_data(self) -> None:
        """An installed dataset must still match the file list written at install."""
        root = self.spec.data_root
        check_installed(root, [self.spec.class_name], repair=(
            f"Nothing was trained. Reinstall the data: `python -m harness fetch {root.name} --data-root "
            f"{root.parent} --force` (or `generate --out {root}` for the embedded set)."))

    def _flow_input(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Features in the memory layout the flows were prepared for."""
        return [to_channels_last(f) for f in features] if self.settings.channels_last else features

    # -- one epoch ----------------------------------------------------------------------------

    @property
    def drop_last(self) -> bool:
        """Whether a partial last batch gives no step, as in the method's reference loader."""
        return bool(getattr(self.config, "drop_last", False))

    def _train_batches(self):
        """Yields feature batches in an order fixed by the seeded generator (same across resume)."""
        order = torch.randperm(len(self.train_set), generator=self.generator)
        if self.feature_cache:
            batches = order.split(self.config.batch_size)
            if self.drop_last and len(batches[-1]) < self.config.batch_size:
                batches = batches[:-1]
            for index in batches:
                yield self.train_features.batch(index.to(self.device))
            return
        loader = DataLoader(self.train_set, batch_size=self.config.batch_size, sampler=order.tolist(),
                            drop_last=self.drop_last, num_workers=self.settings.workers,
                            pin_memory=self.device.type == "cuda")
        for batch in loader:
            images = batch["image"].to(self.device, non_blocking=True)
            if self.config.augment:
                images = self.config.augment_images(images)
            yield self.extractor(images)  # frozen: the extractor runs under no_grad itself

    def _train_epoch(self, epoch: int) -> float:
        self.model.train()
        total, count = 0.0, 0
        for batch_index, features in enumerate(self._train_batches()):
            for loss in self._batch_losses(features):
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"loss is {loss.item()} at epoch {epoch}, batch {batch_index}; training stopped. "
                        f"The last good checkpoint is kept in {self.out / CHECKPOINT} (if one was written). "
                        "Try precision=fp32, a lower lr, or check the input data."
                    )
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                if self.config.grad_clip:
                    self.scaler.unscale_(self.optimizer)
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                total += loss.item()
                count += 1
        self.scheduler.step()
        return total / count

    def _batch_losses(self, features: list[torch.Tensor]):
        """One loss per optimiser step. Most methods take one step per image batch; a method may
        define ``training_losses(features)`` to take several (CFlow's fiber batches)."""
        features = self._flow_input(features)
        if hasattr(self.model, "training_losses"):
            yield from self.model.training_losses(features)
        else:
            yield self.model.loss(self.model(features))

    # -- evaluation ---------------------------------------------------------------------------

    def log_likelihoods(self, split: str = "test") -> list[torch.Tensor]:
        """Per-scale log-likelihood maps of a split, float16 on cpu (what maps.npz stores).

        Metrics are computed from these float16 maps, so re-scoring a stored run gives exactly the
        figures it reported."""
        return [m.half() for m in self.log_likelihoods_float32(split)]

    @torch.no_grad()
    def log_likelihoods_float32(self, split: str = "test") -> list[torch.Tensor]:
        """The same maps in float32, before storage rounding (what a method's own metrics, such as
        U-Flow's NFA, are computed from: float16 ties change its region tree)."""
        self.model.eval()
        dataset, cached = (self.test_set, "test_features") if split == "test" else (self.train_set, "train_features")
        parts: list[list[torch.Tensor]] = []
        if self.feature_cache:
            features_of_split: FeatureSet = getattr(self, cached)
            index = torch.arange(len(dataset), device=self.device)
            batches = (features_of_split.batch(i) for i in index.split(self.config.batch_size))
        else:
            batches = (self.extractor(b["image"].to(self.device)) for b in self._loader(dataset))
        for features in batches:
            out = self.model(self._flow_input(features))
            self.latent_channels = [z.shape[1] for z in out.latents]
            parts.append([m.float().cpu() for m in self.model.log_likelihood_maps(out)])
        return [torch.cat(scale) for scale in zip(*parts)]

    def _ground_truth(self) -> tuple[np.ndarray, np.ndarray]:
        """Labels and masks at the metric size (masks at the input size, resized as the method's
        reference does: bilinear, then > 0.5)."""
        if not hasattr(self, "_gt"):
            labels = np.array([r.label for r in self.test_set.records])
            masks = np.stack([self.test_set[i]["mask"][0].numpy() > 0.5 for i in range(len(self.test_set))])
            self._gt = (labels, resize_masks(masks, self.metric_size))
        return self._gt

    def evaluate(self) -> EvalResult:
        exact = self.log_likelihoods_float32()
        logp = [m.half() for m in exact]
        labels, masks = self._ground_truth()
        scores = score(logp, self.metric_size, self.config.scoring())
        check_finite(scores, logp, f"{self.spec.method} on {self.spec.class_name}")
        return EvalResult(evaluate_scores(scores, labels, masks), logp, scores, labels, masks, exact)

    # -- checkpoints ----------------------------------------------------------------------------

    def _save_checkpoint(self, epoch: int, history: History) -> None:
        state = {
            "epoch": epoch,
            "config": to_dict(self.config),
            "seed": self.seed,
            "identity": self.run_identity(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": {
                "python": random.getstate(),
                "numpy": ckpt.numpy_rng_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "batches": self.generator.get_state(),
            },
            "history": {"epochs": history.epochs, "best": history.best},
            "tracking_run_id": getattr(self.tracker, "run_id", None),
        }
        atomic_write_bytes(self.out / CHECKPOINT, lambda f: ckpt.save(state, f))

    def run_config(self) -> dict[str, Any]:
        """The run's configuration as record.json keeps it."""
        return {"method": self.spec.method, "dataset": self.spec.dataset, "class": self.spec.class_name,
                "method_config": to_dict(self.config),
                "settings": {**to_dict(self.settings), "seed": self.seed}, "seed": self.seed,
                "feature_cache": self.feature_cache, "epochs": self.epochs, "eval_every": self.eval_every}

    def tracking_params(self) -> dict[str, Any]:
        """MLflow parameters: the run config without display flags, since MLflow refuses a changed
        parameter when a run is resumed, and a progress bar changes no result."""
        config = self.run_config()
        config["settings"] = {k: v for k, v in config["settings"].items() if k not in DISPLAY_SETTINGS}
        return config

    def run_identity(self) -> dict[str, Any]:
        """Everything a run's result depends on: a resumed run must match it exactly."""
        settings = {k: v for k, v in to_dict(self.settings).items() if k not in DISPLAY_SETTINGS}
        settings["device"] = self.device.type  # "auto" and "cuda" name the same device
        return json.loads(json.dumps({
            "method": self.spec.method, "class": self.spec.class_name,
            "method_config": to_dict(self.config), "settings": settings, "seed": self.seed,
            "feature_cache": self.feature_cache, "epochs": self.epochs, "eval_every": self.eval_every,
            "data_hash": self.data_hash,
        }))

    def _resumable_state(self) -> dict[str, Any]:
        """The checkpoint to resume from, once it is known to be this run's (settings and data);
        checked before any feature is computed, so a refusal costs no training time."""
        path = self.out / CHECKPOINT
        state = ckpt.load(path, map_location=self.device)
        if not hasattr(self, "data_hash"):
            self._check_data()
            self.data_hash = dataset_hash(self.spec.data_root, self.spec.class_name)
        changed = _differences(state.get("identity"), self.run_identity())
        if changed:
            raise ckpt.CheckpointError(
                f"{path} was written by a run with other settings or data; changed: "
                f"{'; '.join(changed[:8])}. Resume with the same settings and data, or start a new "
                f"run in another --out folder"
            )
        return state

    def _load_checkpoint(self, state: dict[str, Any]) -> tuple[int, History]:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        rng = state["rng"]
        random.setstate(rng["python"])
        ckpt.set_numpy_rng_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.generator.set_state(rng["batches"])
        history = History(state["history"]["epochs"], state["history"]["best"])
        return state["epoch"], history

    # -- the whole fit ----------------------------------------------------------------------------

    def _check_out_dir(self, resume: bool) -> None:
        if (self.out / METRICS).exists() and not resume:
            raise HarnessError(
                f"{self.out} already holds a finished run; choose another --out folder or delete it"
            )
        if (self.out / CHECKPOINT).exists() and not resume:
            raise HarnessError(
                f"{self.out} holds an interrupted run ({CHECKPOINT}); continue it with --resume, "
                "or choose another --out folder"
            )

    def fit(self, resume: bool = False) -> dict[str, Any]:
        from harness.tracking import run_record
        from tqdm import tqdm

        self._check_out_dir(resume)
        if resume and (self.out / METRICS).exists():
            return json.loads((self.out / METRICS).read_text())
        if self.out.is_dir():
            remove_partial_writes(self.out, RUN_FILES)
        state = self._resumable_state() if resume and (self.out / CHECKPOINT).exists() else None
        self._setup()
        self.out.mkdir(parents=True, exist_ok=True)
        record = run_record(config=self.run_config(), data_hash=self.data_hash, seed=self.seed,
                            device=str(self.device))
        record["weights"] = self.weights_used
        start, history = 0, History()
        if state is not None:
            start, history = self._load_checkpoint(state)
        atomic_write_json(self.out / RECORD, record)
        tracker = self.tracker
        if tracker is not None:
            tracker.log_params(self.tracking_params())
            tracker.log_record(record)

        result = None
        epochs = tqdm(range(start + 1, self.epochs + 1), desc=f"{self.spec.method}/{self.spec.class_name}",
                      disable=not self.settings.progress, initial=start, total=self.epochs)
        for epoch in epochs:
            t0 = time.perf_counter()
            lr = self.optimizer.param_groups[0]["lr"]
            loss = self._train_epoch(epoch)
            row: dict[str, float] = {"epoch": epoch, "loss": loss, "lr": lr,
                                     "train_seconds": time.perf_counter() - t0}
            if epoch % self.eval_every == 0 or epoch == self.epochs:
                t1 = time.perf_counter()
                result = self.evaluate()
                row.update(result.metrics)
                row["test_images_per_second"] = len(self.test_set) / (time.perf_counter() - t1)
            history.add(row)
            if tracker is not None:
                tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
            if "image_auroc" in row:
                self._save_checkpoint(epoch, history)
            epochs.set_postfix(loss=f"{loss:.4g}", **{k: f"{row[k]:.3f}" for k in EVAL_METRICS if k in row})

        if result is None:  # resumed at the very end: evaluate the final model once more
            result = self.evaluate()
        summary = self._finish(result, history)
        return summary

    def _final_metrics(self, result: EvalResult) -> dict[str, float]:
        """Metrics computed once, on the final model: mIoU of the likelihood map at the "fair"
        threshold (one false positive pixel per training image, U-Flow's protocol for methods
        without their own threshold) and at the oracle threshold, both at MIOU_SIZE for every
        method, plus any metric the method defines itself (from the float32 maps)."""
        metrics = dict(result.metrics)
        if not result.masks.any():
            return metrics
        scoring = self.config.scoring()
        train_maps = score(self.log_likelihoods("train"), MIOU_SIZE, scoring).pro_map
        test_maps = (result.scores.pro_map if self.metric_size == MIOU_SIZE
                     else score(result.log_likelihoods, MIOU_SIZE, scoring).pro_map).numpy()
        masks = resize_masks(result.masks, MIOU_SIZE)
        threshold = M.fair_threshold(train_maps.numpy())
        metrics["fair_threshold"] = threshold
        metrics["miou_fair"] = M.miou(masks, test_maps, threshold)
        metrics["miou_oracle"], metrics["oracle_threshold"] = M.best_miou(masks, test_maps)
        if hasattr(self.config, "extra_metrics"):
            metrics.update(self.config.extra_metrics(result.log_likelihoods_float32, self.latent_channels,
                                                     result.masks, self.metric_size))
        return metrics

    def _finish(self, result: EvalResult, history: History) -> dict[str, Any]:
        save_maps(self.out / MAPS, result.log_likelihoods, result.labels,
                  [r.path for r in self.test_set.records], self.spec.data_root, self.spec.class_name,
                  self.latent_channels)
        final = self._final_metrics(result)
        if self.tracker is not None:
            # The last epoch's row is logged already; what only the final model has (mIoU, the
            # thresholds, a method's own metrics) is added at that step, and the per-metric best
            # epochs, which the papers report, under their own names.
            logged = history.epochs[-1] if history.epochs and history.epochs[-1]["epoch"] == self.epochs else {}
            self.tracker.log_metrics({k: v for k, v in final.items() if k not in logged}, step=self.epochs)
            self.tracker.log_metrics(best_metrics(history.best), step=self.epochs)
        if self.settings.figures:
            artifacts = write_figures(self.out / "artifacts", result, self.test_set, final.get("fair_threshold"),
                                      title=f"{self.spec.method} {self.spec.dataset}/{self.spec.class_name}")
        else:
            artifacts = write_curves(self.out / "artifacts", result)
        summary = {
            "method": self.spec.method, "dataset": self.spec.dataset, "class": self.spec.class_name,
            "epochs": self.epochs, "last": final,
            "best": history.best, "history": history.epochs,
            "image_size": list(self.image_size), "seed": self.seed,
            "identity": self.run_identity(),
        }
        if self.tracker is not None:
            for path in artifacts:  # the record is stored already (Tracker.log_record: run_record.json)
                self.tracker.log_artifact(path, artifact_path="figures")
        atomic_write_json(self.out / METRICS, summary)  # last: its presence marks a complete run
        if self.tracker is not None:
            self.tracker.log_artifact(self.out / METRICS)
        return summary


# --------------------------------------------------------------------------- shared helpers


def check_finite(scores: Scores, logp: list[torch.Tensor], what: str) -> None:
    """TrainingError when scores are NaN or infinite: AUROCs of such scores mean nothing."""
    bad = int((~torch.isfinite(scores.image)).sum())
    if bad:
        low = min(float(m.float().min()) for m in logp)
        raise TrainingError(
            f"{bad} of {len(scores.image)} image scores of {what} are not finite although the loss "
            f"was (lowest stored log-likelihood: {low}; float16 maps hold values down to -65504 "
            f"only, so the model assigns vanishing likelihoods). The model has diverged: try a lower "
            f"lr or fewer epochs; no metrics were written."
        )


def evaluate_scores(scores: Scores, labels: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    """The metrics every run reports. Pixel metrics need at least one defect pixel in the set."""
    out = {"image_auroc": M.image_auroc(labels, scores.image.numpy())}
    if masks.any():
        out["pixel_auroc"] = M.pixel_auroc(masks, scores.pixel_map.numpy())
        pro_map = scores.pro_map.numpy()
        out["aupro"] = M.aupro(masks, pro_map, convention="mvtec")
        out["aupro_code"] = M.aupro(masks, pro_map, convention="code")
    return out


def save_maps(path: Path, logp: list[torch.Tensor], labels: np.ndarray, paths: list[Path],
              data_root: Path, class_name: str, channels: list[int]) -> None:
    """Per-image, per-scale log-likelihood maps (float16) with the image each row belongs to and
    each scale's latent channel count (sum_c z^2 = -2 C logp, which U-Flow's NFA needs)."""
    class_dir = Path(data_root) / class_name
    arrays = {f"scale{i}": m.numpy().astype(np.float16) for i, m in enumerate(logp)}
    arrays["labels"] = labels
    arrays["paths"] = np.array([str(Path(p).relative_to(class_dir)) for p in paths])
    arrays["channels"] = np.array(channels)
    atomic_write_bytes(path, lambda f: np.savez_compressed(f, **arrays))


@dataclass
class StoredMaps:
    log_likelihoods: list[torch.Tensor]
    labels: np.ndarray
    paths: list[str]
    channels: list[int]


def load_maps(path: Path) -> StoredMaps:
    with np.load(path) as data:
        n_scales = sum(1 for k in data.files if k.startswith("scale"))
        logp = [torch.from_numpy(data[f"scale{i}"]) for i in range(n_scales)]
        return StoredMaps(logp, data["labels"], list(data["paths"]), data["channels"].tolist())


def best_metrics(best: dict[str, dict[str, float]]) -> dict[str, float]:
    """``{"image_auroc": {"value": v, "epoch": e}}`` -> ``{"best_image_auroc": v,
    "best_image_auroc_epoch": e}``: the per-metric best epochs as metrics of their own."""
    out: dict[str, float] = {}
    for name, entry in best.items():
        out[f"best_{name}"] = entry["value"]
        out[f"best_{name}_epoch"] = entry["epoch"]
    return out


def write_figures(folder: Path, result: EvalResult, dataset: AnomalyDataset, threshold: float | None,
                  title: str = "") -> list[Path]:
    """ROC and PRO curves (PNG, PDF, CSV) and the map grid of a run (harness.figures)."""
    from harness.figures import run_figures

    return run_figures(folder, result.labels, result.scores.image, result.scores.pro_map, result.masks,
                       threshold, dataset, title=title)


def write_curves(folder: Path, result: EvalResult) -> list[Path]:
    """The ROC and PRO curve data (CSV) of a run that draws no figures."""
    from harness.figures import run_curves

    return run_curves(folder, result.labels, result.scores.image, result.scores.pro_map, result.masks)


# --------------------------------------------------------------------------- entry points


def run_training(spec: RunSpec, settings: RunSettings | None = None, resume: bool = False,
                 labels: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train and evaluate one run with MLflow tracking; ``resume`` continues an interrupted run
    in the same MLflow run. ``labels``: what the run is in the experiment grid (protocol, variant,
    demo), as MLflow tags and in the run name."""
    from harness.tracking import Tracker, default_tracking_uri, run_name

    settings = settings or RunSettings()
    labels = {"protocol": "none", "variant": _variant_of(spec), "demo": False, **(labels or {})}
    trainer = Trainer(spec, settings)
    trainer._check_out_dir(resume)
    if resume and (spec.out_dir / METRICS).exists():
        return json.loads((spec.out_dir / METRICS).read_text())
    id_file = spec.out_dir / TRACKING_ID
    run_id = id_file.read_text().strip() if resume and id_file.exists() else None
    seed = settings.seed if settings.seed is not None else trainer.config.seed
    in_grid = labels["protocol"] != "none"
    name_variant = labels["protocol"] if labels["variant"] == "default" and in_grid else labels["variant"]
    tracker = Tracker(
        uri=settings.tracking_uri or default_tracking_uri(), experiment=settings.experiment,
        run_name=run_name(spec.method, spec.dataset, spec.class_name, name_variant, seed),
        enabled=settings.tracking, run_id=run_id,
        tags={**labels, "demo": str(bool(labels["demo"])).lower(), "seed": seed},
    )
    with tracker:
        if tracker.run_id is not None:
            spec.out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(id_file, lambda f: f.write(tracker.run_id.encode()))
        trainer.tracker = tracker
        return trainer.fit(resume)


def _variant_of(spec: RunSpec) -> str:
    """A run outside the grid is named by its overrides (``pool=max``), or ``default``."""
    if not spec.overrides:
        return "default"
    return ",".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in sorted(spec.overrides.items()))


def rescore_maps(spec: RunSpec, scoring: Any = None) -> dict[str, float]:
    """Metrics from a finished run's stored maps, optionally with another scoring
    (aggregation, top-K): the ablations that need no retraining."""
    return rescore_many(spec, [scoring])[0]


def rescore_many(spec: RunSpec, scorings: Sequence[Any]) -> list[dict[str, float]]:
    """``rescore_maps`` for several scorings, reading the maps and the masks once
    (None = the method's own scoring)."""
    path = spec.out_dir / MAPS
    if not path.exists():
        raise HarnessError(f"{path} not found; train the run first (it is written at the end of training)")
    trainer = Trainer(spec, RunSettings(tracking=False, progress=False))
    stored = load_maps(path)
    test_set = AnomalyDataset(spec.data_root, spec.class_name, "test", trainer.image_size, validate=False,
                              preprocessing=trainer.preprocessing)
    class_dir = spec.data_root / spec.class_name
    if [str(Path(r.path).relative_to(class_dir)) for r in test_set.records] != stored.paths:
        raise HarnessError(f"{path} was made from another test set than {class_dir}; the data changed")
    masks = np.stack([test_set[i]["mask"][0].numpy() > 0.5 for i in range(len(test_set))])
    masks = resize_masks(masks, trainer.metric_size)
    return [evaluate_scores(score(stored.log_likelihoods, trainer.metric_size, scoring or trainer.config.scoring()),
                            stored.labels, masks) for scoring in scorings]


def _with_run_seed(spec: RunSpec, settings: RunSettings) -> RunSettings:
    """Settings whose seed is the run's own (from its record) unless one is given: a seed only
    shapes training, so evaluating a run needs no --seed."""
    path = spec.out_dir / RECORD
    if settings.seed is not None or not path.exists():
        return settings
    try:
        seed = json.loads(path.read_text())["seed"]
    except (ValueError, KeyError, TypeError) as err:
        raise HarnessError(f"{path} is not a run record ({err}); the run folder is damaged") from None
    return dataclasses.replace(settings, seed=seed)


def _check_recorded_config(spec: RunSpec, settings: RunSettings) -> None:
    """Stored maps come from the run's own model: only scoring settings may differ from its record."""
    from harness.scoring import ScoringSpec

    path = spec.out_dir / RECORD
    if not path.exists():
        return
    try:
        recorded = json.loads(path.read_text())["config"]["method_config"]
    except (ValueError, KeyError, TypeError) as err:
        raise HarnessError(f"{path} is not a run record ({err}); the run folder is damaged") from None
    current = to_dict(Trainer(spec, dataclasses.replace(settings, tracking=False, progress=False)).config)
    scoring = {f.name for f in dataclasses.fields(ScoringSpec)}
    changed = [d for d in _differences(recorded, current) if d.split(" ")[0].split(".")[0] not in scoring]
    if changed:
        raise HarnessError(
            f"{spec.out_dir} was trained with other method settings than given; changed: "
            f"{'; '.join(changed[:8])}. Its maps can only be re-scored (scoring settings such as "
            f"top_k or image_aggregation); drop the other --set values."
        )


def evaluate_run(spec: RunSpec, settings: RunSettings | None = None, from_maps: bool = False) -> dict[str, float]:
    """Evaluate a run's checkpoint on its test set (or re-score its stored maps); writes nothing."""
    settings = _with_run_seed(spec, settings or RunSettings(tracking=False))
    if from_maps:
        _check_recorded_config(spec, settings)
        return rescore_maps(spec)
    path = spec.out_dir / CHECKPOINT
    if not path.exists():
        raise HarnessError(f"{path} not found; train first or point --out at a run folder")
    trainer = Trainer(spec, settings)
    state = ckpt.load(path, map_location=trainer.device)
    changed = _differences(state.get("config"), to_dict(trainer.config))
    if changed:
        # Another pooling or input size would score the stored model on other features.
        raise ckpt.CheckpointError(
            f"{path} was trained with other method settings than given; changed: "
            f"{'; '.join(changed[:8])}. Evaluate with the run's own settings (drop those --set), "
            f"or re-score its maps with another scoring (`flowad evaluate --from-maps`)."
        )
    trainer._setup()
    trainer.model.load_state_dict(state["model"])
    return trainer.evaluate().metrics
