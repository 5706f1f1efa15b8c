"""Figures for a paper or a slide: ROC and PRO curves, and anomaly-map grids.

Two kinds of map grid:

- per run (``run_figures``, written at the end of training into ``<run>/artifacts/``): one column
  per test image, sampled across defect types, with four labelled rows: the image, its ground
  truth, the predicted mask at the run's fair threshold (one false-positive pixel per training
  image, harness.metrics.fair_threshold) and the anomaly map. Column titles give the defect type,
  the file and the image score.
- per class (``class_figure``, the pipeline's ``figures`` stage): the same images for every method
  of one protocol, one row per method, from the runs' stored maps (maps.npz).

The maps shown are the segmentation maps (the map the fair threshold and PRO apply to). Every
figure uses one colour scale: a run's maps are min-max normalised over its whole test set, so
maps of different images, and of different methods, share the scale [0, 1] whatever each
method's raw score range.

Every figure is saved as PDF (vector, for papers) and as a 200 dpi PNG; curves also as CSV data
(``dvc plots`` reads those). matplotlib is imported only inside the functions that draw.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DPI = 200
FORMATS = ("png", "pdf")
FPR_LIMIT = 0.3  # PRO curves are integrated up to this false-positive rate (MVTec AD)
MAX_COLUMNS = 8

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Sample:
    """One test image of a map grid and what a method made of it."""

    image: Any  # ImageNet-normalised [3,H,W], or uint8 [H,W,3]
    mask: Any  # ground truth [H,W] (zeros for a good image)
    anomaly_map: Any  # [H,W], normalised to the figure's colour scale
    predicted: Any  # boolean [H,W]: the map above the fair threshold (None: no threshold)
    defect: str  # "good" or the defect type
    name: str  # the file, for the caption
    score: float  # the image score


# --------------------------------------------------------------------------- choosing images


def sample_across_defects(defects: Sequence[str], count: int = MAX_COLUMNS, good: int = 2) -> list[int]:
    """Indices of ``count`` test images: up to ``good`` defect-free ones, the rest taken in turn
    from each defect type (the first of each type, then the second, ...), so that a class with
    several defect types shows all of them rather than the first type only."""
    by_type: dict[str, list[int]] = {}
    for index, defect in enumerate(defects):
        by_type.setdefault(defect, []).append(index)
    all_good = by_type.pop("good", [])
    goods = all_good[:good]
    picks: list[int] = []
    queues = [list(indices) for _, indices in sorted(by_type.items())]
    while len(picks) < count - len(goods) and any(queues):
        for queue in queues:
            if queue and len(picks) < count - len(goods):
                picks.append(queue.pop(0))
    goods = all_good[: count - len(picks)]  # few defective images: more good ones
    return picks + goods


def normalise(maps: Any) -> Any:
    """Min-max over the whole set of maps, to [0, 1]: one colour scale for a run."""
    import numpy as np

    maps = np.asarray(maps, dtype=np.float32)
    low, high = float(maps.min()), float(maps.max())
    return (maps - low) / (high - low) if high > low else np.zeros_like(maps)


# --------------------------------------------------------------------------- curves


def roc_points(labels: Any, scores: Any) -> tuple[Any, Any, float]:
    """Image-level ROC curve (fpr, tpr) and its area."""
    import numpy as np
    from sklearn.metrics import roc_auc_score, roc_curve

    labels = np.asarray(_to_numpy(labels)).ravel().astype(int)
    scores = np.asarray(_to_numpy(scores)).ravel().astype(np.float64)
    if len(np.unique(labels)) < 2:
        raise ValueError("A ROC curve needs both normal (0) and anomalous (1) labels.")
    fpr, tpr, _ = roc_curve(labels, scores)
    return fpr, tpr, float(roc_auc_score(labels, scores))


def write_curve_csv(path: str | Path, columns: dict[str, Any]) -> Path:
    """Curve data as CSV with a header (one column per name), the form ``dvc plots`` reads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(columns)
    rows = zip(*(list(map(float, columns[n])) for n in names))
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(names)
        writer.writerows([f"{v:.6g}" for v in row] for row in rows)
    return path


def roc_figure(labels: Any, scores: Any, stem: str | Path, title: str | None = None) -> list[Path]:
    """Image-level ROC curve with its AUROC in the legend: ``stem``.png, .pdf and .csv."""
    fpr, tpr, auroc = roc_points(labels, scores)
    fig, ax = _curve_axes()
    ax.plot(fpr, tpr, color="tab:blue", lw=1.8, label=f"AUROC = {100 * auroc:.1f}%")
    ax.plot([0, 1], [0, 1], color="gray", lw=1, ls="--", label="chance")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="False positive rate", ylabel="True positive rate")
    ax.set_title(title or "Image-level ROC curve", fontsize=10)
    ax.legend(loc="lower right", fontsize=9)
    return [*save(fig, stem), write_curve_csv(Path(stem).with_suffix(".csv"), {"fpr": fpr, "tpr": tpr})]


def pro_figure(fpr: Any, pro: Any, stem: str | Path, fpr_limit: float = FPR_LIMIT, title: str | None = None,
               aupro: float | None = None) -> list[Path]:
    """Per-region overlap against false-positive rate up to ``fpr_limit``: ``stem``.png, .pdf, .csv.

    The legend shows ``aupro`` when given (harness.metrics.aupro, either convention), else the area
    under this curve up to the limit divided by the limit."""
    import numpy as np

    x, y = _pro_until(fpr, pro, fpr_limit)
    if aupro is None:
        aupro = float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2) / fpr_limit) if len(x) > 1 else 0.0
    fig, ax = _curve_axes()
    ax.plot(x, y, color="tab:orange", lw=1.8, label=f"AU-PRO (FPR \u2264 {fpr_limit:g}) = {100 * aupro:.1f}%")
    ax.fill_between(x, y, color="tab:orange", alpha=0.15)
    ax.set(xlim=(0, fpr_limit), ylim=(0, 1.01), xlabel="False positive rate", ylabel="Per-region overlap")
    ax.set_title(title or "PRO curve", fontsize=10)
    ax.legend(loc="lower right", fontsize=9)
    return [*save(fig, stem), write_curve_csv(Path(stem).with_suffix(".csv"), {"fpr": x, "pro": y})]


def _pro_until(fpr: Any, pro: Any, fpr_limit: float) -> tuple[Any, Any]:
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
    return x, y


def _curve_axes() -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2, 4.0), layout="constrained")
    ax = fig.subplots()
    ax.grid(alpha=0.3)
    return fig, ax


# --------------------------------------------------------------------------- map grids

ROWS = ("image", "ground truth", "predicted mask\n(fair threshold)", "anomaly map")


def map_grid(samples: Sequence[Sample], stem: str | Path, title: str | None = None) -> list[Path]:
    """``map_grid_figure`` saved as ``stem``.png (200 dpi) and .pdf."""
    return save(map_grid_figure(samples, title), stem)


def map_grid_figure(samples: Sequence[Sample], title: str | None = None) -> Any:
    """One column per sample, four labelled rows (image, ground truth, predicted mask at the fair
    threshold, anomaly map), one colour scale."""
    if not samples:
        raise ValueError("map_grid needs at least one sample")
    cell = 1.6
    fig, axes = _grid_axes(len(ROWS), len(samples), cell, title)
    mappable = None
    for col, sample in enumerate(samples):
        picture = _display_image(sample.image)
        axes[0, col].imshow(picture)
        axes[0, col].set_title(_caption(sample), fontsize=7)
        _overlay_region(axes[1, col], picture, sample.mask, "red")
        _overlay_region(axes[2, col], picture, sample.predicted, "cyan")
        mappable = _overlay_map(axes[3, col], picture, sample.anomaly_map)
    for row, name in enumerate(ROWS):
        axes[row, 0].set_ylabel(name, fontsize=8)
    fig.colorbar(mappable, ax=axes[3, :].tolist(), label="anomaly score")
    fig.supxlabel("Anomaly maps min-max normalised over the whole test set (one colour scale); predicted mask: "
                  "the map above the fair threshold (one false-positive pixel per training image).", fontsize=7)
    return fig


def class_figure(images: Sequence[Any], masks: Sequence[Any], captions: Sequence[str],
                 methods: dict[str, Sequence[Sample]], stem: str | Path, title: str | None = None,
                 by_format: bool = False) -> list[Path]:
    """``class_figure_figure`` saved as ``stem``.png (200 dpi) and .pdf (``by_format``: in png/
    and pdf/ beside the stem)."""
    return save(class_figure_figure(images, masks, captions, methods, title), stem, by_format=by_format)


def class_figure_figure(images: Sequence[Any], masks: Sequence[Any], captions: Sequence[str],
                        methods: dict[str, Sequence[Sample]], title: str | None = None) -> Any:
    """The same test images for several methods: a row of images (captions: defect type and
    file), a row of ground truth, then one row per method with its anomaly map and, outlined, its
    predicted mask at the fair threshold; panel titles give each method's image score."""
    if not methods:
        raise ValueError("class_figure needs at least one method")
    fig, axes = _grid_axes(2 + len(methods), len(images), 1.6, title)
    pictures = [_display_image(image) for image in images]
    mappable = None
    for col, picture in enumerate(pictures):
        axes[0, col].imshow(picture)
        axes[0, col].set_title(captions[col], fontsize=7)
        _overlay_region(axes[1, col], picture, masks[col], "red")
        for row, samples in enumerate(methods.values(), start=2):
            sample = samples[col]
            mappable = _overlay_map(axes[row, col], picture, sample.anomaly_map)
            if sample.predicted is not None and _as_2d(sample.predicted).any():
                axes[row, col].contour(_resize_nearest(_as_2d(sample.predicted), *picture.shape[:2]).astype(float),
                                       levels=[0.5], colors="white", linewidths=0.7)
            axes[row, col].set_title(f"score {sample.score:.3g}", fontsize=7)
    axes[0, 0].set_ylabel("image", fontsize=8)
    axes[1, 0].set_ylabel("ground truth", fontsize=8)
    for row, method in enumerate(methods, start=2):
        axes[row, 0].set_ylabel(method, fontsize=8)
    fig.colorbar(mappable, ax=axes[2:, :].ravel().tolist(), label="anomaly score")
    fig.supxlabel("Anomaly maps min-max normalised over each run's whole test set (one colour scale); white outline: "
                  "the predicted mask at the run's fair threshold (one false-positive pixel per training image).",
                  fontsize=7)
    return fig


def _caption(sample: Sample) -> str:
    return f"{sample.defect}\n{_shorten(sample.name, 18)}\nscore {sample.score:.3g}"


def _grid_axes(rows: int, cols: int, cell: float, title: str | None) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(cell * cols + 1.8, cell * rows + (0.6 if title else 0.3)), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    return fig, axes


def _overlay_region(ax: Any, picture: Any, region: Any, colour: str) -> None:
    """The image with a region filled and outlined (nothing drawn for an empty region)."""
    import numpy as np
    from matplotlib.colors import to_rgba

    ax.imshow(picture)
    if region is None:
        return
    height, width = picture.shape[:2]
    region = _resize_nearest(_as_2d(region) > 0.5, height, width)
    if region.any():
        fill = np.zeros((height, width, 4), dtype=np.float32)
        fill[region] = (*to_rgba(colour)[:3], 0.35)
        ax.imshow(fill)
        ax.contour(region.astype(np.float32), levels=[0.5], colors=colour, linewidths=0.8)


def _overlay_map(ax: Any, picture: Any, anomaly_map: Any) -> Any:
    height, width = picture.shape[:2]
    extent = (-0.5, width - 0.5, height - 0.5, -0.5)
    ax.imshow(picture)
    mappable = ax.imshow(_as_2d(anomaly_map), cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0, extent=extent,
                         interpolation="bilinear")
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    return mappable


def save(fig: Any, stem: str | Path, formats: Sequence[str] = FORMATS, by_format: bool = False) -> list[Path]:
    """``stem``.png at 200 dpi and ``stem``.pdf (``by_format``: in sub-folders png/ and pdf/ of
    the stem's folder); a bare Figure renders without a screen or pyplot."""
    stem = Path(stem)
    paths = []
    for fmt in formats:
        path = (stem.parent / fmt / stem.name if by_format else stem).with_suffix(f".{fmt}")
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format=fmt, dpi=DPI)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- one run


def run_curves(folder: Path, labels: Any, image_scores: Any, maps: Any, masks: Any) -> list[Path]:
    """A run's ROC (and PRO, with defect pixels) curve data as CSV, without drawing: what a run
    that keeps no figures still gives ``dvc plots`` (the figures stage collects these files)."""
    import numpy as np

    from harness import metrics as M

    folder = Path(folder)
    fpr, tpr, _ = roc_points(labels, image_scores)
    paths = [write_curve_csv(folder / "roc_image.csv", {"fpr": fpr, "tpr": tpr})]
    masks = np.asarray(masks)
    if masks.any():
        x, y = _pro_until(*M.pro_curve(masks, np.asarray(_to_numpy(maps), dtype=np.float32)), FPR_LIMIT)
        paths.append(write_curve_csv(folder / "pro_curve.csv", {"fpr": x, "pro": y}))
    return paths


def run_figures(folder: Path, labels: Any, image_scores: Any, maps: Any, masks: Any, threshold: float | None,
                dataset: Any, title: str = "") -> list[Path]:
    """A run's figures in ``folder``: ROC (and PRO, with defect pixels) curves, and the map grid.

    ``maps``: the segmentation maps [N,H,W] of the test set (``threshold`` applies to them; None
    draws no predicted mask); ``dataset``: the test set (harness.data.AnomalyDataset)."""
    import numpy as np

    from harness import metrics as M

    folder = Path(folder)
    maps = np.asarray(_to_numpy(maps), dtype=np.float32)
    masks = np.asarray(masks)
    paths = roc_figure(labels, image_scores, folder / "roc_image", title=f"{title} image ROC".strip())
    if masks.any():
        fpr, pro = M.pro_curve(masks, maps)
        paths += pro_figure(fpr, pro, folder / "pro_curve", title=f"{title} PRO curve".strip())
    scores = np.asarray(_to_numpy(image_scores), dtype=np.float64).ravel()
    scale = normalise(maps)
    samples = []
    for i in sample_across_defects([r.defect for r in dataset.records]):
        record = dataset.records[i]
        samples.append(Sample(image=dataset[i]["image"], mask=masks[i], anomaly_map=scale[i],
                              predicted=None if threshold is None else maps[i] > threshold,
                              defect=record.defect, name=Path(record.path).name, score=float(scores[i])))
    return paths + map_grid(samples, folder / "anomaly_maps", title=title or None)


# --------------------------------------------------------------------------- array helpers


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


def _display_image(value: Any) -> Any:
    """An ImageNet-normalised float image [3,H,W] or [H,W,3], or uint8 -> float HxWx3 in [0, 1]."""
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
    array = array.astype(np.float32) * np.asarray(_IMAGENET_STD, np.float32) + np.asarray(_IMAGENET_MEAN, np.float32)
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
