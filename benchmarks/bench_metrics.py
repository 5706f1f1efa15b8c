"""Time the pixel metrics on a class-sized test set and compare AU-PRO with a per-threshold loop.

    python benchmarks/bench_metrics.py [--images 150] [--size 512] [--memory]

The test set imitates one MVTec AD class at MSFlow's resolution: 150 anomaly maps of 512 x 512
(float32), with defect blobs on every third image. The reference is AU-PRO computed the way the
MSFlow and CFlow-AD evaluation code does it: for each of 800 thresholds, binarise all maps, label
every mask and measure each region with regionprops. It runs on a subset (default 10 images x 50
thresholds) and its time is extrapolated linearly to 150 images x 800 thresholds. (The official
code spreads the thresholds over an 8-process pool; both timings here are single-process.)
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from collections.abc import Callable

import numpy as np
from scipy.ndimage import gaussian_filter, zoom
from skimage.measure import label, regionprops
from sklearn.metrics import roc_auc_score

from harness.metrics import aupro, best_miou, fair_threshold, pixel_auroc


def synthetic_test_set(n_images: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Masks with 1-3 elliptic defects on every third image, smooth float32 maps peaking on them."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    masks = np.zeros((n_images, size, size), dtype=bool)
    maps = np.empty((n_images, size, size), dtype=np.float32)
    for i in range(n_images):
        if i % 3 == 0:
            for _ in range(rng.integers(1, 4)):
                cy, cx = rng.uniform(0, size, 2)
                ry, rx = rng.uniform(0.01, 0.12, 2) * size
                angle = rng.uniform(0, np.pi)
                dy, dx = yy - cy, xx - cx
                u = dy * np.cos(angle) + dx * np.sin(angle)
                v = -dy * np.sin(angle) + dx * np.cos(angle)
                masks[i] |= (u / ry) ** 2 + (v / rx) ** 2 <= 1.0
        background = zoom(rng.normal(size=(size // 32, size // 32)), 32, order=1)
        bump = gaussian_filter(masks[i].astype(np.float32), sigma=size / 64) * rng.uniform(0.5, 2.0)
        maps[i] = 0.3 * background + 0.05 * rng.normal(size=(size, size)) + bump
    return masks, maps


def reference_aupro_code(
    masks: np.ndarray, maps: np.ndarray, thresholds: np.ndarray
) -> tuple[list, list]:
    """(fpr, pro) per threshold: one binarisation and one regionprops pass per image and threshold."""
    fprs, pros = [], []
    normal = ~masks
    for th in thresholds:
        binary = maps > th
        overlaps = []
        for predicted, mask in zip(binary, masks):
            for region in regionprops(label(mask)):
                rows, cols = region.coords[:, 0], region.coords[:, 1]
                overlaps.append(predicted[rows, cols].sum() / region.area)
        fprs.append(np.logical_and(normal, binary).sum() / normal.sum())
        pros.append(np.mean(overlaps) if overlaps else np.nan)
    return fprs, pros


def timed(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    """Best wall time over repeat runs, and the result."""
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def peak_memory_mb(fn: Callable[[], object]) -> float:
    """Peak memory allocated while fn runs (numpy reports its buffers to tracemalloc)."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=150, help="test images (default 150)")
    parser.add_argument("--size", type=int, default=512, help="map height and width (default 512)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=1, help="runs per metric, best time kept")
    parser.add_argument("--ref-images", type=int, default=10, help="images in the reference subset")
    parser.add_argument(
        "--ref-thresholds", type=int, default=50, help="thresholds in the reference subset"
    )
    parser.add_argument("--memory", action="store_true", help="also report peak working memory")
    args = parser.parse_args()

    start = time.perf_counter()
    masks, maps = synthetic_test_set(args.images, args.size, args.seed)
    print(
        f"test set: {args.images} maps of {args.size}x{args.size} float32 "
        f"({maps.nbytes / 2**20:.0f} MiB), "
        f"{int(masks.any(axis=(1, 2)).sum())} with defects, {masks.mean():.2%} defect pixels "
        f"(built in {time.perf_counter() - start:.1f} s)\n"
    )

    metrics: list[tuple[str, Callable[[], object]]] = [
        ("aupro mvtec (fpr 0.3)", lambda: aupro(masks, maps, 0.3, "mvtec")),
        ("aupro code (800 thresholds)", lambda: aupro(masks, maps, 0.3, "code", 800)),
        ("pixel_auroc", lambda: pixel_auroc(masks, maps)),
        ("best_miou (1000 thresholds)", lambda: best_miou(masks, maps)[0]),
        ("fair_threshold (the good maps)", lambda: fair_threshold(maps[~masks.any(axis=(1, 2))])),
    ]
    rows = []
    for name, fn in metrics:
        seconds, value = timed(fn, args.repeat)
        memory = f"{peak_memory_mb(fn):8.0f}" if args.memory else ""
        rows.append((name, seconds, float(value), memory))

    # Reference AU-PRO loop on a subset with a realistic share of defect images, extrapolated.
    subset = slice(0, args.ref_images)
    lowest, highest = float(maps.min()), float(maps.max())
    all_thresholds = np.arange(lowest, highest, (highest - lowest) / 800)
    step = max(1, all_thresholds.size // args.ref_thresholds)
    some_thresholds = all_thresholds[::step][: args.ref_thresholds]
    ref_seconds, _ = timed(
        lambda: reference_aupro_code(masks[subset], maps[subset], some_thresholds), 1
    )
    scale = (args.images / args.ref_images) * (all_thresholds.size / some_thresholds.size)
    ref_full = ref_seconds * scale

    # sklearn's roc_auc_score on a subset, extrapolated linearly (an underestimate: it sorts)
    sk_seconds, _ = timed(lambda: roc_auc_score(masks[subset].ravel(), maps[subset].ravel()), 1)
    sk_full = sk_seconds * args.images / args.ref_images

    header = f"{'metric':34s} {'seconds':>9s} {'value':>8s}"
    header += f" {'peak MiB':>8s}" if args.memory else ""
    print(header)
    print("-" * len(header))
    for name, seconds, value, memory in rows:
        print(f"{name:34s} {seconds:9.2f} {value:8.4f}" + (f" {memory}" if args.memory else ""))
    print()
    print(
        f"reference AU-PRO loop (regionprops per image per threshold): {ref_seconds:.2f} s for "
        f"{args.ref_images} images x {some_thresholds.size} thresholds -> extrapolated to "
        f"{args.images} x {all_thresholds.size}: {ref_full:.0f} s"
    )
    ours_code = rows[1][1]
    print(f"speed-up of aupro(convention='code') over the reference: {ref_full / ours_code:.0f}x")
    print(
        f"sklearn roc_auc_score: {sk_seconds:.2f} s for {args.ref_images} images -> extrapolated to "
        f"{args.images}: {sk_full:.0f} s (pixel_auroc: {rows[2][1]:.2f} s)"
    )


if __name__ == "__main__":
    main()
