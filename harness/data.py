"""One reader for every dataset in the MVTec AD layout.

Every dataset is converted once, at fetch time, into this layout, so MVTec AD, MTD, mSTC, the
embedded synthetic set and a user's own data are all read by the code below::

    <root>/<class>/train/good/*                      defect-free training images
    <root>/<class>/test/good/*                       defect-free test images   (label 0, no mask)
    <root>/<class>/test/<defect>/*                   defective test images     (label 1)
    <root>/<class>/ground_truth/<defect>/<stem>_mask.png   0 = normal, non-zero = defect

Images may be PNG, JPEG, BMP or TIFF (MTD keeps its JPEGs). Sub-folders and files are read in
sorted order, so the i-th sample is the same on every machine. Names starting with a dot are
ignored everywhere (reader, validation and hash).

Preprocessing is described by a ``Preprocessing`` (how images and masks are resized, the
normalisation statistics); each method names its reference's. The default follows the reference
MSFlow code (specs/msflow.md, section 1), which CFlow's matches: convert to 3 channels (greyscale
replicated), PIL resize straight to (H, W) with LANCZOS (no aspect keep, no crop), ToTensor,
ImageNet normalisation; masks resized with NEAREST and binarised to {0, 1}.

``validate_class`` checks a class before anything reads it and reports every problem at once, each
naming the file at fault and what to do about it.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile
from torch.utils.data import Dataset

from harness.errors import ConfigError, DatasetError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
GOOD = "good"
SPLITS = ("train", "test")
MASK_SUFFIX = "_mask.png"
MAX_LISTED_PROBLEMS = 20

LAYOUT_HINT = (
    "Expected layout: <class>/train/good/*, <class>/test/<good|defect>/*, "
    "<class>/ground_truth/<defect>/<stem>_mask.png."
)

Split = Literal["train", "test"]

# A truncated file must fail loudly, never be padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False


@dataclass(frozen=True)
class ImageRecord:
    """One image of a split: where it is, its label, its defect folder and its mask (if any)."""

    path: Path
    label: int  # 0 = defect-free ("good"), 1 = defective
    defect: str  # the sub-folder name: "good" or the defect type
    mask: Path | None  # None for good images


# ---------------------------------------------------------------------------------------------
# Listing


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def mask_path_for(class_dir: Path, defect: str, image_path: Path) -> Path:
    """Where the MVTec layout keeps the mask of a defective test image."""
    return class_dir / "ground_truth" / defect / f"{image_path.stem}{MASK_SUFFIX}"


def _visible_entries(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if not p.name.startswith(".")), key=lambda p: p.name)


def _subfolders(folder: Path) -> list[Path]:
    return [p for p in _visible_entries(folder) if p.is_dir()]


def _image_files(folder: Path) -> list[Path]:
    return [p for p in _visible_entries(folder) if p.is_file() and is_image_file(p)]


def _require_root(root: Path) -> None:
    if not root.is_dir():
        raise DatasetError(
            f"Dataset root {root} does not exist or is not a folder: fetch the dataset first, "
            "or correct the data root setting."
        )


def list_classes(root: str | os.PathLike) -> list[str]:
    """Sorted names of the class folders under a dataset root (folders with train/ or test/)."""
    root = Path(root)
    _require_root(root)
    return [
        d.name for d in _subfolders(root) if (d / "train").is_dir() or (d / "test").is_dir()
    ]


def require_classes(root: str | os.PathLike) -> list[str]:
    """``list_classes``, or a DatasetError saying what a dataset root holds, what this folder
    holds instead, and which folder was probably meant."""
    root = Path(root)
    classes = list_classes(root)
    if classes:
        return classes
    expected = f"{root} holds no class folder. A dataset root holds one folder per class. {LAYOUT_HINT}"
    if (root / "train").is_dir() or (root / "test").is_dir():
        raise DatasetError(f"{expected} {root} itself looks like a class folder (it has train/ or test/); "
                           f"did you mean `flowad validate {root.parent} --classes {root.name}`?")
    below = [d for d in _subfolders(root) if list_classes(d)]
    if below:
        meant = " or ".join(f"`flowad validate {d}`" for d in below[:3])
        raise DatasetError(f"{expected} This looks like the parent of a dataset ({', '.join(d.name for d in below)} "
                           f"hold class folders); did you mean {meant}?")
    if any((root / name).exists() for name in ("metrics.json", "record.json", "main", "ablations", "rescored")):
        raise DatasetError(f"{expected} {root} looks like a folder of training runs, not a dataset; "
                           "datasets are under datasets/<name>/ (or demo/data/<name>/ for the demo).")
    found = ", ".join(p.name for p in _visible_entries(root)[:8]) or "nothing (it is empty)"
    raise DatasetError(f"{expected} Found: {found}. Fetch a dataset (`flowad fetch NAME`) or point at its folder.")


def _class_dir(root: Path, class_name: str) -> Path:
    """The class folder, or a DatasetError that lists the classes that do exist."""
    _require_root(root)
    class_dir = root / class_name
    if not class_dir.is_dir():
        available = list_classes(root)
        known = ", ".join(available) if available else "none (the root holds no class folders)"
        raise DatasetError(
            f"Class '{class_name}' not found: {class_dir} is not a folder. Classes in {root}: "
            f"{known}. Check the class name, or fetch the dataset that holds it."
        )
    return class_dir


def index_split(root: str | os.PathLike, class_name: str, split: Split) -> list[ImageRecord]:
    """All images of one split in deterministic order: sorted sub-folders, then sorted files.

    Training reads train/good only (one-class setting). Test reads every sub-folder of test/:
    'good' gives label 0 without a mask, any other folder label 1 with the mask path derived from
    the image stem (its existence is checked by ``validate_class``, not here).
    """
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(root)
    class_dir = _class_dir(root, class_name)
    split_dir = class_dir / split
    if not split_dir.is_dir():
        raise DatasetError(f"{split_dir} is missing. {LAYOUT_HINT}")
    folders = [split_dir / GOOD] if split == "train" else _subfolders(split_dir)
    records = []
    for folder in folders:
        if not folder.is_dir():
            raise DatasetError(f"{folder} is missing: put the defect-free training images there.")
        defect = folder.name
        for image in _image_files(folder):
            if defect == GOOD:
                records.append(ImageRecord(image, 0, defect, None))
            else:
                mask = mask_path_for(class_dir, defect, image)
                records.append(ImageRecord(image, 1, defect, mask))
    return records


# ---------------------------------------------------------------------------------------------
# Validation


@dataclass(frozen=True)
class _FileCheck:
    size: tuple[int, int] | None  # (width, height) from the header; None if unreadable
    error: str | None


def _check_file(path: Path, decode: bool, full_decode: bool) -> _FileCheck:
    """Read the header; optionally verify and decode, so truncated or corrupt files are caught.

    ``verify`` walks a PNG chunk by chunk, checks every CRC and requires the end chunk, which
    catches truncation and bit rot without inflating the pixels (a few ms for a 900x900 image;
    a full PNG decode costs 20x more). JPEG's verify checks nothing, so JPEGs are always decoded,
    at 1/8 scale through ``draft`` (the entropy-coded data is still read to its end, so a
    truncated JPEG fails). Other formats are decoded in full. ``full_decode`` also decodes PNGs.
    """
    try:
        with Image.open(path) as image:
            size = image.size
            image_format = image.format
            if decode:
                image.verify()
        if decode and (image_format != "PNG" or full_decode):
            with Image.open(path) as image:
                if image_format == "JPEG":
                    image.draft(image.mode, (1, 1))
                image.load()
    except Exception as error:  # PIL raises many types for broken files
        return _FileCheck(None, f"{type(error).__name__}: {error}")
    return _FileCheck(size, None)


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _scan(class_dir: Path, root: Path) -> tuple[list[tuple[str, int, int]], list[str]]:
    """(relative path, size, mtime) of every visible regular file, and a problem for every entry
    that cannot be read as one: a broken or looping link, a link out of the dataset root, a
    fifo, socket or device (opening a fifo named .png would wait forever)."""
    entries, problems = [], []
    root_real = os.path.realpath(root)
    seen_dirs = {os.path.realpath(class_dir)}

    def link_problem(path: Path) -> str | None:
        if not path.is_symlink():
            return None
        real = os.path.realpath(path)
        if not os.path.exists(path):
            return f"{_relative(path, root)} is a broken or looping link: delete it or make it point to the file"
        if os.path.commonpath([real, root_real]) != root_real:
            return (f"{_relative(path, root)} is a link to {real}, outside the dataset folder {root}: "
                    "copy the file into the dataset instead")
        return None

    for folder, dirs, files in os.walk(class_dir, followlinks=True):
        kept = []
        for name in sorted(d for d in dirs if not d.startswith(".")):
            path = Path(folder, name)
            problem = link_problem(path)
            real = os.path.realpath(path)
            if problem is None and real in seen_dirs:
                problem = f"{_relative(path, root)} is a link to a folder above it (a loop): delete it"
            if problem is not None:
                problems.append(problem)
                continue
            seen_dirs.add(real)
            kept.append(name)
        dirs[:] = kept
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = Path(folder, name)
            problem = link_problem(path)
            if problem is None:
                info = path.stat()
                if not stat.S_ISREG(info.st_mode):
                    problem = (f"{_relative(path, root)} is not a regular file (a fifo, socket or "
                               "device): delete it")
                else:
                    entries.append((path.relative_to(class_dir).as_posix(), info.st_size, info.st_mtime_ns))
            if problem is not None:
                problems.append(problem)
    return entries, problems


def _fingerprint(class_dir: Path) -> tuple:
    """(relative path, size, mtime) of every visible file: a cheap 'nothing changed' token."""
    entries, problems = _scan(class_dir, class_dir.parent)
    return tuple(entries) + tuple(problems)


# Classes validated in this process, so the train and the test dataset check a class only once.
# Value: (fingerprint, depth) with depth 0 = structure, 1 = + verify/decode, 2 = + full PNG decode.
_VALIDATED: dict[str, tuple[tuple, int]] = {}


def _structure_problems(root: Path, class_dir: Path) -> list[str]:
    """Missing or misplaced folders and files; empty splits."""
    name = _relative(class_dir, root)
    exts = "/".join(e.lstrip(".") for e in IMAGE_EXTENSIONS)
    if not _visible_entries(class_dir):
        return [
            f"{name}/ is empty: create {name}/train/good/ with the defect-free training images "
            f"and {name}/test/<good|defect>/ with the test images."
        ]
    problems = []
    train_dir, test_dir = class_dir / "train", class_dir / "test"
    if not train_dir.is_dir():
        problems.append(
            f"{name}/train/ is missing: create {name}/train/good/ and put the defect-free "
            "training images there."
        )
    else:
        if not (train_dir / GOOD).is_dir():
            problems.append(
                f"{name}/train/good/ is missing: put the defect-free training images in it."
            )
        elif not _image_files(train_dir / GOOD):
            problems.append(
                f"{name}/train/good/ holds no images ({exts}): add the defect-free training images."
            )
        for folder in _subfolders(train_dir):
            if folder.name != GOOD:
                problems.append(
                    f"{name}/train/{folder.name}/ is not read: training uses train/good/ only. "
                    f"Move defective images to {name}/test/{folder.name}/ (masks in "
                    f"{name}/ground_truth/{folder.name}/) or delete the folder."
                )
        for image in _image_files(train_dir):
            problems.append(
                f"{_relative(image, root)} is not in a sub-folder and is not read: move it into "
                f"{name}/train/good/."
            )
    if not test_dir.is_dir():
        problems.append(
            f"{name}/test/ is missing: create {name}/test/good/ (defect-free images) and "
            f"{name}/test/<defect>/ (defective images, masks in {name}/ground_truth/<defect>/)."
        )
    else:
        if not any(_image_files(folder) for folder in _subfolders(test_dir)):
            problems.append(
                f"{name}/test/ holds no images ({exts}) in any sub-folder: add test images to "
                f"{name}/test/good/ and {name}/test/<defect>/."
            )
        for image in _image_files(test_dir):
            problems.append(
                f"{_relative(image, root)} is not in a sub-folder and is not read: move it into "
                f"{name}/test/good/ or {name}/test/<defect>/."
            )
    return problems


def validate_class(
    root: str | os.PathLike,
    class_name: str,
    check_images: bool = True,
    *,
    full_decode: bool = False,
    workers: int | None = None,
) -> None:
    """Check one class of an MVTec-layout dataset; raise one DatasetError listing every problem.

    Checks: the class folder exists (else the classes that do are listed); train/good/ and test/
    exist and hold images; every defective test image has its mask, of the same size as the image
    (sizes come from file headers). With ``check_images`` every image and mask is also verified
    and decoded (see ``_check_file``: PNGs by chunk CRCs, JPEGs by a 1/8-scale decode), which
    catches truncated, corrupt and non-image files (400 PNGs of 900x900: under a second).
    ``full_decode=True`` decodes PNGs in full as well (50 to 100 ms per 900x900 PNG and core).
    Files are checked on ``workers`` threads (default: CPU count, at most 8). A class that passed
    is remembered for this process until one of its files changes.
    """
    root = Path(root)
    class_dir = _class_dir(root, class_name)
    depth = (2 if full_decode else 1) if check_images else 0
    key = str(class_dir.resolve())
    fingerprint = _fingerprint(class_dir)
    cached = _VALIDATED.get(key)
    if cached is not None and cached[0] == fingerprint and cached[1] >= depth:
        return

    problems = _scan(class_dir, root)[1]
    if problems:  # nothing else is safe to open
        raise DatasetError(_problem_report(class_dir, problems))
    problems = _structure_problems(root, class_dir)
    records: list[ImageRecord] = []
    if (class_dir / "train" / GOOD).is_dir():
        records += index_split(root, class_name, "train")
    if (class_dir / "test").is_dir():
        records += index_split(root, class_name, "test")

    # Unreadable files first, then missing masks, then size mismatches: with many problems of one
    # kind, the listed ones still show every kind.
    missing_masks = [r for r in records if r.mask is not None and not r.mask.is_file()]
    missing = {r.mask for r in missing_masks}
    files = [r.path for r in records] + [
        r.mask for r in records if r.mask is not None and r.mask not in missing
    ]
    n_workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        checks = dict(
            zip(files, pool.map(lambda p: _check_file(p, check_images, full_decode), files))
        )

    for path in files:
        check = checks[path]
        if check.error is not None:
            problems.append(
                f"{_relative(path, root)} cannot be read as an image, or is truncated or corrupt "
                f"({check.error}): replace it with a good copy (download or export it again) "
                "or delete it."
            )
    for record in missing_masks:
        problems.append(
            f"{_relative(record.path, root)} has no mask: expected {_relative(record.mask, root)}. "
            f"Add a PNG mask of the same size (0 = normal, non-zero = defect), or move the image "
            f"to test/good/ if it is defect-free."
        )
    for record in records:
        if record.mask is None or record.mask not in checks:
            continue
        image_size, mask_size = checks[record.path].size, checks[record.mask].size
        if image_size is not None and mask_size is not None and image_size != mask_size:
            problems.append(
                f"{_relative(record.mask, root)} is {mask_size[0]}x{mask_size[1]} (width x height) "
                f"but its image {_relative(record.path, root)} is {image_size[0]}x{image_size[1]}: "
                "export the mask again at the image's size."
            )

    if problems:
        raise DatasetError(_problem_report(class_dir, problems))
    _VALIDATED[key] = (fingerprint, depth)


def check_both_labels(root: str | os.PathLike, class_name: str) -> None:
    """DatasetError unless the test split holds defect-free and defective images: image AUROC,
    what every run reports, is undefined with one label (checked before training, not after)."""
    labels = {record.label for record in index_split(root, class_name, "test")}
    if labels and labels != {0, 1}:
        missing = "defective images in test/<defect>/" if labels == {0} else "defect-free images in test/good/"
        raise DatasetError(
            f"{Path(root) / class_name}/test/ holds one kind of image only: image AUROC needs both, so "
            f"add {missing}."
        )


def _problem_report(class_dir: Path, problems: Sequence[str]) -> str:
    count = len(problems)
    lines = [f"{class_dir} does not pass validation ({count} problem{'s' if count != 1 else ''}):"]
    lines += [f"  - {problem}" for problem in problems[:MAX_LISTED_PROBLEMS]]
    if count > MAX_LISTED_PROBLEMS:
        lines.append(f"  ... and {count - MAX_LISTED_PROBLEMS} more")
    lines.append(f"Fix them all and run again. {LAYOUT_HINT}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Hash


def dataset_hash(root: str | os.PathLike, class_name: str, chunk_size: int = 1 << 20) -> str:
    """sha256 over the sorted relative paths, sizes and bytes of every visible file of a class.

    Goes into run records, so a number can be traced to the exact data it was computed on.
    """
    class_dir = _class_dir(Path(root), class_name)
    entries, problems = _scan(class_dir, Path(root))
    if problems:
        raise DatasetError(_problem_report(class_dir, problems))
    digest = hashlib.sha256()
    for relative, size, _ in entries:
        digest.update(relative.encode("utf-8") + b"\0" + size.to_bytes(8, "little"))
        with open(class_dir / relative, "rb") as handle:
            for chunk in iter(lambda: handle.read(chunk_size), b""):
                digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Loading


def _as_size(image_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    values = tuple(int(v) for v in image_size)
    if len(values) != 2 or min(values) <= 0:
        raise ConfigError(
            f"image_size must be (height, width) with positive values, got {image_size}"
        )
    return values[0], values[1]


def read_rgb(path: Path) -> Image.Image:
    """Open an image as 8-bit RGB: greyscale replicated, palette/alpha/CMYK converted."""
    with Image.open(path) as image:
        image.load()
        if image.mode in ("I;16", "I;16L", "I;16B", "I"):
            # 16-bit greyscale: keep the top 8 bits (PIL's convert would clip at 255 instead)
            values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8
            image = Image.fromarray(values.astype(np.uint8), mode="L")
        return image.convert("RGB")


# Image resizing. PIL filters work on the 8-bit image (torchvision's Resize on a PIL image is
# PIL's bilinear filter, which widens its support when shrinking, i.e. antialiases);
# "bilinear_antialias" is torchvision's Resize(antialias=True) on the float tensor in [0, 1].
IMAGE_RESIZE_METHODS = ("lanczos", "bilinear", "bicubic", "bilinear_antialias")
# Mask resizing: NEAREST on the binary mask, or bilinear on the {0, 1} mask thresholded at 0.5.
MASK_RESIZE_METHODS = ("nearest", "bilinear")
_PIL_FILTERS = {"lanczos": Image.LANCZOS, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
MASK_THRESHOLD = 0.5


@dataclass(frozen=True)
class Preprocessing:
    """How an image and its mask become tensors: the resize method of each, and the per-channel
    normalisation statistics. ``key()`` names everything the tensors depend on apart from the
    file and the size, for caches."""

    image_resize: str = "lanczos"
    mask_resize: str = "nearest"
    mean: tuple[float, float, float] = field(default=IMAGENET_MEAN)
    std: tuple[float, float, float] = field(default=IMAGENET_STD)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if self.image_resize not in IMAGE_RESIZE_METHODS:
            raise ConfigError(f"image_resize={self.image_resize!r} is not known; use one of {IMAGE_RESIZE_METHODS}")
        if self.mask_resize not in MASK_RESIZE_METHODS:
            raise ConfigError(f"mask_resize={self.mask_resize!r} is not known; use one of {MASK_RESIZE_METHODS}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError(
                f"normalisation mean={self.mean} std={self.std}: give three values each (R, G, B), "
                "the standard deviations positive"
            )

    @property
    def eight_bit(self) -> bool:
        """Whether the resized image is 8-bit (a PIL filter), so the decoded-image cache holds it exactly."""
        return self.image_resize in _PIL_FILTERS

    def key(self) -> str:
        mean = ",".join(f"{v:g}" for v in self.mean)
        std = ",".join(f"{v:g}" for v in self.std)
        return f"image={self.image_resize}|mask={self.mask_resize}|mean={mean}|std={std}"


DEFAULT_PREPROCESSING = Preprocessing()


def image_to_tensor(image: Image.Image, preprocessing: Preprocessing = DEFAULT_PREPROCESSING) -> torch.Tensor:
    """ToTensor + Normalize: uint8 HxWx3 -> float32 [3, H, W]."""
    return normalise(to_unit_tensor(image), preprocessing)


def to_unit_tensor(image: Image.Image) -> torch.Tensor:
    """ToTensor: uint8 HxWx3 -> float32 [3, H, W] in [0, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


def normalise(pixels: torch.Tensor, preprocessing: Preprocessing = DEFAULT_PREPROCESSING) -> torch.Tensor:
    mean = torch.tensor(preprocessing.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(preprocessing.std, dtype=torch.float32).view(3, 1, 1)
    return (pixels - mean) / std


def resize_image(image: Image.Image, image_size: tuple[int, int] | None, method: str = "lanczos") -> torch.Tensor:
    """An 8-bit RGB image resized straight to (H, W) (None keeps the native size), as a float32
    [3, H, W] tensor in [0, 1] (not normalised)."""
    if method == "bilinear_antialias" and image_size is not None and image.size != (image_size[1], image_size[0]):
        pixels = to_unit_tensor(image)[None]
        return F.interpolate(pixels, size=tuple(image_size), mode="bilinear", align_corners=False, antialias=True)[0]
    return to_unit_tensor(resize_rgb(image, image_size, method))


def resize_rgb(image: Image.Image, image_size: tuple[int, int] | None, method: str = "lanczos") -> Image.Image:
    """An 8-bit RGB image resized with a PIL filter (the resize methods whose output is 8-bit)."""
    if image_size is None or image.size == (image_size[1], image_size[0]):
        return image
    return image.resize((image_size[1], image_size[0]), _PIL_FILTERS[method])


def load_image(path: Path, image_size: tuple[int, int] | None,
               preprocessing: Preprocessing = DEFAULT_PREPROCESSING) -> torch.Tensor:
    """Read, resize straight to (H, W) (None keeps the native size), normalise."""
    return normalise(resize_image(read_rgb(path), image_size, preprocessing.image_resize), preprocessing)


def load_mask(path: Path, image_size: tuple[int, int] | None, method: str = "nearest") -> torch.Tensor:
    """Read a mask (non-zero = defect), resize with ``method`` (NEAREST, or bilinear on {0, 1}
    then > 0.5), return float32 [1, H, W] in {0, 1}."""
    with Image.open(path) as mask:
        values = np.asarray(mask)
    if values.ndim == 3:  # RGB(A) mask: any non-zero colour channel marks a defect
        values = values[..., :3].max(axis=-1)
    binary = values != 0
    if image_size is not None and binary.shape != tuple(image_size):
        if method == "bilinear":
            resized = F.interpolate(torch.from_numpy(binary).to(torch.float32)[None, None], size=tuple(image_size),
                                    mode="bilinear", align_corners=False, antialias=True)[0, 0]
            return (resized > MASK_THRESHOLD).to(torch.float32).unsqueeze(0)
        pil = Image.fromarray(np.where(binary, 255, 0).astype(np.uint8), mode="L")
        binary = np.asarray(pil.resize((image_size[1], image_size[0]), Image.NEAREST)) != 0
    return torch.from_numpy(binary).to(torch.float32).unsqueeze(0)


def resize_masks(masks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Binary masks [N, H, W] at another size: bilinear (align_corners False), then > 0.5, as
    U-Flow's evaluation brings its masks to 256. The same size returns the masks unchanged."""
    masks = np.asarray(masks, dtype=bool)
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    resized = F.interpolate(torch.from_numpy(masks.astype(np.float32))[:, None], size=tuple(size), mode="bilinear",
                            align_corners=False)[:, 0]
    return (resized > MASK_THRESHOLD).numpy()


class AnomalyDataset(Dataset):
    """Images, labels and masks of one class and split of an MVTec-layout dataset.

    ``image_size`` is (H, W) (an int means square; None keeps each image's native size);
    ``preprocessing`` says how images and masks are resized and normalised (default: LANCZOS,
    NEAREST, ImageNet statistics). Items are dicts: image float32 [3, H, W] (normalised), label
    int (0 good, 1 defect), mask float32 [1, H, W] in {0, 1} (all zeros for good images), path str.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        class_name: str,
        split: Split,
        image_size: int | tuple[int, int] | None,
        validate: bool = True,
        preprocessing: Preprocessing = DEFAULT_PREPROCESSING,
    ) -> None:
        if split not in SPLITS:
            raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
        self.root = Path(root)
        self.class_name = class_name
        self.split = split
        self.image_size = _as_size(image_size)
        self.preprocessing = preprocessing
        if validate:
            validate_class(self.root, class_name)
        self.records: list[ImageRecord] = index_split(self.root, class_name, split)
        self.decoded = None  # DecodedImages once use_image_cache has run

    def use_image_cache(self, cache_root: str | os.PathLike, data_hash: str) -> None:
        """Read images and masks from the decoded-image cache (harness/image_cache.py) under
        ``cache_root``, decoding the split into it first if it is not there (or damaged)."""
        from harness.image_cache import cache_file, decoded_split

        if self.image_size is None:
            raise ConfigError("the decoded-image cache needs a fixed image_size (images of one size)")
        if not self.preprocessing.eight_bit:
            raise ConfigError(
                f"the decoded-image cache keeps 8-bit pixels, and image_resize={self.preprocessing.image_resize!r} "
                "resizes in floating point: its images would change; read them without the cache"
            )
        resize = f"{self.preprocessing.image_resize}_{self.preprocessing.mask_resize}"
        class_dir = self.root / self.class_name
        paths = [record.path.relative_to(class_dir).as_posix() for record in self.records]
        path = cache_file(Path(cache_root) / self.root.name, self.class_name, self.split, self.image_size,
                          resize, data_hash)
        self.decoded = decoded_split(path, paths, self._decode)

    def _decode(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """One record as uint8 arrays: RGB [H, W, 3] and mask {0, 1} [H, W], resized."""
        record = self.records[index]
        try:
            image = np.asarray(resize_rgb(read_rgb(record.path), self.image_size, self.preprocessing.image_resize))
            if record.mask is None:
                mask = np.zeros(image.shape[:2], dtype=np.uint8)
            else:
                mask = load_mask(record.mask, image.shape[:2], self.preprocessing.mask_resize)[0].numpy().astype(np.uint8)
        except (OSError, ValueError, SyntaxError) as error:  # PIL's errors for broken files
            raise DatasetError(
                f"Cannot read {record.path} or its mask {record.mask} ({error}): run "
                f"validate_class on '{self.class_name}' for a full report, then replace the file."
            ) from error
        return image, mask

    def __len__(self) -> int:
        return len(self.records)

    @property
    def labels(self) -> list[int]:
        return [record.label for record in self.records]

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        if self.decoded is not None:
            image = image_to_tensor(self.decoded.images[index], self.preprocessing)
            mask = torch.from_numpy(self.decoded.masks[index]).to(torch.float32).unsqueeze(0)
            return {"image": image, "label": record.label, "mask": mask, "path": str(record.path)}
        try:
            image = load_image(record.path, self.image_size, self.preprocessing)
            if record.mask is None:
                mask = torch.zeros(1, *image.shape[1:], dtype=torch.float32)
            else:
                mask = load_mask(record.mask, (image.shape[1], image.shape[2]), self.preprocessing.mask_resize)
        except (OSError, ValueError, SyntaxError) as error:  # PIL's errors for broken files
            raise DatasetError(
                f"Cannot read {record.path} or its mask {record.mask} ({error}): run "
                f"validate_class on '{self.class_name}' for a full report, then replace the file."
            ) from error
        return {"image": image, "label": record.label, "mask": mask, "path": str(record.path)}

