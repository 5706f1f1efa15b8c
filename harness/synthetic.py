"""The embedded dataset: a small anomaly-detection set drawn procedurally, in the MVTec AD layout.

It lets every command run, and every test pass, without downloading anything. Two texture classes
and two object classes, each with three drawn defect types:

    weave    oriented woven threads            hole, scratch, stain
    granite  smooth multi-scale stone noise    crack, scratch, stain
    washer   a shaded metal ring, centred      crack, missing (a bite out of the ring), stain
    chip     a dark package with eight pads    missing_pad, scratch, stain

Normal images vary (pattern phase and orientation, object position and rotation, lighting,
brightness, sensor noise), so anomalies cannot be found by a pixel difference with a template.
Defects vary in size, shape and position. A sample is drawn once as a scene, then twice through
the same sensor (gain, offset, noise): without and with the defect. The mask is, by
construction, exactly the set of pixels where the two differ.

Generation is deterministic: one numpy generator per image, seeded from (seed, class, split,
defect, index); PNGs are written with fixed settings and no metadata, so the same seed gives the
same bytes (with the same numpy and zlib) and another seed gives other images.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from filelock import FileLock

from harness.errors import ConfigError, DatasetError
from harness.manifest import damage, write_file_list

GENERATOR_VERSION = 1
MANIFEST_NAME = "embedded.json"

EMBEDDED_CLASSES = ["chip", "granite", "washer", "weave"]
TEXTURE_CLASSES = ("granite", "weave")
OBJECT_CLASSES = ("chip", "washer")
DEFECT_TYPES: dict[str, tuple[str, ...]] = {
    "chip": ("missing_pad", "scratch", "stain"),
    "granite": ("crack", "scratch", "stain"),
    "washer": ("crack", "missing", "stain"),
    "weave": ("hole", "scratch", "stain"),
}

# Stain colours per class, chosen to stand out from that class's normal palette.
STAIN_COLOURS: dict[str, tuple[tuple[float, float, float], ...]] = {
    "chip": ((215, 205, 140), (220, 220, 215), (230, 140, 50)),
    "granite": ((170, 80, 30), (50, 80, 165), (45, 38, 30)),
    "washer": ((150, 70, 25), (50, 40, 30), (60, 90, 170)),
    "weave": ((80, 45, 25), (45, 65, 150), (165, 35, 40)),
}

_SPLIT_CODES = {"train": 0, "test_good": 1, "test_defect": 2}


@dataclass(frozen=True)
class Scene:
    """A defect-free image before the sensor: colours, where the object is, what is behind it."""

    colour: np.ndarray  # float64 [S, S, 3], 0..255
    object_mask: np.ndarray  # bool [S, S]; all True for textures
    background: np.ndarray  # float64 [S, S, 3]: what shows where a part is missing
    parts: tuple[np.ndarray, ...] = ()  # removable parts (the chip's pads), bool [S, S] each


@dataclass(frozen=True)
class SyntheticSample:
    image: np.ndarray  # uint8 [S, S, 3]: what is written to disk
    clean: np.ndarray  # uint8 [S, S, 3]: the same image without the defect
    mask: np.ndarray  # bool [S, S]: exactly the pixels where image != clean (empty if no defect)


# ---------------------------------------------------------------------------------------------
# Small drawing helpers


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x)."""
    coords = np.arange(size, dtype=np.float64) + 0.5
    return np.meshgrid(coords, coords, indexing="ij")


@functools.lru_cache(maxsize=32)
def _gaussian_spectrum(size: int, sigma: float) -> np.ndarray:
    """Fourier transform of a Gaussian of std `sigma` pixels, on the rfft2 grid."""
    freq_y, freq_x = np.fft.fftfreq(size), np.fft.rfftfreq(size)
    return np.exp(-2.0 * (math.pi * sigma) ** 2 * (freq_y[:, None] ** 2 + freq_x[None, :] ** 2))


def smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise (periodic, via FFT), zero mean and unit variance."""
    white = rng.standard_normal((size, size))
    field = np.fft.irfft2(np.fft.rfft2(white) * _gaussian_spectrum(size, sigma), s=(size, size))
    return (field - field.mean()) / (field.std() + 1e-12)


def _draw(size: int, paint: Callable[[ImageDraw.ImageDraw], None]) -> np.ndarray:
    """Rasterise shapes (no anti-aliasing) into a bool mask."""
    canvas = Image.new("L", (size, size), 0)
    paint(ImageDraw.Draw(canvas))
    return np.asarray(canvas) > 0


def _rotated_rectangle(
    centre: tuple[float, float],
    offset: tuple[float, float],
    half: tuple[float, float],
    angle: float,
) -> list[tuple[float, float]]:
    """Corners (x, y) of a rectangle at `offset` from `centre` in a frame rotated by `angle`."""
    cos, sin = math.cos(angle), math.sin(angle)
    corners = []
    for dx, dy in ((-1, -1), (1, -1), (1, 1), (-1, 1)):
        x, y = offset[0] + dx * half[0], offset[1] + dy * half[1]
        corners.append((centre[0] + x * cos - y * sin, centre[1] + x * sin + y * cos))
    return corners


def _tinted(luminance: np.ndarray, tint: Sequence[float]) -> np.ndarray:
    return luminance[..., None] * np.asarray(tint, dtype=np.float64)[None, None, :]


def _random_point(rng: np.random.Generator, region: np.ndarray, margin: int) -> tuple[float, float]:
    """A random pixel centre (x, y) inside `region`, away from the image border."""
    inner = np.zeros_like(region)
    inner[margin:-margin, margin:-margin] = region[margin:-margin, margin:-margin]
    ys, xs = np.nonzero(inner if inner.any() else region)
    k = int(rng.integers(len(ys)))
    return float(xs[k]) + 0.5, float(ys[k]) + 0.5


# ---------------------------------------------------------------------------------------------
# Normal scenes


def _weave(rng: np.random.Generator, size: int) -> Scene:
    y, x = _grid(size)
    angle = rng.normal(0.0, 0.05)  # about 3 degrees of orientation jitter
    period = size / rng.uniform(9.5, 11.0)
    u = (math.cos(angle) * x + math.sin(angle) * y) / period + rng.uniform(0, 1)
    v = (-math.sin(angle) * x + math.cos(angle) * y) / period + rng.uniform(0, 1)
    warp_on_top = (np.floor(u) + np.floor(v)) % 2 == 0  # basket weave: threads alternate
    warp = np.sin(math.pi * (u % 1.0)) ** 0.6  # rounded thread profile across the thread
    weft = np.sin(math.pi * (v % 1.0)) ** 0.6
    pattern = np.where(warp_on_top, 0.35 + 0.65 * weft * (0.8 + 0.2 * warp), 0.35 + 0.65 * warp)
    shading = 1.0 + 0.05 * smooth_noise(rng, size, size / 6)
    tint = np.array([1.0, 0.86, 0.63]) * rng.uniform(0.97, 1.03, size=3)
    luminance = 175.0 * (0.55 + 0.55 * pattern) * shading
    colour = _tinted(luminance, tint)
    background = _tinted(np.full((size, size), 38.0), (1.0, 0.9, 0.8))
    return Scene(colour, np.ones((size, size), bool), background)


def _granite(rng: np.random.Generator, size: int) -> Scene:
    luminance = (
        128.0
        + 20.0 * smooth_noise(rng, size, size / 16)
        + 14.0 * smooth_noise(rng, size, size / 48)
        + 8.0 * smooth_noise(rng, size, 0.7)
    )
    tint = np.array([1.0, 0.97, 0.94]) * rng.uniform(0.97, 1.03, size=3)
    background = _tinted(np.full((size, size), 30.0), (1.0, 1.0, 1.0))
    return Scene(_tinted(luminance, tint), np.ones((size, size), bool), background)


def _washer(rng: np.random.Generator, size: int) -> Scene:
    y, x = _grid(size)
    cx, cy = size / 2 + np.clip(rng.normal(0, 0.02 * size, size=2), -0.04 * size, 0.04 * size)
    outer = 0.36 * size * rng.uniform(0.97, 1.03)
    inner = 0.15 * size * rng.uniform(0.95, 1.05)
    distance = np.hypot(x - cx, y - cy)
    ring = (distance <= outer) & (distance >= inner)
    light = rng.uniform(0, 2 * math.pi)  # lighting direction varies from image to image
    radial = (distance - inner) / (outer - inner)
    luminance = (
        160.0
        + 35.0 * np.cos(np.arctan2(y - cy, x - cx) - light) * (radial - 0.5)
        + 8.0 * np.sin(2 * math.pi * distance / (size / 28))  # concentric machining marks
    )
    metal = _tinted(luminance, (1.0, 1.0, 1.04))
    background = _tinted(50.0 + 4.0 * smooth_noise(rng, size, size / 8), (0.9, 1.0, 1.2))
    colour = np.where(ring[..., None], metal, background)
    return Scene(colour, ring, background)


def _chip(rng: np.random.Generator, size: int) -> Scene:
    jitter = np.clip(rng.normal(0, 0.02 * size, size=2), -0.04 * size, 0.04 * size)
    centre = (size / 2 + jitter[0], size / 2 + jitter[1])
    angle = float(np.clip(rng.normal(0, 0.04), -0.08, 0.08))  # a few degrees of rotation
    half_body = (0.25 * size * rng.uniform(0.97, 1.03), 0.15 * size * rng.uniform(0.97, 1.03))
    body_corners = _rotated_rectangle(centre, (0, 0), half_body, angle)
    body = _draw(size, lambda d: d.polygon(body_corners, fill=1))
    pads = []
    pad_half = (0.03 * size, 0.045 * size)
    for side in (-1, 1):  # four pads along each long side
        for k in range(4):
            dx = (k - 1.5) * 0.12 * size
            dy = side * (half_body[1] + pad_half[1])
            corners = _rotated_rectangle(centre, (dx, dy), pad_half, angle)
            pads.append(_draw(size, lambda d, c=corners: d.polygon(c, fill=1)) & ~body)
    # pin-1 marker: a small light dot near one corner of the body
    marker_xy = _rotated_rectangle(
        centre, (-0.17 * size, -0.07 * size), (0.02 * size, 0.02 * size), angle
    )
    marker = _draw(size, lambda d: d.ellipse(_bbox(marker_xy), fill=1)) & body

    background = _tinted(72.0 + 5.0 * smooth_noise(rng, size, size / 10), (0.55, 1.25, 0.7))
    colour = background.copy()
    colour[body] = _tinted(38.0 + 3.0 * smooth_noise(rng, size, 2.0), (1.0, 1.0, 1.1))[body]
    colour[marker] = (120.0, 120.0, 125.0)
    all_pads = np.logical_or.reduce(pads)
    pad_shine = 195.0 + 15.0 * smooth_noise(rng, size, size / 20)
    colour[all_pads] = _tinted(pad_shine, (1.0, 1.0, 0.93))[all_pads]
    return Scene(colour, body | all_pads, background, tuple(pads))


def _bbox(points: Sequence[tuple[float, float]]) -> tuple[float, float, float, float]:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return min(xs), min(ys), max(xs), max(ys)


SCENES: dict[str, Callable[[np.random.Generator, int], Scene]] = {
    "chip": _chip,
    "granite": _granite,
    "washer": _washer,
    "weave": _weave,
}


# ---------------------------------------------------------------------------------------------
# Defects: each returns (region, colours); the region is drawn from the same geometry as the
# colours, and the composite replaces the scene's colours inside the region only.


def _line_width(rng: np.random.Generator, size: int, low: float, high: float) -> int:
    return max(1, int(round(rng.uniform(low, high) * size / 128)))


def _scratch(rng: np.random.Generator, scene: Scene, size: int, class_name: str):
    x0, y0 = _random_point(rng, scene.object_mask, size // 8)
    length = rng.uniform(0.15, 0.4) * size
    direction = rng.uniform(0, math.pi)
    end = (x0 + length * math.cos(direction), y0 + length * math.sin(direction))
    width = _line_width(rng, size, 1.0, 3.5)
    region = _draw(size, lambda d: d.line([(x0, y0), end], fill=1, width=width)) & scene.object_mask
    shade = rng.uniform(225, 245)
    return region, np.broadcast_to(np.array([shade, shade, shade * 0.97]), scene.colour.shape)


def _crack(rng: np.random.Generator, scene: Scene, size: int, class_name: str):
    x, y = _random_point(rng, scene.object_mask, size // 8)
    heading = rng.uniform(0, 2 * math.pi)
    points = [(x, y)]
    for _ in range(int(rng.integers(3, 7))):
        heading += rng.normal(0, 0.6)
        step = rng.uniform(0.04, 0.1) * size
        x, y = x + step * math.cos(heading), y + step * math.sin(heading)
        points.append((x, y))
    width = _line_width(rng, size, 1.0, 2.6)
    region = _draw(size, lambda d: d.line(points, fill=1, width=width, joint="curve"))
    region &= scene.object_mask
    return region, np.broadcast_to(np.array([18.0, 16.0, 14.0]), scene.colour.shape)


def _blob(
    rng: np.random.Generator, size: int, centre: tuple[float, float], radius: float
) -> np.ndarray:
    """An irregular blob: the union of a few jittered ellipses."""
    ellipses = []
    for _ in range(int(rng.integers(2, 5))):
        cx = centre[0] + rng.normal(0, 0.35 * radius)
        cy = centre[1] + rng.normal(0, 0.35 * radius)
        rx, ry = radius * rng.uniform(0.5, 1.0), radius * rng.uniform(0.5, 1.0)
        ellipses.append((cx - rx, cy - ry, cx + rx, cy + ry))
    return _draw(size, lambda d: [d.ellipse(box, fill=1) for box in ellipses])


def _stain(rng: np.random.Generator, scene: Scene, size: int, class_name: str):
    centre = _random_point(rng, scene.object_mask, size // 8)
    region = _blob(rng, size, centre, rng.uniform(0.035, 0.11) * size) & scene.object_mask
    palette = STAIN_COLOURS[class_name]
    colour = np.asarray(palette[int(rng.integers(len(palette)))], dtype=np.float64)
    opacity = rng.uniform(0.6, 0.9)  # some of the surface shows through
    return region, (1.0 - opacity) * scene.colour + opacity * colour


def _hole(rng: np.random.Generator, scene: Scene, size: int, class_name: str):
    centre = _random_point(rng, scene.object_mask, size // 8)
    radius = rng.uniform(0.05, 0.12) * size
    rx, ry = radius * rng.uniform(0.6, 1.0), radius * rng.uniform(0.6, 1.0)
    box = (centre[0] - rx, centre[1] - ry, centre[0] + rx, centre[1] + ry)
    return _draw(size, lambda d: d.ellipse(box, fill=1)), scene.background


def _missing(rng: np.random.Generator, scene: Scene, size: int, class_name: str):
    """A bite out of the object's edge: the background shows through."""
    edge = scene.object_mask & ~_eroded(scene.object_mask)
    centre = _random_point(rng, edge, 1)
    radius = rng.uniform(0.07, 0.15) * size
    box = (centre[0] - radius, centre[1] - radius, centre[0] + radius, centre[1] + radius)
    return _draw(size, lambda d: d.ellipse(box, fill=1)) & scene.object_mask, scene.background


def _missing_pad(rng: np.random.Generator, scene: Scene, size: int, class_name: str):
    count = 1 if rng.uniform() < 0.7 else 2
    chosen = rng.choice(len(scene.parts), size=count, replace=False)
    return np.logical_or.reduce([scene.parts[i] for i in chosen]), scene.background


def _eroded(mask: np.ndarray) -> np.ndarray:
    """4-neighbour binary erosion by one pixel (enough to find an object's edge)."""
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return inner


DEFECTS = {
    "crack": _crack,
    "hole": _hole,
    "missing": _missing,
    "missing_pad": _missing_pad,
    "scratch": _scratch,
    "stain": _stain,
}


# ---------------------------------------------------------------------------------------------
# One sample


def render_sample(
    class_name: str, defect: str | None, rng: np.random.Generator, image_size: int = 128
) -> SyntheticSample:
    """Draw one image of a class, defect-free (defect=None) or with the named defect type."""
    if class_name not in SCENES:
        raise ConfigError(f"unknown embedded class {class_name!r}; choose from {EMBEDDED_CLASSES}")
    if defect is not None and defect not in DEFECT_TYPES[class_name]:
        raise ConfigError(
            f"class {class_name!r} has no defect {defect!r}; choose from {DEFECT_TYPES[class_name]}"
        )
    scene = SCENES[class_name](rng, image_size)
    region = np.zeros((image_size, image_size), bool)
    defective = scene.colour
    if defect is not None:
        min_pixels = max(8, int(0.001 * image_size * image_size))
        for _ in range(100):  # redraw a defect that the object boundary cut down to nothing
            region, colours = DEFECTS[defect](rng, scene, image_size, class_name)
            if region.sum() >= min_pixels:
                break
        else:
            raise RuntimeError(f"could not place a {defect} defect on a {class_name} image")
        defective = np.where(region[..., None], colours, scene.colour)

    # The sensor: the same gain, offset and noise for the clean and the defective image.
    gain = rng.uniform(0.9, 1.1)
    offset = rng.uniform(-8.0, 8.0)
    noise = rng.normal(0.0, rng.uniform(2.0, 4.0), size=scene.colour.shape)

    def expose(colours: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(gain * colours + offset + noise), 0, 255).astype(np.uint8)

    clean, image = expose(scene.colour), expose(defective)
    # Where the defect happens to land on its own colour, push it away: the mask must be exactly
    # the changed pixels, so no defect pixel may be left unchanged.
    unchanged = region & np.all(image == clean, axis=-1)
    kept = clean[unchanged]
    image[unchanged] = np.where(kept < 128, kept + 40, kept - 40)
    return SyntheticSample(image=image, clean=clean, mask=region)


def sample_rng(
    seed: int, class_name: str, split: str, defect_index: int, index: int
) -> np.random.Generator:
    """An independent generator per image, so any one image can be redrawn on its own."""
    entropy = [seed, EMBEDDED_CLASSES.index(class_name), _SPLIT_CODES[split], defect_index, index]
    return np.random.default_rng(np.random.SeedSequence(entropy))


# ---------------------------------------------------------------------------------------------
# The whole dataset


def embedded_manifest(
    seed: int, image_size: int, n_train: int, n_test_good: int, n_test_per_defect: int,
    classes: Sequence[str],
) -> dict:
    """What embedded.json says: provenance, settings and the count of every folder."""
    return {
        "name": "embedded",
        "description": (
            "Procedurally generated images in the MVTec AD layout, drawn by "
            "harness.synthetic.generate_embedded; no real data. Regenerate with the same seed "
            "and generator version to get the same files."
        ),
        "generator": "harness.synthetic.generate_embedded",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "image_size": [image_size, image_size],
        "classes": {
            name: {
                "kind": "texture" if name in TEXTURE_CLASSES else "object",
                "train_good": n_train,
                "test_good": n_test_good,
                "test_defects": {defect: n_test_per_defect for defect in DEFECT_TYPES[name]},
            }
            for name in classes
        },
    }


def _save_png(array: np.ndarray, path: Path) -> None:
    # Fixed settings and no metadata chunks, so the bytes depend on the pixels only.
    Image.fromarray(array).save(path, format="PNG", compress_level=6, optimize=False)


def _write_class(
    folder: Path, class_name: str, seed: int, image_size: int, n_train: int, n_test_good: int,
    n_test_per_defect: int,
) -> None:
    train, test, truth = folder / "train" / "good", folder / "test", folder / "ground_truth"
    train.mkdir(parents=True)
    (test / "good").mkdir(parents=True)
    for i in range(n_train):
        rng = sample_rng(seed, class_name, "train", 0, i)
        sample = render_sample(class_name, None, rng, image_size)
        _save_png(sample.image, train / f"{i:03d}.png")
    for i in range(n_test_good):
        rng = sample_rng(seed, class_name, "test_good", 0, i)
        sample = render_sample(class_name, None, rng, image_size)
        _save_png(sample.image, test / "good" / f"{i:03d}.png")
    for d, defect in enumerate(DEFECT_TYPES[class_name]):
        (test / defect).mkdir()
        (truth / defect).mkdir(parents=True)
        for i in range(n_test_per_defect):
            rng = sample_rng(seed, class_name, "test_defect", d, i)
            sample = render_sample(class_name, defect, rng, image_size)
            _save_png(sample.image, test / defect / f"{i:03d}.png")
            mask = np.where(sample.mask, 255, 0).astype(np.uint8)
            _save_png(mask, truth / defect / f"{i:03d}_mask.png")


def read_manifest(root: str | os.PathLike) -> dict | None:
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def generate_embedded(
    root: str | os.PathLike,
    seed: int = 0,
    image_size: int = 128,
    n_train: int = 40,
    n_test_good: int = 10,
    n_test_per_defect: int = 5,
    classes: Sequence[str] | None = None,
    force: bool = False,
) -> Path:
    """Write the embedded dataset to `root` (MVTec layout plus embedded.json) and return `root`.

    Defaults: 4 classes x (40 train + 10 good test + 3 defect types x 5) = 260 images and 60
    masks at 128x128, a few seconds on one core. If `root` already holds a dataset generated
    with the same settings and generator version it is kept as is (unless `force`). The folder is
    written next to `root` first and renamed into place, so an interrupted run leaves nothing
    half-written; a folder not made by this function is never overwritten.
    """
    classes = list(EMBEDDED_CLASSES if classes is None else classes)
    unknown = [name for name in classes if name not in EMBEDDED_CLASSES]
    if unknown:
        raise ConfigError(f"unknown embedded classes {unknown}; choose from {EMBEDDED_CLASSES}")
    if image_size < 32:
        raise ConfigError(f"image_size must be at least 32 for the embedded set, got {image_size}")
    if min(n_train, n_test_good, n_test_per_defect) < 1:
        raise ConfigError("n_train, n_test_good and n_test_per_defect must each be at least 1")

    root = Path(root)
    manifest = embedded_manifest(seed, image_size, n_train, n_test_good, n_test_per_defect, classes)
    root.parent.mkdir(parents=True, exist_ok=True)
    # Two processes generating the same folder (two demos started at once) take turns.
    with FileLock(root.parent / f".{root.name}.lock"):
        _remove_dead_leftovers(root)
        if root.exists():
            existing = read_manifest(root)
            if existing == manifest and not force:
                problems = damage(root)
                if not problems:
                    return root
                # Made by this function and deterministic: generating it again is the repair.
                print(f"{root} is damaged ({len(problems)} problem(s), e.g. {problems[0]}); "
                      f"generating it again", file=sys.stderr, flush=True)
            elif existing is None and any(root.iterdir()):
                raise DatasetError(
                    f"{root} exists and was not made by generate_embedded (no {MANIFEST_NAME} in it): "
                    "choose an empty or new folder for the embedded dataset, or delete this one."
                )
        staging = root.parent / f".{root.name}.tmp-{os.getpid()}"
        retired = root.parent / f".{root.name}.old-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            for name in classes:
                _write_class(
                    staging / name, name, seed, image_size, n_train, n_test_good, n_test_per_defect
                )
            (staging / MANIFEST_NAME).write_text(
                json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8"
            )
            write_file_list(staging)
            if root.exists():
                root.rename(retired)
            staging.rename(root)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            if retired.exists() and not root.exists():
                retired.rename(root)
            raise
        shutil.rmtree(retired, ignore_errors=True)
    return root


def _remove_dead_leftovers(root: Path) -> None:
    """Delete the staging folders (``.<name>.tmp-<pid>``, ``.old-<pid>``) of processes that died."""
    for leftover in root.parent.glob(f".{root.name}.*-*"):
        kind, _, pid = leftover.name[len(root.name) + 2:].partition("-")
        if kind not in ("tmp", "old") or not pid.isdigit() or _alive(int(pid)):
            continue
        if kind == "old" and not root.exists():
            leftover.rename(root)  # killed between the two renames: the old copy is the install
        else:
            shutil.rmtree(leftover, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftover from an earlier call in this process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
