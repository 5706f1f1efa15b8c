"""Anomaly-detection metrics: image and pixel AUROC, AU-PRO (two conventions), mIoU, fair threshold.

Every score lies in [0, 1] (tables multiply by 100). Anomaly maps are "higher = more anomalous".
Inputs may be numpy arrays, torch tensors or lists of either; maps and masks are stacks [N, H, W]
([N, 1, H, W] and a single [H, W] are accepted too). Masks are binarised by != 0.

AU-PRO comes in two conventions, both computed without a Python loop over thresholds:

- "mvtec": the MVTec AD definition (Bergmann et al., IJCV 2021). PRO(t) is the mean, over all
  connected ground-truth regions of all images, of the fraction of region pixels with score >= t;
  FPR(t) is the fraction of normal pixels with score >= t; t runs over every distinct score. PRO is
  integrated over FPR in [0, fpr_limit] (linear interpolation at exactly fpr_limit) and divided by
  fpr_limit.
- "code": the convention of the MSFlow code. n_thresholds equally spaced thresholds
  from the global minimum to the global maximum score, a pixel is positive when score > t, only
  thresholds with FPR < fpr_limit are kept, their FPRs are min-max rescaled to [0, 1] and the area
  is the trapezoid rule (sklearn.metrics.auc).
- "cflow": CFlow-AD's own code (its published PRO): 1000 thresholds descending from the maximum
  score by (max - min) / 1000, FPR <= fpr_limit kept, and a region's overlap counted on its
  hole-filled shape (skimage's filled image within its bounding box) but divided by its unfilled
  area, so a region with holes can have an overlap above 1. Rescaling and area as in "code".

mIoU follows U-Flow: per-image IoU (|P & G| + eps) / (|P | G| + eps) with P = score > t, averaged
over all test images, good ones included.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from skimage.measure import label as label_regions
from sklearn.metrics import auc, roc_auc_score

# U-Flow's per-image IoU adds the float64 machine epsilon to numerator and denominator. It only
# decides the 0/0 case: a good image without detections scores exactly 1, while a good image with
# any detection scores (0 + eps) / (k + eps) ~ 1e-16, i.e. 0, as the U-Flow definition states.
MIOU_EPS = float(np.finfo(np.float64).eps)

PRO_CONVENTIONS = ("mvtec", "code", "cflow")

ArrayLike = Any  # numpy array, torch tensor, or a list of either


# ----------------------------------------------------------------------------------------------
# Input handling


def _as_numpy(x: ArrayLike) -> np.ndarray:
    """A numpy view/copy of an array, torch tensor, or sequence of them."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach()
        if str(x.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            x = x.float()
        return x.cpu().numpy()
    if isinstance(x, (list, tuple)) and len(x) > 0 and not np.isscalar(x[0]):
        return np.stack([_as_numpy(item) for item in x])
    return np.asarray(x)


def _as_stack(x: np.ndarray, name: str) -> np.ndarray:
    """[N, H, W] from [N, H, W], [N, 1, H, W] or a single [H, W]."""
    if x.ndim == 2:
        return x[None]
    if x.ndim == 4 and x.shape[1] == 1:
        return x[:, 0]
    if x.ndim != 3:
        raise ValueError(
            f"{name} must have shape [N, H, W] (or [N, 1, H, W]), got shape {tuple(x.shape)}"
        )
    return x


def _as_scores(x: np.ndarray, name: str) -> np.ndarray:
    """Scores as float32 or float64 (kept as given), rejecting NaN."""
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64 if np.issubdtype(x.dtype, np.integer) else np.float32)
    if np.isnan(x).any():
        raise ValueError(f"{name} contain NaN values; check the model output before evaluating")
    return np.ascontiguousarray(x)


def _pixel_inputs(masks: ArrayLike, maps: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Binary masks and score maps of the same shape [N, H, W]."""
    masks_np, maps_np = _as_numpy(masks), _as_numpy(maps)
    masks3, maps3 = _as_stack(masks_np, "masks"), _as_stack(maps_np, "maps")
    if masks3.shape != maps3.shape:
        raise ValueError(
            f"masks and maps must have the same shape, got masks {tuple(masks_np.shape)} and "
            f"maps {tuple(maps_np.shape)}; resize the masks (nearest) or the maps to one resolution"
        )
    return np.ascontiguousarray(masks3 != 0), _as_scores(maps3, "maps")


def _require_both_classes(n_positive: int, n_negative: int, metric: str, unit: str) -> None:
    if n_positive == 0 or n_negative == 0:
        missing = "anomalous" if n_positive == 0 else "normal"
        raise ValueError(
            f"{metric} needs both normal and anomalous {unit}s, but there is no {missing} {unit}; "
            f"evaluate on a test set that contains both"
        )


# ----------------------------------------------------------------------------------------------
# AUROC


def image_auroc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve of image scores against image labels (label != 0 is anomalous)."""
    labels_np = _as_numpy(labels).ravel() != 0
    scores_np = _as_scores(_as_numpy(scores).ravel(), "image scores")
    if labels_np.shape != scores_np.shape:
        raise ValueError(
            f"labels and scores must have one entry per image, got labels of shape "
            f"{labels_np.shape} and scores of shape {scores_np.shape}"
        )
    n_anomalous = int(labels_np.sum())
    _require_both_classes(n_anomalous, labels_np.size - n_anomalous, "image AUROC", "image")
    return float(roc_auc_score(labels_np, scores_np))


def pixel_auroc(masks: ArrayLike, maps: ArrayLike) -> float:
    """ROC AUC over all pixels of all images (normal images contribute all-negative masks).

    Computed as the Mann-Whitney statistic, P(score_defect > score_normal) + 0.5 P(equal), which is
    the same number as sklearn's roc_auc_score (ties included) but needs one sort of the normal
    pixels instead of sklearn's argsort of all pixels (about 40 s on 150 maps of 512 x 512).
    """
    masks_b, maps_f = _pixel_inputs(masks, maps)
    defect = np.sort(maps_f[masks_b])
    normal = np.sort(maps_f[~masks_b])
    _require_both_classes(defect.size, normal.size, "pixel AUROC", "pixel")
    below = np.searchsorted(normal, defect, side="left")  # normal pixels strictly below
    below_or_equal = np.searchsorted(normal, defect, side="right")
    twice_u = int(np.sum(below, dtype=np.int64)) + int(np.sum(below_or_equal, dtype=np.int64))
    return twice_u / (2.0 * defect.size * normal.size)


# ----------------------------------------------------------------------------------------------
# AU-PRO


def _defect_regions(
    masks: np.ndarray, maps: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores of all defect pixels, the region (0..R-1 over the whole set) of each, region areas.

    Regions are connected components of each image's mask with full (8-) connectivity, which is
    skimage.measure.label's default for 2-D and what both references use (the MVTec AD evaluation
    code labels with a 3 x 3 structure of ones; the MSFlow/CFlow code calls skimage's label with
    its default). Diagonally touching pixels therefore belong to one region.
    """
    scores, regions = [], []
    n_regions = 0
    for mask, amap in zip(masks, maps):
        if not mask.any():
            continue
        labelled, n_found = label_regions(mask, connectivity=2, return_num=True)
        scores.append(amap[mask])
        regions.append(labelled[mask] - 1 + n_regions)
        n_regions += n_found
    if n_regions == 0:
        raise ValueError(
            "PRO needs at least one anomalous region, but every mask is empty; "
            "evaluate on a test set with ground-truth masks"
        )
    region_of_pixel = np.concatenate(regions).astype(np.int64)
    areas = np.bincount(region_of_pixel, minlength=n_regions)
    return np.concatenate(scores), region_of_pixel, areas


def _pro_points_mvtec(
    masks: np.ndarray, maps: np.ndarray, fpr_limit: float
) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) at every distinct score t, as score >= t, from t = +inf (0, 0) downwards.

    Only the part of the curve up to the first point with FPR > fpr_limit is returned: that is all
    the integral needs, and it spares sorting the low-scoring bulk of the normal pixels.
    """
    defect_scores, region_of_pixel, areas = _defect_regions(masks, maps)
    normal = maps[~masks]
    n_normal = normal.size
    _require_both_classes(defect_scores.size, n_normal, "PRO", "pixel")

    # The n_keep highest normal scores reach an FPR above fpr_limit (+2 guards against rounding
    # in fpr_limit * n_normal); lower thresholds do not change the curve below the limit.
    n_keep = min(n_normal, int(np.floor(fpr_limit * n_normal)) + 2)
    normal.partition(n_normal - n_keep)
    cutoff = normal[n_normal - n_keep]
    normal_top = np.sort(normal[normal >= cutoff])  # ties with the cutoff included
    del normal

    # Each defect pixel weighs 1 / (area of its region * number of regions), so the summed weight
    # of the pixels at or above t is the mean over regions of the covered fraction, i.e. PRO(t).
    n_regions = areas.size
    weights = 1.0 / (areas[region_of_pixel].astype(np.float64) * n_regions)
    order = np.argsort(defect_scores, kind="stable")
    defect_sorted, weights_sorted = defect_scores[order], weights[order]
    first_kept = int(np.searchsorted(defect_sorted, cutoff, side="left"))
    defect_top, defect_top_weights = defect_sorted[first_kept:], weights_sorted[first_kept:]

    # Merge the two sorted runs (a stable sort of two runs is a linear merge) and walk them from
    # the highest score down, counting normal pixels and summing defect weights. Intermediates
    # are freed early: this curve can have tens of millions of points.
    merged = np.concatenate([normal_top, defect_top])
    descending = np.argsort(merged, kind="stable")[::-1]
    scores_desc = merged[descending]
    del merged
    count_dtype = np.int32 if scores_desc.size < 2**31 else np.int64
    n_normal_so_far = np.cumsum(descending < normal_top.size, dtype=count_dtype)
    del descending, normal_top
    # One curve point per distinct score, after all pixels of that score: ties are never split.
    group_end = np.flatnonzero(np.append(scores_desc[1:] != scores_desc[:-1], True))
    del scores_desc
    n_normal_at_or_above = n_normal_so_far[group_end]
    del n_normal_so_far
    n_defect_at_or_above = group_end + 1 - n_normal_at_or_above
    del group_end
    # Defect weights in descending score order; within a tie group the order does not matter
    # because a point is only read at the end of its group.
    weight_at_or_above = np.concatenate([[0.0], np.cumsum(defect_top_weights[::-1])])
    fpr = np.zeros(n_normal_at_or_above.size + 1)  # t = +inf gives the point (0, 0)
    pro = np.zeros(n_normal_at_or_above.size + 1)
    np.divide(n_normal_at_or_above, n_normal, out=fpr[1:])
    del n_normal_at_or_above
    np.minimum(weight_at_or_above[n_defect_at_or_above], 1.0, out=pro[1:])
    return fpr, pro


def _trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) * 0.5))


def _area_up_to(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float) -> float:
    """Trapezoid area under the curve for FPR in [0, fpr_limit], interpolating at fpr_limit."""
    first_past = int(np.searchsorted(fpr, fpr_limit, side="right"))
    area = _trapezoid(fpr[:first_past], pro[:first_past])
    if first_past < fpr.size and fpr[first_past - 1] < fpr_limit:
        x0, x1 = fpr[first_past - 1], fpr[first_past]
        y0, y1 = pro[first_past - 1], pro[first_past]
        pro_at_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        area += (fpr_limit - x0) * (y0 + pro_at_limit) * 0.5
    return area


def _truncate_curve(
    fpr: np.ndarray, pro: np.ndarray, fpr_limit: float
) -> tuple[np.ndarray, np.ndarray]:
    """Points with FPR <= fpr_limit, closed by a point at exactly fpr_limit (interpolated)."""
    first_past = int(np.searchsorted(fpr, fpr_limit, side="right"))
    if first_past == fpr.size or fpr[first_past - 1] == fpr_limit:
        return fpr[:first_past], pro[:first_past]
    x0, x1 = fpr[first_past - 1], fpr[first_past]
    y0, y1 = pro[first_past - 1], pro[first_past]
    pro_at_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
    return np.append(fpr[:first_past], fpr_limit), np.append(pro[:first_past], pro_at_limit)


def _code_thresholds(maps: np.ndarray, n_thresholds: int) -> np.ndarray:
    """np.arange(min, max, (max - min) / n) over all maps, evaluated on numpy scalars of the maps'
    dtype exactly as the reference code does (the step of float32 maps is rounded to float32)."""
    lowest, highest = maps.min(), maps.max()
    if highest == lowest:
        return np.empty(0)
    return np.arange(lowest, highest, (highest - lowest) / n_thresholds)


def _code_thresholds_descending(maps: np.ndarray, n_thresholds: int) -> np.ndarray:
    """CFlow-AD's thresholds: max - k * (max - min) / n for k = 0 .. n-1, evaluated on numpy
    scalars of the maps' dtype as its code does; returned ascending."""
    lowest, highest = maps.min(), maps.max()
    if highest == lowest:
        return np.empty(0)
    delta = (highest - lowest) / n_thresholds
    return np.array([highest - step * delta for step in range(n_thresholds)])[::-1]


def _filled_defect_regions(
    masks: np.ndarray, maps: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Like _defect_regions, but each region's pixels are those of its hole-filled shape (the
    overlap CFlow-AD's code counts) while its area stays that of the region itself (its divisor)."""
    from skimage.measure import regionprops

    scores, regions, areas = [], [], []
    for mask, amap in zip(masks, maps):
        if not mask.any():
            continue
        for prop in regionprops(label_regions(mask, connectivity=2)):
            top, left, bottom, right = prop.bbox
            filled = prop.image_filled
            scores.append(amap[top:bottom, left:right][filled])
            regions.append(np.full(int(filled.sum()), len(areas), dtype=np.int64))
            areas.append(int(prop.area))
    if not areas:
        raise ValueError(
            "PRO needs at least one anomalous region, but every mask is empty; "
            "evaluate on a test set with ground-truth masks"
        )
    return np.concatenate(scores), np.concatenate(regions), np.array(areas, dtype=np.int64)


def _pro_points_code(
    masks: np.ndarray, maps: np.ndarray, fpr_limit: float, n_thresholds: int, convention: str = "code"
) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) at the kept equal-spaced thresholds (score > t), FPR rising.

    "code" (MSFlow): thresholds from the minimum up, FPR < fpr_limit kept, overlap on the region.
    "cflow" (CFlow-AD): thresholds from the maximum down, FPR <= fpr_limit kept, overlap on the
    hole-filled region divided by the region's own area (so it can exceed 1 for masks with holes).
    """
    if convention == "cflow":
        defect_scores, region_of_pixel, areas = _filled_defect_regions(masks, maps)
        thresholds = _code_thresholds_descending(maps, n_thresholds)
    else:
        defect_scores, region_of_pixel, areas = _defect_regions(masks, maps)
        thresholds = _code_thresholds(maps, n_thresholds)
    n_normal = int(masks.size - np.count_nonzero(masks))
    _require_both_classes(defect_scores.size, n_normal, "PRO", "pixel")
    n_t = thresholds.size
    if n_t == 0:
        return np.empty(0), np.empty(0)

    # Normal pixels above each threshold: one sort per image (cache-friendly), then a binary
    # search of the thresholds. Scores and thresholds are compared in their common dtype, as
    # "maps > threshold" does.
    common = np.result_type(maps.dtype, thresholds.dtype)
    normal_above = np.zeros(n_t, dtype=np.int64)
    for mask, amap in zip(masks, maps):
        normal = np.sort(amap[~mask]).astype(common, copy=False)
        normal_above += normal.size - np.searchsorted(normal, thresholds, side="right")

    # Region pixels above each threshold: bin each defect pixel by the number of thresholds below
    # its score (score > t_i  <=>  i < bin), histogram per region, reverse cumulative sum.
    bins = np.searchsorted(thresholds, defect_scores.astype(common, copy=False), side="left")
    n_regions = areas.size
    histogram = np.bincount(
        region_of_pixel * (n_t + 1) + bins, minlength=n_regions * (n_t + 1)
    ).reshape(n_regions, n_t + 1)
    at_or_above_bin = np.cumsum(histogram[:, ::-1], axis=1)[:, ::-1]
    region_above = at_or_above_bin[:, 1:]  # column i: pixels with bin >= i + 1, i.e. score > t_i
    pro = (region_above / areas[:, None]).mean(axis=0)
    fpr = normal_above / n_normal

    keep = fpr <= fpr_limit if convention == "cflow" else fpr < fpr_limit
    return fpr[keep][::-1], pro[keep][::-1]


def _check_pro_options(fpr_limit: float, convention: str, n_thresholds: int) -> None:
    if convention not in PRO_CONVENTIONS:
        raise ValueError(f"unknown AU-PRO convention {convention!r}; use one of {PRO_CONVENTIONS}")
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    if convention in ("code", "cflow") and n_thresholds < 2:
        raise ValueError(f"n_thresholds must be at least 2, got {n_thresholds}")


def pro_curve(
    masks: ArrayLike,
    maps: ArrayLike,
    fpr_limit: float = 0.3,
    convention: str = "mvtec",
    n_thresholds: int = 800,
) -> tuple[np.ndarray, np.ndarray]:
    """The PRO curve (fpr, pro), FPR ascending, as used by aupro(), for plots.

    "mvtec": every distinct threshold from (0, 0) up to a final point at exactly fpr_limit.
    "code": the kept thresholds with their raw FPRs (aupro() rescales them to [0, 1]).
    """
    _check_pro_options(fpr_limit, convention, n_thresholds)
    masks_b, maps_f = _pixel_inputs(masks, maps)
    if convention == "mvtec":
        fpr, pro = _pro_points_mvtec(masks_b, maps_f, fpr_limit)
        return _truncate_curve(fpr, pro, fpr_limit)
    return _pro_points_code(masks_b, maps_f, fpr_limit, n_thresholds, convention)


def aupro(
    masks: ArrayLike,
    maps: ArrayLike,
    fpr_limit: float = 0.3,
    convention: str = "mvtec",
    n_thresholds: int = 800,
) -> float:
    """Normalised area under the PRO curve up to fpr_limit (see the module docstring).

    convention="mvtec" is the MVTec AD definition; convention="code" reproduces the MSFlow
    evaluation code (n_thresholds=800); convention="cflow" the CFlow-AD one (n_thresholds=1000).
    "code" and "cflow" return NaN, with a warning, when fewer than two kept thresholds have
    distinct FPRs (the rescaling divides by 0).
    """
    _check_pro_options(fpr_limit, convention, n_thresholds)
    masks_b, maps_f = _pixel_inputs(masks, maps)
    if convention == "mvtec":
        fpr, pro = _pro_points_mvtec(masks_b, maps_f, fpr_limit)
        return float(_area_up_to(fpr, pro, fpr_limit) / fpr_limit)
    fpr, pro = _pro_points_code(masks_b, maps_f, fpr_limit, n_thresholds, convention)
    if fpr.size < 2 or fpr.max() == fpr.min():
        warnings.warn(
            f"AU-PRO ({convention} convention) is undefined: {fpr.size} threshold(s) with "
            f"FPR < {fpr_limit} "
            f"and no spread in their FPRs, so the min-max rescaling divides by zero; "
            f"use convention='mvtec' for a defined value",
            RuntimeWarning,
            stacklevel=2,
        )
        return float("nan")
    rescaled = (fpr - fpr.min()) / (fpr.max() - fpr.min())
    return float(auc(rescaled, pro))


# ----------------------------------------------------------------------------------------------
# mIoU and the "fair" threshold (U-Flow)


def miou(masks: ArrayLike, maps: ArrayLike, threshold: float, eps: float = MIOU_EPS) -> float:
    """Mean over ALL images of (|P & G| + eps) / (|P | G| + eps), with P = score > threshold.

    A good image without detections scores 1; with any detection about 0 (U-Flow's definition).
    """
    masks_b, maps_f = _pixel_inputs(masks, maps)
    predicted = maps_f > np.float64(threshold)  # compared in float64, as in miou_curve()
    intersection = np.count_nonzero(predicted & masks_b, axis=(1, 2))
    union = np.count_nonzero(predicted | masks_b, axis=(1, 2))
    return float(np.mean((intersection + eps) / (union + eps)))


def miou_curve(
    masks: ArrayLike, maps: ArrayLike, thresholds: ArrayLike, eps: float = MIOU_EPS
) -> np.ndarray:
    """miou() at each threshold (any order)."""
    masks_b, maps_f = _pixel_inputs(masks, maps)
    candidates = np.asarray(_as_numpy(thresholds), dtype=np.float64).ravel()
    return _miou_curve(masks_b, maps_f, candidates, eps)


def _miou_curve(
    masks: np.ndarray, maps: np.ndarray, thresholds: np.ndarray, eps: float
) -> np.ndarray:
    # One sort per image and a binary search of all thresholds, instead of one pass per threshold.
    total = np.zeros(thresholds.size)
    for mask, amap in zip(masks, maps):
        defect = np.sort(amap[mask]).astype(np.float64, copy=False)
        normal = np.sort(amap[~mask]).astype(np.float64, copy=False)
        intersection = defect.size - np.searchsorted(defect, thresholds, side="right")
        false_positives = normal.size - np.searchsorted(normal, thresholds, side="right")
        total += (intersection + eps) / (defect.size + false_positives + eps)
    return total / masks.shape[0]


def best_miou(
    masks: ArrayLike,
    maps: ArrayLike,
    thresholds: ArrayLike | int | None = None,
    eps: float = MIOU_EPS,
) -> tuple[float, float]:
    """The best ("oracle") mIoU over thresholds and the threshold reaching it: (miou, threshold).

    thresholds: the candidates, or their number (default 1000) equally spaced from the lowest to
    the highest score of maps. Ties go to the first candidate in the given order.
    """
    masks_b, maps_f = _pixel_inputs(masks, maps)
    if thresholds is None or isinstance(thresholds, (int, np.integer)):
        n = 1000 if thresholds is None else int(thresholds)
        if n < 1:
            raise ValueError(f"the number of mIoU thresholds must be positive, got {n}")
        candidates = np.linspace(float(maps_f.min()), float(maps_f.max()), n)
    else:
        candidates = np.asarray(_as_numpy(thresholds), dtype=np.float64).ravel()
        if candidates.size == 0:
            raise ValueError("best_miou needs at least one threshold, got an empty list")
    curve = _miou_curve(masks_b, maps_f, candidates, eps)
    best = int(np.argmax(curve))
    return float(curve[best]), float(candidates[best])


def fair_threshold(train_maps: ArrayLike, false_positives_per_image: float = 1.0) -> float:
    """Score threshold with, on average, false_positives_per_image normal pixels per image above it.

    U-Flow's "fair" threshold for methods without an automatic one: on anomaly-free (training)
    maps, the target false-positive rate is false_positives_per_image / (H * W). The exceedance
    curve (fraction of pixels with score >= t at every distinct score t) is interpolated linearly
    at the target rate. A target below the share of the top score returns the top score.
    """
    maps_f = _as_stack(_as_scores(_as_numpy(train_maps), "train_maps"), "train_maps")
    n_images, height, width = maps_f.shape
    if false_positives_per_image <= 0:
        raise ValueError(
            f"false_positives_per_image must be positive, got {false_positives_per_image}"
        )
    # target FPR 1/(H*W) x all N*H*W pixels = expected number of pixels above the threshold
    target_count = false_positives_per_image * n_images

    # Only the top n_keep scores matter; each image's own top n_keep contains its share of them.
    pixels = maps_f.reshape(n_images, height * width)
    n_keep = min(pixels.size, int(np.floor(target_count)) + 2)
    per_image = min(n_keep, height * width)
    pool = np.concatenate(
        [np.partition(row, row.size - per_image)[row.size - per_image :] for row in pixels]
    )
    cutoff = np.partition(pool, pool.size - n_keep)[pool.size - n_keep]
    values, counts = np.unique(maps_f[maps_f >= cutoff], return_counts=True)
    n_at_or_above = np.cumsum(counts[::-1])  # strictly increasing as the threshold decreases
    return float(np.interp(target_count, n_at_or_above, values[::-1]))
