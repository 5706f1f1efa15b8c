"""Metrics against slow, plainly written references and hand-made cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.measure import label, regionprops
from sklearn.metrics import auc, roc_auc_score

from harness.metrics import (
    aupro,
    best_miou,
    fair_threshold,
    image_auroc,
    miou,
    miou_curve,
    pixel_auroc,
    pro_curve,
)

TOL = 1e-9
SEEDS = [0, 1, 2, 3, 4]


# ----------------------------------------------------------------------------------------------
# Random test sets: a few 16 x 16 images, blob masks on some of them, optionally tied scores


def random_case(seed: int, n_images: int = 5, size: int = 16, levels: int | None = None):
    rng = np.random.default_rng(seed)
    masks = np.zeros((n_images, size, size), dtype=bool)
    yy, xx = np.mgrid[:size, :size]
    for i in range(1, n_images):  # image 0 stays good
        if rng.random() < 0.3:
            continue  # more good images
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.integers(0, size, 2)
            ry, rx = rng.uniform(0.8, 3.5, 2)
            masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    if not masks.any():
        masks[-1, 3:6, 4:9] = True
    maps = rng.normal(size=masks.shape) + 1.5 * masks * rng.uniform(0.0, 2.0, size=masks.shape)
    if levels is not None:  # quantised scores: many ties, between and across classes
        maps = np.round(maps * levels) / levels
    return masks, maps


CASES = [(seed, levels) for seed in SEEDS for levels in (None, 3)]


# ----------------------------------------------------------------------------------------------
# Brute-force references (loops over thresholds, regionprops per image)


def ref_regions(masks):
    """(image index, pixel coordinates) of every connected GT region, 8-connectivity."""
    regions = []
    for i, mask in enumerate(masks):
        for region in regionprops(label(mask.astype(np.uint8), connectivity=2)):
            regions.append((i, region.coords))
    return regions


def ref_pro_fpr(masks, predicted, regions):
    overlaps = []
    for i, coords in regions:
        overlaps.append(predicted[i][coords[:, 0], coords[:, 1]].sum() / len(coords))
    normal = ~masks
    return float(np.mean(overlaps)), float((predicted & normal).sum() / normal.sum())


def ref_aupro_mvtec(masks, maps, fpr_limit=0.3):
    regions = ref_regions(masks)
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        pro, fpr = ref_pro_fpr(masks, maps >= t, regions)
        fprs.append(fpr)
        pros.append(pro)
    # trapezoid up to fpr_limit, closing with a linearly interpolated point at fpr_limit
    area = 0.0
    for k in range(1, len(fprs)):
        x0, x1, y0, y1 = fprs[k - 1], fprs[k], pros[k - 1], pros[k]
        if x1 <= fpr_limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            y_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            area += (fpr_limit - x0) * (y0 + y_limit) / 2
            break
    return area / fpr_limit


def ref_aupro_code(masks, maps, fpr_limit=0.3, n_thresholds=800):
    regions = ref_regions(masks)
    lowest, highest = maps.min(), maps.max()
    fprs, pros = [], []
    for th in np.arange(lowest, highest, (highest - lowest) / n_thresholds):
        pro, fpr = ref_pro_fpr(masks, maps > th, regions)
        if fpr < fpr_limit:
            fprs.append(fpr)
            pros.append(pro)
    fprs = np.array(fprs)
    fprs = (fprs - fprs.min()) / (fprs.max() - fprs.min())
    return auc(fprs, pros)


def ref_miou(masks, maps, threshold, eps=np.finfo(float).eps):
    ious = []
    for mask, amap in zip(masks, maps):
        predicted = amap > threshold
        ious.append(((predicted & mask).sum() + eps) / ((predicted | mask).sum() + eps))
    return float(np.mean(ious))


def ref_best_miou(masks, maps, thresholds):
    best, best_t = -1.0, None
    for t in thresholds:
        value = ref_miou(masks, maps, t)
        if value > best:
            best, best_t = value, t
    return best, best_t


def ref_fair_threshold(train_maps, false_positives_per_image=1.0):
    n, h, w = train_maps.shape
    target_fpr = false_positives_per_image / (h * w)
    values = np.unique(train_maps)[::-1]
    fprs = [float((train_maps >= v).mean()) for v in values]
    for k, fpr in enumerate(fprs):
        if fpr > target_fpr:
            if k == 0:
                return float(values[0])
            slope = (values[k] - values[k - 1]) / (fpr - fprs[k - 1])
            return float(values[k - 1] + slope * (target_fpr - fprs[k - 1]))
    return float(values[-1])


# ----------------------------------------------------------------------------------------------
# Equality with the references


@pytest.mark.parametrize("seed,levels", CASES)
def test_aupro_mvtec_matches_reference(seed, levels):
    masks, maps = random_case(seed, levels=levels)
    for limit in (0.3, 0.05, 1.0):
        expected = ref_aupro_mvtec(masks, maps, limit)
        assert aupro(masks, maps, limit, "mvtec") == pytest.approx(expected, abs=TOL)


@pytest.mark.parametrize("seed,levels", CASES)
def test_aupro_code_matches_reference(seed, levels):
    masks, maps = random_case(seed, levels=levels)
    for n_thresholds in (800, 97):
        expected = ref_aupro_code(masks, maps, 0.3, n_thresholds)
        assert aupro(masks, maps, 0.3, "code", n_thresholds) == pytest.approx(expected, abs=TOL)


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_aupro_code_thresholds_on_score_values(seed):
    """Integer scores and step 1: thresholds equal score values, so "score > t" must be strict."""
    masks, maps = random_case(seed)
    maps = np.round(maps * 2)
    n_thresholds = int(maps.max() - maps.min())
    expected = ref_aupro_code(masks, maps, 0.3, n_thresholds)
    assert aupro(masks, maps, 0.3, "code", n_thresholds) == pytest.approx(expected, abs=TOL)


def test_aupro_float32_maps_match_reference():
    masks, maps = random_case(7)
    maps = maps.astype(np.float32)
    assert aupro(masks, maps) == pytest.approx(ref_aupro_mvtec(masks, maps), abs=TOL)
    assert aupro(masks, maps, convention="code") == pytest.approx(ref_aupro_code(masks, maps), abs=TOL)


@pytest.mark.parametrize("seed,levels", CASES)
def test_pixel_auroc_matches_sklearn(seed, levels):
    masks, maps = random_case(seed, levels=levels)
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=TOL)


def test_image_auroc_matches_sklearn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 40)
    scores = np.round(rng.normal(size=40) + labels, 1)
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=TOL)


@pytest.mark.parametrize("seed,levels", CASES)
def test_miou_matches_reference(seed, levels):
    masks, maps = random_case(seed, levels=levels)
    for t in (-1.0, 0.5, 1.0, float(np.median(maps)), 10.0):
        assert miou(masks, maps, t) == pytest.approx(ref_miou(masks, maps, t), abs=TOL)
        assert miou_curve(masks, maps, [t])[0] == pytest.approx(ref_miou(masks, maps, t), abs=TOL)


@pytest.mark.parametrize("seed,levels", CASES)
def test_best_miou_matches_reference(seed, levels):
    masks, maps = random_case(seed, levels=levels)
    thresholds = np.linspace(maps.min(), maps.max(), 60)
    value, threshold = best_miou(masks, maps, thresholds)
    expected_value, expected_threshold = ref_best_miou(masks, maps, thresholds)
    assert value == pytest.approx(expected_value, abs=TOL)
    assert threshold == expected_threshold
    # default candidates: 1000 equally spaced from min to max
    assert best_miou(masks, maps) == best_miou(masks, maps, np.linspace(maps.min(), maps.max(), 1000))


@pytest.mark.parametrize("seed,levels", CASES)
def test_fair_threshold_matches_reference(seed, levels):
    _, train_maps = random_case(seed + 100, n_images=6, levels=levels)
    for per_image in (1.0, 2.5, 0.1):
        expected = ref_fair_threshold(train_maps, per_image)
        assert fair_threshold(train_maps, per_image) == pytest.approx(expected, abs=TOL)


# ----------------------------------------------------------------------------------------------
# Hand-made cases with known answers


def separable_case():
    """Normal scores in [0, 0.4], defect scores in [0.6, 1]; two defect images, one good."""
    rng = np.random.default_rng(3)
    masks = np.zeros((3, 12, 12), dtype=bool)
    masks[0, 2:5, 2:6] = True
    masks[1, 7:11, 6:8] = True
    maps = np.where(masks, rng.uniform(0.6, 1.0, masks.shape), rng.uniform(0.0, 0.4, masks.shape))
    return masks, maps


def test_perfect_map_scores_one():
    masks, maps = separable_case()
    assert aupro(masks, maps, convention="mvtec") == pytest.approx(1.0, abs=TOL)
    assert aupro(masks, maps, convention="code") == pytest.approx(1.0, abs=TOL)
    assert pixel_auroc(masks, maps) == pytest.approx(1.0, abs=TOL)
    assert best_miou(masks, maps, [0.5])[0] == pytest.approx(1.0, abs=TOL)


def test_inverted_map_scores_zero():
    masks, maps = separable_case()
    assert aupro(masks, -maps, convention="mvtec") == pytest.approx(0.0, abs=TOL)
    assert pixel_auroc(masks, -maps) == pytest.approx(0.0, abs=TOL)


def test_map_ignoring_one_of_two_regions():
    """A small region found and a large one missed: PRO averages regions, not pixels, so 0.5."""
    masks, maps = separable_case()
    masks[1] = False
    masks[1, 3:11, 2:11] = True  # much larger region
    maps[1][masks[1]] = -1.0  # below every normal pixel: never detected at FPR < 1
    assert aupro(masks, maps, convention="mvtec") == pytest.approx(0.5, abs=TOL)
    assert aupro(masks, maps, convention="code") == pytest.approx(0.5, abs=TOL)


def test_regions_use_full_connectivity():
    """Diagonal neighbours form one region: regions {2 px, half found} and {4 px, found} -> 0.75.

    With 4-connectivity the diagonal pair would be two regions (1 and 0) and PRO would be 2/3.
    """
    rng = np.random.default_rng(0)
    masks = np.zeros((1, 10, 10), dtype=bool)
    maps = rng.uniform(0.0, 0.4, masks.shape)
    masks[0, 2, 2] = masks[0, 3, 3] = True
    masks[0, 6:8, 6:8] = True
    maps[0, 2, 2], maps[0, 3, 3] = 1.0, -1.0
    maps[0, 6:8, 6:8] = 1.0
    assert aupro(masks, maps, convention="mvtec") == pytest.approx(0.75, abs=TOL)
    assert aupro(masks, maps, convention="code") == pytest.approx(0.75, abs=TOL)


def test_constant_map():
    masks, _ = separable_case()
    maps = np.zeros(masks.shape)
    # one threshold takes every pixel: the curve is the diagonal (0, 0) -> (1, 1)
    assert aupro(masks, maps, convention="mvtec") == pytest.approx(0.15, abs=TOL)
    assert pixel_auroc(masks, maps) == pytest.approx(0.5, abs=TOL)
    with pytest.warns(RuntimeWarning, match="undefined"):
        assert np.isnan(aupro(masks, maps, convention="code"))


def test_miou_float32_maps_compare_thresholds_exactly():
    masks, maps = random_case(5)
    maps = maps.astype(np.float32)
    threshold = float(np.float32(0.1))  # a float32 score equal to float32(0.1) is > 0.1 in float64
    maps[0] = -5.0  # image 0 is good: its IoU is 1 or ~0 depending on this one pixel
    maps[0, 0, 0] = threshold
    for t in (0.1, threshold):
        expected = ref_miou(masks, maps.astype(np.float64), t)
        assert miou(masks, maps, t) == pytest.approx(expected, abs=TOL)
        assert miou_curve(masks, maps, [t])[0] == pytest.approx(miou(masks, maps, t), abs=TOL)
    assert miou(masks, maps, 0.1) < miou(masks, maps, threshold) - 0.1


def test_miou_good_images_and_perfect_detection():
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[1, 1:3, 1:3] = True
    maps = masks.astype(float)
    assert miou(masks, maps, 0.5) == pytest.approx(1.0, abs=TOL)  # good image without detection = 1
    maps[0, 0, 0] = 1.0  # one false positive on the good image -> its IoU is ~0
    assert miou(masks, maps, 0.5) == pytest.approx(0.5, abs=TOL)
    assert miou(masks, np.zeros((2, 4, 4)), 0.5) == pytest.approx(0.5, abs=TOL)  # defect missed


def test_fair_threshold_hand_made():
    train = np.zeros((2, 4, 4))
    train[0, 0, 0] = 0.9
    train[1, 0, 0], train[1, 0, 1] = 0.8, 0.7
    assert fair_threshold(train) == pytest.approx(0.8)  # exactly 2 pixels (1 per image) >= 0.8
    assert fair_threshold(train, 1.5) == pytest.approx(0.7)
    assert fair_threshold(train, 0.75) == pytest.approx(0.85)
    assert fair_threshold(train, 0.1) == pytest.approx(0.9)  # below the top score's share


def test_pro_curve_shapes():
    masks, maps = random_case(1)
    fpr, pro = pro_curve(masks, maps, 0.3, "mvtec")
    assert fpr[0] == 0.0 and pro[0] == 0.0 and fpr[-1] == pytest.approx(0.3)
    assert np.all(np.diff(fpr) >= 0) and np.all((pro >= 0) & (pro <= 1))
    fpr, pro = pro_curve(masks, maps, 0.3, "code")
    assert np.all(fpr < 0.3) and np.all(np.diff(fpr) >= 0)


def test_torch_and_channel_inputs():
    torch = pytest.importorskip("torch")
    masks, maps = random_case(2)
    expected = aupro(masks, maps)
    masks_t = torch.from_numpy(masks.astype(np.float32))[:, None]  # [N, 1, H, W] float mask
    assert aupro(masks_t, torch.from_numpy(maps)[:, None]) == pytest.approx(expected, abs=TOL)
    as_lists = pixel_auroc(list(masks_t), list(torch.from_numpy(maps)))
    assert as_lists == pytest.approx(pixel_auroc(masks, maps), abs=TOL)


# ----------------------------------------------------------------------------------------------
# Errors


def test_shape_mismatch_names_shapes():
    masks, maps = random_case(0)
    for metric in (pixel_auroc, aupro):
        with pytest.raises(ValueError, match=r"\(5, 16, 16\).*\(5, 8, 8\)"):
            metric(masks, maps[:, :8, :8])
    with pytest.raises(ValueError, match="shape"):
        miou(masks, maps[:, :8, :8], 0.0)
    with pytest.raises(ValueError, match="one entry per image"):
        image_auroc([0, 1, 1], [0.1, 0.2])


def test_single_class_is_an_error():
    maps = np.random.default_rng(0).normal(size=(3, 8, 8))
    with pytest.raises(ValueError, match="no anomalous pixel"):
        pixel_auroc(np.zeros(maps.shape, bool), maps)
    with pytest.raises(ValueError, match="no normal pixel"):
        pixel_auroc(np.ones(maps.shape, bool), maps)
    with pytest.raises(ValueError, match="anomalous region"):
        aupro(np.zeros(maps.shape, bool), maps)
    with pytest.raises(ValueError, match="no anomalous image"):
        image_auroc([0, 0, 0], [0.1, 0.2, 0.3])


def test_bad_options_and_nan():
    masks, maps = random_case(0)
    with pytest.raises(ValueError, match="convention"):
        aupro(masks, maps, convention="official")
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(masks, maps, fpr_limit=0.0)
    maps[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        pixel_auroc(masks, maps)


# ----------------------------------------------------------------------------------------------
# CFlow-AD's own PRO convention


def ref_aupro_cflow(masks, maps, fpr_limit=0.3, n_thresholds=1000):
    """CFlow-AD's evaluation as its code runs it: thresholds stepping down from the maximum,
    overlap on each region's hole-filled bounding-box image, divided by the region's area."""
    highest, lowest = maps.max(), maps.min()
    delta = (highest - lowest) / n_thresholds
    fprs, pros = [], []
    for step in range(n_thresholds):
        predicted = maps > highest - step * delta
        overlaps = []
        for mask, pred in zip(masks, predicted):
            for region in regionprops(label(mask.astype(np.uint8), connectivity=2)):
                top, left, bottom, right = region.bbox
                hit = np.logical_and(pred[top:bottom, left:right], region.image_filled).sum()
                overlaps.append(hit / region.area)
        pros.append(np.mean(overlaps))
        fprs.append(np.logical_and(~masks, predicted).sum() / (~masks).sum())
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs <= fpr_limit
    kept = fprs[keep]
    return auc((kept - kept.min()) / (kept.max() - kept.min()), pros[keep])


def ring_case(seed: int):
    """Masks with holes (rings), where the hole-filled overlap differs from the region's."""
    masks, maps = random_case(seed)
    masks[1] = False
    masks[1, 3:10, 3:10] = True
    masks[1, 5:8, 5:8] = False  # a 3x3 hole
    maps[1, 5:8, 5:8] += 3.0  # the hole scores high, as a detector that fills it would
    return masks, maps


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_aupro_cflow_matches_reference(seed):
    masks, maps = ring_case(seed)
    maps = maps.astype(np.float32)
    for n_thresholds in (1000, 61):
        expected = ref_aupro_cflow(masks, maps, 0.3, n_thresholds)
        assert aupro(masks, maps, 0.3, "cflow", n_thresholds) == pytest.approx(expected, abs=TOL)


def test_aupro_cflow_counts_holes_but_divides_by_the_region():
    masks = np.zeros((2, 12, 12), dtype=bool)
    masks[0, 2:9, 2:9] = True
    masks[0, 4:7, 4:7] = False  # 49 - 9 = 40 region pixels around a 9-pixel hole
    maps = np.zeros((2, 12, 12), dtype=np.float32)
    maps[0, 2:9, 2:9] = 1.0  # region and hole detected, nothing else
    fpr, pro = pro_curve(masks, maps, convention="cflow", n_thresholds=10)
    assert pro.max() == pytest.approx(49 / 40)  # above 1: the hole counts, the divisor does not
    _, pro_code = pro_curve(masks, maps, convention="code", n_thresholds=10)
    assert pro_code.max() == pytest.approx(1.0)
