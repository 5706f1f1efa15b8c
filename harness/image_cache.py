"""Decoded-image cache: a class's images decoded and resized once per (size, resize method) and
reused by every run and method that reads them at that size.

Decoding and resizing dominate the data side of a run (a 1024 px PNG of MVTec AD takes tens of
milliseconds to inflate and LANCZOS-resize; a run reads every test image at each evaluation when
features are not cached, and the test set once more for its masks). One file per class, split,
size and resize method holds what ``image_to_tensor`` receives::

    <cache>/<class>/<split>-<H>x<W>-<resize>-<data hash, 16 hex>.npz
        images   uint8 [N, H, W, 3]  RGB after resizing
        masks    uint8 [N, H, W]     {0, 1} after resizing (all zero for good images)
        paths    str [N]             each image's path relative to the class folder
        digest   str                 sha256 of images and masks, checked at every load

The data hash (``harness.data.dataset_hash``, over every byte of the class) is part of the name,
so changed data never meets old pixels. Files are written atomically (temporary file + rename),
loaded without pickle, and one that fails its checks (truncated, bit rot, other images) is
rebuilt, with a warning that names it.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT = 1  # bump when the stored layout changes


@dataclass
class DecodedImages:
    images: np.ndarray  # uint8 [N, H, W, 3]
    masks: np.ndarray  # uint8 [N, H, W]
    paths: list[str]


def cache_file(cache_root: Path, class_name: str, split: str, size: tuple[int, int], resize: str,
               data_hash: str) -> Path:
    return Path(cache_root) / class_name / f"{split}-{size[0]}x{size[1]}-{resize}-{data_hash[:16]}.v{FORMAT}.npz"


def _digest(images: np.ndarray, masks: np.ndarray) -> str:
    digest = hashlib.sha256()
    for array in (images, masks):
        digest.update(str(array.shape).encode())
        digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


def _load(path: Path, paths: Sequence[str]) -> DecodedImages:
    """The stored arrays, or ValueError saying what is wrong with the file."""
    try:
        with np.load(path, allow_pickle=False) as data:
            images, masks = data["images"], data["masks"]
            stored_paths, digest = [str(p) for p in data["paths"]], str(data["digest"])
    except Exception as error:  # zip, header or member errors of a damaged file
        raise ValueError(f"unreadable ({type(error).__name__}: {error})") from error
    if stored_paths != list(paths):
        raise ValueError("it holds other images than the class folder lists")
    if images.dtype != np.uint8 or masks.dtype != np.uint8 or len(images) != len(paths):
        raise ValueError("unexpected arrays")
    if _digest(images, masks) != digest:
        raise ValueError("its pixels do not match their stored sha256 (damaged)")
    return DecodedImages(images, masks, stored_paths)


def _write(path: Path, decoded: DecodedImages) -> None:
    from harness.train import atomic_write_bytes  # the one atomic write (umask, fsync, rename)

    atomic_write_bytes(path, lambda f: np.savez(f, images=decoded.images, masks=decoded.masks,
                                                paths=np.array(decoded.paths),
                                                digest=np.array(_digest(decoded.images, decoded.masks))))


def decoded_split(path: Path, paths: Sequence[str],
                  decode: Callable[[int], tuple[np.ndarray, np.ndarray]], workers: int | None = None
                  ) -> DecodedImages:
    """The cached images at ``path``, or decode them all (``decode(i) -> (image, mask)``, on
    threads: PIL releases the GIL while it decodes and resizes), store them and return them."""
    path = Path(path)
    if path.exists():
        try:
            return _load(path, paths)
        except ValueError as problem:
            warnings.warn(f"decoded-image cache {path}: {problem}; decoding the images again", stacklevel=2)
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        pairs = list(pool.map(decode, range(len(paths))))
    decoded = DecodedImages(np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]), list(paths))
    _write(path, decoded)
    for stale in path.parent.glob(path.name.split("-")[0] + "-*"):
        # the same split at this size and resize method from data that has since changed
        if stale.name != path.name and not stale.name.startswith(".") and _same_setting(stale, path):
            stale.unlink(missing_ok=True)
    return decoded


def _same_setting(a: Path, b: Path) -> bool:
    """Whether two cache files differ only in their data hash."""
    return a.name.rsplit("-", 1)[0] == b.name.rsplit("-", 1)[0]
