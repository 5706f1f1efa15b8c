"""MTD, Magnetic Tile Defect (MT_*/Imgs) -> one MVTec-layout class with DifferNet's split."""

from __future__ import annotations

import os
import shutil
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from harness.errors import FetchError
from harness.fetch.layout import find_dir, write_mask

MTD_CLASS = "magnetic_tile"
MTD_DEFECT_FOLDERS = {
    "MT_Blowhole": "blowhole", "MT_Break": "break", "MT_Crack": "crack",
    "MT_Fray": "fray", "MT_Uneven": "uneven",
}


def _read_split(train_list: str | os.PathLike | Iterable[str]) -> tuple[list[str], str]:
    if isinstance(train_list, (str, os.PathLike)):
        path = Path(train_list)
        if not path.is_file():
            raise FetchError(f"MTD split file {path} does not exist")
        return [n.strip() for n in path.read_text().splitlines() if n.strip()], str(path)
    return [str(n).strip() for n in train_list if str(n).strip()], "the given train list"


def convert_mtd(raw_root: str | os.PathLike, out_root: str | os.PathLike,
                train_list: str | os.PathLike | Iterable[str], mask_threshold: int = 127) -> dict:
    """MTD (MT_*/Imgs/<name>.jpg + same-name .png masks) -> one MVTec-layout class.

    train/good: the MT_Free images named in ``train_list`` (DifferNet's split); test/good: the
    other MT_Free images; test/<defect>: every defective image, with its mask thresholded
    (> ``mask_threshold`` is defect; the published PNGs hold a few grey values) and written as
    0/255 PNG. Image bytes are copied unchanged (no JPEG re-encoding).
    """
    raw_root, out_root = Path(raw_root), Path(out_root)
    root = find_dir(raw_root, lambda d: (d / "MT_Free" / "Imgs").is_dir())
    if root is None:
        raise FetchError(f"no MT_Free/Imgs folder under {raw_root}: not the MTD repository?")
    names, split_source = _read_split(train_list)
    free = sorted(p.name for p in (root / "MT_Free" / "Imgs").glob("*.jpg"))
    duplicates = sorted(n for n, k in Counter(names).items() if k > 1)
    if duplicates:
        raise FetchError(f"{split_source} lists {len(duplicates)} names twice, "
                         f"e.g. {', '.join(duplicates[:3])}")
    missing = sorted(set(names) - set(free))
    if missing:
        raise FetchError(
            f"{len(missing)} names in {split_source} are not in {root / 'MT_Free' / 'Imgs'}, e.g. "
            f"{', '.join(missing[:5])}. The split must match the pinned MTD revision."
        )
    train = set(names)
    cls = out_root / MTD_CLASS
    for sub in ("train/good", "test/good"):
        (cls / sub).mkdir(parents=True, exist_ok=True)
    for name in free:
        dest = cls / ("train/good" if name in train else "test/good") / name
        shutil.copyfile(root / "MT_Free" / "Imgs" / name, dest)

    for folder, defect in MTD_DEFECT_FOLDERS.items():
        images = sorted((root / folder / "Imgs").glob("*.jpg"))
        if not images:
            raise FetchError(f"{root / folder / 'Imgs'} holds no .jpg images")
        (cls / "test" / defect).mkdir(parents=True, exist_ok=True)
        (cls / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
        for image in images:
            mask_path = image.with_suffix(".png")
            if not mask_path.is_file():
                raise FetchError(f"{image} has no mask {mask_path.name} next to it")
            with Image.open(image) as im:
                size = im.size
            with Image.open(mask_path) as mk:
                mask = np.asarray(mk.convert("L")) > mask_threshold
            if mask.shape != (size[1], size[0]):
                raise FetchError(f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but its "
                                 f"image is {size[0]}x{size[1]}")
            shutil.copyfile(image, cls / "test" / defect / image.name)
            write_mask(mask, cls / "ground_truth" / defect / f"{image.stem}_mask.png")
    return {"train_list_entries": len(names)}
